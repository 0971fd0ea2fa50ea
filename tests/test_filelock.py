"""The output folder's lock (fcntl.flock): one holder among many, released by the kernel when
its holder is killed, and never refused because a pid in an old file looks alive."""

import multiprocessing as mp
import os
import signal
import socket

import pytest

from mlem_jax._filelock import DirectoryLock, LockHeld


def _contender(folder, barrier, done, results):
    barrier.wait()
    try:
        DirectoryLock(folder).acquire()
    except LockHeld:
        results.put("held")
        return
    results.put("took")
    done.wait(60)  # keep holding (alive) until every contender has tried


def test_exactly_one_of_many_takes_the_lock(tmp_path):
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


def _hold_forever(folder, ready):
    DirectoryLock(folder).acquire()
    ready.set()
    signal.pause()


def test_a_holder_killed_with_sigkill_releases_the_lock(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_forever, args=(str(tmp_path), ready))
    p.start()
    assert ready.wait(30)
    with pytest.raises(LockHeld, match=rf"another trainer \(host {socket.gethostname()}, pid {p.pid}\)"):
        DirectoryLock(str(tmp_path)).acquire()
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    with DirectoryLock(str(tmp_path)):  # the kernel dropped the dead holder's lock
        assert (tmp_path / ".lock").read_text() == f"host {socket.gethostname()}, pid {os.getpid()}"


def test_a_leftover_file_naming_a_live_pid_does_not_block(tmp_path):
    """A container restarted with the same host name and pid (often pid 1) finds its old lock
    file naming itself: only a held lock refuses, not the file's contents."""
    (tmp_path / ".lock").write_text(f"host {socket.gethostname()}, pid {os.getpid()}")
    with DirectoryLock(str(tmp_path)):
        with pytest.raises(LockHeld, match="another trainer"):
            DirectoryLock(str(tmp_path)).acquire()  # a second holder, even in this process, is refused
    assert not (tmp_path / ".lock").exists()
    DirectoryLock(str(tmp_path)).release()  # releasing a lock never taken is a no-op
