"""The `mlem-jax` command: train a UNet family, calibrate, sample with EM or ML-EM, demo.

    mlem-jax demo                         # the shipped digits family, EM against ML-EM
    mlem-jax train --dataset digits --nfs 4 8 16 32 --steps 2000 --out runs/digits16
    mlem-jax calibrate --family runs/digits16/family --out runs/digits16/calibration.json
    mlem-jax sample --family runs/digits16/family --calibration runs/digits16/calibration.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time

import numpy as np


class CLIError(Exception):
    """A bad argument: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- helpers


def _positive(kind):
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


def _seed(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}")
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**30), got {s}")
    return v


def _family(path):
    from mlem_jax.diffusion.family import load_family, shipped_family_path

    path = path or shipped_family_path()
    try:
        return load_family(path)
    except FileNotFoundError as e:
        raise CLIError(f"--family: {e}") from e


def _grid(family, steps, grid):
    from mlem_jax.diffusion import karras_grid, logsnr_grid, quadratic_grid, uniform_grid

    if grid == "karras":
        return karras_grid(family.sde, steps)
    if grid == "logsnr":
        return logsnr_grid(family.sde, steps)
    return {"uniform": uniform_grid, "quadratic": quadratic_grid}[grid](steps)


def _levels(family, levels):
    K = len(family.models)
    if levels is None:
        return list(range(K))
    idx = [k - 1 for k in levels]
    if any(not 0 <= k < K for k in idx) or sorted(set(idx)) != idx:
        raise CLIError(f"--levels: expected increasing level numbers in 1..{K}, got {levels}.")
    return idx


def _probs(args, levels, family):
    import jax.numpy as jnp

    if args.calibration:
        from mlem_jax.calibrate import check_calibration_use, load_calibration

        if args.probs is not None:
            raise CLIError("--calibration, --probs: give one of them (the calibration file holds the probabilities).")
        try:
            cal = load_calibration(args.calibration)
            check_calibration_use(cal, args.calibration, levels=[family.models[k].nf for k in levels],
                                  steps=args.steps, grid=args.grid, coins=args.coins, coupling=args.coupling,
                                  solver=getattr(args, "solver", "em"), control=_control(args))
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


def _control(args):
    value = getattr(args, "control", "none")
    return None if value in (None, "none") else value


def _command(args) -> str:
    """The command line that produced an output, recorded next to it."""
    return "mlem-jax " + " ".join(shlex.quote(a) for a in args.argv)


def _write_samples(path, images, extra):
    from mlem_jax.diffusion.images import save_png, to_grid

    png = path if path.endswith(".png") else path + ".png"
    save_png(png, to_grid(images), scale=4)
    npz = png[:-4] + ".npz"
    np.savez_compressed(npz, images=images, **extra)
    return png, npz


def _join_run(args) -> bool:
    """Join a multi-process run when --coordinator is given (before any other JAX call);
    returns whether this is one."""
    given = {"--coordinator": args.coordinator, "--num-processes": args.num_processes,
             "--process-id": args.process_id}
    if all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise CLIError(f"{', '.join(missing)}: a multi-process run needs --coordinator, --num-processes and "
                       "--process-id on every process.")
    from mlem_jax.sharding import initialize_distributed

    try:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        name, _, text = str(e).partition(": ")
        raise CLIError(f"--{name.replace('_', '-')}: {text}") from e
    except RuntimeError as e:
        raise CLIError(f"--{e}") from e
    return True


def _multiprocess_flags(s):
    s.add_argument("--coordinator", default=None,
                   help="multi-process: host:port of process 0 (jax.distributed); one SPMD program over the "
                        "devices of every process")
    s.add_argument("--num-processes", type=_positive(int), default=None, help="multi-process: number of processes")
    s.add_argument("--process-id", type=int, default=None, help="multi-process: this process, 0-based")


# ------------------------------------------------------------------------ commands


