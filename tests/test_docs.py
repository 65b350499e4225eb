"""The README is a front page and docs/ the manual: both must stay true to the code."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from embtables.embeddings import list_methods
from embtables.experiments.config import shipped_configs
from embtables.models import list_models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = {p.relative_to(DOCS).as_posix(): p.read_text() for p in DOCS.rglob("*.md")}
EVERYTHING = README + "\n".join(PAGES.values())


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav:
        for v in (item.values() if isinstance(item, dict) else [item]):
            out += _nav_files(v) if isinstance(v, list) else [v]
    return out


def test_readme_is_a_front_page_with_the_two_commands():
    assert len(README.splitlines()) <= 250
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_links_to_existing_docs():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links
    for link in links:
        assert (ROOT / link).exists(), link


def test_every_page_is_in_the_site_nav_and_every_nav_entry_exists():
    nav = _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == sorted(PAGES), "mkdocs.yml nav and the pages under docs/ differ"


def test_config_reference_is_generated_from_the_config_models():
    sys.path.insert(0, str(DOCS))
    import yaml_reference

    assert yaml_reference.PAGE.read_text() == yaml_reference.page(), (
        "docs/reference/config.md is stale: run `python docs/yaml_reference.py`")
    for cls, prefix in yaml_reference.sections() + yaml_reference.model_sections():
        for name in cls.model_fields:
            if name in ("embedding_optimizer", "dense_optimizer", "schedule", "data", "embedding", "model",
                        "train", "sharding"):
                continue
            assert f"`{prefix}{name}`" in PAGES["reference/config.md"], f"{prefix}{name} not documented"


def test_every_method_model_and_shipped_config_is_documented():
    for m in list_methods():
        assert f"`{m}`" in PAGES["methods/index.md"], m
    for m in list_models():
        assert f"`{m}`" in PAGES["models.md"], m
    for c in shipped_configs() + shipped_configs("compare"):
        assert c in EVERYTHING, c


def test_no_paths_a_user_does_not_have():
    for name, text in {"README.md": README, **PAGES}.items():
        assert "../shared" not in text, name
        assert "DESIGN.md" not in text, name
