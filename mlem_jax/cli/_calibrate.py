"""`mlem-jax calibrate`: level costs and variances, and the probabilities they call for."""

from __future__ import annotations

import sys
import time

import numpy as np

from mlem_jax._errors import InputError
from mlem_jax.cli._common import (
    DATA_SCALE,
    CLIError,
    command_line,
    common_flags,
    control_of,
    family_arg,
    level_indices,
    output_files,
    positive,
    time_grid,
)


def add_parser(sub):
    """Register `mlem-jax calibrate` on the subparsers `sub`."""
    from mlem_jax.diffusion.sampling import SOLVERS

    c = sub.add_parser("calibrate", help="measure level costs and variances, write time-dependent probabilities")
    common_flags(c, "out/calibration")
    c.add_argument("--trajectories", type=positive(int), default=32, help="reference trajectories")
    c.add_argument("--bins", type=positive(int), default=10, help="time bins of the schedule")
    c.add_argument("--solver", choices=list(SOLVERS), default="em",
                   help="the sampler to calibrate for (mlem-jax sample --solver): the statistics are taken at its "
                        "model calls, weighted by how it uses each, and the speedup is against it on the finest "
                        "level alone (default: em)")
    c.add_argument("--control", choices=["none", "cached"], default="none",
                   help="calibrate the cached control variate (iid coins): residuals against the cache by gap "
                        "(default: none)")
    c.add_argument("--weighting", choices=["linear", "propagated"], default=None,
                   help="how a call's correction is weighed: by the solver's coefficient of the call (linear), or "
                        "by the error it causes at the output, model Jacobians included (propagated; one "
                        "reverse-mode pass per trajectory). Default: propagated for the diffusion samplers, "
                        "linear for em and heun")
    c.add_argument("--stride", type=positive(int), default=None,
                   help="evaluate levels at every n-th model call (default 2; 1 with --control)")
    c.add_argument("--cost-batch", type=positive(int), default=64,
                   help="batch at which the level costs are timed (the sampling batch; default 64)")
    c.add_argument("--target-variance", type=positive(float), default=None,
                   help="injected variance per unit time the probabilities may add")
    c.add_argument("--speedup", type=positive(float), default=None,
                   help="instead: a compute budget of EM's cost divided by this factor (iid coins: default 4)")
    c.add_argument("--target-error", type=positive(float), default=None,
                   help="stratified coins: the coupled RMS error per pixel to reach")
    c.add_argument("--coins", choices=["iid", "stratified"], default=None,
                   help="the coin scheme to calibrate for (default: stratified, searched to match EM's coupled "
                        "error as --match-em does; iid with --speedup, --target-variance or --learn)")
    c.add_argument("--coupling", choices=["independent", "nested"], default="independent",
                   help="coins of one model call: independent (one coin per level) or nested (one uniform U "
                        "per call; level k fires when U < p_k, so a level fires only with those below it)")
    c.add_argument("--match-em", action="store_true",
                   help="stratified: choose the cheapest configuration matching EM's coupled error on --steps "
                        "(pilot search on --trajectories samples)")
    c.add_argument("--learn", action="store_true",
                   help="iid coins: learn p_k(t) by SGD with score-function gradients (the paper's method) at a "
                        "FLOP budget of EM's cost / --speedup")
    c.add_argument("--skip-range-check", action="store_true",
                   help="calibrate even when the finest level's samples fall far outside the data's range (an "
                        "undertrained family; refused by default)")
    c.add_argument("--learn-steps", type=positive(int), default=100, help="with --learn: SGD steps")
    c.set_defaults(func=run)


def run(args):
    """Calibrate: resolve the coins, stride and target, then search (--match-em), learn (--learn) or take the
    closed form for the chosen coins, and write the file with a plot beside it."""
    args.out = output_files(args, "calibration", (".json", ".png"))[0]  # before any compute
    family = family_arg(args.family)
    levels = level_indices(family, args.levels)
    nfs = [family.models[k].nf for k in levels]
    t0 = time.perf_counter()
    _resolve_settings(args)
    if not args.skip_range_check:
        _check_range(args, family, levels)
    if args.match_em:
        return _match_em(args, family, nfs, t0)
    import jax

    from mlem_jax.diffusion.sampling import solver_levels

    drifts = solver_levels(family, levels, args.solver)
    ts = time_grid(family, args.steps, args.grid)
    keys = jax.random.split(jax.random.key(args.seed), args.trajectories)
    y0 = jax.vmap(lambda k: family.sde.prior_sample(k, tuple(family.image_shape)))(keys)
    if args.learn:
        return _learn(args, family, drifts, ts, y0, nfs, t0)
    _check_target(args)
    return _closed_form(args, family, drifts, ts, y0, keys, nfs, t0)


