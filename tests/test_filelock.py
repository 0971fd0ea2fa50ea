"""The output folder's lock: one holder, stale locks taken over once, other hosts never judged dead."""

import multiprocessing as mp
import os
import socket

import pytest

from mlem_jax._filelock import DirectoryLock, LockHeld

DEAD_PID = 999_999_999


def _contender(folder, barrier, done, results):
    barrier.wait()
    try:
        DirectoryLock(folder).acquire()
    except LockHeld:
        results.put("held")
        return
    results.put("took")
    done.wait(60)  # keep holding (alive) until every contender has tried


def test_a_stale_lock_is_taken_over_by_exactly_one_of_many(tmp_path):
    (tmp_path / ".lock").write_text(f"{socket.gethostname()} {DEAD_PID}")
    ctx = mp.get_context("fork")
    n = 6
    barrier, done, results = ctx.Barrier(n), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(tmp_path), barrier, done, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in range(n)]
    done.set()
    for p in procs:
        p.join(timeout=60)
    assert outcomes.count("took") == 1, outcomes
    assert not (tmp_path / ".lock.takeover").exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / ".lock").write_text(f"some-other-host {DEAD_PID}")
    with pytest.raises(LockHeld, match="a trainer on host some-other-host .* cannot be judged"):
        DirectoryLock(str(tmp_path)).acquire()


def test_old_locks_and_a_live_owner(tmp_path):
    (tmp_path / ".lock").write_text(str(DEAD_PID))  # a bare pid (older lock files): this host's, dead
    with DirectoryLock(str(tmp_path)):
        assert (tmp_path / ".lock").read_text() == f"{socket.gethostname()} {os.getpid()}"
        with pytest.raises(LockHeld, match=f"another trainer \\(pid {os.getpid()}\\)"):
            DirectoryLock(str(tmp_path)).acquire()
    assert not (tmp_path / ".lock").exists()
