"""Stage pipelines: what `run()` does for an experiment, as a list of stages.

The runner asks :func:`pipeline_for` for the experiment's stages and runs them in order;
it knows no method by name. Most experiments are one :class:`TrainStage`; a method whose
experiment has several steps registers its own list (OptEmbed: supernet, search, retrain;
see ``optembed_pipeline.py``)::

    register_pipeline("optembed", lambda cfg: [SupernetStage(), SearchStage(), RetrainStage()],
                      settings=OptEmbedStageSettings)

A pipeline may declare ``settings``: a pydantic model of the keys its stages read from the
method's config section (``embedding.optembed.population``), beside the module's own knobs.
The config validates ``embedding.<method>`` against both, once, with the key path.

A stage knows whether its artefacts exist (``done``: ``--resume`` skips it), writes only
its own artefacts (``artefacts`` names them, relative to the run directory, so that
``embtables run --from RUN --stage S`` can copy every stage before S into a new run
directory), and says which config its results depend on (``stage_config``, checked when
its artefacts are reused under another config).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from embtables.errors import CheckpointError
from embtables.experiments.build import build_model, build_trainer
from embtables.experiments.config import (
    RESULT_NEUTRAL,
    STAGE_SETTINGS,
    ConfigError,
    ExperimentConfig,
    load_config,
    read_yaml,
)
from embtables.experiments.rundir import RunDir, checkpoint_step
from embtables.experiments.served import apply_served, evaluate_served
from embtables.experiments.summary import make_summary
from embtables.experiments.trainer import StopRequested, Trainer
from embtables.registry import Registry


@dataclass
class StageContext:
    """What every stage of one run gets."""

    cfg: ExperimentConfig
    ctx: Any  # sharding.DistContext
    run: RunDir
    data_root: Path
    schema: Any  # datasets.schema.DatasetSchema
    resume: bool
    stop_after_step: int | None
    quiet: bool
    threads: int
    should_stop: Callable[[], bool] | None = None
    # In-memory hand-over between the stages of one process (e.g. a trained model the next
    # stage would otherwise reload from its checkpoint).
    shared: dict[str, Any] = field(default_factory=dict)

    def say(self, msg: str) -> None:
        if self.ctx.is_main and not self.quiet:
            print(msg, flush=True)


class Stage:
    """One step of an experiment. Subclasses set ``name`` and implement the methods."""

    name = "stage"

    def artefacts(self, cfg: ExperimentConfig) -> list[str]:
        """Paths (relative to the run directory) this stage writes."""
        raise NotImplementedError

    def done(self, sc: StageContext) -> bool:
        raise NotImplementedError

    def run(self, sc: StageContext) -> dict[str, Any] | None:
        """Run the stage; the last stage of a pipeline returns the run's summary."""
        raise NotImplementedError

    def stage_config(self, cfg: ExperimentConfig) -> ExperimentConfig | None:
        """The config this stage's results depend on (None: the whole experiment's)."""
        return None

    def check(self, cfg: ExperimentConfig, schema: Any) -> None:
        """Refuse, before the run directory exists, what this stage would refuse once it
        runs (a budget below a method's minimum, a refused knob). Default: nothing to check."""


def train_with_resume(sc: StageContext, trainer: Trainer, run: RunDir, *, resume: bool,
                      label: str = "") -> dict:
    """Train ``trainer`` in ``run`` (its metrics and checkpoints), going on from the newest
    checkpoint that passes its check when ``resume``; StopRequested propagates."""
    what = f" the {label}" if label else ""
    if resume:
        ckpt, notes = run.usable_checkpoint()
        for note in notes:
            sc.say(f"== warning: {note}; trying the older one")
        if ckpt is None and notes:
            raise _no_usable(run, notes)
        if ckpt is None and sc.ctx.is_main:
            run.truncate_metrics(0)  # an attempt stopped before its first checkpoint: start over
            run.clear_partial_saves()
        if ckpt is not None:
            trainer.load_checkpoint(ckpt)
            if sc.ctx.is_main:
                run.truncate_metrics(trainer.step)
                run.clear_partial_saves()
                if notes:
                    run.drop_checkpoints_after(checkpoint_step(ckpt))
            sc.say(f"== resumed{what} from {ckpt} (step {trainer.step})")
    if sc.ctx.is_main:
        trainer.after_checkpoint = lambda _path: run.prune()
    trainer.should_stop = sc.should_stop
    try:
        return trainer.train(stop_after_step=sc.stop_after_step)
    except StopRequested:
        sc.shared["stopped_at_step"] = trainer.step
        raise


