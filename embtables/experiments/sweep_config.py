"""The strict schema of a comparison file: a base experiment plus a ``sweep:`` section.

A comparison file holds the same sections as a run config (``name``, ``seed``, ``data``,
``embedding``, ``model``, ``train``, ``sharding``) and a ``sweep`` section::

    sweep:
      methods:                     # a name, or a mapping with the method's knobs
        - full
        - hash
        - {method: qr, qr: {operation: mult}}
        - {method: unified, label: unified-2t, unified: {num_tables: 2}, set: {train.epochs: 2}}
      budgets: [1, 1/4, 1/16, "4MiB"]   # fractions of the full tables, or bytes
      seeds: [0, 1, 2]
      models: [dlrm, {name: dcn, dcn: {cross_layers: 2}}]       # optional
      datasets: [data/synth-criteo, {path: data/other, label: other}]  # optional
      protocol:                    # optional: tune epochs and each method's LR on validation first
        epochs: [1, 2, 3]
        lr_grid: [0.5x, 1x, 2x]
        budget: 1/16
        init_scale: {grid: [0.5x, 1x, 2x], methods: [tt]}   # optional: then tt's init scale
      quick:                       # what --quick changes
        budgets: [1, 1/16]
        seeds: [0]
        set: {data.max_train_rows: 100000}
        knobs: {optembed: {generations: 2}}

Every (method, budget, seed, model, dataset) combination is one cell: one ordinary run
of the base config with overrides. Unknown keys are errors naming the key path, in
the style of :mod:`embtables.experiments.config`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embtables.datasets.schema import load_schema
from embtables.embeddings import get_method
from embtables.embeddings.budget import DTYPE_BYTES, format_bytes, full_bytes, parse_budget_value, parse_bytes
from embtables.embeddings.spec import features_from_schema
from embtables.experiments.config import (
    RESULT_NEUTRAL,
    ConfigError,
    ExperimentConfig,
    _format_validation,
    apply_overrides,
    load_config,
    read_yaml,
    resolve_config_path,
)
from embtables.experiments.sweep_dir import SKIP_NOT_LISTED

_LABEL_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]*")
# The result-neutral settings a cell id ignores, so a rerun with another --jobs finds the same
# cells. These four are result-neutral too but were hashed from the start: ignoring them now
# would change every existing cell id.
_HASHED_FROM_THE_START = frozenset({"name", "train.log_every", "train.checkpoint", "sharding.timeout_s"})
# Keys added after comparisons were run: at their default a cell hashes as before they existed.
_ADDED_LATER = {("embedding", "init_scale"): 1.0, ("embedding", "serve_dtype"): None}
_HASH_IGNORED = tuple(tuple(k.split(".")) for k in sorted(RESULT_NEUTRAL - _HASHED_FROM_THE_START))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_label(v: str | None) -> str | None:
    if v is not None and not _LABEL_OK.fullmatch(v):
        raise ValueError(f"label {v!r} must be letters, digits, '.', '+' or '-' (it names directories)")
    return v


class MethodEntry(BaseModel):
    """``{method: qr, qr: {operation: mult}, label: qr-mult, set: {...}}``."""

    model_config = ConfigDict(extra="allow")
    method: str
    label: str | None = None
    set: dict[str, Any] = Field(default_factory=dict, description="extra overrides for this method's cells")
    budgets: list[Budget] | None = Field(
        None,
        description="the sweep budgets this method runs at (default: all); a costly method can "
        "run at fewer, which must include the protocol's tuning budget; --quick ignores it",
    )

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return _check_label(v)

    @model_validator(mode="after")
    def _knobs_only_under_own_name(self) -> MethodEntry:
        for key, val in (self.model_extra or {}).items():
            if key != self.method:
                raise ValueError(
                    f"unknown key {key!r}: an entry holds method, label, set, budgets "
                    f"and {self.method}: {{knobs}}"
                )
            if val is not None and not isinstance(val, dict):
                raise ValueError(f"{key} must be a mapping of knobs, got {type(val).__name__}")
        return self

    def knobs(self) -> dict[str, Any]:
        return dict((self.model_extra or {}).get(self.method) or {})


class ModelEntry(BaseModel):
    """``{name: dcn, dcn: {...}, label: dcn-small}``."""

    model_config = ConfigDict(extra="allow")
    name: str
    label: str | None = None

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return _check_label(v)

    @model_validator(mode="after")
    def _knobs_only_under_own_name(self) -> ModelEntry:
        for key in self.model_extra or {}:
            if key != self.name:
                raise ValueError(
                    f"unknown key {key!r}: an entry holds name, label and {self.name}: {{knobs}}"
                )
        return self


class DatasetEntry(_Strict):
    """``{path: data/x, label: x, set: {data.max_train_rows: 1000}}``."""

    path: str
    label: str | None = None
    set: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _label_ok(cls, v: str | None) -> str | None:
        return _check_label(v)


Budget = float | int | str


class QuickSection(_Strict):
    methods: list[MethodEntry | str] | None = None
    budgets: list[Budget] | None = None
    seeds: list[int] | None = None
    models: list[ModelEntry | str] | None = None
    datasets: list[DatasetEntry | str] | None = None
    set: dict[str, Any] = Field(default_factory=dict, description="overrides of the base config")
    knobs: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="method -> knobs merged into its entries"
    )
    protocol: bool = Field(
        False,
        description="apply sweep.protocol's tuning to the quick variant too "
        "(default: no tuning, the base config's epochs and LR)",
    )


_MULT = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*[xX]?\s*")


def parse_multiplier(value: float | int | str, where: str) -> float:
    """``0.5``, ``"0.5x"`` -> 0.5: a factor of the base config's embedding LR."""
    if isinstance(value, bool):
        raise ConfigError(f'{where}: expected a factor such as 0.5 or "2x", got {value!r}')
    m = _MULT.fullmatch(str(value))
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f'{where}: expected a positive factor such as 0.5 or "2x", got {value!r}')
    return float(m.group(1))


