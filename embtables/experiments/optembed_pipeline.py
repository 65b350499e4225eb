"""OptEmbed as one experiment: supernet -> evolutionary search -> retrain (Lyu et al. 2022).

Three stages registered for ``embedding.method: optembed`` (see stages.py). Each writes
its artefacts under ``RUN_DIR/optembed/`` and is skipped when they exist (``--resume``)::

    optembed/supernet/          stage 1: a run directory of its own (config.yaml,
                                metrics.jsonl, checkpoints/) + done.json (thresholds,
                                rows kept per field)
    optembed/search_state.json  stage 2, after every generation (resumable)
    optembed/search.json        stage 2 result: widths per field, fitness, history
    optembed/arch.pt            kept ids + widths (+ the retrain's initial table weights)
    optembed/retrain_dense.pt   the retrain's initial dense weights (rewind / inherit)
    optembed/export.pt          the retrained exported table: build(features,
                                method="optembed", artefact=...) or OptEmbed.from_artefact
    config.yaml, metrics.jsonl, checkpoints/, summary.json
                                stage 3: the runner's usual files, of the retrain only

Only the retrained, exported model's metrics go into summary.json (``embedding_bytes`` is
the exported module's ``memory_bytes()``), plus an ``optembed`` block (rows pruned,
widths, supernet and search numbers, seconds per stage).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from embtables.datasets.reader import BatchReader
from embtables.embeddings import FeatureSpec, features_from_schema, resolve_budget
from embtables.embeddings.optembed import OptEmbed, gather_rows, make_artefact, plan_optembed, save_artefact
from embtables.experiments.build import build_model, build_trainer
from embtables.experiments.config import ExperimentConfig
from embtables.experiments.jsonfile import read_json, write_json
from embtables.experiments.optembed_search import EvolutionarySearch
from embtables.experiments.rundir import RunDir
from embtables.experiments.stages import (
    OptEmbedStageSettings,
    Stage,
    StageContext,
    register_pipeline,
    train_with_resume,
)
from embtables.experiments.summary import make_summary
from embtables.experiments.trainer import Trainer

STAGES = ("supernet", "search", "retrain")
SUPERNET = "optembed/supernet"


def supernet_trainer(cfg: ExperimentConfig, schema, data_root: Path, ctx, run_dir: Path | None,
                     threshold_lr: float, for_training: bool = True) -> Trainer:
    """The runner's Trainer; the thresholds get their own parameter group (own LR, no
    weight decay) in the dense optimizer, so they keep the checkpoint/LR-schedule path."""

    def threshold_group(model: torch.nn.Module) -> list[dict[str, Any]]:
        thr = optembed_module(model).thresholds
        return [{"params": [thr], "lr": threshold_lr, "weight_decay": 0.0}]

    return build_trainer(cfg, schema, data_root, ctx, run_dir, for_training=for_training,
                         extra_param_groups=threshold_group)


def optembed_module(model: torch.nn.Module) -> OptEmbed:
    mods = [m for m in model.embedding_modules().values() if isinstance(m, OptEmbed)]
    if len(mods) != 1:
        raise ValueError(
            f"optembed: the model must hold exactly one OptEmbed embedding module, found {len(mods)}")
    return mods[0]


def module_prefix(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name + "." if name else ""
    raise RuntimeError("internal: embedding module not found in the model")


# ---- configs of the stages ------------------------------------------------------------------


def resolved_knobs(cfg: ExperimentConfig) -> dict[str, Any]:
    return dict(cfg.embedding.settings("optembed"))


def stage_config(cfg: ExperimentConfig, stage: str, knobs: dict[str, Any], artefact: Path | None = None
                 ) -> ExperimentConfig:
    data = cfg.model_dump(mode="json")
    emb = data["embedding"]
    own = dict(emb.get("optembed") or {})
    if stage == "supernet":
        data["name"] = f"{cfg.name}-supernet"
        emb["budget"] = None  # the budget bounds the exported table (the search), not the supernet
        own.pop("artefact", None)
        epochs = knobs["supernet_epochs"]
    else:
        own["artefact"] = str(artefact)
        epochs = knobs["retrain_epochs"]
    emb["optembed"] = own
    if epochs:
        data["train"]["epochs"] = int(epochs)
    return ExperimentConfig.model_validate(data)


# ---- sharded tables -> full tensors -------------------------------------------------------------


def full_tensor(t: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A table from its shards on every rank (TW/RW/CW/TWRW all write disjoint blocks,
    so a SUM all-reduce assembles it); a replicated (data-parallel) tensor as is."""
    if not isinstance(t, ShardedTensor):
        return t.detach().float().cpu()
    out = torch.zeros(shape, dtype=torch.float32)
    for s in t.local_shards():
        r0, c0 = s.metadata.shard_offsets
        h, w = s.tensor.shape
        out[r0:r0 + h, c0:c0 + w] = s.tensor.detach().float().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def table_tensors(trainer: Trainer, module: OptEmbed, kind: str) -> dict[str, torch.Tensor]:
    """Full weights of every field's table of the (DMP-wrapped) module, by feature name."""
    sd = trainer.model.state_dict()
    prefix = module_prefix(trainer.inner, module) + f"tables.{kind}."
    out = {}
    for table, feature, rows, width in module.physical_tables():
        key = f"{prefix}{table}.weight"
        if key not in sd:
            raise RuntimeError(f"internal: {key} not in the sharded model's state dict")
        out[feature] = full_tensor(sd[key], (rows, width))
    return out


