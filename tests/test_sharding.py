"""Sampling and training over several (fake CPU) devices and several processes as one
SPMD program (jax.distributed on localhost, gloo collectives).

Each check runs in subprocesses, because the device count and the process group are fixed
when JAX starts; every subprocess has a timeout, so a hung collective fails the test
instead of hanging CI."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "sharding_worker.py")
# a subprocess's limit: 240 s on an idle machine, scaled up by the load at start (a loaded 2-core CI machine
# ran these 3-4x slower), and by MLEM_TEST_TIMEOUT (seconds) where a machine is known to be slower still
LOAD = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
TIMEOUT = float(os.environ.get("MLEM_TEST_TIMEOUT", 240)) * min(LOAD, 4.0)


def _timed_out(e, stderr=""):
    pytest.fail(f"a worker process did not finish in {TIMEOUT:.0f} s (load {LOAD:.1f} per core at start): the "
                f"machine is too slow or a collective hung; set MLEM_TEST_TIMEOUT to allow more ({e.cmd[-1]!r})"
                + (f"\n{stderr}" if stderr else ""))


def env(devices):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    # keeps conftest's optimisation level; a worker still running 15 s before its limit prints every thread's stack
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", MLEM_WORKER_DUMP_AFTER=str(max(5.0, TIMEOUT - 15)))


def result(stdout):
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def run(*args, devices=4):
    try:
        proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, env=env(devices),
                              timeout=TIMEOUT)
    except subprocess.TimeoutExpired as e:
        _timed_out(e)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return result(proc.stdout)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])


def run_processes(argv_of, n=2, devices=2):
    """Start n processes (argv_of(pid) each), wait for all; (returncodes, stdouts, stderrs).
    Output goes to files, not pipes: a process blocked on a full pipe would stall the
    collectives (and the shutdown barrier) of the others."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        files = [(open(os.path.join(d, f"{p}.out"), "w+"), open(os.path.join(d, f"{p}.err"), "w+")) for p in range(n)]
        procs = [subprocess.Popen(argv_of(p), stdout=o, stderr=e, text=True, env=env(devices))
                 for p, (o, e) in enumerate(files)]
        try:
            for p in procs:
                try:
                    p.wait(timeout=TIMEOUT)
                except subprocess.TimeoutExpired as e:
                    for q in procs:
                        q.kill()
                    tails = []
                    for i, (_, err) in enumerate(files):  # what each process said: a hang is otherwise blind
                        err.seek(0)
                        tails.append(f"process {i} stderr: ...{err.read()[-1500:]}")
                    _timed_out(e, "\n".join(tails))
        finally:
            for p in procs:
                p.kill()
        texts = []
        for o, e in files:
            o.seek(0), e.seek(0)
            texts.append((o.read(), e.read()))
            o.close(), e.close()
    return [p.returncode for p in procs], [o for o, _ in texts], [e for _, e in texts]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with 4 devices: sampling, and data-parallel training with a checkpoint."""
    ckpt = tmp_path_factory.mktemp("one") / "ckpt"
    return run("sample", devices=4), run("train", str(ckpt), devices=4)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Two processes with 2 devices each, one global mesh of 4. Process 1 starts training 3 s late, after
    process 0 has created the checkpoint folder: a per-process view of the folder must not decide which
    barriers a process enters (it did, and the pair hung on loaded machines)."""
    ckpt = str(tmp_path_factory.mktemp("two") / "ckpt")
    port = free_port()
    codes, outs, errs = run_processes(lambda p: [sys.executable, WORKER, "spmd", port, str(p), "2", ckpt, "3"])
    for c, e in zip(codes, errs):
        assert c == 0, e[-3000:]
    return [result(o) for o in outs], ckpt


def test_sharded_sampling_equals_one_device_and_keeps_the_cond(single):
    r, _ = single
    assert r["devices"] == 4 and r["sharding_devices"] == 4
    assert np.asarray(r["y"]).shape == (10, 4)  # 10 samples over 4 devices: padded to 12, trimmed
    # the same samples as on one device; the per-device matmuls may round differently
    np.testing.assert_allclose(r["y"], r["y1"], rtol=0, atol=1e-5)
    assert r["evals"] == r["evals1"]  # replicated level key: the same levels run everywhere
    assert r["conditional"] >= 2  # ML-EM skipping survives sharding in the compiled program