class InitScaleSection(_Strict):
    """``sweep.protocol.init_scale``: the methods whose init scale is tuned too."""

    grid: list[float | str] = Field(
        default_factory=lambda: ["0.5x", "1x", "2x"],
        min_length=2,
        description="factors of embedding.init_scale tried per listed method (must include 1x)",
    )
    methods: list[str] = Field(min_length=1, description="labels (or method names) of sweep.methods")


class ProtocolSection(_Strict):
    """The tuning protocol (docs/compare.md, "The protocol")."""

    epochs: list[int] = Field(
        default_factory=lambda: [1, 2, 3],
        min_length=1,
        description="candidate epoch counts, chosen once for `full` on validation",
    )
    lr_grid: list[float | str] = Field(
        default_factory=lambda: ["0.5x", "1x", "2x"],
        min_length=1,
        description="factors of train.embedding_optimizer.lr tried per method",
    )
    budget: Budget = Field("1/16", description="the budget the LR is chosen at (`full`: budget 1)")
    seed: int = Field(0, description="the seed of the tuning cells")
    reference: str = Field("hash", description="method label the paired differences are taken against")
    init_scale: InitScaleSection | None = Field(
        None, description="after the LR, the init scale of these methods on the same cells (optional)"
    )

    @field_validator("epochs")
    @classmethod
    def _epochs_ok(cls, v: list[int]) -> list[int]:
        if any(e < 1 for e in v) or len(set(v)) != len(v):
            raise ValueError(f"epoch candidates must be distinct integers >= 1, got {v}")
        return v


class SweepSection(_Strict):
    methods: list[MethodEntry | str] = Field(min_length=1)
    budgets: list[Budget] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    models: list[ModelEntry | str] | None = None
    datasets: list[DatasetEntry | str] | None = None
    protocol: ProtocolSection | None = None
    quick: QuickSection | None = None


