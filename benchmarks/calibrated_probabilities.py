"""Time-dependent calibrated probabilities against constant optimal and geometric ones.

A toy SDE whose level corrections are large near t = 0 and small near t = 1, as the
score of a diffusion model is hardest near the data end:

    dX = f(t, X) dt + 0.5 dW on [0, 1],  f^k(t, x) = -x + 2^-k s(t) sin(3x + k),
    s(t) = 3 exp(-8 t) + 0.05,            cost C_k = 4^k per evaluation (counted).

`calibration` measures V_k(t) on 256 reference trajectories (10 time bins). Each method
sweeps its knob (the injected variance for the optimal schedules, the ratio r of
p_k = r^(k-1) for the geometric one); for every setting we measure the coupled RMS error
against EM on f^K with the same noise, over independent level keys per path, and the
mean counted cost. The cost each method needs to reach the same coupled error is
interpolated in log-log, and the ratios are printed.

    python benchmarks/calibrated_probabilities.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from _common import device_description, out_dir
from mlem_jax import euler_maruyama, geometric_probabilities, multilevel_euler_maruyama
from mlem_jax.calibrate import calibrated_probabilities, level_statistics

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


def measure(probs_list, ts, paths, seed):
    """Coupled RMS error against EM(f^K) and mean counted cost, for each schedule."""
    keys = jax.random.split(jax.random.key(seed), paths)
    level_keys = jax.random.split(jax.random.key(seed + 1), paths)
    y0 = jnp.zeros(DIM)
    em = jax.jit(jax.vmap(lambda k: euler_maruyama(LEVELS[-1], diffusion, y0, ts, k)))(keys)
    out = []
    for probs in probs_list:
        run = jax.jit(jax.vmap(lambda k, lk: multilevel_euler_maruyama(LEVELS, probs, diffusion, y0, ts, k, level_key=lk)))
        sol = run(keys, level_keys)
        err = float(jnp.sqrt(jnp.mean(jnp.sum((sol.y - em) ** 2, -1))))
        cost = float(np.asarray(sol.evaluations, np.float64).mean(0) @ COSTS)
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    steps, paths, sweep = (50, 300, 6) if args.quick else (200, 2000, 10)
    print(f"device: {device_description()}")
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    h = 1.0 / steps
    cal_keys = jax.random.split(jax.random.key(99), 256)
    stats = level_statistics(LEVELS, diffusion, jnp.zeros((256, DIM)), ts, cal_keys, num_bins=10)
    print("V_k(t) by time bin (rows: bins from t=0 to t=1):")
    print(np.array2string(stats.variances[:, 1:], precision=3))

    nus2 = np.logspace(-4, 0, sweep)
    ratios = np.linspace(0.05, 0.6, sweep)
    schedules = {
        "time-dependent optimal": [calibrated_probabilities(stats, COSTS, h, v) for v in nus2],
        "constant optimal": [calibrated_probabilities(stats, COSTS, h, v, time_dependent=False) for v in nus2],
        "geometric": [jnp.asarray(geometric_probabilities(K, r), jnp.float32) for r in ratios],
    }
    results = {name: measure(ps, ts, paths, seed=0) for name, ps in schedules.items()}
    em_cost = steps * COSTS[-1]
    lo = max(r[:, 0].min() for r in results.values())
    hi = min(r[:, 0].max() for r in results.values())
    targets = np.exp(np.linspace(np.log(lo), np.log(hi), 5))
    print(f"\nEM on the finest level costs {em_cost:.4g} per path ({steps} steps); coupled errors are against it")
    print(f"{'coupled RMS error':>18} " + " ".join(f"{n:>24}" for n in results) + "   const/time-dep  geom/time-dep")
    rows = []
    for tgt in targets:
        c = {n: cost_at(r, tgt) for n, r in results.items()}
        td = c["time-dependent optimal"]
        rows.append({"error": tgt, **c})
        print(f"{tgt:18.4g} " + " ".join(f"{c[n]:24.4g}" for n in results)
              + f"   {c['constant optimal'] / td:14.2f}  {c['geometric'] / td:13.2f}")
    folder = out_dir(args.out)
    name = "calibrated_probabilities_quick" if args.quick else "calibrated_probabilities"
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump({"device": device_description(), "steps": steps, "paths": paths,
                   "sweeps": {n: r.tolist() for n, r in results.items()}, "at_equal_error": rows}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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


if __name__ == "__main__":
    main()