REFUSE_SHARE = 0.25  # calibrate refuses a family whose samples are more than this much out of range
MAX_PILOT_ERROR = DATA_SCALE / 2  # and a --match-em search whose EM pilot error exceeds half the data's range


def _check_range(args, family, levels):
    """Sample 8 images with the finest level alone (the sampler and grid being calibrated) and refuse a family
    whose pixels fall far outside the data's range: its calibration would describe noise."""
    import warnings

    from mlem_jax.diffusion.sampling import SampleRangeWarning, range_message, sample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SampleRangeWarning)
        res = sample(family, levels[-1:], time_grid(family, args.steps, args.grid), args.seed + 3, 8,
                     solver=args.solver)
    if res.outside_range > REFUSE_SHARE:
        raise CLIError(f"--family: nf={family.models[levels[-1]].nf} alone, 8 samples: "
                       f"{range_message(res.images, res.outside_range)} Nothing was written; train longer "
                       "(mlem-jax train --resume --steps N), or pass --skip-range-check to calibrate it anyway.")


def _resolve_settings(args):
    """Refuse contradictory flags and fill in the defaults that depend on others (coins, stride, --match-em)."""
    control = control_of(args)
    if args.solver != "em" and (args.match_em or args.learn):
        raise CLIError(f"--{'match-em' if args.match_em else 'learn'}: searches or learns probabilities for "
                       f"EM only; with --solver {args.solver} give --speedup, --target-variance or "
                       "--target-error.")
    if control is not None:
        if args.coins == "stratified":
            raise CLIError(f"--control {control}: unbiased with iid coins only (a stratified coin depends on "
                           "earlier firings); pass --coins iid, or stratified coins without --control.")
        if args.learn or args.match_em:
            raise CLIError("--control: --learn and --match-em calibrate the estimator without a control variate.")
        args.coins = "iid"
    if args.stride is None:  # the residuals against the cache need every model call
        args.stride = 1 if control is not None else 2
    elif control is not None and args.stride != 1:
        raise CLIError(f"--stride: --control {control} measures the residuals against the cache at every model "
                       f"call; pass --stride 1 (or leave it out), got {args.stride}.")
    if args.coins is None:  # the default: iid with a target or --learn, else EM's error with stratified coins
        if args.learn or args.target_variance is not None or args.speedup is not None:
            args.coins = "iid"
        else:
            args.coins = "stratified"
            args.match_em = args.match_em or (args.target_error is None and args.levels is None
                                              and args.grid == "uniform" and args.solver == "em")


def _check_target(args):
    """At most one target, and the one that describes the chosen coins."""
    given = [n for n, v in (("--target-variance", args.target_variance), ("--speedup", args.speedup),
                            ("--target-error", args.target_error)) if v is not None]
    if len(given) > 1:
        raise CLIError(f"{', '.join(given)}: give at most one of them.")
    if args.coins == "stratified" and args.target_variance is not None:
        raise CLIError("--target-variance: describes iid coins; with --coins stratified give --target-error or "
                       "--speedup.")
    if args.coins == "iid" and args.target_error is not None:
        raise CLIError("--target-error: with --coins iid give --target-variance (T x error^2 x pixels) or --speedup.")


def _match_em(args, family, nfs, t0):
    """calibrate --match-em: the cheapest stratified configuration with EM's coupled error (pilot search)."""
    from mlem_jax.calibrate import save_calibration
    from mlem_jax.compare._em_search import search_configuration

    if any(v is not None for v in (args.target_variance, args.speedup, args.target_error)):
        raise CLIError("--match-em: the target is EM's own coupled error; drop --target-*/--speedup.")
    if args.coins != "stratified" or args.levels is not None or args.grid != "uniform":
        raise CLIError("--match-em: searches stratified coins on all levels and a uniform grid; pass "
                       "--coins stratified and no --levels or --grid.")
    if args.trajectories < 6:
        raise CLIError(f"--trajectories: the search needs at least 6 pilot samples, got {args.trajectories}.")
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, flush=True))
    try:
        found = search_configuration(family, args.steps, args.trajectories, args.seed, log=log,
                                     max_error=None if args.skip_range_check else MAX_PILOT_ERROR)
    except InputError as e:
        raise CLIError(f"--family: {str(e).removeprefix('family: ')} Pass --skip-range-check to search anyway.") from e
    path = save_calibration(
        args.out, found.probs, levels=nfs, steps=args.steps, grid=args.grid, coins="stratified",
        coupling=found.config.coupling, command=command_line(args), exclusive=not args.overwrite,
        made_by=f"search_configuration: the cheapest stratified configuration whose coupled error on "
                f"{args.trajectories} pilot samples is at most 1.05 x EM's (EM error {found.em_error:.4f})",
        tried=found.tried)
    print(f"chose {found.config.coupling} coupling, lambda {found.config.scale:.2f}; wrote {path} in "
          f"{time.perf_counter() - t0:.0f} s")


