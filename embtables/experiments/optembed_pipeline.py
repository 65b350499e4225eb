"""OptEmbed as one experiment: supernet -> evolutionary search -> retrain (Lyu et al. 2022).

The runner hands ``embedding.method: optembed`` here. Each stage writes its artefacts
under ``RUN_DIR/optembed/`` and is skipped when they exist (``--resume``)::

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
from embtables.embeddings import FeatureSpec, features_from_schema, knob_defaults, resolve_budget
from embtables.embeddings.optembed import OptEmbed, gather_rows, make_artefact, plan_optembed, save_artefact
from embtables.experiments import metrics as M
from embtables.experiments.build import build_model
from embtables.experiments.config import ExperimentConfig
from embtables.experiments.jsonfile import write_json
from embtables.experiments.optembed_search import EvolutionarySearch
from embtables.experiments.optim import dense_optimizer
from embtables.experiments.trainer import StopRequested, Trainer

STAGES = ("supernet", "search", "retrain")


class SupernetTrainer(Trainer):
    """The runner's Trainer; the thresholds get their own parameter group (own LR, no
    weight decay) in the dense optimizer, so they keep the checkpoint/LR-schedule path."""

    def __init__(self, cfg: ExperimentConfig, schema, data_root: Path, ctx, run_dir: Path | None,
                 threshold_lr: float, for_training: bool = True) -> None:
        super().__init__(cfg, schema, data_root, ctx, run_dir, for_training=for_training)
        self.supernet = optembed_module(self.inner)
        thr = self.supernet.thresholds
        params = [p for g in self.dense_opt.param_groups for p in g["params"]]
        rest = [p for p in params if p is not thr]
        if len(rest) != len(params) - 1:
            raise RuntimeError("internal: the OptEmbed thresholds are not among the dense parameters")
        self.dense_opt = dense_optimizer(rest, cfg.train.dense_optimizer)
        self.dense_opt.add_param_group({"params": [thr], "lr": threshold_lr, "weight_decay": 0.0})
        self.optimizers = [self.dense_opt, self.fused_opt]
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]


def optembed_module(model: torch.nn.Module) -> OptEmbed:
    mods = [m for m in model.embedding_modules().values() if isinstance(m, OptEmbed)]
    if len(mods) != 1:
        raise ValueError(f"optembed: the model must hold exactly one OptEmbed embedding module, found {len(mods)}")
    return mods[0]


def module_prefix(model: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name + "." if name else ""
    raise RuntimeError("internal: embedding module not found in the model")


# ---- configs of the stages ------------------------------------------------------------------


def resolved_knobs(cfg: ExperimentConfig) -> dict[str, Any]:
    return {**knob_defaults("optembed"), **cfg.embedding.knobs("optembed")}


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


def _say(ctx, quiet: bool, msg: str) -> None:
    if ctx.is_main and not quiet:
        print(msg, flush=True)


def run_optembed(cfg: ExperimentConfig, ctx, run_dir: Path, data_root: Path, schema, resume, stop_after_step,
                 quiet: bool, threads: int, *, stop_after_stage: str | None = None) -> dict[str, Any]:
    """Three stages; returns the retrain's summary (``stopped_at_*`` when stopped early)."""
    from embtables.experiments.runner import (
        _prune_checkpoints,
        _truncate_metrics,
        latest_checkpoint,
        make_summary,
    )

    if stop_after_stage is not None and stop_after_stage not in STAGES:
        raise ValueError(f"stop_after_stage must be one of {STAGES}")
    knobs = resolved_knobs(cfg)
    root = run_dir / "optembed"
    if resume is None and (root / "supernet").exists():
        raise FileExistsError(f"{root} already holds an OptEmbed run: resume it (--resume {run_dir}) or use a new "
                              "run directory")
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
    features = features_from_schema(schema)
    seconds: dict[str, float] = json.loads((root / "seconds.json").read_text()) if (root / "seconds.json").exists() \
        else {}

    # ---- stage 1: supernet ------------------------------------------------------------------
    s1_dir, s1_cfg = root / "supernet", stage_config(cfg, "supernet", knobs)
    sup_trainer: SupernetTrainer | None = None
    if (s1_dir / "done.json").exists():
        _say(ctx, quiet, f"== optembed [1/3] supernet: done, skipped ({s1_dir / 'done.json'})")
    else:
        _say(ctx, quiet, f"== optembed [1/3] supernet: {s1_cfg.train.epochs} epoch(s), alpha={knobs['alpha']}, "
                         f"threshold_lr={knobs['threshold_lr']} -> {s1_dir}")
        t0 = time.perf_counter()
        if ctx.is_main:
            s1_dir.mkdir(parents=True, exist_ok=True)
            (s1_dir / "config.yaml").write_text(s1_cfg.to_yaml())
        sup_trainer = SupernetTrainer(s1_cfg, schema, data_root, ctx, s1_dir, knobs["threshold_lr"])
        ckpt = latest_checkpoint(s1_dir)
        if ckpt is not None:
            sup_trainer.load_checkpoint(ckpt)
            if ctx.is_main:
                _truncate_metrics(s1_dir / "metrics.jsonl", sup_trainer.step)
            _say(ctx, quiet, f"== resumed the supernet from {ckpt} (step {sup_trainer.step})")
        try:
            final = sup_trainer.train(stop_after_step=stop_after_step)
        except StopRequested:
            return {"stopped_at_stage": "supernet", "stopped_at_step": sup_trainer.step, "run_dir": str(run_dir)}
        sup = sup_trainer.supernet
        tables = table_tensors(sup_trainer, sup, "embeddings")
        thr = sup.thresholds.detach().float().cpu()
        kept = [int((tables[f.name][1:].abs().sum(1) > thr[i]).sum()) for i, f in enumerate(features)]
        seconds["supernet"] = round(time.perf_counter() - t0, 1)
        done = {"valid_auc": final.get("valid_auc"), "valid_logloss": final.get("valid_logloss"),
                "steps": sup_trainer.step, "thresholds": thr.tolist(), "kept": kept,
                "cardinalities": [f.cardinality for f in features],
                "rows_pruned_share": 1 - sum(kept) / sum(f.cardinality for f in features)}
        if ctx.is_main:
            write_json(root / "seconds.json", seconds)
            write_json(s1_dir / "done.json", done)
            _prune_checkpoints(s1_dir)
        _say(ctx, quiet, f"== supernet: valid auc={_fmt(done['valid_auc'])}, rows pruned "
                         f"{done['rows_pruned_share']:.1%} ({seconds['supernet']:.0f}s)")
    if stop_after_stage == "supernet":
        return {"stopped_at_stage": "supernet", "run_dir": str(run_dir)}

    # ---- stage 2: evolutionary search -------------------------------------------------------
    if (root / "search.json").exists() and (root / "arch.pt").exists():
        _say(ctx, quiet, f"== optembed [2/3] search: done, skipped ({root / 'search.json'})")
        search = json.loads((root / "search.json").read_text())
    else:
        t0 = time.perf_counter()
        if sup_trainer is None:
            sup_trainer = SupernetTrainer(s1_cfg, schema, data_root, ctx, None, knobs["threshold_lr"],
                                          for_training=False)
            ckpt = latest_checkpoint(s1_dir)
            if ckpt is None:
                raise FileNotFoundError(f"{s1_dir}: the supernet finished but left no checkpoint to search on "
                                        "(train.checkpoint must stay true for OptEmbed)")
            sup_trainer.load_checkpoint(ckpt)
        search = search_stage(cfg, s1_cfg, knobs, sup_trainer, features, schema, data_root, ctx, root, quiet)
        seconds["search"] = round(time.perf_counter() - t0, 1) + seconds.get("search", 0.0)
        if ctx.is_main:
            write_json(root / "seconds.json", seconds)
    del sup_trainer
    if stop_after_stage == "search":
        return {"stopped_at_stage": "search", "run_dir": str(run_dir)}

    # ---- stage 3: retrain the exported table --------------------------------------------------
    r_cfg = stage_config(cfg, "retrain", knobs, artefact=root / "arch.pt")
    _say(ctx, quiet, f"== optembed [3/3] retrain: {r_cfg.train.epochs} epoch(s), init={knobs['retrain_init']}, "
                     f"widths {search['dims']}")
    t0 = time.perf_counter()
    trainer = Trainer(r_cfg, schema, data_root, ctx, run_dir)
    ckpt = latest_checkpoint(run_dir) if resume is not None else None
    if ckpt is not None:
        trainer.load_checkpoint(ckpt)
        if ctx.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", trainer.step)
        _say(ctx, quiet, f"== resumed the retrain from {ckpt} (step {trainer.step})")
    elif (root / "retrain_dense.pt").exists():
        dense = torch.load(root / "retrain_dense.pt", weights_only=True)
        _, unexpected = trainer.model.load_state_dict(dense, strict=False)
        if unexpected:
            raise RuntimeError(f"internal: dense weights {unexpected[:3]} do not fit the retrain model")
    try:
        final = trainer.train(stop_after_step=stop_after_step)
    except StopRequested:
        return {"stopped_at_stage": "retrain", "stopped_at_step": trainer.step, "run_dir": str(run_dir)}
    seconds["retrain"] = round(time.perf_counter() - t0, 1) + seconds.get("retrain", 0.0)
    exported = optembed_module(trainer.inner)
    weights = table_tensors(trainer, exported, "embedding_bags")
    art = torch.load(root / "arch.pt", weights_only=True)
    art["tables"] = [weights[f.name] for f in features]
    if ctx.is_main:
        save_artefact(art, root / "export.pt")
        write_json(root / "seconds.json", seconds)

    summary = make_summary(cfg, trainer, final, data_root, ctx.world_size, threads)
    plan = exported.plan
    s1 = json.loads((root / "supernet" / "done.json").read_text())
    summary["optembed"] = {
        "rows_total": sum(plan.cardinalities), "rows_kept": sum(plan.kept),
        "rows_pruned_share": round(plan.rows_pruned_share, 6),
        "dims": dict(zip([f.name for f in features], plan.dims, strict=True)),
        "kept": dict(zip([f.name for f in features], plan.kept, strict=True)),
        "thresholds": s1["thresholds"], "supernet_valid_auc": s1["valid_auc"], "search_fitness": search["fitness"],
        "search_evaluations": search["evaluations"], "retrain_init": knobs["retrain_init"],
        "budget_bytes": search.get("budget_bytes"), "stage_seconds": seconds,
        "export": str(root / "export.pt"),
    }
    summary["run_dir"] = str(run_dir)
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _prune_checkpoints(run_dir)
        # config.yaml now names the exported table, so `embtables predict RUN_DIR` rebuilds
        # the retrained model (the supernet stage drops the artefact knob on --resume).
        done_cfg = cfg.model_dump(mode="json")
        done_cfg["embedding"]["optembed"] = {**(done_cfg["embedding"].get("optembed") or {}),
                                             "artefact": str(root / "export.pt")}
        (run_dir / "config.yaml").write_text(ExperimentConfig.model_validate(done_cfg).to_yaml())
        _say(ctx, quiet, f"== {summary['eval_split']}: auc={_fmt(summary['auc'])} logloss={_fmt(summary['logloss'])} "
                         f"embedding_bytes={summary['embedding_bytes']:,} rows pruned {plan.rows_pruned_share:.1%} "
                         f"(seconds per stage {seconds})\n== results: {run_dir}/summary.json")
    return summary


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


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


