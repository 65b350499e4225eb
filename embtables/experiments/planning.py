"""`embtables plan CONFIG`: TorchRec's sharding plan for an experiment config, offline.

The configured model is built on the ``meta`` device (no memory, no GPU), the configured
embedding optimizer is attached in backward so that the planner counts its state, and
``embtables.sharding.plan.plan_model_offline`` plans it for any world size / device /
memory. Only the dataset's ``schema.json`` is needed, not the data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchrec.distributed.planner.types import PlannerError

from embtables.datasets.schema import DatasetSchema, load_schema
from embtables.experiments.build import build_model
from embtables.experiments.config import ExperimentConfig, load_config
from embtables.experiments.optim import attach_embedding_optimizer
from embtables.sharding.config import ShardingConfig
from embtables.sharding.dmp import PlanDoesNotFit
from embtables.sharding.plan import PlanReport, explain_does_not_fit, plan_model_offline

SCHEMA_DIR = Path(__file__).resolve().parent / "configs" / "schemas"


def schema_for(cfg: ExperimentConfig) -> tuple[DatasetSchema, str]:
    """The dataset's schema.json; a shipped schema-only description when the data is absent."""
    root = Path(cfg.data.path).expanduser()
    if (root / "schema.json").exists():
        return load_schema(root), str(root / "schema.json")
    shipped = SCHEMA_DIR / root.name
    if (shipped / "schema.json").exists():
        return load_schema(shipped), str(shipped / "schema.json")
    raise FileNotFoundError(
        f"data.path: {root} holds no schema.json and there is no shipped schema {shipped}/schema.json; "
        "`embtables plan` needs only schema.json (feature names and cardinalities), not the data"
    )


def build_meta_model(cfg: ExperimentConfig, device: str | None = None) -> torch.nn.Module:
    """The configured model with its tables on ``meta`` and the embedding optimizer attached."""
    schema, _ = schema_for(cfg)
    model = build_model(cfg, schema, device=torch.device("meta"))
    attach_embedding_optimizer(model, cfg.train.embedding_optimizer, device or cfg.sharding.device)
    return model


def _sharding_for(cfg, world_size, device, hbm, host_memory, offload) -> ShardingConfig:
    updates = {"world_size": world_size, "device": device, "hbm_per_device": hbm, "host_memory": host_memory,
               "offload": offload}
    return cfg.sharding.model_copy(update={k: v for k, v in updates.items() if v is not None})


def plan_config(
    config, overrides: list[str] | None = None, *, world_size: int | None = None, device: str | None = None,
    hbm: str | None = None, host_memory: str | None = None, offload: str | None = None, suggest: bool = True,
) -> PlanReport:
    """Plan ``config`` offline; raises PlanDoesNotFit (with the smallest change that fits)."""
    cfg = load_config(config, overrides)
    scfg = _sharding_for(cfg, world_size, device, hbm, host_memory, offload)
    model = build_meta_model(cfg, scfg.device)
    try:
        return plan_model_offline(model, scfg, cfg.name)
    except PlannerError as e:
        if not suggest:
            raise PlanDoesNotFit(str(e).splitlines()[0]) from None
        raise PlanDoesNotFit(explain_does_not_fit(model, scfg, e, cfg.embedding.method)) from None
