"""The nets shipped as ``pretrained:NAME`` load offline and still score what their catalogue
entry (and so the docs) says, scored the way ``softshare eval`` scores them."""

from __future__ import annotations

import json

import pytest

import softshare
from softshare.cli import main
from softshare.eval.algorithmic import score_task_checkpoint
from softshare.layers.structure import count_parameters
from softshare.pretrained import HERE, catalogue

SHIPPED = ("prefix_sums_recurrent", "mazes_recurrent")


def test_the_catalogue_lists_every_shipped_net_and_only_those():
    on_disk = {p.name for p in HERE.iterdir() if (p / "model.safetensors").is_file()}
    assert set(SHIPPED) <= set(catalogue()) == on_disk


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_net_loads_with_its_catalogued_size(name):
    entry = catalogue()[name]
    model = softshare.load(f"pretrained:{name}")
    assert count_parameters(model) == entry["parameters"]
    # small enough to ship: the prefix-sums net 45 KB, the maze net (52,704 float32 weights) 212 KB
    assert (HERE / name / "model.safetensors").stat().st_size < 250_000


def _check_scores(name: str, sizes: list[str]) -> None:
    entry = catalogue()[name]
    result = score_task_checkpoint(f"pretrained:{name}", device="cpu", sizes=[int(s) for s in sizes],
                                   count=entry["count"]).result
    assert result["eval_iterations"] == entry["eval_iterations"]
    for size in sizes:
        # One instance in `count` may flip on other hardware (a float rounding at a decision edge).
        assert result["test"][size]["stable"] == pytest.approx(entry["stable_exact_match"][size],
                                                               abs=1.01 / entry["count"]), size


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_net_still_scores_its_catalogue_at_the_trained_size(name):
    entry = catalogue()[name]
    _check_scores(name, [min(entry["stable_exact_match"], key=int)])


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_net_still_scores_its_catalogue_at_every_size(name):
    _check_scores(name, list(catalogue()[name]["stable_exact_match"]))


def test_eval_of_a_shipped_net_writes_in_the_working_directory_not_the_package(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (HERE / "prefix_sums_recurrent").iterdir())
    assert main(["eval", "pretrained:prefix_sums_recurrent", "--sizes", "8", "--count", "5", "--iterations", "40"]) == 0
    written = json.loads((tmp_path / "eval-prefix_sums_recurrent.json").read_text())
    assert written["test"]["8"]["stable"] == 1.0
    assert sorted(p.name for p in (HERE / "prefix_sums_recurrent").iterdir()) == before
    # An existing file of the user's there is not overwritten.
    (tmp_path / "eval-prefix_sums_recurrent.json").write_text("mine")
    code = main(["eval", "pretrained:prefix_sums_recurrent", "--sizes", "8", "--count", "5", "--iterations", "40"])
    assert code == 2 and (tmp_path / "eval-prefix_sums_recurrent.json").read_text() == "mine"
    assert "--overwrite" in capsys.readouterr().err


def test_an_unknown_pretrained_name_is_one_line_naming_the_known_ones(capsys):
    code = main(["eval", "pretrained:no_such_net"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no_such_net" in err and "prefix_sums_recurrent" in err


@pytest.mark.parametrize("name", SHIPPED)
def test_the_catalogued_training_command_reproduces_the_shipped_nets_recipe(name):
    """`trained_by` is the line that trains the net again today: parsed by the real command line,
    it resolves to the shipped run's saved recipe (a default that changed since is spelled out)."""
    import shlex
    import sys
    from pathlib import Path

    from softshare.cli import build_parser
    from softshare.cli.train import config_from_args
    from softshare.train.resume import LOCATION_FIELDS, RUNTIME_FIELDS
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from publish_pretrained import training_command
    saved = json.loads((HERE / name / "meta.json").read_text())["config"]
    command = catalogue()[name]["trained_by"]
    assert training_command(saved) == command
    config = config_from_args(build_parser().parse_args(shlex.split(command)[1:]))[0].to_dict()
    differ = {k for k in saved if k not in LOCATION_FIELDS and k not in RUNTIME_FIELDS and config[k] != saved[k]}
    assert not differ, differ
