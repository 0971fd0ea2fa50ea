"""Files: atomic writes (a file appears whole or not at all, and an existing one is replaced
only when the new one is complete), and JSON reads whose failures name the file.

`atomic_path(path)` yields a temporary name in the same folder, created exclusively (it
never follows a planted symlink or reuses another writer's file), flushes it to disk
(`fsync`) and renames it onto `path` when the block ends without an error; on any error, an
interrupt included, the temporary file is removed and `path` is left as it was. With
`exclusive=True` the file is put in place only if `path` does not exist at that moment (a
hard link, which fails on an existing name), so that two runs writing one output cannot
silently replace each other: the second gets `FileExistsError`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from mlem_jax._errors import InputError


@contextlib.contextmanager
def atomic_path(path: str, exclusive: bool = False):
    """A temporary path to write; put in place at `path` on success (replacing it, or with
    `exclusive`, only if `path` does not exist then), removed on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path)[:64] + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, widened to what open() would have given
        _fsync(tmp)
        if exclusive:
            _place_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_exclusive(tmp: str, path: str) -> None:
    """Move `tmp` to `path` unless `path` exists: a hard link fails atomically on an existing
    name; where the file system has no hard links, the check and the rename are two steps."""
    taken = FileExistsError(f"{path} appeared while this run computed (another run wrote it); nothing was written "
                            "over it.")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise taken from None
    except OSError:
        if os.path.lexists(path):
            raise taken from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (changing it, even for
    a moment, races with other threads creating files, such as orbax's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_json(path: str, prefix: str):
    """The JSON value in `path`; a file that is not UTF-8 or not valid JSON is a ValueError starting with
    `prefix` (the caller's name for the file, for example "family: x.json is")."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise InputError(f"{prefix} not UTF-8 text ({e.reason} at byte {e.start}); the file is damaged or not "
                         "what it should be.") from e
    except json.JSONDecodeError as e:
        raise InputError(f"{prefix} not valid JSON ({e}); it may be truncated.") from e
