"""What DIN, DARE and the pooling baseline share: input layout, target/history lookups
through one table, jagged helpers, Dice, the MLP head and mini-batch aware L2.

**Input.** The batch KJT holds categorical features (one id per row) then sequence
features (``hist_*``, jagged). A sequence feature whose schema entry ``shares_with``
names a categorical feature is the history of that *behaviour* feature (item_id ->
hist_item_id, genre -> hist_genre). Every other categorical feature is *context*
(user, age, ...), looked up by a pooled embedding module.

**One table for target and history.** :meth:`BehaviorInputs.pack` builds a KJT whose
keys are the behaviour features and whose stride is ``2B``: rows ``0..B-1`` hold the
target id, rows ``B..2B-1`` the history. A sequence-mode embedding module (any
embtables method) looks it up in one call, so the target and its history read the
same physical rows; its output values are ``[B + N, d]`` with the B targets first and
the N history behaviours after them, in order — no scatter, no padding. History ids
equal to ``padding_id`` are dropped before the lookup, so padding contributes nothing.

**Mini-batch aware L2** (DIN paper, eq. 4-5). During a training forward each lookup
records its ids and output rows; :meth:`BehaviorModel.regularization_loss` returns
``l2 * sum_{j in batch, unique} ||e_j||^2 / n_j`` — every id present in the batch once,
however often it repeats, rows absent from the batch untouched, ``n_j`` the id's
occurrences in the training data (``meta/id_counts.npz``, loaded by
:meth:`load_dataset_stats`; 1 until then). It is a function of the lookup *output*, so
its gradient reaches the table through the lookup's backward, which is what fused
in-backward optimizers (TorchRec DMP) need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.embeddings.spec import FeatureSpec
from embtables.models.segment_ops import GatherPlan, gather, gather_split, offsets_from_lengths, row_index


class SeqModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mlp: list[int] = Field(default_factory=lambda: [200, 80], description="hidden sizes of the output MLP")
    activation: Literal["dice", "prelu", "relu"] = "dice"
    dropout: float = Field(0.0, ge=0, lt=1)
    l2: float = Field(0.0, ge=0, description="mini-batch aware L2 weight lambda (0 = off)")
    padding_id: int | None = Field(
        0, description="history id that means 'no behaviour' (dropped); null = none")
    behavior_features: list[str] | None = Field(
        None,
        description="target features with a history (default: every shares_with of the schema's sequences)")
    context_features: list[str] | None = Field(None, description="pooled categoricals (default: all others)")
    dedup: bool = Field(True, description="look up each distinct behaviour id once per batch and expand")


# ---- jagged helpers -----------------------------------------------------------------------


def pad_jagged(values: torch.Tensor, lengths: torch.Tensor, max_len: int, pad: float = 0.0) -> torch.Tensor:
    """Jagged ``[N, ...]`` -> padded ``[B, max_len, ...]`` (scatter by row and position)."""
    b = len(lengths)
    row = row_index(lengths, values.shape[0])
    pos = torch.arange(values.shape[0], device=values.device) - offsets_from_lengths(lengths)[:-1][row]
    out = values.new_full((b, max_len, *values.shape[1:]), pad)
    out[row, pos] = values
    return out


# ---- activations --------------------------------------------------------------------------


class _DiceTrain(torch.autograd.Function):
    """Dice in training mode with hand-written backward. Autograd through BatchNorm1d +
    sigmoid + addcmul + mul makes ~25 passes over ``[N, H]`` and reduces columns with
    slow column sums; this makes ~15 and reduces with GEMVs (``ones @ X``). DIN's
    attention unit applies Dice to every history position (~80k x 36 per batch), where
    this was the largest single cost of a step. Returns (y, batch mean, biased var)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, eps: float):  # type: ignore[override]
        n = x.shape[0]
        ones = x.new_ones(1, n)
        mean = (ones @ x).squeeze(0) / n
        xc = x - mean
        var = (ones @ (xc * xc)).squeeze(0) / n
        rstd = torch.rsqrt(var + eps)
        p = torch.sigmoid_(xc.mul_(rstd))
        y = torch.addcmul(alpha, p, 1 - alpha).mul_(x)
        ctx.save_for_backward(x, p, alpha, mean, rstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, g: torch.Tensor, _gm, _gv):  # type: ignore[override]
        x, p, alpha, mean, rstd = ctx.saved_tensors
        n = x.shape[0]
        ones = x.new_ones(1, n)
        g = g.contiguous()
        grad_x = torch.addcmul(alpha, p, 1 - alpha).mul_(g)     # direct path: dy/dx at fixed p
        t = g * x
        tp = t * p
        grad_alpha = (ones @ t - ones @ tp).squeeze(0)          # sum g * x * (1 - p)
        dxh = torch.addcmul(tp, tp, p, value=-1).mul_(1 - alpha)  # g * x * (1 - alpha) * p * (1 - p)
        xh = (x - mean).mul_(rstd)
        m1 = (ones @ dxh).squeeze(0) / n
        m2 = (ones @ (dxh * xh)).squeeze(0) / n
        dxh.sub_(m1).sub_(xh.mul_(m2)).mul_(rstd)               # batch-norm backward
        return grad_x.add_(dxh), grad_alpha, None


