"""DIN / DARE / pooling on tiny behaviour batches: padding, Dice, L2, DARE paths, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import embtables.models.dare  # noqa: F401  (registers dare)
import embtables.models.din  # noqa: F401  (registers din)
import embtables.models.pooling  # noqa: F401  (registers pool)
from embtables.datasets.schema import CategoricalFeature, DatasetSchema, SequenceFeature
from embtables.experiments.build import embedding_factory
from embtables.experiments.config import EmbeddingSection
from embtables.models.registry import get_model
from embtables.models.seq_common import Dice

torch.set_num_threads(1)

SCHEMA = DatasetSchema(
    "tiny", dense=["I1"],
    categorical=[CategoricalFeature("user_id", 5, "vocab", 6), CategoricalFeature("item_id", 9, "vocab", 10),
                 CategoricalFeature("cate", 3, "vocab", 4)],
    sequences=[SequenceFeature("hist_item_id", 9, 6, "item_id", 10),
               SequenceFeature("hist_cate", 3, 6, "cate", 4)],
)
KEYS = ["user_id", "item_id", "cate", "hist_item_id", "hist_cate"]


def kjt(users, items, cates, hist, hcat) -> KeyedJaggedTensor:
    vals = [*users, *items, *cates, *(x for h in hist for x in h), *(x for h in hcat for x in h)]
    lens = [1] * 3 * len(users) + [len(h) for h in hist] + [len(h) for h in hcat]
    return KeyedJaggedTensor(keys=KEYS, values=torch.tensor(vals), lengths=torch.tensor(lens))


HIST = [[1, 2, 3], [4], [], [5, 6, 2]]
HCAT = [[1, 2, 3], [1], [], [2, 2, 1]]
BATCH = ([1, 2, 3, 4], [1, 5, 7, 2], [1, 2, 3, 2])


def build(name: str, dim: int = 8, **knobs):
    entry = get_model(name)
    torch.manual_seed(0)
    make_embedding = embedding_factory(EmbeddingSection(method="full", dim=dim))
    return entry.builder(entry.config_cls(**knobs), SCHEMA, make_embedding)


@pytest.mark.parametrize("name,knobs", [("din", {}), ("din", {"softmax": True}), ("dare", {}),
                                        ("dare", {"top_k": 2}), ("pool", {"pooling": "mean"})])
def test_padding_never_changes_output(name, knobs):
    model = build(name, **knobs)
    dense = torch.randn(4, 1)
    plain = kjt(*BATCH, HIST, HCAT)
    # padding id 0 appended, prepended and interleaved; a longer max length overall
    ph = [[0, *h, 0, 0] for h in HIST]
    ph[0] = [0, 1, 0, 2, 3, 0]
    pc = [[0, *h, 0, 0] for h in HCAT]
    pc[0] = [0, 1, 0, 2, 3, 0]
    padded = kjt(*BATCH, ph, pc)
    for train in (True, False):  # training mode: Dice's batch statistics see no padding either
        model.train(train)
        a, b = model(torch.clone(dense), plain), model(torch.clone(dense), padded)
        assert torch.equal(a, b), (train, a, b)


def test_din_padding_row_equals_rows_own_output_in_eval():
    """Eval: a row's output does not depend on the other rows' history lengths."""
    model = build("din").eval()
    dense = torch.randn(4, 1)
    full = model(dense, kjt(*BATCH, HIST, HCAT))
    alone = model(dense[:1], kjt([1], [1], [1], HIST[:1], HCAT[:1]))
    torch.testing.assert_close(full[:1], alone, rtol=0, atol=1e-6)


def test_dice_batch_statistics_in_training_running_in_eval():
    torch.manual_seed(0)
    dice = Dice(3)
    with torch.no_grad():
        dice.alpha.copy_(torch.tensor([0.1, -0.5, 0.25]))
    x = torch.randn(16, 3) * 2 + 1

    def ref(x, mean, var):
        p = torch.sigmoid((x - mean) / torch.sqrt(var + 1e-8))
        return p * x + (1 - p) * dice.alpha * x

    y = dice.train()(x)
    torch.testing.assert_close(y, ref(x, x.mean(0), x.var(0, unbiased=False)))
    # running statistics after one step: momentum 0.1 from (0, 1), unbiased variance
    run_mean = 0.1 * x.mean(0)
    run_var = 0.9 + 0.1 * x.var(0, unbiased=True)
    torch.testing.assert_close(dice.bn.running_mean, run_mean)
    x2 = torch.randn(5, 3)
    torch.testing.assert_close(dice.eval()(x2), ref(x2, run_mean, run_var))


def test_l2_touches_only_present_rows_once_per_id(tmp_path):
    lam = 0.5
    model = build("din", l2=lam, dedup=False)
    # n_j from a dataset's meta/id_counts.npz
    (tmp_path / "meta").mkdir()
    item_counts = np.arange(10) + 1  # n_j = j + 1
    np.savez(tmp_path / "meta" / "id_counts.npz", item_id=item_counts, cate=np.full(4, 2))
    model.load_dataset_stats(tmp_path)
    hist = [[1, 2, 1], [2, 2], [], [3]]  # ids repeat within and across rows
    hcat = [[1, 1, 1], [1, 1], [], [2]]
    sparse = kjt([1, 1, 2, 3], [2, 3, 3, 4], [1, 1, 2, 2], hist, hcat)
    model.train()
    model(torch.zeros(4, 1), sparse)
    reg = model.regularization_loss(sparse)

    tables = model.behavior_embedding.tables.embeddings
    w_item, w_cate = tables["t_item_id"].weight, tables["t_cate"].weight
    w_user = model.context_embedding.tables.embedding_bags["t_user_id"].weight
    items, cates, users = {1, 2, 3, 4}, {1, 2}, {1, 2, 3}
    expected = lam * (sum(w_item[j].pow(2).sum() / item_counts[j] for j in items)
                      + sum(w_cate[j].pow(2).sum() / 2 for j in cates)
                      + sum(w_user[j].pow(2).sum() for j in users))  # no counts for user_id: n_j = 1
    torch.testing.assert_close(reg, expected)

    reg.backward()
    g = w_item.grad
    for j in range(10):
        if j in items:  # d/de (lam / n_j ||e||^2), once however often j repeats
            torch.testing.assert_close(g[j], 2 * lam / item_counts[j] * w_item[j].detach())
        else:
            assert torch.count_nonzero(g[j]) == 0
    assert torch.count_nonzero(w_user.grad[[0, 4, 5]]) == 0


def test_l2_same_with_dedup_lookups():
    sparse = kjt(*BATCH, HIST, HCAT)
    regs = []
    for dedup in (False, True):
        m = build("din", l2=0.1, dedup=dedup).train()
        out = m(torch.zeros(4, 1), sparse)
        regs.append((out, m.regularization_loss()))
    torch.testing.assert_close(regs[0][0], regs[1][0])
    torch.testing.assert_close(regs[0][1], regs[1][1])


def test_dare_each_path_updates_only_its_own_table():
    model = build("dare", dim=8, attention_dim=4)
    att = model.attention_embedding.tables.embeddings["t_item_id"].weight
    rep = model.representation_embedding.tables.embeddings["t_item_id"].weight
    assert att.shape[1] == 4 and rep.shape[1] == 8
    sparse = kjt(*BATCH, HIST, HCAT)
    packed, _, lengths = model.inputs(sparse)

    # attention path: the scores' loss reaches the attention table only
    model.zero_grad()
    model.scores(packed, lengths, 4).pow(2).sum().backward()
    assert att.grad is not None and att.grad.abs().sum() > 0
    assert rep.grad is None or rep.grad.abs().sum() == 0

    # representation path: with the attention weights held fixed, only the representation table
    model.zero_grad()
    with torch.no_grad():
        s = model.scores(packed, lengths, 4)
    target, interest = model.interest.__func__(_FixedScores(model, s), packed, lengths, 4)
    (target.sum() + interest.sum()).backward()
    assert rep.grad is not None and rep.grad.abs().sum() > 0
    assert att.grad is None or att.grad.abs().sum() == 0

    # the full loss trains both, each through its own path
    model.zero_grad()
    model(torch.zeros(4, 1), sparse).sum().backward()
    assert att.grad.abs().sum() > 0 and rep.grad.abs().sum() > 0


class _FixedScores:
    """Stand-in ``self`` for DARE.interest whose scores are constants."""

    def __init__(self, model, scores):
        self._m, self._s = model, scores

    def scores(self, *args):
        return self._s

    def __getattr__(self, name):
        return getattr(self._m, name)


def test_top_k_never_selects_padding():
    model = build("dare", top_k=3)
    lengths = torch.tensor([5, 2, 0, 3, 1])
    n = int(lengths.sum())
    torch.manual_seed(1)
    scores = torch.randn(n) - 100.0  # every real score far below 0: padding (-inf) still must lose
    flat, rows, w = model.select(scores, lengths, 5)
    row = rows.index
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    counts = torch.bincount(row, minlength=5)
    assert counts.tolist() == [3, 2, 0, 3, 1]  # min(length, k)
    assert bool(((flat >= offsets[row]) & (flat < offsets[row + 1])).all())  # inside the row's own behaviours
    # the k best of row 0 are chosen, and each row's weights sum to one
    best0 = set(torch.topk(scores[:5], 3).indices.tolist())
    assert set(flat[row == 0].tolist()) == best0
    torch.testing.assert_close(torch.zeros(5).index_add_(0, row, w)[counts > 0], torch.ones(4))
    # and the model runs end to end with histories shorter than k
    model(torch.zeros(4, 1), kjt(*BATCH, HIST, HCAT)).sum().backward()


def _build_with(name: str, embedding: EmbeddingSection, **knobs):
    entry = get_model(name)
    torch.manual_seed(0)
    return entry.builder(entry.config_cls(**knobs), SCHEMA, embedding_factory(embedding))


def test_dare_attention_share_holds_dins_memory():
    """With attention_share, DARE's two behaviour modules together fit the one budget DIN's
    behaviour module gets: (10 + 4 rows) x 8 wide x 4 bytes = 448 bytes at budget 1."""
    emb = EmbeddingSection(method="hash", dim=8, budget=1)
    din = _build_with("din", emb)
    dare = _build_with("dare", emb, attention_share=0.25)
    whole = (10 + 4) * 8 * 4  # the behaviour tables' full size at dim 8: budget 1
    assert din.embedding_modules()["behavior"].memory_bytes() <= whole
    att = dare.embedding_modules()["attention"].memory_bytes()
    rep = dare.embedding_modules()["representation"].memory_bytes()
    assert att <= whole // 4 and rep <= whole - whole // 4 and att + rep <= whole
    assert rep > att  # the bigger share went to the representation module
    # the context module is sized as DIN's
    ctx = dare.embedding_modules()["context"].memory_bytes()
    assert ctx == din.embedding_modules()["context"].memory_bytes()
    # without a share each module gets a whole budget: twice the memory
    plain = _build_with("dare", emb)
    two = sum(plain.embedding_modules()[k].memory_bytes() for k in ("attention", "representation"))
    assert two > whole
    with pytest.raises(ValueError, match="attention_budget and attention_share exclude each other"):
        get_model("dare").config_cls(attention_share=0.5, attention_budget=0.1)
