"""The envelope experiment: the multilevel estimator against the best single-network sampler at equal
FID, over every network of the five-level Fashion-MNIST 16x16 family (nf 4..64) and every sampler of
the library, in FLOPs and CPU time measured in one run.

Phases (each finished run is appended to OUT/runs.jsonl at once; a rerun skips what is there):
1. grids: every sampler on every grid (uniform, quadratic, log-SNR, Karras) on one level at one
   evaluation count, pilot size; each sampler keeps its best grid.
2. pilots: every sampler (EM and SDE-DPM-Solver++(2M) on the SDE; DDIM, DPM-Solver++ 2M/3M and EDM
   Heun on the probability-flow ODE) on every level at 5, 10, 20, 50, 100 model evaluations, on the
   first `pilot` samples. A ladder stops once a step up no longer lowers the FID by 2 standard errors
   (more evaluations of the same network then only cost more).
3. full: the pilots not dominated (no cheaper pilot in both FLOPs and modelled time with an FID lower
   by more than 2 combined standard errors) again on all `samples`. Their front is the envelope.
4. levels: for the best ODE and the best SDE sampler of the envelope, calibration chooses the level
   set: the subset (with the top level, 2 or 3 levels, or all) of least predicted error at a budget of
   the top level's cost / 2.
5. multilevel pilots: those two samplers with `Multilevel` over all levels and over the chosen set, at
   two evaluation counts, with iid coins at budgets top / 2 and top / 4, stratified coins and the
   cached control variate at top / 2; probabilities from `calibration_report` (statistics at the
   sampler's model calls, propagated weighting, FLOP costs); one coin plan per chunk of 125 samples.
   (`ml_pilots=False` in the config runs them straight on all samples instead.)
6. multilevel full: the multilevel pilots on their own front (`ml_slack` = 0: no slack, which fitted
   the session; the single-network phase keeps 2 s.e.) on all samples. Their front is compared with
   the envelope at the envelope's FID at 10, 20 and 50 evaluations of the top network.

All runs share the prior draws and noise (sample i: fold_in(key(0), i)); the pilots are the first
samples of the full runs. FID: the Fréchet distance on the features of a classifier trained here (not
comparable with published FIDs), with bootstrap standard errors. Costs: GFLOP per sample
(evaluations x XLA FLOPs of the level), CPU seconds per 1000 samples (the run's own measured time,
compilation apart) and the modelled time (evaluations x each level's time per sample at a batch of
125, timed once in this run).

    python benchmarks/envelope_fmnist16.py --out docs/figures/envelope_fmnist16
    python benchmarks/envelope_fmnist16.py --quick        # CI: a tiny untrained family
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN  # noqa: E402
from mlem_jax.diffusion.family import combine_families, demo_family_path, load_family  # noqa: E402
from mlem_jax.diffusion.metrics import frechet_distance  # noqa: E402
from mlem_jax.diffusion.samplers import CALLS_PER_STEP  # noqa: E402
from mlem_jax.diffusion.sampling import sample, solver_function, solver_levels  # noqa: E402
from mlem_jax.diffusion.sde import karras_grid, logsnr_grid, quadratic_grid, uniform_grid  # noqa: E402
from mlem_jax.diffusion.unet import family_summary  # noqa: E402

from _common import device_description, fashion_mnist_and_classifier, tiny_family  # noqa: E402
from image_analysis import cost_to_reach  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SDE_SAMPLERS = ("em", "sde-dpm++2m")
ODE_SAMPLERS = ("ddim", "dpm++2m", "dpm++3m", "edm-heun")
GRIDS = ("uniform", "quadratic", "logsnr", "karras")
FULL = dict(samples=1000, pilot=500, chunk=125, evals=(5, 10, 20, 50, 100), grid_level=2, grid_evals=20,
            ml_evals={"ode": (10, 20), "sde": (20, 50)}, speedups=(2.0, 4.0), bootstrap=50, pilots=16, bins=5,
            classifier_steps=1500, targets=(10, 20, 50), slack=2.0, ml_slack=0.0)
QUICK = dict(samples=16, pilot=8, chunk=4, evals=(2, 4), grid_level=0, grid_evals=2,
             ml_evals={"ode": (4,), "sde": (4,)}, speedups=(2.0,), bootstrap=5, pilots=16, bins=2,
             classifier_steps=20, targets=(2, 4), slack=2.0, samplers=("em", "ddim"), grids=("uniform", "logsnr"),
             variants=("iid", "cached"))


def grid(sde, name: str, steps: int):
    return {"uniform": lambda: uniform_grid(steps), "quadratic": lambda: quadratic_grid(steps),
            "logsnr": lambda: logsnr_grid(sde, steps), "karras": lambda: karras_grid(sde, steps)}[name]()


def steps_for(sampler: str, evals: int) -> int:
    return max(1, round(evals / CALLS_PER_STEP[sampler]))


def key_of(r) -> str:
    levels = "+".join(str(k) for k in r["levels"])
    extra = "" if r["probs_kind"] == "single" else f" {r['coins']}/{r['control']} top/{r['speedup']}"
    return f"{r['phase']} {r['sampler']} {r['grid']} levels={levels} steps={r['steps']} n={r['samples']}{extra}"


class Experiment:
    """The family, the classifier and reference features, level costs, and the run log."""

    def __init__(self, family, cfg, features, reference, out):
        self.family, self.cfg, self.features, self.reference = family, cfg, features, reference
        self.summary = family_summary(family.models, family.params, family.image_shape)
        self.gflop = np.array([s["gflop"] for s in self.summary])
        self.seconds = self.level_seconds(cfg["chunk"])
        self.path = os.path.join(out, "runs.jsonl")
        self.done = {}
        if os.path.exists(self.path):
            for line in open(self.path, encoding="utf-8"):
                r = json.loads(line)
                self.done[r["key"]] = r

    def level_seconds(self, batch: int) -> np.ndarray:
        """Seconds per sample of one evaluation of each level's denoiser at `batch`, median of 3."""
        x = jnp.zeros((batch, *self.family.image_shape))
        out = []
        for d in solver_levels(self.family, range(len(self.family.models)), "ddim"):
            f = jax.jit(jax.vmap(d, in_axes=(None, 0, None)))
            jax.block_until_ready(f(0.5, x, None))
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(f(0.5, x, None))
                times.append(time.perf_counter() - t0)
            out.append(float(np.median(times)) / batch)
        return np.array(out)

    def run(self, r):
        r = dict(r)
        r["key"] = key_of(r)
        if r["key"] in self.done:
            return self.done[r["key"]]
        fam, cfg = self.family, self.cfg
        ts = grid(fam.sde, r["grid"], r["steps"])
        probs = None
        if r["probs_kind"] != "single":
            probs, report = self.calibrated(r, ts)
            r.update(probs=np.asarray(getattr(probs, "values", probs)).round(4).tolist(),
                     predicted_error=float(report.predicted_error),
                     correction_variances=np.asarray(report.stats.variances).tolist(),
                     bin_edges=np.asarray(report.stats.bin_edges).tolist())
        n = r["samples"]
        plans = n // cfg["chunk"] if probs is not None else 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a range warning is recorded as outside_range
            try:
                res = sample(fam, r["levels"], ts, 0, n, probs, solver=r["sampler"], coins=r["coins"],
                             control=r["control"], coin_plans=plans)
            except FloatingPointError as e:  # a blown-up run is a result, not a crash
                r.update(fid=float("inf"), fid_se=0.0, failed=str(e).splitlines()[0], evaluations=[],
                         gflop=float("nan"), cpu_s_per_1000=float("nan"), modelled_s_per_1000=float("nan"))
                return self.save(r)
        evals = np.asarray(res.evaluations, float)
        fid = frechet_distance(self.features(res.images), self.reference, num_bootstrap=cfg["bootstrap"])
        idx = list(r["levels"])
        r.update(fid=fid.value, fid_se=fid.stderr, evaluations=evals.tolist(), coin_plans=plans,
                 gflop=float(evals @ self.gflop[idx]), cpu_s_per_1000=1000 * res.run_seconds / n,
                 modelled_s_per_1000=1000 * float(evals @ self.seconds[idx]),
                 base_flop_share=float(evals[0] * self.gflop[idx[0]] / (evals @ self.gflop[idx])),
                 outside_range=res.outside_range)
        return self.save(r)

    def save(self, r):
        self.done[r["key"]] = r
        with open(self.path, "a", encoding="utf-8") as f:  # at once: a stopped run loses at most this one
            f.write(json.dumps(r) + "\n")
        from tqdm.auto import tqdm

        tqdm.write(f"{r['key']}: FID {r['fid']:.2f} ± {r['fid_se']:.2f}, {r['gflop']:.4f} GFLOP/sample, "
                   f"{r['cpu_s_per_1000']:.1f} CPU s / 1000")
        return r

    def calibrated(self, r, ts):
        """Time-dependent probabilities for `r`'s levels inside its sampler at the top level's cost / speedup."""
        from mlem_jax.calibrate import LevelCosts, calibration_report

        fam, cfg = self.family, self.cfg
        levels = solver_levels(fam, r["levels"], r["sampler"])
        keys = jax.random.split(jax.random.key(11), cfg["pilots"])
        y0 = jax.vmap(lambda k: fam.sde.prior_sample(k, tuple(fam.image_shape)))(keys)
        solve = solver_function(fam.sde, r["sampler"], ts)
        costs = LevelCosts(np.ones(len(levels)), self.gflop[list(r["levels"])])
        em = r["sampler"] == "em"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = calibration_report(
                levels, None, y0, ts, keys, costs=costs, cost_unit="flops", num_bins=cfg["bins"],
                speedup=r["speedup"], coins=r["coins"], control=r["control"],
                solver=lambda m, y, k: solve(m, y, k), solver_name=r["sampler"],
                weighting="linear" if em else "propagated",
                control_scale=None if em else fam.sde.noise_to_signal)
        return report.probs, report


