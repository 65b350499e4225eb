"""Comparison files: budgets, strict schema, stable cell ids, --quick, `full` by design,
and a report built from hand-written cell directories (no training)."""

from __future__ import annotations

import json
import re
from fractions import Fraction
from pathlib import Path

import pandas as pd
import pytest

from embtables.experiments.config import CONFIG_DIR, ConfigError, load_config
from embtables.experiments.report import build_report
from embtables.experiments.sweep_config import cell_hash, load_sweep, parse_budget


def _cmp(tmp_path: Path, **sweep) -> dict:
    data = tmp_path / "no-data"  # absent data: planning must not need it
    return {"name": "t", "data": {"path": str(data)}, "embedding": {"dim": 8},
            "sweep": {"methods": ["full", "hash"], "budgets": [1, "1/4"], **sweep}}


def test_budgets_fraction_or_bytes():
    assert parse_budget(1, "b").fraction == 1 and parse_budget(1, "b").label == "1"
    assert parse_budget("1/16", "b").fraction == Fraction(1, 16) and parse_budget("1/16", "b").slug == "1-16"
    assert parse_budget(0.25, "b").fraction == Fraction(1, 4) and parse_budget(0.25, "b").label == "1/4"
    assert parse_budget(0.3, "b").override() == 0.3
    four = parse_budget("4MiB", "b")
    assert four.fraction is None and four.resolve(10**9) == 4 * 2**20 and four.override() == "4MiB"
    assert parse_budget(4096, "b").resolve(10**9) == 4096  # an integer > 1 is bytes
    assert parse_budget("1/16", "b").resolve(1600) == 100
    for bad in (0, -1, "3/2", "lots", 2.5, True):
        with pytest.raises(ConfigError, match="b:"):
            parse_budget(bad, "b")


def test_unknown_keys_name_their_path(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep\.bogus: unknown key"):
        load_sweep(_cmp(tmp_path, bogus=1))
    with pytest.raises(ConfigError, match=r"sweep\.quick\.budget: unknown key"):
        load_sweep(_cmp(tmp_path, quick={"budget": [1]}))
    with pytest.raises(ConfigError, match=r"sweep\.methods\.1\..*unknown key 'qr'"):
        load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "qr": {"operation": "mult"}}]))
    # a knob the method does not have: the cell and the config key are named
    with pytest.raises(
        ConfigError, match=r"(?s)sweep\.methods\[1\] \(hash-3\).*unknown knob.*embedding\.hash"
    ):
        load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "hash": {"bucketz": 3}}]))
    with pytest.raises(ConfigError, match=r"(?s)unknown method 'nope'.*--methods"):
        load_sweep(_cmp(tmp_path, methods=["full", "nope"]))
    with pytest.raises(ConfigError, match="duplicate label 'hash'"):
        load_sweep(_cmp(tmp_path, methods=["hash", "hash"]))
    with pytest.raises(ConfigError, match=r"train\.batch_sizes: unknown key"):
        load_sweep({**_cmp(tmp_path), "train": {"batch_sizes": 3}})
    with pytest.raises(ConfigError, match="no `sweep:` section"):
        load_sweep({"name": "x"})


def test_cells_are_readable_stable_and_full_is_skipped_below_1(tmp_path):
    spec = _cmp(tmp_path, methods=["full", {"method": "qr", "qr": {"operation": "mult"}}], seeds=[0, 3])
    plan = load_sweep(spec)
    ids = [c.cell_id for c in plan.cells]
    assert len(ids) == len(set(ids)) == 2 * 2 * 2
    assert re.fullmatch(r"qr-mult_b1-4_s3-[0-9a-f]{8}", ids[-1]), ids
    assert ids == [c.cell_id for c in load_sweep(spec).cells]  # stable
    # threads never change a result, so another --jobs finds the same cells; an LR does
    assert ids == [c.cell_id for c in load_sweep(spec, ["train.threads=7"]).cells]
    assert ids != [c.cell_id for c in load_sweep(spec, ["train.dense_optimizer.lr=0.01"]).cells]
    skipped = {c.cell_id.split("-")[0] for c in plan.cells if c.skip_reason}
    assert skipped == {"full_b1"} and all(
        "cannot compress" in c.skip_reason for c in plan.cells if c.skip_reason
    )
    by_id = {c.cell_id: c for c in plan.cells}
    cfg = by_id[ids[-1]].config
    assert cfg.embedding.method == "qr" and cfg.embedding.knobs() == {"operation": "mult"}
    assert cfg.embedding.budget == 0.25 and cfg.seed == 3 and cfg.embedding.dim == 8
    assert [c.cell_id for c in load_sweep(spec, methods=["qr-mult"]).cells] == ids[4:]


