"""An exclusive lock on an output folder: FOLDER/.lock, created with O_EXCL and holding the
owner's pid, so that two writers (trainers) cannot write the same checkpoints. A lock left
by a process that is gone is taken over."""

from __future__ import annotations

import os


class LockHeld(RuntimeError):
    """Another live process holds the lock (or it could not be taken)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """`with DirectoryLock(folder):` holds folder/.lock; `acquire()` / `release()` by hand."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")

    def acquire(self) -> "DirectoryLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(self.path) as f:
                        pid = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _alive(pid):
                    raise LockHeld(f"another trainer (pid {pid}) is writing {os.path.dirname(self.path)}; wait for "
                                   f"it or use another output folder (remove {self.path} if that process is gone).")
                os.remove(self.path)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return self
        raise LockHeld(f"could not take the lock {self.path}.")

    def release(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
