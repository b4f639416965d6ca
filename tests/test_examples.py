"""Every script in examples/ runs as written, at a tiny size (they are what a new user copies)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import broken_package

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow  # end to end, a process each: `make test-slow` (CI runs both)


def run(script: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                         env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def run_notebook(name: str, cwd: Path, **env: str) -> str:
    """A notebook's code cells, in order, in one fresh process (what "Run all" does)."""
    cells = json.loads((EXAMPLES / name).read_text())["cells"]
    source = "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    out = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_every_example_is_tested():
    tested = re.findall(r'run(?:_notebook)?\("([\w.]+)"', Path(__file__).read_text())
    assert sorted(set(tested)) == sorted(p.name for p in [*EXAMPLES.glob("*.py"), *EXAMPLES.glob("*.ipynb")])


def test_custom_model(tmp_path):
    out = run("custom_model.py", "--steps", "3", cwd=tmp_path)
    assert "29,244 parameters; 6 separate convs would need 56,874" in out and "LSM of bank" in out


def test_finetune_folded_loop(tmp_path):
    from helpers import tiny
    from softshare.train.loop import train
    train(tiny(tmp_path, name="k2", model="shared", num_templates=2, epochs=1, model_args={"coef_init": "aligned"}))
    out = run("finetune_folded_loop.py", str(tmp_path / "k2"), "--epochs", "1", "--sizes", "9", "--count", "4",
              "--out", str(tmp_path / "ft"), cwd=tmp_path)
    assert "folded at |cos| >= 0.95: loops [2]" in out  # aligned starts: the two blocks are one loop
    scores = [ast.literal_eval(line.split(":", 1)[1].split("(")[0].strip()) for line in out.splitlines() if line.startswith(("before", "after"))]
    assert len(scores) == 2 and all(set(s) == {9} and 0 <= s[9] <= 1 for s in scores)
    assert "(4 steps;" in out and (tmp_path / "ft" / "checkpoints" / "last").is_dir()


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
    env = broken_package(tmp_path / "site", "torchvision")
    out = subprocess.run([sys.executable, str(EXAMPLES / "share_resnet.py"), "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "torchvision is installed but fails to import (RuntimeError: operator torchvision::nms" in out.stderr
    assert not (tmp_path / "r").exists()


def test_train_then_lsm_of_the_run(tmp_path):
    out = run("train_fashion_mnist.py", "--tiny", "--out-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert "swrn_16_1_1: validation accuracy" in out and "(held-out training images" in out
    assert "test accuracy of the best checkpoint" in out and "folding at |cos| >= 0.9" in out
    run_dir = tmp_path / "runs" / "digits_example"
    assert (run_dir / "metrics.csv").exists() and (run_dir / "lsm" / "history.jsonl").exists()
    out = run("lsm_of_run.py", str(run_dir), "--out", str(tmp_path / "figs"), cwd=tmp_path)
    assert "most alike" in out and (run_dir / "lsm" / "history.png").exists()
    assert len(list((tmp_path / "figs").glob("lsm_*.png"))) == 3  # one bank per stage


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def test_fit_notebook_trains_a_shared_resnet_on_fashion_mnist(tmp_path):
    """examples/fit_shared_resnet.ipynb at its tiny size: share, fit, LSM history, reload; run twice,
    the second run continues the finished one (resume="auto") instead of training again."""
    env = {"SOFTSHARE_EXAMPLE_TINY": "1", "SOFTSHARE_EXAMPLE_OUT": str(tmp_path / "runs")}
    out = run_notebook("fit_shared_resnet.ipynb", tmp_path, **env)
    assert "shared with k = 2" in out and "epoch 1: train loss" in out
    run = tmp_path / "runs" / "fashion_mnist_shared_resnet"
    assert (run / "lsm" / "history.png").stat().st_size > 1000 and (run / "metrics.csv").exists()
    weights = run / "checkpoints" / "last" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    run_notebook("fit_shared_resnet.ipynb", tmp_path, **env)
    assert weights.stat().st_mtime_ns == before