def test_quick_section(tmp_path):
    spec = _cmp(
        tmp_path,
        seeds=[0, 1, 2],
        quick={
            "budgets": [1],
            "seeds": [5],
            "set": {"data.max_train_rows": 99},
            "knobs": {"hash": {"rows": 64}},
        },
    )
    full = load_sweep(spec)
    quick = load_sweep(spec, quick=True)
    assert quick.name == "t-quick" and full.name == "t" and len(full.cells) == 12
    assert [(c.method.label, c.budget.label, c.seed) for c in quick.cells] == [
        ("full", "1", 5),
        ("hash", "1", 5),
    ]
    assert all(c.config.data.max_train_rows == 99 for c in quick.cells)
    assert quick.cells[1].config.embedding.knobs() == {"rows": 64}
    # quick knobs shorten what an entry sets: they win over the entry's own
    entry = {"method": "hash", "hash": {"rows": 500}}
    own = _cmp(tmp_path, methods=[entry], quick={"knobs": {"hash": {"rows": 64}}})
    assert load_sweep(own, quick=True).cells[0].config.embedding.knobs() == {"rows": 64}
    assert load_sweep(own).cells[0].config.embedding.knobs() == {"rows": 500}
    with pytest.raises(ConfigError, match="no sweep.quick"):
        load_sweep(_cmp(tmp_path), quick=True)


def test_a_method_entry_can_run_at_fewer_budgets(tmp_path):
    qr = {"method": "qr", "budgets": ["1/4"]}
    spec = _cmp(tmp_path, methods=["full", "hash", qr], budgets=[1, "1/4", 0.0625])
    plan = load_sweep(spec)
    skips = {(c.method.label, c.budget.label): c.skip_reason for c in plan.cells}
    assert skips[("qr", "1/4")] is None and skips[("hash", "1")] is None and skips[("hash", "1/16")] is None
    for b in ("1", "1/16"):
        assert skips[("qr", b)].startswith("not run: not one of this method's budgets (1/4)")
    assert "cannot compress" in skips[("full", "1/16")]
    # the label and the cell ids of the budgets it keeps do not depend on the key
    plain = load_sweep(_cmp(tmp_path, methods=["full", "hash", "qr"], budgets=[1, "1/4", 0.0625]))
    assert {c.cell_id for c in plain.cells} == {c.cell_id for c in plan.cells}
    # 0.25 and "1/4" are one budget
    kept = load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "budgets": [0.25]}]))
    assert [c.budget.label for c in kept.cells if c.method.label == "hash" and not c.skip_reason] == ["1/4"]
    # --quick ignores it: a smoke test runs every method at its own budgets
    quick = load_sweep({**spec, "sweep": {**spec["sweep"], "quick": {"budgets": [1]}}}, quick=True)
    assert all(c.skip_reason is None for c in quick.cells if c.method.label == "qr")
    not_one = r"sweep\.methods\[1\]\.budgets: 1/8 is not one of sweep\.budgets \(1, 1/4\)"
    with pytest.raises(ConfigError, match=not_one):
        load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "budgets": ["1/8"]}]))
    with pytest.raises(ConfigError, match=r"sweep\.methods\[1\]\.budgets: empty"):
        load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "budgets": []}]))
    with pytest.raises(ConfigError, match=r"sweep\.methods\[1\]\.budgets\[0\]"):
        load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "budgets": ["lots"]}]))
    proto = {"epochs": [1], "lr_grid": ["1x"], "budget": "1/4"}
    with pytest.raises(ConfigError, match=r"must include the protocol's tuning budget 1/4"):
        load_sweep(_cmp(tmp_path, methods=["full", {"method": "hash", "budgets": [1]}], protocol=proto))
    # under the protocol the method's LR is tuned at the tuning budget it keeps
    hash_q = {"method": "hash", "budgets": ["1/4"]}
    tuned = load_sweep(_cmp(tmp_path, methods=["full", hash_q], protocol=proto))
    lr_cells = tuned.lr_cells({tuned.groups[0]: 1})
    assert [c.budget.label for c in lr_cells if c.method.label == "hash"] == ["1/4"]


# Every shipped comparison file (a config with a `sweep:` section).
COMPARISONS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if "\nsweep:" in p.read_text())


