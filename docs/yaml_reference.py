"""Print the YAML reference tables from the config models (the README embeds the output;
tests/test_readme.py checks every key is documented)."""

from __future__ import annotations

from pydantic import BaseModel


def _type_name(ann) -> str:
    s = getattr(ann, "__name__", None) if getattr(ann, "__args__", None) is None else None
    s = s or str(ann).replace("typing.", "")
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
    from embtables.experiments.config import (
        DataConfig,
        DenseOptimizerConfig,
        EmbeddingOptimizerConfig,
        EmbeddingSection,
        ExperimentConfig,
        ScheduleConfig,
        TrainConfig,
    )
    from embtables.sharding.config import ShardingConfig

    return [(ExperimentConfig, ""), (DataConfig, "data."), (EmbeddingSection, "embedding."), (TrainConfig, "train."),
            (EmbeddingOptimizerConfig, "train.embedding_optimizer."), (DenseOptimizerConfig, "train.dense_optimizer."),
            (ScheduleConfig, "train.schedule."), (ShardingConfig, "sharding.")]


def model_sections() -> list[tuple[type[BaseModel], str]]:
    from embtables.models import get_model, list_models

    return [(get_model(n).config_cls, f"model.{n}.") for n in list_models()]


def main() -> None:
    print("| key | type | default | meaning |\n| --- | --- | --- | --- |")
    print("| `model.name` | str | `'dlrm'` | registered model (`embtables list` shows them); its knobs go under `model.<name>` |")
    for cls, prefix in sections() + model_sections():
        print("\n".join(rows(cls, prefix)))


if __name__ == "__main__":
    main()