def _closed_form(args, family, drifts, ts, y0, keys, nfs, t0):
    """The closed form for the chosen coins (iid: optimal_probabilities; stratified: the cube-root shape scaled
    on pilots) on the measured statistics, refused when it predicts noise."""
    import jax

    from mlem_jax.calibrate import level_costs, save_calibration

    control = control_of(args)
    # level costs at the sampling batch: at the few trajectories of the statistics they are mostly overhead
    batch = jax.vmap(lambda k: family.sde.prior_sample(k, tuple(family.image_shape)))(
        jax.random.split(jax.random.key(args.seed + 7), args.cost_batch))
    costs = level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in drifts], ts[0], batch)
    import warnings

    with warnings.catch_warnings():  # the CLI refuses such probabilities below, in one line
        warnings.filterwarnings("ignore", message=r"(calibrated_probabilities|calibration_report): the")
        report = _report(args, family, drifts, ts, y0, keys, costs, control)
    print(report)
    if report.predicted_error is not None and report.predicted_error > DATA_SCALE / 2:
        raise CLIError(f"--speedup: the chosen probabilities predict a coupled RMS error of "
                       f"{report.predicted_error:.3g} per pixel, beyond half the data's range [-1, 1]: the samples "
                       "would be noise; nothing was written. Ask for less (a smaller --speedup or a --target-*), or "
                       "use stratified coins: --coins stratified --match-em finds the cheapest configuration with "
                       "EM's error (the shipped calibration was made so).")
    made_by = ("closed-form allocation for iid coins (optimal_probabilities on the measured V_k(t) and costs)"
               if args.coins == "iid" else "stratified_probabilities: cube-root shape, lambda from pilot runs")
    if control is not None:
        made_by += "; cached control: fixed point with the residuals against the cache by gap"
    made_by += f"; statistics at the model calls of {args.solver}"
    path = save_calibration(args.out, report.probs, levels=nfs, steps=args.steps, grid=args.grid, coins=args.coins,
                            coupling=args.coupling, solver=args.solver, control=control, command=command_line(args),
                            exclusive=not args.overwrite,
                            made_by=made_by,
                            predicted_error=report.predicted_error, predicted_speedup=report.em_cost / report.mlem_cost,
                            cost_unit=report.cost_unit)
    plot = report.plot(path[:-5] + ".png" if path.endswith(".json") else path + ".png")
    print(f"wrote {path} and {plot} in {time.perf_counter() - t0:.0f} s")


def _report(args, family, drifts, ts, y0, keys, costs, control):
    """calibration_report for the chosen coins, target, sampler and control."""
    from mlem_jax.calibrate import calibration_report
    from mlem_jax.diffusion.parameterization import reverse_diffusion
    from mlem_jax.diffusion.sampling import solver_function

    diffusion_sampler = args.solver not in ("em", "heun")
    return calibration_report(drifts, reverse_diffusion(family.sde), y0, ts, keys, num_bins=args.bins,
                              stride=args.stride, target_variance=args.target_variance, speedup=args.speedup,
                              coins=args.coins, coupling=args.coupling, target_error=args.target_error,
                              costs=costs, progress=not args.no_progress,
                              solver=solver_function(family.sde, args.solver, ts), solver_name=args.solver,
                              control=control, weighting=args.weighting or (
                                  "propagated" if diffusion_sampler else "linear"),
                              control_scale=family.sde.noise_to_signal if diffusion_sampler else None)


