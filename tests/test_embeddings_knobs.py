"""Typed knobs, the generic registry and TableSpec: each method's knobs model is the one
place a knob is refused (with its key path), and the constructor gets exactly its fields."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import pytest
import torch

from embtables.embeddings import FeatureSpec, TableSpec, build, knobs_model, list_methods, plan
from embtables.embeddings.registry import METHODS, Knobs
from embtables.registry import Registry

FEATS = [FeatureSpec("a", 1000), FeatureSpec("b", 50), FeatureSpec("c", 3000)]
BASE = {"features", "dim", "budget_bytes", "dtype", "sequence", "device", "weighted"}


@pytest.mark.parametrize("method", list_methods())
def test_knobs_model_is_strict_and_matches_the_constructor(method):
    model = knobs_model(method)
    assert issubclass(model, Knobs) and model.model_config["extra"] == "forbid"
    params = inspect.signature(METHODS.get(method).cls.__init__).parameters
    ctor = {n: p.default for n, p in params.items() if n != "self" and n not in BASE}
    # Exactly the model's fields, with the model's defaults: build passes every field.
    assert ctor == {n: f.get_default() for n, f in model.model_fields.items()}


def test_optembed_constructor_takes_no_search_settings():
    assert list(knobs_model("optembed").model_fields) == ["artefact", "alpha", "dim_step"]
    with pytest.raises(ValueError, match=r"unknown knob\(s\) \['population'\] at embedding\.optembed"):
        build(FEATS, method="optembed", dim=8, population=4)


@pytest.mark.parametrize(("method", "knobs", "key"), [
    ("qr", {"operation": "multiply"}, "embedding.qr.operation: Input should be 'mult', 'add' or 'concat'"),
    ("qr", {"partitions": 1}, "embedding.qr.partitions: Input should be greater than or equal to 2 (got 1)"),
    ("mch", {"eviction_policy": "fifo"}, "embedding.mch.eviction_policy: Input should be 'lfu' or 'lru'"),
    ("hash", {"rows": "many"}, "embedding.hash.rows:"),
    ("hybrid", {"hot_fraction": 1.0}, "embedding.hybrid.hot_fraction: Input should be less than 1"),
    ("optembed", {"dim_step": 6}, "embedding.optembed.dim_step: must be a multiple of 4"),
])
def test_wrong_values_are_refused_with_the_key_path(method, knobs, key):
    with pytest.raises(ValueError) as e:
        build(FEATS, method=method, dim=16, **knobs)
    assert key in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:  # the sizing function is guarded by the same model
        plan(FEATS, method, dim=16, **knobs)
    assert key in str(e.value), str(e.value)


def test_knob_values_are_validated_before_sizing():
    # "4" from a --knob flag or a YAML string is the int 4 the sizing function expects.
    assert plan(FEATS, "qr", dim=16, m="4").radices == plan(FEATS, "qr", dim=16, m=4).radices
    # The sizing function gets only the knobs it takes (mch sizes from rows alone).
    assert plan(FEATS, "mch", dim=8, rows=64, eviction_policy="lru").rows == (64, 51, 64)


def test_registry_refuses_a_second_entry_and_lists_valid_names():
    reg: Registry[int] = Registry("widget", "widgets")
    reg.add("a", 1)
    reg.add("a", 1)  # the same entry again (a module imported twice) is fine
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.add("a", 2)
    with pytest.raises(ValueError, match=r"unknown widget 'b' at x\.kind; valid widgets: a"):
        reg.get("b", key="x.kind")
    assert reg.find("b") is None and "a" in reg and reg.names() == ["a"]


def test_registry_imports_its_builtins_on_first_lookup(tmp_path, monkeypatch):
    reg: Registry[int] = Registry("probe", builtins=("knobs_probe_builtin",))
    monkeypatch.setitem(sys.modules, "knobs_probe_target", types.SimpleNamespace(REG=reg))
    (tmp_path / "knobs_probe_builtin.py").write_text("import knobs_probe_target\n"
                                                     "knobs_probe_target.REG.add('x', 42)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "knobs_probe_builtin", raising=False)
    assert "knobs_probe_builtin" not in sys.modules  # nothing imported until the first lookup
    assert reg.get("x") == 42 and reg.names() == ["x"]


def test_table_spec_is_frozen_and_builds_the_tables():
    spec = TableSpec("t", 7, 4, ["x"])
    assert spec.features == ("x",) and spec.init is None and spec.pooling is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rows = 8  # type: ignore[misc]
    torch.manual_seed(0)
    m = build([FeatureSpec("x", 7)], method="full", dim=4)
    (cfg,) = m.table_configs()
    assert (cfg.name, cfg.num_embeddings, cfg.embedding_dim, cfg.feature_names) == ("t_x", 7, 4, ["x"])
