"""The one training loop: steps (a plain loop or TorchRec's TrainPipelineSparseDist),
LR schedule, evaluation points, checkpoints, NaN guard, progress.

The trainer receives what it trains (``build.build_trainer`` makes it): the sharded
model (a :class:`TrainStep` wrapped in DistributedModelParallel), its optimizers, its
training stream (:class:`TrainData`) and its :class:`~embtables.experiments.evaluate.Evaluator`.
What a model may offer the trainer is declared here as protocols
(:class:`Regularizer`, :class:`UsesDatasetStats`), never probed by name.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.tracing import Tracer, _get_leaf_module_names
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from embtables import faults
from embtables.datasets.reader import BatchReader
from embtables.datasets.sequences import EpochNegatives
from embtables.embeddings.base import EmbeddingMethod
from embtables.errors import TrainingDiverged
from embtables.experiments.config import ExperimentConfig
from embtables.experiments.evaluate import Evaluator
from embtables.experiments.optim import Optimizers, lr_factor, set_lr
from embtables.sharding import DistContext
from embtables.sharding.checkpoint import load_checkpoint, save_checkpoint


class StopRequested(Exception):
    """Raised after a checkpoint when the caller asked to stop there (tests of --resume)."""


# ---- what a model may offer the trainer -------------------------------------------------------


@runtime_checkable
class Regularizer(Protocol):
    """A submodule whose penalty is added to the training loss (e.g. a mini-batch
    aware L2 on the ids of the batch)."""

    def regularization_loss(self, features: KeyedJaggedTensor) -> torch.Tensor: ...


@runtime_checkable
class UsesDatasetStats(Protocol):
    """A model that reads statistics of the training data before training (e.g. id
    frequencies)."""

    def load_dataset_stats(self, data_root: Path) -> None: ...


# ---- the module DMP wraps -----------------------------------------------------------------------

_INNER = "model."


class TrainStep(nn.Module):
    """A model and its loss as one module that takes a ``Batch``: what DMP wraps and what
    TrainPipelineSparseDist traces (it pipelines the sharded tables it finds there).

    Training mode returns ``(loss, (loss.detach(), rows))``, the pair TorchRec's train
    pipelines expect; eval mode returns the logits. Its ``state_dict`` keys are the
    model's own (no ``model.`` prefix), so checkpoints are those of the bare model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.regularizers = [name for name, m in model.named_modules()
                             if m is not model and isinstance(m, Regularizer)]
        self.register_state_dict_post_hook(_drop_inner_prefix)
        self.register_load_state_dict_pre_hook(_add_inner_prefix)

    def forward(self, batch):
        logits = self.model(batch.dense_features, batch.sparse_features)
        if not self.training:
            return logits
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        for name in self.regularizers:
            loss = loss + self.model.get_submodule(name).regularization_loss(batch.sparse_features)
        return loss, (loss.detach(), batch.labels.numel())


def _drop_inner_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + _INNER
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_inner_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _INNER + key[len(prefix):]] = state_dict.pop(key)


log = logging.getLogger(__name__)


def why_not_pipelineable(dmp: nn.Module) -> str | None:
    """Why TrainPipelineSparseDist cannot run the DMP-wrapped :class:`TrainStep` (it traces
    it with torch.fx), or None. An embedding module declares it
    (``EmbeddingMethod.pipelineable``); a model that fx cannot trace shows it by failing
    the same trace the pipeline does."""
    root = dmp.module
    refused = sorted({type(m).method_name for m in root.modules()
                      if isinstance(m, EmbeddingMethod) and not type(m).pipelineable})
    if refused:
        return f"embedding method(s) {', '.join(refused)} declare(s) it cannot be traced by fx"
    try:
        Tracer(leaf_modules=_get_leaf_module_names(root)).trace(root)
    except Exception as e:  # noqa: BLE001 - any failure to trace means: not pipelineable
        return f"the model cannot be traced by fx ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None


# ---- sizes ----------------------------------------------------------------------------------------


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


# ---- the training stream ----------------------------------------------------------------------------


