"""The README is the user's manual: it must stay true to the code."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_built_from_its_parts():
    sys.path.insert(0, str(ROOT / "docs"))
    import build_readme

    assert build_readme.build() == README, "README.md is stale: run `python docs/build_readme.py`"


def test_the_two_commands_are_there_and_ci_runs_the_test_one():
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_config_key_is_documented():
    sys.path.insert(0, str(ROOT / "docs"))
    import yaml_reference

    for cls, prefix in yaml_reference.sections() + yaml_reference.model_sections():
        for name in cls.model_fields:
            if name in ("embedding_optimizer", "dense_optimizer", "schedule", "data", "embedding", "model",
                        "train", "sharding"):
                continue
            assert f"`{prefix}{name}`" in README, f"{prefix}{name} missing from the README"


def test_every_method_model_and_shipped_config_is_mentioned():
    from embtables.embeddings import list_methods
    from embtables.experiments.config import shipped_configs
    from embtables.models import list_models

    for m in list_methods():
        assert f"`{m}`" in README, m
    for m in list_models():
        assert f"`{m}`" in README, m
    for c in shipped_configs() + shipped_configs("compare"):
        assert c in README, c
