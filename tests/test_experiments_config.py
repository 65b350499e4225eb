"""The strict YAML schema: errors name the key path; overrides; shipped configs load."""

from __future__ import annotations

import pytest

from embtables.cli import main
from embtables.experiments.config import ConfigError, load_config, shipped_configs


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"train": {"batchsize": 3}}, "train.batchsize: unknown key"),
        ({"embedding": {"dim": "x"}}, "embedding.dim:"),
        ({"embedding": {"dim": 2}}, "embedding.dim:"),
        ({"embedding": {"method": "nope"}}, "unknown method 'nope' at embedding.method; valid: "),
        ({"embedding": {"full": {"speed": 1}}}, "embedding.full"),
        ({"embedding": {"zzz": {}}}, "unknown key embedding.zzz"),
        ({"model": {"name": "transformer"}}, "unknown model 'transformer' at model.name; valid: "),
        ({"model": {"dlrm": {"top": [1]}}}, "model.dlrm.top: unknown key"),
        ({"train": {"embedding_optimizer": {"name": "lion"}}}, "train.embedding_optimizer.name"),
        ({"sharding": {"offload": "ssd"}}, "sharding.offload"),
        ({"seed": "abc"}, "seed:"),
        ({"embedding": {"qr": {"operation": "sum"}}}, "embedding.qr.operation: Input should be 'mult'"),
        ({"embedding": {"optembed": {"population": 0}}}, "embedding.optembed.population: "),
        ({"embedding": {"optembed": {"retrain_init": "warm"}}}, "embedding.optembed.retrain_init: "),
        ({"embedding": {"optembed": {"mutation_num": 0, "crossover_num": 0}}},
         "embedding.optembed: mutation_num + crossover_num must be >= 1"),
        ({"embedding": {"optembed": {"generations": 3}}},
         "unknown knob(s) ['generations'] at embedding.optembed"),
    ],
)
def test_schema_errors_name_the_key(bad, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert fragment in str(e.value), str(e.value)


def test_overrides_are_yaml_typed():
    c = load_config("quickstart", ["embedding.dim=8", "train.dense_optimizer.lr=3e-3", "data.test_split=null",
                                   "model.dlrm={bottom_mlp: [8], top_mlp: [8]}"])
    assert c.embedding.dim == 8 and c.train.dense_optimizer.lr == 3e-3 and c.data.test_split is None
    assert c.model.knobs().bottom_mlp == [8]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config("quickstart", ["embedding.dim"])


def test_unknown_config_name_lists_shipped():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no-such-config")


def test_yaml_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  batch_size: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)
    p.write_text("train:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml[\s\S]*train\.epochs"):
        load_config(p)


def test_every_shipped_config_validates():
    names = shipped_configs()
    assert "quickstart" in names
    assert not [n for n in names if n.startswith("budget-")]  # comparison files are listed apart
    for n in names:
        load_config(n)


def test_comparison_file_given_to_run_says_use_compare():
    with pytest.raises(ConfigError, match="embtables compare budget-synth-criteo"):
        load_config("budget-synth-criteo")


def test_config_hash_changes_with_content():
    a, b = load_config("quickstart"), load_config("quickstart", ["seed=1"])
    assert a.config_hash() != b.config_hash() and a.config_hash() == load_config("quickstart").config_hash()


def test_cli_user_error_is_one_line_without_traceback(capsys):
    rc = main(["run", "quickstart", "--set", "embedding.method=bogus"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "unknown method 'bogus'" in err


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "full" in out and "dlrm" in out and "quickstart" in out


def test_doctor_finds_no_problem_here(capsys):
    from embtables.doctor import diagnose

    lines, problems = diagnose()
    assert problems == [], problems
    assert any("fbgemm ops  load and run" in x for x in lines)


def test_optembed_section_holds_module_knobs_and_stage_settings():
    # The keys an existing config writes under embedding.optembed keep loading: the module
    # gets its own knobs, the stages their settings (defaults filled in), and the config
    # dumps exactly what was written (run directories' config.yaml and hashes unchanged).
    written = {"alpha": 1e-3, "population": 6, "search_rows": 512, "retrain_init": "random"}
    c = load_config({"embedding": {"method": "optembed", "optembed": written}})
    assert c.embedding.knobs() == written
    assert c.embedding.module_knobs() == {"alpha": 1e-3}
    s = c.embedding.settings()
    assert (s.population, s.search_rows, s.retrain_init, s.alpha) == (6, 512, "random", 1e-3)
    assert (s.mutation_num, s.search_iterations, s.dim_step, s.artefact) == (10, 30, 4, None)
    assert c.model_dump(mode="json")["embedding"]["optembed"] == written
    assert load_config(c.model_dump(mode="json")).config_hash() == c.config_hash()

