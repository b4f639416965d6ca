"""What a user installs: the license, the one version, the extras the README and the code need."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import softshare

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
README = (ROOT / "README.md").read_text()
DISTRIBUTIONS = {"sklearn": "scikit-learn", "torch": "tensorboard", "wandb": "wandb", "onnx": "onnx"}  # import -> pip
DATASET_EXTRAS = {"digits": "digits"}  # datasets that need an optional package


def extras() -> dict[str, list[str]]:
    return {name: [re.split(r"[<>=!~ ]", req)[0] for req in reqs]
            for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}


def install_line_extras() -> set[str]:
    line = re.search(r"pip install -c \S+constraints\.txt '/path/to/softshare\[([\w,]+)\]'", README)
    assert line, "README's install line"
    return set(line[1].split(","))


def test_license_file_matches_the_declared_license():
    assert PYPROJECT["project"]["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_the_version_is_written_once():
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "softshare.version.__version__"}
    assert importlib.metadata.version("softshare") == softshare.__version__  # the installed metadata agrees
    files = [ROOT / "pyproject.toml", *ROOT.glob("setup.*"),
             *(path for folder in ("src", "examples", "benchmarks") for path in (ROOT / folder).rglob("*.py"))]
    written = [p for p in files if re.search(rf"""version\w*\s*=\s*["']{re.escape(softshare.__version__)}["']""",
                                             p.read_text())]
    assert [p.relative_to(ROOT).as_posix() for p in written] == ["src/softshare/version.py"]


def test_every_optional_import_has_an_extra():
    imported = set()
    for path in (ROOT / "src" / "softshare").rglob("*.py"):
        imported |= set(re.findall(r'import_optional\(\s*"([\w.]+)"', path.read_text()))
    assert imported  # the scan reads the calls
    packages = {package for reqs in extras().values() for package in reqs}
    for module in imported - {"softshare"}:
        assert DISTRIBUTIONS[module.split(".")[0]] in packages, module
    for extra in ("digits", "tensorboard", "wandb", "export"):
        assert extra in extras()


def test_readme_install_line_covers_the_presets_it_shows():
    installed = install_line_extras()
    assert installed <= set(extras())
    from softshare.train.config import PRESETS
    shown = set(re.findall(r"--preset (\w+)", README))
    assert "digits_tiny" in shown
    for preset in shown:
        extra = DATASET_EXTRAS.get(PRESETS[preset].get("dataset"))
        assert extra is None or extra in installed, preset
    for extra in set(re.findall(r"softshare\[(\w+)\]", README)):  # every extra the README names exists
        assert extra in extras(), extra
