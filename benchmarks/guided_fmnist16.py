"""Classifier-free guidance with the multilevel estimator on the class-conditional Fashion-MNIST
16x16 family (`make fmnist16-cond-weights`): single-network samplers against multilevel ones at equal
FID and equal class accuracy, in FLOPs and CPU time, measured in one run.

For each guidance weight w (default 0, 1, 3), every sample i has the label i mod 10 and the same
prior draw in every run. Runs:
* single network: DPM-Solver++(2M) (the ODE sampler of the library that practitioners pick) on each
  level, at several step counts;
* multilevel: the same sampler with `Multilevel` over all levels, iid coins, at several step counts,
  with time-dependent probabilities from `calibration_report` (statistics at the sampler's model calls,
  propagated weighting, the cache's sigma/alpha scale, FLOP costs with both CFG passes) at a budget of
  the top level's cost / `speedup`. The statistics take one class (`CALIBRATION_CLASS`: the levels'
  `args` are shared by the pilot trajectories); the samples then cover every class. Constant
  probabilities such as (1, 0.5, 0.25) are far worse inside an ODE sampler: at 10 steps, w = 0, they
  gave a Fréchet distance of 131 against 2.5 for nf=32 alone, as the eps-networks' corrections enter D
  multiplied by sigma / alpha at high noise.
Quality: the Fréchet distance on the features of a classifier trained here on the same data (FID's
recipe on a small classifier; not comparable with published FIDs), with its bootstrap standard
error, and the accuracy of that classifier on the samples against their labels (how precisely guidance
hits the class). Costs: FLOPs = evaluations x network passes (2 with guidance, the conditional and the
unconditional pass) x the level's XLA FLOPs; CPU seconds = the run's measured time (compilation apart);
and the modelled time (evaluations x passes x each level's batch time, timed once in this run).

Every finished run is appended to OUT/runs.jsonl at once; a rerun skips the runs already there
(delete the file to start again). The summary (OUT/guided.json, OUT/guided.md) is made from it.

    python benchmarks/guided_fmnist16.py --out docs/figures/guided_fmnist16
    python benchmarks/guided_fmnist16.py --quick        # CI: a tiny untrained family, 16 samples
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN  # noqa: E402
from mlem_jax.diffusion.family import load_family  # noqa: E402
from mlem_jax.diffusion.guidance import guided_passes  # noqa: E402
from mlem_jax.diffusion.metrics import frechet_distance  # noqa: E402
from mlem_jax.diffusion.sampling import sample, solver_levels  # noqa: E402
from mlem_jax.diffusion.sde import logsnr_grid  # noqa: E402
from mlem_jax.diffusion.unet import family_summary  # noqa: E402

from _common import device_description, fashion_mnist_and_classifier, tiny_family  # noqa: E402
from image_analysis import cost_to_reach  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "fmnist16_cond")
SOLVER = "dpm++2m"
FULL = dict(samples=1000, weights=(0.0, 1.0, 3.0), single_steps=(5, 10, 20), ml_steps=(10, 20),
            speedups=(1.5, 3.0), classifier_steps=1500, bootstrap=50, pilots=16, bins=5)
QUICK = dict(samples=16, weights=(0.0, 2.0), single_steps=(3,), ml_steps=(4,), speedups=(1.5,),
             classifier_steps=20, bootstrap=5, pilots=6, bins=2)
CALIBRATION_CLASS = 0


def runs_of(family, cfg):
    """Every run: (key, levels, steps, probs) per guidance weight, cheapest first."""
    K = len(family.models)
    out = []
    for w in cfg["weights"]:
        for k in range(K):
            for n in cfg["single_steps"]:
                out.append(dict(w=w, levels=[k], steps=n, probs=None, method=f"nf={family.models[k].nf}"))
        # every level, and the top two (the cheapest level may be too poor a base: let the front say)
        for levels in ([list(range(K))] + ([[K - 2, K - 1]] if K > 2 else [])):
            name = "multilevel" if len(levels) == K else "multilevel nf=" + "+".join(
                str(family.models[k].nf) for k in levels)
            for n in cfg["ml_steps"]:
                for speedup in cfg["speedups"]:
                    out.append(dict(w=w, levels=levels, steps=n, probs=None, speedup=speedup, method=name))
    for r in out:
        r["key"] = f"w={r['w']} {r['method']} steps={r['steps']}" + (
            f" speedup={r['speedup']}" if r["method"].startswith("multilevel") else "")
    return out


def calibrated(family, run, gflop, cfg):
    """Time-dependent iid probabilities for the guided levels inside DPM-Solver++(2M) at the budget of the
    top level's cost / speedup (FLOPs, both passes), on pilots of class CALIBRATION_CLASS."""
    from mlem_jax.calibrate import LevelCosts, calibration_report
    from mlem_jax.diffusion.sampling import solver_function

    ts = logsnr_grid(family.sde, run["steps"])
    levels = solver_levels(family, run["levels"], SOLVER, guidance=run["w"])
    passes = guided_passes(run["w"])
    keys = jax.random.split(jax.random.key(11), cfg["pilots"])
    y0 = jax.vmap(lambda k: family.sde.prior_sample(k, tuple(family.image_shape)))(keys)
    solve = solver_function(family.sde, SOLVER, ts)
    costs = LevelCosts(np.ones(len(levels)), passes * np.asarray([gflop[k] for k in run["levels"]]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = calibration_report(levels, None, y0, ts, keys, jnp.int32(CALIBRATION_CLASS), costs=costs,
                                    cost_unit="flops", num_bins=cfg["bins"], speedup=run["speedup"],
                                    solver=lambda m, y, k: solve(m, y, k, jnp.int32(CALIBRATION_CLASS)),
                                    solver_name=SOLVER,
                                    weighting="propagated", control_scale=family.sde.noise_to_signal)
    return report.probs, report.predicted_error


def level_seconds(family, batch: int, passes: int) -> list[float]:
    """Seconds of one evaluation of each level on the whole batch (with `passes` passes), median of 3."""
    x = jnp.zeros((batch, *family.image_shape))
    labels = jnp.zeros((batch,), jnp.int32)
    out = []
    for d in solver_levels(family, range(len(family.models)), SOLVER, guidance=1.0 if passes == 2 else 0.0):
        f = jax.jit(jax.vmap(d, in_axes=(None, 0, 0)))
        jax.block_until_ready(f(0.5, x, labels))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(f(0.5, x, labels))
            times.append(time.perf_counter() - t0)
        out.append(float(np.median(times)))
    return out


def one_run(family, run, labels, features, predict, reference, gflop, seconds, cfg):
    """Sample one run, score it and cost it."""
    ts = logsnr_grid(family.sde, run["steps"])
    probs, predicted = None, None
    if run["method"].startswith("multilevel"):
        probs, predicted = calibrated(family, run, gflop, cfg)
        run = dict(run, probs=np.asarray(probs.values).round(4).tolist(), predicted_error=predicted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a range warning is recorded as outside_range below
        res = sample(family, run["levels"], ts, 0, cfg["samples"], probs, solver=SOLVER, labels=labels,
                     guidance=run["w"])
    passes = guided_passes(run["w"])
    evals = np.asarray(res.evaluations, float)
    fid = frechet_distance(features(res.images), reference, num_bootstrap=cfg["bootstrap"])
    return dict(run, fid=fid.value, fid_se=fid.stderr, accuracy=float(np.mean(predict(res.images) == labels)),
                evaluations=evals.tolist(), passes=passes,
                gflop=float(passes * np.dot(evals, [gflop[k] for k in run["levels"]])),
                cpu_seconds=res.run_seconds,
                modelled_seconds=float(passes * np.dot(evals, [seconds[passes][k] for k in run["levels"]])),
                outside_range=res.outside_range)


def summarise(records, family) -> dict:
    """Per weight: the single-network envelope (all levels) and the multilevel front, and the cost of
    each at the envelope's FID and accuracy at each single-network run of the top level."""
    out = {}
    top = f"nf={family.models[-1].nf}"
    for w in sorted({r["w"] for r in records}):
        rs = [r for r in records if r["w"] == w]
        single = [r for r in rs if not r["method"].startswith("multilevel")]
        multi = [r for r in rs if r["method"].startswith("multilevel")]
        rows = []
        for t in sorted((r for r in single if r["method"] == top), key=lambda r: r["steps"]):
            for metric, err in (("fid", lambda r: r["fid"]), ("accuracy", lambda r: -r["accuracy"])):
                target = err(t)
                row = dict(target=f"{metric} of {top} at {t['steps']} steps", value=abs(target))
                for cost in ("gflop", "cpu_seconds"):
                    env, how_e = cost_to_reach([r[cost] for r in single], [err(r) for r in single], target)
                    ml, how_m = (cost_to_reach([r[cost] for r in multi], [err(r) for r in multi], target)
                                 if multi else (None, "no runs"))
                    row[cost] = dict(envelope=env, envelope_how=how_e, multilevel=ml, multilevel_how=how_m,
                                     speedup=None if (env is None or ml is None) else env / ml)
                rows.append(row)
        out[str(w)] = rows
    return out


def markdown(result) -> str:
    lines = [f"# Guided sampling, {result['family']}", "", f"device: {result['device']}", "",
             f"command: `{result['command']}`", "",
             "| w | run | steps | FID | ± | accuracy | GFLOP/sample | CPU s | modelled s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["runs"], key=lambda r: (r["w"], r["method"], r["steps"], r.get("speedup", 0))):
        name = r["method"] + (f" (budget: top / {r['speedup']})" if r["method"].startswith("multilevel") else "")
        lines.append(f"| {r['w']} | {name} | {r['steps']} | {r['fid']:.2f} | {r['fid_se']:.2f} | "
                     f"{r['accuracy']:.3f} | {r['gflop']:.4f} | {r['cpu_seconds']:.1f} | "
                     f"{r['modelled_seconds']:.1f} |")
    lines += ["", "Speedup of the multilevel front (every multilevel run above) over the single-network envelope "
              "(every level) at equal quality; below 1x the multilevel runs are slower.", "",
              "| w | target | value | FLOPs: envelope / multilevel | speedup | CPU s: envelope / multilevel "
              "| speedup |",
              "|---|---|---|---|---|---|---|"]

    def cell(c):
        if c["speedup"] is None:
            return f"{c['envelope_how']} / {c['multilevel_how']}", "n/a"
        s = c["speedup"]
        return (f"{c['envelope']:.3g} / {c['multilevel']:.3g}",
                f"{s:.2f}x" + (" (slower)" if s < 1 else ""))

    for w, rows in result["summary"].items():
        for row in rows:
            f, fs = cell(row["gflop"])
            c, cs = cell(row["cpu_seconds"])
            lines.append(f"| {w} | {row['target']} | {row['value']:.3f} | {f} | {fs} | {c} | {cs} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny untrained family and 16 samples (CI)")
    p.add_argument("--family", default=WEIGHTS, help="a conditional family stem")
    p.add_argument("--source-dir", default=FASHION_MNIST_DEBIAN, help="Fashion-MNIST idx files")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default 1000)")
    p.add_argument("--out", default="benchmarks/out/guided_fmnist16", help="output folder")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.samples:
        cfg["samples"] = args.samples
    if not os.path.isdir(args.source_dir):
        if args.quick:
            print(f"guided_fmnist16 --quick skipped: no Fashion-MNIST in {args.source_dir!r}")
            return 0
        p.error(f"--source-dir: Fashion-MNIST not found in {args.source_dir!r} "
                "(apt-get install dataset-fashion-mnist).")
    os.makedirs(args.out, exist_ok=True)
    family = load_family(tiny_family(os.path.join(args.out, "quick_family"), 10) if args.quick else args.family)
    if not family.num_classes:
        p.error(f"--family: {args.family} is unconditional; train one with make fmnist16-cond-weights.")
    train_x, train_y, test_x, test_y, clf = fashion_mnist_and_classifier(args.source_dir, args.quick,
                                                                         cfg["classifier_steps"])
    reference = clf.features(test_x)
    labels = (np.arange(cfg["samples"]) % family.num_classes).astype(np.int32)
    summary = family_summary(family.models, family.params, family.image_shape)
    gflop = [s["gflop"] for s in summary]
    seconds = {1: level_seconds(family, cfg["samples"], 1), 2: level_seconds(family, cfg["samples"], 2)}
    print("levels: " + ", ".join(f"nf={s['nf']} {s['gflop']:.4f} GFLOP, {seconds[1][k]:.3f} s (x2 guided: "
                                 f"{seconds[2][k]:.3f} s) per batch" for k, s in enumerate(summary)), flush=True)
    done_path = os.path.join(args.out, "runs.jsonl")
    done = {}
    if os.path.exists(done_path):
        for line in open(done_path, encoding="utf-8"):
            r = json.loads(line)
            if r.get("samples") == cfg["samples"]:
                done[r["key"]] = r
    todo = runs_of(family, cfg)
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="runs", disable=args.quick)
    for run in bar:
        if run["key"] in done:
            continue
        bar.set_postfix_str(run["key"])
        r = one_run(family, run, labels, clf.features, clf.predict, reference, gflop, seconds, cfg)
        r["samples"] = cfg["samples"]
        done[run["key"]] = r
        with open(done_path, "a", encoding="utf-8") as f:  # saved at once: a stopped run loses at most this one
            f.write(json.dumps(r) + "\n")
        tqdm.write(f"{run['key']}: FID {r['fid']:.2f} ± {r['fid_se']:.2f}, accuracy {r['accuracy']:.3f}, "
                   f"{r['gflop']:.4f} GFLOP/sample, {r['cpu_seconds']:.1f} s")
    records = [done[r["key"]] for r in todo]
    result = dict(family=os.path.basename(args.family) if not args.quick else "quick (untrained)",
                  device=device_description(), command="python " + " ".join(["benchmarks/guided_fmnist16.py",
                                                                             *(argv or sys.argv[1:])]),
                  samples=cfg["samples"], classifier_accuracy=clf.test_accuracy, levels=summary,
                  level_seconds=seconds, runs=records, summary=summarise(records, family))
    with open(os.path.join(args.out, "guided.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(args.out, "guided.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
