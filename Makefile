# Each target creates its own virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# XLA's persistent compilation cache: the tests and benchmarks compile the same small programs many times
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.2

.PHONY: demo test lint docs bench bench-quick testbed-mixture testbed-ladder fmnist16-weights fmnist16-cond-weights fmnist16-nf64-weights fmnist16-flow-weights demo-family fmnist16x5 clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## demo: the main job: the best single-network sampler against the best multilevel one at equal error against the true flow, on the exact testbed (writes out/demo.png, out/demo_gain.png and out/demo.npz)
demo: $(STAMP)
	$(VENV)/bin/mlem-jax demo

## test: the test suite
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=30

## lint: ruff (configuration in pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check mlem_jax benchmarks tests

## docs: the documentation site (mkdocs-material + mkdocstrings, API reference from the docstrings) into site/, --strict
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

## bench-quick: every benchmark in its --quick mode (what CI runs), two at a time (the output of each printed whole when it ends); QUICK_JOBS=1 runs them one after another
QUICK_JOBS ?= 2
# the longest first, so that two queues end together
QUICK_RUNS := demo fmnist16 envelope_fmnist16 solver_calibration advise_law sharding_throughput flow_vs_vp \
	calibrated_probabilities guided_fmnist16 flow_testbed parallel_levels testbed toy_complexity fid_resolution learn_cost \
	best_samplers overhead cached_coins family_costs diffrax_route
QUICK_ARGS_fmnist16 := --raw-data --no-ode
QUICK_ARGS_guided_fmnist16 := --out benchmarks/out/guided_quick
QUICK_ARGS_envelope_fmnist16 := --out benchmarks/out/envelope_quick
QUICK_ARGS_best_samplers := --out benchmarks/out/best_samplers_quick
QUICK_ARGS_testbed := --out benchmarks/out/testbed_quick
QUICK_ARGS_advise_law := --out benchmarks/out/advise_law_quick
QUICK_ARGS_flow_vs_vp := --out benchmarks/out/flow_vs_vp_quick
QUICK_ARGS_flow_testbed := --out benchmarks/out/flow_testbed_quick
.PHONY: $(addprefix quick/,$(QUICK_RUNS))
# Most quick runs compile far more than they run, so XLA's CPU backend compiles them at LLVM
# optimisation level 0 (as in the tests, tests/conftest.py); each run prints the flags beside its
# timings. From empty caches, two at a time on 2 cores: bench-quick 14.0 min at level 0 against
# 17.7 min at the default level (fmnist16 182 s against 305 s, the demo 198 against 263). The
# runs below spend more time running than compiling and were slower at level 0 (solver_calibration
# 302 s against 189), so they keep the default level.
QUICK_AT_DEFAULT_LEVEL := solver_calibration parallel_levels fid_resolution
QUICK_XLA_FLAGS := $(if $(findstring xla_backend_optimization_level,$(XLA_FLAGS)),$(XLA_FLAGS),$(strip $(XLA_FLAGS) --xla_backend_optimization_level=0))
$(addprefix quick/,$(filter-out $(QUICK_AT_DEFAULT_LEVEL),$(QUICK_RUNS))): export XLA_FLAGS = $(QUICK_XLA_FLAGS)
bench-quick: $(STAMP)
	$(MAKE) --no-print-directory -j$(QUICK_JOBS) --output-sync=target $(addprefix quick/,$(QUICK_RUNS))
# each quick run prints its command, then the wall time it took
timed = @echo '$(1)'; start=$$(date +%s); $(1) && echo "$@: $$(( $$(date +%s) - start )) s"
quick/demo: $(STAMP)
	$(call timed,$(VENV)/bin/mlem-jax demo --batch-size 16 --no-progress --out benchmarks/out/demo_quick)
$(addprefix quick/,$(filter-out demo,$(QUICK_RUNS))): quick/%: $(STAMP)
	$(call timed,$(PY) benchmarks/$*.py --quick $(QUICK_ARGS_$*))

## bench: the full benchmarks; figures go to docs/figures
bench: $(STAMP)
	$(PY) benchmarks/toy_complexity.py --out docs/figures
	$(PY) benchmarks/overhead.py --out docs/figures
	$(PY) benchmarks/calibrated_probabilities.py --out docs/figures
	$(PY) benchmarks/diffrax_route.py --out docs/figures
	$(PY) benchmarks/cached_coins.py --out docs/figures/cached_coins
	$(PY) benchmarks/solver_calibration.py --out docs/figures/solver_calibration
	$(PY) benchmarks/sharding_throughput.py --out docs/figures
	$(PY) benchmarks/fmnist16.py --out docs/figures/fmnist16
	$(PY) benchmarks/envelope_fmnist16.py --out docs/figures/envelope_fmnist16
	$(PY) benchmarks/testbed.py --out docs/figures/testbed
	$(PY) benchmarks/advise_law.py --out docs/figures/advise_law
	$(PY) benchmarks/flow_vs_vp.py --out docs/figures/flow_vs_vp
	$(PY) benchmarks/flow_testbed.py --out docs/figures/flow_testbed

