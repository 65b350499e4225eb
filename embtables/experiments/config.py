"""The strict YAML schema of one experiment.

One pydantic model per section; unknown keys, wrong types and missing values are
errors naming the key path. Method knobs live under ``embedding.<method>`` and model
knobs under ``model.<name>``, and are checked against the method's / model's own
registered knobs model (plus, for a method whose experiment has stages of its own, the
settings those stages read: ``STAGE_SETTINGS``).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from embtables.embeddings.budget import parse_budget_value
from embtables.embeddings.registry import knobs_model, list_methods, validate_knobs
from embtables.models import get_model, list_models
from embtables.registry import Registry
from embtables.sharding.config import ShardingConfig

# Settings that cannot change results: they may differ on --resume and between runs that
# share a stage.
RESULT_NEUTRAL = frozenset({
    "name", "train.threads", "train.progress", "train.log_every", "train.tensorboard", "train.checkpoint",
    "data.prefetch", "sharding.timeout_s",
    # Same numbers either way (tests/test_train_pipeline.py); run directories written before the
    # key existed resume.
    "train.pipeline",
})


CONFIG_DIR = Path(__file__).parent / "configs"

#: Method -> the settings its experiment's stages read from ``embedding.<method>``, beside
#: the module's own knobs (OptEmbed: search and retrain). ``stages.register_pipeline``
#: fills it; the stage pipelines register on import of ``stages``.
STAGE_SETTINGS: Registry[type[BaseModel]] = Registry(
    "stage settings", builtins=("embtables.experiments.stages",))


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    path: str = Field("data/synth-criteo", description="dataset directory (holds schema.json)")
    train_split: str = "train"
    valid_split: str | None = Field("valid",
                                    description="evaluated every train.eval_every steps; null = none")
    test_split: str | None = Field("test", description="evaluated at the end; null = report validation")
    shuffle: bool = Field(True, description="seeded per-epoch shuffle of row groups and a shuffle buffer")
    shuffle_buffer: int = Field(65536, ge=0,
                                description="rows in the shuffle buffer (0 = row-group order only)")
    prefetch: int = Field(2, ge=0, description="batches read ahead in a background thread")
    max_train_rows: int | None = Field(
        None, ge=1, description="train on N rows per epoch (the first N, or a fresh shuffled N each epoch)")
    max_eval_rows: int | None = Field(None, ge=1, description="evaluate on exactly the first N rows of a "
                                      "split (on P processes, each rank's first N/P)")


class EmbeddingSection(Strict):
    """``method``, ``dim``, ``budget``, ``dtype``, then ``<method>: {knobs}``."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    method: str = Field("full", description="registered method: `embtables list` shows them")
    dim: int = Field(16, ge=4, description="output width per feature (multiple of 4)")
    budget: float | int | str | None = Field(
        None, description="fraction of full size (0.1, '1/16') or bytes ('4MiB')")
    dtype: Literal["fp32", "fp16"] = Field("fp32", description="table weight dtype, counted in the budget")
    serve_dtype: Literal["fp16", "int8", "int4", "int2"] | None = Field(
        None, description="size the tables for serving at this precision: the budget counts their "
        "quantized storage (TorchRec's row-wise inference tables), the run trains at `dtype` and reports "
        "the quantized model's AUC and bytes (docs/serving.md)")
    init_scale: float = Field(
        1.0, gt=0, description="multiplies every embedding vector at initialisation (1: the method's own "
        "init); the comparison protocol can tune it per method")

    @field_validator("dim")
    @classmethod
    def _dim_multiple_of_4(cls, v: int) -> int:
        if v % 4:
            raise ValueError(f"must be a multiple of 4 (FBGEMM's kernels need it), got {v}")
        return v

    @field_validator("budget")
    @classmethod
    def _budget_rule(cls, v: float | int | str | None) -> float | int | str | None:

        if v is not None:
            parse_budget_value(v)  # its ValueError states the rule; pydantic adds the key path
        return v

    @model_validator(mode="after")
    def _check_method_and_knobs(self) -> EmbeddingSection:
        sections = method_sections()
        if self.method not in sections:
            raise ValueError(f"unknown method {self.method!r} at embedding.method; "
                             f"valid: {', '.join(sections)}")
        for key, val in (self.model_extra or {}).items():
            if key not in sections:
                raise ValueError(
                    f"unknown key embedding.{key}; valid keys: method, dim, budget, dtype, serve_dtype, "
                    "init_scale, "
                    f"or a method name holding its knobs ({', '.join(sections)})"
                )
            if val is None:
                continue
            if not isinstance(val, dict):
                raise ValueError(f"embedding.{key} must be a mapping of knobs, got {type(val).__name__}")
            validate_knobs(sections[key], val, f"embedding.{key}")
        return self

    def knobs(self, method: str | None = None) -> dict[str, Any]:
        """``embedding.<method>`` as written (the method's knobs and its stages' settings)."""
        return dict((self.model_extra or {}).get(method or self.method) or {})

    def module_knobs(self, method: str | None = None) -> dict[str, Any]:
        """The knobs of ``embedding.<method>`` that the module takes (``build(**knobs)``)."""
        method = method or self.method
        own = knobs_model(method).model_fields
        return {k: v for k, v in self.knobs(method).items() if k in own}

    def settings(self, method: str | None = None) -> BaseModel:
        """``embedding.<method>`` validated, every default filled in: the module's knobs
        and the settings of the method's stages."""
        method = method or self.method
        return validate_knobs(method_sections()[method], self.knobs(method), f"embedding.{method}")


def method_sections() -> dict[str, type[BaseModel]]:
    """Method -> the model of its ``embedding.<method>`` section: the method's knobs model,
    merged with its stages' settings (``STAGE_SETTINGS``) when it has any."""
    return {m: _section_model(knobs_model(m), STAGE_SETTINGS.find(m)) for m in list_methods()}


