"""The ML-EM complexity theorem checked numerically on a synthetic hierarchy.

SDE: Ornstein-Uhlenbeck dX = -a X dt + sigma dW on [0, 1], X_0 = 1. Level k drifts
f^k(x) = -(a + 2^-k) x + 2^-k / 2, so |f^k - f| ~ 2^-k, with a cost of C_k = 2^(gamma k)
per evaluation (counted, not timed). Errors are RMS errors at t = 1 against the exact
solution driven by the same Brownian paths (the stochastic integral by trapezoid on a
fine grid). For each target eps we search the cheapest configuration reaching it:

* EM: number of levels L (drift f^L) and number of steps N; cost N C_L.
* ML-EM: L, N and the injected variance nu^2 of the optimal probabilities
  (`optimal_probabilities`); cost = counted evaluations of each level times C_k.

Theory (docs/method.md): cost ~ eps^-(gamma + 1) for EM and eps^-gamma for ML-EM.
The same search run on the cost and error formulas alone (no simulation) is printed
beside the measurement, over the measured eps range and over eps in [2^-30, 2^-20]:
with a finite number of levels, sum_k sqrt(V_k C_k) has not yet converged to its
finest term, which raises the ML-EM exponent measurable at practical eps.

    python benchmarks/toy_complexity.py            # full run (a few minutes on 2 cores)
    python benchmarks/toy_complexity.py --quick    # CI smoke run
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

from mlem_jax import BatchedLevelKeyWarning, euler_maruyama, multilevel_euler_maruyama, planned_evaluations
from mlem_jax.calibrate import correction_costs, optimal_probabilities
from mlem_jax.plotting import pyplot

from _common import device_description, out_dir

A, SIGMA, X0 = 1.0, 0.5, 1.0

# one level key per path on purpose: the errors average over coin plans (no skipping needed)
warnings.filterwarnings("ignore", category=BatchedLevelKeyWarning)


def level(k):
    c = 2.0**-k
    return lambda t, y, args: -(A + c) * y + 0.5 * c


def diffusion(t, y, args):
    return SIGMA


def exact_solution(dw):
    """X_1 = e^-a X_0 + sigma W_1 - sigma a int_0^1 e^{-a(1-s)} W_s ds on the fine path."""
    m, n = dw.shape
    w = jnp.concatenate([jnp.zeros((m, 1)), jnp.cumsum(dw, -1)], -1)
    s = jnp.linspace(0.0, 1.0, n + 1)
    g = jnp.exp(-A * (1 - s)) * w
    integral = (g[:, 1:] + g[:, :-1]).sum(-1) / (2 * n)
    return jnp.exp(-A) * X0 + SIGMA * w[:, -1] - SIGMA * A * integral


def coarse(dw, n):
    return dw.reshape(dw.shape[0], n, -1).sum(-1)


def level_variances(max_level, paths=2000, steps=64):
    """V_k = E|f^k - f^{k-1}|^2 along EM trajectories of the finest level, averaged in time."""
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    keys = jax.random.split(jax.random.key(123), paths)
    xs = jax.vmap(lambda k: euler_maruyama(level(max_level), diffusion, jnp.float32(X0), ts, k, saveat="all"))(keys)
    xs = np.asarray(xs[:, :-1], np.float64)
    v = [np.mean(level(1)(0, xs, None) ** 2)]
    for k in range(2, max_level + 1):
        v.append(np.mean((level(k)(0, xs, None) - level(k - 1)(0, xs, None)) ** 2))
    return np.array(v)


def em_errors(dw, exact, levels, steps):
    err = np.full((len(levels), len(steps)), np.inf)
    for j, n in enumerate(steps):
        ts = jnp.linspace(0.0, 1.0, n + 1)
        inc = coarse(dw, n)
        for i, L in enumerate(levels):
            x = jax.jit(jax.vmap(lambda d: euler_maruyama(level(L), diffusion, jnp.float32(X0), ts, d)))(inc)
            err[i, j] = float(jnp.sqrt(jnp.mean((x - exact) ** 2)))
    return err


def mlem_errors(dw, exact, L, n, probs, level_costs):
    """RMS error and mean counted cost of ML-EM for each row of `probs` (shape (J, L)).
    Coins are drawn per path so that the errors of different paths are independent."""
    ts = jnp.linspace(0.0, 1.0, n + 1)
    drifts = tuple(level(k) for k in range(1, L + 1))
    inc = coarse(dw, n)
    level_keys = jax.random.split(jax.random.key(L * 100_003 + n), dw.shape[0])

    def one(p, d, lk):
        sol = multilevel_euler_maruyama(drifts, p, diffusion, jnp.float32(X0), ts, d, level_key=lk)
        # per-path level keys run every level under vmap; count what a shared key would run
        return sol.y, planned_evaluations(p, ts, lk, L)

    run = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)), in_axes=(0, None, None)))
    x, evals = run(jnp.asarray(probs, jnp.float32), inc, level_keys)
    err = np.sqrt(np.mean((np.asarray(x) - np.asarray(exact)[None]) ** 2, axis=1))
    cost = np.asarray(evals, np.float64).mean(1) @ level_costs[:L]
    return err, cost


def cheapest(errors, costs, eps):
    ok = errors <= eps
    return np.min(np.where(ok, costs, np.inf))


def fit_exponent(eps, cost):
    good = np.isfinite(cost)
    slope, _ = np.polyfit(np.log(1 / eps[good]), np.log(cost[good]), 1)
    return slope


def model_best_costs(eps, C_fn, v0, b0, d0, max_level, max_pow, kappa):
    """Cheapest costs predicted by the formulas of docs/method.md, no simulation.

    Errors: EM error sqrt((b0 2^-L)^2 + (d0 / N)^2) (bias of level L, strong order 1),
    plus the injected variance kappa nu^2; V_k = v0 4^-k. Costs: expected evaluations
    N (C_1 + sum_k p_k C~_k) of EM and ML-EM. Used to tell pre-asymptotic effects (a
    finite number of levels) from a disagreement with the theory.
    """
    nus = 2.0 ** -np.arange(2.0, max_level + 4.01, 0.25)
    em_best = np.full(eps.shape, np.inf)
    ml_best = np.full(eps.shape, np.inf)
    for L in range(1, max_level + 1):
        C = C_fn(np.arange(1, L + 1))
        V = v0 * 4.0 ** -np.arange(1, L + 1)
        Ct = correction_costs(C)
        for j in range(1, max_pow + 1):
            n = 2.0**j
            e_em = np.hypot(b0 * 2.0**-L, d0 / n)
            em_best = np.where(e_em <= eps, np.minimum(em_best, n * C[-1]), em_best)
            if L == 1:
                ml_best = np.where(e_em <= eps, np.minimum(ml_best, n * C[0]), ml_best)
                continue
            for nu in nus:
                pk = optimal_probabilities(V, Ct, 1.0 / n, nu**2)
                err = np.sqrt(e_em**2 + kappa * nu**2)
                cost = n * (C[0] + np.sum(pk[1:] * Ct[1:]))
                ml_best = np.where(err <= eps, np.minimum(ml_best, cost), ml_best)
    return em_best, ml_best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grids and few paths (CI smoke run)")
    ap.add_argument("--gammas", type=float, nargs="+", default=None, help="default 2.5 3.0 (--quick: 2.5)")
    ap.add_argument("--out", default="benchmarks/out", help="folder for the PNG and JSON results")
    args = ap.parse_args()
    args.gammas = args.gammas or ([2.5] if args.quick else [2.5, 3.0])

    if args.quick:  # compile-bound: each (levels, steps) pair is one ML-EM program, about 1 s per level to compile
        paths, fine, max_level, max_pow = 200, 2**9, 5, 8
        eps = 2.0 ** -np.arange(5.0, 7.01, 0.5)
    else:
        paths, fine, max_level, max_pow = 1000, 2**13, 11, 12
        eps = 2.0 ** -np.arange(5.0, 11.01, 0.25)
    levels = list(range(1, max_level + 1))
    steps = [2**j for j in range(1, max_pow + 1)]
    nus = 2.0 ** -np.arange(3.0, 13.01, 0.25)  # nu: injected standard deviation per unit time
    print(f"device: {device_description()}")
    print(f"paths {paths}, fine grid {fine}, levels 1..{max_level}, steps {steps[0]}..{steps[-1]}")
    t_start = time.perf_counter()

    dw = jax.random.normal(jax.random.key(0), (paths, fine)) / np.sqrt(fine)
    exact = exact_solution(dw)
    err_em = em_errors(dw, exact, levels, steps)
    V = level_variances(max_level)

    results = {"device": device_description(), "quick": args.quick, "eps": eps.tolist(), "gammas": {}}
    for gamma in args.gammas:
        C = 2.0 ** (gamma * np.arange(1, max_level + 1))
        cost_em = np.array([[n * C[L - 1] for n in steps] for L in levels])
        ml_err, ml_cost = [], []
        for i, L in enumerate(levels):
            for j, n in enumerate(steps):
                if err_em[i, j] > 1.5 * eps.max():
                    continue  # EM on this grid with these levels is already too inaccurate
                if j > 0 and err_em[i, j - 1] < 1.05 * err_em[i, j] and err_em[i, j - 1] <= 1.5 * eps.max():
                    continue  # past the bias floor of level L: more steps only add cost
                if L == 1:
                    ml_err.append([err_em[i, j]])
                    ml_cost.append([cost_em[i, j]])
                    continue
                Ct = correction_costs(C[:L])
                # an injected error far below the EM error only adds cost; above eps_max it is useless
                useful = nus[(nus >= err_em[i, j] / 4) & (nus <= 1.5 * eps.max())]
                if useful.size == 0:
                    continue
                probs = np.stack([optimal_probabilities(V[:L], Ct, 1.0 / n, nu**2) for nu in useful])
                e, c = mlem_errors(dw, exact, L, n, probs, C)
                ml_err.append(e)
                ml_cost.append(c)
        ml_err = np.concatenate(ml_err)
        ml_cost = np.concatenate(ml_cost)
        best_em = np.array([cheapest(err_em, cost_em, e) for e in eps])
        best_ml = np.array([cheapest(ml_err, ml_cost, e) for e in eps])
        s_em, s_ml = fit_exponent(eps, best_em), fit_exponent(eps, best_ml)
        print(f"\ngamma = {gamma}: fitted cost exponents EM {s_em:.2f} (theory {gamma + 1:.2f}), "
              f"ML-EM {s_ml:.2f} (theory {gamma:.2f})")
        print(f"{'eps':>10} {'EM cost':>12} {'ML-EM cost':>12} {'speedup':>8}")
        for e, a, b in zip(eps, best_em, best_ml):
            print(f"{e:10.2e} {a:12.4g} {b:12.4g} {a / b:8.2f}")
        # the same search on the formulas alone, over the measured range and far beyond it
        b0 = float(np.median(err_em[:, -1] * 2.0 ** np.array(levels)))
        d0 = float(np.median(err_em[-1, : len(steps) // 2] * np.array(steps[: len(steps) // 2])))
        v0 = float(np.median(V[1:] * 4.0 ** np.arange(2, max_level + 1)))
        kappa = (1 - np.exp(-2 * A)) / (2 * A)  # OU damps injected noise: E D_1^2 ~ kappa nu^2
        C_fn = lambda k: 2.0 ** (gamma * k)
        m_em, m_ml = model_best_costs(eps, C_fn, v0, b0, d0, max_level, max_pow, kappa)
        far = 2.0 ** -np.arange(20.0, 30.01, 0.25)
        f_em, f_ml = model_best_costs(far, C_fn, v0, b0, d0, 34, 34, kappa)
        model = {
            "exponent_em_same_range": fit_exponent(eps, m_em), "exponent_mlem_same_range": fit_exponent(eps, m_ml),
            "exponent_em_far": fit_exponent(far, f_em), "exponent_mlem_far": fit_exponent(far, f_ml),
        }
        print(f"formula model, same eps range: EM {model['exponent_em_same_range']:.2f}, "
              f"ML-EM {model['exponent_mlem_same_range']:.2f};  eps in [2^-30, 2^-20]: "
              f"EM {model['exponent_em_far']:.2f}, ML-EM {model['exponent_mlem_far']:.2f}")
        results["gammas"][str(gamma)] = {
            "exponent_em": s_em, "exponent_mlem": s_ml,
            "cost_em": best_em.tolist(), "cost_mlem": best_ml.tolist(),
            "model": model, "model_cost_mlem": m_ml.tolist(),
        }
    print(f"\ntotal time {time.perf_counter() - t_start:.1f} s")

    folder = out_dir(args.out)
    name = "toy_complexity_quick" if args.quick else "toy_complexity"
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    plt = pyplot(required=False)
    if plt is None:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for gamma, r in results["gammas"].items():
        line, = ax.loglog(1 / eps, r["cost_em"], "o-", ms=3, label=f"EM, gamma={gamma} (slope {r['exponent_em']:.2f})")
        ax.loglog(1 / eps, r["cost_mlem"], "s--", ms=3, color=line.get_color(),
                  label=f"ML-EM, gamma={gamma} (slope {r['exponent_mlem']:.2f})")
        ax.loglog(1 / eps, r["model_cost_mlem"], ":", color=line.get_color(), alpha=0.7,
                  label=f"ML-EM formula model (asymptotic slope {r['model']['exponent_mlem_far']:.2f})")
    ax.set_xlabel("1 / eps (target RMS error)")
    ax.set_ylabel("cost (sum of evaluations x 2^(gamma k))")
    ax.set_title("Cheapest configuration reaching eps (OU toy)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, name + ".png"), dpi=120)
    print(f"wrote {os.path.join(folder, name + '.png')}")


if __name__ == "__main__":
    main()
