"""Evaluation of a trained (sharded) model: probabilities of a split over every rank, and
its metrics. Used by the trainer (mid-run and final evaluation), ``embtables predict``
and OptEmbed's search (fitness of a candidate on batches held in memory).

The model is the DMP-wrapped ``TrainStep`` (``trainer.py``): in eval mode it takes a
``Batch`` and returns logits. Sharded lookups are collectives, so on several ranks every
rank runs the same number of equal-sized batches (padding, see :func:`pad_batch`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embtables.datasets.reader import BatchReader
from embtables.experiments import metrics as M
from embtables.experiments.config import ExperimentConfig
from embtables.experiments.metrics_gauc import gauc
from embtables.sharding import DistContext
from embtables.sharding.collectives_metrics import all_gather_1d, gather_predictions


class Evaluator:
    def __init__(self, model: nn.Module, cfg: ExperimentConfig, schema, data_root: Path,
                 ctx: DistContext) -> None:
        self.model, self.cfg, self.schema, self.data_root, self.ctx = model, cfg, schema, data_root, ctx
        self.last_users: np.ndarray | None = None  # user ids of the last predict_split (for GAUC)

    def _logits(self, batch) -> torch.Tensor:
        return self.model(batch)

    @torch.no_grad()
    def predict_split(self, split: str, root: Path | None = None, max_rows: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and labels of a split, in row order, over all ranks together."""
        root = root or self.data_root
        ctx = self.ctx
        self.model.eval()
        bs = max(1, self.cfg.train.eval_batch_size // ctx.world_size)
        reader = BatchReader(root, split=split, batch_size=bs, shuffle=False, seed=0, rank=ctx.rank,
                             world_size=ctx.world_size, drop_last=False, prefetch=self.cfg.data.prefetch)
        probs, labels, users = [], [], []
        user_key = self.schema.extra.get("user_feature")
        batches = iter(reader)
        n_local = reader.num_batches
        if max_rows:
            n_local = min(n_local, -(-max_rows // (bs * ctx.world_size)))
        n_steps = n_local
        if ctx.world_size > 1:
            t = torch.tensor([n_local])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n_steps = int(t.item())
        template = None
        for _ in range(n_steps):
            batch = next(batches, None)
            real = batch is not None
            if ctx.world_size > 1:
                # Sharded lookups are collectives: every rank runs the same number of
                # equal-sized steps, padding with copies of a real batch and dropping them.
                if not real and template is None:  # this rank holds no rows of the split
                    template = self._any_batch(root, split)
                batch = batch if real else template
                template = template or batch
                n = batch.labels.numel()
                batch = pad_batch(batch, bs)
            else:
                n = batch.labels.numel()
            logits = self._logits(batch)
            if real:
                probs.append(torch.sigmoid(logits[:n].float()).numpy())
                labels.append(batch.labels[:n].numpy())
                if user_key in batch.sparse_features.keys():
                    users.append(batch.sparse_features[user_key].values()[:n].numpy())
        self.model.train()
        p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
        y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
        u = np.concatenate(users) if users else None
        if max_rows:
            # Whole batches were read; keep exactly max_rows rows (one process: the split's first
            # max_rows; several: each rank's first share of them).
            keep = max_rows // ctx.world_size + (ctx.rank < max_rows % ctx.world_size)
            p, y = p[:keep], y[:keep]
            u = None if u is None else u[:keep]
        if ctx.world_size > 1:
            # Metrics over every rank's predictions together, never an average of per-rank AUCs.
            pt, yt = gather_predictions(torch.from_numpy(p), torch.from_numpy(y))
            p, y = pt.numpy().astype(np.float32), yt.numpy().astype(np.float32)
            if u is not None:
                u = all_gather_1d(torch.from_numpy(u)).numpy()
        self.last_users = u
        return p, y

    def _any_batch(self, root: Path, split: str):
        """One row of ``split`` (whatever rank holds it): the padding batch of a rank that
        holds none of the split, so that it can still join the other ranks' lookups."""
        reader = BatchReader(root, split=split, batch_size=1, shuffle=False, seed=0, rank=0, world_size=1,
                             drop_last=False, prefetch=0)
        return next(iter(reader))

    def evaluate(self, split: str) -> dict[str, float | None]:
        """AUC, logloss, rows and (when the schema names a user feature) GAUC of a split."""
        p, y = self.predict_split(split, max_rows=self.cfg.data.max_eval_rows)
        out = {"auc": M.auc(y, p), "logloss": M.logloss(y, p), "rows": int(y.size), "gauc": None}
        if self.last_users is not None:
            out["gauc"] = gauc(self.last_users, y, p)
        return out

    @torch.no_grad()
    def auc_of_batches(self, batches: list) -> float | None:
        """AUC over batches held in memory (equal counts on every rank), all ranks together."""
        self.model.eval()
        probs = [torch.sigmoid(self._logits(b).float()).numpy() for b in batches]
        self.model.train()
        p, y = np.concatenate(probs), np.concatenate([b.labels.numpy() for b in batches])
        if self.ctx.world_size > 1:
            gathered: list = [None] * self.ctx.world_size
            dist.all_gather_object(gathered, (p, y))
            p, y = np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])
        return M.auc(y, p)


def pad_batch(batch, size: int):
    """Pad a Batch to ``size`` rows by repeating its first row (for equal-sized collectives)."""
    n = batch.labels.numel()
    if n >= size:
        return batch
    idx = torch.cat([torch.arange(n), torch.zeros(size - n, dtype=torch.long)])
    kjt = batch.sparse_features
    per_key = kjt.to_dict()
    keys, values, lengths, weights = [], [], [], []
    for k in kjt.keys():
        jt = per_key[k]
        lens = jt.lengths()
        offs = torch.cat([torch.zeros(1, dtype=lens.dtype), lens.cumsum(0)])
        new_lens = lens[idx]
        starts = offs[:-1][idx]
        within = torch.arange(int(new_lens.sum())) - torch.repeat_interleave(
            torch.cumsum(new_lens, 0) - new_lens, new_lens)
        rep = torch.repeat_interleave(starts, new_lens) + within
        keys.append(k)
        values.append(jt.values()[rep])
        lengths.append(new_lens)
        if jt.weights_or_none() is not None:
            weights.append(jt.weights()[rep])
    new = KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
        weights=torch.cat(weights) if weights else None,
    )
    return Batch(dense_features=batch.dense_features[idx], sparse_features=new, labels=batch.labels[idx])

