"""The shipped real-data comparison on the real Amazon Beauty files (skipped when absent):
its plan over the converted data, and a two-step DIN cell of the protocol at 1/16."""

from __future__ import annotations

import pytest
from conftest import SHARED

from embtables.datasets.amazon import convert_amazon
from embtables.datasets.schema import load_schema
from embtables.experiments import run
from embtables.experiments.sweep_config import load_sweep

AMAZON = SHARED / "data" / "amazon-s3rec"

pytestmark = pytest.mark.skipif(
    not (AMAZON / "Beauty.txt").exists() or not (AMAZON / "Beauty_item2attributes.json").exists(),
    reason=f"S3-Rec Beauty files not found in {AMAZON} (see docs/real-data.md for where to get them)",
)


@pytest.mark.slow  # converting Beauty takes about a minute on 2 cores
def test_budget_amazon_beauty_plans_and_a_tuning_cell_trains(tmp_path):
    data = convert_amazon(AMAZON / "Beauty.txt", tmp_path / "beauty",
                          attributes=AMAZON / "Beauty_item2attributes.json")
    plan = load_sweep("budget-amazon-beauty", [f"data.path={data}"])
    assert plan.protocol is not None and plan.protocol.budget.label == "1/16"
    schema = load_schema(data)
    # the fraction refers to the full tables: every categorical feature's table rows x dim 12 x 4 bytes
    full = sum(int(c.table_rows) for c in schema.categorical) * 12 * 4
    cells = plan.build_cells()
    assert {c.full_bytes for c in cells} == {full}
    assert {c.config.model.name for c in cells} == {"din"}
    assert {c.budget.label for c in cells} == {"1", "1/2", "1/4", "1/8", "1/16"}
    lr_cells = plan.lr_cells({plan.groups[0]: 1})
    (tune,) = [c for c in lr_cells if c.method.label == "hash" and c.lr_factor == 2.0]
    assert tune.budget.label == "1/16" and tune.config.train.embedding_optimizer.lr == pytest.approx(0.1)
    summary = run(tune.config, {"train.max_steps": 2, "data.max_eval_rows": 1010, "train.threads": 1,
                                "train.progress": False, "train.checkpoint": False},
                  run_dir=tmp_path / "cell", quiet=True)
    assert summary["steps"] == 2 and 0 < summary["valid_auc"] < 1
    # each of DIN's two modules within 1/16 of its own size
    assert summary["embedding_bytes"] <= full / 16 * 2