def cmd_train(args):
    multiprocess = _join_run(args)
    import jax

    from mlem_jax.diffusion.data import load_dataset
    from mlem_jax.diffusion.family import save_family
    from mlem_jax.diffusion.sde import VP
    from mlem_jax.diffusion.train import TrainConfig, train_family
    from mlem_jax.diffusion.unet import unet_family

    try:
        train_x = load_dataset(args.dataset, "train", args.data_dir, args.image_size)
        test_x = load_dataset(args.dataset, "test", args.data_dir, args.image_size)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise CLIError(f"--dataset: {e}") from e
    _check_out(os.path.join(args.out, "family.json"))
    if len(set(args.nfs)) != len(args.nfs):
        raise CLIError(f"--nfs: every level needs its own width (their checkpoints are kept by nf), got {args.nfs}.")
    try:
        family = unet_family(tuple(args.nfs), ch_mult=tuple(args.ch_mult))
    except ValueError as e:
        raise CLIError(f"--nfs: {e}") from e
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         seed=args.seed, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every)
    if args.parallel_levels and multiprocess:
        raise CLIError("--parallel-levels: trains levels side by side on one process's devices; a multi-process "
                       "run trains them one after another over every device.")
    mesh = None
    if multiprocess or jax.device_count() > 1:
        from mlem_jax.sharding import batch_mesh

        mesh = None if args.parallel_levels else batch_mesh()
    primary = jax.process_index() == 0
    say = print if primary else (lambda *a, **k: None)
    where = (f"process {jax.process_index()} of {jax.process_count()}, " if multiprocess else "") + \
        f"{jax.device_count()} device(s)" + (", levels side by side" if args.parallel_levels else "")
    say(f"training {len(family)} levels nf={list(args.nfs)} on {args.dataset} {train_x.shape[1:]} "
        f"({train_x.shape[0]} train / {test_x.shape[0]} held-out images), {args.steps} steps each; {where}")
    t0 = time.perf_counter()
    with _exclusive(args.out) if primary else contextlib.nullcontext():
        try:
            results = train_family(family, train_x, config, VP(), test_x, os.path.join(args.out, "checkpoints"),
                                   resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                                   mesh=mesh, parallel=args.parallel_levels)
        except FileExistsError as e:
            raise CLIError(f"--out: {e}") from e
        except ValueError as e:  # a resume with another recipe, a batch larger than the data, ...
            name, _, text = str(e).partition(": ")
            raise CLIError(f"--{name.replace('_', '-')}: {text}") from e
        losses = {m.nf: (h.test[-1][1] if h.test else None) for m, (_, h) in zip(family, results)}
        if not primary:  # process 0 writes the family
            return
        command = _command(args)
        path = save_family(os.path.join(args.out, "family"), family, [s.ema_params for s, _ in results], VP(), "eps",
                           train_x.shape[1:], extra={"command": command, "dataset": args.dataset,
                                                     "held_out_loss": {str(k): v for k, v in losses.items()},
                                                     "train_seconds": sum(h.seconds for _, h in results)})
    for nf, loss in losses.items():
        print(f"  nf={nf:3d}: held-out DSM loss " + ("n/a (no new steps)" if loss is None else f"{loss:.4f}"))
    print(f"wrote {path} (EMA parameters, float16) in {time.perf_counter() - t0:.0f} s")


@contextlib.contextmanager
def _exclusive(out):
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


def cmd_sample(args):
    _check_out(args.out)
    multiprocess = _join_run(args)  # before any other JAX call
    from mlem_jax.diffusion.sampling import sample

    family = _family(args.family)
    levels = _levels(family, args.levels)
    probs = None if args.em else _probs(args, levels, family)
    ts = _grid(family, args.steps, args.grid)
    if args.ode and args.solver != "em":
        raise CLIError(f"--ode: chooses the probability-flow ODE for --solver em only; --solver {args.solver} "
                       "already says which equation it solves.")
    if args.em and _control(args) is not None:
        raise CLIError("--control: a control variate belongs to the multilevel estimator; drop it with --em.")
    res = sample(family, levels if probs is not None else levels[-1:], ts, args.seed, args.batch_size, probs,
                 args.coupling, args.ode, progress=not args.no_progress, coins=args.coins, solver=args.solver,
                 control=_control(args))
    name = {"em": "EM"}.get(args.solver, args.solver)
    control = "" if _control(args) is None else f", control {_control(args)}"
    method = name if probs is None else f"multilevel {name} ({args.coupling}, {args.coins} coins{control})"
    nfs = [family.models[k].nf for k in (levels if probs is not None else levels[-1:])]
    import jax

    if jax.process_index() != 0:  # every process holds the whole batch; process 0 writes it
        return
    png, npz = _write_samples(args.out, res.images, {"evaluations": res.evaluations, "levels_nf": nfs})
    where = f", {jax.process_count()} processes" if multiprocess else ""
    print(f"{method}: {args.batch_size} samples, {args.steps} steps, levels nf={nfs}, {jax.device_count()} "
          f"device(s){where}")
    print(f"  wall time {res.run_seconds:.2f} s (+ {res.compile_seconds:.1f} s compilation)")
    print("  evaluations per sample path: " + ", ".join(f"nf={n}: {e}" for n, e in zip(nfs, res.evaluations)))
    print(f"wrote {png} and {npz}")


