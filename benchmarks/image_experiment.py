"""The paper's experiment on a trained family: measured gamma, then EM with every level,
a T-Stitch-style switch and ML-EM (iid and stratified coins; geometric, constant and
calibrated probabilities; independent and nested couplings) on the reverse SDE, and
Euler, Heun and ML-EM on the probability-flow ODE, all from the same initial noise and
Brownian path. Each run is scored by its coupled RMS error against a fine-grid reference
and, for the runs that matter for the headline, by the Fréchet distance (and KID) of a
larger batch to held-out data, against its wall time and FLOPs.

The pieces: `image_methods` (what is run), `image_runner` (compilation, timing, noise,
scores), `image_analysis` (cost to reach a quality, tables), `image_plots`. Shared by
`fmnist16.py` (Fashion-MNIST, CPU) and `celeba64.py` (CelebA, GPU).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax.calibrate import fit_gamma, learn_probabilities, level_costs, level_statistics
from mlem_jax.diffusion import reverse_diffusion, target_from_noise, uniform_grid
from mlem_jax.diffusion.classifier import train_classifier
from mlem_jax.diffusion.metrics import paired_frechet
from mlem_jax.diffusion.unet import count_params

from _common import device_description, out_dir
from image_analysis import format_tables, tables
from image_methods import learned_runs, ode_runs, sampler_factory, sde_runs
from image_plots import plot_curves, plot_samples
from image_runner import Runner


@dataclasses.dataclass
class Config:
    name: str = "experiment"  # file names: NAME.json, NAME.md, NAME_sde.png, ...
    samples: int = 1000  # samples of each distribution run (FID / KID)
    coupled_samples: int = 128  # samples for the coupled error (and the reference)
    chunk: int = 512  # samples per compiled call
    equal_batch: bool = True  # time every run at batch `chunk`, also those of fewer samples
    em_steps: tuple = (25, 50, 100, 200)  # EM with the largest network: the baseline
    targets: tuple = (25, 50, 100)  # the baseline qualities each method is asked to reach
    ref_factor: int = 4  # reference grid = ref_factor x the finest EM grid
    small_steps: tuple = (100, 200)  # EM with each smaller network alone
    stitch_levels: tuple = (-2,)  # the small network of the T-Stitch switch (index into the family)
    stitch_fractions: tuple = (0.3, 0.6)  # fraction of the steps (the noisy start) on it
    stitch_steps: tuple = (50, 100, 200)
    couplings: tuple = ("independent", "nested")
    geometric_ratio: float = 0.3  # p_k = ratio^(k-1)
    geometric_steps: tuple = (50, 100, 200)
    mlem_steps: tuple = (50, 100, 200)
    mlem_cost_ratios: tuple = (0.25, 0.5)  # expected cost per step / cost of one largest-network step
    # (the budget= of the probabilities is then ratio x steps x that cost, per trajectory)
    ode_steps: tuple = (25, 50, 100)  # Euler on the probability-flow ODE
    heun_steps: tuple = (13, 25, 50)  # Heun: two evaluations per step
    ode_ref_steps: int = 400  # Heun reference for the ODE
    ode_mlem_steps: tuple = (50, 100)
    ode_mlem_cost_ratios: tuple = (0.3, 0.6)
    stats_trajectories: int = 32
    learn_grids: tuple = ()  # grids (of mlem_steps) on which to also learn p_k(t) by SGD at each cost ratio
    learn_sgd_steps: int = 300  # SGD steps of each learned schedule
    learn_groups: tuple = (16, 2)  # (groups, paths per group) of each SGD step
    stats_steps: int = 100
    stats_bins: int = 10
    heldout: int = 5000  # held-out images for the distribution distances
    loss_images: int = 4000  # held-out images for the denoising losses
    classifier_steps: int = 1500
    grid_cost_steps: int = 100  # sample grids at the cost of EM with this many steps
    probability_costs: str = "seconds"  # the level costs the probabilities optimise: "seconds" or "flops"
    bootstrap: int = 100
    seed: int = 0
    t_min: float = 1e-3


QUICK = Config(samples=16, coupled_samples=8, chunk=16, em_steps=(4, 8), targets=(4, 8), small_steps=(8,),
               stitch_fractions=(0.5,), stitch_steps=(8,), couplings=("independent",), geometric_steps=(8,),
               mlem_steps=(8,), mlem_cost_ratios=(0.5,), ode_steps=(4, 8), heun_steps=(2, 4), ode_ref_steps=16,
               ode_mlem_steps=(16,), ode_mlem_cost_ratios=(0.5,), stats_trajectories=6,
               learn_groups=(2, 2), stats_steps=8, stats_bins=2,
               heldout=64, loss_images=64, classifier_steps=30, grid_cost_steps=8, bootstrap=10,
               probability_costs="flops")  # tiny levels are too cheap to time apart reliably


def parse_overrides(parser, items) -> dict:
    """FIELD=VALUE pairs (Python literals) checked against the fields of Config."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    out = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or field not in fields:
            parser.error(f"--set: expected FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            parser.error(f"--set {field}: {text!r} is not a Python literal (write 50, 0.5, 'flops' or (25, 50)).")
        default = getattr(Config(), field)
        if type(value) is not type(default) and not (isinstance(default, float) and isinstance(value, int)):
            parser.error(f"--set {field}: expected a {type(default).__name__} like {default!r}, got {value!r}.")
        out[field] = value
    return out



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
        target = target_from_noise(sde, param, tb, x0, eps)
        for k, f in enumerate(fns):
            per_image[k].append(np.asarray(jnp.mean((f(xt, t) - target) ** 2, axis=(1, 2, 3))))
    L = np.stack([np.concatenate(v) for v in per_image])  # (K, N)
    return L.mean(1), L.std(1, ddof=1) / np.sqrt(L.shape[1])


def _fit(costs, errors, offset, power, log, what):
    try:
        fit = fit_gamma(costs, errors, offset=offset, power=power)
    except ValueError as e:
        log(f"gamma from the {what}: not measurable ({e})")
        return {"gamma": None, "low": None, "high": None, "note": str(e)}
    log(f"gamma from the {what}: {fit.gamma:.2f}, 95% interval [{fit.low:.2f}, {fit.high:.2f}]")
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in fit._asdict().items()}




