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

## demo: the main job: EM against ML-EM on the shipped digits family (writes demo.png)
demo: $(STAMP)
	$(VENV)/bin/mlem-jax demo

## test: the test suite
test: $(STAMP)
	$(PY) -m pytest -q

## bench-quick: every benchmark in its --quick mode (what CI runs)
bench-quick: $(STAMP)
	$(VENV)/bin/mlem-jax demo --steps 20 --batch-size 16 --no-progress --out benchmarks/out/demo_quick.png
	$(PY) benchmarks/toy_complexity.py --quick
	$(PY) benchmarks/overhead.py --quick
	$(PY) benchmarks/calibrated_probabilities.py --quick
	$(PY) benchmarks/diffrax_route.py --quick
	$(PY) benchmarks/sharding_throughput.py --quick

## bench: the full benchmarks; figures go to docs/figures
bench: $(STAMP)
	$(PY) benchmarks/toy_complexity.py --out docs/figures
	$(PY) benchmarks/overhead.py --out docs/figures
	$(PY) benchmarks/calibrated_probabilities.py --out docs/figures
	$(PY) benchmarks/diffrax_route.py --out docs/figures
	$(PY) benchmarks/sharding_throughput.py --out docs/figures

clean:
	rm -rf $(VENV) benchmarks/out .pytest_cache