def test_data_parallel_training_matches_one_device(single):
    _, r = single
    np.testing.assert_allclose(r["loss_4"], r["loss_1"], rtol=1e-5)
    assert r["restored_equal"]  # the checkpoint written from 4 devices restores on one
    assert "batch_size: 10 does not split over the 4 devices" in r["indivisible_error"]


def test_two_processes_sample_the_same_as_one_process(single, two_processes):
    """1 process x 4 devices and 2 processes x 2 devices: the same program over a mesh of
    4, so the same samples bit for bit, and every process holds the whole batch."""
    (r0, r1), _ = two_processes
    one, _ = single
    assert {r0["process"], r1["process"]} == {0, 1} and r0["processes"] == 2 and r0["devices"] == 4
    assert r0["y"] == r1["y"] == one["y"]
    assert r0["evals"] == one["evals"]


def test_two_process_training_matches_one_process(single, two_processes):
    (r0, r1), _ = two_processes
    _, one = single
    np.testing.assert_allclose(r0["loss"], one["loss_1"], rtol=1e-5)
    assert r0["loss"] == r1["loss"] and r0["ema"] == r1["ema"]  # one replicated state
    assert "batch_size: 6 does not split over the 4 devices" in r0["indivisible_error"]


@pytest.fixture(scope="module")
def two_devices(two_processes):
    """One process with 2 devices: levels side by side, and the 2-process checkpoint restored."""
    _, ckpt = two_processes
    return run("levels", ckpt, devices=2)


def test_two_process_checkpoint_restores_on_other_topologies(two_processes, two_devices):
    """Written once by 2 processes x 2 devices; restored on 1 process x 2 devices
    (replicated) and on this process's single device."""
    (r0, _), ckpt = two_processes
    assert two_devices["replicated_on"] == 2 and two_devices["ema"] == r0["ema"]
    from mlem_jax.diffusion.checkpoint import load_level

    _, ema, _, _, _ = load_level(ckpt)
    import jax

    assert [np.asarray(a).tolist() for a in jax.tree_util.tree_leaves(ema)] == r0["ema"]


def test_levels_side_by_side_equal_levels_one_by_one(single, two_devices):
    """Two levels on 2 devices, one each (in two threads at once), each the same as the
    level trained alone on one device."""
    _, alone = single
    r = two_devices
    assert r["parallel_devices"] == [[0], [1]]
    for par in r["loss_parallel"]:
        np.testing.assert_allclose(par, alone["loss_1"], rtol=1e-6)


SUPERVISED = [sys.executable, "-m", "mlem_jax.parallel"]


def ends_in_one_line(err):
    """The process's stderr ends in the supervisor's line, with none of the runtime's abort before it."""
    assert "Check failure" not in err and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "(JAX's report: " in last, err[-2000:]
    return last


def test_a_process_without_its_coordinator_fails_in_time():
    """Process 1 of 2 with nobody at the coordinator's address, under the supervisor: one line
    naming --coordinator after the join timeout (5 s), not a hang or a C++ abort."""
    proc = subprocess.run([*SUPERVISED, sys.executable, WORKER, "join", free_port(), "1", "2", "5"],
                          capture_output=True, text=True, env=env(1), timeout=TIMEOUT)
    assert proc.returncode == 1
    last = ends_in_one_line(proc.stderr)
    assert "could not join the run in time" in last and "--coordinator" in last, last


def test_the_same_process_id_twice_is_one_line_in_every_process():
    """Ids 0, 1, 1 of 3 under the supervisor: JAX's coordination service refuses the second
    registration of id 1 (that process says so in one line) and the others end at the join
    timeout, each in one line (JAX does not say which id is missing), all with status 1
    instead of a C++ abort, and with no port but the coordinator's."""
    port = free_port()
    # the join timeout bounds the others' end; on a loaded machine the interpreters start seconds apart
    codes, _, errs = run_processes(lambda p: [*SUPERVISED, sys.executable, WORKER, "join", port, str(min(p, 1)), "3",
                                              "15"], n=3, devices=1)
    assert codes == [1, 1, 1], (codes, [e[-1500:] for e in errs])
    lines = [ends_in_one_line(e) for e in errs]
    assert sum("its id was given twice" in ln for ln in lines) == 1, lines
    assert sum("could not join the run in time" in ln for ln in lines) == 2, lines