def single(sampler, grid_name, level, evals, n, phase):
    return dict(phase=phase, sampler=sampler, grid=grid_name, levels=[level], steps=steps_for(sampler, evals),
                samples=n, probs_kind="single", coins="iid", control=None, speedup=None)


def dominated(r, others, slack):
    """Some other run is no costlier in FLOPs and modelled time and better by more than `slack` s.e."""
    for q in others:
        if q is r or not np.isfinite(q["fid"]):
            continue
        if (q["gflop"] <= r["gflop"] and q["modelled_s_per_1000"] <= r["modelled_s_per_1000"]
                and q["fid"] + slack * np.hypot(q["fid_se"], r["fid_se"]) < r["fid"]):
            return True
    return not np.isfinite(r["fid"])


def best_sampler(full, samplers, budget):
    """The sampler of `samplers` with the lowest FID among the full runs costing at most `budget` GFLOP."""
    rs = [r for r in full if r["sampler"] in samplers and r["gflop"] <= budget and np.isfinite(r["fid"])]
    if not rs:
        rs = [r for r in full if r["sampler"] in samplers and np.isfinite(r["fid"])]
    return min(rs, key=lambda r: r["fid"])["sampler"] if rs else samplers[-1]


def choose_levels(exp, sampler, grid_name, steps):
    """Calibration's level set: the subset with the top level (2, 3 or all levels) of least predicted error."""
    K = len(exp.family.models)
    key = f"levels {sampler} {grid_name} steps={steps}"
    if key in exp.done:
        return exp.done[key]["chosen"]
    subsets = [list(c) + [K - 1] for size in (1, 2) for c in itertools.combinations(range(K - 1), size)]
    subsets.append(list(range(K)))
    predicted = {}
    for s in subsets:
        r = dict(phase="calibration", sampler=sampler, grid=grid_name, levels=s, steps=steps, samples=0,
                 probs_kind="calibrated", coins="iid", control=None, speedup=2.0)
        try:
            _, report = exp.calibrated(r, grid(exp.family.sde, grid_name, steps))
            predicted["+".join(map(str, s))] = float(report.predicted_error)
        except Exception as e:  # noqa: BLE001 (a subset calibration can refuse: recorded, not fatal)
            predicted["+".join(map(str, s))] = f"refused: {str(e).splitlines()[0]}"
    numeric = {k: v for k, v in predicted.items() if isinstance(v, float) and np.isfinite(v)}
    chosen = [int(k) for k in min(numeric, key=numeric.get).split("+")] if numeric else list(range(K))
    rec = dict(key=key, phase="levels", sampler=sampler, steps=steps, predicted=predicted, chosen=chosen)
    exp.done[key] = rec
    with open(exp.path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    print(f"{key}: chose levels {chosen} (predicted coupled RMS per subset: {predicted})", flush=True)
    return chosen


def experiment(exp, cfg, progress=True):
    from tqdm.auto import tqdm

    fam = exp.family
    K = len(fam.models)
    samplers = cfg.get("samplers", SDE_SAMPLERS + ODE_SAMPLERS)
    # 1. grids
    best_grid = {}
    for s in tqdm(samplers, desc="grids", disable=not progress):
        rs = [exp.run(single(s, g, cfg["grid_level"], cfg["grid_evals"], cfg["pilot"], "grid"))
              for g in cfg.get("grids", GRIDS)]
        best_grid[s] = min(rs, key=lambda r: r["fid"])["grid"]
    print("best grids: " + ", ".join(f"{s} {g}" for s, g in best_grid.items()), flush=True)
    # 2. pilots: ladders over evaluations, stopped when a step up no longer helps
    pilots = []
    for s, k in tqdm(list(itertools.product(samplers, range(K))), desc="pilot ladders", disable=not progress):
        prev = None
        for e in cfg["evals"]:
            r = exp.run(single(s, best_grid[s], k, e, cfg["pilot"], "pilot"))
            pilots.append(r)
            if prev is not None and not (r["fid"] < prev["fid"] - cfg["slack"] * np.hypot(r["fid_se"],
                                                                                          prev["fid_se"])):
                break
            prev = r
    # 3. full runs of the non-dominated pilots
    keep = [r for r in pilots if not dominated(r, pilots, cfg["slack"])]
    full = [exp.run(dict({k: r[k] for k in ("sampler", "grid", "levels", "steps", "probs_kind", "coins",
                                            "control", "speedup")}, phase="full", samples=cfg["samples"]))
            for r in tqdm(keep, desc="full runs", disable=not progress)]
    # 4-6. multilevel: the best ODE and SDE samplers of the envelope
    budget = cfg["targets"][1] * exp.gflop[-1]
    ml_pilots = []
    for kind, group in (("ode", ODE_SAMPLERS), ("sde", SDE_SAMPLERS)):
        group = tuple(s for s in group if s in samplers)
        s = best_sampler(full, group, budget)
        g = best_grid[s]
        evals = cfg["ml_evals"][kind]
        chosen = choose_levels(exp, s, g, steps_for(s, evals[-1]))
        sets = [list(range(K))] + ([chosen] if chosen != list(range(K)) else [])
        variants = [("iid", None, sp) for sp in cfg["speedups"]] + [("stratified", None, cfg["speedups"][0]),
                                                                    ("iid", "cached", cfg["speedups"][0])]
        if "variants" in cfg:  # --quick: fewer
            variants = [v for v in variants if (v[1] or v[0]) in cfg["variants"]]
        for levels, e, (coins, control, sp) in tqdm(list(itertools.product(sets, evals, variants)),
                                                     desc=f"multilevel pilots ({s})", disable=not progress):
            pilot = cfg.get("ml_pilots", True)
            ml_pilots.append(exp.run(dict(phase="ml-pilot" if pilot else "ml-full", sampler=s, grid=g,
                                          levels=levels, steps=steps_for(s, e),
                                          samples=cfg["pilot"] if pilot else cfg["samples"],
                                          probs_kind="calibrated", coins=coins, control=control, speedup=sp)))
    if not cfg.get("ml_pilots", True):  # run straight on all samples
        return dict(best_grid=best_grid, pilots=pilots, full=full, ml_pilots=[], ml_full=ml_pilots)
    keep = [r for r in ml_pilots if not dominated(r, ml_pilots, cfg.get("ml_slack", cfg["slack"]))]
    ml_full = [exp.run(dict({k: r[k] for k in ("sampler", "grid", "levels", "steps", "probs_kind", "coins",
                                               "control", "speedup")}, phase="ml-full", samples=cfg["samples"]))
               for r in tqdm(keep, desc="multilevel full runs", disable=not progress)]
    chosen = {r["key"] for r in ml_full}  # and any other full multilevel run already measured (an earlier pass)
    ml_full += [r for r in exp.done.values() if r.get("phase") == "ml-full" and r["key"] not in chosen
                and r.get("samples") == cfg["samples"]]
    return dict(best_grid=best_grid, pilots=pilots, full=full, ml_pilots=ml_pilots, ml_full=ml_full)


COSTS = (("gflop", "GFLOP/sample"), ("cpu_s_per_1000", "CPU s/1000"), ("modelled_s_per_1000", "modelled s/1000"))


def summarise(exp, runs, cfg) -> dict:
    """The envelope's FID at n top-level evaluations, and the cost of the envelope and of the multilevel
    front to reach it, in each cost."""
    full, ml = [r for r in runs["full"] if np.isfinite(r["fid"])], [r for r in runs["ml_full"]
                                                                    if np.isfinite(r["fid"])]
    top = exp.gflop[-1]
    rows = []
    for n in cfg["targets"]:
        cheap = [r["fid"] for r in full if r["gflop"] <= n * top * (1 + 1e-9)]
        if not cheap:
            continue
        target = min(cheap)
        row = dict(top_evaluations=n, target_fid=target)
        for cost, _ in COSTS:
            env, how_e = cost_to_reach([r[cost] for r in full], [r["fid"] for r in full], target)
            got, how_m = (cost_to_reach([r[cost] for r in ml], [r["fid"] for r in ml], target)
                          if ml else (None, "no runs"))
            row[cost] = dict(envelope=env, envelope_how=how_e, multilevel=got, multilevel_how=how_m,
                             speedup=None if env is None or got is None else env / got)
        rows.append(row)
    at_own = []  # every multilevel run on its front: what the envelope pays for that run's FID
    for r in sorted(ml, key=lambda r: r["gflop"]):
        if any(q["fid"] < r["fid"] and q["gflop"] <= r["gflop"] for q in ml if q is not r):
            continue
        row = dict(run=r["key"], fid=r["fid"], fid_se=r["fid_se"])
        for cost, _ in COSTS:
            env, how = cost_to_reach([q[cost] for q in full], [q["fid"] for q in full], r["fid"])
            row[cost] = dict(envelope=env, envelope_how=how, multilevel=r[cost],
                             speedup=None if env is None else env / r[cost])
        at_own.append(row)
    best_per_level = {}
    for k, s in enumerate(exp.summary):
        rs = [r for r in full if r["levels"] == [k]] or [r for r in runs["pilots"] if r["levels"] == [k]]
        if rs:
            b = min(rs, key=lambda r: r["fid"])
            best_per_level[f"nf={s['nf']}"] = dict(fid=b["fid"], fid_se=b["fid_se"], sampler=b["sampler"],
                                                   steps=b["steps"], gflop=b["gflop"], phase=b["phase"])
    return dict(rows=rows, at_multilevel_fid=at_own, best_per_level=best_per_level)


def name_of(exp, r) -> str:
    nfs = "+".join(str(exp.summary[k]["nf"]) for k in r["levels"])
    if r["probs_kind"] == "single":
        return f"{r['sampler']} nf={nfs}"
    return f"ML {r['sampler']} nf={nfs} {r['coins']}{'/cached' if r['control'] else ''} top/{r['speedup']:g}"


def markdown(exp, result) -> str:
    L = [f"# The envelope experiment, {result['family']}", "", f"device: {result['device']}", "",
         f"command: `{result['command']}`", "", "best grid per sampler (pilot, "
         f"nf={exp.summary[exp.cfg['grid_level']]['nf']}, {exp.cfg['grid_evals']} evaluations): "
         + ", ".join(f"{s}: {g}" for s, g in result["best_grid"].items()), "",
         f"data floor: {result['data_floor']['images']} training images (no sampler) score FID "
         f"{result['data_floor']['fid']:.2f} ± {result['data_floor']['fid_se']:.2f} against the same reference", ""]
    L += ["## Speedup of the multilevel front over the envelope at equal FID", "",
          "Target: the envelope's FID at n evaluations of the top network (the best FID any single-network run "
          "reaches at that cost). Each cell: the cost of the envelope / the multilevel front to reach the target; "
          "below 1x multilevel is slower.", "",
          "| top evaluations | target FID | " + " | ".join(f"{h}: envelope / multilevel | speedup" for _, h in COSTS)
          + " |", "|---|---|" + "---|---|" * len(COSTS)]
    for row in result["summary"]["rows"]:
        cells = []
        def side(value, how):
            return how if value is None else (f"<= {value:.3g}" if how == "at most" else f"{value:.3g}")

        for cost, _ in COSTS:
            c = row[cost]
            cells.append(f"{side(c['envelope'], c['envelope_how'])} / {side(c['multilevel'], c['multilevel_how'])}")
            cells.append("n/a" if c["speedup"] is None else
                         f"{c['speedup']:.2f}x" + (" (slower)" if c["speedup"] < 1 else ""))
        L.append(f"| {row['top_evaluations']} | {row['target_fid']:.2f} | " + " | ".join(cells) + " |")
    L += ["", "## At the FID of each run on the multilevel front", "",
          "The cost the envelope pays for the FID that run reached, against the run's own cost.", "",
          "| multilevel run | FID | ± | " + " | ".join(f"{h}: envelope / multilevel | speedup" for _, h in COSTS)
          + " |", "|---|---|---|" + "---|---|" * len(COSTS)]
    for row in result["summary"].get("at_multilevel_fid", []):
        cells = []
        for cost, _ in COSTS:
            c = row[cost]
            cells.append(f"{'<= ' if c['envelope_how'] == 'at most' else ''}"
                         f"{c['envelope']:.3g} / {c['multilevel']:.3g}" if c["envelope"] is not None
                         else f"not reached / {c['multilevel']:.3g}")
            cells.append("n/a" if c["speedup"] is None else
                         f"{c['speedup']:.2f}x" + (" (slower)" if c["speedup"] < 1 else ""))
        L.append(f"| {row['run']} | {row['fid']:.2f} | {row['fid_se']:.2f} | " + " | ".join(cells) + " |")
    L += ["", "## Each network at its best (full runs where run, else pilots)", "",
          "| level | best FID | ± | sampler | steps | GFLOP/sample |", "|---|---|---|---|---|---|"]
    for lv, b in result["summary"]["best_per_level"].items():
        L.append(f"| {lv} | {b['fid']:.2f} | {b['fid_se']:.2f} | {b['sampler']} | {b['steps']} | {b['gflop']:.4f} |"
                 + ("" if b["phase"] == "full" else " (pilot)"))
    for title, key in (("Full runs (the envelope's candidates)", "full"), ("Multilevel full runs", "ml_full"),
                       ("Multilevel pilots", "ml_pilots"), ("Single-network pilots", "pilots")):
        L += ["", f"## {title}", "", "| run | grid | steps | FID | ± | GFLOP/sample | CPU s/1000 | modelled s/1000 "
              "| evaluations | base FLOP share | predicted RMS |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(result["runs"][key], key=lambda r: (name_of(exp, r), r["steps"])):
            if "failed" in r:
                L.append(f"| {name_of(exp, r)} | {r['grid']} | {r['steps']} | failed: {r['failed'][:60]} |"
                         " | | | | | | |")
                continue
            ev = "/".join(f"{e:.1f}" for e in r["evaluations"])
            L.append(f"| {name_of(exp, r)} | {r['grid']} | {r['steps']} | {r['fid']:.2f} | {r['fid_se']:.2f} | "
                     f"{r['gflop']:.4f} | {r['cpu_s_per_1000']:.1f} | {r['modelled_s_per_1000']:.1f} | {ev} | "
                     f"{r['base_flop_share']:.2f} | {r.get('predicted_error', float('nan')):.3g} |")
    return "\n".join(L) + "\n"


def plot(exp, result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (cost, label) in zip(axes, COSTS[:2]):
        for s in SDE_SAMPLERS + ODE_SAMPLERS:
            rs = sorted((r for r in result["runs"]["full"] if r["sampler"] == s and np.isfinite(r["fid"])),
                        key=lambda r: r[cost])
            if rs:
                ax.scatter([r[cost] for r in rs], [r["fid"] for r in rs], s=14, label=s)
        ml = [r for r in result["runs"]["ml_full"] if np.isfinite(r["fid"])]
        if ml:
            ax.scatter([r[cost] for r in ml], [r["fid"] for r in ml], marker="*", s=90, c="k", label="multilevel")
        env = sorted((r for r in result["runs"]["full"] if np.isfinite(r["fid"])), key=lambda r: r[cost])
        xs, ys, best = [], [], np.inf
        for r in env:
            if r["fid"] < best:
                best = r["fid"]
                xs.append(r[cost])
                ys.append(best)
        ax.step(xs, ys, where="post", c="gray", lw=1, label="envelope")
        floor = result.get("data_floor", {}).get("fid")
        if floor:
            ax.axhline(floor, c="gray", ls=":", lw=1, label="training images (floor)")
        good = [r[cost] for r in result["runs"]["full"] + ml if np.isfinite(r["fid"]) and r["fid"] < 50]
        if good:  # the region where samples look like data; the untrained-looking cheap levels are off the top
            ax.set_xlim(min(good) / 1.5, max(good) * 1.5)
            ax.set_ylim(0.7 * (floor or 1.0), 50)
        ax.set(xscale="log", yscale="log", xlabel=label, ylabel="FID (classifier features)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['family']}: single networks (every level) and multilevel, 1000 samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_family():
    """The five levels nf 4..64 from the committed weights (runs/fmnist16x5/family)."""
    stem = os.path.join(ROOT, "runs", "fmnist16x5", "family")
    if not os.path.exists(stem + ".npz"):
        # nf 4..32 from the committed family, the nf=64 top from the demo's shipped one
        combine_families([os.path.join(HERE, "weights", "fmnist16"), demo_family_path()], stem, nfs=(4, 8, 16, 32, 64))
    return stem


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny untrained family and 16 samples (CI)")
    p.add_argument("--family", default=None, help="a family stem (default: nf 4..64 from the committed weights)")
    p.add_argument("--source-dir", default=FASHION_MNIST_DEBIAN, help="Fashion-MNIST idx files")
    p.add_argument("--out", default="benchmarks/out/envelope_fmnist16", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if not os.path.isdir(args.source_dir):
        if args.quick:
            print(f"envelope_fmnist16 --quick skipped: no Fashion-MNIST in {args.source_dir!r}")
            return 0
        p.error(f"--source-dir: Fashion-MNIST not found in {args.source_dir!r} "
                "(apt-get install dataset-fashion-mnist).")
    os.makedirs(args.out, exist_ok=True)
    stem = tiny_family(os.path.join(args.out, "quick_family")) if args.quick else (args.family or default_family())
    family = load_family(stem)
    train_x, train_y, test_x, test_y, clf = fashion_mnist_and_classifier(args.source_dir, args.quick,
                                                                         cfg["classifier_steps"])
    exp = Experiment(family, cfg, clf.features, clf.features(test_x), args.out)
    # the floor: `samples` training images (no sampler) against the same reference
    idx = np.random.default_rng(0).choice(len(train_x), min(cfg["samples"], len(train_x)), replace=False)
    floor = frechet_distance(clf.features(train_x[idx]), exp.reference, num_bootstrap=cfg["bootstrap"])
    print(f"data floor: {len(idx)} training images score FID {floor.value:.2f} ± {floor.stderr:.2f}", flush=True)
    print("levels: " + ", ".join(f"nf={s['nf']} {s['gflop']:.4f} GFLOP, {1000 * exp.seconds[k]:.2f} ms/sample"
                                 for k, s in enumerate(exp.summary)), flush=True)
    runs = experiment(exp, cfg, progress=not (args.quick or args.no_progress))
    result = dict(family="quick (untrained)" if args.quick else os.path.relpath(stem, ROOT),
                  device=device_description(), command="python " + " ".join(["benchmarks/envelope_fmnist16.py",
                                                                             *(argv or sys.argv[1:])]),
                  config={k: v for k, v in cfg.items()}, classifier_accuracy=clf.test_accuracy, levels=exp.summary,
                  level_seconds_per_sample=exp.seconds.tolist(), best_grid=runs["best_grid"], runs=runs,
                  data_floor=dict(fid=floor.value, fid_se=floor.stderr, images=len(idx)))
    result["summary"] = summarise(exp, runs, cfg)
    with open(os.path.join(args.out, "envelope.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = markdown(exp, result)
    with open(os.path.join(args.out, "envelope.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(exp, result, os.path.join(args.out, "envelope.png"))
    print(text.split("## Full runs")[0])
    print(f"wrote {os.path.abspath(args.out)}/envelope.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
