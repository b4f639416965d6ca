"""The benchmarks cannot rot: each runs end to end at a tiny size. benchmarks/gpu_check.py runs
with --dry-run (CPU, tiny sizes): every part, the report checked section by section, bad input
and a part overrunning its cap."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GPU_CHECK = BENCHMARKS / "gpu_check.py"


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


def test_bench_imagefolder_smoke(tmp_path):
    bench = _load_script("bench_imagefolder")
    bench.make_jpegs(tmp_path, 8)
    sizes = {Image.open(p).size for p in tmp_path.rglob("*.JPEG")}
    assert sizes == {(500, 375), (375, 500)}
    results = bench.measure(tmp_path, rounds=1, workers=0, batch=4)
    assert set(results) == {"decode_only", "train_transform", "val_transform", "dataloader_0_workers"}
    assert all(v > 0 for v in results.values())


# -- benchmarks/gpu_check.py --------------------------------------------------------------------
def run_gpu_check(*args: str) -> subprocess.CompletedProcess:
    """No timeout here: the script ends by its own budget, and a busy machine only makes it slower."""
    return subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def gpu_dry_report(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gpu") / "report"
    done = run_gpu_check("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return out, json.loads((out / "gpu-report.json").read_text())


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part(gpu_dry_report):
    out, report = gpu_dry_report
    gpu_check = _load_script("gpu_check")
    assert report["format"] == "softshare-gpu-report" and report["dry_run"] is True
    assert list(report["parts"]) == gpu_check.PART_NAMES
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part["error"])
        assert 0 < part["seconds"] <= part["cap_s"] and (out / part["log"]).exists()


@pytest.mark.slow
def test_gpu_check_dry_run_sections_hold_plausible_values(gpu_dry_report):
    _, report = gpu_dry_report
    data = {name: part["data"] for name, part in report["parts"].items()}
    assert data["env"]["torch"] == torch.__version__ and data["env"]["bf16_peak_tflops"] is None
    tests = data["tests"]
    assert tests["tests"] >= 1 and tests["passed"] == tests["tests"] and tests["failed"] == [] and tests["ok"]
    assert "--device cpu" in tests["command"]
    for mode in ("eager", "compiled"):
        speed = data[f"speed_{mode}"]
        assert speed["compiled"] == (mode == "compiled") and list(speed["models"]) == \
            ["wrn_16_1", "swrn_16_1_2", "swrn_16_1_6"]
        plain = speed["models"]["wrn_16_1"]
        for name, entry in speed["models"].items():
            assert len(entry["round_images_per_s"]) == speed["rounds"] and entry["images_per_s"] > 0
            assert entry["projected_recipe_min"] == pytest.approx(200 * 50_000 / entry["images_per_s"] / 60, rel=1e-3)
            assert entry["tflops"] > 0 and entry["fraction_of_peak"] is None and entry["peak_memory_gib"] is None
            # same architecture: the shared nets add only the (tiny) bank-mixing GEMMs
            assert entry["flops_per_step"] == pytest.approx(plain["flops_per_step"], rel=0.02)
            if name != "wrn_16_1":
                assert 0.1 < entry["ratio_to_plain"] < 10
    assert data["cifar_sanity"]["ok"] and data["cifar_sanity"]["loss_last10"] < data["cifar_sanity"]["loss_first5"]
    assert data["cifar_sanity"]["cutout"] == 16 and len(data["cifar_sanity"]["losses"]) == data["cifar_sanity"]["steps"]
    for preset in ("prefix_sums_gpu", "mazes_gpu"):
        assert data["algo_speed"][preset]["steps_per_s"] > 0
    learn = data["prefix_learn"]
    assert learn["complete"] and [e["epoch"] for e in learn["epochs"]] == [1, 2]
    assert 0 <= learn["val_exact_match"] <= 1 and learn["steps"] == 2 * learn["steps_per_epoch"]
    ddp = data["ddp"]
    assert ddp["ok"] and ddp["weights_identical"] and ddp["returncodes"] == [0, 0] and ddp["run_world_size"] == 2


@pytest.mark.slow
def test_gpu_check_dry_run_targets_and_markdown(gpu_dry_report):
    out, report = gpu_dry_report
    targets = {t["target"]: t for t in report["targets"]}
    ratios = [t for name, t in targets.items() if "training throughput" in name]
    assert len(ratios) == 4 and all(t["pass"] == (t["value"] >= 0.97) for t in ratios)
    (recipe,) = [t for name, t in targets.items() if name.startswith("projected 200-epoch swrn_16_1_2")]
    assert recipe["value"] > 0 and recipe["pass"] == (recipe["value"] < 30)
    assert targets["device tests"]["pass"] is True
    md = (out / "gpu-report.md").read_text()
    assert md.startswith("# softshare GPU check (DRY RUN on CPU: no GPU figure)")
    for heading in ("## Targets", "## Parts", "## Training speed, eager", "## Training speed, compiled",
                    "## Algorithmic presets", "## prefix_sums_gpu learning", "## CIFAR recipe on synthetic data",
                    "## Device tests", "## DDP"):
        assert heading in md, heading
    assert md.count("| PASS |") + md.count("| FAIL |") == sum(t["pass"] is not None for t in report["targets"])


@pytest.mark.slow
def test_gpu_check_rerun_into_a_report_directory_and_refusals(gpu_dry_report, tmp_path):
    out, _ = gpu_dry_report
    again = run_gpu_check("--dry-run", "--out", str(out), "--only", "env")
    assert again.returncode == 0, again.stderr
    assert list(json.loads((out / "gpu-report.json").read_text())["parts"]) == ["env"]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    for args, message in ((["--dry-run", "--out", str(busy)], "--overwrite"),
                          (["--dry-run", "--out", str(tmp_path / "x"), "--only", "speed"], "unknown part"),
                          (["--dry-run"], "--out DIR is required"),
                          (["--dry-run", "--out", str(busy / "notes.txt")], "is a file")):
        done = run_gpu_check(*args)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert (busy / "notes.txt").read_text() == "mine" and not (busy / "gpu-report.json").exists()
    if not torch.cuda.is_available():
        done = run_gpu_check("--out", str(tmp_path / "y"))
        assert done.returncode == 2 and "--dry-run" in done.stderr


def test_gpu_check_part_over_its_cap_is_recorded_not_fatal(tmp_path):
    gpu_check = _load_script("gpu_check")
    part = next(p for p in gpu_check.PARTS if p.name == "cifar_sanity")
    result = gpu_check.run_part(part, tmp_path, dry_run=True, cap=0.5)
    assert result["status"] == "timeout" and "cap" in result["error"] and result["seconds"] >= 0.5
    targets = gpu_check.evaluate_targets({"cifar_sanity": result})
    assert all(t["pass"] is None for t in targets)  # nothing measured: no PASS, no FAIL


def test_gpu_check_bf16_peak_lookup():
    gpu_check = _load_script("gpu_check")
    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu_check.bf16_peak_tflops("NVIDIA H100 PCIe") is None
    assert gpu_check.bf16_peak_tflops("NVIDIA GeForce RTX 4090") is None

def test_bench_algorithmic_quick(capsys):
    """The algorithmic presets' step-speed benchmark end to end at 5 iterations, 1 step, 2 rounds."""
    bench = _load_script("bench_algorithmic")
    result = bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "| prefix_sums_cpu recurrent depth=5 |" in out and "| mazes_cpu recurrent depth=5 |" in out
    assert "torch.mm GFLOP/s" in out and "torch=" in out and "load=" in out
    for row in result["rows"]:
        assert row["steps_s"] > 0 and row["gflop_step"] > 0 and row["torch.mm_ratio"] > 0


def test_bench_algorithmic_times_a_case_against_its_variant():
    """--against times a second case per body in the same rounds. The grid maze net does the image
    net's convolutions on (s + 2)^2 grid pixels instead of (2s + 6)^2 image pixels: 576 / 121 the FLOPs."""
    bench = _load_script("bench_algorithmic")
    result = bench.main(["--quick", "--presets", "mazes_cpu", "--against", "grid=false"])
    grid, image = result["rows"]
    assert image["case"].endswith("grid=False") and "grid" not in grid["case"]
    assert image["gflop_step"] / grid["gflop_step"] == pytest.approx(576 / 121, rel=1e-3)
    (speedup,) = result["speedups"]
    assert speedup["speedup"] > 0 and speedup["against"] == image["case"]