def _no_usable(run: RunDir, notes: list[str]) -> Exception:
    return CheckpointError(f"{run.checkpoint_root}: no checkpoint passes its check: " + "; ".join(notes))


class TrainStage(Stage):
    """The default pipeline: train, evaluate, write the summary (in the run's root)."""

    name = "train"

    def artefacts(self, cfg: ExperimentConfig) -> list[str]:
        return ["metrics.jsonl", "checkpoints", "summary.json"]

    def check(self, cfg: ExperimentConfig, schema: Any) -> None:
        # The model on the meta device: no memory, milliseconds, and the RNG left as it was
        # so that the real build draws the same numbers.
        try:
            with torch.random.fork_rng(devices=[]):
                build_model(cfg, schema, device=torch.device("meta"))
        except ValueError:  # BudgetTooSmall, a refused knob or face: the user's to fix
            raise
        except Exception:  # noqa: BLE001 - the real build reports it with its context
            pass

    def done(self, sc: StageContext) -> bool:
        return sc.run.is_finished()

    def run(self, sc: StageContext) -> dict[str, Any]:
        serve = sc.cfg.embedding.serve_dtype
        if serve is not None and sc.ctx.world_size > 1:
            raise ValueError(
                f"embedding.serve_dtype={serve} runs in one process (it scores the quantized model "
                "unsharded); train with world_size 1, or train without it and use `embtables export` "
                "then `embtables predict`"
            )
        trainer = build_trainer(sc.cfg, sc.schema, sc.data_root, sc.ctx, sc.run.path)
        final = train_with_resume(sc, trainer, sc.run, resume=sc.resume)
        summary = make_summary(sc.cfg, trainer, final, sc.data_root, sc.ctx.world_size, sc.threads)
        summary["run_dir"] = str(sc.run.path)
        if serve is not None and summary["eval_split"]:
            sc.say(f"== serving: the final checkpoint with its tables at {serve}, on {summary['eval_split']}")
            summary = apply_served(summary, evaluate_served(sc.cfg, sc.run.path, sc.data_root,
                                                            summary["eval_split"]))
        if sc.ctx.is_main:
            sc.run.write_summary(summary)  # atomic: its presence means "finished"
            sc.run.prune()
            auc = f"{summary['auc']:.4f}" if summary["auc"] is not None else "n/a"
            orc = f"  oracle_auc={summary['oracle_auc']:.4f}" if summary["oracle_auc"] is not None else ""
            sc.say(f"== {summary['eval_split']}: auc={auc} logloss={summary['logloss']:.4f}{orc}  "
                   f"({summary['samples_per_second']:,.0f} samples/s, {summary['train_seconds']:.1f}s)\n"
                   f"== results: {sc.run.summary_path}")
        return summary


# ---- the registry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """The stages of an experiment (``stages(cfg)``) and the settings they read from the
    method's config section (None: they read none)."""

    stages: Callable[[ExperimentConfig], list[Stage]]
    settings: type[BaseModel] | None = None


PIPELINES: Registry[Pipeline] = Registry("pipeline")


def register_pipeline(method: str, factory: Callable[[ExperimentConfig], list[Stage]],
                      settings: type[BaseModel] | None = None) -> None:
    """The stages of every experiment whose ``embedding.method`` is ``method``; ``settings``
    validate (with the method's knobs) what the stages read from ``embedding.<method>``."""
    PIPELINES.add(method, Pipeline(factory, settings))
    if settings is not None:
        STAGE_SETTINGS.add(method, settings)


def pipeline_for(cfg: ExperimentConfig) -> list[Stage]:
    pipeline = PIPELINES.find(cfg.embedding.method)
    if pipeline is not None and cfg.embedding.serve_dtype is not None:
        raise ValueError(
            f"embedding.serve_dtype: {cfg.embedding.method} runs its own stages, which do not score a "
            "served model; drop the key, train, then `embtables export RUN_DIR --dtype "
            f"{cfg.embedding.serve_dtype}` and `embtables predict`"
        )
    return pipeline.stages(cfg) if pipeline is not None else [TrainStage()]


