"""The `softshare` command: job discovery, help, models, params, and its error contract."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from softshare.cli import build_parser, main


def jobs() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "job")
    return list(action.choices)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "softshare", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_core_jobs_are_registered_in_order():
    names = jobs()
    assert "models" in names and "params" in names
    assert names.index("models") < names.index("params")  # ORDER 10, 20


def test_help_lists_every_job_subprocess():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "usage: softshare" in result.stdout
    for job in jobs():
        assert re.search(rf"^\s+{re.escape(job)}\s", result.stdout, re.MULTILINE), job


@pytest.mark.parametrize("job", jobs())
def test_every_job_has_help(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: softshare {job}")


def test_models_prints_names_and_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\w+)\s+([\d,]+)$", out, re.MULTILINE))
    assert rows["wrn_28_10"] == "36,479,194"
    assert rows["swrn_28_10_1"] == "12,287,212"
    assert rows["swrn_28_10_2"] == "17,125,630"
    assert rows["swrn_28_14_2"] == "33,537,790"
    assert r"swrn_(\d+)_(\d+)_(\d+)" in out  # families and their patterns


def test_models_pattern_and_num_classes(capsys):
    assert main(["models", "wrn_28_*", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\w+)\s+([\d,]+)$", out, re.MULTILINE))
    assert set(rows) == {"wrn_28_10", "wrn_28_14"}
    assert rows["wrn_28_10"] == "36,536,884"


def test_params_of_swrn_28_10_2(capsys):
    assert main(["params", "swrn_28_10_2"]) == 0
    out = capsys.readouterr().out
    bank_rows = re.findall(r"^(stages\.\d\.bank)\s+(\d+)\s+(\d+)\s+(\[[^\]]+\])\s+([\d,]+)\s+([\d,]+)$", out, re.MULTILINE)
    assert bank_rows == [
        ("stages.0.bank", "6", "2", "[160, 160, 3, 3]", f"{2 * 160 * 160 * 9 + 12:,}", f"{6 * 160 * 160 * 9:,}"),
        ("stages.1.bank", "6", "2", "[320, 320, 3, 3]", f"{2 * 320 * 320 * 9 + 12:,}", f"{6 * 320 * 320 * 9:,}"),
        ("stages.2.bank", "6", "2", "[640, 640, 3, 3]", f"{2 * 640 * 640 * 9 + 12:,}", f"{6 * 640 * 640 * 9:,}"),
    ]
    assert re.search(r"total parameters:\s+17,125,630$", out, re.MULTILINE)
    assert re.search(r"unshared equivalent:\s+36,479,194$", out, re.MULTILINE)  # = WRN-28-10
    assert f"{36_479_194 / 17_125_630:.2f}x fewer" in out


def test_params_of_unshared_model(capsys):
    assert main(["params", "wrn_28_10", "--num-classes", "100"]) == 0
    out = capsys.readouterr().out
    assert "no template banks" in out and re.search(r"total parameters:\s+36,536,884$", out, re.MULTILINE)


def test_unknown_model_lists_close_names(capsys):
    assert main(["params", "swrn_28_10_x"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("softshare params: error: unknown model 'swrn_28_10_x'")
    assert "did you mean" in lines[0] and "swrn_28_10_2" in lines[0]
    assert captured.out == ""


@pytest.mark.parametrize("argv,fragment", [
    (["params", "swrn_28_10_2", "--num-classes", "0"], "argument --num-classes: expected a positive integer, got '0'"),
    (["params", "swrn_28_10_2", "--in-channels", "three"], "argument --in-channels: expected a positive integer"),
    (["models", "--num-classes", "-3"], "argument --num-classes: expected a positive integer, got '-3'"),
    (["params"], "the following arguments are required: model"),
])
def test_bad_argument_values_one_line_exit_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"softshare {argv[0]}: error: ") and fragment in err


def test_bad_argument_value_subprocess_no_traceback():
    result = run_cli("params", "swrn_28_10_2", "--num-classes", "zero")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "softshare params: error: argument --num-classes: expected a positive integer, got 'zero' "
        "(see 'softshare params --help')"]
    result = run_cli("params", "nosuchmodel_1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "unknown model 'nosuchmodel_1'" in result.stderr
