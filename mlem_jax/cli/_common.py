"""What the subcommands share: the one-line error, the parser, flag types, family/grid/level
arguments, output checks and writers, the training lock and the multi-process flags."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys

import numpy as np

from mlem_jax._errors import InputError


class CLIError(Exception):
    """A bad argument: printed as one line, exit status 2."""


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" on every flag, except where it says nothing (None, False) or the help
    already gives the default in words."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and a hint, not the whole usage block, and whose
    help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n  (see `{self.prog} --help`)\n")



# --------------------------------------------------------------------------- helpers


def positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {s!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
        return v

    return parse


DATA_SCALE = 2.0  # images live in [-1, 1]
SEED_LIMIT = 2**30  # seeds are offset (seed + 1, seed + 1_000_003) and must stay in int32 for jax.random.key


def seed(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**30), got {s}")
    return v


def family_arg(path):
    from mlem_jax.diffusion.family import load_family, shipped_family_path

    path = path or shipped_family_path()
    try:
        return load_family(path)
    except FileNotFoundError as e:
        raise CLIError(f"--family: {e}") from e


def time_grid(family, steps, grid):
    from mlem_jax.diffusion import karras_grid, logsnr_grid, quadratic_grid, uniform_grid

    if grid == "karras":
        return karras_grid(family.sde, steps)
    if grid == "logsnr":
        return logsnr_grid(family.sde, steps)
    return {"uniform": uniform_grid, "quadratic": quadratic_grid}[grid](steps, t_max=family.sde.t_max)


def level_indices(family, levels):
    K = len(family.models)
    if levels is None:
        return list(range(K))
    idx = [k - 1 for k in levels]
    if any(not 0 <= k < K for k in idx) or sorted(set(idx)) != idx:
        raise CLIError(f"--levels: expected increasing level numbers in 1..{K}, got {levels}.")
    return idx


def probabilities(args, levels, family):
    import jax.numpy as jnp

    if args.calibration:
        from mlem_jax.calibrate import check_calibration_use, load_calibration

        if args.probs is not None:
            raise CLIError("--calibration, --probs: give one of them (the calibration file holds the probabilities).")
        try:
            cal = load_calibration(args.calibration)
            check_calibration_use(cal, args.calibration, levels=[family.models[k].nf for k in levels],
                                  steps=args.steps, grid=args.grid, coins=args.coins, coupling=args.coupling,
                                  solver=getattr(args, "solver", "em"), control=control_of(args))
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"--calibration: {e}") from e
        return cal.probs
    if args.probs is not None:
        if len(args.probs) != len(levels):
            raise CLIError(f"--probs: expected {len(levels)} probabilities (one per level), got {len(args.probs)}.")
        p = np.asarray(args.probs, np.float64)
        if p[0] != 1 or np.any(p <= 0) or np.any(p > 1) or np.any(np.isnan(p)):
            raise CLIError(f"--probs: expected p_1 = 1 and every p in (0, 1], got {args.probs}.")
        return jnp.asarray(p, jnp.float32)
    from mlem_jax import geometric_probabilities

    return jnp.asarray(geometric_probabilities(len(levels), 0.3), jnp.float32)


def control_of(args):
    value = getattr(args, "control", "none")
    return None if value in (None, "none") else value


def command_line(args) -> str:
    """The command line that produced an output, recorded next to it."""
    return "mlem-jax " + " ".join(shlex.quote(a) for a in args.argv)


def write_samples(paths, images, extra, overwrite: bool = False):
    """The image grid (PNG) and the arrays (npz) at `paths` = (png, npz), each written atomically; on a
    failure (a full disk, ...) neither is left behind and the error is one line naming the file. Without
    `overwrite`, a file that another run wrote while this one computed is not replaced."""
    from mlem_jax._atomic import atomic_path
    from mlem_jax.diffusion.images import save_png, to_grid

    png, npz = paths
    with writing(png, npz):
        save_png(png, to_grid(images), scale=4, exclusive=not overwrite)
        with atomic_path(npz, exclusive=not overwrite) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, **extra)
    return png, npz


@contextlib.contextmanager
def writing(*paths):
    """Turn a failed write (no space, permission, ...) into one line naming the file; the files of `paths`
    written before the failure are removed, so that no partial output is left."""
    try:
        yield
    except FileExistsError as e:  # another run's output appeared at write time: keep it, remove ours
        for path in paths:
            if path not in str(e):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        raise CLIError(f"--out: {e} Choose another --out, or pass --overwrite to replace it.") from e
    except OSError as e:
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        where = e.filename or paths[0]
        raise CLIError(f"--out: could not write {where} ({e.strerror or e}); nothing was written.") from e


OUT_SUFFIXES = (".png", ".npz", ".npy", ".json")


def output_files(args, default_name: str, suffixes) -> list[str]:
    """The files that --out names, before any compute: a folder (existing, or ending in /) receives
    `default_name` + each suffix; otherwise --out is a stem (a known suffix such as .png is dropped). Refused:
    a name too long for the file system, a folder that cannot be written, or files that already exist
    (unless --overwrite)."""
    out = args.out
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        stem = os.path.join(out, default_name)
    else:
        root, ext = os.path.splitext(out)
        stem = root if ext.lower() in OUT_SUFFIXES else out
    paths = [stem + suffix for suffix in suffixes]
    check_out(paths[0])
    for path in paths:
        name_max = _limit(path, "PC_NAME_MAX", 255)
        if len(os.path.basename(path).encode()) > name_max:
            raise CLIError(f"--out: the file name {os.path.basename(path)[:40]}... has "
                           f"{len(os.path.basename(path).encode())} bytes, more than this file system's {name_max}; "
                           "choose a shorter --out.")
        if len(os.path.abspath(path).encode()) > _limit(path, "PC_PATH_MAX", 4096):
            raise CLIError(f"--out: the path of {path[:40]}... is longer than this file system allows; choose "
                           "a shorter --out.")
    inputs = _input_files(args)
    for path in paths:
        if os.path.realpath(path) in inputs:
            raise CLIError(f"--out: {path} is an input of this run ({inputs[os.path.realpath(path)]}); writing there "
                           "would destroy it, --overwrite or not. Choose another --out.")
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not getattr(args, "overwrite", False):
        raise CLIError(f"--out: {existing[0]} already exists (an earlier run's output?); pass --overwrite to "
                       "replace it, or choose another --out.")
    return paths


def _input_files(args) -> dict:
    """The files this run reads (their real paths), each with the flag that names it."""
    found = {}
    family = getattr(args, "family", None)
    if family:
        stem = family[: -len(".npz")] if family.endswith(".npz") else family[: -len(".json")] \
            if family.endswith(".json") else family
        for suffix in (".npz", ".json", ".calibration.json"):
            found[os.path.realpath(stem + suffix)] = f"--family {family}"
    for flag in ("calibration", "dataset"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and value:
            found[os.path.realpath(value)] = f"--{flag} {value}"
    return found


def _limit(path, name, default):
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return os.pathconf(probe, name)
    except (OSError, ValueError):
        return default


def _multiprocess(args) -> bool:
    """Whether the flags ask for a multi-process run; a one-line error when they cannot describe one."""
    given = {f"--{name.replace('_', '-')}": getattr(args, name, None)
             for name in ("coordinator", "num_processes", "process_id")}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise CLIError(f"{', '.join(missing)}: a multi-process run needs --coordinator, --num-processes and "
                       "--process-id on every process.")
    from mlem_jax.parallel._mesh import check_distributed

    try:
        check_distributed(args.coordinator, args.num_processes, args.process_id)
    except InputError as e:
        name, _, text = str(e).partition(": ")
        raise CLIError(f"--{name.replace('_', '-')}: {text}") from e
    return True


def supervised_run(args):
    """A multi-process run's process runs as a child of the supervisor
    (`mlem_jax.parallel._supervisor`), which turns an end by JAX's coordination service (a lost
    peer, an id given twice) into one line: the child's exit status, or None when this is the
    child or not a multi-process run."""
    from mlem_jax.parallel._supervisor import SUPERVISED_ENV, supervise

    if not _multiprocess(args) or os.environ.get(SUPERVISED_ENV) == "1":
        return None
    return supervise([sys.executable, "-m", "mlem_jax.cli", *args.argv], process_id=args.process_id,
                     num_processes=args.num_processes, coordinator=args.coordinator,
                     prefix=f"mlem-jax {args.command}: error: ")


def join_run(args) -> bool:
    """Join a multi-process run when --coordinator is given (before any other JAX call);
    returns whether this is one."""
    if not _multiprocess(args):
        return False
    from mlem_jax.parallel._mesh import initialize_distributed

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except (InputError, RuntimeError) as e:
        name, _, text = str(e).partition(": ")
        raise CLIError(f"--{name.replace('_', '-')}: {text}") from e
    return True


def multiprocess_flags(s):
    s.add_argument("--coordinator", default=None,
                   help="multi-process: host:port of process 0 (jax.distributed); one SPMD program over the "
                        "devices of every process")
    s.add_argument("--num-processes", type=positive(int), default=None, help="multi-process: number of processes")
    s.add_argument("--process-id", type=int, default=None, help="multi-process: this process, 0-based")


@contextlib.contextmanager
def exclusive(out):
    """Hold the lock on --out while training (`mlem_jax._filelock`), as a one-line CLI error."""
    from mlem_jax._filelock import DirectoryLock, LockHeld

    try:
        lock = DirectoryLock(out).acquire()
    except LockHeld as e:
        raise CLIError(f"--out: {e}") from e
    try:
        yield
    finally:
        lock.release()


def check_out(path):
    """Fail before any compute when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CLIError(f"--out: {path!r} lies under {probe!r}, which is a file, not a folder.")
    if not os.access(probe, os.W_OK):
        raise CLIError(f"--out: cannot write under {probe!r} (permission denied); choose another --out.")


def common_flags(s, out_default):
    """The flags of `sample` and `calibrate`: family, levels, grid, seed, output, progress."""
    s.add_argument("--family", default=None,
                   help="trained family (path to family.npz, or its stem); default: the shipped digits family")
    s.add_argument("--levels", type=positive(int), nargs="+", default=None,
                   help="level numbers to use, 1 = cheapest (default: all)")
    s.add_argument("--steps", type=positive(int), default=100, help="number of sampling steps")
    s.add_argument("--grid", choices=["uniform", "quadratic", "karras", "logsnr"], default="uniform",
                   help="time grid (logsnr: equal steps in log-SNR, the grid DPM-Solver++ is made for)")
    s.add_argument("--seed", type=seed, default=0, help="sampling seed")
    s.add_argument("--out", default=out_default,
                   help="output: a stem (a suffix such as .png is dropped) or a folder (which receives the default "
                        "name); the files written are printed")
    s.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
