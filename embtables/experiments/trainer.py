"""The one training loop: optimizers, evaluation, checkpoints, NaN guard, progress."""

from __future__ import annotations

import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from embtables import faults
from embtables.datasets.reader import BatchReader
from embtables.errors import TrainingDiverged
from embtables.experiments import metrics as M
from embtables.experiments.build import build_model
from embtables.experiments.config import ExperimentConfig
from embtables.experiments.optim import attach_embedding_optimizer, dense_optimizer, lr_factor, set_lr
from embtables.sharding import DistContext, shard_model
from embtables.sharding.collectives_metrics import all_gather_1d, gather_predictions


class StopRequested(Exception):
    """Raised after a checkpoint when the caller asked to stop there (tests of --resume)."""


@dataclass
class ModelSizes:
    embedding_params: int
    embedding_bytes: int
    dense_params: int
    per_module: dict[str, dict[str, int]] = field(default_factory=dict)


def measure_sizes(model: nn.Module) -> ModelSizes:
    """Sizes from the unsharded model (before DMP replaces the tables)."""
    emb = model.embedding_modules()
    per = {k: {"params": int(m.num_parameters()), "bytes": int(m.memory_bytes())} for k, m in emb.items()}
    emb_params = sum(v["params"] for v in per.values())
    emb_ids = {id(p) for m in emb.values() for p in m.parameters()}
    dense = sum(p.numel() for p in model.parameters() if id(p) not in emb_ids)
    return ModelSizes(emb_params, sum(v["bytes"] for v in per.values()), dense, per)


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in an optimizer state dict (local shards of ShardedTensors)."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "local_shards"):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