## fmnist16-weights: retrain the committed Fashion-MNIST family (about 50 min on 2 cores)
fmnist16-weights: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.data import prepare_local as p; p('fashion_mnist', '/usr/share/datasets/fashion-mnist', 'data/tfds')"
	$(VENV)/bin/mlem-jax train --dataset fashion_mnist --data-dir data/tfds --image-size 16 --nfs 4 8 16 32 --steps 2000 --batch-size 128 --seed 0 --out runs/fmnist16 --no-progress
	mkdir -p benchmarks/weights
	cp runs/fmnist16/family.npz benchmarks/weights/fmnist16.npz
	cp runs/fmnist16/family.json benchmarks/weights/fmnist16.json

## fmnist16-cond-weights: the class-conditional Fashion-MNIST family nf 8..32 (label dropout 0.1, same recipe; resumes from runs/fmnist16_cond/checkpoints when stopped)
fmnist16-cond-weights: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.data import prepare_local as p; p('fashion_mnist', '/usr/share/datasets/fashion-mnist', 'data/tfds')"
	$(VENV)/bin/mlem-jax train --dataset fashion_mnist --data-dir data/tfds --image-size 16 --nfs 8 16 32 --steps 2000 --batch-size 128 --seed 0 --conditional --label-dropout 0.1 --out runs/fmnist16_cond --resume --no-progress
	mkdir -p benchmarks/weights
	cp runs/fmnist16_cond/family.npz benchmarks/weights/fmnist16_cond.npz
	cp runs/fmnist16_cond/family.json benchmarks/weights/fmnist16_cond.json

## fmnist16-nf64-weights: train the fifth level (nf=64, same recipe; about 2 h on 2 cores), then the demo family
fmnist16-nf64-weights: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.data import prepare_local as p; p('fashion_mnist', '/usr/share/datasets/fashion-mnist', 'data/tfds')"
	$(VENV)/bin/mlem-jax train --dataset fashion_mnist --data-dir data/tfds --image-size 16 --nfs 64 --steps 2000 --batch-size 128 --seed 0 --out runs/fmnist16_nf64 --no-progress
	$(MAKE) demo-family NF64=runs/fmnist16_nf64/family

## fmnist16-flow-weights: the rectified-flow family nf 8..32 (velocity prediction, logit-normal times, the VP family's recipe: 2000 steps per level; resumes from runs/fmnist16_flow/checkpoints when stopped; about 1 h on 2 cores)
fmnist16-flow-weights: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.data import prepare_local as p; p('fashion_mnist', '/usr/share/datasets/fashion-mnist', 'data/tfds')"
	$(VENV)/bin/mlem-jax train --dataset fashion_mnist --data-dir data/tfds --image-size 16 --nfs 8 16 32 --schedule flow --steps 2000 --batch-size 128 --seed 0 --out runs/fmnist16_flow --resume --no-progress
	mkdir -p benchmarks/weights
	cp runs/fmnist16_flow/family.npz benchmarks/weights/fmnist16_flow.npz
	cp runs/fmnist16_flow/family.json benchmarks/weights/fmnist16_flow.json

## demo-family: the demo's shipped family benchmarks/weights/fmnist16_demo: nf=16 of benchmarks/weights/fmnist16 + the nf=64 top (NF64, default: the shipped one)
NF64 ?= benchmarks/weights/fmnist16_demo
demo-family: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.family import combine_families as c; c(['benchmarks/weights/fmnist16', '$(NF64)'], 'benchmarks/weights/fmnist16_demo', nfs=(16, 64))"

## fmnist16x5: the five-level families nf 4..64 and 8..64 from the committed weights, then the CPU experiment on 8..64 (about 55 min on 2 cores; the GPU runs are in docs/figures/fmnist16x5/COMMAND)
fmnist16x5: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.family import combine_families as c; c(['benchmarks/weights/fmnist16', 'benchmarks/weights/fmnist16_demo'], 'runs/fmnist16x5/family', nfs=(4, 8, 16, 32, 64)); c(['benchmarks/weights/fmnist16', 'benchmarks/weights/fmnist16_demo'], 'runs/fmnist16x4_8/family', nfs=(8, 16, 32, 64))"
	$(PY) benchmarks/fmnist16.py --raw-data --family runs/fmnist16x4_8/family --name fmnist16x4_8_cpu --no-ode --out docs/figures/fmnist16x5 --set "couplings=('independent',)" "geometric_steps=()" "small_steps=(200,)" "em_steps=(25, 50, 100)" "stitch_steps=(50, 100)" "stitch_fractions=(0.3,)" "mlem_steps=(50, 100)" "equal_batch=False"

## testbed-mixture: refit the exact testbed's Gaussian mixture (256 components, rank 12) to Fashion-MNIST 16x16 from Debian's files, bit for bit the shipped mlem_jax/assets/fmnist16_mixture.npz (about 15 s)
testbed-mixture: $(STAMP)
	$(PY) -c "from mlem_jax.diffusion.mixture import fashion_mnist_mixture as f, save_mixture as s; s(f(), 'mlem_jax/assets/fmnist16_mixture.npz')"

## testbed-ladder: retrain the testbed's five MLP levels against the exact denoiser (resumable; about 1 h on 2 cores), then ship them
testbed-ladder: $(STAMP)
	$(PY) benchmarks/testbed_ladder.py --out runs/testbed_ladder --max-steps 12000 --no-progress
	mkdir -p mlem_jax/assets/fmnist16_ladder
	cp runs/testbed_ladder/ladder.npz runs/testbed_ladder/ladder.json mlem_jax/assets/fmnist16_ladder/

clean:
	rm -rf $(VENV) benchmarks/out .pytest_cache site .jax_cache
