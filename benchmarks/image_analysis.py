"""Analysis of the image experiment's runs: the cost at which each method reaches the
quality of EM with the largest network at N steps, and the tables of the report.

Quality is measured two ways:
* "rms": coupled RMS error against the fine-grid reference (pathwise);
* "fid": Fréchet distance on the features of the dataset's classifier (the FID recipe on
  our own small classifier, not Inception: the figures are not comparable with published
  FIDs), with paired bootstrap standard errors (all methods share the noise).
"""

from __future__ import annotations

import math

import numpy as np


def cost_to_reach(costs, errors, target):
    """Least cost at which a method's cost-error front reaches `target`, interpolated
    between the two front points around it (log cost against log error, or against the
    error itself where errors can be zero or negative). Returns (cost, how) with how in
    {"interpolated", "at most" (already below at its cheapest run), "not reached"}."""
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


def tables(runs, em_method: str, euler_method: str, targets: dict) -> dict:
    """For each method and quality metric: the cost (wall time, FLOPs) to reach the quality
    of the baseline at each target step count, and the speedup over that baseline run."""
    out = {}
    for part, base_method, ode in (("sde", em_method, False), ("ode", euler_method, True)):
        rs_part = [r for r in runs if r["ode"] == ode]
        base = {r["steps"]: r for r in rs_part if r["method"] == base_method}
        steps = [n for n in targets[part] if n in base]
        rows = []
        for m in dict.fromkeys(r["method"] for r in rs_part):
            rs = [r for r in rs_part if r["method"] == m]
            row = {"method": m}
            for metric in ("rms", "fid"):
                have = [r for r in rs if r.get(metric) is not None]
                for n in steps:
                    if base[n].get(metric) is None or not have:
                        continue
                    for cost in ("seconds", "flops"):
                        c, how = cost_to_reach([r[cost] for r in have], [r[metric] for r in have], base[n][metric])
                        row[f"{metric}@{n}/{cost}"] = {"cost": c, "how": how,
                                                       "speedup": (base[n][cost] / c) if c else None}
            rows.append(row)
        out[part] = {"targets": steps, "rows": rows,
                     "baseline": {n: {k: base[n].get(k) for k in ("seconds", "flops", "rms", "rms_se", "fid",
                                                                   "fid_se")} for n in steps}}
    return out


def format_tables(result) -> str:
    lines = [f"# Image experiment: {result['dataset']}, family nf={result['nfs']}", "",
             f"Device: {result['device']}. {result['config']['samples']} samples per distribution run, "
             f"{result['config']['coupled_samples']} for the coupled error; one shared noise. Speedup = cost of "
             "the baseline (the largest network) at N steps / cost at which the method reaches the same quality, "
             "on its cost-quality front interpolated log-log; '≥' where its cheapest run already beats it, '-' "
             "where none reaches it. FID is the Fréchet distance on our classifier's features.", ""]
    for part, title, base in (("sde", "Reverse SDE", "EM"), ("ode", "Probability-flow ODE", "Euler")):
        t = result["tables"][part]
        for metric, name in (("fid", "Fréchet distance (classifier features)"), ("rms", "coupled RMS error")):
            if not any(t["baseline"][n].get(metric) is not None for n in t["targets"]):
                continue
            for cost, unit in (("flops", "FLOPs"), ("seconds", "wall time")):
                base_of = t["baseline"]
                head = " | ".join(f"{base}@{n} ({base_of[n][metric]:.4g} ± {base_of[n][metric + '_se']:.2g})"
                                  for n in t["targets"])
                lines += [f"## {title}: {name}, speedup in {unit}", "", f"| method | {head} |",
                          "|---|" + "---|" * len(t["targets"])]
                for row in t["rows"]:
                    cells = []
                    for n in t["targets"]:
                        v = row.get(f"{metric}@{n}/{cost}")
                        if v is None:
                            continue
                        cells.append("-" if v["speedup"] is None else
                                     ("≥" if v["how"] == "at most" else "") + f"{v['speedup']:.2f}x")
                    if cells:
                        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
                lines.append("")
    res = result.get("resolution")
    if res:
        lines += ["## Resolution of the distribution metric", "",
                  "Paired bootstrap differences of the Fréchet distance between baseline runs (same noise):", ""]
        lines += [f"- {r['a']} - {r['b']}: {r['difference']:.4g} ± {r['se']:.2g} ({r['z']:.1f} standard errors)"
                  for r in res]
        lines.append("")
    if result.get("learn_seconds"):
        lines += ["## Cost of the schedules", "",
                  f"Calibration (level statistics on {result['config']['stats_trajectories']} trajectories): "
                  f"{result['stats_seconds']:.0f} s; learning by SGD ({result['config']['learn_sgd_steps']} steps): "
                  f"{np.mean(result['learn_seconds']):.0f} s per schedule, {np.sum(result['learn_seconds']):.0f} s "
                  f"for {len(result['learn_seconds'])}.", ""]
    return "\n".join(lines)
