"""The ``--quick`` preset end to end: every method on every task, the ablation, the reports and the plots."""

from __future__ import annotations

import csv

import pytest

from boost_lightning.bench.__main__ import main
from boost_lightning.bench.suite import PRESETS, plan
from boost_lightning.envs.base import TASKS
from boost_lightning.weightings import WEIGHTINGS


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    assert main(["--quick", "--no-progress", "--accelerator", "cpu", "--out", str(tmp_path)]) == 0
    suite = tmp_path / "quick"
    with open(suite / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plan(PRESETS["quick"], list(TASKS), list(WEIGHTINGS)))
    assert {(r["task"], r["method"]) for r in rows if "main" in r["axes"]} == {(t, m) for t in TASKS
                                                                                for m in WEIGHTINGS}
    assert {float(r["shifted_fraction"]) for r in rows if "shifted" in r["axes"]} == set(
        PRESETS["quick"].ablation_shifted)
    assert all(r["inner_steps"] == str(PRESETS["quick"].steps) for r in rows)
    md = (suite / "results.md").read_text()
    assert "## Learned weights vs ground truth" in md and "## Ablation" in md
    for name in ("success.png", "weight_vs_quality.png", "weight_per_generator.png", "ess.png", "ablation.png"):
        assert (suite / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
