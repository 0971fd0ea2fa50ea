"""Overheads of the scan solvers, measured in one run on this device.

(a) `euler_maruyama` against `diffrax.diffeqsolve(..., diffrax.Euler())` on the same small
    SDE (batch 256, 1000 steps, per-sample keys under vmap): the ratio diffrax / ours.
(b) `multilevel_euler_maruyama` with a cheap MLP (width 32) under an expensive one
    (width 2048) at p_top in {1, 0.3, 0.1, 0.03}, jit + vmap with the level key
    unbatched: measured wall time against the time predicted from the measured cost of
    each level and the number of evaluations the solver reports; and the same with
    stratified coins, whose time over iid's is the cost of planning the coins.

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from mlem_jax import euler_maruyama, multilevel_euler_maruyama

from _common import device_description, median_time, out_dir


def drift(t, y, args):
    return -y + jnp.sin(y) * jnp.cos(t)


def diffusion(t, y, args):
    return 0.5


def bench_diffrax(batch, steps, dim, repeats):
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    keys = jax.random.split(jax.random.key(0), batch)
    y0 = jnp.ones(dim)

    ours = jax.jit(jax.vmap(lambda k: euler_maruyama(drift, diffusion, y0, ts, k)))

    def theirs_one(k):
        bm = diffrax.UnsafeBrownianPath(shape=(dim,), key=k)
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(drift),
            diffrax.ControlTerm(lambda t, y, a: lx.DiagonalLinearOperator(jnp.full((dim,), 0.5)), bm),
        )
        sol = diffrax.diffeqsolve(
            terms, diffrax.Euler(), 0.0, 1.0, dt0=1.0 / steps, y0=y0,
            saveat=diffrax.SaveAt(t1=True), max_steps=steps + 1, adjoint=diffrax.ForwardMode(),
        )
        return sol.ys[0]

    theirs = jax.jit(jax.vmap(theirs_one))
    t_ours = median_time(ours, keys, repeats=repeats)
    t_theirs = median_time(theirs, keys, repeats=repeats)
    return t_ours, t_theirs


def mlp(key, dims):
    ks = jax.random.split(key, len(dims) - 1)
    return [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b)) for k, a, b in zip(ks, dims[:-1], dims[1:])]


def mlp_drift(params):
    def f(t, y, args):
        h = y
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jnp.tanh(h)
        return h - y

    return f


def bench_mlem(batch, steps, dim, width, p_tops, repeats):
    cheap = mlp_drift(mlp(jax.random.key(1), [dim, 32, dim]))
    dear = mlp_drift(mlp(jax.random.key(2), [dim, width, width, dim]))
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    keys = jax.random.split(jax.random.key(0), batch)

    # per-level costs, measured inside the same kind of loop: an EM loop with a zero drift
    # (loop, noise and update), and the extra time per step of an EM loop on each level
    y0_one = jnp.zeros(dim)

    def em_loop(f):
        return jax.jit(jax.vmap(lambda k: euler_maruyama(f, diffusion, y0_one, ts, k)))

    t_loop = median_time(em_loop(lambda t, y, a: jnp.zeros_like(y)), keys, repeats=repeats)
    c_cheap = (median_time(em_loop(cheap), keys, repeats=repeats) - t_loop) / steps
    c_dear = (median_time(em_loop(dear), keys, repeats=repeats) - t_loop) / steps
    t_base = t_loop + steps * c_cheap
    t_dear = c_dear
    rows = []
    for p in p_tops:
        probs = jnp.array([1.0, p])
        row = {"p_top": p}
        for coins in ("iid", "stratified"):
            def sample(k, lk):
                return multilevel_euler_maruyama((cheap, dear), probs, diffusion, jnp.zeros(dim), ts, k, level_key=lk,
                                                 coins=coins)

            run = jax.jit(jax.vmap(sample, in_axes=(0, None)))
            lk = jax.random.key(7)
            t = median_time(run, keys, lk, repeats=repeats)
            evals = np.asarray(run(keys, lk).evaluations[0])
            suffix = "" if coins == "iid" else "_stratified"
            row.update({f"evaluations_top{suffix}": int(evals[1]), f"measured_s{suffix}": t,
                        f"predicted_s{suffix}": t_base + evals[1] * t_dear})
        rows.append(row)
    return t_base, t_dear, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    print(f"device: {device_description()}")
    results = {"device": device_description(), "quick": args.quick}

    batch, steps, dim = (64, 200, 4) if args.quick else (256, 1000, 4)
    t_ours, t_theirs = bench_diffrax(batch, steps, dim, repeats)
    print(f"\n(a) EM, batch {batch}, {steps} steps, dim {dim}")
    print(f"  mlem_jax.euler_maruyama (lax.scan):     {1e3 * t_ours:9.2f} ms")
    print(f"  diffrax.diffeqsolve Euler (Unsafe BM):  {1e3 * t_theirs:9.2f} ms")
    verdict = "ours not slower" if t_ours <= t_theirs else "OURS SLOWER"
    print(f"  ratio diffrax / ours: {t_theirs / t_ours:.2f}  ({verdict})")
    results["em_vs_diffrax"] = {"batch": batch, "steps": steps, "ours_s": t_ours, "diffrax_s": t_theirs,
                                "ratio": t_theirs / t_ours}

    batch, steps, dim, width = (64, 50, 32, 512) if args.quick else (256, 100, 64, 2048)
    p_tops = [1.0, 0.3, 0.1, 0.03]
    t_base, t_dear, rows = bench_mlem(batch, steps, dim, width, p_tops, repeats)
    print(f"\n(b) ML-EM, batch {batch}, {steps} steps, MLP width 32 under width {width}")
    print(f"  EM loop on the cheap level ({steps} steps): {1e3 * t_base:.2f} ms;  "
          f"one batched evaluation of the expensive level inside the loop: {1e3 * t_dear:.3f} ms")
    print("  predicted = cheap-level loop + (evaluations of the expensive level) x (its cost per evaluation)")
    print(f"  {'p_top':>6} {'evals':>6} {'measured ms':>12} {'predicted ms':>13} {'meas/pred':>9} {'vs p=1':>7}"
          f" | stratified: {'evals':>6} {'measured ms':>12} {'meas/pred':>9} {'strat/iid time':>14}")
    print("  (iid and stratified at the same probabilities, not at equal error: the column shows the cost of "
          "planning the coins; compare meas/pred, since the evaluation counts differ)")
    t1 = rows[0]["measured_s"]
    for r in rows:
        print(f"  {r['p_top']:6.2f} {r['evaluations_top']:6d} {1e3 * r['measured_s']:12.2f} "
              f"{1e3 * r['predicted_s']:13.2f} {r['measured_s'] / r['predicted_s']:9.2f} {r['measured_s'] / t1:7.3f}"
              f" |             {r['evaluations_top_stratified']:6d} {1e3 * r['measured_s_stratified']:12.2f} "
              f"{r['measured_s_stratified'] / r['predicted_s_stratified']:9.2f} "
              f"{r['measured_s_stratified'] / r['measured_s']:14.3f}")
    results["mlem_skipping"] = {"batch": batch, "steps": steps, "width": width, "base_s": t_base,
                                "top_eval_s": t_dear, "rows": rows}

    # (c) the opt-in finiteness check: the same ML-EM sampler with and without check_finite
    params_cheap, params_dear = mlp(jax.random.key(10), (dim, 32, dim)), mlp(jax.random.key(11), (dim, width, dim))
    levels = (mlp_drift(params_cheap), mlp_drift(params_dear))
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    keys = jax.random.split(jax.random.key(12), batch)

    def sampler(check):
        return jax.jit(jax.vmap(lambda k: multilevel_euler_maruyama(
            levels, jnp.array([1.0, 0.1]), diffusion, jnp.zeros(dim), ts, k, level_key=jax.random.key(13),
            check_finite=check).y))

    t_off = median_time(sampler(False), keys, repeats=repeats)
    t_on = median_time(sampler(True), keys, repeats=repeats)
    print(f"\n(c) check_finite on the ML-EM sampler of (b) at p_top 0.1: {1e3 * t_off:.2f} ms without, "
          f"{1e3 * t_on:.2f} ms with: ratio {t_on / t_off:.3f}")
    results["check_finite"] = {"off_s": t_off, "on_s": t_on, "ratio": t_on / t_off}
    folder = out_dir(args.out)
    with open(os.path.join(folder, "overhead_quick.json" if args.quick else "overhead.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