def test_the_comparison_list_is_not_empty():
    assert {"budget-synth-criteo", "budget-amazon-beauty", "dare-din-beauty"} <= set(COMPARISONS)


@pytest.mark.parametrize("name", COMPARISONS)
def test_shipped_comparisons_parse(name):
    from embtables.embeddings import list_methods
    from embtables.models import list_models

    raw = __import__("yaml").safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    if raw["model"]["name"] not in list_models():
        pytest.skip(f"model {raw['model']['name']!r} is not registered in this tree yet")
    wanted = [m if isinstance(m, str) else m["method"] for m in raw["sweep"]["methods"]]
    have = [m for m in wanted if m in list_methods()]
    for quick in (False, True) if "quick" in raw["sweep"] else (False,):
        plan = load_sweep(name, quick=quick, methods=have)
        # under the protocol the cells wait for the tuning; the grid itself is validated
        assert (plan.protocol is not None) == ("protocol" in raw["sweep"] and not quick)
        cells = plan.cells if plan.protocol is None else plan.build_cells()
        assert bool(plan.cells) == (plan.protocol is None)
        assert cells and {c.method.name for c in cells} == set(have)
        assert {c.budget.label for c in cells} <= {str(b) for b in raw["sweep"]["budgets"]}
        if plan.protocol is not None:
            assert [c.config.train.epochs for c in plan.epoch_cells()] == raw["sweep"]["protocol"]["epochs"]


def _fake_cell(
    root: Path,
    cid: str,
    method: str,
    budget: str,
    seed: int,
    *,
    auc=None,
    status="done",
    err=None,
    min_bytes=None,
    nbytes=1000,
    label=None,
    extra=None,
) -> None:
    d = root / cid
    d.mkdir(parents=True)
    meta = {
        "cell_id": cid,
        "method_label": label or method,
        "method": method,
        "knobs": {},
        "budget": budget,
        "budget_fraction": float(Fraction(budget)),
        "budget_bytes": int(4000 * Fraction(budget)),
        "full_bytes": 4000,
        "seed": seed,
        "model_label": "dlrm",
        "dataset_label": "tiny",
    }
    (d / "cell.json").write_text(json.dumps(meta))
    st = {"status": status, "attempts": 1}
    if err:
        st.update(error=err, error_type=err.split(":")[0])
    if min_bytes:
        st["min_bytes"] = min_bytes
    (d / "status.json").write_text(json.dumps(st))
    if status == "done":
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "method": method,
                    "auc": auc,
                    "oracle_auc": 0.8,
                    "embedding_bytes": nbytes,
                    "train_seconds": 2.0 + seed,
                    "eval_split": "test",
                    "seed": seed,
                    "versions": {"torch": "x"},
                    **(extra or {}),
                }
            )
        )


def test_report_from_hand_made_cells(tmp_path):
    """Means, sample stds and the best mark checked against numbers computed by hand."""
    r = tmp_path / "sweep"
    _fake_cell(r, "full_b1_s0", "full", "1", 0, auc=0.70, nbytes=4000)
    _fake_cell(r, "full_b1_s1", "full", "1", 1, auc=0.72, nbytes=4000)
    _fake_cell(r, "full_b1-4_s0", "full", "1/4", 0, status="skipped", err="cannot compress: `full` ...")
    _fake_cell(r, "full_b1-4_s1", "full", "1/4", 1, status="skipped", err="cannot compress: `full` ...")
    _fake_cell(r, "hash_b1_s0", "hash", "1", 0, auc=0.70, nbytes=4000)
    _fake_cell(r, "hash_b1_s1", "hash", "1", 1, auc=0.74, nbytes=4000)
    _fake_cell(r, "hash_b1-4_s0", "hash", "1/4", 0, auc=0.65, nbytes=1000)
    _fake_cell(r, "hash_b1-4_s1", "hash", "1/4", 1, status="failed", err="TrainingDiverged: loss is nan")
    out = build_report(r)
    md = Path(out["report"]).read_text()
    # hash at 1: mean 0.72, sample std sqrt(((0.02)^2 + (0.02)^2) / 1) = 0.0283; best at budget 1 (0.72 tie)
    assert "| full | **0.7100 ± 0.0141** | n/a (cannot compress) |" not in md  # 0.71 < 0.72: not best
    # full - hash per seed: 0.00, -0.02 -> mean -0.01, sd 0.01414, t(0.975, 1) = 12.706:
    # half-width 12.706 * 0.01414 / sqrt(2) = 0.1271, an interval holding 0: a tie (≈)
    assert "| full | 0.7100 ± 0.0141 ≈ | n/a (cannot compress) |" in md
    assert "| full | -0.0100 [-0.1371, +0.1171] | — |" in md  # the paired table against hash
    assert "| 1 | hash | full (-0.0100 [-0.1371, +0.1171]) | — | — |" in md  # the ranking
    assert "| hash | **0.7200 ± 0.0283** | **0.6500** (1/2 seeds) |" in md
    assert "TrainingDiverged: loss is nan" in md and "oracle AUC (true click probabilities): 0.8000" in md
    df = pd.read_csv(out["results_csv"])
    assert len(df) == 8 and df.set_index("cell_id").loc["hash_b1-4_s1", "status"] == "failed"
    assert df.set_index("cell_id").loc["full_b1-4_s0", "status"] == "skipped"
    assert pd.read_parquet(out["results"]).shape == df.shape
    # without sweep.json the cells are found by their cell.json
    assert not (r / "sweep.json").exists() and len(out["plots"]) == 2


