"""Generate docs/reference/config.md from the config models (pydantic) and the registries.

    python docs/yaml_reference.py           # rewrite docs/reference/config.md
    python docs/yaml_reference.py --check   # exit 1 when the page is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import BaseModel

from embtables.embeddings import knobs_model
from embtables.experiments.config import (
    STAGE_SETTINGS,
    DataConfig,
    DenseOptimizerConfig,
    EmbeddingOptimizerConfig,
    EmbeddingSection,
    ExperimentConfig,
    ScheduleConfig,
    TrainConfig,
    method_sections,
)
from embtables.models import get_model, list_models
from embtables.sharding.config import ShardingConfig

PAGE = Path(__file__).resolve().parent / "reference" / "config.md"

HEADER = """# Config reference

Every key of an experiment config (`embtables run CONFIG`), generated from the config
models by `python docs/yaml_reference.py`; a test fails when this page is stale. Unknown
keys are errors that name their path. A comparison file adds a `sweep:` section
([Comparisons](../compare.md)).
"""


def _type_name(ann) -> str:
    s = getattr(ann, "__name__", None) if getattr(ann, "__args__", None) is None else None
    s = s or str(ann).replace("typing.", "").replace("pathlib.", "")
    return s.replace("|", "\\|")


def rows(cls: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, f in cls.model_fields.items():
        d = f.get_default(call_default_factory=True)
        if isinstance(d, BaseModel):
            continue
        out.append(f"| `{prefix}{name}` | {_type_name(f.annotation)} | `{d!r}` | {f.description or ''} |")
    return out


def sections() -> list[tuple[type[BaseModel], str]]:
    return [(ExperimentConfig, ""), (DataConfig, "data."), (EmbeddingSection, "embedding."),
            (TrainConfig, "train."), (EmbeddingOptimizerConfig, "train.embedding_optimizer."),
            (DenseOptimizerConfig, "train.dense_optimizer."), (ScheduleConfig, "train.schedule."),
            (ShardingConfig, "sharding.")]


def model_sections() -> list[tuple[type[BaseModel], str]]:
    return [(get_model(n).config_cls, f"model.{n}.") for n in list_models()]


def _table(lines: list[str]) -> str:
    return "\n".join(["| key | type | default | meaning |", "| --- | --- | --- | --- |", *lines])


def page() -> str:
    out = [HEADER]
    titles = {"": "Top level", "data.": "`data`", "embedding.": "`embedding`", "train.": "`train`",
              "train.embedding_optimizer.": "`train.embedding_optimizer`",
              "train.dense_optimizer.": "`train.dense_optimizer`", "train.schedule.": "`train.schedule`",
              "sharding.": "`sharding` ([Sharding](../sharding.md))"}
    for cls, prefix in sections():
        out += [f"## {titles[prefix]}\n", _table(rows(cls, prefix)), ""]
    out += ["## Embedding method knobs\n",
            "Under `embedding.<method>:`, generated from each method's registered knobs model; what "
            "each method does: [Embedding methods](../methods/index.md). `null` leaves a knob to the "
            "method (most size from `embedding.budget`).\n"]
    for m, section in method_sections().items():
        out.append(f"### `embedding.{m}`\n")
        if not section.model_fields:
            out += ["No knobs.", ""]
            continue
        if STAGE_SETTINGS.find(m) is not None:
            own = ", ".join(f"`{k}`" for k in knobs_model(m).model_fields)
            out.append(f"The module takes {own}; the other keys are read by the stages of its "
                       "experiment.\n")
        out += [_table(rows(section, f"embedding.{m}.")), ""]
    out += ["## `model`\n",
            "`model.name` (default `'dlrm'`) is a registered model (`embtables list` shows them); its "
            "knobs go under `model.<name>:` ([Models](../models.md)).\n"]
    for cls, prefix in model_sections():
        out += [f"### `{prefix[:-1]}`\n", _table(rows(cls, prefix)), ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the page differs from the config models")
    args = ap.parse_args(argv)
    text = page()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE} is stale: run `python docs/yaml_reference.py`", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
