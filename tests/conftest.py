"""Shared test set-up: the tests folder on sys.path (helper modules), and the CLI tests' tiny family trained
for 2 steps (one per test module and worker), with calibrate's range checks switched off for it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# The tests compile hundreds of small programs and run each on tiny shapes, so XLA's CPU
# backend compiles them at LLVM optimisation level 0: test_guidance.py from an empty
# compilation cache took 187 s against 256 s at the default level, and 181 s against 205 s
# at level 1 (two pairs of runs, each pair side by side on 2 cores). The values differ from
# the default level's in their last bits at most; compiled_init follows the level (it is
# tested at both). An XLA_FLAGS that already names the level is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from mlem_jax.cli import _calibrate, main  # noqa: E402 (after the path)

TINY = ["--nfs", "4", "8", "--ch-mult", "2", "--batch-size", "16", "--no-progress"]
CHECK_RANGE = _calibrate._check_range


@pytest.fixture(autouse=True)
def tiny_families_are_noise(monkeypatch):
    """The fixture family trains 2 steps: its samples are noise, which calibrate refuses by default
    (test_an_undertrained_family_is_refused_and_warned holds that); elsewhere it is calibrated anyway,
    without the check's sampling run."""
    monkeypatch.setattr(_calibrate, "_check_range", lambda args, family, levels: None)
    monkeypatch.setattr(_calibrate, "MAX_PILOT_ERROR", None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--dataset", "procedural", "--steps", "2", "--checkpoint-every", "1",
                 "--out", str(out), *TINY]) == 0
    return out