# ---- the stages ------------------------------------------------------------------------------------


def _legacy_seconds(sc: StageContext) -> dict[str, float]:
    # Run directories written before each stage recorded its own seconds kept them here.
    return read_json(sc.run / "optembed" / "seconds.json") or {}


class SupernetStage(Stage):
    """Stage 1: train the supernet (a run directory of its own) and record its thresholds."""

    name = "supernet"

    def artefacts(self, cfg: ExperimentConfig) -> list[str]:
        return [SUPERNET]

    def folder(self, sc: StageContext) -> RunDir:
        return sc.run.sub(*SUPERNET.split("/"))

    def done(self, sc: StageContext) -> bool:
        return (self.folder(sc) / "done.json").exists()

    def stage_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return stage_config(cfg, "supernet", resolved_knobs(cfg))

    def run(self, sc: StageContext) -> None:
        knobs = resolved_knobs(sc.cfg)
        s1, s1_cfg = self.folder(sc), self.stage_config(sc.cfg)
        sc.say(f"== optembed [1/3] supernet: {s1_cfg.train.epochs} epoch(s), alpha={knobs['alpha']}, "
               f"threshold_lr={knobs['threshold_lr']} -> {s1.path}")
        t0 = time.perf_counter()
        if sc.ctx.is_main:
            s1.create()
            s1.write_config(s1_cfg.to_yaml())
        trainer = supernet_trainer(s1_cfg, sc.schema, sc.data_root, sc.ctx, s1.path, knobs["threshold_lr"])
        # The stage's folder exists only for this run: a checkpoint there is ours to go on from.
        final = train_with_resume(sc, trainer, s1, resume=True, label="supernet")
        features = features_from_schema(sc.schema)
        sup = optembed_module(trainer.inner)
        tables = table_tensors(trainer, sup, "embeddings")
        thr = sup.thresholds.detach().float().cpu()
        kept = [int((tables[f.name][1:].abs().sum(1) > thr[i]).sum()) for i, f in enumerate(features)]
        done = {"valid_auc": final.get("valid_auc"), "valid_logloss": final.get("valid_logloss"),
                "steps": trainer.step, "thresholds": thr.tolist(), "kept": kept,
                "cardinalities": [f.cardinality for f in features],
                "rows_pruned_share": 1 - sum(kept) / sum(f.cardinality for f in features),
                "seconds": round(time.perf_counter() - t0, 1)}
        if sc.ctx.is_main:
            s1.prune(keep=1)  # the search loads the newest; nothing resumes the supernet again
            write_json(s1 / "done.json", done)
        sc.shared["supernet_trainer"] = trainer
        sc.say(f"== supernet: valid auc={_fmt(done['valid_auc'])}, rows pruned "
               f"{done['rows_pruned_share']:.1%} ({done['seconds']:.0f}s)")


