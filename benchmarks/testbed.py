"""The exact testbed: the ladder against the truth, every level x sampler x steps, and the
multilevel estimator inside the best samplers at targets tied to the top level's own floor.

Ground truth: the Fashion-MNIST 16x16 Gaussian mixture has an exact denoiser, so the data's
probability-flow ODE is solved finely from each prior draw (mlem_jax.diffusion.testbed).
Errors: pathwise RMS against the truth (ODE samplers), and MMD^2 with a Gaussian kernel against
the truth's samples (every sampler, the stochastic ones included; rows paired by prior draw).
A level's floor is its own fine ODE against the truth. Targets: tau x the top level's floor,
tau in 1.1, 1.25, 1.5, 2. The top's MMD^2 floor is within a few standard errors of zero, so
multiples of it mean nothing: the MMD^2 targets are the top's floor plus q of the gap to the
floor of the level below it, q in 0.25, 0.5, 1 (q = 1: as close to the data's law as that
level can get).

For each metric and target, within each family of samplers (ODE; stochastic, where the paper's
EM against ML-EM sits): the cheapest single-network run (every level x sampler x steps) and the
cheapest multilevel run (base + top, or base + the level below the top + top; stratified coins
firing the top m times in N steps, m by bisection on 4 coin plans). The multilevel run is then
re-measured on fresh coin plans, and with iid and iid + cached coins at the same probabilities.
Costs: FLOPs per sample, and both sides' seconds measured in the same run (interleaved, best of
3). Ratios are single over multilevel: below 1 is slower.

    python benchmarks/testbed.py --out docs/figures/testbed            # about 20 min on 2 cores
    python benchmarks/testbed.py --metrics mmd --batch-size 512 --out docs/figures/testbed_mmd
    python benchmarks/testbed.py --quick --out benchmarks/out/testbed_quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax.calibrate import format_diagnostics, level_diagnostics
from mlem_jax.diffusion.ladder import _preconditioning, heldout_set, load_ladder
from mlem_jax.diffusion.testbed import STOCHASTIC, Testbed, best_multilevel, time_runs

TARGETS = (1.1, 1.25, 1.5, 2.0)
MMD_SHARES = (0.25, 0.5, 1.0)


def ladder_report(tb, log):
    """Each level's held-out error against the exact denoiser, the nestedness of every pair and
    gamma (level_diagnostics on the training's held-out draws, exact target)."""
    cfg = tb.ladder.config
    scaled, s, target = heldout_set(tb.mixture, tb.sde, cfg)
    c_in, c_skip, c_out = _preconditioning(s[:, None], cfg.sigma_data)
    outs = [np.asarray(m.apply(p, c_in * scaled, jnp.log(s) / 4)) for m, p in zip(tb.ladder.modules(),
                                                                                   tb.ladder.params)]
    d = level_diagnostics(np.stack(outs), np.asarray((target - c_skip * scaled) / c_out),
                          covariate=np.log(np.asarray(s)), bands=4, costs=tb.level_flops, exact_target=True)
    log(format_diagnostics(d, [f"width {w}" for w in tb.widths]))
    log("held-out error per band of log s (rows: bands from low to high noise; columns: levels):")
    for b in range(d.band_losses.shape[0]):
        log(f"  [{d.band_edges[b]:.2f}, {d.band_edges[b + 1]:.2f}): " + "  ".join(f"{v:.4f}" for v in d.band_losses[b]))
    return d


def compare(tb, singles, metric, tau, floor, family, ml_samplers, ml_steps, plans, log, tick, cap=None, noise=None,
            gap=None):
    """Best single against best multilevel within a family of samplers at tau x floor, or, with `gap`
    (MMD^2), at floor + tau x gap."""
    w = tb.widths
    target = tau * floor if gap is None else floor + tau * gap
    label = {"error": "pathwise error", "mmd": "MMD^2", "w1": "log-density W1"}[metric]
    pool = [r for r in singles if (r.sampler in STOCHASTIC) == (family == "stochastic")]
    ok = [r for r in pool if r.metric(metric) <= target]
    what = f"{tau} x the top's floor" if gap is None else f"the top's floor + {tau} of the gap to the level below"
    log(f"\n[{family}] target {what} in {label} = {target:.4g}:")
    noise = noise or {}
    if (floor if gap is None else gap) <= noise.get(metric, 0.0):
        log(f"  the {'top' + chr(39) + 's floor' if gap is None else 'gap'} ({floor if gap is None else gap:.3g}) is "
            f"within the metric's noise at this batch ({noise[metric]:.2g}): the metric cannot resolve the top level, "
            "no comparison")
        return None
    if not ok:
        log("  no single-network run of this family reaches it")
        return None
    single = min(ok, key=lambda r: r.flops)
    K = len(tb.levels) - 1
    subsets = [(k, K) for k in range(K)] + [(k, K - 1, K) for k in range(K - 1)]
    cands = [best_multilevel(tb, target, metric, subsets, s, ml_steps[s], single.flops if cap is None else cap, plans,
                             tick=tick) for s in ml_samplers]
    cands = [c for c in cands if c is not None]
    row = dict(family=family, metric=metric, tau=tau, target=target, single=single._asdict())
    log(f"  single:     {single.describe(w)}: {label} {single.metric(metric):.4g}, {single.flops / 1e6:.3f} MFLOP")
    if not cands:
        log("  multilevel: no run cheaper than the single network reaches the target")
        return row
    ml = min(cands, key=lambda r: r.flops)
    fresh = tb.multilevel(ml.levels, ml.sampler, ml.steps, ml.firings, plans, salt=1)
    iid = tb.multilevel(ml.levels, ml.sampler, ml.steps, ml.firings, plans, salt=1, coins="iid")
    cached = tb.multilevel(ml.levels, ml.sampler, ml.steps, ml.firings, plans, salt=1, coins="iid", control="cached")
    t_s, t_m = time_runs(tb, single, ml)
    row.update(multilevel=ml._asdict(), fresh=fresh._asdict(), iid=iid._asdict(), cached=cached._asdict(),
               seconds_single=t_s, seconds_multilevel=t_m)
    held = "" if fresh.metric(metric) <= 1.1 * single.metric(metric) else " (misses 1.1x the single side)"
    log(f"  multilevel: {ml.describe(w)}: {label} {ml.metric(metric):.4g}; fresh coin plans "
        f"{fresh.metric(metric):.4g}{held}; iid coins {iid.metric(metric):.4g}, iid + cached "
        f"{cached.metric(metric):.4g} (same probabilities); {ml.flops / 1e6:.3f} MFLOP")
    slower = "; below 1x is slower" if single.flops < ml.flops or t_s < t_m else ""
    held = f"equal {label}" if fresh.metric(metric) <= 1.1 * single.metric(metric) else \
        f"the target, NOT at equal {label} (fresh coin plans miss 1.1x the single side)"
    log(f"  gain at {held}: {single.flops / ml.flops:.2f}x in FLOPs, {t_s / t_m:.2f}x in measured seconds "
        f"({1e3 * t_s:.1f} ms against {1e3 * t_m:.1f} ms for {tb.y0.shape[0]} samples){slower}")
    return row


def plot(rows, path):
    from mlem_jax.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for family in ("ode", "stochastic"):
        for metric, style in (("error", "-o"), ("w1", "--s")):  # MMD^2's targets are not multiples of the floor
            pts = [(r["tau"], r["single"]["flops"] / r["multilevel"]["flops"]) for r in rows
                   if r["family"] == family and r["metric"] == metric and "multilevel" in r
                   and r["fresh"][metric] <= 1.1 * r["single"][metric]]  # equal-error comparisons only
            if pts:
                ax.plot(*zip(*pts), style, label=f"{family}, {metric}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("target / the top level's floor")
    ax.set_ylabel("gain in FLOPs (single / multilevel)")
    ax.set_title("exact testbed: best single against best multilevel (equal error)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ladder", default=None, help="a ladder folder (default: the shipped one)")
    p.add_argument("--out", default="docs/figures/testbed")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--truth-steps", type=int, default=200)
    p.add_argument("--floor-steps", type=int, default=100)
    p.add_argument("--plans", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", nargs="+", choices=("error", "w1", "mmd"), default=["error", "w1", "mmd"],
                   help="the metrics of the comparisons (MMD^2 resolves the top two levels from about 512 draws)")
    a = p.parse_args(argv)
    ode, sto = ("ddim", "dpm++2m", "dpm++3m", "unipc", "edm-heun"), ("sde-dpm++2m", "em")
    steps = {"ddim": (4, 8, 16, 32, 64), "em": (25, 50, 100, 200, 400), "dpm++3m": (3, 4, 6, 8, 12, 16, 24)}
    steps.update({s: (3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32) for s in ("dpm++2m", "unipc")})
    steps.update({"edm-heun": (3, 4, 6, 8, 12, 16), "sde-dpm++2m": (8, 16, 32, 64, 100)})
    ml_steps = {"dpm++2m": (6, 8, 12, 16, 24, 32), "unipc": (6, 8, 12, 16, 24, 32),
                "sde-dpm++2m": (12, 16, 24, 32, 48, 64, 100), "em": (50, 100, 200, 400)}
    targets, shares = TARGETS, MMD_SHARES
    if a.quick:
        a.batch_size, a.truth_steps, a.floor_steps, a.plans = 16, 40, 20, 2
        ode, sto, targets, shares = ("dpm++2m", "unipc"), ("sde-dpm++2m",), (1.25,), (0.5,)
        steps = {"dpm++2m": (4, 8), "unipc": (4, 8), "sde-dpm++2m": (8, 16)}
        ml_steps = {"dpm++2m": (8,), "unipc": (8,), "sde-dpm++2m": (16,)}
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "testbed.log"), "w", encoding="utf-8")

    def log(msg=""):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    start = time.time()
    log(f"$ python {' '.join(sys.argv)}")
    log(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    ladder = load_ladder(a.ladder)
    if a.quick:  # the two cheapest levels, so that CI compiles little
        ladder = ladder._replace(config=dataclasses.replace(ladder.config, widths=ladder.config.widths[:2]),
                                 params=ladder.params[:2], history=ladder.history[:2])
    tb = Testbed(ladder, a.batch_size, a.seed, a.truth_steps)
    x0 = tb.mixture.sample(jax.random.key(a.seed + 3), a.batch_size).reshape(a.batch_size, -1)
    a_, s_ = tb._marginal
    fresh = a_ * x0 + s_ * jax.random.normal(jax.random.key(a.seed + 4), x0.shape)  # exact draws of p_{t_min}
    noise = {"w1": tb.w1(fresh)}
    fresh_mmd = tb.mmd_estimate(fresh)
    log(f"truth: the exact denoiser's ODE, DPM-Solver++(3M) at {a.truth_steps} log-SNR steps; it differs from "
        f"{a.truth_steps // 2} steps by {tb.truth_check:.2e} RMS. Exact draws of p_t_min against the truth: "
        f"log-density W1 {noise['w1']:.3g} (that metric's noise at this batch); MMD^2 {fresh_mmd.value:.2e} +- "
        f"{fresh_mmd.stderr:.1e} (bandwidth {np.round(tb.bandwidth, 3)}; zero within its s.e. if the truth is exact)")
    K = len(tb.levels) - 1
    diag = ladder_report(tb, log)
    floors = [tb.single(k, "dpm++2m", a.floor_steps) for k in range(K + 1)]
    log(f"\nfloors (each level's DPM-Solver++(2M) at {a.floor_steps} steps against the truth):")
    log("| width | MFLOP/call | pathwise floor | MMD^2 floor (s.e.) | log-density W1 floor |")
    log("|---|---|---|---|---|")
    floor_mmd = [tb.mmd_estimate(tb.outputs(r)[0]) for r in floors]
    for k, r in enumerate(floors):
        log(f"| {tb.widths[k]} | {tb.level_flops[k] / 1e6:.3f} | {r.error:.4f} | {r.mmd:.2e} "
            f"({floor_mmd[k].stderr:.1e}) | {r.w1:.3g} |")
    gap = floor_mmd[K - 1].value - floor_mmd[K].value if K >= 1 else 0.0
    noise["mmd"] = 3 * float(np.hypot(floor_mmd[K - 1].stderr, floor_mmd[K].stderr)) if K >= 1 else np.inf
    log(f"MMD^2 gap between the top two floors: {gap:.2e} (3 s.e. of the difference: {noise['mmd']:.1e})")
    e = np.array([r.error for r in floors])
    if K >= 1 and np.all(np.diff(e) < 0):
        slope = np.polyfit(np.log(tb.level_flops), np.log(e), 1)[0]
        log(f"pathwise floor ~ FLOPs^{slope:.2f}: gamma_path = {-1 / slope:.2f} (the paper's regime needs > 2); "
            f"adjacent floor ratios {', '.join(f'{x:.2f}' for x in e[:-1] / e[1:])}")
    singles, n_runs = [], [0]
    tick = lambda: n_runs.__setitem__(0, n_runs[0] + 1)
    for k in range(K + 1):
        for s in ode + sto:
            for n in steps[s]:
                singles.append(tb.single(k, s, n))
    log(f"\n{len(singles)} single-network runs ({time.time() - start:.0f} s so far). The top level by steps:")
    for s in ode + sto:
        rs = [r for r in singles if r.levels == (K,) and r.sampler == s]
        log(f"  {s}: " + ", ".join(f"{r.steps}: {r.error:.3f} / {r.mmd:.1e} / {r.w1:.3g}" for r in rs)
            + " (pathwise / MMD^2 / log-density W1)")
    rows = []
    for metric, floor in (("error", floors[K].error), ("w1", floors[K].w1), ("mmd", floors[K].mmd)):
        if metric not in a.metrics:
            continue
        for tau in (shares if metric == "mmd" else targets):
            cap = np.inf if a.quick else None  # CI runs the multilevel search even where it cannot win
            g = gap if metric == "mmd" else None
            row = compare(tb, singles, metric, tau, floor, "ode", [s for s in ("dpm++2m", "unipc") if s in ode],
                          ml_steps, a.plans, log, tick, cap, noise, g)
            rows.append(row) if row else None
            if metric != "error" and sto:
                row = compare(tb, singles, metric, tau, floor, "stochastic", list(sto), ml_steps, a.plans, log, tick,
                              cap, noise, g)
                rows.append(row) if row else None
    with open(os.path.join(a.out, "testbed.json"), "w", encoding="utf-8") as f:
        json.dump(dict(widths=list(tb.widths), flops=tb.level_flops.tolist(),
                       heldout=[m.value for m in diag.losses], nested=[dict(a=q.a, b=q.b, ratio=q.ratio)
                                                                        for q in diag.pairs],
                       floors=[r._asdict() for r in floors], singles=[r._asdict() for r in singles], targets=rows,
                       args=vars(a)), f, indent=1)
    if not a.quick and any(r["metric"] != "mmd" and "multilevel" in r for r in rows):
        plot(rows, os.path.join(a.out, "testbed_gain.png"))
    log(f"\n{n_runs[0]} multilevel runs; testbed: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
