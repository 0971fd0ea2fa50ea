# Each target creates its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## demo: the main job on the embedded default (the toy complexity benchmark, quick mode)
demo: $(STAMP)
	$(PY) benchmarks/toy_complexity.py --quick

## test: the test suite
test: $(STAMP)
	$(PY) -m pytest -q

## bench-quick: every benchmark in its --quick mode (what CI runs)
bench-quick: $(STAMP)
	$(PY) benchmarks/toy_complexity.py --quick
	$(PY) benchmarks/overhead.py --quick
	$(PY) benchmarks/calibrated_probabilities.py --quick

## bench: the full benchmarks; figures go to docs/figures
bench: $(STAMP)
	$(PY) benchmarks/toy_complexity.py --out docs/figures
	$(PY) benchmarks/overhead.py --out docs/figures
	$(PY) benchmarks/calibrated_probabilities.py --out docs/figures

clean:
	rm -rf $(VENV) benchmarks/out .pytest_cache