class TrainData:
    """The training split as a stream of epochs; sampled-negative datasets draw fresh
    negatives for each epoch (seeded by (seed, epoch), so resuming redraws the same ones)."""

    def __init__(self, cfg: ExperimentConfig, schema, data_root: Path, ctx: DistContext,
                 run_dir: Path | None) -> None:
        self.cfg, self.data_root, self.ctx, self.run_dir = cfg, Path(data_root), ctx, run_dir
        self.local_batch = max(1, cfg.train.batch_size // ctx.world_size)
        neg = schema.extra.get("negatives") or {}
        self.negatives = None
        if neg.get("resample_per_epoch") and cfg.data.train_split == "train":
            self.negatives = EpochNegatives(data_root, schema)
        self.reader = self._reader(None)
        self.num_batches = self.reader.num_batches

    def _reader(self, files) -> BatchReader:
        cfg, ctx = self.cfg, self.ctx
        return BatchReader(
            self.data_root, split=cfg.data.train_split, batch_size=self.local_batch, shuffle=cfg.data.shuffle,
            seed=cfg.seed, shuffle_buffer=cfg.data.shuffle_buffer, rank=ctx.rank, world_size=ctx.world_size,
            drop_last=ctx.world_size > 1, prefetch=cfg.data.prefetch, files=files,
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> BatchReader:
        """The reader of ``epoch``, positioned at its batch ``start_batch``."""
        if self.negatives is not None:
            cache = (self.run_dir or self.data_root) / "negatives"
            files = self.negatives.files(epoch, self.cfg.seed, cache) if epoch > 0 else None
            self.reader = self._reader(files)
        self.reader.set_epoch(epoch, start_batch=start_batch)
        return self.reader


# ---- steps -------------------------------------------------------------------------------------------


class _Steps(Protocol):
    def run(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, int]]: ...

    def pause(self) -> None: ...


class LoopSteps:
    """One batch at a time: forward, NaN guard, backward, optimizer steps."""

    def __init__(self, model: nn.Module, optimizers: Optimizers, before_step: Callable[[], None],
                 check: Callable[[torch.Tensor], None]) -> None:
        self.model, self.opt, self.before_step, self.check = model, optimizers, before_step, check

    def run(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, int]]:
        for batch in batches:
            self.before_step()
            loss, (_, rows) = self.model(batch)
            self.check(loss)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            yield loss, rows

    def pause(self) -> None:
        pass


class PipelineSteps:
    """TorchRec's TrainPipelineSparseDist (``pipeline_postproc=True``: stateless id remaps
    run in its input stage). It reads two batches ahead; each segment of batches handed to
    ``run`` is trained to its end, so nothing is in flight at an evaluation point."""

    def __init__(self, model: nn.Module, optimizers: Optimizers, device: torch.device,
                 before_step: Callable[[], None], check: Callable[[torch.Tensor], None]) -> None:
        self.pipe = TrainPipelineSparseDist(model, optimizers, device, execute_all_batches=True,
                                            pipeline_postproc=True)
        self.before_step, self.check = before_step, check

    def run(self, batches: Iterator) -> Iterator[tuple[torch.Tensor, int]]:
        while True:
            self.before_step()
            try:
                loss, rows = self.pipe.progress(batches)
            except StopIteration:
                return
            self.check(loss)
            yield loss, rows

    def pipelined(self, model: nn.Module) -> list[str]:
        """Paths under ``model`` of the modules the pipeline runs in its input stage (sharded
        tables, and ``postproc:`` id remaps)."""
        mods = {id(m) for m in self.pipe._pipelined_modules}
        names = [name for name, m in model.named_modules() if id(m) in mods]
        return names + [f"postproc:{p._fqn}" for p in self.pipe._pipelined_postprocs]

    def pause(self) -> None:
        """Give the model its own forward back (evaluation, the end of training); the next
        ``run`` pipelines it again."""
        self.pipe.detach()


# ---- the trainer -------------------------------------------------------------------------------------


