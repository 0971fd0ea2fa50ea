"""`mlem-jax sample`: one level, or the multilevel estimator over several, inside any sampler."""

from __future__ import annotations

from mlem_jax._errors import InputError
from mlem_jax.cli._common import (
    CLIError,
    common_flags,
    control_of,
    family_arg,
    join_run,
    level_indices,
    multiprocess_flags,
    output_files,
    positive,
    probabilities,
    time_grid,
    write_samples,
)


def add_parser(sub):
    """Register `mlem-jax sample` on the subparsers `sub`."""
    from mlem_jax.diffusion.sampling import SOLVERS

    s = sub.add_parser("sample", help="sample with one level or with the multilevel estimator (several levels)")
    common_flags(s, "out/samples")
    s.add_argument("--solver", choices=list(SOLVERS), default="em",
                   help="em / heun: Euler-Maruyama on the reverse SDE (--ode: the probability-flow ODE) / Heun on "
                        "the ODE; ddim, dpm++2m, dpm++3m, edm-euler, edm-heun: ODE samplers on the denoisers; "
                        "sde-dpm++2m: SDE-DPM-Solver++(2M); unipc: UniPC-bh2 of order 2 (its corrector reuses the next "
                        "call). All take the multilevel estimator.")
    s.add_argument("--shift", type=positive(float), default=None,
                   help="shift the grid's times t -> s t / (1 + (s - 1) t) (SD3's timestep shift, for flow families: "
                        "s > 1 spends more steps at high noise)")
    s.add_argument("--control", choices=["none", "cached", "extrapolated"], default="none",
                   help="control variate of the multilevel estimator: the last observed correction of each "
                        "level (unbiased with iid coins)")
    s.add_argument("--batch-size", type=positive(int), default=64, help="number of samples")
    s.add_argument("--em", action="store_true", help="one level: --solver on the last of --levels")
    s.add_argument("--probs", type=float, nargs="+", default=None, help="constant level probabilities, p_1 = 1")
    s.add_argument("--calibration", default=None, help="a calibration file written by mlem-jax calibrate")
    s.add_argument("--coupling", choices=["independent", "nested"], default="independent",
                   help="coins of one model call: independent (one coin per level) or nested (one uniform U "
                        "per call; level k fires when U < p_k, so a level fires only with those below it)")
    s.add_argument("--coins", choices=["iid", "stratified"], default="iid",
                   help="iid: fresh coins every step (the paper); stratified: firings spread evenly in time")
    s.add_argument("--ode", action="store_true", help="probability-flow ODE instead of the reverse SDE")
    c = s.add_mutually_exclusive_group()
    c.add_argument("--class", dest="class_", type=int, default=None, metavar="C",
                   help="a conditional family: sample class C (every sample)")
    c.add_argument("--classes", type=int, nargs="+", default=None, metavar="C",
                   help="a conditional family: these classes, repeated over the batch in order")
    s.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance weight w >= 0: (1 + w) D(x, c) - w D(x, no class); each model "
                        "call then runs the network twice")
    multiprocess_flags(s)
    for action in s._actions:  # taken from --calibration when not given: the default applies only without one
        if action.dest in ADOPTED:
            action.default = None
            default = ADOPTED[action.dest]
            if action.dest == "grid":
                default = "log-SNR for ddim and the DPM-Solvers, Karras for EDM, uniform for em and heun"
            action.help += f" (default: {default}, or what --calibration was made for)"
    s.set_defaults(func=run)


# the settings a calibration file records, and their defaults without one
ADOPTED = {"steps": 100, "grid": "the solver's", "coins": "iid", "coupling": "independent", "solver": "em",
           "control": "none"}
GRID_OF_SOLVER = {"em": "uniform", "heun": "uniform", "ddim": "logsnr", "dpm++2m": "logsnr", "dpm++3m": "logsnr",
                  "sde-dpm++2m": "logsnr", "edm-euler": "karras", "edm-heun": "karras", "unipc": "logsnr"}
"""The grid each solver is designed for, the default of --grid: log-SNR steps for the
exponential integrators (Lu et al. 2022), Karras' for EDM (Karras et al. 2022), uniform for
Euler-Maruyama and Heun."""


def adopt_calibration(args, family) -> None:
    """Fill the settings not given on the command line from the --calibration file (steps, grid, coins,
    coupling, solver, control and levels), or from the defaults without one; a flag that contradicts the
    file is refused, naming both values."""
    if args.calibration is None:
        for name, value in ADOPTED.items():
            if getattr(args, name) is None and name != "grid":
                setattr(args, name, value)
        if args.grid is None:
            args.grid = GRID_OF_SOLVER.get(args.solver, "uniform")
        return
    from mlem_jax.calibrate import load_calibration

    try:
        cal = load_calibration(args.calibration)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(f"--calibration: {e}") from e
    made = {"steps": cal.steps, "grid": cal.grid, "coins": cal.coins, "coupling": cal.coupling,
            "solver": cal.meta.get("solver", "em"), "control": cal.meta.get("control") or "none"}
    for name, value in made.items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
        elif given != value:
            flag = "--" + name.replace("_", "-")
            raise CLIError(f"{flag}: {given} contradicts --calibration {args.calibration}, made for {name} {value}; "
                           f"drop {flag} (the file's setting is then used) or recalibrate.")
    nfs = [m.nf for m in family.models]
    if args.levels is None:
        if not set(cal.levels) <= set(nfs):
            raise CLIError(f"--calibration: made for levels nf={cal.levels}, but the family has nf={nfs}; "
                           "calibrate this family (mlem-jax calibrate --family ...).")
        args.levels = [nfs.index(nf) + 1 for nf in cal.levels]


