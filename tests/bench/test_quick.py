"""The ``--quick`` preset end to end, as CI runs it: every method on one task, the reports and the plots."""

from __future__ import annotations

import csv

import pytest

from boost_lightning.bench.__main__ import main
from boost_lightning.bench.suite import resolve_methods


@pytest.mark.slow
def test_quick_preset_end_to_end(tmp_path):
    assert main(["--quick", "--tasks", "maze", "--no-progress", "--accelerator", "cpu", "--out", str(tmp_path)]) == 0
    suite = tmp_path / "quick"
    with open(suite / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(resolve_methods("all"))
    assert all(r["task"] == "maze" and r["episodes"] == "32" for r in rows)
    md = (suite / "results.md").read_text()
    assert "Headroom" in md and "Methods" in md
    for name in ("success.png", "weight_vs_quality.png", "weight_per_generator.png", "ess.png"):
        assert (suite / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
