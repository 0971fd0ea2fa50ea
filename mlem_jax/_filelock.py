"""An exclusive lock on an output folder, FOLDER/.lock, held with `fcntl.flock` so that two
writers (trainers) cannot write the same checkpoints.

The kernel holds the lock for the process and drops it when the process ends, however it
ends (kill -9 included): there is no pid to judge alive, so no stale lock to take over, and
a container restarted with the same host name and pid is not refused. The file holds the
owner's host and pid only to say who holds it. On release the file is removed while still
locked; an acquirer that locked a file which was removed meanwhile (it checks the inode)
starts again, so a release and an acquire cannot both end up "holding" different files.

`flock` on NFS is emulated with byte-range locks (Linux 2.6.12 and later), which the server
coordinates between hosts; on file systems with no locking at all, `acquire` raises.
"""

from __future__ import annotations

import fcntl
import os
import socket


class LockHeld(RuntimeError):
    """Another live process holds the lock (or it could not be taken)."""


class DirectoryLock:
    """`with DirectoryLock(folder):` holds folder/.lock; `acquire()` / `release()` by hand."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise LockHeld(f"another trainer ({owner or 'owner unknown'}) is writing {os.path.dirname(self.path)}; "
                               "wait for it or use another output folder.") from None
            except OSError as e:
                os.close(fd)
                raise LockHeld(f"could not lock {self.path} ({e.strerror or e}): this file system may not support "
                               "locks; use an output folder on a local disk.") from e
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released (and removed) between our open and our lock: try the new file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}".encode(), 0)
            self._fd = fd
            return self
        raise LockHeld(f"could not take the lock {self.path}.")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.remove(self.path)  # while still locked: a waiting acquirer sees the inode change
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