class OptEmbedStageSettings(BaseModel):
    """What OptEmbed's supernet, search and retrain stages read from ``embedding.optembed``
    (the module's own knobs: ``embeddings.optembed.OptEmbedKnobs``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold_lr: float = Field(0.01, gt=0, description="learning rate of the row-pruning thresholds "
                                "(own parameter group, no weight decay)")
    supernet_epochs: int | None = Field(None, ge=0, description="epochs of the supernet stage; null or 0: "
                                        "train.epochs")
    population: int = Field(20, ge=1, description="candidates per generation of the evolutionary search")
    mutation_num: int = Field(10, ge=0, description="mutants per generation")
    crossover_num: int = Field(10, ge=0, description="crossover children per generation")
    parents: int = Field(10, ge=1, description="best candidates the next generation is bred from")
    mutation_prob: float = Field(0.1, gt=0, le=1, description="probability that a mutant re-draws a "
                                 "field's width")
    search_iterations: int = Field(30, ge=1, description="generations of the search")
    search_rows: int = Field(50_000, ge=1, description="validation rows the fitness (AUC) is measured on")
    search_seed: int | None = Field(None, description="seed of the search; null: the experiment's seed")
    retrain_epochs: int | None = Field(None, ge=0, description="epochs of the retrain stage; null or 0: "
                                       "train.epochs")
    retrain_init: Literal["rewind", "random", "inherit"] = Field(
        "rewind", description="the retrain's initial weights: the supernet's initial ones (rewind), "
        "fresh ones (random) or the trained supernet's (inherit)")

    @model_validator(mode="after")
    def _next_generation_not_empty(self) -> OptEmbedStageSettings:
        if self.mutation_num + self.crossover_num < 1:
            raise ValueError("mutation_num + crossover_num must be >= 1 (the next generation's size)")
        return self


def adopt_stages(src: RunDir, dest: RunDir, stages: list[Stage], upto: str,
                 cfg: ExperimentConfig) -> list[str]:
    """``--from SRC --stage UPTO``: copy the artefacts of every stage before ``upto`` from a
    finished stage of SRC into the new run directory ``dest`` (SRC is only read). Refuses
    when a copied stage's results depend on settings that differ between the two configs."""
    names = [s.name for s in stages]
    if upto not in names:
        raise ConfigError(f"--stage {upto}: this experiment's stages are {', '.join(names)}")
    before = stages[:names.index(upto)]
    if not before:
        raise ConfigError(f"--stage {upto}: the first stage has nothing to start from; run without --from")
    src_cfg = load_config(read_yaml(src.config_path))
    copied = []
    for st in before:
        sc = StageContext(src_cfg, None, src, Path(), None, True, None, True, 1)
        if not st.done(sc):
            raise ConfigError(f"--from {src.path}: its stage {st.name!r} has not finished, so there is "
                              f"nothing to start {upto!r} from")
        mine, theirs = st.stage_config(cfg), st.stage_config(src_cfg)
        if mine is not None and theirs is not None:
            diff = config_diff(theirs.model_dump(mode="json"), mine.model_dump(mode="json"))
            diff = [k for k in diff if k not in RESULT_NEUTRAL and k != "name"]
            if diff:
                raise ConfigError(f"--from {src.path} --stage {upto}: stage {st.name!r} would be reused, but "
                                  f"its results depend on {', '.join(diff)}, which differ; start at --stage "
                                  f"{st.name} or leave them as they were")
        for rel in st.artefacts(src_cfg):
            s, d = src.path / rel, dest.path / rel
            if not s.exists():
                continue
            d.parent.mkdir(parents=True, exist_ok=True)
            if s.is_dir():
                shutil.copytree(s, d, ignore=shutil.ignore_patterns(".lock", ".*.partial"))
            else:
                shutil.copy2(s, d)
        copied.append(st.name)
    return copied


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted key paths whose values differ between two config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


# Built-in pipelines register themselves on import (after the names above exist).
from embtables.experiments import optembed_pipeline  # noqa: E402,F401