def labels_of(args, family):
    """The per-sample labels --class / --classes ask for (None without), checked against the family by
    `sampling.check_labels`, its errors naming the flag."""
    import numpy as np

    from mlem_jax.diffusion.sampling import check_labels

    chosen = [args.class_] if args.class_ is not None else args.classes
    flag = "--class" if args.class_ is not None else "--classes"
    if not args.guidance >= 0:  # also NaN
        raise CLIError(f"--guidance: expected a weight >= 0 (0: no guidance), got {args.guidance}.")
    if chosen is not None and any(c < 0 for c in chosen):  # -1 is the library's "no class", not a CLI class
        raise CLIError(f"{flag}: expected class numbers >= 0, got {min(chosen)}.")
    labels = None if chosen is None else np.resize(np.asarray(chosen, np.int32), args.batch_size)
    try:
        checked = check_labels(family, labels, args.guidance, args.batch_size)
    except InputError as e:
        name, _, text = str(e).partition(": ")
        raise CLIError(f"{flag if name == 'labels' else '--guidance'}: {text}") from e
    return None if checked is None else np.asarray(checked)


def run(args):
    multiprocess = join_run(args)  # before any other JAX call
    from mlem_jax.diffusion.sampling import sample

    family = family_arg(args.family)
    adopt_calibration(args, family)
    levels = level_indices(family, args.levels)
    if args.em and args.probs is not None:
        raise CLIError("--probs: --em samples the last of --levels alone, so level probabilities have no use; drop "
                       "--probs, or drop --em to sample with the multilevel estimator.")
    probs = None if args.em else probabilities(args, levels, family)
    ts = time_grid(family, args.steps, args.grid)
    if args.shift is not None:
        from mlem_jax.diffusion.sde import shift_times

        ts = shift_times(ts, args.shift)
    labels = labels_of(args, family)
    paths = output_files(args, "samples", (".png", ".npz"))  # after the arguments, before any compute
    if args.ode and args.solver != "em":
        raise CLIError(f"--ode: chooses the probability-flow ODE for --solver em only; --solver {args.solver} "
                       "already says which equation it solves.")
    if args.em and control_of(args) is not None:
        raise CLIError("--control: a control variate belongs to the multilevel estimator; drop it with --em.")
    import warnings

    from mlem_jax.diffusion.sampling import WARN_SHARE, SampleRangeWarning, range_message

    with warnings.catch_warnings():  # said below in one line, not as a warning with a source line
        warnings.simplefilter("ignore", SampleRangeWarning)
        res = sample(family, levels if probs is not None else levels[-1:], ts, args.seed, args.batch_size, probs,
                     args.coupling, args.ode, progress=not args.no_progress, coins=args.coins, solver=args.solver,
                     control=control_of(args), labels=labels, guidance=args.guidance)
    if res.outside_range > WARN_SHARE:
        import sys

        print(f"mlem-jax sample: warning: {range_message(res.images, res.outside_range)}", file=sys.stderr)
    name = {"em": "EM"}.get(args.solver, args.solver)
    control = "" if control_of(args) is None else f", control {control_of(args)}"
    method = name if probs is None else f"multilevel {name} ({args.coupling}, {args.coins} coins{control})"
    nfs = [family.models[k].nf for k in (levels if probs is not None else levels[-1:])]
    import jax

    if jax.process_index() != 0:  # every process holds the whole batch; process 0 writes it
        return
    extra = {} if labels is None else {"labels": labels, "guidance": args.guidance}
    png, npz = write_samples(paths, res.images, {"evaluations": res.evaluations, "levels_nf": nfs, **extra},
                             overwrite=args.overwrite)
    where = f", {jax.process_count()} processes" if multiprocess else ""
    print(f"{method}: {args.batch_size} samples, {args.steps} steps, levels nf={nfs}, {jax.device_count()} "
          f"device(s){where}")
    print(f"  wall time {res.run_seconds:.2f} s (+ {res.compile_seconds:.1f} s compilation)")
    print("  evaluations per sample path: " + ", ".join(f"nf={n}: {e}" for n, e in zip(nfs, res.evaluations))
          + (" (each two network passes: guidance)" if args.guidance else ""))
    if labels is not None:
        print(f"  classes {sorted(set(labels.tolist()))}" + (f", guidance weight {args.guidance}" if args.guidance
                                                             else ""))
    print(f"wrote {png} and {npz}")