# ---- budgets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetSpec:
    """One budget: a fraction of the full tables (``fraction``) or bytes (``text``)."""

    label: str  # as written: "1", "1/16", "4MiB"
    fraction: Fraction | None
    nbytes_text: str | None = None

    @property
    def slug(self) -> str:
        return self.label.replace("/", "-").replace(" ", "")

    def override(self) -> float | str:
        """The value for ``embedding.budget`` (a float in (0, 1] is a fraction there)."""
        return float(self.fraction) if self.fraction is not None else self.nbytes_text  # type: ignore[return-value]

    def resolve(self, full_bytes: int) -> int:
        if self.fraction is not None:
            return int(float(self.fraction) * full_bytes)
        return parse_bytes(self.nbytes_text or "")

    def sort_key(self, full_bytes: int | None) -> float:
        if self.fraction is not None:
            return -float(self.fraction)
        return -float(self.resolve(0)) / max(full_bytes or 1, 1)


def parse_budget(value: Budget, where: str) -> BudgetSpec:
    """``1``, ``0.25``, ``"1/16"`` -> a fraction; ``4194304``, ``"4MiB"`` -> bytes: the rule
    of :mod:`embtables.embeddings.budget`, the same as ``embedding.budget``'s."""
    try:
        frac, nbytes = parse_budget_value(value)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if frac is not None:
        if isinstance(value, str) and "/" in value:
            return BudgetSpec(f"{frac.numerator}/{frac.denominator}" if frac != 1 else "1", frac)
        return BudgetSpec(_frac_label(frac, float(value)), frac)
    if isinstance(value, str) and not value.strip().replace(".", "", 1).isdigit():
        s = value.strip()
        return BudgetSpec(s.replace(" ", ""), None, s)
    return BudgetSpec(str(nbytes), None, str(nbytes))


def _frac_label(frac: Fraction, value: float) -> str:
    if frac == 1:
        return "1"
    if frac.numerator == 1 and float(frac) == float(value):
        return f"1/{frac.denominator}"
    return repr(float(value))


# ---- cells --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One method / model / dataset choice: its label and the overrides it adds."""

    label: str
    overrides: dict[str, Any]
    name: str = ""  # method or model name, dataset path
    knobs: dict[str, Any] = field(default_factory=dict)
    budgets: tuple[str, ...] | None = None  # labels of the budgets a method runs at (None: all)


@dataclass
class Cell:
    cell_id: str
    method: Variant
    budget: BudgetSpec
    seed: int
    model: Variant | None
    dataset: Variant | None
    overrides: dict[str, Any]
    config: ExperimentConfig
    full_bytes: int | None = None  # the full tables' size fractional budgets refer to (None: data absent)
    skip_reason: str | None = None  # set when the cell is not run by design
    lr_factor: float | None = None  # the protocol's factor of the method's base embedding LR
    init_factor: float | None = None  # the protocol's factor of embedding.init_scale (None: not tuned)
    stage: str = "report"  # the protocol's stage that made it: "epochs", "lr", "init" or "report"

    @property
    def group(self) -> tuple[str, str]:
        """(model label, dataset label): the report's section, the protocol's tuning unit."""
        return (
            self.model.label if self.model else self.config.model.name,
            self.dataset.label if self.dataset else Path(self.config.data.path).name,
        )

    def meta(self) -> dict[str, Any]:
        """What cell.json holds: enough to rebuild the report without the comparison file."""
        model_label, dataset_label = self.group
        return {
            "cell_id": self.cell_id,
            "method_label": self.method.label,
            "method": self.method.name,
            "knobs": self.method.knobs,
            "budget": self.budget.label,
            "budget_fraction": float(self.budget.fraction) if self.budget.fraction is not None else None,
            "seed": self.seed,
            "model_label": model_label,
            "dataset_label": dataset_label,
            "data_path": self.config.data.path,
            "full_bytes": self.full_bytes,
            "budget_bytes": self.budget.resolve(self.full_bytes)
            if self.full_bytes or self.budget.fraction is None
            else None,
            "epochs": self.config.train.epochs,
            "embedding_lr": self.config.train.embedding_optimizer.lr,
            "lr_factor": self.lr_factor,
            "init_scale": self.config.embedding.init_scale,
            "init_factor": self.init_factor,
            "overrides": self.overrides,
            "config_hash": cell_hash(self.config),
        }