class SearchStage(Stage):
    """Stage 2: evolutionary search of the widths on the trained supernet; the architecture
    and the retrain's initial weights."""

    name = "search"

    def artefacts(self, cfg: ExperimentConfig) -> list[str]:
        return [f"optembed/{n}" for n in ("search_state.json", "search.json", "arch.pt", "retrain_dense.pt")]

    def done(self, sc: StageContext) -> bool:
        root = sc.run / "optembed"
        return (root / "search.json").exists() and (root / "arch.pt").exists()

    def stage_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        data = cfg.model_dump(mode="json")
        own = data["embedding"].get("optembed") or {}
        own.pop("retrain_epochs", None)
        # A finished run's config.yaml names its own exported table (for `predict`); the search
        # never reads it, so a run branched from it with --from must not count it as a change.
        own.pop("artefact", None)
        return ExperimentConfig.model_validate(data)

    def run(self, sc: StageContext) -> None:
        knobs = resolved_knobs(sc.cfg)
        s1 = sc.run.sub(*SUPERNET.split("/"))
        s1_cfg = stage_config(sc.cfg, "supernet", knobs)
        t0 = time.perf_counter()
        trainer = sc.shared.pop("supernet_trainer", None)
        if trainer is None:
            trainer = supernet_trainer(s1_cfg, sc.schema, sc.data_root, sc.ctx, None, knobs["threshold_lr"],
                                       for_training=False)
            ckpt = s1.latest_checkpoint()
            if ckpt is None:
                raise FileNotFoundError(f"{s1.path}: the supernet finished but left no checkpoint to search "
                                        "on (train.checkpoint must stay true for OptEmbed)")
            trainer.load_checkpoint(ckpt)
        search_stage(sc.cfg, s1_cfg, knobs, trainer, features_from_schema(sc.schema), sc.schema, sc.data_root,
                     sc.ctx, sc.run.path / "optembed", sc.quiet, seconds_before=time.perf_counter() - t0)