class Trainer:
    def __init__(self, cfg: ExperimentConfig, schema, data_root: Path, ctx: DistContext, run_dir: Path | None,
                 for_training: bool = True) -> None:
        self.cfg, self.schema, self.data_root, self.ctx, self.run_dir = cfg, schema, data_root, ctx, run_dir
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = build_model(cfg, schema)
        if hasattr(model, "load_dataset_stats"):
            model.load_dataset_stats(data_root)  # e.g. id frequencies for DIN's mini-batch aware L2
        self.sizes = measure_sizes(model)
        attach_embedding_optimizer(model, cfg.train.embedding_optimizer, ctx.device.type)
        self.model = shard_model(model, cfg.sharding, ctx)
        dense_params = [p for _, p in in_backward_optimizer_filter(self.model.named_parameters(), include=False)]
        self.dense_opt = dense_optimizer(dense_params, cfg.train.dense_optimizer)
        self.fused_opt = self.model.fused_optimizer
        self.optimizers = [self.dense_opt, self.fused_opt]
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.regularizers = [m for m in model.modules() if hasattr(m, "regularization_loss") and m is not model]
        self.inner = model  # the unsharded-model object DMP wraps (its tables are now sharded)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self.train_samples = 0
        self.last_checkpoint: Path | None = None
        # Set by the runner: called after each checkpoint (pruning), and after each step
        # (True: checkpoint now and raise StopRequested; SIGTERM, Ctrl-C).
        self.after_checkpoint: Callable[[Path], None] | None = None
        self.should_stop: Callable[[], bool] | None = None
        self.last_users: np.ndarray | None = None
        self.step_losses: list[float] | None = None  # set to [] to record every step's training loss
        tc = cfg.train
        self.local_batch = max(1, tc.batch_size // ctx.world_size)
        self.tb = None
        if not for_training:
            return
        neg = schema.extra.get("negatives") or {}
        self.negatives = None
        if neg.get("resample_per_epoch") and cfg.data.train_split == "train":
            from embtables.datasets.sequences import EpochNegatives

            self.negatives = EpochNegatives(data_root, schema)
        self.reader = self._train_reader(0)
        self.steps_per_epoch = self.reader.num_batches
        if cfg.data.max_train_rows:
            # N rows per epoch: the first N in file order, or a fresh shuffled N each epoch.
            self.steps_per_epoch = min(self.steps_per_epoch, -(-cfg.data.max_train_rows // tc.batch_size))
        total = self.steps_per_epoch * tc.epochs
        self.total_steps = min(total, tc.max_steps) if tc.max_steps else total
        if self.total_steps == 0:
            raise ValueError(
                f"no training batches: split {cfg.data.train_split!r} of {data_root} has too few rows for "
                f"train.batch_size={tc.batch_size} at world size {ctx.world_size}"
            )
        self.tb = None
        if tc.tensorboard and ctx.is_main and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("train.tensorboard: true needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def _train_reader(self, epoch: int) -> BatchReader:
        """The training stream of an epoch; sampled-negative datasets draw fresh negatives
        for each epoch (seeded by (seed, epoch), so resuming redraws the same ones)."""
        files = None
        if self.negatives is not None:
            cache = (self.run_dir or Path(self.data_root)) / "negatives"
            files = self.negatives.files(epoch, self.cfg.seed, cache) if epoch > 0 else None
        cfg, ctx = self.cfg, self.ctx
        return BatchReader(
            self.data_root, split=cfg.data.train_split, batch_size=self.local_batch, shuffle=cfg.data.shuffle,
            seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, rank=ctx.rank, world_size=ctx.world_size,
            drop_last=ctx.world_size > 1, prefetch=cfg.data.prefetch, files=files,
        )

    # ---- checkpoints ---------------------------------------------------------------------
    def _ckpt_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        from embtables.sharding.checkpoint import save_checkpoint

        root = self._ckpt_dir()
        if root is None:
            return None
        path = root / f"step-{self.step:08d}"
        extra = {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds, "train_samples": self.train_samples,
            "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
            "history": self.history,
        }
        save_checkpoint(path, self.model, {"dense": self.dense_opt, "fused": self.fused_opt}, extra)
        self.last_checkpoint = path
        if self.after_checkpoint is not None:
            self.after_checkpoint(path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        from embtables.sharding.checkpoint import load_checkpoint

        extra = load_checkpoint(path, self.model, {"dense": self.dense_opt, "fused": self.fused_opt})
        self.step, self.epoch, self.batch_in_epoch = extra["step"], extra["epoch"], extra["batch_in_epoch"]
        self.train_seconds, self.train_samples = extra["train_seconds"], extra["train_samples"]
        torch.set_rng_state(extra["torch_rng"])
        np.random.set_state(extra["numpy_rng"])
        self.history = list(extra["history"])
        self.last_checkpoint = path

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def predict_split(self, split: str, root: Path | None = None, max_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and labels of a split, in row order, over all ranks together."""
        root = root or self.data_root
        self.model.eval()
        bs = max(1, self.cfg.train.eval_batch_size // self.ctx.world_size)
        reader = BatchReader(root, split=split, batch_size=bs, shuffle=False, seed=0, rank=self.ctx.rank,
                             world_size=self.ctx.world_size, drop_last=False, prefetch=self.cfg.data.prefetch)
        probs, labels, users = [], [], []
        user_key = self.schema.extra.get("user_feature")
        batches = iter(reader)
        n_local = reader.num_batches
        if max_rows:
            n_local = min(n_local, -(-max_rows // (bs * self.ctx.world_size)))
        n_steps = n_local
        if self.ctx.world_size > 1:
            t = torch.tensor([n_local])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n_steps = int(t.item())
        template = None
        for _ in range(n_steps):
            batch = next(batches, None)
            real = batch is not None
            if self.ctx.world_size > 1:
                # Sharded lookups are collectives: every rank runs the same number of
                # equal-sized steps, padding with copies of a real batch and dropping them.
                if not real and template is None:  # this rank holds no rows of the split
                    template = self._any_batch(root, split)
                batch = batch if real else template
                template = template or batch
                n = batch.labels.numel()
                batch = _pad_batch(batch, bs)
            else:
                n = batch.labels.numel()
            logits = self.model(batch.dense_features, batch.sparse_features)
            if real:
                probs.append(torch.sigmoid(logits[:n].float()).numpy())
                labels.append(batch.labels[:n].numpy())
                if user_key in batch.sparse_features.keys():
                    users.append(batch.sparse_features[user_key].values()[:n].numpy())
        self.model.train()
        p = np.concatenate(probs) if probs else np.zeros(0, np.float32)
        y = np.concatenate(labels) if labels else np.zeros(0, np.float32)
        u = np.concatenate(users) if users else None
        if self.ctx.world_size > 1:
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
        p, y = self.predict_split(split, max_rows=self.cfg.data.max_eval_rows)
        out = {"auc": M.auc(y, p), "logloss": M.logloss(y, p), "rows": int(y.size), "gauc": None}
        if self.last_users is not None:
            from embtables.experiments.metrics_gauc import gauc

            out["gauc"] = gauc(self.last_users, y, p)
        return out

    # ---- training ---------------------------------------------------------------------------
    def _log_eval(self, final: bool = False) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "final": final}
        if self.cfg.data.valid_split and self.cfg.data.valid_split in self.schema.splits:
            v = self.evaluate(self.cfg.data.valid_split)
            rec.update(valid_auc=v["auc"], valid_logloss=v["logloss"], valid_gauc=v["gauc"])
        if final and self.cfg.data.test_split and self.cfg.data.test_split in self.schema.splits:
            t = self.evaluate(self.cfg.data.test_split)
            rec.update(test_auc=t["auc"], test_logloss=t["logloss"], test_gauc=t["gauc"])
        rec["train_seconds"] = round(self.train_seconds, 3)
        self.history.append(rec)
        if self.ctx.is_main and self.run_dir is not None:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"eval/{k}", v, self.step)
        return rec

    def train(self, stop_after_step: int | None = None) -> dict[str, Any]:
        tc = self.cfg.train
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (tc.progress and self.ctx.is_main), mininterval=1.0)
        loss_ema = None
        while self.step < self.total_steps:
            if self.negatives is not None:
                self.reader = self._train_reader(self.epoch)
            self.reader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            t0 = time.perf_counter()
            for batch in self.reader:
                if self.batch_in_epoch >= self.steps_per_epoch:
                    break
                factor = lr_factor(tc.schedule, self.step, self.total_steps)
                set_lr(self.optimizers, self.base_lrs, factor)
                logits = self.model(batch.dense_features, batch.sparse_features)
                loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
                for reg in self.regularizers:
                    loss = loss + reg.regularization_loss(batch.sparse_features)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {loss.item()} at step {self.step} (epoch {self.epoch}); "
                        f"last good checkpoint: {self.last_checkpoint or 'none (no evaluation reached yet)'}; "
                        "try a lower train.dense_optimizer.lr / train.embedding_optimizer.lr"
                    )
                self.dense_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.dense_opt.step()
                self.fused_opt.step()  # applies the scheduled LR to FBGEMM's fused update
                self.step += 1
                self.batch_in_epoch += 1
                self.train_samples += batch.labels.numel() * self.ctx.world_size
                lv = float(loss)
                if self.step_losses is not None:
                    self.step_losses.append(lv)
                loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
                if self.step % tc.log_every == 0 or self.step == self.total_steps:
                    el = self.train_seconds + time.perf_counter() - t0
                    bar.set_postfix(loss=f"{loss_ema:.4f}", sps=f"{self.train_samples / max(el, 1e-9):,.0f}")
                    if self.tb is not None:
                        self.tb.add_scalar("train/loss", lv, self.step)
                bar.update(1)
                faults.hit("kill_after_step", str(self.step))
                done = self.step >= self.total_steps
                if not done and self.should_stop is not None and self.should_stop():
                    self.train_seconds += time.perf_counter() - t0
                    if tc.checkpoint:
                        self.save_checkpoint()
                    bar.close()
                    raise StopRequested(f"stopped at step {self.step} on request")
                if (tc.eval_every and self.step % tc.eval_every == 0) and not done:
                    self.train_seconds += time.perf_counter() - t0
                    self._log_eval()
                    if tc.checkpoint:
                        self.save_checkpoint()
                    if stop_after_step is not None and self.step >= stop_after_step:
                        bar.close()
                        raise StopRequested(f"stopped after step {self.step}")
                    t0 = time.perf_counter()
                if done:
                    break
            self.train_seconds += time.perf_counter() - t0
            if self.step < self.total_steps or self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        final = self._log_eval(final=True)
        if tc.checkpoint:
            self.save_checkpoint()
        return final


def _pad_batch(batch, size: int):
    """Pad a Batch to ``size`` rows by repeating its first row (for equal-sized collectives)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

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
        rep = torch.repeat_interleave(starts, new_lens) + (
            torch.arange(int(new_lens.sum())) - torch.repeat_interleave(torch.cumsum(new_lens, 0) - new_lens, new_lens)
        )
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


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