@dataclass(frozen=True)
class Protocol:
    """A validated ``sweep.protocol``: what is tuned, where, and the reference method."""

    epochs: tuple[int, ...]
    lr_factors: tuple[float, ...]
    budget: BudgetSpec
    seed: int
    reference: str
    init_factors: tuple[float, ...] = ()
    init_methods: tuple[str, ...] = ()  # labels or method names whose init scale is tuned

    @property
    def lr_grid_text(self) -> list[str]:
        return [f"{f:g}x" for f in self.lr_factors]

    def tunes_init(self, method: Variant) -> bool:
        return method.label in self.init_methods or method.name in self.init_methods

    def to_json(self) -> dict[str, Any]:
        out = {
            "epochs": list(self.epochs),
            "lr_grid": list(self.lr_factors),
            "budget": self.budget.label,
            "seed": self.seed,
            "reference": self.reference,
            "metric": "valid_auc",
        }
        if self.init_methods:
            out["init_scale"] = {"grid": list(self.init_factors), "methods": list(self.init_methods)}
        return out


@dataclass(frozen=True)
class _Axis:
    """One (dataset, model, method) of the plan, with the method's index in sweep.methods."""

    dataset: Variant | None
    model: Variant | None
    method: Variant
    index: int


@dataclass
class SweepPlan:
    name: str
    source: str
    base: ExperimentConfig
    cells: list[Cell]
    budgets: list[BudgetSpec]
    method_labels: list[str]
    quick: bool
    seeds: list[int] = field(default_factory=list)
    protocol: Protocol | None = None
    reference: str = "hash"  # method label of the paired differences (the protocol's, else hash)
    axes: list[_Axis] = field(default_factory=list)
    full_method: Variant | None = None  # the `full` entry the epochs are chosen with
    _sizes: dict[str, int | None] = field(default_factory=dict)

    @property
    def groups(self) -> list[tuple[str, str]]:
        out = [self._group(a.dataset, a.model) for a in self.axes]
        return list(dict.fromkeys(out))

    def _group(self, dvar: Variant | None, mod: Variant | None) -> tuple[str, str]:
        return (
            mod.label if mod else self.base.model.name,
            dvar.label if dvar else Path(self.base.data.path).name,
        )

    def make_cell(
        self,
        axis: _Axis,
        budget: BudgetSpec,
        seed: int,
        *,
        method: Variant | None = None,
        epochs: int | None = None,
        lr_factor: float | None = None,
        init_factor: float | None = None,
    ) -> Cell:
        """One cell: the base config plus the axis' overrides, the budget and the seed; under
        the protocol also its epochs, its factor of the method's embedding LR and, where
        tuned, of its init scale (all in the cell id, so a tuning cell and a reported cell
        with the same settings are one cell; an init factor of 1 leaves the id as it was)."""
        mvar = method or axis.method
        ov: dict[str, Any] = {}
        for v in (axis.dataset, axis.model):
            if v is not None:
                ov.update(v.overrides)
        ov.update(mvar.overrides)
        ov["embedding.budget"] = budget.override()
        ov["seed"] = seed
        ov["name"] = self.name
        where = f"sweep.methods[{axis.index}] ({mvar.label}), budget {budget.label}, seed {seed}"
        cfg = self._load(ov, where, mvar.label)
        parts = [mvar.label, f"b{budget.slug}", f"s{seed}"]
        if axis.model is not None:
            parts.append(f"m{axis.model.label}")
        if axis.dataset is not None:
            parts.append(f"d{axis.dataset.label}")
        if self.protocol is not None:
            if epochs is not None:
                ov["train.epochs"] = epochs
            factor = 1.0 if lr_factor is None else lr_factor
            ov["train.embedding_optimizer.lr"] = cfg.train.embedding_optimizer.lr * factor
            if init_factor is not None and init_factor != 1:
                ov["embedding.init_scale"] = cfg.embedding.init_scale * init_factor
            cfg = self._load(ov, where, mvar.label)
            parts += [f"e{cfg.train.epochs}", f"lr{cfg.train.embedding_optimizer.lr:g}"]
            if cfg.embedding.init_scale != 1:
                parts.append(f"i{cfg.embedding.init_scale:g}")
        cell = Cell(
            f"{'_'.join(parts)}-{cell_hash(cfg)}",
            mvar,
            budget,
            seed,
            axis.model,
            axis.dataset,
            ov,
            cfg,
            lr_factor=lr_factor if self.protocol is not None else None,
            init_factor=init_factor if self.protocol is not None else None,
        )
        cell.full_bytes = _full_size_cached(cfg, self._sizes)
        cell.skip_reason = _skip_reason(cell)
        return cell

    def _load(self, ov: dict[str, Any], where: str, label: str) -> ExperimentConfig:
        try:
            return load_config(self.base.model_dump(mode="json"), ov)
        except ConfigError as e:
            others = [a.method.label for a in self.axes if a.method.label != label]
            hint = (
                "\n  (leave a method out with --methods, e.g. --methods "
                + ",".join(dict.fromkeys(others))
                + ")"
                if "at embedding.method" in str(e)
                else ""
            )
            src = f" {self.source_text}" if self.source_text else ""
            raise ConfigError(
                f"invalid comparison file{src}, cell {where}:\n" + str(e).split("\n", 1)[-1] + hint
            ) from None

    @property
    def source_text(self) -> str:
        return f"({self.source})" if self.source else ""

    def build_cells(
        self,
        epochs: dict[tuple[str, str], int] | None = None,
        lr: dict[tuple[str, str, str], float] | None = None,
        init: dict[tuple[str, str, str], float] | None = None,
    ) -> list[Cell]:
        """Every (dataset, model, method, budget, seed) cell; under the protocol with the
        chosen epochs per group and LR (and init-scale) factor per (group, method label)."""
        cells = []
        for a in self.axes:
            g = self._group(a.dataset, a.model)
            for budget in self.budgets:
                for seed in self.seeds:
                    cells.append(
                        self.make_cell(
                            a,
                            budget,
                            seed,
                            epochs=(epochs or {}).get(g),
                            lr_factor=(lr or {}).get((*g, a.method.label)) if self.protocol else None,
                            init_factor=(init or {}).get((*g, a.method.label)) if self.protocol else None,
                        )
                    )
        return cells

    # ---- the protocol's tuning cells ---------------------------------------------------
    def epoch_cells(self) -> list[Cell]:
        """`full` at budget 1, the tuning seed, each candidate epoch count (base LR)."""
        assert self.protocol is not None and self.full_method is not None
        one = parse_budget(1, "budget")
        out, seen = [], set()
        for a in self.axes:
            g = self._group(a.dataset, a.model)
            if g in seen:
                continue
            seen.add(g)
            for e in self.protocol.epochs:
                c = self.make_cell(
                    a, one, self.protocol.seed, method=self.full_method, epochs=e, lr_factor=1.0
                )
                c.stage = "epochs"
                out.append(c)
        return out

    def lr_factors(self, method: Variant) -> tuple[float, ...]:
        """The LR factors tried for ``method``: the grid, or only 1 for a method without
        tables (``has_tables = False``: its parameters are dense and train with the dense
        optimizer, so the embedding LR cannot change its cells)."""
        assert self.protocol is not None
        return self.protocol.lr_factors if get_method(method.name).has_tables else (1.0,)

    def lr_cells(self, epochs: dict[tuple[str, str], int]) -> list[Cell]:
        """Each method at the tuning budget (budget 1 where the method cannot run there by
        design: `full`), the tuning seed, the chosen epochs, each LR factor."""
        assert self.protocol is not None
        out = []
        for a in self.axes:
            g = self._group(a.dataset, a.model)
            for f in self.lr_factors(a.method):
                c = self.make_cell(a, self.protocol.budget, self.protocol.seed, epochs=epochs[g], lr_factor=f)
                if c.skip_reason is not None:
                    c = self.make_cell(
                        a, parse_budget(1, "budget"), self.protocol.seed, epochs=epochs[g], lr_factor=f
                    )
                c.stage = "lr"
                out.append(c)
        return out

    def init_cells(
        self, epochs: dict[tuple[str, str], int], lr: dict[tuple[str, str, str], float]
    ) -> list[Cell]:
        """The methods of ``protocol.init_scale`` at their LR cell's settings (chosen epochs
        and LR), each init-scale factor; the factor-1 cell is that LR cell."""
        assert self.protocol is not None
        out = []
        for a in self.axes:
            if not self.protocol.tunes_init(a.method):
                continue
            g = self._group(a.dataset, a.model)
            for f in self.protocol.init_factors:
                kw = {"epochs": epochs[g], "lr_factor": lr[(*g, a.method.label)], "init_factor": f}
                c = self.make_cell(a, self.protocol.budget, self.protocol.seed, **kw)
                if c.skip_reason is not None:
                    c = self.make_cell(a, parse_budget(1, "budget"), self.protocol.seed, **kw)
                c.stage = "init"
                out.append(c)
        return out


