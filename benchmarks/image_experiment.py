"""The paper's experiment on a trained family: measured gamma, then EM, the smaller
networks alone, a T-Stitch-style switch, ML-EM (geometric, constant optimal and
calibrated probabilities; independent and nested coins) and, on the probability-flow
ODE, Euler, Heun and ML-EM, all from the same initial noise and Brownian path, each
scored by its coupled RMS error against a fine-grid reference and by distribution
distances to held-out data, against its wall time and FLOPs.

Shared by `image_speedup.py` (Fashion-MNIST, CPU) and `celeba64.py` (CelebA, GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from _common import device_description, out_dir
from mlem_jax import euler_maruyama, geometric_probabilities, multilevel_euler_maruyama
from mlem_jax.calibrate import calibrated_probabilities, fit_gamma, level_costs, level_statistics
from mlem_jax.diffusion import reverse_diffusion, target_from_noise, uniform_grid
from mlem_jax.diffusion.classifier import train_classifier
from mlem_jax.diffusion.metrics import kernel_distance, sliced_wasserstein
from mlem_jax.diffusion.unet import count_params


@dataclasses.dataclass
class Config:
    batch: int = 128  # samples per method (the same noise for every method)
    em_steps: tuple = (25, 50, 100, 200)  # EM with the largest network: the baseline
    ref_factor: int = 4  # reference grid = ref_factor x the finest EM grid
    small_steps: tuple = (50, 100, 200)  # EM with each smaller network alone
    stitch_levels: tuple = (1, 2)  # the small network of the T-Stitch switch (0 = cheapest)
    stitch_fractions: tuple = (0.3, 0.6)  # fraction of the steps (the noisy start) on it
    stitch_steps: tuple = (50, 100, 200)
    geometric_ratio: float = 0.3  # p_k = ratio^(k-1)
    geometric_steps: tuple = (50, 100, 200, 400)
    mlem_steps: tuple = (100, 200, 400)
    mlem_budgets: tuple = (0.25, 0.5)  # expected cost per step / cost of one largest-network step
    ode_steps: tuple = (25, 50, 100, 200)  # Euler on the probability-flow ODE
    heun_steps: tuple = (13, 25, 50, 100)  # Heun: two evaluations per step
    ode_ref_steps: int = 400  # Heun reference for the ODE
    ode_mlem_steps: tuple = (100, 200, 400)
    ode_mlem_budgets: tuple = (0.3,)
    stats_trajectories: int = 32
    stats_steps: int = 100
    stats_bins: int = 10
    heldout: int = 2000  # held-out images for the distribution distances
    loss_images: int = 4000  # held-out images for the denoising losses
    classifier_steps: int = 1500
    grid_cost_steps: int = 100  # sample grids at the cost of EM with this many steps
    probability_costs: str = "seconds"  # the level costs the probabilities optimise: "seconds" or "flops"
    seed: int = 0
    t_min: float = 1e-3


QUICK = Config(batch=8, em_steps=(4, 8), small_steps=(8,), stitch_levels=(1,), stitch_fractions=(0.5,),
               stitch_steps=(8,), geometric_steps=(8, 16), mlem_steps=(16,), mlem_budgets=(0.5,),
               ode_steps=(4, 8), heun_steps=(2, 4), ode_ref_steps=16, ode_mlem_steps=(16,),
               stats_trajectories=6, stats_steps=8, stats_bins=2, heldout=64, loss_images=64,
               classifier_steps=30, grid_cost_steps=8,
               probability_costs="flops")  # tiny levels are too cheap to time apart reliably


# ---------------------------------------------------------------------------- pieces


def heldout_losses(family, images, key, t_min: float = 1e-3, chunk: int = 500):
    """Per-level denoising losses on held-out images, every level on the same (t, noise)
    per image; returns the means and their standard errors (N images)."""
    sde, param = family.sde, family.parameterization
    fns = [jax.jit(lambda x, t, m=m, p=p: m.apply({"params": p}, x, t)) for m, p in zip(family.models, family.params)]
    per_image = [[] for _ in fns]
    for i in range(0, len(images), chunk):
        x0 = jnp.asarray(images[i : i + chunk])
        kt, kn = jax.random.split(jax.random.fold_in(key, i))
        t = jax.random.uniform(kt, (x0.shape[0],), minval=t_min, maxval=1.0)
        eps = jax.random.normal(kn, x0.shape)
        tb = t[:, None, None, None]
        xt = sde.alpha(tb) * x0 + sde.std(tb) * eps
        target = target_from_noise(sde, param, x0, eps, tb)
        for k, f in enumerate(fns):
            per_image[k].append(np.asarray(jnp.mean((f(xt, t) - target) ** 2, axis=(1, 2, 3))))
    L = np.stack([np.concatenate(v) for v in per_image])  # (K, N)
    return L.mean(1), L.std(1, ddof=1) / np.sqrt(L.shape[1])


def heun(drift, y0, ts):
    """Heun's second-order method (two evaluations per step) for dy = drift dt over ts."""

    def body(y, i):
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        d0 = drift(t0, y, None)
        d1 = drift(t1, y + h * d0, None)
        return y + 0.5 * h * (d0 + d1), None

    return jax.lax.scan(body, y0, jnp.arange(ts.shape[0] - 1))[0]


