"""Time-dependent calibrated probabilities against constant optimal and geometric ones.

A toy SDE whose level corrections are large near t = 0 and small near t = 1, as the
score of a diffusion model is hardest near the data end:

    dX = f(t, X) dt + 0.5 dW on [0, 1],  f^k(t, x) = -x + 2^-k s(t) sin(3x + k),
    s(t) = 3 exp(-8 t) + 0.05,            cost C_k = 4^k per evaluation (counted).

`calibration` measures V_k(t) on 256 reference trajectories (10 time bins). Each method
sweeps its knob (the injected variance for the optimal schedules, the ratio r of
p_k = r^(k-1) for the geometric one, the scale lambda of the stratified cube-root shape);
for every setting we measure the coupled RMS error against EM on f^K with the same noise,
over independent level keys per path, and the mean counted cost. The cost each method
needs to reach the same coupled error is interpolated in log-log, and the ratios to the
iid time-dependent optimum are printed, together with EM's cost on the finest level.

Coins: the iid optima are run with iid coins (the paper) and with stratified coins; the
stratified cube-root shape (`stratified_shape`, constant or per time bin, independent or
nested coupling) with stratified coins. `stratified_probabilities` (pilot runs on the 256
calibration trajectories) picks one point for a target error; its prediction is checked
against the measurement. The paper's learned schedules (`learn_probabilities`, iid coins,
10 bins, 1500 SGD steps on 16 groups of 2 paths, held at budgets spanning the sweep;
300 steps on 4 groups of 8 left them 1.2-1.4x costlier than the closed form, from SGD
noise) are measured the same way, and the wall time of learning is printed next to that
of the calibration.

    python benchmarks/calibrated_probabilities.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import (
    BatchedLevelKeyWarning,
    PiecewiseConstant,
    euler_maruyama,
    geometric_probabilities,
    multilevel_euler_maruyama,
    planned_evaluations,
)
from mlem_jax.calibrate import (
    calibrated_probabilities,
    learn_probabilities,
    level_statistics,
    stratified_probabilities,
    stratified_shape,
)
from mlem_jax.plotting import pyplot

from _common import device_description, out_dir

# one level key per path on purpose: the errors average over coin plans (no skipping needed)
warnings.filterwarnings("ignore", category=BatchedLevelKeyWarning)

K, DIM, SIGMA = 4, 4, 0.5
COSTS = 4.0 ** np.arange(1, K + 1)


def level(k):
    def f(t, y, args):
        s = 3.0 * jnp.exp(-8.0 * t) + 0.05
        return -y + 2.0**-k * s * jnp.sin(3.0 * y + k)

    return f


LEVELS = tuple(level(k) for k in range(1, K + 1))


def diffusion(t, y, args):
    return SIGMA


def measure(probs_list, ts, paths, seed, coins="iid", coupling="independent"):
    """Coupled RMS error against EM(f^K) and mean counted cost, for each schedule."""
    keys = jax.random.split(jax.random.key(seed), paths)
    level_keys = jax.random.split(jax.random.key(seed + 1), paths)
    y0 = jnp.zeros(DIM)
    em = jax.jit(jax.vmap(lambda k: euler_maruyama(LEVELS[-1], diffusion, y0, ts, k)))(keys)
    out = []
    for probs in probs_list:
        run = jax.jit(jax.vmap(lambda k, lk: multilevel_euler_maruyama(
            LEVELS, probs, diffusion, y0, ts, k, level_key=lk, coins=coins, coupling=coupling)))
        sol = run(keys, level_keys)
        err = float(jnp.sqrt(jnp.mean(jnp.sum((sol.y - em) ** 2, -1))))
        # per-path level keys run every level under vmap; count what a shared key would run
        planned = jax.vmap(lambda lk: planned_evaluations(probs, ts, lk, K, coupling=coupling, coins=coins))(level_keys)
        cost = float(np.asarray(planned, np.float64).mean(0) @ COSTS)
        out.append((err, cost))
    return np.array(out)


def cost_at(errors_costs, target):
    """Cost at a given coupled error, by log-log interpolation along the sweep."""
    e, c = errors_costs[:, 0], errors_costs[:, 1]
    order = np.argsort(e)
    e, c = np.log(e[order]), np.log(c[order])
    if not (e[0] <= np.log(target) <= e[-1]):
        return np.nan
    return float(np.exp(np.interp(np.log(target), e, c)))


def plot_learned(stats, steps, budgets, learned_values, path):
    """Learned p_k(t) (solid) against the closed-form iid optimum at the same budget (dashed)."""
    plt = pyplot()
    edges = np.asarray(stats.bin_edges)
    picks = sorted({0, len(budgets) // 2, len(budgets) - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(4.2 * len(picks), 3.6), sharey=True)
    for ax, i in zip(np.atleast_1d(axes), picks):
        closed = np.asarray(calibrated_probabilities(stats, COSTS, 1.0 / steps, budget=budgets[i],
                                                     num_steps=steps).values)
        for k in range(1, K):
            line = ax.stairs(np.asarray(learned_values[i])[:, k], edges, label=f"level {k + 1} learned")
            ax.stairs(closed[:, k], edges, ls="--", color=line.get_edgecolor(), label=f"level {k + 1} closed form")
        ax.set(yscale="log", xlabel="t", title=f"budget {budgets[i]:.0f} per path")
    np.atleast_1d(axes)[0].set_ylabel("p_k(t)")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.suptitle("Learned (SGD, score-function gradients) against closed-form probabilities")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--replot-learned", action="store_true",
                    help="redraw OUT/calibrated_probabilities_learned.png from OUT/calibrated_probabilities.json")
    args = ap.parse_args()
    steps, paths, sweep = (50, 300, 6) if args.quick else (200, 2000, 10)
    if args.replot_learned:
        with open(os.path.join(args.out, "calibrated_probabilities.json")) as f:
            saved = json.load(f)
        ts = jnp.linspace(0.0, 1.0, saved["steps"] + 1)
        stats = level_statistics(LEVELS, diffusion, jnp.zeros((256, DIM)), ts,
                                 jax.random.split(jax.random.key(99), 256), num_bins=10)
        print("wrote " + plot_learned(stats, saved["steps"], saved["learned"]["budgets"], saved["learned"]["values"],
                                      os.path.join(args.out, "calibrated_probabilities_learned.png")))
        return
    print(f"device: {device_description()}")
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    h = 1.0 / steps
    cal_keys = jax.random.split(jax.random.key(99), 256)
    t0 = time.perf_counter()
    stats = jax.block_until_ready(level_statistics(LEVELS, diffusion, jnp.zeros((256, DIM)), ts, cal_keys,
                                                   num_bins=10))
    calibration_seconds = time.perf_counter() - t0
    print("V_k(t) by time bin (rows: bins from t=0 to t=1):")
    print(np.array2string(stats.variances[:, 1:], precision=3))

    nus2 = np.logspace(-4, 0, sweep)
    ratios = np.linspace(0.05, 0.6, sweep)
    scales = np.logspace(-1.3, 0.7, sweep)
    iid_td = [calibrated_probabilities(stats, COSTS, h, v) for v in nus2]
    iid_const = [calibrated_probabilities(stats, COSTS, h, v, time_dependent=False) for v in nus2]

    def cube_root(coupling, time_dependent):
        V = stats.variances if time_dependent else stats.time_averaged("variances")[None]
        shape = stratified_shape(V, COSTS, coupling)
        out = []
        for lam in scales:
            p = np.minimum(1.0, lam * shape)
            p = np.minimum.accumulate(p, axis=1) if coupling == "nested" else p
            out.append(PiecewiseConstant(jnp.asarray(stats.bin_edges, jnp.float32), jnp.asarray(p, jnp.float32))
                       if time_dependent else jnp.asarray(p[0], jnp.float32))
        return out

    # (label, schedules, coins, coupling)
    methods = [
        ("iid: time-dependent optimal", iid_td, "iid", "independent"),
        ("iid: constant optimal", iid_const, "iid", "independent"),
        ("iid: geometric", [jnp.asarray(geometric_probabilities(K, r), jnp.float32) for r in ratios], "iid",
         "independent"),
        ("stratified: iid time-dep. optimum", iid_td, "stratified", "independent"),
        ("stratified: cube-root, time-dep.", cube_root("independent", True), "stratified", "independent"),
        ("stratified: cube-root, constant", cube_root("independent", False), "stratified", "independent"),
        ("stratified nested: cube-root, time-dep.", cube_root("nested", True), "stratified", "nested"),
    ]
    results = {label: measure(ps, ts, paths, 0, coins, coupling) for label, ps, coins, coupling in methods}
    # the paper's learned schedules (SGD, score-function gradients) at budgets spanning the iid optimum's sweep
    span = results["iid: time-dependent optimal"][:, 1]
    budgets = np.geomspace(span.min() * 1.2, span.max() / 1.2, 2 if args.quick else 5)
    learned, learn_seconds = [], []
    for b in budgets:
        r = learn_probabilities(LEVELS, diffusion, jnp.zeros((256, DIM)), ts, jax.random.key(7), costs=COSTS,
                                budget=float(b), num_bins=10, steps=60 if args.quick else 1500, num_groups=16,
                                group_size=2, progress=False)
        learned.append(r.probs)
        learn_seconds.append(r.seconds)
    results["iid: learned (SGD)"] = measure(learned, ts, paths, 0, "iid", "independent")
    print(f"calibration (V_k(t) on 256 trajectories): {calibration_seconds:.1f} s; learning: "
          f"{np.mean(learn_seconds):.1f} s per budget ({np.sum(learn_seconds):.0f} s for {len(budgets)})")
    em_cost = steps * COSTS[-1]
    base = "iid: time-dependent optimal"
    lo = max(min(r[:, 0].min() for r in results.values()), results[base][:, 0].min())
    hi = min(r[:, 0].max() for r in results.values())
    targets = np.exp(np.linspace(np.log(lo), np.log(hi), 5))
    print(f"\nEM on the finest level costs {em_cost:.4g} per path ({steps} steps); coupled errors are against it.")
    print("Cost to reach each coupled RMS error, as a ratio to the iid time-dependent optimum "
          "(below 1: cheaper), and EM's cost over the best stratified method's:")
    print(f"{'method':>40} " + " ".join(f"{t:>9.3g}" for t in targets))
    rows = []
    costs_at = {n: [cost_at(r, t) for t in targets] for n, r in results.items()}
    for n in results:
        print(f"{n:>40} " + " ".join(f"{c / b:9.3f}" if np.isfinite(c / b) else f"{'-':>9}"
                                      for c, b in zip(costs_at[n], costs_at[base])))
    best = [np.nanmin([costs_at[n][i] for n in results if n.startswith("stratified")]) for i in range(len(targets))]
    # not a speedup at equal quality: EM on f^K is the reference (coupled error 0 by definition);
    # this is what accepting each coupled error saves against it
    print("EM on f^K (error 0, the reference) over ML-EM at that coupled error -- not an equal-quality ratio:")
    print(f"{'EM cost / best stratified cost':>40} " + " ".join(f"{em_cost / b:9.2f}" for b in best))
    print(f"{'EM cost / iid time-dep. optimum cost':>40} " + " ".join(f"{em_cost / b:9.2f}" for b in costs_at[base]))
    for i, t in enumerate(targets):
        rows.append({"error": t, **{n: costs_at[n][i] for n in results}})
    # the pilot-scaled stratified calibration: its predicted error against a measurement
    target = float(np.sqrt(targets[1] * targets[2]))
    cal = stratified_probabilities(LEVELS, diffusion, jnp.zeros((256, DIM)), ts, cal_keys, stats, COSTS,
                                   target_error=target / np.sqrt(DIM))  # per component
    measured_err, measured_cost = measure([cal.probs], ts, paths, 5, "stratified")[0]
    print(f"\nstratified_probabilities for a coupled RMS of {target:.3g} (whole state): predicted "
          f"{cal.predicted_error * np.sqrt(DIM):.3g} at cost {cal.predicted_cost:.4g}; measured on fresh noise "
          f"{measured_err:.3g} at cost {measured_cost:.4g} (EM on f^K, error 0, costs "
          f"{em_cost / measured_cost:.2f}x more)")
    folder = out_dir(args.out)
    name = "calibrated_probabilities_quick" if args.quick else "calibrated_probabilities"
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump({"device": device_description(), "steps": steps, "paths": paths,
                   "sweeps": {n: r.tolist() for n, r in results.items()}, "at_equal_error": rows,
                   "calibration_seconds": calibration_seconds, "learn_seconds": learn_seconds,
                   "learned": {"budgets": budgets.tolist(), "edges": np.asarray(learned[0].edges).tolist(),
                               "values": [np.asarray(p.values).tolist() for p in learned]},
                   "stratified_calibration": {"target": target, "predicted": cal.predicted_error * np.sqrt(DIM),
                                              "predicted_cost": cal.predicted_cost, "measured": measured_err,
                                              "measured_cost": measured_cost}}, f, indent=1)
    plt = pyplot(required=False)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for n, r in results.items():
        o = np.argsort(r[:, 0])
        ax.loglog(r[o, 0], r[o, 1], "o-", ms=3, label=n)
    ax.axhline(em_cost, color="k", ls=":", label="EM on the finest level")
    ax.set(xlabel="coupled RMS error against EM(f^K)", ylabel="mean cost per path (counted)",
           title="Probability schedules on a time-dependent toy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name + ".png"), dpi=120)
    print(f"wrote {os.path.join(folder, name + '.png')}")
    print("wrote " + plot_learned(stats, steps, budgets, [np.asarray(p.values) for p in learned],
                                  os.path.join(folder, name + "_learned.png")))


if __name__ == "__main__":
    main()