def cell_hash(cfg: ExperimentConfig) -> str:
    """Short hash of everything in the resolved config that can change a result."""
    d = cfg.model_dump(mode="json")
    for section, key in _HASH_IGNORED:
        d.get(section, {}).pop(key, None)
    for (section, key), default in _ADDED_LATER.items():
        if d.get(section, {}).get(key) == default:
            d[section].pop(key)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-")
    return s or "x"


def _method_variant(
    entry: MethodEntry | str, base: ExperimentConfig, extra_knobs: dict[str, dict[str, Any]]
) -> Variant:
    if isinstance(entry, str):
        entry = MethodEntry(method=entry)
    # --quick's knobs shorten what the entry sets, so they win over it
    knobs = {**base.embedding.knobs(entry.method), **entry.knobs(), **extra_knobs.get(entry.method, {})}
    label = entry.label or "-".join([entry.method, *(_slug(v) for v in entry.knobs().values())])
    ov: dict[str, Any] = {"embedding.method": entry.method, f"embedding.{entry.method}": knobs or None}
    ov.update(entry.set)
    return Variant(label, ov, entry.method, knobs)


def _restrict_budgets(
    entries: list[MethodEntry | str],
    variants: list[Variant],
    budgets: list[BudgetSpec],
    protocol: Protocol | None,
    source: str,
) -> list[Variant]:
    """Apply each entry's ``budgets:``: every one must be a sweep budget, and under the
    protocol the tuning budget must be among them (the method's LR is chosen there)."""
    out = []
    sweep_slugs = {b.slug: b.label for b in budgets}
    for i, (entry, var) in enumerate(zip(entries, variants, strict=True)):
        if isinstance(entry, str) or entry.budgets is None:
            out.append(var)
            continue
        where = f"{source + ' ' if source else ''}sweep.methods[{i}].budgets"
        own = [parse_budget(b, f"{where}[{j}]") for j, b in enumerate(entry.budgets)]
        if not own:
            raise ConfigError(f"{where}: empty; leave the method out, or drop the key for every budget")
        for b in own:
            if b.slug not in sweep_slugs:
                raise ConfigError(
                    f"{where}: {b.label} is not one of sweep.budgets ({', '.join(sweep_slugs.values())})"
                )
        labels = tuple(sweep_slugs[b.slug] for b in own)
        if protocol is not None and protocol.budget.label not in labels and var.name != "full":
            raise ConfigError(
                f"{where}: must include the protocol's tuning budget {protocol.budget.label} "
                "(sweep.protocol.budget), where this method's learning rate is chosen"
            )
        out.append(replace(var, budgets=labels))
    return out