def test_report_shows_what_rows_trained_for_serving_held(tmp_path):
    r = tmp_path / "sweep"
    _fake_cell(r, "hash_b1-4_s0", "hash", "1/4", 0, auc=0.70, nbytes=1000)
    for s, (auc, before) in enumerate([(0.71, 0.712), (0.73, 0.734)]):
        serving = {"dtype": "int4", "auc": auc, "trained": {"auc": before, "embedding_bytes": 4096}}
        extra = {"training_embedding_bytes": 4096, "optimizer_state_bytes": 2048, "serving": serving}
        _fake_cell(r, f"hash-int4_b1-4_s{s}", "hash", "1/4", s, auc=auc, nbytes=990, label="hash-int4",
                   extra=extra)
    md = Path(build_report(r)["report"]).read_text()
    assert "Rows trained for serving (`embedding.serve_dtype`)" in md
    assert "| hash-int4 | int4 | 4.00 KiB + 2.00 KiB optimizer; AUC 0.7230 before |" in md
    assert "| hash-int4 | **0.7200 ± 0.0141** |" in md  # the headline is the served AUC


def test_report_says_why_a_cell_was_not_run(tmp_path):
    r = tmp_path / "sweep"
    _fake_cell(r, "full_b1_s0", "full", "1", 0, auc=0.70, nbytes=4000)
    _fake_cell(r, "full_b1-4_s0", "full", "1/4", 0, status="skipped", err="cannot compress: `full` ...")
    err = "not run: not one of this method's budgets (1/4)"
    _fake_cell(r, "dhe_b1_s0", "dhe", "1", 0, status="skipped", err=err)
    _fake_cell(r, "dhe_b1-4_s0", "dhe", "1/4", 0, auc=0.66, nbytes=900)
    md = Path(build_report(r)["report"]).read_text()
    assert "| full | **0.7000** | n/a (cannot compress) |" in md
    assert "| dhe | not run (method's budgets) | **0.6600** |" in md


@pytest.mark.parametrize("name", ["budget-synth-criteo", "budget-ml100k", "budget-amazon-beauty"])
def test_shipped_comparisons_dry_run_the_protocol(name, capsys):
    from embtables.cli import main as cli_main

    raw = __import__("yaml").safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    from embtables.embeddings import list_methods

    have = [m if isinstance(m, str) else m["method"] for m in raw["sweep"]["methods"]]
    keep = ",".join(dict.fromkeys(m for m in have if m in list_methods()))
    assert cli_main(["compare", name, "--dry-run", "--methods", keep]) == 0
    text = capsys.readouterr().out
    n_epochs = len(raw["sweep"]["protocol"]["epochs"])
    n = 4 if raw["sweep"]["protocol"].get("init_scale") else 3
    assert f"stage 1/{n}, epochs: {n_epochs} cells" in text and f"stage {n}/{n}, reported:" in text
    assert ("init scales:" in text) == (n == 4)
    assert cli_main(["compare", name, "--dry-run", "--quick", "--methods", keep]) == 0
    assert "(quick: 1 seed, smoke test)" in capsys.readouterr().out


def test_cell_ids_ignore_settings_that_cannot_change_a_result():
    base = load_config("quickstart")
    same = load_config("quickstart", overrides={"train.pipeline": "loop", "train.threads": 1})
    other = load_config("quickstart", overrides={"train.embedding_optimizer.lr": 0.07})
    assert cell_hash(base) == cell_hash(same)  # the loop and the pipeline give the same numbers
    assert cell_hash(base) != cell_hash(other)