def cost_to_reach(costs, errors, target):
    """Least cost at which a method's cost-error front reaches `target`, interpolated
    between the two front points around it (log cost against log error, or against the
    error itself where errors can be zero or negative, as unbiased KID estimates can).
    Returns (cost, how) with how in {"interpolated", "at most" (already below at its
    cheapest run), "not reached"}."""
    order = np.argsort(costs)
    c, e = np.asarray(costs, float)[order], np.minimum.accumulate(np.asarray(errors, float)[order])
    below = np.nonzero(e <= target)[0]
    if below.size == 0:
        return None, "not reached"
    j = below[0]
    if j == 0:
        return float(c[0]), "at most"
    i = int(np.nonzero(e == e[j - 1])[0][0])  # the cheapest run on the front above the target
    f = np.log if (target > 0 and e[j] > 0) else (lambda v: v)
    x = (f(target) - f(e[i])) / (f(e[j]) - f(e[i]))
    return float(math.exp(math.log(c[i]) + x * (math.log(c[j]) - math.log(c[i])))), "interpolated"


# ----------------------------------------------------------------------- experiment


def run_experiment(family, train_x, train_y, test_x, test_y, cfg: Config, out: str, dataset: str,
                   log: Callable = print) -> dict:
    t_start = time.perf_counter()
    out = out_dir(out)
    K = len(family.models)
    nfs = [m.nf for m in family.models]
    shape = tuple(family.image_shape)
    B = cfg.batch
    device = device_description()
    log(f"image experiment on {dataset} {shape}, family nf={nfs}, batch {B}; {device}")
    drifts, drifts_ode = family.drifts(False), family.drifts(True)
    g = reverse_diffusion(family.sde)
    key = jax.random.key(cfg.seed)

    # 1. costs per level, batched as the samplers run them
    yb = jnp.asarray(test_x[:B])
    lc = level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in drifts], jnp.float32(0.5), yb)
    sec, flops = lc.seconds, lc.flops / B
    log("level costs (batch %d): %s" % (B, ", ".join(f"nf={n}: {s * 1e3:.2f} ms, {f / 1e6:.1f} MFLOP/image"
                                                    for n, s, f in zip(nfs, sec, flops))))
    # the probabilities are optimised for wall time, or for FLOPs (scaled to the largest
    # level's time) when asked or when the level times do not increase with the level
    use_flops = cfg.probability_costs == "flops" or not np.all(np.diff(sec) > 0)
    prob_costs = flops * sec[-1] / flops[-1] if use_flops else sec
    if use_flops:
        log("probabilities use FLOP-proportional level costs")

    # 2. gamma from the held-out losses
    losses, loss_se = heldout_losses(family, test_x[: cfg.loss_images], jax.random.fold_in(key, 1), cfg.t_min)
    log("held-out denoising losses: " + ", ".join(f"{l:.5f}±{s:.5f}" for l, s in zip(losses, loss_se)))
    gamma_loss = _fit(flops, losses, offset=True, power=2.0, log=log, what="losses")

    # 3. level statistics along reference trajectories (also the calibration)
    M = cfg.stats_trajectories
    sk = jax.random.split(jax.random.fold_in(key, 2), M)
    y0s = jax.vmap(lambda k: family.sde.prior_sample(k, shape))(sk)
    ts_stats = uniform_grid(cfg.stats_steps, cfg.t_min)
    stride = 2 if cfg.stats_steps >= 20 else 1
    stats = level_statistics(drifts, g, y0s, ts_stats, sk, num_bins=cfg.stats_bins, stride=stride)
    stats_ode = level_statistics(drifts_ode, None, y0s, ts_stats, sk, num_bins=cfg.stats_bins, stride=stride)
    drift_err = stats.time_averaged("errors")
    log("RMS distance of each level's drift to the finest: " + ", ".join(f"{e:.4f}" for e in drift_err))
    gamma_drift = _fit(flops[:-1], drift_err[:-1], offset=False, power=1.0, log=log, what="drift distances")
    V = stats.time_averaged("variances")
    log("correction variances V_k (time-averaged): " + ", ".join(f"{v:.4g}" for v in V))

    # 4. features for the distribution distances
    clf = train_classifier(train_x, train_y, test_x[:2000], test_y[:2000], jax.random.fold_in(key, 3),
                           steps=cfg.classifier_steps, progress=False)
    log(f"feature classifier: test accuracy {clf.test_accuracy:.3f} ({cfg.classifier_steps} steps)")
    held = np.asarray(test_x[-cfg.heldout:])
    held_feats = clf.features(held)
    sw_key = jax.random.fold_in(key, 4)

    # 5. the shared noise: prior draws and Brownian increments on the finest grid
    n_ref = cfg.ref_factor * max(cfg.em_steps)
    noise_key = jax.random.fold_in(key, 5)
    y0 = jax.vmap(lambda i: family.sde.prior_sample(jax.random.fold_in(noise_key, 2 * i), shape))(jnp.arange(B))
    h_ref = (1.0 - cfg.t_min) / n_ref
    dw_fine = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, 2 * i + 1), (n_ref, *shape)))(
        jnp.arange(B)) * math.sqrt(h_ref)
    level_key = jax.random.fold_in(key, 6)

    def increments(n):
        if n_ref % n:
            raise ValueError(f"steps: {n} does not divide the reference grid of {n_ref} steps.")
        return dw_fine.reshape(B, n, n_ref // n, *shape).sum(2)

    # 6. the methods; one jitted vmap per structure, recompiled only per grid size
    def em_fn(k, ode=False):
        fs = drifts_ode if ode else drifts
        return lambda y, dw, ts, extra, lk: euler_maruyama(fs[k], None if ode else g, y, ts, None if ode else dw)

    def stitch_fn(k):
        def drift(t, y, args):
            return jax.lax.cond(t > args, drifts[k], drifts[-1], t, y, None)
        return lambda y, dw, ts, t_switch, lk: euler_maruyama(drift, g, y, ts, dw, t_switch)

    def mlem_fn(coupling, ode=False):
        fs = drifts_ode if ode else drifts

        def fn(y, dw, ts, probs, lk):
            sol = multilevel_euler_maruyama(fs, probs, None if ode else g, y, ts, None if ode else dw,
                                            level_key=lk, coupling=coupling)
            return sol.y, sol.evaluations
        return fn

    def heun_fn(y, dw, ts, extra, lk):
        return heun(drifts_ode[-1], y, ts)

    jitted: dict = {}
    runs: list = []

    def run(label, family_label, structure, fn, n, extra=None, evals=None, ode=False, store=True):
        ts = uniform_grid(n, cfg.t_min)
        dw = jnp.zeros((B, 1)) if ode else increments(n)
        if structure not in jitted:
            jitted[structure] = jax.jit(jax.vmap(fn, in_axes=(0, 0, None, None, None)))
        t0 = time.perf_counter()
        lowered = jitted[structure].lower(y0, dw, ts, extra, level_key).compile()
        t1 = time.perf_counter()
        res = jax.block_until_ready(lowered(y0, dw, ts, extra, level_key))
        seconds = time.perf_counter() - t1
        if isinstance(res, tuple):
            y, ev = res
            ev = np.asarray(ev[0])
        else:
            y, ev = res, np.asarray(evals)
        y = np.asarray(y)
        r = dict(label=label, method=family_label, steps=n, ode=ode, seconds=seconds, compile_seconds=t1 - t0,
                 evaluations=[int(e) for e in ev], flops=float(np.dot(ev, flops)))
        if store:
            runs.append(r)
        return r, y

    ref_info, y_ref = run(f"reference EM nf={nfs[-1]}, {n_ref} steps", "reference", ("em", K - 1), em_fn(K - 1),
                          n_ref, evals=_ev(K, K - 1, n_ref), store=False)
    log(f"reference: EM nf={nfs[-1]} on {n_ref} steps, {ref_info['seconds']:.1f} s")
    ode_ref_info, y_ref_ode = run(f"reference Heun nf={nfs[-1]}, {cfg.ode_ref_steps} steps", "reference", ("heun",),
                                  heun_fn, cfg.ode_ref_steps, evals=_ev(K, K - 1, 2 * cfg.ode_ref_steps), ode=True,
                                  store=False)
    log(f"ODE reference: Heun nf={nfs[-1]} on {cfg.ode_ref_steps} steps, {ode_ref_info['seconds']:.1f} s")
    samples: dict = {}

    def score(r, y):
        ref = y_ref_ode if r["ode"] else y_ref
        msd = np.mean((y - ref) ** 2, axis=tuple(range(1, y.ndim)))
        r["rms"] = float(np.sqrt(msd.mean()))
        r["rms_se"] = float(msd.std(ddof=1) / np.sqrt(len(msd)) / (2 * r["rms"])) if r["rms"] > 0 else 0.0
        yc = np.clip(y, -1, 1)
        kid = kernel_distance(clf.features(yc), held_feats)
        r["kid"], r["kid_se"] = kid.value, kid.stderr
        r["sw"] = sliced_wasserstein(yc, held, sw_key)
        samples[r["label"]] = yc[:16]
        log(f"  {r['label']:<44s} {r['seconds']:7.2f} s  {r['flops'] / 1e9:7.3f} GFLOP  rms {r['rms']:.4f}  "
            f"KID {r['kid']:.4f}±{r['kid_se']:.4f}  SW {r['sw']:.4f}  evals {r['evaluations']}")

    def go(*a, **kw):
        score(*run(*a, **kw))

    # the reference itself and the held-out data against the held-out data (floors)
    floors = {"kid_reference": kernel_distance(clf.features(np.clip(y_ref, -1, 1)), held_feats)._asdict(),
              "sw_reference": sliced_wasserstein(np.clip(y_ref, -1, 1), held, sw_key),
              "kid_data": kernel_distance(clf.features(test_x[:B]), held_feats)._asdict(),
              "sw_data": sliced_wasserstein(np.asarray(test_x[:B]), held, sw_key)}
    log(f"floors: reference KID {floors['kid_reference']['value']:.4f}, SW {floors['sw_reference']:.4f}; "
        f"{B} held-out images KID {floors['kid_data']['value']:.4f}, SW {floors['sw_data']:.4f}")

    log("reverse SDE:")
    em_label = f"EM nf={nfs[-1]}"
    for n in cfg.em_steps:
        go(f"{em_label}, {n} steps", em_label, ("em", K - 1), em_fn(K - 1), n, evals=_ev(K, K - 1, n))
    for k in range(K - 1):
        for n in cfg.small_steps:
            go(f"EM nf={nfs[k]}, {n} steps", f"EM nf={nfs[k]}", ("em", k), em_fn(k), n, evals=_ev(K, k, n))
    for k in cfg.stitch_levels:
        lab = f"T-Stitch nf={nfs[k]}->{nfs[-1]}"
        for frac in cfg.stitch_fractions:
            for n in cfg.stitch_steps:
                ts = np.asarray(uniform_grid(n, cfg.t_min))
                m = int(round(frac * n))
                t_switch = jnp.float32(0.5 * (ts[m - 1] + ts[m])) if m > 0 else jnp.float32(2.0)
                ev = np.zeros(K, int)
                ev[k], ev[-1] = m, n - m
                go(f"{lab} ({frac:.0%} small), {n} steps", lab, ("stitch", k), stitch_fn(k), n, extra=t_switch, evals=ev)
    schedules = {}

    def optimal_sweep(lab, level_stats, steps, budgets, coupling, time_dependent, ode=False):
        """ML-EM with the probabilities `calibrated_probabilities` chooses for each grid and
        budget (a budget per step, relative to one step of the largest network)."""
        for n in steps:
            for rho in budgets:
                try:
                    p = calibrated_probabilities(level_stats, prob_costs, (1.0 - cfg.t_min) / n,
                                                 budget=rho * n * prob_costs[-1], num_steps=n,
                                                 time_dependent=time_dependent, coupling=coupling)
                except ValueError as e:
                    log(f"  {lab}, {n} steps, budget {rho}: skipped ({e})")
                    continue
                schedules[f"{lab}, {n} steps, budget {rho}"] = np.asarray(p.values if time_dependent else p).tolist()
                go(f"{lab}, {n} steps, budget {rho}", lab, ("mlem", "pw" if time_dependent else "const", coupling, ode),
                   mlem_fn(coupling, ode), n, extra=p, ode=ode)

    for coupling in ("independent", "nested"):
        lab = f"ML-EM geometric r={cfg.geometric_ratio} ({coupling})"
        p = jnp.asarray(geometric_probabilities(K, cfg.geometric_ratio), jnp.float32)
        for n in cfg.geometric_steps:
            go(f"{lab}, {n} steps", lab, ("mlem", "const", coupling, False), mlem_fn(coupling), n, extra=p)
        for kind, td in (("constant optimal", False), ("calibrated", True)):
            optimal_sweep(f"ML-EM {kind} ({coupling})", stats, cfg.mlem_steps, cfg.mlem_budgets, coupling, td)

    log("probability-flow ODE:")
    for n in cfg.ode_steps:
        go(f"Euler nf={nfs[-1]}, {n} steps", f"Euler nf={nfs[-1]}", ("em-ode", K - 1), em_fn(K - 1, True), n,
           evals=_ev(K, K - 1, n), ode=True)
    for n in cfg.heun_steps:
        go(f"Heun nf={nfs[-1]}, {n} steps", f"Heun nf={nfs[-1]}", ("heun",), heun_fn, n,
           evals=_ev(K, K - 1, 2 * n), ode=True)
    for kind, td in (("constant optimal", False), ("calibrated", True)):
        optimal_sweep(f"ML-EM ODE {kind}", stats_ode, cfg.ode_mlem_steps, cfg.ode_mlem_budgets, "independent", td,
                      ode=True)

    with open(os.path.join(out, "image_speedup_runs.json"), "w") as f:  # kept even if the analysis fails
        json.dump(runs, f, indent=1)
    tables = _tables(runs, cfg, em_label, nfs)
    result = dict(dataset=dataset, device=device, config=dataclasses.asdict(cfg), nfs=nfs,
                  params=[count_params(p) for p in family.params],
                  level_seconds=sec.tolist(), probability_costs=np.asarray(prob_costs).tolist(), level_flops=flops.tolist(), losses=losses.tolist(),
                  loss_se=loss_se.tolist(), gamma_loss=gamma_loss, gamma_drift=gamma_drift,
                  drift_errors=drift_err.tolist(), variances=V.tolist(),
                  variances_by_time=np.asarray(stats.variances).tolist(), bin_edges=np.asarray(stats.bin_edges).tolist(),
                  classifier_accuracy=clf.test_accuracy, floors=floors, reference=ref_info, ode_reference=ode_ref_info,
                  schedules=schedules, runs=runs, tables=tables, total_seconds=time.perf_counter() - t_start)
    with open(os.path.join(out, "image_speedup.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = format_tables(result)
    with open(os.path.join(out, "image_speedup.md"), "w") as f:
        f.write(md)
    log(md)
    _plots(result, samples, out, em_label, cfg)
    log(f"wrote {out}/image_speedup.json, .md and the PNGs; {result['total_seconds']:.0f} s in all")
    return result


def _ev(K, k, n):
    e = np.zeros(K, int)
    e[k] = n
    return e


def _fit(costs, errors, offset, power, log, what):
    try:
        fit = fit_gamma(costs, errors, offset=offset, power=power)
    except ValueError as e:
        log(f"gamma from the {what}: not measurable ({e})")
        return {"gamma": None, "low": None, "high": None, "note": str(e)}
    log(f"gamma from the {what}: {fit.gamma:.2f}, 95% interval [{fit.low:.2f}, {fit.high:.2f}]")
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fit._asdict().items()}


def _tables(runs, cfg, em_label, nfs):
    """For each method: the cost to reach the errors of EM (largest network) at the
    tabled step counts, and the speedup over that EM run."""
    out = {}
    for ode, base_label, steps in ((False, em_label, cfg.em_steps), (True, f"Euler nf={nfs[-1]}", cfg.ode_steps)):
        base = {r["steps"]: r for r in runs if r["method"] == base_label}
        targets = [n for n in (50, 100, 200) if n in base] or list(steps)[-2:]
        methods = [m for m in dict.fromkeys(r["method"] for r in runs if r["ode"] == ode)]
        rows = []
        for m in methods:
            rs = [r for r in runs if r["method"] == m]
            row = {"method": m}
            for metric in ("rms", "kid", "sw"):
                for n in targets:
                    tgt = base[n][metric]
                    for cost in ("seconds", "flops"):
                        c, how = cost_to_reach([r[cost] for r in rs], [r[metric] for r in rs], tgt)
                        row[f"{metric}@{n}/{cost}"] = {"cost": c, "how": how,
                                                       "speedup": (base[n][cost] / c) if c else None}
            rows.append(row)
        out["ode" if ode else "sde"] = {"targets": targets, "rows": rows,
                                        "baseline": {n: {"seconds": base[n]["seconds"], "flops": base[n]["flops"],
                                                         "rms": base[n]["rms"], "kid": base[n]["kid"], "sw": base[n]["sw"],
                                                         "kid_se": base[n]["kid_se"]}
                                                     for n in targets}}
    return out


def format_tables(result) -> str:
    lines = [f"# Image experiment: {result['dataset']}, family nf={result['nfs']}", "",
             f"Device: {result['device']}. Batch {result['config']['batch']} samples per method, one shared "
             "noise. Speedup = cost of EM with the largest network at N steps / cost of the method "
             "to reach the same error (on the method's cost-error front, interpolated log-log; "
             "'≥' where its cheapest run already beats it, '-' where none of its runs reaches it; "
             "'n/r' (not resolved) where the baseline's KID is within 2 standard errors of 0).", ""]
    for part, title in (("sde", "Reverse SDE"), ("ode", "Probability-flow ODE")):
        t = result["tables"][part]
        for metric, name in (("rms", "coupled RMS error"), ("kid", "KID"), ("sw", "sliced Wasserstein")):
            for cost, unit in (("seconds", "wall time"), ("flops", "FLOPs")):
                if metric != "rms" and cost == "flops":
                    continue  # keep the report short: distribution metrics against wall time only
                lines += [f"## {title}: {name}, speedup in {unit}", "",
                          "| method | " + " | ".join(f"{'Euler' if part == 'ode' else 'EM'}@{n} ({t['baseline'][n][metric]:.4g})"
                                                  for n in t["targets"]) + " |",
                          "|---|" + "---|" * len(t["targets"])]
                for row in t["rows"]:
                    cells = []
                    for n in t["targets"]:
                        v = row[f"{metric}@{n}/{cost}"]
                        if metric == "kid" and t["baseline"][n]["kid"] < 2 * t["baseline"][n]["kid_se"]:
                            cells.append("n/r")  # the target is within 2 standard errors of 0
                        elif v["speedup"] is None:
                            cells.append("-")
                        else:
                            cells.append(("≥" if v["how"] == "at most" else "") + f"{v['speedup']:.2f}x")
                    lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
                lines.append("")
    return "\n".join(lines)


def _plots(result, samples, out, em_label, cfg):
    plot_curves(result, out)
    _plot_samples(result, samples, out, em_label, cfg)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the [plot] extra is not installed: tables only
        return None
    return plt


def plot_curves(result, out):
    """Error against cost for every method: each method's cost-error front as a line
    (the cheapest run reaching each error), all of its runs as dots."""
    plt = _pyplot()
    if plt is None:
        return
    runs = result["runs"]
    for ode, name in ((False, "sde"), (True, "ode")):
        rs = [r for r in runs if r["ode"] == ode]
        methods = list(dict.fromkeys(r["method"] for r in rs))
        colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 2)))
        base = [r for r in rs if r["method"] == methods[0]]
        fig, axes = plt.subplots(3, 2, figsize=(13, 14))
        for i, (metric, mname) in enumerate((("rms", "coupled RMS error"), ("kid", "KID"), ("sw", "sliced Wasserstein"))):
            for j, (cost, cname) in enumerate((("seconds", "wall time (s)"), ("flops", "GFLOP per sample"))):
                ax = axes[i, j]
                for m, color in zip(methods, colors):
                    pts = sorted((r[cost] / (1e9 if cost == "flops" else 1), r[metric]) for r in rs if r["method"] == m)
                    c, e = np.array(pts).T
                    front = np.minimum.accumulate(e)
                    keep = np.r_[True, front[1:] < front[:-1]]
                    style = dict(lw=2.5, color="k", zorder=5) if m == methods[0] else dict(lw=1.2, color=color)
                    ax.plot(c[keep], front[keep], "-", label=m, **style)
                    ax.plot(c, e, "o", ms=3, color=style["color"], alpha=0.6)
                    if metric == "kid" and m == methods[0]:
                        se = np.array(sorted((r[cost] / (1e9 if cost == "flops" else 1), r["kid_se"]) for r in base))
                        ax.fill_between(c, e - 2 * se[:, 1], e + 2 * se[:, 1], color="k", alpha=0.1)
                ax.set_xscale("log")
                top = 4 * max(r[metric] for r in base)
                if metric == "kid":
                    ax.set_ylim(-0.6, max(top, 1.0))
                else:
                    ax.set_yscale("log")
                    ax.set_ylim(0.5 * min(r[metric] for r in rs), top)
                ax.set_xlabel(cname)
                ax.set_ylabel(mname)
                ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        fig.suptitle(f"{result['dataset']}: error against cost ({'probability-flow ODE' if ode else 'reverse SDE'}); "
                     f"lines: each method's front, dots: its runs; shaded: baseline KID ± 2 s.e.\n{result['device']}",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"image_speedup_{name}.png"), dpi=90)
        plt.close(fig)


def _plot_samples(result, samples, out, em_label, cfg):
    plt = _pyplot()
    if plt is None:
        return
    runs = result["runs"]
    # sample grids at about the cost of EM with grid_cost_steps steps
    target = next((r["seconds"] for r in runs if r["method"] == em_label and r["steps"] == cfg.grid_cost_steps), None)
    if target is None:
        return
    chosen = []
    for m in dict.fromkeys(r["method"] for r in runs if not r["ode"]):
        rs = [r for r in runs if r["method"] == m]
        chosen.append(min(rs, key=lambda r: abs(math.log(r["seconds"] / target))))
    cols = 4
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    from mlem_jax.diffusion.images import to_grid

    for ax, r in zip(np.ravel(axes), chosen):
        grid = to_grid(samples[r["label"]], ncols=4)
        ax.imshow(np.squeeze(grid), cmap="gray" if grid.shape[-1] == 1 else None)
        ax.set_title(f"{r['label']}\n{r['seconds']:.2f} s, rms {r['rms']:.3f}", fontsize=7)
    fig.suptitle(f"samples at about the wall time of {em_label} with {cfg.grid_cost_steps} steps (same noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "image_speedup_samples.png"), dpi=90)
    plt.close(fig)