def _model_variant(entry: ModelEntry | str) -> Variant:
    if isinstance(entry, str):
        entry = ModelEntry(name=entry)
    ov: dict[str, Any] = {"model.name": entry.name}
    knobs = (entry.model_extra or {}).get(entry.name)
    if knobs is not None:
        ov[f"model.{entry.name}"] = knobs
    return Variant(entry.label or entry.name, ov, entry.name, dict(knobs or {}))


def _dataset_variant(entry: DatasetEntry | str) -> Variant:
    if isinstance(entry, str):
        entry = DatasetEntry(path=entry)
    return Variant(
        entry.label or _slug(Path(entry.path).name), {"data.path": entry.path, **entry.set}, entry.path
    )


def _validate_sweep(raw: Any, source: str) -> SweepSection:
    if raw is None:
        raise ConfigError(
            f"{source or 'comparison file'}: no `sweep:` section; a comparison file is a run config "
            "plus sweep: {methods: [...], budgets: [...], seeds: [...]}"
        )
    try:
        return SweepSection.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(
            _format_validation(e, prefix="sweep", source=source).replace(
                "invalid config", "invalid comparison file", 1
            )
        ) from None


def load_sweep(
    path_or_data: str | Path | dict[str, Any],
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    quick: bool = False,
    methods: list[str] | None = None,
) -> SweepPlan:
    """Read a comparison file (a path, a shipped name or a dict) into a plan of cells.

    Every cell's config is validated here, before anything trains, so a typo in a
    knob fails in a second with the cell and key named rather than an hour in.
    ``methods`` keeps only the entries whose label or method name is listed.

    Without a protocol ``plan.cells`` are the cells. With one (``sweep.protocol``, and not
    ``--quick`` unless ``sweep.quick.protocol``) the cells depend on what the tuning
    chooses: ``plan.cells`` is empty, and :func:`embtables.experiments.protocol` runs
    ``plan.epoch_cells()``, then ``plan.lr_cells(epochs)``, then ``plan.build_cells(...)``.
    """
    if isinstance(path_or_data, dict):
        data, source = copy.deepcopy(path_or_data), ""
        data.setdefault("name", "compare")
    else:
        path = resolve_config_path(path_or_data)
        data, source = read_yaml(path), f"({path})"
        data.setdefault("name", path.stem)
    sweep = _validate_sweep(data.pop("sweep", None), source)
    name = str(data["name"]) + ("-quick" if quick else "")
    q = sweep.quick or QuickSection()
    if quick and sweep.quick is None:
        raise ConfigError(f"--quick: {source or 'the comparison file'} has no sweep.quick section")
    base_overrides: dict[str, Any] = {}
    if quick:
        base_overrides.update(q.set)
    base_data = apply_overrides(data, base_overrides)
    base_data = apply_overrides(base_data, overrides)
    try:
        base = load_config(base_data)
    except ConfigError as e:
        raise ConfigError(
            str(e).replace(
                "invalid config:", f"invalid comparison file{' ' + source if source else ''}: base config:", 1
            )
        ) from None

    method_entries = q.methods if quick and q.methods is not None else sweep.methods
    budget_values = q.budgets if quick and q.budgets is not None else sweep.budgets
    seeds = q.seeds if quick and q.seeds is not None else sweep.seeds
    model_entries = q.models if quick and q.models is not None else sweep.models
    dataset_entries = q.datasets if quick and q.datasets is not None else sweep.datasets
    extra_knobs = q.knobs if quick else {}

    all_mvars = [_method_variant(m, base, extra_knobs) for m in method_entries]
    _unique([v.label for v in all_mvars], "sweep.methods", "label")
    budgets = [parse_budget(b, f"sweep.budgets[{i}]") for i, b in enumerate(budget_values)]
    _unique([b.slug for b in budgets], "sweep.budgets", "value")
    protocol = None
    if sweep.protocol is not None and (not quick or q.protocol):
        protocol = _protocol(sweep.protocol, base, source)
    if protocol is not None:
        known = {v.label for v in all_mvars} | {v.name for v in all_mvars}
        for i, m in enumerate(protocol.init_methods):
            if m not in known:
                raise ConfigError(
                    f"{source + ' ' if source else ''}sweep.protocol.init_scale.methods[{i}]: {m!r} is not a "
                    f"label or method of sweep.methods ({', '.join(v.label for v in all_mvars)})"
                )
    if not quick:
        all_mvars = _restrict_budgets(method_entries, all_mvars, budgets, protocol, source)
    mvars = list(all_mvars)
    if methods:
        wanted = set(methods)
        unknown = wanted - {v.label for v in mvars} - {v.name for v in mvars}
        if unknown:
            raise ConfigError(
                f"--methods: {sorted(unknown)} not in sweep.methods ({', '.join(v.label for v in mvars)})"
            )
        mvars = [v for v in mvars if v.label in wanted or v.name in wanted]
    _unique([str(s) for s in seeds], "sweep.seeds", "seed")
    models = [_model_variant(m) for m in model_entries] if model_entries else [None]
    datasets = [_dataset_variant(d) for d in dataset_entries] if dataset_entries else [None]
    if model_entries:
        _unique([m.label for m in models if m], "sweep.models", "label")
    if dataset_entries:
        _unique([d.label for d in datasets if d], "sweep.datasets", "label")

    reference = sweep.protocol.reference if sweep.protocol is not None else "hash"
    index = {v.label: i for i, v in enumerate(all_mvars)}
    axes = [_Axis(d, m, v, index[v.label]) for d in datasets for m in models for v in mvars]
    full = next((v for v in all_mvars if v.name == "full"), None) or _method_variant(
        "full", base, extra_knobs
    )
    plan = SweepPlan(
        name,
        source.strip("()"),
        base,
        [],
        budgets,
        [v.label for v in mvars],
        quick,
        list(seeds),
        protocol,
        reference,
        axes,
        full,
    )
    # Validate every cell now (their knobs, the budgets), before anything trains.
    cells = plan.build_cells()
    if protocol is None:
        plan.cells = cells
    return plan


