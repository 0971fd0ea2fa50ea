"""The benchmark pieces that carry logic of their own, and the CelebA script end to end
at tiny scale on tfds mock data (the real run needs a GPU and a prepared celeb_a)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from image_analysis import cost_to_reach  # noqa: E402


def test_cost_to_reach_interpolates_on_the_front():
    costs, errors = [1.0, 2.0, 4.0, 3.0], [0.8, 0.4, 0.1, 0.5]  # the run at cost 3 is off the front
    c, how = cost_to_reach(costs, errors, 0.2)
    # log-log between (2, 0.4) and (4, 0.1): 0.2 is half way in log error
    assert how == "interpolated" and np.isclose(c, 2 * np.sqrt(2))
    assert cost_to_reach(costs, errors, 0.9) == (1.0, "at most")
    assert cost_to_reach(costs, errors, 0.05) == (None, "not reached")
    assert cost_to_reach(costs, errors, 0.4) == (2.0, "interpolated")


def test_celeba_script_end_to_end_on_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    import celeba64

    out = tmp_path / "celeba"
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        result = celeba64.main(["--data-dir", str(tmp_path / "tfds"), "--out", str(out), "--nfs", "4", "8",
                                "--ch-mult", "2", "--image-size", "16", "--train-steps", "3",
                                "--batch-size", "8", "--tiny", "--no-progress",
                                # one grid per method: the script's own wiring is under test here;
                                # bench-quick runs the experiment's full quick grid on Fashion-MNIST
                                "--set", "em_steps=(4,)", "targets=(4,)", "mlem_steps=(8,)", "stitch_steps=(8,)",
                                "geometric_steps=()", "ode_steps=(4,)", "heun_steps=(2,)", "ode_mlem_steps=(8,)",
                                "grid_cost_steps=4", "classifier_steps=10", "bootstrap=5"])
    assert (out / "family.npz").exists() and json.load(open(out / "family.json"))["dataset"] == "celeb_a"
    for name in ("celeba64.json", "celeba64.md", "celeba64_sde.png", "celeba64_ode.png", "celeba64_samples.png"):
        assert (out / name).exists(), name
    methods = {r["method"] for r in result["runs"]}
    assert {"EM nf=8", "EM nf=4", "T-Stitch nf=4->8 (50% small)", "Heun nf=8",
            "ML-EM stratified calibrated (independent)", "ML-EM iid constant (independent)",
            "ML-EM ODE stratified calibrated"} <= methods
    for r in result["runs"]:
        assert np.isfinite(r["seconds"]) and r["flops"] > 0 and r["rms"] >= 0
        if r["distribution"]:
            assert np.isfinite(r["fid"]) and r["fid_se"] >= 0 and np.isfinite(r["kid"])
        if r["method"].startswith("ML-EM"):  # counted by the solver: the cheapest level runs on every step
            assert r["evaluations"][0] == r["steps"] and max(r["evaluations"][1:]) <= r["steps"]


def test_celeba_script_explains_a_missing_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    import celeba64

    with pytest.raises(SystemExit, match="--data-dir: celeb_a is not prepared"):
        celeba64.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