class Trainer:
    """Trains a built model. ``model``: the DMP-wrapped :class:`TrainStep`; ``inner``: the
    model object inside it (its tables are sharded); ``data`` is None for a trainer that
    only evaluates or loads checkpoints."""

    def __init__(self, cfg: ExperimentConfig, schema, data_root: Path, ctx: DistContext, run_dir: Path | None,
                 *, model: nn.Module, inner: nn.Module, optimizers: Optimizers, sizes: ModelSizes,
                 evaluator: Evaluator, data: TrainData | None = None) -> None:
        self.cfg, self.schema, self.data_root, self.ctx, self.run_dir = cfg, schema, data_root, ctx, run_dir
        self.model, self.inner, self.opt, self.sizes = model, inner, optimizers, sizes
        self.dense_opt, self.fused_opt = optimizers.dense, optimizers.fused
        self.optimizers = optimizers.all()
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]
        self.evaluator = evaluator
        self.data = data
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
        self.step_losses: list[float] | None = None  # set to [] to record every step's training loss
        self.steps: _Steps | None = None  # how the last train() ran its steps
        self.pipeline = cfg.train.pipeline  # what train() ran: "loop" when the pipeline cannot
        self.pipeline_note: str | None = None  # why it could not
        self.tb = None
        if data is None:
            return
        tc = cfg.train
        self.steps_per_epoch = data.num_batches
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
        if tc.tensorboard and ctx.is_main and run_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "train.tensorboard: true needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    # ---- checkpoints ---------------------------------------------------------------------
    def _ckpt_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
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
        extra = load_checkpoint(path, self.model, {"dense": self.dense_opt, "fused": self.fused_opt})
        self.step, self.epoch, self.batch_in_epoch = extra["step"], extra["epoch"], extra["batch_in_epoch"]
        self.train_seconds, self.train_samples = extra["train_seconds"], extra["train_samples"]
        torch.set_rng_state(extra["torch_rng"])
        np.random.set_state(extra["numpy_rng"])
        self.history = list(extra["history"])
        self.last_checkpoint = path

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, split: str) -> dict[str, float | None]:
        return self.evaluator.evaluate(split)

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

    # ---- training ---------------------------------------------------------------------------
    def _set_lr(self) -> None:
        factor = lr_factor(self.cfg.train.schedule, self.step, self.total_steps)
        set_lr(self.optimizers, self.base_lrs, factor)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.step} (epoch {self.epoch}); "
                f"last good checkpoint: {self.last_checkpoint or 'none (no evaluation reached yet)'}; "
                "try a lower train.dense_optimizer.lr / train.embedding_optimizer.lr"
            )

    def _steps(self) -> _Steps:
        if self.pipeline == "sparse_dist":
            self.pipeline_note = why_not_pipelineable(self.model)
            if self.pipeline_note is not None:
                log.info("train.pipeline: sparse_dist: %s; training with the loop", self.pipeline_note)
                self.pipeline = "loop"
        if self.pipeline == "sparse_dist":
            return PipelineSteps(self.model, self.opt, self.ctx.device, self._set_lr, self._check_finite)
        return LoopSteps(self.model, self.opt, self._set_lr, self._check_finite)

    def _segment_end(self) -> int:
        """The step the current run of batches trains up to: the epoch's end, the last step,
        or the next evaluation."""
        tc = self.cfg.train
        end = min(self.total_steps, self.step + self.steps_per_epoch - self.batch_in_epoch)
        if tc.eval_every:
            end = min(end, (self.step // tc.eval_every + 1) * tc.eval_every)
        return end

    def train(self, stop_after_step: int | None = None) -> dict[str, Any]:
        if self.data is None:
            raise RuntimeError("internal: this trainer was built without training data")
        tc = self.cfg.train
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (tc.progress and self.ctx.is_main), mininterval=1.0)
        steps = self.steps = self._steps()
        loss_ema = None
        while self.step < self.total_steps:
            batches = iter(self.data.epoch(self.epoch, start_batch=self.batch_in_epoch))
            t0 = time.perf_counter()
            while self.step < self.total_steps and self.batch_in_epoch < self.steps_per_epoch:
                before = self.step
                for loss, rows in steps.run(islice(batches, self._segment_end() - self.step)):
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.train_samples += rows * self.ctx.world_size
                    lv = float(loss.detach())
                    if self.step_losses is not None:
                        self.step_losses.append(lv)
                    loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
                    if self.step % tc.log_every == 0 or self.step == self.total_steps:
                        el = self.train_seconds + time.perf_counter() - t0
                        sps = self.train_samples / max(el, 1e-9)
                        bar.set_postfix(loss=f"{loss_ema:.4f}", sps=f"{sps:,.0f}")
                        if self.tb is not None:
                            self.tb.add_scalar("train/loss", lv, self.step)
                    bar.update(1)
                    faults.hit("kill_after_step", str(self.step))
                    if self.step < self.total_steps and self.should_stop is not None and self.should_stop():
                        # Batches the pipeline read ahead are read again on --resume.
                        self.train_seconds += time.perf_counter() - t0
                        if tc.checkpoint:
                            self.save_checkpoint()
                        bar.close()
                        raise StopRequested(f"stopped at step {self.step} on request")
                if self.step == before:
                    break  # the split ran out of batches before the epoch's end
                done = self.step >= self.total_steps
                if tc.eval_every and self.step % tc.eval_every == 0 and not done:
                    self.train_seconds += time.perf_counter() - t0
                    steps.pause()
                    self._log_eval()
                    if tc.checkpoint:
                        self.save_checkpoint()
                    if stop_after_step is not None and self.step >= stop_after_step:
                        bar.close()
                        raise StopRequested(f"stopped after step {self.step}")
                    t0 = time.perf_counter()
            self.train_seconds += time.perf_counter() - t0
            if self.step < self.total_steps or self.batch_in_epoch >= self.steps_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
        steps.pause()
        bar.close()
        final = self._log_eval(final=True)
        if tc.checkpoint:
            self.save_checkpoint()
        return final


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
