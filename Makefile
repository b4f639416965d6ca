# Two commands set up a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
PIP     := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
FMNIST  := /usr/share/datasets/fashion-mnist
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow bench gpu-check venv clean data-fashion-mnist

.venv/.installed: pyproject.toml constraints.txt src/softshare/version.py
	test -x $(PY) || python3 -m venv .venv
	$(PIP) setuptools
	$(PIP) --no-build-isolation -e '.[test,lightning]'
	touch $@

venv: .venv/.installed

# Debian's dataset-fashion-mnist ships real Fashion-MNIST for the offline tests and presets.
data-fashion-mnist:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } || \
	  echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; }

# test: the default suite, one worker per core (pytest-xdist); test-slow: the end-to-end tests
# marked slow, one at a time (CI runs both). Times: README, the paragraph after the make commands.
test: venv data-fashion-mnist
	$(PY) -m pytest -q -n auto

test-slow: venv data-fashion-mnist
	$(PY) -m pytest -q -m slow

demo: venv
	$(PY) -m softshare demo

bench: venv
	$(PY) benchmarks/bench_sharing.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_data_algorithmic.py
	$(PY) benchmarks/bench_imagefolder.py

# On a CUDA machine (see docs/gpu.md): make gpu-check OUT=DIR [GPU_CHECK_ARGS=--dry-run]
OUT ?= runs/gpu-check
gpu-check: venv
	$(PY) benchmarks/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf .venv runs build src/*.egg-info .pytest_cache
