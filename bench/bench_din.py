"""DIN training throughput on the ml-100k RecBole protocol (batch 2048, histories of at
most 50, one sampled negative per positive), in training rows per second.

    python bench/bench_din.py                 # 2 threads, 30 timed steps
    python bench/bench_din.py --threads 1 --model dare --steps 20

Two numbers: ``step`` (forward + backward + Adam on ready batches: the model's own
speed) and ``end_to_end`` (the same plus building each Batch from the in-memory
Arrow table), each also per second of this process's
CPU time (``*_per_cpu_s``): on a shared, loaded machine that, with ``--threads 1``, is
what one idle core does. Target: >= 15k rows/s on a 2-core CPU
(RecBole's / DeepCTR-Torch's DIN: ~1.5k rows/s there). The load average is printed
because the 2-core machine is shared: numbers taken under load are lower bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


class RecBoleStyleDIN(torch.nn.Module):
    """A re-implementation of RecBole 1.2's DIN forward (``sequential_recommender/din.py``
    with ``SequenceAttLayer``) for a same-machine, same-moment speed reference:
    padded ``[B, L]`` histories, the query repeated L times, ``[q, k, q-k, q*k]``
    concatenated, attention MLP ``mlp_hidden_size`` (256-256-256) with Sigmoid, masked
    positions set to 0, scaled by 1/sqrt(d); output MLP 256-256-256 with Dice and batch
    norm. Embedding width 12 here (RecBole: 10) so both models use the same tables."""

    def __init__(self, cards: list[int], dim: int, n_ctx_cards: list[int], hidden=(256, 256, 256)) -> None:
        from torch import nn

        from embtables.models.seq_common import Dice

        super().__init__()
        self.item_embs = nn.ModuleList(nn.Embedding(c, dim) for c in cards)
        self.ctx_embs = nn.ModuleList(nn.Embedding(c, dim) for c in n_ctx_cards)
        d = len(cards) * dim
        layers, w = [], 4 * d
        for h in hidden:
            layers += [nn.Linear(w, h), nn.Sigmoid()]
            w = h
        self.att = nn.Sequential(*layers, nn.Linear(w, 1))
        layers, w = [], 3 * d + len(n_ctx_cards) * dim
        for h in hidden:
            layers += [nn.Linear(w, h), nn.BatchNorm1d(h), Dice(h)]
            w = h
        self.dnn = nn.Sequential(*layers, nn.Linear(w, 1))
        self.d = d

    def forward(self, ctx_ids, target_ids, hist_ids, lengths):
        q = torch.cat([e(t) for e, t in zip(self.item_embs, target_ids, strict=True)], -1)  # [B, d]
        k = torch.cat([e(h) for e, h in zip(self.item_embs, hist_ids, strict=True)], -1)  # [B, L, d]
        b, length = hist_ids[0].shape
        qq = q.repeat(1, length).view(b, length, self.d)
        a = self.att(torch.cat([qq, k, qq - k, qq * k], -1)).transpose(-1, -2).squeeze(1)  # [B, L]
        mask = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
        a = a.masked_fill(mask, 0.0).unsqueeze(1) / self.d ** 0.5
        interest = torch.matmul(a, k).squeeze(1)
        ctx = torch.cat([e(c) for e, c in zip(self.ctx_embs, ctx_ids, strict=True)], -1)
        return self.dnn(torch.cat([ctx, q, interest, q * interest], -1)).squeeze(-1)


def _padded_inputs(batch, schema, max_len: int):
    """Batch KJT -> RecBole-style padded tensors."""
    from embtables.models.seq_common import pad_jagged

    d = batch.sparse_features.to_dict()
    cats = [c.name for c in schema.categorical]
    behav = [q.shares_with for q in schema.sequences]
    ctx = [d[c].values() for c in cats if c not in behav]
    tgt = [d[c].values() for c in behav]
    lengths = d[schema.sequences[0].name].lengths()
    hist = [pad_jagged(d[q.name].values(), lengths, max_len, pad=0) for q in schema.sequences]
    return ctx, tgt, hist, lengths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="din", choices=["din", "dare", "pool"])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "ml-100k-seq")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reference", type=int, default=0, metavar="STEPS",
                    help="also time STEPS steps of a RecBole-style DIN (padded, attention MLP 256-256-256) "
                         "in the same process, right after ours, and print the speed ratio")
    ap.add_argument("--set", action="append", default=[],
                    help="model knob override key=value (e.g. attention_activation=sigmoid)")
    args = ap.parse_args(argv)

    import yaml

    from embtables.datasets import load_schema
    from embtables.datasets.sequences import EpochNegatives, TableBatcher
    from embtables.experiments.build import embedding_factory
    from embtables.experiments.config import EmbeddingSection
    from embtables.models.registry import get_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not (Path(args.data) / "schema.json").exists():
        raise SystemExit(f"no dataset at {args.data}: run `embtables data movielens ML100K_DIR "
                         f"--out {args.data}` first (ML100K_DIR: the GroupLens ml-100k files)")
    schema = load_schema(args.data)
    entry = get_model(args.model)
    knobs = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    model = entry.builder(entry.config_cls(**knobs), schema,
                          embedding_factory(EmbeddingSection(method="full", dim=args.dim)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = TableBatcher(EpochNegatives(args.data, schema).table(0, 0), schema)
    n = args.warmup + args.steps
    order = np.random.default_rng(0).permutation(train.n)
    rows = [order[i * args.batch_size:(i + 1) * args.batch_size] for i in range(n)]
    hist_len = float(np.diff(train.seq[0][0]).mean())

    def step(b) -> None:
        logits = model(b.dense_features, b.sparse_features)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
        loss = loss + model.regularization_loss(b.sparse_features)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    batches = [train.batch(r) for r in rows]
    for b in batches[: args.warmup]:
        step(b)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches[args.warmup:]:
        step(b)
    t_step, c_step = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    for r in rows[args.warmup:]:
        step(train.batch(r))
    t_e2e, c_e2e = time.perf_counter() - t0, time.process_time() - c0
    timed = args.steps * args.batch_size
    ref = {}
    if args.reference:
        cards = [c.table_rows for c in schema.categorical]
        behav = [q.shares_with for q in schema.sequences]
        names = [c.name for c in schema.categorical]
        rmodel = RecBoleStyleDIN([cards[names.index(f)] for f in behav], args.dim,
                                 [cards[i] for i, nm in enumerate(names) if nm not in behav])
        ropt = torch.optim.Adam(rmodel.parameters(), lr=1e-3)
        max_len = max(q.max_len for q in schema.sequences)
        rin = [_padded_inputs(b, schema, max_len) for b in batches[: args.reference + 1]]

        def rstep(i) -> None:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(rmodel(*rin[i]), batches[i].labels)
            ropt.zero_grad(set_to_none=True)
            loss.backward()
            ropt.step()

        rstep(0)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(1, args.reference + 1):
            rstep(i)
        tr, cr = time.perf_counter() - t0, time.process_time() - c0
        rrows = args.reference * args.batch_size
        ref = {"recbole_style_step_rows_per_s": round(rrows / tr),
               "recbole_style_step_rows_per_cpu_s": round(rrows / cr),
               "speedup_step_cpu": round((timed / c_step) / (rrows / cr), 1)}
    out = {
        "model": args.model, "threads": args.threads, "batch_size": args.batch_size, "dim": args.dim,
        "mean_history_len": round(hist_len, 1), "knobs": knobs,
        "step_rows_per_s": round(timed / t_step), "end_to_end_rows_per_s": round(timed / t_e2e),
        # rows per second of this process's CPU time: with --threads 1 on a shared machine,
        # what one idle core would do (wall-clock rows/s above are lower bounds under load)
        "step_rows_per_cpu_s": round(timed / c_step), "end_to_end_rows_per_cpu_s": round(timed / c_e2e),
        **ref, "loadavg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
