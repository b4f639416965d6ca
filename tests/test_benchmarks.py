"""The benchmarks cannot rot: each runs end to end at a tiny size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[name] = bench  # dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[name]
    return bench

def test_benchmark_runs(monkeypatch, capsys):
    """Smoke test with tiny counts, so the benchmark script cannot rot unnoticed."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")  # the script sets these; restore them afterwards
    bench = _load_script("bench_data_algorithmic")
    monkeypatch.setattr(bench, "MAZES", {9: 20, 59: 2})
    monkeypatch.setattr(bench, "PREFIX_SUMS", {16: 10})
    monkeypatch.setattr("sys.argv", ["bench", "--repeats", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "vs public" in out and "strings/s" in out


def test_benchmark_smoke():
    bench = _load_script("bench_sharing")
    lines = []
    result = bench.run(step_plan=[("wrn_10_1", ["swrn_16_1_2"], 2, 2)],
                       materialise_plan=[("tiny", 3, 2, (4, 4, 3, 3), 2)], log=lines.append)
    (comparison,) = result["steps"]
    assert set(comparison.times) == {"wrn_10_1", "swrn_16_1_2"}
    assert all(len(v) == 2 and min(v) > 0 for v in comparison.times.values())
    assert comparison.median_ratio("swrn_16_1_2") > 0
    (label, times), = result["materialise"]
    assert set(times) == {"library", "broadcast", "per-layer"}
    text = "\n".join(lines)
    assert "| wrn_10_1 | swrn_16_1_2 | 2 |" in text and "| tiny |" in text and "torch=" in text
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    assert exit_info.value.code == 0


def test_bench_algorithmic_quick(capsys):
    """The algorithmic presets' step-speed benchmark end to end at 5 iterations, 1 step, 2 rounds."""
    bench = _load_script("bench_algorithmic")
    result = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| prefix_sums_cpu recurrent depth=5 |" in out and "| mazes_cpu recurrent depth=5 |" in out
    assert "torch.mm GFLOP/s" in out and "torch=" in out and "load=" in out
    for row in result["rows"]:
        assert row["steps_s"] > 0 and row["gflop_step"] > 0 and row["torch.mm_ratio"] > 0