@functools.cache
def _section_model(knobs: type[BaseModel], settings: type[BaseModel] | None) -> type[BaseModel]:
    if settings is None:
        return knobs
    return create_model(f"{knobs.__name__}Section", __base__=(settings, knobs))  # knobs first


class ModelSection(Strict):
    """``name`` then ``<name>: {knobs}`` for that model."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "dlrm"

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        names = list_models()
        if self.name not in names:
            raise ValueError(f"unknown model {self.name!r} at model.name; valid: {', '.join(names)}")
        for key, val in (self.model_extra or {}).items():
            if key not in names:
                raise ValueError(f"unknown key model.{key}; valid: name, or a model name "
                                 f"({', '.join(names)})")
            try:
                get_model(key).config_cls.model_validate(val or {})
            except ValidationError as e:
                raise ValueError(_format_validation(e, prefix=f"model.{key}", head=False)) from None
        return self

    def knobs(self) -> BaseModel:
        entry = get_model(self.name)
        return entry.config_cls.model_validate((self.model_extra or {}).get(self.name) or {})


class OptimizerConfig(Strict):
    name: str
    lr: float = Field(gt=0)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)


class EmbeddingOptimizerConfig(OptimizerConfig):
    name: Literal["rowwise_adagrad", "adagrad", "adam", "sgd"] = "rowwise_adagrad"
    lr: float = Field(0.05, gt=0)


class DenseOptimizerConfig(OptimizerConfig):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)


class ScheduleConfig(Strict):
    name: Literal["constant", "linear_decay", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    min_factor: float = Field(0.0, ge=0, le=1, description="final LR as a fraction of the initial (decays)")


class TrainConfig(Strict):
    batch_size: int = Field(4096, ge=1,
                            description="global batch; each process takes batch_size / world_size")
    epochs: int = Field(1, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0 = only at the end)")
    eval_batch_size: int = Field(16384, ge=1, description="global batch for evaluation")
    embedding_optimizer: EmbeddingOptimizerConfig = Field(default_factory=EmbeddingOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = Field(default_factory=DenseOptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    threads: int | None = Field(None, ge=1,
                                description="torch threads per process (default: cores / processes)")
    checkpoint: bool = Field(True, description="checkpoint at each evaluation (for --resume)")
    tensorboard: bool = Field(
        False, description="write TensorBoard scalars to <run>/tensorboard (needs tensorboard)")
    log_every: int = Field(50, ge=1, description="steps between progress-bar loss updates")
    progress: bool = Field(True, description="show the progress bar")
    pipeline: Literal["sparse_dist", "loop"] = Field(
        "sparse_dist", description="how steps run: `sparse_dist` (TorchRec's TrainPipelineSparseDist; a "
        "model fx cannot trace runs the loop) or `loop` (one batch at a time); the same numbers")


class ExperimentConfig(Strict):
    name: str = Field("experiment", description="run name; the run directory is runs/<name>-<timestamp>")
    seed: int = Field(0, description="seeds model init, data order and dropout")
    data: DataConfig = Field(default_factory=DataConfig)
    embedding: EmbeddingSection = Field(default_factory=EmbeddingSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)

    @model_validator(mode="after")
    def _serving_needs_a_checkpoint(self) -> ExperimentConfig:
        if self.embedding.serve_dtype is not None and not self.train.checkpoint:
            raise ValueError(
                "embedding.serve_dtype needs train.checkpoint: true (the served model is the final "
                "checkpoint with its tables quantized)"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- loading ------------------------------------------------------------------------


def _format_validation(err: ValidationError, prefix: str = "", source: str = "", head: bool = True) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(e["loc"]) if p != "")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        where = f"{loc}: " if loc else ""
        quiet = ("extra_forbidden", "missing", "value_error")
        got = f" (got {e['input']!r})" if e["type"] not in quiet else ""
        lines.append(f"  {where}{msg}{got}")
    if not head:
        return "; ".join(line.strip() for line in lines)
    title = f"invalid config{f' {source}' if source else ''}:"
    return "\n".join([title, *lines])


def shipped_configs(kind: str = "run") -> list[str]:
    """Shipped experiment configs (``kind="run"``) or comparison files (``"compare"``)."""
    out = []
    for p in sorted(CONFIG_DIR.glob("*.yaml")):
        is_sweep = "sweep" in (yaml.safe_load(p.read_text()) or {})
        if is_sweep == (kind == "compare"):
            out.append(p.stem)
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {p} not found")
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(f"no config file {name_or_path!r} and no shipped config of that name; "
                      f"shipped: {', '.join(shipped_configs())}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """``["embedding.method=qr", "train.batch_size=1024"]``: values parsed as YAML scalars."""
    data = copy.deepcopy(data)
    items = (overrides.items() if isinstance(overrides, dict)
             else [_split_override(o) for o in overrides or []])
    for key, value in items:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(
    config: str | Path | dict[str, Any] | ExperimentConfig,
    overrides: list[str] | dict[str, Any] | None = None,
) -> ExperimentConfig:
    """A shipped name, a YAML path, a dict or an ExperimentConfig, plus overrides."""
    source = ""
    if isinstance(config, ExperimentConfig):
        data = config.model_dump(mode="json")
    elif isinstance(config, dict):
        data = config
    else:
        path = resolve_config_path(config)
        source = f"({path})"
        data = read_yaml(path)
        data.setdefault("name", path.stem)
        if "sweep" in data:
            raise ConfigError(f"{path} is a comparison file (it has a `sweep:` section): run it with "
                              f"`embtables compare {config}`")
    data = apply_overrides(data, overrides)
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source=source)) from None