def search_stage(cfg: ExperimentConfig, s1_cfg: ExperimentConfig, knobs: dict[str, Any], trainer: SupernetTrainer,
                 features: list[FeatureSpec], schema, data_root: Path, ctx, root: Path, quiet: bool) -> dict[str, Any]:
    sup = trainer.supernet
    tables = table_tensors(trainer, sup, "embeddings")
    thr = sup.thresholds.detach().float().cpu()
    kept_ids = [torch.nonzero(tables[f.name][1:].abs().sum(1) > thr[i]).flatten() for i, f in enumerate(features)]
    kept = [int(k.numel()) for k in kept_ids]
    dim, dtype = cfg.embedding.dim, cfg.embedding.dtype
    budget = resolve_budget(cfg.embedding.budget, features, dim)

    def cost(dims: tuple[int, ...]) -> int:
        return plan_optembed(features, dim, list(dims), kept, dtype).bytes

    seed = knobs["search_seed"] if knobs["search_seed"] is not None else cfg.seed
    search = EvolutionarySearch(
        len(features), dim, knobs["dim_step"], population=knobs["population"], mutation_num=knobs["mutation_num"],
        crossover_num=knobs["crossover_num"], parents=knobs["parents"], iterations=knobs["search_iterations"],
        mutation_prob=knobs["mutation_prob"], seed=seed, cost=cost, budget=budget)
    batches = validation_batches(cfg, data_root, ctx, knobs["search_rows"])
    model = trainer.model
    _say(ctx, quiet, f"== optembed [2/3] search: {knobs['search_iterations']} generations, population "
                     f"{knobs['population']}, fitness = AUC on {sum(b.labels.numel() for b in batches) * ctx.world_size:,}"
                     f" validation rows" + (f", budget {budget:,} bytes" if budget else ""))

    @torch.no_grad()
    def fitness(dims: tuple[int, ...]) -> float:
        sup.set_eval_dims(dims)
        model.eval()
        probs = [torch.sigmoid(model(b.dense_features, b.sparse_features).float()).numpy() for b in batches]
        model.train()
        sup.set_eval_dims(None)
        p, y = np.concatenate(probs), np.concatenate([b.labels.numpy() for b in batches])
        if ctx.world_size > 1:
            gathered: list = [None] * ctx.world_size
            dist.all_gather_object(gathered, (p, y))
            p, y = np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered])
        auc = M.auc(y, p)
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
           "kept": kept, "thresholds": thr.tolist(), "budget_bytes": budget, "num_parameters": plan.num_parameters,
           "bytes": plan.bytes, "rows_pruned_share": plan.rows_pruned_share, "seed": seed, "history": result.history}
    if ctx.is_main:
        art = make_artefact(features, dim, list(result.dims), kept_ids, init_tables, thresholds=thr.tolist())
        save_artefact(art, root / "arch.pt")
        if dense_state is not None:
            torch.save(dense_state, root / "retrain_dense.pt")
        write_json(root / "search.json", out)
    if ctx.world_size > 1:
        dist.barrier()
    _say(ctx, quiet, f"== search: widths {list(result.dims)}, fitness auc={result.fitness:.4f}, exported table "
                     f"{plan.bytes:,} bytes ({plan.num_parameters:,} parameters)")
    return out