class RetrainStage(Stage):
    """Stage 3: retrain the exported table in the run's root; export it; the summary."""

    name = "retrain"

    def artefacts(self, cfg: ExperimentConfig) -> list[str]:
        return ["metrics.jsonl", "checkpoints", "optembed/export.pt", "summary.json"]

    def done(self, sc: StageContext) -> bool:
        return sc.run.is_finished() and (sc.run / "optembed" / "export.pt").exists()

    def run(self, sc: StageContext) -> dict[str, Any]:
        cfg, run = sc.cfg, sc.run
        knobs = resolved_knobs(cfg)
        root = run.path / "optembed"
        features = features_from_schema(sc.schema)
        search = json.loads((root / "search.json").read_text())
        r_cfg = stage_config(cfg, "retrain", knobs, artefact=root / "arch.pt")
        sc.say(f"== optembed [3/3] retrain: {r_cfg.train.epochs} epoch(s), init={knobs['retrain_init']}, "
               f"widths {search['dims']}")
        t0 = time.perf_counter()
        trainer = build_trainer(r_cfg, sc.schema, sc.data_root, sc.ctx, run.path)
        if not (sc.resume and run.checkpoints()) and (root / "retrain_dense.pt").exists():
            dense = torch.load(root / "retrain_dense.pt", weights_only=True)
            _, unexpected = trainer.model.load_state_dict(dense, strict=False)
            if unexpected:
                raise RuntimeError(f"internal: dense weights {unexpected[:3]} do not fit the retrain model")
        final = train_with_resume(sc, trainer, run, resume=sc.resume, label="retrain")
        exported = optembed_module(trainer.inner)
        weights = table_tensors(trainer, exported, "embedding_bags")
        art = torch.load(root / "arch.pt", weights_only=True)
        art["tables"] = [weights[f.name] for f in features]
        s1 = json.loads((root / "supernet" / "done.json").read_text())
        legacy = _legacy_seconds(sc)
        seconds = {"supernet": s1.get("seconds", legacy.get("supernet")),
                   "search": search.get("seconds", legacy.get("search")),
                   "retrain": round(time.perf_counter() - t0, 1)}
        summary = make_summary(cfg, trainer, final, sc.data_root, sc.ctx.world_size, sc.threads)
        plan = exported.plan
        summary["optembed"] = {
            "rows_total": sum(plan.cardinalities), "rows_kept": sum(plan.kept),
            "rows_pruned_share": round(plan.rows_pruned_share, 6),
            "dims": dict(zip([f.name for f in features], plan.dims, strict=True)),
            "kept": dict(zip([f.name for f in features], plan.kept, strict=True)),
            "thresholds": s1["thresholds"], "supernet_valid_auc": s1["valid_auc"],
            "search_fitness": search["fitness"],
            "search_evaluations": search["evaluations"], "retrain_init": knobs["retrain_init"],
            "budget_bytes": search.get("budget_bytes"), "stage_seconds": seconds,
            "export": str(root / "export.pt"),
        }
        summary["run_dir"] = str(run.path)
        if sc.ctx.is_main:
            save_artefact(art, root / "export.pt")
            # config.yaml names the exported table, so `embtables predict RUN_DIR` rebuilds the
            # retrained model (the supernet stage drops the artefact knob on --resume). Before
            # the summary: summary.json is the last file, its presence means "finished".
            done_cfg = cfg.model_dump(mode="json")
            done_cfg["embedding"]["optembed"] = {**(done_cfg["embedding"].get("optembed") or {}),
                                                 "artefact": str(root / "export.pt")}
            run.write_config(ExperimentConfig.model_validate(done_cfg).to_yaml())
            run.write_summary(summary)
            run.prune()
        sc.say(f"== {summary['eval_split']}: auc={_fmt(summary['auc'])} logloss={_fmt(summary['logloss'])} "
               f"embedding_bytes={summary['embedding_bytes']:,} rows pruned {plan.rows_pruned_share:.1%} "
               f"(seconds per stage {seconds})\n== results: {run.path}/summary.json")
        return summary


register_pipeline("optembed", lambda cfg: [SupernetStage(), SearchStage(), RetrainStage()],
                  settings=OptEmbedStageSettings)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _say(ctx, quiet: bool, msg: str) -> None:
    if ctx.is_main and not quiet:
        print(msg, flush=True)


# ---- stage 2 ----------------------------------------------------------------------------------------


