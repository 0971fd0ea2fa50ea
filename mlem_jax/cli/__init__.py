"""The `mlem-jax` command: train a UNet family, calibrate, sample with EM or ML-EM, demo.

    mlem-jax demo                         # the shipped digits family, EM against ML-EM
    mlem-jax train --dataset digits --nfs 4 8 16 32 --steps 2000 --out runs/digits16
    mlem-jax calibrate --family runs/digits16/family --out runs/digits16/calibration.json
    mlem-jax sample --family runs/digits16/family --calibration runs/digits16/calibration.json
    mlem-jax advise --family runs/digits16/family   # does the top level add accuracy, or only noise?

One module per subcommand (`_train`, `_sample`, `_calibrate`, `_demo`), each with its
`add_parser(subparsers)` and `run(args)`; shared flags, checks and writers are in `_common`.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from mlem_jax._errors import InputError
from mlem_jax.cli import _advise, _calibrate, _demo, _sample, _train
from mlem_jax.cli._common import CLIError, Parser, supervised_run

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> Parser:
    """The argument parser of `mlem-jax`, one subparser per subcommand."""
    p = Parser(prog="mlem-jax", description="Sample diffusion models with the Multilevel Euler-Maruyama method.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in (_train, _sample, _calibrate, _demo, _advise):
        command.add_parser(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, a scheduler or `docker stop` sends), raised where the program
    is, so that it unwinds like Ctrl-C: locks released, partial outputs removed."""


@contextlib.contextmanager
def _sigterm_unwinds():
    def raise_terminated(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """Run `mlem-jax ARGV`; returns the exit status (0 done, 1 out of memory, 2 bad input, 130 interrupted
    by Ctrl-C, 143 terminated by SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        with _sigterm_unwinds():
            status = supervised_run(args)  # a multi-process run: this process supervises its child
            if status is not None:
                return status
            args.func(args)
    except Terminated:
        print(f"mlem-jax {args.command}: terminated (SIGTERM); {_what_was_kept(args)}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"mlem-jax {args.command}: interrupted; {_what_was_kept(args)}", file=sys.stderr)
        return 130
    except (CLIError, InputError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError) as e:
        # the library's own input errors only: any other ValueError is a bug and keeps its traceback
        print(f"mlem-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # XLA's out-of-memory error, a backend that is not there: one line and what to do
        if isinstance(e, RuntimeError) and "Unable to initialize backend" in str(e):
            import os

            print(f"mlem-jax {args.command}: error: JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} asks for a "
                  f"backend this machine cannot start ({str(e).splitlines()[0][:160]}); unset JAX_PLATFORMS to use "
                  "what is available, or install the jax build for that accelerator.", file=sys.stderr)
            return 2
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        size = getattr(args, "batch_size", None)
        hint = f" at --batch-size {size}; use a smaller one" if size else "; use a smaller batch or model"
        print(f"mlem-jax {args.command}: error: out of device memory{hint} (XLA: "
              f"{str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    return 0


def _what_was_kept(args) -> str:
    if args.command == "train":
        import os

        return (f"the checkpoints written so far are kept in {os.path.join(args.out, 'checkpoints')}; continue "
                f"with the same command and --resume.")
    return "nothing was written (outputs appear only when complete)."


if __name__ == "__main__":
    sys.exit(main())
