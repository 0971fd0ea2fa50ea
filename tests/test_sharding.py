"""Sampling and training over 4 (fake CPU) devices, and 2 processes on localhost.

Each check runs in a subprocess, because the device count is fixed when JAX starts."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "sharding_worker.py")


def run(*args, devices=4, timeout=600):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_sharded_sampling_equals_one_device_and_keeps_the_cond():
    r = run("sample")
    assert r["devices"] == 4 and r["sharding_devices"] == 4
    assert r["shape"] == [10, 4]  # 10 samples over 4 devices: padded to 12, trimmed
    # the same samples as on one device; the per-device matmuls may round differently
    assert r["equal"] or r["max_diff"] < 1e-5, r
    assert r["evals_equal"]  # replicated level key: the same levels run everywhere
    assert r["conditional"] >= 2  # ML-EM skipping survives sharding in the compiled program


def test_data_parallel_training_matches_one_device(tmp_path):
    r = run("train", str(tmp_path / "ckpt"))
    np.testing.assert_allclose(r["loss_4"], r["loss_1"], rtol=1e-5)
    assert r["restored_equal"]  # the same checkpoints as single-device training
    assert "batch_size: 10 does not split over the 4 devices" in r["indivisible_error"]


def test_two_processes_on_localhost(tmp_path):
    from mlem_jax.sharding import merge_shards

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    path = str(tmp_path / "samples.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, WORKER, "host", port, str(p), path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for p in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads([ln for ln in o.splitlines() if ln.startswith("RESULT ")][-1][7:]) for o, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["count"] == 2 for r in results)
    merged = merge_shards(path, 2)
    assert merged["y"].shape == (10, 4)
    np.testing.assert_array_equal(merged["offset"], [0] * 5 + [5] * 5)
    # the same samples as one process computing the whole batch
    sys.path.insert(0, HERE)
    from sharding_worker import sample_one

    y, _ = jax.jit(jax.vmap(sample_one, in_axes=(0, None)))(jax.random.split(jax.random.key(0), 10), jax.random.key(1))
    np.testing.assert_allclose(merged["y"], np.asarray(y), atol=1e-5)


def test_merge_reports_a_missing_shard(tmp_path):
    from mlem_jax.sharding import merge_shards

    with pytest.raises(FileNotFoundError, match=r"merge: shard .* of process 1 is missing"):
        np.savez(str(tmp_path / "s.process0.npz"), y=np.zeros(2))
        merge_shards(str(tmp_path / "s.npz"), 2)


def test_cli_multihost_sample_and_merge(tmp_path):
    """Two `mlem-jax sample` processes on localhost, then `mlem-jax merge`: the same
    images as one process sampling the whole batch."""
    from mlem_jax.cli import main

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    out = str(tmp_path / "multi.png")
    common = ["--steps", "5", "--batch-size", "6", "--levels", "1", "2", "--no-progress"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "mlem_jax.cli", "sample", *common, "--out", out,
                               "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(p)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for p in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert main(["merge", "--out", out, "--num-processes", "2"]) == 0
    single = str(tmp_path / "single.png")
    assert main(["sample", *common, "--out", single]) == 0
    # the same samples; convolutions over batches of 3 and of 6 round differently
    np.testing.assert_allclose(np.load(tmp_path / "multi.npz")["images"], np.load(tmp_path / "single.npz")["images"],
                               rtol=1e-4, atol=1e-4)
