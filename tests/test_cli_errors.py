"""Bad CLI input and escaping errors: one budget rule everywhere, every numeric flag
checked with a message naming it, and the CLI's error handler (torch's BaseException
CheckpointException, a full disk, errors that are not user mistakes)."""

from __future__ import annotations

import errno
import traceback
from fractions import Fraction

import pytest

from embtables import cli
from embtables.datasets.synth import generate_synth
from embtables.embeddings.budget import full_bytes, parse_budget_value, resolve_budget
from embtables.embeddings.spec import FeatureSpec
from embtables.experiments.config import ConfigError, load_config
from embtables.experiments.sweep_config import parse_budget

FEATS = [FeatureSpec("a", 100), FeatureSpec("b", 60)]
FULL = full_bytes(FEATS, 8)


# ---- budgets: one meaning everywhere -----------------------------------------------------


@pytest.mark.parametrize("spelling", [1, 1.0, "1", "1.0", "1/1", "2/2"])
def test_one_is_the_whole_size_in_every_spelling(spelling):
    assert resolve_budget(spelling, FEATS, 8) == FULL  # was 1 byte for the int 1 and the string "1"
    assert parse_budget(spelling, "sweep.budgets[0]").fraction == 1  # a comparison's budgets list
    cell_value = parse_budget(spelling, "b").override()
    assert resolve_budget(cell_value, FEATS, 8) == FULL  # what a comparison hands a run config


def test_run_config_and_set_read_budgets_like_a_comparison():
    for value in ("1", "0.25", "1/4", "4096", "4MiB"):
        cfg = load_config("quickstart", [f"embedding.budget={value}"])
        assert resolve_budget(cfg.embedding.budget, FEATS, 8) == parse_budget(value, "b").resolve(FULL)
    assert resolve_budget(4096, FEATS, 8) == 4096 and resolve_budget("4MiB", FEATS, 8) == 4 * 2**20
    assert parse_budget_value("1/16") == (Fraction(1, 16), None)


@pytest.mark.parametrize("bad", ["1/0", "0/4", "3/2", "0", "-1", "1.5", "lots", "0B", True])
def test_bad_budgets_are_refused_everywhere_stating_the_rule(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]") as e:
        resolve_budget(bad, FEATS, 8)
    assert "ZeroDivision" not in type(e.value).__name__
    with pytest.raises(ConfigError, match="sweep.budgets"):
        parse_budget(bad, "sweep.budgets[0]")
    if bad is not True:
        with pytest.raises(ConfigError, match=r"embedding\.budget: .*\(0, 1\]"):
            load_config("quickstart", [f"embedding.budget={bad}"])


def test_config_dim_not_a_multiple_of_4_names_the_key():
    with pytest.raises(ConfigError, match=r"embedding\.dim: must be a multiple of 4"):
        load_config("quickstart", ["embedding.dim=6"])


# ---- numeric flags -----------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "flag"), [
    (["run", "quickstart", "--nproc", "0"], "--nproc"),
    (["size", "DATA", "--method", "hash", "--budget", "1/0"], "--budget"),
    (["size", "DATA", "--method", "hash", "--dim", "6"], "--dim"),
    (["plan", "quickstart", "--world-size", "0"], "--world-size"),
    (["plan", "quickstart", "--hbm", "lots"], "--hbm"),
    (["compare", "x", "--jobs", "0"], "--jobs"),
    (["compare", "x", "--threads", "-2"], "--threads"),
    (["data", "synth", "--out", "o", "--rows", "0"], "--rows"),
    (["data", "criteo", "x", "--out", "o", "--block-mb", "0"], "--block-mb"),
    (["data", "criteo", "x", "--out", "o", "--workers", "0"], "--workers"),
    (["data", "criteo", "x", "--out", "o", "--min-count", "0"], "--min-count"),
    (["data", "behavior", "x", "--out", "o", "--max-len", "0"], "--max-len"),
    (["data", "behavior", "x", "--out", "o", "--valid-frac", "1.5"], "--valid-frac"),
    (["data", "behavior", "x", "--out", "o", "--eval-negatives", "0"], "--eval-negatives"),
    (["data", "movielens", "x", "--out", "o", "--seed", "-1"], "--seed"),
    (["data", "synth-seq", "--out", "o", "--items", "nan"], "--items"),
])
def test_numeric_flags_are_checked_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and "Traceback" not in err


def test_size_budget_1_is_the_full_size(tmp_path, capsys):
    generate_synth(tmp_path / "d", 300, seed=0, scale=0.001, progress=False)
    assert cli.main(["size", str(tmp_path / "d"), "--method", "hash", "--dim", "8", "--budget", "1"]) == 0
    whole = capsys.readouterr().out
    assert cli.main(["size", str(tmp_path / "d"), "--method", "hash", "--dim", "8", "--budget", "1/1"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == whole.splitlines()[1:]
    assert "BudgetTooSmall" not in whole


# ---- the error handler -------------------------------------------------------------------


def _failing_list(exc: BaseException, monkeypatch):
    def boom(args):
        raise exc

    monkeypatch.setattr(cli, "_cmd_list", boom)


def test_torch_checkpoint_exception_is_one_line_not_a_traceback(monkeypatch, capsys):
    from torch.distributed.checkpoint.api import CheckpointException

    inner = RuntimeError("size mismatch for tables.t0.weight: copying a param of shape [10, 8] into [12, 8]")
    _failing_list(CheckpointException("load failed", {0: (inner, traceback.extract_stack())}), monkeypatch)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("error: checkpoint rank 0: RuntimeError: size mismatch for tables.t0")
    assert "Traceback" not in err and len(err.splitlines()) <= 2


def test_full_disk_names_the_file(monkeypatch, capsys, tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    path = tmp_path / "run" / "checkpoints" / "step-4" / "__0_0.distcp"
    full = OSError(errno.ENOSPC, "No space left on device", str(path))
    _failing_list(CheckpointException("save failed", {0: (full, traceback.extract_stack())}), monkeypatch)
    assert cli.main(["list"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"error: no space left on device while writing {path}"


def test_an_internal_error_is_one_line_plus_the_log_path(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    _failing_list(ZeroDivisionError("division by zero"), monkeypatch)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: division by zero" and len(err) == 2
    log = err[1].split("full traceback in ")[1].split(";")[0]
    assert str(tmp_path) in log and "ZeroDivisionError" in open(log).read()


@pytest.mark.parametrize(("override", "key"), [("embedding.budget=1/0", "embedding.budget"),
                                                ("embedding.dim=10", "embedding.dim")])
def test_run_with_a_bad_config_value_writes_nothing(tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    assert cli.main(["run", "quickstart", "--set", override, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert f"{key}: " in err and "Traceback" not in err and "ZeroDivision" not in err
    assert not run_dir.exists()


@pytest.mark.parametrize("exc", [ValueError("bad value in x.yaml"), KeyError("nope"),
                                 IsADirectoryError("input d is a directory, not a Criteo file")])
def test_a_user_mistake_is_exactly_one_line_and_no_log(exc, monkeypatch, capsys):
    _failing_list(exc, monkeypatch)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "log" not in err


def test_a_closed_pipe_is_not_an_error():
    # `embtables list | head -1`: the reader goes away before the output is written
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.Popen([sys.executable, "-m", "embtables.cli", "list"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # before the command has imported anything, so its first write fails
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141
    assert "error" not in err and "Traceback" not in err, err
