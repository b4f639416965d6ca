"""Every script in examples/ runs as written, at a tiny size (they are what a new user copies)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_every_example_is_tested():
    tested = re.findall(r'run\("(\w+\.py)"', Path(__file__).read_text())
    assert sorted(set(tested)) == sorted(p.name for p in EXAMPLES.glob("*.py"))


def test_custom_model(tmp_path):
    out = run("custom_model.py", "--steps", "3", cwd=tmp_path)
    assert "29,244 parameters; 6 separate convs would need 56,874" in out and "LSM of bank" in out


def test_share_resnet(tmp_path):
    out = run("share_resnet.py", "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert "parameters 11,689,512 -> 8,519,234" in out
    assert re.search(r"tie\(.*parameters 8,519,234 -> 8,519,234 \(\+0.0%\)", out)  # never grows
    unshare_diff = float(re.search(r"unshare: max \|difference\| (\S+)", out)[1])
    reload_diff = float(re.search(r"reloaded: max \|difference\| (\S+)", out)[1])
    assert unshare_diff < 1e-5 and reload_diff == 0
    assert {"checkpoint", "shared.pt2", "shared_traced.pt", "unshared_scripted.pt", "shared.onnx"} <= {
        p.name for p in (tmp_path / "r").iterdir()}


def test_share_resnet_with_a_broken_torchvision_is_one_line_exit_2(tmp_path):
    (tmp_path / "site" / "torchvision").mkdir(parents=True)
    (tmp_path / "site" / "torchvision" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms "
                                                                   "does not exist')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run([sys.executable, str(EXAMPLES / "share_resnet.py"), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "torchvision is installed but fails to import (RuntimeError: operator torchvision::nms" in out.stderr
    assert not (tmp_path / "r").exists()


def test_train_then_lsm_of_the_run(tmp_path):
    out = run("train_fashion_mnist.py", "--tiny", "--out-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert "swrn_16_1_1: test accuracy" in out and "folding at |cos| >= 0.9" in out
    run_dir = tmp_path / "runs" / "digits_example"
    assert (run_dir / "metrics.csv").exists() and (run_dir / "lsm" / "history.jsonl").exists()
    out = run("lsm_of_run.py", str(run_dir), "--out", str(tmp_path / "figs"), cwd=tmp_path)
    assert "most alike" in out and (run_dir / "lsm" / "history.png").exists()
    assert len(list((tmp_path / "figs").glob("lsm_*.png"))) == 3  # one bank per stage
