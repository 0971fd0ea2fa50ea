"""Files: atomic writes (a file appears whole or not at all, and an existing one is replaced
only when the new one is complete), and JSON reads whose failures name the file.

`atomic_path(path)` yields a temporary name in the same folder, created exclusively (it
never follows a planted symlink or reuses another writer's file), and renames it onto
`path` when the block ends without an error; on any error, an interrupt included, the
temporary file is removed and `path` is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path to write; renamed onto `path` on success, removed on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path)[:64] + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600, widened to what open() would have given
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
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
        raise ValueError(f"{prefix} not UTF-8 text ({e.reason} at byte {e.start}); the file is damaged or not "
                         "what it should be.") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{prefix} not valid JSON ({e}); it may be truncated.") from e