# ----------------------------------------------------------------------- experiment


def run_experiment(family, train_x, train_y, test_x, test_y, cfg: Config, out: str, dataset: str,
                   log: Callable = print) -> dict:
    t_start = time.perf_counter()
    out = out_dir(out)
    K = len(family.models)
    nfs = [m.nf for m in family.models]
    shape = tuple(family.image_shape)
    device = device_description()
    log(f"image experiment on {dataset} {shape}, family nf={nfs}; {cfg.samples} samples per distribution run, "
        f"{cfg.coupled_samples} coupled; {device}")
    drifts, drifts_ode = family.drifts(False), family.drifts(True)
    g = reverse_diffusion(family.sde)
    key = jax.random.key(cfg.seed)

    # 1. costs per level, batched as the samplers run them
    chunk = min(cfg.chunk, cfg.samples)
    yb = jax.vmap(lambda k: family.sde.prior_sample(k, shape))(jax.random.split(key, chunk))
    costs = level_costs([jax.vmap(f, in_axes=(None, 0, None)) for f in drifts], jnp.float32(0.5), yb)
    sec, flops = costs.seconds, costs.flops / chunk
    log(f"level costs (batch {chunk}): " + ", ".join(f"nf={n}: {s * 1e3:.2f} ms, {f / 1e6:.1f} MFLOP/image"
                                                   for n, s, f in zip(nfs, sec, flops)))
    log(f"top / base cost ratio: wall time {sec[-1] / sec[0]:.1f}x, FLOPs {flops[-1] / flops[0]:.1f}x")
    use_flops = cfg.probability_costs == "flops" or not np.all(np.diff(sec) > 0)
    prob_costs = flops * sec[-1] / flops[-1] if use_flops else sec
    if use_flops:
        log("probabilities use FLOP-proportional level costs")

    # 2. gamma from the held-out losses
    losses, loss_se = heldout_losses(family, test_x[: cfg.loss_images], jax.random.fold_in(key, 1), cfg.t_min)
    log("held-out denoising losses: " + ", ".join(f"{v:.5f}±{s:.5f}" for v, s in zip(losses, loss_se)))
    gamma_loss = _fit(flops, losses, offset=True, power=2.0, log=log, what="losses")

    # 3. level statistics along reference trajectories (also the calibration)
    sk = jax.random.split(jax.random.fold_in(key, 2), cfg.stats_trajectories)
    y0s = jax.vmap(lambda k: family.sde.prior_sample(k, shape))(sk)
    ts_stats = uniform_grid(cfg.stats_steps, cfg.t_min)
    stride = 2 if cfg.stats_steps >= 20 else 1
    t0 = time.perf_counter()
    stats = jax.block_until_ready(level_statistics(drifts, g, y0s, ts_stats, sk, num_bins=cfg.stats_bins,
                                                   stride=stride))
    stats_seconds = time.perf_counter() - t0
    stats_ode = level_statistics(drifts_ode, None, y0s, ts_stats, sk, num_bins=cfg.stats_bins, stride=stride)
    drift_err = stats.time_averaged("errors")
    log("RMS distance of each level's drift to the finest: " + ", ".join(f"{e:.4f}" for e in drift_err))
    gamma_drift = _fit(flops[:-1], drift_err[:-1], offset=False, power=1.0, log=log, what="drift distances")
    V = stats.time_averaged("variances")
    log("correction variances V_k (time-averaged): " + ", ".join(f"{v:.4g}" for v in V))

    # 3b. the paper's learned schedules (opt-in: SGD through every level is costly on a CPU)
    learned, learn_seconds = {}, []
    for n in cfg.learn_grids:
        for rho in cfg.mlem_cost_ratios:
            budget = rho * n * prob_costs[-1]
            try:
                res = learn_probabilities(drifts, g, y0s, uniform_grid(n, cfg.t_min), jax.random.fold_in(key, 7 + n),
                                          costs=prob_costs, budget=budget, num_bins=cfg.stats_bins,
                                          steps=cfg.learn_sgd_steps, num_groups=cfg.learn_groups[0],
                                          group_size=cfg.learn_groups[1], progress=False)
            except ValueError as e:
                log(f"  learned schedule, {n} steps, cost ratio {rho}: skipped ({e})")
                continue
            learned[(n, rho)] = res.probs
            learn_seconds.append(res.seconds)
            log(f"learned p_k(t) for {n} steps, cost ratio {rho}: {res.seconds:.0f} s "
                f"({cfg.learn_sgd_steps} SGD steps)")

    # 4. features for the distribution distances
    clf = train_classifier(train_x, train_y, test_x[:2000], test_y[:2000], jax.random.fold_in(key, 3),
                           steps=cfg.classifier_steps, progress=False)
    log(f"feature classifier: test accuracy {clf.test_accuracy:.3f} ({cfg.classifier_steps} steps)")
    held_feats = clf.features(np.asarray(test_x[-cfg.heldout:]))

    # 5. the runs
    cfg_runs = dataclasses.replace(cfg, stitch_levels=tuple(k % K for k in cfg.stitch_levels))
    runner = Runner(family, sampler_factory(family), cfg, flops, key, log)
    records, features, samples = [], {}, {}
    for part, runs in (("reverse SDE", sde_runs(cfg_runs, nfs, stats, prob_costs, log) + learned_runs(cfg, learned)),
                       ("probability-flow ODE", ode_runs(cfg_runs, nfs, stats_ode, prob_costs, log))):
        log(f"{part}: {len(runs)} runs")
        for run in runs:
            record, feats, grid = runner.score(run, clf.features, held_feats)
            records.append(record)
            samples[run.label] = grid
            if feats is not None:
                features[run.label] = feats
        with open(os.path.join(out, f"{cfg.name}_runs.json"), "w") as f:  # kept even if the analysis fails
            json.dump(records, f, indent=1)

    # 6. Fréchet distances with paired bootstrap errors, and their resolution
    values, boot = paired_frechet(features, held_feats, num_bootstrap=cfg.bootstrap, seed=cfg.seed)
    em_method = f"EM nf={nfs[-1]}"
    for r in records:
        if r["label"] in values:
            r["fid"], r["fid_se"] = values[r["label"]], float(np.std(boot[r["label"]], ddof=1))
    em_runs = sorted((r for r in records if r["method"] == em_method), key=lambda r: r["steps"])
    resolution = []
    for a, b in zip(em_runs, em_runs[1:]):
        d = boot[a["label"]] - boot[b["label"]]
        se = float(np.std(d, ddof=1))
        resolution.append(dict(a=a["label"], b=b["label"], difference=a["fid"] - b["fid"], se=se,
                               z=(a["fid"] - b["fid"]) / se if se > 0 else float("inf")))
    for r in resolution:
        log(f"FID {r['a']} - {r['b']}: {r['difference']:.4g} ± {r['se']:.2g} ({r['z']:.1f} s.e.)")

    result = dict(dataset=dataset, device=device, config=dataclasses.asdict(cfg), nfs=nfs,
                  params=[count_params(p) for p in family.params], level_seconds=sec.tolist(),
                  probability_costs=np.asarray(prob_costs).tolist(), level_flops=flops.tolist(),
                  top_over_base={"seconds": float(sec[-1] / sec[0]), "flops": float(flops[-1] / flops[0])},
                  losses=losses.tolist(), loss_se=loss_se.tolist(), gamma_loss=gamma_loss, gamma_drift=gamma_drift,
                  drift_errors=drift_err.tolist(), variances=V.tolist(),
                  variances_by_time=np.asarray(stats.variances).tolist(),
                  bin_edges=np.asarray(stats.bin_edges).tolist(),
                  classifier_accuracy=clf.test_accuracy, resolution=resolution, runs=records,
                  stats_seconds=stats_seconds, learn_seconds=learn_seconds,
                  tables=tables(records, em_method, f"Euler nf={nfs[-1]}",
                                {"sde": cfg.targets, "ode": cfg.ode_steps}),
                  total_seconds=time.perf_counter() - t_start)
    with open(os.path.join(out, f"{cfg.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = format_tables(result)
    with open(os.path.join(out, f"{cfg.name}.md"), "w") as f:
        f.write(md)
    log(md)
    plot_curves(result, out, cfg.name)
    plot_samples(result, samples, out, cfg.name, em_method, cfg.grid_cost_steps)
    log(f"wrote {out}/{cfg.name}.json, .md and the PNGs; {result['total_seconds']:.0f} s in all")
    return result