def _protocol(section: ProtocolSection, base: ExperimentConfig, source: str) -> Protocol:
    where = f"{source + ' ' if source else ''}sweep.protocol"
    if not base.data.valid_split:
        raise ConfigError(
            f"{where}: the protocol chooses epochs and learning rates on the validation split, "
            "but data.valid_split is null"
        )
    factors = _factor_grid(section.lr_grid, f"{where}.lr_grid")
    budget = parse_budget(section.budget, f"{where}.budget")
    init_factors: tuple[float, ...] = ()
    init_methods: tuple[str, ...] = ()
    if section.init_scale is not None:
        init_factors = _factor_grid(section.init_scale.grid, f"{where}.init_scale.grid")
        if 1.0 not in init_factors:
            raise ConfigError(
                f"{where}.init_scale.grid: must include 1x (the method's own init, the cell its LR was "
                f"chosen on), got {section.init_scale.grid}"
            )
        init_methods = tuple(section.init_scale.methods)
    return Protocol(tuple(section.epochs), factors, budget, section.seed, section.reference,
                    init_factors, init_methods)


def _factor_grid(values: list[float | str], where: str) -> tuple[float, ...]:
    factors = tuple(parse_multiplier(v, f"{where}[{i}]") for i, v in enumerate(values))
    if len(set(factors)) != len(factors):
        raise ConfigError(f"{where}: duplicate factors {values}")
    return factors