def test_a_peer_killed_mid_run_stops_the_survivor_with_one_line_in_bounded_time():
    """Process 1 of 2 is killed (SIGKILL) after the join while process 0 runs collectives: under the
    supervisor process 0 exits with status 1 and one line naming process 1 once JAX's heartbeat
    timeout (10 s here) has passed, and its full report is in the file the line names."""
    import time

    port = free_port()
    t0 = time.monotonic()
    codes, outs, errs = run_processes(lambda p: [*SUPERVISED, sys.executable, WORKER, "lose", port, str(p), "2"],
                                      devices=1)
    took = time.monotonic() - t0
    assert codes == [1, 128 + 9], (codes, errs[0][-2000:])
    last = ends_in_one_line(errs[0])
    assert last.startswith("error: process 1 stopped sending heartbeats") or "closed its connection" in last, last
    report = last.rpartition("(JAX's report: ")[2].rstrip(")")
    with open(report) as f:
        assert "Check failure" in f.read()
    os.remove(report)
    assert "JOINED" in outs[0] and took < 100 * min(LOAD, 4.0), took


def test_losing_the_coordinator_stops_the_others_with_one_line():
    """Process 0 (which hosts JAX's coordination service) is killed: process 1 ends in one line
    naming process 0, with status 1."""
    port = free_port()
    codes, _, errs = run_processes(lambda p: [*SUPERVISED, sys.executable, WORKER, "lose", port, str(p), "2", "0"],
                                   devices=1)
    assert codes == [128 + 9, 1], (codes, errs[1][-2000:])
    last = ends_in_one_line(errs[1])
    assert last.startswith("error: process 0 (the coordinator) died, was killed or cannot be reached"), last


def test_sigterm_ends_a_process_of_a_run_and_the_others_say_so():
    """SIGTERM to process 0's supervisor, while both processes run collectives: the supervisor passes
    it on and process 0 ends by it (status 143), where JAX's preemption service used to swallow it and
    the run went on; process 1 then ends in one line naming process 0."""
    import signal
    import time

    port = free_port()
    argv = lambda p: [*SUPERVISED, sys.executable, WORKER, "lose", port, str(p), "2", "9"]  # nobody kills itself
    with open(os.devnull, "w") as null:
        procs = [subprocess.Popen(argv(p), stdout=subprocess.PIPE, stderr=null if p == 0 else subprocess.PIPE,
                                  text=True, env=env(1)) for p in range(2)]
    try:
        assert procs[0].stdout.readline().strip() == "JOINED"
        time.sleep(1)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=30) == 128 + signal.SIGTERM
        _, err = procs[1].communicate(timeout=TIMEOUT)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 1, err[-2000:]
    last = ends_in_one_line(err)
    assert "process 0 (the coordinator)" in last or "closed its connection" in last, last


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id: expected 0 <= process_id < num_processes = 2, got 2."),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     "--coordinator: expected 'host:port'"),
    (["--coordinator", "localhost:1234", "--num-processes", "2"], "--process-id: a multi-process run needs"),
])
def test_bad_multiprocess_flags_get_one_line(argv, message, capsys):
    from mlem_jax.cli import main

    for command in ("sample", "train"):
        assert main([command, *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_cli_two_process_sample_writes_once_and_equals_one_process(tmp_path):
    """Two `mlem-jax sample` processes on localhost (one device each): process 0 writes
    the images, the same as one process sampling the whole batch."""
    from mlem_jax.cli import main

    out = str(tmp_path / "multi.png")
    common = ["--steps", "5", "--batch-size", "6", "--levels", "1", "2", "--no-progress"]
    port = free_port()
    codes, outs, errs = run_processes(lambda p: [
        sys.executable, "-m", "mlem_jax.cli", "sample", *common, "--out", out, "--coordinator", f"localhost:{port}",
        "--num-processes", "2", "--process-id", str(p)], devices=1)
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert "wrote" in outs[0] and "wrote" not in outs[1]  # process 0 writes; the others stay quiet
    single = str(tmp_path / "single.png")
    assert main(["sample", *common, "--out", single]) == 0
    # the same samples; convolutions over batches of 3 and of 6 round differently
    np.testing.assert_allclose(np.load(tmp_path / "multi.npz")["images"], np.load(tmp_path / "single.npz")["images"],
                               rtol=1e-4, atol=1e-4)