def cmd_calibrate(args):
    import jax

    from mlem_jax.calibrate import calibration_report, save_calibration
    from mlem_jax.diffusion.parameterization import reverse_diffusion

    _check_out(args.out)
    family = _family(args.family)
    levels = _levels(family, args.levels)
    nfs = [family.models[k].nf for k in levels]
    t0 = time.perf_counter()
    targets = (args.target_variance, args.speedup, args.target_error)
    control = _control(args)
    if args.solver != "em":
        if args.match_em or args.learn:
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
    if args.match_em:
        from mlem_jax.equal_error import search_configuration

        if any(v is not None for v in targets):
            raise CLIError("--match-em: the target is EM's own coupled error; drop --target-*/--speedup.")
        if args.coins != "stratified" or args.levels is not None or args.grid != "uniform":
            raise CLIError("--match-em: searches stratified coins on all levels and a uniform grid; pass "
                           "--coins stratified and no --levels or --grid.")
        log = (lambda s: None) if args.no_progress else (lambda s: print(s, flush=True))
        found = search_configuration(family, args.steps, args.trajectories, args.seed, log=log)
        path = save_calibration(
            args.out, found.probs, levels=nfs, steps=args.steps, grid=args.grid, coins="stratified",
            coupling=found.config.coupling, command=_command(args),
            made_by=f"search_configuration: the cheapest stratified configuration whose coupled error on "
                    f"{args.trajectories} pilot samples is at most 1.05 x EM's (EM error {found.em_error:.4f})",
            tried=found.tried)
        print(f"chose {found.config.coupling} coupling, lambda {found.config.scale:.2f}; wrote {path} in "
              f"{time.perf_counter() - t0:.0f} s")
        return
    from mlem_jax.diffusion.sampling import solver_function, solver_levels

    drifts = solver_levels(family, levels, args.solver)
    ts = _grid(family, args.steps, args.grid)
    keys = jax.random.split(jax.random.key(args.seed), args.trajectories)
    y0 = jax.vmap(lambda k: family.sde.prior_sample(k, tuple(family.image_shape)))(keys)
    if args.learn:
        return _learn(args, family, drifts, ts, y0, nfs, t0)
    given = [n for n, v in (("--target-variance", args.target_variance), ("--speedup", args.speedup),
                            ("--target-error", args.target_error)) if v is not None]
    if len(given) > 1:
        raise CLIError(f"{', '.join(given)}: give at most one of them.")
    if args.coins == "stratified" and args.target_variance is not None:
        raise CLIError("--target-variance: describes iid coins; with --coins stratified give --target-error or "
                       "--speedup.")
    if args.coins == "iid" and args.target_error is not None:
        raise CLIError("--target-error: with --coins iid give --target-variance (T x error^2 x pixels) or --speedup.")
    from mlem_jax.calibrate import level_costs

    # level costs at the sampling batch: at the few trajectories of the statistics they are mostly overhead
    batch = jax.vmap(lambda k: family.sde.prior_sample(k, tuple(family.image_shape)))(
        jax.random.split(jax.random.key(args.seed + 7), args.cost_batch))
    costs = level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in drifts], ts[0], batch)
    diffusion_sampler = args.solver not in ("em", "heun")
    report = calibration_report(drifts, reverse_diffusion(family.sde), y0, ts, keys, num_bins=args.bins,
                                stride=args.stride, target_variance=args.target_variance, speedup=args.speedup,
                                coins=args.coins, coupling=args.coupling, target_error=args.target_error,
                                costs=costs, progress=not args.no_progress,
                                solver=solver_function(family.sde, args.solver, ts), solver_name=args.solver,
                                control=control, weighting=args.weighting or (
                                    "propagated" if diffusion_sampler else "linear"),
                                control_scale=family.sde.noise_to_signal if diffusion_sampler else None)
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
                            coupling=args.coupling, solver=args.solver, control=control, command=_command(args),
                            made_by=made_by,
                            predicted_error=report.predicted_error, predicted_speedup=report.em_cost / report.mlem_cost,
                            cost_unit=report.cost_unit)
    plot = report.plot(path[:-5] + ".png" if path.endswith(".json") else path + ".png")
    print(f"wrote {path} and {plot} in {time.perf_counter() - t0:.0f} s")