def _unique(values: list[str], where: str, what: str) -> None:
    seen = set()
    for i, v in enumerate(values):
        if v in seen:
            raise ConfigError(f"{where}[{i}]: duplicate {what} {v!r} (give entries distinct `label`s)")
        seen.add(v)


def full_size_of(cfg: ExperimentConfig) -> int | None:
    """Bytes of the full tables the fractional budgets refer to (None if the data is absent)."""
    root = Path(cfg.data.path).expanduser()
    if not (root / "schema.json").exists():
        return None
    return full_bytes(features_from_schema(load_schema(root)), cfg.embedding.dim)


def _full_size_cached(cfg: ExperimentConfig, cache: dict[str, int | None]) -> int | None:
    key = f"{cfg.data.path}|{cfg.embedding.dim}"
    if key not in cache:
        cache[key] = full_size_of(cfg)
    return cache[key]


def _skip_reason(cell: Cell) -> str | None:
    """Cells not run by design: budgets outside a method entry's ``budgets:``, and `full`
    below the full tables' size (it stores every row; no point training a model only to
    learn it does not fit). The report shows the first as "not run", the second as
    "n/a (cannot compress)".
    """
    if cell.method.budgets is not None and cell.budget.label not in cell.method.budgets:
        return f"{SKIP_NOT_LISTED} ({', '.join(cell.method.budgets)})"
    if cell.method.name != "full":
        return None
    if cell.budget.fraction is not None:
        return (
            None
            if cell.budget.fraction >= 1
            else "cannot compress: `full` needs the whole table size (budget 1)"
        )
    if cell.full_bytes is None:
        return None  # data absent: the run itself will say so
    need = cell.full_bytes * DTYPE_BYTES[cell.config.embedding.dtype] // 4
    have = cell.budget.resolve(cell.full_bytes)
    if have < need:
        return f"cannot compress: `full` needs {format_bytes(need)}, budget is {format_bytes(have)}"
    return None
