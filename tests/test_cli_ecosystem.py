"""CLI polish: --version, `share`, `params --model-args`, generated config help, --print-config per
task, YAML `preset:`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from helpers import foreign
from softshare import load_into
from softshare.analysis import sharing_stats
from softshare.cli import build_parser, main
from softshare.models import create_model
from softshare.train.config import PRESETS, TrainConfig
from softshare.train.config_help import FIELD_CHOICES, FIELD_HELP
from softshare.version import __version__


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"softshare {__version__}"


def test_share_prints_the_plan_and_saves_a_loadable_checkpoint(tmp_path, capsys):
    assert main(["share", "helpers:foreign", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 of 5 groups" in out and "4,298 -> 3,728" in out  # as test_convert_share counts by hand
    assert main(["share", "helpers:foreign", "-k", "2", "--init-from-weights", "--out", str(tmp_path / "ck")]) == 0
    assert "load_into" in capsys.readouterr().out
    model = foreign()
    load_into(model, tmp_path / "ck")
    assert sum(p.numel() for p in model.parameters()) == 3728


def test_share_of_a_registered_model_and_bad_builders(capsys):
    assert main(["share", "wrn_16_1", "-k", "1"]) == 0
    assert "Conv2d[64, 64, 3, 3] x3" in capsys.readouterr().out
    assert main(["share", "nowhere.at.all:build"]) == 2
    assert "cannot import nowhere.at.all:build" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "softshare", "share", "helpers:foreign", "-k", "x"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_params_takes_model_args(capsys):
    assert main(["params", "maze_shared", "--model-args", '{"width": 16, "depth": 16}']) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        expected = sharing_stats(create_model("maze_shared", width=16, depth=16)).total
    assert f"total parameters:        {expected:,}" in out


def test_every_config_flag_has_help_and_choices():
    assert set(FIELD_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
    train = next(a for a in build_parser()._actions if a.dest == "job").choices["train"]
    flags = {a.dest: a for a in train._actions}
    for name, text in FIELD_HELP.items():
        assert flags[name].help.startswith(text.replace("%", "%%")) and "(default: " in flags[name].help
    for name, choices in FIELD_CHOICES.items():
        assert tuple(flags[name].choices) == choices
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--optimizer", "lion", "--print-config"])
    assert exit_info.value.code == 2


def test_print_config_shows_the_task_fields(capsys):
    assert main(["train", "--preset", "digits_tiny", "--print-config"]) == 0
    image = json.loads(capsys.readouterr().out)
    assert "dataset" in image and "cutout" in image and "train_size" not in image and "alpha" not in image
    assert main(["train", "--task", "mazes", "--print-config"]) == 0
    mazes = json.loads(capsys.readouterr().out)
    assert "train_size" in mazes and "dataset" not in mazes and "cutout" not in mazes


def test_yaml_config_may_name_a_preset(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("preset: digits_tiny\nepochs: 3\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["dataset"] == "digits" and config["epochs"] == 3  # preset < file
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--preset", "fashion_mnist_cpu",
                 "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "fashion_mnist"  # --preset wins over the file's
    (tmp_path / "bad.yaml").write_text("preset: nope\n")
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--print-config"]) == 2
    assert "nope" in capsys.readouterr().err


def test_digits_tiny_model_shares():
    with torch.device("meta"):
        stats = sharing_stats(create_model(PRESETS["digits_tiny"]["model"], in_channels=1))
    assert stats.total < 0.7 * stats.unshared_total