def _learn(args, family, drifts, ts, y0, nfs, t0):
    """calibrate --learn: the paper's SGD on p_k(t) at a FLOP budget of EM's cost / --speedup."""
    import jax
    import numpy as np

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
    try:
        res = learn_probabilities(drifts, reverse_diffusion(family.sde), y0, ts, jax.random.key(args.seed + 1),
                                  costs=costs, budget=budget, num_bins=args.bins, coupling=args.coupling,
                                  steps=args.learn_steps, group_size=group,
                                  num_groups=max(2, args.trajectories // group),
                                  progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(f"--learn: {e}") from e
    h = res.history
    tail = max(1, len(h.coupled_mse) // 5)
    rms = float(np.sqrt(np.mean(h.coupled_mse[-tail:])))
    print(f"learned p_k(t) in {res.seconds:.0f} s ({args.learn_steps} SGD steps): coupled RMS per pixel over the "
          f"last {tail} steps {rms:.4f}, expected cost {h.expected_cost[-1]:.4g} FLOP per sample "
          f"(EM {args.steps * costs[-1]:.4g}, {speedup:g}x less)")
    path = save_calibration(
        args.out, res.probs, levels=nfs, steps=args.steps, grid=args.grid, coins="iid", coupling=args.coupling,
        command=_command(args), cost_unit="flops", predicted_speedup=speedup, predicted_error=rms,
        made_by=(f"learn_probabilities: {args.learn_steps} SGD steps (Adam 0.05) on the coupled MSE against EM at a "
                 f"FLOP budget of EM / {speedup:g}, score-function gradients; {args.trajectories} pooled starts"),
        learning={"seconds": res.seconds, "coupled_mse": h.coupled_mse.tolist(),
                  "expected_cost": h.expected_cost.tolist()})
    plot = _plot_learning(res, nfs, path[:-5] + ".png" if path.endswith(".json") else path + ".png")
    print(f"wrote {path} and {plot} in {time.perf_counter() - t0:.0f} s")


def _plot_learning(res, nfs, path):
    import numpy as np

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


def cmd_demo(args):
    from mlem_jax.diffusion.family import shipped_family_path
    from mlem_jax.diffusion.images import save_png, side_by_side, to_grid
    from mlem_jax.equal_error import equal_error_comparison

    _check_out(args.out)
    family = _family(args.family)
    nfs = [m.nf for m in family.models]
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, flush=True))
    print(f"mlem-jax demo: {args.batch_size} digits, {args.steps} steps, family nf={nfs}; EM on nf={nfs[-1]} "
          f"against ML-EM with stratified coins at equal coupled error (reference: EM on "
          f"{4 * args.steps} steps, same noise)", flush=True)
    probs, coupling, source = None, "independent", f"chosen on a pilot batch of {args.pilot_size}"
    cal_path = (args.family or shipped_family_path()) + ".calibration.json"
    if os.path.exists(cal_path):
        from mlem_jax.calibrate import load_calibration

        try:
            cal = load_calibration(cal_path)
        except ValueError as e:
            raise CLIError(f"demo: {e}") from e
        if cal.steps == args.steps and cal.grid == "uniform" and cal.coins == "stratified" and cal.levels == nfs:
            probs, coupling, source = cal.probs, cal.coupling, f"shipped calibration {os.path.basename(cal_path)}"
    r = equal_error_comparison(family, args.steps, args.batch_size, args.seed, probs=probs, coupling=coupling,
                               pilot_size=args.pilot_size, log=log)
    p = np.asarray(r.probs.values)
    print(f"  ML-EM configuration: {source}" + (f" ({r.pilot_seconds:.0f} s, not counted)" if probs is None else "")
          + f"; {r.config.coupling} coupling, time-averaged p = " + ", ".join(f"{v:.3f}" for v in p.mean(0))
          + (f"; lambda doubled {r.stepped_up} time(s) on the main batch" if r.stepped_up else ""))
    print(f"  EM    (nf={nfs[-1]} only): {r.em_seconds:6.2f} s   evaluations: nf={nfs[-1]}: {args.steps}   "
          f"coupled RMS error {r.em_error.value:.4f} +- {r.em_error.stderr:.4f}")
    print(f"  ML-EM (all levels):  {r.mlem_seconds:6.2f} s   evaluations: "
          + ", ".join(f"nf={n}: {e}" for n, e in zip(nfs, r.evaluations))
          + f"   coupled RMS error {r.mlem_error.value:.4f} +- {r.mlem_error.stderr:.4f}")
    print(f"  in FLOPs (XLA cost analysis x evaluations): EM / ML-EM = {r.flop_ratio:.2f}x (wall time differs "
          "where the small networks are overhead-bound, as on CPUs)")
    grid = side_by_side(to_grid(r.em_samples), to_grid(r.mlem_samples))
    save_png(args.out, grid, scale=4)
    np.savez_compressed(args.out[:-4] + ".npz" if args.out.endswith(".png") else args.out + ".npz",
                        em=r.em_samples, mlem=r.mlem_samples, evaluations=r.evaluations, probs=p)
    print(f"wrote {args.out} (left: EM, right: ML-EM)")
    print(f"equal-error speedup: {r.speedup:.2f}x (EM error {r.em_error.value:.4f}, ML-EM error "
          f"{r.mlem_error.value:.4f})")


def _check_out(path):
    """Fail before any compute when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise CLIError(f"--out: {path!r} lies under {probe!r}, which is a file, not a folder.")
    if not os.access(probe, os.W_OK):
        raise CLIError(f"--out: cannot write under {probe!r} (permission denied); choose another --out.")


# --------------------------------------------------------------------------- parser


def build_parser():
    from mlem_jax.diffusion.sampling import SOLVERS
    p = argparse.ArgumentParser(prog="mlem-jax",
                                description="Sample diffusion models with the Multilevel Euler-Maruyama method.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a UNet family by denoising score matching")
    t.add_argument("--dataset", default="digits",
                   help="digits (embedded, default), procedural, or a tfds dataset prepared in --data-dir "
                        "(mnist, fashion_mnist, cifar10, ...)")
    t.add_argument("--data-dir", default=None, help="tfds data dir holding the prepared dataset (never downloads)")
    t.add_argument("--image-size", type=_positive(int), default=None, help="resize images to this size")
    t.add_argument("--nfs", type=_positive(int), nargs="+", default=[4, 8, 16, 32],
                   help="base widths of the levels, increasing")
    t.add_argument("--ch-mult", type=_positive(int), nargs="+", default=[1, 2, 2],
                   help="channel multipliers per resolution")
    t.add_argument("--steps", type=_positive(int), default=2000, help="training steps per level")
    t.add_argument("--batch-size", type=_positive(int), default=128, help="training batch size")
    t.add_argument("--learning-rate", type=_positive(float), default=2e-3, help="Adam learning rate after warm-up")
    t.add_argument("--seed", type=_seed, default=0, help="seed of initialisation, data order and noise")
    t.add_argument("--checkpoint-every", type=_positive(int), default=500, help="steps between checkpoints")
    t.add_argument("--eval-every", type=_positive(int), default=250, help="steps between held-out losses")
    t.add_argument("--out", default="runs/family", help="output folder: checkpoints/ and family.npz/.json")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoints in --out")
    t.add_argument("--overwrite", action="store_true",
                   help="start again from step 0, deleting the checkpoints already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--parallel-levels", action="store_true",
                   help="train the levels side by side, one group of local devices each (one process)")
    _multiprocess_flags(t)
    t.set_defaults(func=cmd_train)

    def common(s, out_default):
        s.add_argument("--family", default=None,
                       help="trained family (path to family.npz, or its stem); default: the shipped digits family")
        s.add_argument("--levels", type=_positive(int), nargs="+", default=None,
                       help="level numbers to use, 1 = cheapest (default: all)")
        s.add_argument("--steps", type=_positive(int), default=100, help="number of sampling steps")
        s.add_argument("--grid", choices=["uniform", "quadratic", "karras", "logsnr"], default="uniform",
                       help="time grid (logsnr: equal steps in log-SNR, the grid DPM-Solver++ is made for)")
        s.add_argument("--seed", type=_seed, default=0, help="sampling seed")
        s.add_argument("--out", default=out_default, help="output file")
        s.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("sample", help="sample with one level or with the multilevel estimator (several levels)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(s, "samples.png")
    s.add_argument("--solver", choices=list(SOLVERS), default="em",
                   help="em / heun: Euler-Maruyama on the reverse SDE (--ode: the probability-flow ODE) / Heun on "
                        "the ODE; ddim, dpm++2m, dpm++3m, edm-euler, edm-heun: ODE samplers on the denoisers; "
                        "sde-dpm++2m: SDE-DPM-Solver++(2M). All take the multilevel estimator.")
    s.add_argument("--control", choices=["none", "cached", "extrapolated"], default="none",
                   help="control variate of the multilevel estimator: the last observed correction of each "
                        "level (unbiased with iid coins)")
    s.add_argument("--batch-size", type=_positive(int), default=64, help="number of samples")
    s.add_argument("--em", action="store_true", help="one level: --solver on the last of --levels")
    s.add_argument("--probs", type=float, nargs="+", default=None, help="constant level probabilities, p_1 = 1")
    s.add_argument("--calibration", default=None, help="a calibration file written by mlem-jax calibrate")
    s.add_argument("--coupling", choices=["independent", "nested"], default="independent")
    s.add_argument("--coins", choices=["iid", "stratified"], default="iid",
                   help="iid: fresh coins every step (the paper); stratified: firings spread evenly in time")
    s.add_argument("--ode", action="store_true", help="probability-flow ODE instead of the reverse SDE")
    _multiprocess_flags(s)
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("calibrate", help="measure level costs and variances, write time-dependent probabilities")
    common(c, "calibration.json")
    c.add_argument("--trajectories", type=_positive(int), default=32, help="reference trajectories")
    c.add_argument("--bins", type=_positive(int), default=10, help="time bins of the schedule")
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
    c.add_argument("--stride", type=_positive(int), default=None,
                   help="evaluate levels at every n-th model call (default 2; 1 with --control)")
    c.add_argument("--cost-batch", type=_positive(int), default=64,
                   help="batch at which the level costs are timed (the sampling batch; default 64)")
    c.add_argument("--target-variance", type=_positive(float), default=None,
                   help="injected variance per unit time the probabilities may add")
    c.add_argument("--speedup", type=_positive(float), default=None,
                   help="instead: a compute budget of EM's cost divided by this factor (iid coins: default 4)")
    c.add_argument("--target-error", type=_positive(float), default=None,
                   help="stratified coins: the coupled RMS error per pixel to reach")
    c.add_argument("--coins", choices=["iid", "stratified"], default=None,
                   help="the coin scheme to calibrate for (default: stratified, searched to match EM's coupled "
                        "error as --match-em does; iid with --speedup, --target-variance or --learn)")
    c.add_argument("--coupling", choices=["independent", "nested"], default="independent")
    c.add_argument("--match-em", action="store_true",
                   help="stratified: choose the cheapest configuration matching EM's coupled error on --steps "
                        "(pilot search on --trajectories samples)")
    c.add_argument("--learn", action="store_true",
                   help="iid coins: learn p_k(t) by SGD with score-function gradients (the paper's method) at a "
                        "FLOP budget of EM's cost / --speedup")
    c.add_argument("--learn-steps", type=_positive(int), default=100, help="with --learn: SGD steps")
    c.set_defaults(func=cmd_calibrate)

    d = sub.add_parser("demo", help="EM against ML-EM at equal coupled error on the shipped digits family")
    d.add_argument("--family", default=None, help=argparse.SUPPRESS)
    d.add_argument("--steps", type=_positive(int), default=100, help="number of sampling steps")
    d.add_argument("--batch-size", type=_positive(int), default=64, help="number of samples")
    d.add_argument("--pilot-size", type=_positive(int), default=32,
                   help="samples of the pilot batch on which the ML-EM configuration is chosen")
    d.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    d.add_argument("--out", default="demo.png", help="side-by-side PNG (left EM, right ML-EM)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except CLIError as e:
        print(f"mlem-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"mlem-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # XLA's out-of-memory error: one line and what to do
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        size = getattr(args, "batch_size", None)
        hint = f" at --batch-size {size}; use a smaller one" if size else "; use a smaller batch or model"
        print(f"mlem-jax {args.command}: error: out of device memory{hint} (XLA: "
              f"{str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