class Dice(nn.Module):
    """Dice (DIN paper, eq. 9): ``p(s) * s + (1 - p(s)) * alpha * s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))`` per unit. In training E and Var
    are the mini-batch statistics (biased variance), in eval the running averages —
    exactly BatchNorm1d without affine parameters (its buffers hold the running
    statistics, updated as BatchNorm1d updates them)."""

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=False)
        self.alpha = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] >= 2 and x.dim() == 2 and x.dtype == self.alpha.dtype:
            y, mean, var = _DiceTrain.apply(x, self.alpha, self.bn.eps)
            with torch.no_grad():
                n = x.shape[0]
                m = self.bn.momentum
                self.bn.running_mean.lerp_(mean, m)
                self.bn.running_var.lerp_(var * (n / (n - 1)), m)
                self.bn.num_batches_tracked.add_(1)
            return y
        if self.training and x.shape[0] >= 2:
            norm = self.bn(x)
        else:  # eval, or a single value: no batch statistics
            norm = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=False, eps=self.bn.eps)
        # p * x + (1 - p) * alpha * x == x * (alpha + p * (1 - alpha)): two passes, not four
        return x * torch.addcmul(self.alpha, torch.sigmoid(norm), 1 - self.alpha)


def activation(name: str, width: int) -> nn.Module:
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width)
    return nn.ReLU()