def _learn(args, family, drifts, ts, y0, nfs, t0):
    """calibrate --learn: the paper's SGD on p_k(t) at a FLOP budget of EM's cost / --speedup."""
    import jax

    from mlem_jax.calibrate import learn_probabilities, level_costs, save_calibration
    from mlem_jax.diffusion.parameterization import reverse_diffusion

    if args.coins != "iid":
        raise CLIError("--learn: learning needs the law of each step's coins (the score-function gradient), which "
                       "iid coins have; for stratified coins drop --learn: --coins stratified takes the closed-form "
                       "cube-root shape scaled on pilot runs.")
    if args.target_variance is not None or args.target_error is not None:
        raise CLIError("--learn: holds a compute budget; give --speedup (EM's cost / budget), not a target.")
    if args.trajectories < 2:
        raise CLIError("--trajectories: --learn needs at least 2 trajectories (two groups of one).")
    speedup = 4.0 if args.speedup is None else args.speedup
    flops = level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in drifts], ts[0], y0, repeats=1).flops
    costs = np.asarray(flops, np.float64) / y0.shape[0]
    budget = args.steps * costs[-1] / speedup
    group = max(1, args.trajectories // 4)
    import warnings

    from mlem_jax.calibrate import NotConvergedWarning

    try:
        init = _closed_form_start(args, family, drifts, ts, y0, costs, budget)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NotConvergedWarning)
            res = learn_probabilities(drifts, reverse_diffusion(family.sde), y0, ts, jax.random.key(args.seed + 1),
                                      costs=costs, budget=budget, num_bins=args.bins, coupling=args.coupling,
                                      steps=args.learn_steps, group_size=group, init=init,
                                      num_groups=max(2, args.trajectories // group),
                                      progress=not args.no_progress)
    except InputError as e:
        raise CLIError(f"--learn: {e}") from e
    for w in caught:
        if issubclass(w.category, NotConvergedWarning):
            print(f"mlem-jax calibrate: warning: {w.message} (here: --learn-steps)", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    h = res.history
    tail = max(1, len(h.coupled_mse) // 5)
    rms = float(np.sqrt(np.mean(h.coupled_mse[-tail:])))
    print(f"learned p_k(t) in {res.seconds:.0f} s ({args.learn_steps} SGD steps): coupled RMS per pixel over the "
          f"last {tail} steps {rms:.4f}, expected cost {h.expected_cost[-1]:.4g} FLOP per sample "
          f"(EM {args.steps * costs[-1]:.4g}, {speedup:g}x less)")
    path = save_calibration(
        args.out, res.probs, levels=nfs, steps=args.steps, grid=args.grid, coins="iid", coupling=args.coupling,
        command=command_line(args), exclusive=not args.overwrite, cost_unit="flops", predicted_speedup=speedup,
        predicted_error=rms,
        made_by=(f"learn_probabilities from the closed form: {args.learn_steps} SGD steps (Adam 0.05) on the "
                 "coupled MSE against EM at a "
                 f"FLOP budget of EM / {speedup:g}, score-function gradients; {args.trajectories} pooled starts"),
        learning={"seconds": res.seconds, "coupled_mse": h.coupled_mse.tolist(),
                  "expected_cost": h.expected_cost.tolist()})
    plot = _plot_learning(res, nfs, path[:-5] + ".png" if path.endswith(".json") else path + ".png")
    print(f"wrote {path} and {plot} in {time.perf_counter() - t0:.0f} s")


def _closed_form_start(args, family, drifts, ts, y0, costs, budget):
    """Where --learn starts: the closed-form allocation for iid coins on the pilot's statistics at the same
    budget (a flat start needs many more SGD steps to find a schedule that varies in time); the default
    start p_k = 0.3^(k-1) with fewer than 6 trajectories, too few for the statistics."""
    import jax

    if y0.shape[0] < 6:
        return None
    from mlem_jax.calibrate import calibrated_probabilities, level_statistics
    from mlem_jax.diffusion.parameterization import reverse_diffusion

    keys = jax.random.split(jax.random.key(args.seed + 2), y0.shape[0])
    stats = level_statistics(drifts, reverse_diffusion(family.sde), y0, ts, keys, num_bins=args.bins,
                             stride=args.stride)
    import warnings

    with warnings.catch_warnings():  # a start only: its predicted noise is what the learning improves on
        warnings.simplefilter("ignore", UserWarning)
        return calibrated_probabilities(stats, costs, float(stats.step_size), budget=budget,
                                        num_steps=int(stats.num_calls), coupling=args.coupling)


def _plot_learning(res, nfs, path):

    from mlem_jax.plotting import pyplot

    plt = pyplot()

    edges, values = np.asarray(res.probs.edges), np.asarray(res.probs.values)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in range(1, values.shape[1]):
        a.stairs(values[:, k], edges, label=f"nf={nfs[k]}")
    a.set(yscale="log", xlabel="t", ylabel="p_k(t)", title="learned probabilities")
    a.legend(fontsize=8)
    b.plot(np.sqrt(res.history.coupled_mse), lw=0.8)
    b.set(yscale="log", xlabel="SGD step", ylabel="coupled RMS per pixel", title="training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
