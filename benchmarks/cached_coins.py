"""Cached against uncached against stratified coins, inside EM, SDE-DPM-Solver++(2M) and
DPM-Solver++(2M), measured in one run.

The error is always the coin error: the coupled RMS of a multilevel run against the same
sampler on the finest level, same grid, same prior draw and same noise.

(a) Toy SDE / ODE (docs/samplers.md): dy = f dt + 0.5 dW on [0, 1] (and g = 0) with
    f^3 = -y + sin 3y + cos 2t, f^2 = -y + 0.8 sin 3y + 0.9 cos 2t, f^1 = -y, p = (1, 0.3, 0.1),
    EM. Strong orders over N, and the bias (mean difference, in standard errors).
(b) A diffusion toy: Gaussian data N(0.3, 0.5^2), D^3 the exact VP denoiser, D^2 and D^1
    levels whose eps-predictions are off by 0.03 sin 3x + 0.02 cos 4t and by
    0.1 sin(2x + 1) + 0.05 cos 3t (so D is off by sigma / alpha times that, as for an
    eps-network); EM on the reverse SDE, SDE-DPM-Solver++(2M) and DPM-Solver++(2M) on a
    log-SNR grid. Orders, bias, and the cost at equal coupled error:
    probabilities scaled by s in a grid, level costs (1, 4, 16) per call (a width doubling
    per level of a UNet family), the expected cost to reach the error of iid coins at s = 1.
    The controls rescale the cached D corrections by sigma / alpha (the samplers' default).
(c) The Fashion-MNIST family (benchmarks/weights/fmnist16, nf 4..32), p = (1, 0.6, 0.3,
    0.12), the three samplers, RMS per pixel over a batch with a shared level key (the
    way one samples), mean over level keys.

    python benchmarks/cached_coins.py [--quick] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import BatchedLevelKeyWarning, BiasedEstimatorWarning, Multilevel, euler_maruyama
from mlem_jax.diffusion import (
    VP,
    dpm_solver_pp,
    logsnr_grid,
    reverse_diffusion,
    reverse_drift,
    score_from_denoiser,
    sde_dpm_solver_pp,
    uniform_grid,
)

from _common import device_description, out_dir

sys.path.insert(0, os.path.dirname(__file__))
from image_analysis import cost_to_reach  # noqa: E402

ESTIMATORS = {  # name: (coins, control)
    "iid": ("iid", None),
    "iid + cached": ("iid", "cached"),
    "iid + extrapolated": ("iid", "extrapolated"),
    "stratified": ("stratified", None),
    "stratified + cached": ("stratified", "cached"),
}
warnings.simplefilter("ignore", BatchedLevelKeyWarning)  # (a), (b): per-path coins on purpose
warnings.simplefilter("ignore", BiasedEstimatorWarning)  # measured here


def order(steps, errors):
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


def summarise(diffs):
    d = np.asarray(diffs, np.float64).reshape(diffs.shape[0], -1)
    bias = d.mean(0)
    se = d.std(0) / np.sqrt(d.shape[0])
    return float(np.sqrt(np.mean(d**2))), float(np.abs(bias).max()), float(np.max(np.abs(bias) / se))


# ----------------------------------------------------------------------------- (a) the toy

TOY = (lambda t, y, a: -y, lambda t, y, a: -y + 0.8 * jnp.sin(3 * y) + 0.9 * jnp.cos(2 * t),
       lambda t, y, a: -y + jnp.sin(3 * y) + jnp.cos(2 * t))


def toy(steps_list, paths, diffusion, estimators):
    g = None if diffusion is None else (lambda t, y, a: diffusion)
    probs = jnp.array([1.0, 0.3, 0.1])
    out = {}
    for name in estimators:
        coins, control = ESTIMATORS[name]
        rows = []
        for n in steps_list:
            ts = jnp.linspace(0.0, 1.0, n + 1)

            def one(key):
                noise_key, level_key = jax.random.split(key)
                ref = euler_maruyama(TOY[-1], g, jnp.zeros(()), ts, noise_key)
                ml = Multilevel(TOY, probs, coins=coins, control=control, level_key=level_key)
                return euler_maruyama(ml, g, jnp.zeros(()), ts, noise_key).y - ref

            rms, bias, z = summarise(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), paths)))
            rows.append({"steps": n, "rms": rms, "bias": bias, "bias_z": z})
        out[name] = {"rows": rows, "order": order(steps_list, [r["rms"] for r in rows])}
    return out


# ---------------------------------------------------------------- (b) the diffusion toy

SDE = VP()
M, S = 0.3, 0.5


def exact_denoiser(t, x, args):
    a, s = SDE.alpha(t), SDE.std(t)
    return M + a * S**2 / (a**2 * S**2 + s**2) * (x - a * M)


def _eps_error(delta):
    """A level whose eps-prediction is off by delta(t, x): D is off by -(sigma / alpha) delta."""
    return lambda t, x, a: exact_denoiser(t, x, a) - SDE.noise_to_signal(t) * delta(t, x)


DENOISERS = (_eps_error(lambda t, x: 0.1 * jnp.sin(2 * x + 1) + 0.05 * jnp.cos(3 * t)),
             _eps_error(lambda t, x: 0.03 * jnp.sin(3 * x) + 0.02 * jnp.cos(4 * t)),
             exact_denoiser)
COSTS = np.array([1.0, 4.0, 16.0])


def _em(model, x, ts, key):
    drift = lambda d: reverse_drift(SDE, score_from_denoiser(SDE, d))
    if isinstance(model, Multilevel):
        model = Multilevel([drift(d) for d in model.levels], model.probs, coins=model.coins,
                           control=model.control, level_key=model.level_key)
    else:
        model = drift(model)
    return euler_maruyama(model, reverse_diffusion(SDE), x, ts, key)


SAMPLERS = {  # name: (run(model, x, ts, key), grid(n))
    "EM": (_em, lambda n: uniform_grid(n)),
    "SDE-DPM-Solver++(2M)": (lambda m, x, ts, k: sde_dpm_solver_pp(m, SDE, x, ts, k), lambda n: logsnr_grid(SDE, n)),
    "DPM-Solver++(2M)": (lambda m, x, ts, k: dpm_solver_pp(m, SDE, x, ts, k), lambda n: logsnr_grid(SDE, n)),
}


def scaled(s):
    return jnp.minimum(jnp.array([1.0, 0.3 * s, 0.1 * s]), 1.0)


def diffusion_run(sampler, n, coins, control, probs, paths):
    run, grid = SAMPLERS[sampler]
    ts = grid(n)

    def one(key):
        prior_key, noise_key, level_key = jax.random.split(key, 3)
        x = jax.random.normal(prior_key, ())
        ref = run(DENOISERS[-1], x, ts, noise_key)
        sol = run(Multilevel(DENOISERS, probs, coins=coins, control=control, level_key=level_key), x, ts, noise_key)
        return sol.y - ref, sol.evaluations

    diffs, _ = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), paths))
    rms, bias, z = summarise(diffs)
    return {"steps": n, "rms": rms, "bias": bias, "bias_z": z, "cost": expected_cost(probs, n, control)}


def expected_cost(probs, calls, control):
    """Expected cost per path: level k runs when coin k or k + 1 fires, P = 1 - (1 - p_k)(1 - p_{k+1})
    (the same marginals for iid and stratified coins); a control fires every level at the first call.
    (Per-path level keys make every level run under vmap, so the solver's counts say nothing here.)"""
    p = np.asarray(probs, np.float64)
    needed = 1 - (1 - p) * (1 - np.append(p[1:], 0.0))
    per_call = float(needed @ COSTS)
    return calls * per_call + (float((1 - needed) @ COSTS) if control else 0.0)


def diffusion_toy(steps, paths, scales, cost_steps, estimators):
    out = {}
    for sampler in steps:
        grid_steps = steps[sampler]
        out[sampler] = {}
        for name in estimators:
            coins, control = ESTIMATORS[name]
            rows = [diffusion_run(sampler, n, coins, control, scaled(1.0), paths) for n in grid_steps]
            front = [diffusion_run(sampler, cost_steps[sampler], coins, control, scaled(s), paths) for s in scales]
            out[sampler][name] = {"rows": rows, "order": order(grid_steps, [r["rms"] for r in rows]),
                                  "front": [dict(r, scale=s) for r, s in zip(front, scales)]}
        base = out[sampler]["iid"]["front"][list(scales).index(1.0)]
        for name, res in out[sampler].items():
            c, how = cost_to_reach([r["cost"] for r in res["front"]], [r["rms"] for r in res["front"]], base["rms"])
            res["cost_at_iid_error"] = {"cost": c, "how": how, "iid_cost": base["cost"],
                                        "gain": None if c is None else base["cost"] / c}
    return out


# ------------------------------------------------------------------ (c) Fashion-MNIST

def fmnist(family_path, steps, batch, level_keys, names):
    from mlem_jax.diffusion import load_family

    family = load_family(family_path)
    sde, shape = family.sde, tuple(family.image_shape)
    levels = family.denoisers()
    probs = jnp.array([1.0, 0.6, 0.3, 0.12])
    runs = {
        "EM": lambda m, x, ts, k: _family_em(family, m, x, ts, k),
        "SDE-DPM-Solver++(2M)": lambda m, x, ts, k: sde_dpm_solver_pp(m, sde, x, ts, k),
        "DPM-Solver++(2M)": lambda m, x, ts, k: dpm_solver_pp(m, sde, x, ts, k),
    }
    keys = jax.random.split(jax.random.key(2), batch)
    x0 = jax.vmap(lambda k: sde.prior_sample(k, shape))(keys)
    out = {}
    for sampler, n_list in steps.items():
        run = runs[sampler]
        for n in n_list:
            ts = uniform_grid(n) if sampler == "EM" else logsnr_grid(sde, n)
            ref = jax.jit(jax.vmap(lambda x, k: run(levels[-1], x, ts, k)))(x0, keys)
            for name in names:
                coins, control = ESTIMATORS[name]
                f = jax.jit(jax.vmap(lambda x, k, lk: run(Multilevel(levels, probs, coins=coins, control=control,
                                                                     level_key=lk), x, ts, k),
                                     in_axes=(0, 0, None)))
                per_key, evals = [], None
                start = time.perf_counter()
                for j in range(level_keys):
                    sol = f(x0, keys, jax.random.key(100 + j))
                    per_key.append(float(jnp.sqrt(jnp.mean((sol.y - ref) ** 2))))
                    evals = np.asarray(sol.evaluations[0]).tolist()
                out.setdefault(sampler, []).append({"steps": n, "estimator": name, "rms_per_key": per_key,
                                                    "rms": float(np.mean(per_key)), "evaluations_last_key": evals,
                                                    "seconds": time.perf_counter() - start})
                print(f"  (c) {sampler:22s} N={n:3d} {name:14s} RMS/pixel {np.mean(per_key):.3f} "
                      f"(keys: {', '.join(f'{v:.3f}' for v in per_key)}), evaluations {evals}", flush=True)
    return out


def _family_em(family, model, x, ts, key):
    drifts = family.drifts()
    if isinstance(model, Multilevel):
        model = Multilevel(drifts, model.probs, coins=model.coins, control=model.control, level_key=model.level_key)
    else:
        model = drifts[-1]
    return euler_maruyama(model, reverse_diffusion(family.sde), x, ts, key)


def _rms(res):
    return " / ".join(f"{r['rms']:.2e}" for r in res["rows"])


def markdown(results) -> str:
    """The tables of docs/samplers.md, from the results."""
    lines = []
    for part, res_part in results["toy"].items():
        steps = [r["steps"] for r in next(iter(res_part.values()))["rows"]]
        lines += [f"**(a) Toy {part.upper()}, EM**, p = (1, 0.3, 0.1), coupled RMS at N = {steps}:", "",
                  "| estimator | RMS | order | bias at N = %d (s.e.) |" % steps[0], "|---|---|---|---|"]
        for name, res in res_part.items():
            r0 = res["rows"][0]
            lines.append(f"| {name} | {_rms(res)} | {res['order']:.2f} | {r0['bias']:.1e} ({r0['bias_z']:.1f}) |")
        lines.append("")
    for sampler, res_s in results["diffusion_toy"].items():
        steps = [r["steps"] for r in next(iter(res_s.values()))["rows"]]
        lines += [f"**(b) Diffusion toy, {sampler}**, coupled RMS at N = {steps}; cost gain over iid at iid's error "
                  "(level costs 1, 4, 16; '>=' where the cheapest setting tried already beats it):", "",
                  "| estimator | RMS | order | bias at N = %d (s.e.) | cost gain at equal error |" % steps[0],
                  "|---|---|---|---|---|"]
        for name, res in res_s.items():
            r0, c = res["rows"][0], res["cost_at_iid_error"]
            at_least = ">= " if c["how"] == "at most" else ""
            gain = "not reached" if c["gain"] is None else f"{at_least}{c['gain']:.2f}x"
            lines.append(f"| {name} | {_rms(res)} | {res['order']:.2f} | {r0['bias_z']:.1f} | {gain} |")
        lines.append("")
    if "fmnist" in results:
        lines += ["**(c) Fashion-MNIST nf 4..32**, p = (1, 0.6, 0.3, 0.12), coin RMS per pixel (mean of the level "
                  "keys; per key in brackets):", "", "| sampler | N | " + " | ".join(
                      dict.fromkeys(r["estimator"] for rs in results["fmnist"].values() for r in rs)) + " |"]
        names = list(dict.fromkeys(r["estimator"] for rs in results["fmnist"].values() for r in rs))
        lines.append("|---|---|" + "---|" * len(names))
        for sampler, rs in results["fmnist"].items():
            for n in dict.fromkeys(r["steps"] for r in rs):
                cells = {r["estimator"]: f"{r['rms']:.3f} ({', '.join(f'{v:.3f}' for v in r['rms_per_key'])})"
                         for r in rs if r["steps"] == n}
                lines.append(f"| {sampler} | {n} | " + " | ".join(cells.get(m, "") for m in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (what CI runs)")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--family", default="benchmarks/weights/fmnist16")
    args = ap.parse_args(argv)
    q = args.quick
    print(f"device: {device_description()}", flush=True)
    results = {"device": device_description(), "quick": q}

    # --quick (CI): the code paths at tiny sizes, two estimators, one fast sampler
    estimators = ("iid", "iid + cached") if q else tuple(ESTIMATORS)
    toy_steps, toy_paths = ((25, 100), 300) if q else ((100, 200, 400, 800), 4000)
    results["toy"] = {"sde": toy(toy_steps, toy_paths, 0.5, estimators)}
    if not q:
        results["toy"]["ode"] = toy(toy_steps, toy_paths, None, estimators)
    for part in results["toy"]:
        print(f"\n(a) toy {part.upper()}, EM, p = (1, 0.3, 0.1), {toy_paths} paths: coupled RMS at N = {toy_steps}")
        for name, res in results["toy"][part].items():
            rms = " / ".join(f"{r['rms']:.2e}" for r in res["rows"])
            print(f"  {name:20s} {rms}   order {res['order']:.2f}   max |bias| {res['rows'][0]['bias']:.1e} "
                  f"({res['rows'][0]['bias_z']:.1f} s.e.) at N={toy_steps[0]}")

    if q:
        steps = {"DPM-Solver++(2M)": (5, 10)}
        cost_steps, scales, paths = {"DPM-Solver++(2M)": 5}, (1.0, 3.0), 300
    else:
        steps = {"EM": (50, 100, 200, 400), "SDE-DPM-Solver++(2M)": (10, 20, 40, 80),
                 "DPM-Solver++(2M)": (10, 20, 40, 80)}
        cost_steps, scales, paths = ({"EM": 100, "SDE-DPM-Solver++(2M)": 20, "DPM-Solver++(2M)": 20},
                                     (0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0), 4000)
    results["diffusion_toy"] = diffusion_toy(steps, paths, scales, cost_steps, estimators)
    for sampler, res_s in results["diffusion_toy"].items():
        print(f"\n(b) diffusion toy, {sampler}, {paths} paths: coupled RMS at N = {steps[sampler]}; "
              f"cost at iid's error (N={cost_steps[sampler]}, level costs 1, 4, 16)")
        for name, res in res_s.items():
            rms = " / ".join(f"{r['rms']:.2e}" for r in res["rows"])
            c = res["cost_at_iid_error"]
            gain = "not reached" if c["gain"] is None else f"{c['gain']:.2f}x ({c['how']})"
            print(f"  {name:20s} {rms}   order {res['order']:.2f}   bias {res['rows'][0]['bias_z']:.1f} s.e. "
                  f"at N={steps[sampler][0]}   cost gain over iid at equal error: {gain}")

    # (c) is skipped by --quick (CI time: its UNet compilations cost 40 s); tests/test_cli.py samples a tiny
    # UNet family with a cached multilevel DPM-Solver++(2M), the same code path
    if not q and os.path.exists(args.family + ".npz"):
        f_steps = {"EM": (100, 200), "SDE-DPM-Solver++(2M)": (20, 50), "DPM-Solver++(2M)": (20, 50)}
        batch, keys = 32, 2
        print(f"\n(c) Fashion-MNIST nf 4..32 ({args.family}), {batch} images, level key shared by the batch, "
              f"mean of {keys} keys")
        names = ("iid", "iid + cached", "iid + extrapolated", "stratified")
        results["fmnist"] = fmnist(args.family, f_steps, batch, keys, names)
    folder = out_dir(args.out)
    name = "cached_coins_quick.json" if q else "cached_coins.json"
    with open(os.path.join(folder, name), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(folder, name[:-5] + ".md"), "w") as f:
        f.write(markdown(results))
    print(f"\nwrote {os.path.join(folder, name)} and the tables {name[:-5]}.md")
    return results


if __name__ == "__main__":
    main()