def validation_batches(cfg: ExperimentConfig, data_root: Path, ctx, rows: int) -> list:
    """The first ``rows`` validation rows (equal batch counts on every rank), kept in memory:
    every candidate is evaluated on the same rows."""
    split = cfg.data.valid_split or cfg.data.train_split
    bs = max(1, cfg.train.eval_batch_size // ctx.world_size)
    reader = BatchReader(data_root, split=split, batch_size=bs, shuffle=False, seed=0, rank=ctx.rank,
                         world_size=ctx.world_size, drop_last=ctx.world_size > 1, prefetch=0)
    n_batches = min(reader.num_batches, max(1, -(-rows // (bs * ctx.world_size))))
    out = []
    for b in reader:
        if len(out) >= n_batches:
            break
        out.append(b)
    return out


def search_stage(cfg: ExperimentConfig, s1_cfg: ExperimentConfig, knobs: dict[str, Any], trainer: Trainer,
                 features: list[FeatureSpec], schema, data_root: Path, ctx, root: Path, quiet: bool,
                 seconds_before: float = 0.0) -> dict[str, Any]:
    t0 = time.perf_counter() - seconds_before
    sup = optembed_module(trainer.inner)
    tables = table_tensors(trainer, sup, "embeddings")
    thr = sup.thresholds.detach().float().cpu()
    kept_ids = [torch.nonzero(tables[f.name][1:].abs().sum(1) > thr[i]).flatten()
                for i, f in enumerate(features)]
    kept = [int(k.numel()) for k in kept_ids]
    dim, dtype = cfg.embedding.dim, cfg.embedding.dtype
    budget = resolve_budget(cfg.embedding.budget, features, dim)

    def cost(dims: tuple[int, ...]) -> int:
        return plan_optembed(features, dim, list(dims), kept, dtype).bytes

    seed = knobs["search_seed"] if knobs["search_seed"] is not None else cfg.seed
    search = EvolutionarySearch(
        len(features), dim, knobs["dim_step"], population=knobs["population"],
        mutation_num=knobs["mutation_num"], crossover_num=knobs["crossover_num"], parents=knobs["parents"],
        iterations=knobs["search_iterations"], mutation_prob=knobs["mutation_prob"], seed=seed, cost=cost,
        budget=budget)
    batches = validation_batches(cfg, data_root, ctx, knobs["search_rows"])
    evaluator = trainer.evaluator
    rows = sum(b.labels.numel() for b in batches) * ctx.world_size
    _say(ctx, quiet, f"== optembed [2/3] search: {knobs['search_iterations']} generations, population "
                     f"{knobs['population']}, fitness = AUC on {rows:,} validation rows"
                     + (f", budget {budget:,} bytes" if budget else ""))

    @torch.no_grad()
    def fitness(dims: tuple[int, ...]) -> float:
        sup.set_eval_dims(dims)
        auc = evaluator.auc_of_batches(batches)
        sup.set_eval_dims(None)
        return math.nan if auc is None else auc

    sup.enable_lookup_cache()
    try:
        result = search.run(fitness, state_path=root / "search_state.json", save=ctx.is_main,
                            progress=ctx.is_main and not quiet and cfg.train.progress)
    finally:
        sup.enable_lookup_cache(False)
    plan = plan_optembed(features, dim, list(result.dims), kept, dtype)

    # The retrain's initial weights: the supernet's initial ones (rewind; rebuilt from the
    # seed exactly as the Trainer built them), its trained ones (inherit), or none (random).
    init_tables, dense_state = None, None
    if knobs["retrain_init"] == "rewind":
        torch.manual_seed(s1_cfg.seed)
        np.random.seed(s1_cfg.seed)
        init_model = build_model(s1_cfg, schema)
        init_sup = optembed_module(init_model)
        init_tables = [gather_rows(init_sup.table_weight(f.name), ids, d)
                       for f, ids, d in zip(features, kept_ids, result.dims, strict=True)]
        prefix = module_prefix(init_model, init_sup)
        dense_state = {k: v for k, v in init_model.state_dict().items() if not k.startswith(prefix)}
        del init_model
    elif knobs["retrain_init"] == "inherit":
        init_tables = [gather_rows(tables[f.name], ids, d)
                       for f, ids, d in zip(features, kept_ids, result.dims, strict=True)]
        prefix = module_prefix(trainer.inner, sup)
        dense_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()
                       if not k.startswith(prefix) and not isinstance(v, ShardedTensor)}
    out = {"dims": list(result.dims), "fitness": result.fitness, "evaluations": result.evaluations,
           "kept": kept, "thresholds": thr.tolist(), "budget_bytes": budget,
           "num_parameters": plan.num_parameters, "bytes": plan.bytes,
           "rows_pruned_share": plan.rows_pruned_share, "seed": seed, "history": result.history,
           "seconds": round(time.perf_counter() - t0, 1)}
    if ctx.is_main:
        art = make_artefact(features, dim, list(result.dims), kept_ids, init_tables, thresholds=thr.tolist())
        save_artefact(art, root / "arch.pt")
        if dense_state is not None:
            torch.save(dense_state, root / "retrain_dense.pt")
        write_json(root / "search.json", out)
    if ctx.world_size > 1:
        dist.barrier()
    _say(ctx, quiet, f"== search: widths {list(result.dims)}, fitness auc={result.fitness:.4f}, exported "
                     f"table {plan.bytes:,} bytes ({plan.num_parameters:,} parameters)")
    return out
