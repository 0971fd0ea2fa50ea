"""An exclusive lock on an output folder: FOLDER/.lock, created atomically with the owner's
host name and pid in it (a hard link of a written file, which fails if the lock exists; where
the file system has no hard links, O_EXCL), so that two writers (trainers) cannot write the
same checkpoints.

A lock left by a process that is gone is taken over, under a second, short-lived lock
(FOLDER/.lock.takeover, also created with O_EXCL): the taker reads the lock again under it and
removes it only if it is still the stale one, so two takers cannot both succeed. Liveness can only
be judged on the lock's own host: a lock from another host is never taken over (the error says
which host and pid hold it, and to remove the file if that trainer is gone)."""

from __future__ import annotations

import os
import socket
import time


class LockHeld(RuntimeError):
    """Another live process holds the lock (or it could not be taken)."""


TAKEOVER_STALE_S = 60.0  # a takeover lock older than this was left by a taker that died mid-takeover


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: str) -> tuple[str, int] | None:
    """(host, pid) written in the lock, None if it is gone; a lock from before hosts were recorded (a bare
    pid) is this host's, an unreadable one (host '', pid 0)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return "", 0
    host, _, pid = text.rpartition(" ")
    try:
        return (host or socket.gethostname()), int(pid or 0)
    except ValueError:
        return "", 0


class DirectoryLock:
    """`with DirectoryLock(folder):` holds folder/.lock; `acquire()` / `release()` by hand."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, ".lock")

    def acquire(self) -> "DirectoryLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = socket.gethostname()
        # the lock appears with its owner already written (a hard link of a finished file): a
        # lock created empty and written after could be read, empty, as a dead owner's
        mine = f"{self.path}.{me}.{os.getpid()}"
        with open(mine, "w") as f:
            f.write(f"{me} {os.getpid()}")
        try:
            return self._acquire(mine, me)
        finally:
            os.remove(mine)

    def _acquire(self, mine: str, me: str) -> "DirectoryLock":
        for _ in range(3):
            try:
                self._create(mine, me)
            except FileExistsError:
                owner = _owner(self.path)
                if owner is None:  # released meanwhile
                    continue
                host, pid = owner
                folder = os.path.dirname(self.path)
                if host and host != me:
                    raise LockHeld(f"a trainer on host {host} (pid {pid}) holds {self.path}, and whether it is alive "
                                   f"cannot be judged from {me}; wait for it, use another output folder, or remove "
                                   f"{self.path} if that trainer is gone.")
                if pid and _alive(pid):
                    raise LockHeld(f"another trainer (pid {pid}) is writing {folder}; wait for it or use another "
                                   f"output folder (remove {self.path} if that process is gone).")
                self._take_over(owner)
                continue
            return self
        raise LockHeld(f"could not take the lock {self.path}.")

    def _create(self, mine: str, me: str) -> None:
        """Make the lock a hard link of `mine`; FileExistsError if it exists."""
        try:
            os.link(mine, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: create, then write (a reader may see it empty)
            with os.fdopen(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY), "w") as f:
                f.write(f"{me} {os.getpid()}")

    def _take_over(self, stale: tuple[str, int]) -> None:
        """Remove the lock if it still names the dead owner `stale`, under the takeover lock."""
        guard = self.path + ".takeover"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(guard) > TAKEOVER_STALE_S:
                    os.remove(guard)  # its taker died in the middle: the next attempt proceeds
            except FileNotFoundError:
                pass
            time.sleep(0.05)  # another process is taking over: look again
            return
        try:
            os.close(fd)
            if _owner(self.path) == stale:  # still the dead owner's lock, not a new one taken meanwhile
                os.remove(self.path)
        finally:
            os.remove(guard)

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