def head_mlp(in_dim: int, sizes: list[int], act: str, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for h in sizes:
        layers += [nn.Linear(d, h), activation(act, h)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


# ---- inputs -------------------------------------------------------------------------------


class BehaviorInputs(nn.Module):
    """Splits a batch KJT into the packed behaviour KJT and the context KJT."""

    def __init__(self, schema, behavior: list[str] | None, context: list[str] | None,
                 padding_id: int | None) -> None:
        super().__init__()
        cats = {c.name: c for c in schema.categorical}
        seq_of = {s.shares_with: s.name for s in schema.sequences if s.shares_with}
        self.behavior = list(behavior) if behavior is not None else [t for t in seq_of if t in cats]
        for f in self.behavior:
            if f not in cats:
                raise ValueError(
                    f"model behavior_features: {f!r} is not a categorical feature of {schema.name!r}")
            if f not in seq_of:
                raise ValueError(
                    f"model behavior_features: {f!r} has no history (no sequence feature shares_with it)")
        if not self.behavior:
            raise ValueError(
                f"dataset {schema.name!r} has no sequence feature with shares_with: not a behaviour dataset")
        self.history = [seq_of[f] for f in self.behavior]
        self.context = (list(context) if context is not None
                        else [c.name for c in schema.categorical if c.name not in self.behavior])
        self.behavior_specs = [FeatureSpec(f, int(cats[f].table_rows)) for f in self.behavior]
        self.context_specs = [FeatureSpec(f, int(cats[f].table_rows)) for f in self.context]
        self.padding_id = padding_id

    def _segments(self, kjt: KeyedJaggedTensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """key -> (values, lengths) without building JaggedTensors."""
        keys, b = kjt.keys(), kjt.stride()
        vals, lens = kjt.values(), kjt.lengths()
        opk = kjt.offset_per_key()
        return {k: (vals[opk[i]:opk[i + 1]], lens[i * b:(i + 1) * b]) for i, k in enumerate(keys)}

    def forward(self, kjt: KeyedJaggedTensor):
        """-> (packed KJT [stride 2B], context KJT or None, history lengths [B])."""
        seg = self._segments(kjt)
        b = kjt.stride()
        keep = lengths = None
        hist_vals = []
        for h in self.history:
            v, ln = seg[h]
            if lengths is None:
                lengths = ln
                if self.padding_id is not None:
                    keep = v != self.padding_id
                    if bool(keep.all()):
                        keep = None
                    else:
                        cs = torch.cat([keep.new_zeros(1, dtype=torch.long), torch.cumsum(keep, 0)])
                        off = offsets_from_lengths(ln)
                        lengths = cs[off[1:]] - cs[off[:-1]]
            elif not torch.equal(ln, seg[self.history[0]][1]):
                raise ValueError(f"history features {self.history} must have equal lengths per row")
            hist_vals.append(v if keep is None else v[keep])
        assert lengths is not None
        ones = lengths.new_ones(b)
        pairs = zip(self.behavior, hist_vals, strict=True)
        values = torch.cat([t for f, hv in pairs for t in (seg[f][0], hv)])
        all_lengths = torch.cat([t for _ in self.behavior for t in (ones, lengths)])
        for f in self.behavior:
            if int(seg[f][1].sum()) != b:
                raise ValueError(f"target feature {f!r} must hold exactly one id per row")
        packed = KeyedJaggedTensor(keys=self.behavior, values=values, lengths=all_lengths, stride=2 * b)
        ctx = None
        if self.context:
            cv = torch.cat([seg[f][0] for f in self.context])
            cl = torch.cat([seg[f][1] for f in self.context])
            ctx = KeyedJaggedTensor(keys=self.context, values=cv, lengths=cl, stride=b)
        return packed, ctx, lengths


# ---- mini-batch aware L2 --------------------------------------------------------------------


class MiniBatchL2(nn.Module):
    """Holds ``1 / n_j`` per feature and the (ids, rows) the last training forward looked
    up; ``regularization_loss`` is ``l2 * sum_{distinct j} ||e_j||^2 / n_j``. A child
    module, so a trainer that adds every submodule's ``regularization_loss`` finds it."""

    def __init__(self, specs: list[FeatureSpec], l2: float) -> None:
        super().__init__()
        self.l2 = l2
        self.terms: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        self._buf: dict[str, str] = {}
        for spec in specs:
            buf = f"inv_freq_{len(self._buf)}"
            self._buf[spec.name] = buf
            self.register_buffer(buf, torch.ones(spec.cardinality))

    @property
    def active(self) -> bool:
        return self.training and self.l2 > 0

    def record(self, name: str, ids: torch.Tensor, rows: torch.Tensor) -> None:
        if name in self._buf:
            self.terms.append((name, ids, rows))

    def regularization_loss(self, sparse: KeyedJaggedTensor | None = None) -> torch.Tensor:
        total = torch.zeros(())
        if self.l2 == 0:
            return total
        for name, ids, emb in self.terms:
            if ids.numel() == 0:
                continue
            uniq, inv = torch.unique(ids, return_inverse=True)
            first = torch.full((len(uniq),), ids.numel(), dtype=torch.long, device=ids.device)
            first = first.scatter_reduce(0, inv, torch.arange(ids.numel(), device=ids.device), "amin")
            w = getattr(self, self._buf[name])[uniq]
            total = total.to(emb.device) + (w * emb[first].float().pow(2).sum(1)).sum()
        self.terms = []  # one regularisation per forward, even if asked twice
        return self.l2 * total

    def load_counts(self, counts: dict[str, np.ndarray]) -> None:
        for name, buf in self._buf.items():
            if name in counts:
                inv = getattr(self, buf)
                c = torch.as_tensor(counts[name][: inv.numel()], dtype=torch.float32)
                inv[: len(c)] = 1.0 / c.clamp(min=1)


# ---- the shared model ---------------------------------------------------------------------


class BehaviorModel(nn.Module):
    """Context pooled embeddings + target + an interest vector -> MLP -> logit.
    Subclasses implement :meth:`interest`."""

    def __init__(self, schema, cfg: SeqModelConfig, context: nn.Module | None, dim: int) -> None:
        super().__init__()
        self.inputs = BehaviorInputs(schema, cfg.behavior_features, cfg.context_features, cfg.padding_id)
        self.context_embedding = context
        self.cfg = cfg
        self.dim = dim
        self.num_dense = len(schema.dense)
        self.l2 = cfg.l2
        # 1 / n_j per behaviour and context feature (ones until load_dataset_stats)
        self.mba_l2 = MiniBatchL2([*self.inputs.behavior_specs, *self.inputs.context_specs], cfg.l2)

    # -- to be filled in by subclasses
    def interest(self, packed: KeyedJaggedTensor, lengths: torch.Tensor,
                 b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (target representation [B, Dt], interest vector [B, Di])."""
        raise NotImplementedError

    # -- lookups
    def embedding_modules(self) -> dict[str, nn.Module]:
        """DIN and pooling: one behaviour module (+ context); DARE overrides with two roles."""
        mods = {"behavior": self.behavior_embedding}
        if self.context_embedding is not None:
            mods["context"] = self.context_embedding
        return mods

    def lookup(self, module: nn.Module, kjt: KeyedJaggedTensor, keys: list[str],
               b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence lookup of the packed KJT -> (targets ``[B, W]``, history ``[N, W]``),
        W the sum of the features' widths (features concatenated).

        With ``dedup`` each distinct id of a feature is looked up once (a KJT of one
        bag per feature holding the distinct ids) and expanded by one gather over the
        stacked per-feature results (whose backward is an SpMM, see segment_ops):
        a batch of 2048 histories of 50 holds ~100k item ids but at most a few
        thousand distinct ones, and the table's backward then touches each row once.
        The values are identical to a direct lookup for every embtables method (a
        method's remap is a function of the id); only ``mch``'s occurrence counts
        then count once per batch."""
        seg = self.inputs._segments(kjt)
        if not self.cfg.dedup:
            out = module(kjt)
            embs = [out[k].values() for k in keys]
            if self.mba_l2.active:
                for k, e in zip(keys, embs, strict=True):
                    self.mba_l2.record(k, seg[k][0], e)
            e = embs[0] if len(embs) == 1 else torch.cat(embs, dim=1)
            return e[:b], e[b:]
        uniq, plans = zip(*(GatherPlan.unique(seg[k][0]) for k in keys), strict=True)
        lengths = torch.tensor([len(u) for u in uniq], dtype=kjt.lengths().dtype)
        out = module(KeyedJaggedTensor(keys=list(keys), values=torch.cat(uniq), lengths=lengths, stride=1))
        tables = [out[k].values() for k in keys]
        if self.mba_l2.active:
            for k, u, e in zip(keys, uniq, tables, strict=True):
                self.mba_l2.record(k, u, e)  # already one row per distinct id
        if len({e.shape[1] for e in tables}) != 1:  # unequal widths: gather each, then concatenate
            parts = [gather(e, p) for e, p in zip(tables, plans, strict=True)]
            e = torch.cat(parts, dim=1)
            return e[:b], e[b:]
        stacked = tables[0] if len(tables) == 1 else torch.cat(tables)
        return gather_split(stacked, GatherPlan.interleave(list(plans)), sum(e.shape[1] for e in tables), b)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        self.mba_l2.terms = []
        b = sparse.stride()
        packed, ctx, lengths = self.inputs(sparse)
        target, interest = self.interest(packed, lengths, b)
        parts = []
        if ctx is not None:
            kt = self.context_embedding(ctx)
            parts.append(kt.values())
            if self.mba_l2.active:
                seg = self.inputs._segments(ctx)
                for k in self.inputs.context:
                    ids, ln = seg[k]
                    if len(ids) == b:  # one id per row: the pooled row is that id's embedding
                        self.mba_l2.record(k, ids, kt[k])
        parts += [target, interest]
        if self.num_dense:
            parts.append(dense)
        return self.head(torch.cat(parts, dim=1)).squeeze(-1)

    # -- regularisation
    def regularization_loss(self, sparse: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """Mini-batch aware L2 of the last training forward (see module docstring).
        ``sparse`` is accepted for the trainer's uniform call and not needed: the terms
        were recorded from the forward's own lookups (one lookup per step, so a fused
        optimizer sees a single gradient per table). The work is done by the child
        ``self.mba_l2``; a trainer that sums the ``regularization_loss`` of submodules
        must not call both."""
        return self.mba_l2.regularization_loss(sparse)

    def load_dataset_stats(self, root: str | Path) -> None:
        """Load n_j (``meta/id_counts.npz`` of a sequence dataset) into the 1/n_j buffers."""
        path = Path(root) / "meta" / "id_counts.npz"
        if path.exists():
            with np.load(path) as z:
                self.mba_l2.load_counts({k: z[k] for k in z.files})
