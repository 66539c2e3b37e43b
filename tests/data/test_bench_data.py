"""The data benchmark runs end to end on a small input."""

from __future__ import annotations

from boost_lightning.bench.data import main


def test_bench_reports_cold_and_cached_throughput(capsys):
    figures = main(["--rows", "200", "--turns", "3", "--vocab-size", "400"])
    out = capsys.readouterr().out
    assert "cold" in out and "cached" in out and "speed-up" in out
    assert figures["cold_traj_per_s"] > 0 and figures["speedup"] > 1
