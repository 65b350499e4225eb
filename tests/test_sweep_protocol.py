"""The comparison protocol end to end on tiny data (2 methods, 2 budgets, 3 seeds, a few
steps): epochs chosen for `full` on validation, an LR factor per method, the reported
cells run with both, tuning cells shared with reported cells, an interrupted protocol
resumed without running a cell twice, the report's paired differences equal to an
independent computation, and the quick variant labelled as a smoke test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_overrides
from scipy import stats as sps

from embtables.cli import main as cli_main
from embtables.experiments.config import ConfigError
from embtables.experiments.protocol import choose_epochs, choose_init, choose_lr
from embtables.experiments.sweep import run_sweep
from embtables.experiments.sweep_config import load_sweep

SEEDS = [0, 1, 2]


def _write(tmp: Path, data: Path) -> Path:
    cfg: dict = {"name": "proto"}
    extra = {"data.max_train_rows": 768, "data.max_eval_rows": 1024, "train.checkpoint": False}
    for key, val in tiny_overrides(data, **extra).items():
        node = cfg
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = val
    cfg["sweep"] = {"methods": ["full", "hash"], "budgets": [1, "1/4"], "seeds": SEEDS,
                    "protocol": {"epochs": [1, 2], "lr_grid": ["0.5x", "1x", "2x"], "budget": "1/4"},
                    "quick": {"seeds": [0], "budgets": [1]}}
    path = tmp / "proto.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Stop(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def protocol_run(tiny_synth, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("proto")
    path = _write(tmp, tiny_synth)
    out_dir = tmp / "out"
    seen: list[str] = []

    def stop_in_stage_2(cell, st):
        seen.append(cell.cell_id)
        if len(seen) == 4:  # 2 epoch cells, then 2 of the LR cells
            raise Stop()

    with pytest.raises(Stop):
        run_sweep(load_sweep(path), out_dir, threads=1, progress=False, on_cell_done=stop_in_stage_2)
    interrupted = (
        json.loads((out_dir / "protocol.json").read_text()) if (out_dir / "protocol.json").exists() else None
    )
    plan = load_sweep(path)
    out = run_sweep(plan, out_dir, threads=1, progress=False)
    return path, out_dir, plan, out, seen, interrupted


def _summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def test_epochs_and_lrs_are_the_validation_argmax(protocol_run):
    _, out_dir, plan, out, _, _ = protocol_run
    assert out["protocol_complete"]
    proto = json.loads((out_dir / "protocol.json").read_text())
    (ep,) = proto["epochs"].values()
    cands = {c["epochs"]: _summary(out_dir / c["cell_id"])["valid_auc"] for c in ep["candidates"]}
    assert sorted(cands) == [1, 2]
    assert ep["chosen"] == max(cands, key=lambda e: (cands[e], -e))
    (per_method,) = proto["lr"].values()
    assert set(per_method) == {"full", "hash"}
    for m, rec in per_method.items():
        vals = {c["factor"]: _summary(out_dir / c["cell_id"])["valid_auc"] for c in rec["candidates"]}
        assert sorted(vals) == [0.5, 1.0, 2.0]
        assert rec["chosen_factor"] == max(vals, key=lambda f: (vals[f], -abs(math.log(f)), -f))
        assert rec["chosen_lr"] == pytest.approx(
            0.05 * rec["chosen_factor"]
        )  # the base LR is the default 0.05
        budgets = {c["budget"] for c in rec["candidates"]}
        assert budgets == ({"1"} if m == "full" else {"1/4"})  # `full` cannot run at 1/4: tuned at 1
        for c in rec["candidates"]:
            cfg = yaml.safe_load((out_dir / c["cell_id"] / "config.yaml").read_text())
            assert cfg["train"]["epochs"] == ep["chosen"] and cfg["seed"] == 0
            assert cfg["train"]["embedding_optimizer"]["lr"] == pytest.approx(0.05 * c["factor"])
    # every reported cell trained with its method's chosen LR and the chosen epochs
    for c in plan.cells:
        if c.skip_reason:
            continue
        cfg = yaml.safe_load((out_dir / c.cell_id / "config.yaml").read_text())
        assert cfg["train"]["epochs"] == ep["chosen"]
        assert cfg["train"]["embedding_optimizer"]["lr"] == pytest.approx(
            per_method[c.method.label]["chosen_lr"]
        )
        assert _summary(out_dir / c.cell_id)["steps"] == ep["chosen"] * 3  # 768 rows / 256 per batch


def test_tuning_cells_are_shared_and_an_interrupted_protocol_resumes(protocol_run):
    path, out_dir, plan, out, seen, interrupted = protocol_run
    # stage 1: 2; stage 2: 3 + 3, one of `full`'s is a stage-1 cell; stage 3: 9 (full at 1/4 is
    # not run by design), of which full@1 and hash@1/4 with the chosen LR at seed 0 are stage-2 cells
    dirs = [d for d in out_dir.iterdir() if d.is_dir()]
    trained = [d for d in dirs if (d / "summary.json").exists()]
    assert len(trained) == 2 + 5 + 9 - 3 + 1 == 14
    assert len(dirs) == len(trained) + 3  # + the three skipped cells of `full` at 1/4
    for d in trained:  # nothing ran twice across the interrupted and the second invocation
        assert json.loads((d / "status.json").read_text())["attempts"] == 1
    assert out["ran"] == 14 - 4 and out["already_finished"] >= 4
    assert interrupted is None or not interrupted["complete"]
    again = run_sweep(load_sweep(path), out_dir, threads=1, progress=False, report=False)
    assert again["ran"] == 0


def test_report_pairs_against_hash_with_student_t_intervals(protocol_run):
    _, out_dir, plan, out, _, _ = protocol_run
    df = pd.read_csv(out_dir / "results.csv")
    assert len(df) == len(plan.cells) == 12 and set(df["seed"]) == set(SEEDS)
    md = Path(out["report"]).read_text()
    assert "## Protocol" in md and "## Against the papers" in md
    done = df[df["status"] == "done"]
    a = done[(done["method_label"] == "full") & (done["budget"].astype(str) == "1")].set_index("seed")["auc"]
    b = done[(done["method_label"] == "hash") & (done["budget"].astype(str) == "1")].set_index("seed")["auc"]
    d = (a - b).loc[SEEDS].to_numpy()
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    row = next(ln for ln in md.splitlines() if ln.startswith("| full | ") and "[" in ln)
    assert f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in row
    mean, sd = b.mean(), b.std(ddof=1)
    hash_row = next(ln for ln in md.splitlines() if ln.startswith("| hash | ") and "±" in ln)
    assert f"{mean:.4f} ± {sd:.4f}" in hash_row
    assert "(n = 3 per cell" in md and "3 seeds the intervals are wide" in md


def test_quick_variant_is_labelled_and_not_tuned(protocol_run, tmp_path):
    path, _, _, _, _, _ = protocol_run
    plan = load_sweep(path, quick=True)
    assert plan.protocol is None and len(plan.cells) == 2
    out = run_sweep(plan, tmp_path / "q", threads=1, progress=False)
    md = Path(out["report"]).read_text()
    assert md.splitlines()[0] == "# Comparison `proto-quick` — **quick (1 seed, smoke test)**"
    assert "No tuning (the quick variant)" in md and not (tmp_path / "q" / "protocol.json").exists()


def test_dry_run_lists_the_stages(protocol_run, capsys):
    path, _, _, _, _, _ = protocol_run
    assert cli_main(["compare", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "stage 1/3, epochs: 2 cells" in text and "stage 2/3, learning rates: 6 cells" in text
    assert "stage 3/3, reported: 12 cells (3 not run by design" in text
    assert "at most 14 cells train" in text


def test_choices_from_hand_made_summaries(tmp_path):
    """Ties go to fewer epochs and to the factor nearest 1; a failed candidate is out;
    a method with no finished tuning cell keeps factor 1; a pending cell makes it wait."""
    spec = {
        "name": "t",
        "data": {"path": str(tmp_path / "none")},
        "embedding": {"dim": 8},
        "sweep": {
            "methods": ["full", "hash", {"method": "hash", "label": "h2"}],
            "budgets": [1, "1/4"],
            "protocol": {"epochs": [3, 1, 2], "lr_grid": [0.5, 1, 2], "budget": "1/4"},
        },
    }
    plan = load_sweep(spec)
    ep = plan.epoch_cells()
    s = {c.cell_id: {"valid_auc": {3: 0.71, 1: 0.71, 2: 0.70}[c.config.train.epochs]} for c in ep}
    chosen, rec, waiting = choose_epochs(ep, s, set())
    assert list(chosen.values()) == [1] and not waiting
    lr = plan.lr_cells(chosen)
    by = {(c.method.label, c.lr_factor): c.cell_id for c in lr}
    sums = {
        by[("full", 0.5)]: {"valid_auc": 0.6},
        by[("full", 1.0)]: {"valid_auc": 0.7},
        by[("full", 2.0)]: {"valid_auc": 0.7},  # tie 1x / 2x -> 1x
        by[("hash", 0.5)]: {"valid_auc": 0.8},
        by[("hash", 2.0)]: {"valid_auc": 0.8},
    }  # tie -> 0.5x
    failed = {by[("hash", 1.0)], by[("h2", 0.5)], by[("h2", 1.0)], by[("h2", 2.0)]}
    lrs, rec, waiting = choose_lr(lr, sums, failed)
    g = ep[0].group
    assert lrs == {(*g, "full"): 1.0, (*g, "hash"): 0.5, (*g, "h2"): 1.0} and not waiting
    assert "base LR" in rec[f"{g[0]} on {g[1]}"]["h2"]["note"]
    _, _, waiting = choose_lr(lr, {k: v for k, v in sums.items() if k != by[("full", 2.0)]}, failed)
    assert waiting == [(*g, "full")]
    cells = plan.build_cells(chosen, lrs)
    assert {c.config.train.embedding_optimizer.lr for c in cells if c.method.label == "hash"} == {0.025}
    assert {c.config.train.epochs for c in cells} == {1}


# ---- the init-scale stage ------------------------------------------------------------------
def test_cell_ids_are_those_written_before_init_scale_existed():
    """Golden ids computed by the code before ``embedding.init_scale`` was added: at its
    default the key leaves every cell id (and so every finished sweep directory) as it was."""
    spec = {"name": "t", "data": {"path": "/nonexistent"}, "embedding": {"dim": 8},
            "sweep": {"methods": ["full", "hash", {"method": "tt", "tt": {"rank": 8}}], "budgets": [1, "1/4"],
                      "protocol": {"epochs": [1, 2], "lr_grid": [0.5, 1, 2], "budget": "1/4"}}}
    plan = load_sweep(spec)
    ep = plan.epoch_cells()
    assert [c.cell_id for c in ep] == ["full_b1_s0_e1_lr0.05-a1779fa4", "full_b1_s0_e2_lr0.05-342043ef"]
    lr = {c.cell_id for c in plan.lr_cells({ep[0].group: 1})}
    assert {"hash_b1-4_s0_e1_lr0.05-c20ab0fb", "tt-8_b1-4_s0_e1_lr0.1-e50f192f"} <= lr


def _init_spec(tmp_path, **init) -> dict:
    return {
        "name": "t", "data": {"path": str(tmp_path / "none")}, "embedding": {"dim": 8},
        "sweep": {"methods": ["full", "hash", {"method": "qr", "label": "qr-mult"}], "budgets": [1, "1/4"],
                  "protocol": {"epochs": [1], "lr_grid": [0.5, 1, 2], "budget": "1/4", "init_scale": init}},
    }


def test_a_method_without_tables_is_not_tuned_on_the_embedding_lr(tmp_path):
    """`dhe`'s parameters are dense (the dense optimizer trains them): the embedding LR grid
    would give identical cells, so its LR stage is the 1x cell alone."""
    spec = _init_spec(tmp_path, methods=["dhe"])
    spec["sweep"]["methods"].append("dhe")
    plan = load_sweep(spec)
    epochs = {plan.epoch_cells()[0].group: 1}
    factors = {}
    for c in plan.lr_cells(epochs):
        factors.setdefault(c.method.label, []).append(c.lr_factor)
    grid = [0.5, 1.0, 2.0]
    assert factors == {"full": grid, "hash": grid, "qr-mult": grid, "dhe": [1.0]}


def test_init_scale_section_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep.protocol.init_scale.methods\[0\]: 'nope' is not a label"):
        load_sweep(_init_spec(tmp_path, methods=["nope"]))
    with pytest.raises(ConfigError, match=r"init_scale.grid: must include 1x"):
        load_sweep(_init_spec(tmp_path, methods=["hash"], grid=["0.5x", "2x"]))
    with pytest.raises(ConfigError, match=r"init_scale.grid: duplicate factors"):
        load_sweep(_init_spec(tmp_path, methods=["hash"], grid=[1, "1x"]))
    with pytest.raises(ConfigError, match=r"sweep.protocol.init_scale.methods"):
        load_sweep(_init_spec(tmp_path, grid=[1, 2]))  # methods is required


def test_init_choice_from_hand_made_summaries(tmp_path):
    """The init stage runs at each listed method's chosen LR; its factor-1 cell is that LR
    cell; ties go to the factor nearest 1; the reported cells carry the chosen scale, the
    others none (their ids as before)."""
    plan = load_sweep(_init_spec(tmp_path, methods=["qr-mult", "hash"], grid=["0.25x", "1x", "4x"]))
    epochs = {plan.epoch_cells()[0].group: 1}
    g = plan.epoch_cells()[0].group
    lrs = {(*g, "full"): 1.0, (*g, "hash"): 2.0, (*g, "qr-mult"): 0.5}
    cells = plan.init_cells(epochs, lrs)
    assert sorted({c.method.label for c in cells}) == ["hash", "qr-mult"] and len(cells) == 6
    lr_ids = {c.cell_id for c in plan.lr_cells(epochs)}
    by = {(c.method.label, c.init_factor): c for c in cells}
    assert by[("hash", 1.0)].cell_id in lr_ids and by[("qr-mult", 1.0)].cell_id in lr_ids
    assert by[("hash", 4.0)].config.embedding.init_scale == 4.0
    assert by[("hash", 4.0)].config.train.embedding_optimizer.lr == pytest.approx(0.1)
    assert "_i0.25-" in by[("qr-mult", 0.25)].cell_id
    sums = {
        by[("hash", 0.25)].cell_id: {"valid_auc": 0.7},
        by[("hash", 1.0)].cell_id: {"valid_auc": 0.6},
        by[("hash", 4.0)].cell_id: {"valid_auc": 0.7},  # tie 0.25x / 4x: equally far from 1 -> 0.25x
        by[("qr-mult", 0.25)].cell_id: {"valid_auc": 0.5},
        by[("qr-mult", 1.0)].cell_id: {"valid_auc": 0.6},
        by[("qr-mult", 4.0)].cell_id: {"valid_auc": 0.6},  # tie 1x / 4x -> 1x
    }
    inits, rec, waiting = choose_init(cells, sums, set())
    assert inits == {(*g, "hash"): 0.25, (*g, "qr-mult"): 1.0} and not waiting
    assert rec[f"{g[0]} on {g[1]}"]["hash"]["chosen_init"] == 0.25
    reported = plan.build_cells(epochs, lrs, inits)
    scales = {(c.method.label, c.config.embedding.init_scale) for c in reported}
    assert scales == {("full", 1.0), ("hash", 0.25), ("qr-mult", 1.0)}
    assert all("_i" not in c.cell_id for c in reported if c.method.label != "hash")


def test_init_stage_end_to_end(tiny_synth, tmp_path, capsys):
    """A protocol that tunes `hash`'s init scale on tiny data: the stage trains its two new
    cells, chooses the validation argmax, the reported cells use it, and the report and the
    dry run show the stage."""
    path = _write(tmp_path, tiny_synth)
    cfg = yaml.safe_load(path.read_text())
    cfg["sweep"]["seeds"] = [0, 1]
    cfg["sweep"]["protocol"] = {"epochs": [1], "lr_grid": ["1x"], "budget": "1/4",
                                "init_scale": {"grid": ["0.5x", "1x", "2x"], "methods": ["hash"]}}
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["compare", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "stage 3/4, init scales: 2 cells (hash x factors ['0.5x', '2x']" in text
    out_dir = tmp_path / "out"
    run_sweep(load_sweep(path), out_dir, threads=1, progress=False)
    proto = json.loads((out_dir / "protocol.json").read_text())
    assert proto["complete"]
    assert proto["protocol"]["init_scale"] == {"grid": [0.5, 1.0, 2.0], "methods": ["hash"]}
    (per,) = proto["init_scale"].values()
    vals = {c["factor"]: _summary(out_dir / c["cell_id"])["valid_auc"] for c in per["hash"]["candidates"]}
    assert sorted(vals) == [0.5, 1.0, 2.0]
    best = max(vals, key=lambda f: (vals[f], -abs(math.log(f)), -f))
    assert per["hash"]["chosen_init"] == best
    for c in per["hash"]["candidates"]:
        saved = yaml.safe_load((out_dir / c["cell_id"] / "config.yaml").read_text())
        assert saved["embedding"]["init_scale"] == c["factor"]
    assert len(set(vals.values())) > 1  # the scale changed what trained
    reported = [d for d in out_dir.iterdir() if (d / "cell.json").exists()
                and json.loads((d / "cell.json").read_text())["method_label"] == "hash"
                and json.loads((d / "cell.json").read_text())["budget"] == "1/4"]
    res = pd.read_csv(out_dir / "results.csv")
    rows = res[(res["method_label"] == "hash") & (res["budget"] == "1/4")]
    assert sorted(rows["seed"]) == [0, 1]  # one reported cell per seed: the other scales are tuning only
    assert len(reported) >= 2
    md = (out_dir / "report.md").read_text()
    assert "Init scale (`embedding.init_scale`) of `hash`" in md
