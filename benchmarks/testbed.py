"""The exact testbed: every level x sampler x steps against the true flow, and the multilevel
estimator inside the best samplers, at targets tied to the top level's own floor.

Ground truth: the Fashion-MNIST 16x16 Gaussian mixture (mlem_jax.diffusion.mixture) has an
exact denoiser, so the probability-flow ODE of the *data* can be solved finely from each
prior draw (DPM-Solver++(3M), `--truth-steps` log-SNR steps). Every error below is the RMS
per coordinate of a sampler's output against that truth, from the same prior draws
(pathwise). A level's floor is its own fine ODE (DPM-Solver++(2M), `--floor-steps`) against
the truth: no number of steps of that level does better in the mean.

Targets are tau x the top level's floor (tau in 1.1, 1.25, 1.5, 2). For each target:
- single network: the cheapest (FLOPs) run of any level x sampler x steps whose error is at
  most the target;
- multilevel: the cheapest run of base level b + the top (and b + the level below the top + the
  top) with stratified coins firing the top m times in N steps (p = m / N; the middle level
  2m times), chosen by bisection on m, on the same prior draws with `--plans` coin plans;
  its error is then re-measured on fresh coin plans, and it must be at most 1.1 x the single
  network's error there to count.
Costs: FLOPs per sample (dense layers), and seconds measured in the same run (both sides
timed interleaved, best of 3). The ratio is single over multilevel: below 1 is slower.

    python benchmarks/testbed.py --out docs/figures/testbed            # about 15 min on 2 cores
    python benchmarks/testbed.py --quick --out benchmarks/out/testbed_quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import Multilevel
from mlem_jax.diffusion.ladder import load_ladder
from mlem_jax.diffusion.metrics import kernel_distance
from mlem_jax.diffusion.mixture import load_mixture
from mlem_jax.diffusion.samplers import CALLS_PER_STEP, SAMPLERS
from mlem_jax.diffusion.sde import VP, logsnr_grid, uniform_grid
from mlem_jax.timing import time_pair

NAMES = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "dpm++3m": "DPM-Solver++(3M)", "edm-heun": "EDM Heun"}
TARGETS = (1.1, 1.25, 1.5, 2.0)


def grid(sde, sampler, n):
    return uniform_grid(n) if sampler == "ddim" else logsnr_grid(sde, n)


def rms(y, ref):
    return float(jnp.sqrt(jnp.mean((y - ref) ** 2)))


class Bench:
    def __init__(self, ladder_path, n, seed, truth_steps, log):
        self.log = log
        self.mixture = load_mixture()
        self.sde = VP()
        self.ladder = load_ladder(ladder_path)
        self.dim = self.mixture.dim
        self.levels = self.ladder.denoisers(self.sde, (self.dim,))
        self.flops = np.array(self.ladder.flops(self.dim), float)
        self.widths = self.ladder.config.widths
        self.y0 = jax.random.normal(jax.random.key(seed), (n, self.dim))
        self.level_key = jax.random.key(seed + 1)
        exact = self.mixture.denoiser(self.sde)
        flat_exact = lambda t, x, a=None: exact(t, x.reshape(-1, *self.mixture.shape)).reshape(x.shape)
        t0 = time.time()
        fine, coarse = logsnr_grid(self.sde, truth_steps), logsnr_grid(self.sde, truth_steps // 2)
        solve = jax.jit(lambda y, ts: SAMPLERS["dpm++3m"](flat_exact, self.sde, y, ts))
        self.truth = solve(self.y0, fine)
        half = solve(self.y0, coarse)
        log(f"truth: exact denoiser, DPM-Solver++(3M) at {truth_steps} log-SNR steps ({time.time() - t0:.0f} s); "
            f"it differs from {truth_steps // 2} steps by {rms(half, self.truth):.2e} RMS")
        t = np.asarray(self.truth, np.float64)
        d2 = np.sum(t**2, 1)[:, None] + np.sum(t**2, 1)[None] - 2 * t @ t.T
        self.bandwidth = float(np.sqrt(np.median(d2[np.triu_indices(len(t), 1)])))
        fresh = self.mixture.sample(jax.random.key(seed + 2), n).reshape(n, -1)
        zero = kernel_distance(fresh, self.truth, self.bandwidth)
        log(f"distribution metric: MMD^2 with a Gaussian kernel (bandwidth {self.bandwidth:.3f}, the truth's median "
            f"distance) against the truth's samples; fresh mixture draws score {zero.value:.2e} +- {zero.stderr:.1e}")
        self.programs = {}

    def program(self, levels, sampler, n, coins="stratified", control=None):
        key = (levels, sampler, n, coins, control)
        if key not in self.programs:
            ts = grid(self.sde, sampler, n)
            solve = SAMPLERS[sampler]
            chosen = [self.levels[k] for k in levels]
            if len(levels) == 1:
                f = lambda y, lk, probs: (solve(chosen[0], self.sde, y, ts),
                                          jnp.full((1,), CALLS_PER_STEP[sampler] * n, jnp.int32))
            else:
                def f(y, lk, probs):
                    sol = solve(Multilevel(chosen, probs, coins=coins, control=control, level_key=lk), self.sde, y, ts)
                    return sol.y, sol.evaluations
            self.programs[key] = jax.jit(f)
        return self.programs[key]

    def single(self, k, sampler, n):
        y, ev = self.program((k,), sampler, n)(self.y0, None, None)
        return dict(levels=[k], sampler=sampler, steps=n, error=rms(y, self.truth), mmd=self.mmd(y),
                    flops=float(ev[0] * self.flops[k]), evaluations=[int(ev[0])])

    def mmd(self, y):
        return kernel_distance(y, self.truth, self.bandwidth).value

    def multilevel(self, levels, sampler, n, m, plans, salt=0, coins="stratified", control=None):
        """Error over `plans` coin plans (one per slice of the batch) and mean evaluations."""
        probs = jnp.array([1.0] + [min(1.0, m * 2 ** (len(levels) - 2 - i) / n) for i in range(len(levels) - 1)])
        f = self.program(tuple(levels), sampler, n, coins, control)
        chunks = np.array_split(np.arange(self.y0.shape[0]), plans)
        ys, evs = [], []
        for i, c in enumerate(chunks):
            y, ev = f(self.y0[c], jax.random.fold_in(self.level_key, 1000 * salt + i), probs)
            ys.append(y)
            evs.append(np.asarray(ev, float))
        ev = np.mean(evs, 0)
        y = jnp.concatenate(ys)
        return dict(levels=list(levels), sampler=sampler, steps=n, firings=m, coins=coins, control=control,
                    error=rms(y, self.truth), mmd=self.mmd(y), flops=float(ev @ self.flops[list(levels)]),
                    evaluations=ev.tolist())


def describe(run, widths):
    name = f"{NAMES.get(run['sampler'], run['sampler'])} {run['steps']} steps"
    if len(run["levels"]) == 1:
        return f"w={widths[run['levels'][0]]} alone, {name}"
    ws = "+".join(str(widths[k]) for k in run["levels"])
    extra = "" if run.get("coins", "stratified") == "stratified" else f", {run['coins']} coins"
    return f"multilevel w={ws}, {name}, top fired {run['firings']}x{extra}"


def compare_at(b, singles, subsets, ml_steps, metric, tau, floor, a, log):
    """The cheapest single network and the cheapest multilevel run (dpm++2m, stratified coins,
    bisection on the top's firings) whose `metric` is at most tau x floor."""
    w = b.widths
    target = tau * floor
    label = "pathwise error" if metric == "error" else "MMD^2"
    ok = [r for r in singles if r[metric] <= target]
    log(f"\ntarget {tau} x the top's floor in {label} = {target:.4g}:")
    if not ok:
        log("  no single-network run reaches it")
        return None
    single = min(ok, key=lambda r: r["flops"])
    cands = []
    for sub in subsets:
        for n in ml_steps:
            if n * b.flops[sub[0]] >= single["flops"]:
                break
            lo, hi, found = 1, n, None
            while lo <= hi:
                m = (lo + hi) // 2
                r = b.multilevel(sub, "dpm++2m", n, m, a.plans)
                if r[metric] <= target:
                    found, hi = r, m - 1
                else:
                    lo = m + 1
            if found is not None:
                cands.append(found)
    row = dict(metric=metric, tau=tau, target=target, single=single, candidates=len(cands))
    log(f"  single:     {describe(single, w)}: {label} {single[metric]:.4g} (pathwise {single['error']:.4f}), "
        f"{single['flops'] / 1e6:.2f} MFLOP")
    if not cands:
        log("  multilevel: no candidate cheaper than the single network reaches the target")
        return row
    ml = min(cands, key=lambda r: r["flops"])
    check = b.multilevel(ml["levels"], ml["sampler"], ml["steps"], ml["firings"], a.plans, salt=1)
    probs = jnp.array([1.0] + [min(1.0, ml["firings"] * 2 ** (len(ml["levels"]) - 2 - i) / ml["steps"])
                               for i in range(len(ml["levels"]) - 1)])
    t_s, t_m = time_pair(
        lambda: b.program(tuple(single["levels"]), single["sampler"], single["steps"])(b.y0, None, None)[0],
        lambda: b.program(tuple(ml["levels"]), "dpm++2m", ml["steps"])(b.y0, b.level_key, probs)[0], 3)
    row.update(multilevel=ml, check=check, seconds_single=t_s, seconds_multilevel=t_m)
    held = "" if check[metric] <= 1.1 * single[metric] else "; fresh plans miss 1.1x the single side"
    log(f"  multilevel: {describe(ml, w)}: {label} {ml[metric]:.4g} (fresh coin plans {check[metric]:.4g}{held}), "
        f"{ml['flops'] / 1e6:.2f} MFLOP")
    slower = "; below 1x is slower" if single["flops"] < ml["flops"] or t_s < t_m else ""
    log(f"  gain at equal {label}: {single['flops'] / ml['flops']:.2f}x in FLOPs, {t_s / t_m:.2f}x in measured "
        f"seconds ({t_s:.3f} s against {t_m:.3f} s for {a.batch_size} samples){slower}")
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ladder", default=None, help="a ladder folder (default: the shipped one)")
    p.add_argument("--out", default="docs/figures/testbed")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--truth-steps", type=int, default=400)
    p.add_argument("--floor-steps", type=int, default=200)
    p.add_argument("--plans", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.batch_size, a.truth_steps, a.floor_steps = 16, 60, 40
        samplers, steps = ("dpm++2m", "ddim"), (4, 8, 16)
        ml_steps = (8, 16)
    else:
        samplers, steps = ("ddim", "dpm++2m", "dpm++3m", "edm-heun"), (4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
        ml_steps = (8, 12, 16, 24, 32, 48)
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "testbed.log"), "w", encoding="utf-8")

    def log(msg=""):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    start = time.time()
    log(f"$ python {' '.join(sys.argv)}")
    log(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    b = Bench(a.ladder, a.batch_size, a.seed, a.truth_steps, log)
    K = len(b.levels) - 1
    w = b.widths
    hist = [h[-1]["error"] for h in b.ladder.history]
    fine = [b.single(k, "dpm++2m", a.floor_steps) for k in range(K + 1)]
    floors, floors_mmd = [r["error"] for r in fine], [r["mmd"] for r in fine]
    log("\nlevels (held-out error: |F - F*|^2 per coordinate, log s uniform; floors: the level's own fine ODE "
        "against the truth)")
    log("| width | MFLOP/call | held-out error | pathwise floor | MMD^2 floor |")
    log("|---|---|---|---|---|")
    for k in range(K + 1):
        log(f"| {w[k]} | {b.flops[k] / 1e6:.3f} | {hist[k]:.4g} | {floors[k]:.4f} | {floors_mmd[k]:.2e} |")
    gam = np.polyfit(np.log(b.flops), np.log(np.array(floors)), 1)[0]
    gam_h = np.polyfit(np.log(b.flops), np.log(np.sqrt(hist)), 1)[0]
    log(f"slopes of log error against log FLOPs: pathwise floor {gam:.2f} (gamma_path = {-1 / gam:.2f}), "
        f"held-out RMS {gam_h:.2f} (gamma = {-1 / gam_h:.2f}); the paper's regime needs gamma > 2")

    singles = []
    for k in range(K + 1):
        for s in samplers:
            for n in steps:
                singles.append(b.single(k, s, n))
    log(f"\n{len(singles)} single-network runs ({time.time() - start:.0f} s so far)")
    top_best = {s: [r["error"] for r in singles if r["levels"] == [K] and r["sampler"] == s] for s in samplers}
    log("top level's error by steps: " + "; ".join(f"{NAMES[s]}: " + ", ".join(f"{e:.3f}" for e in v)
                                                  for s, v in top_best.items()) + f" (steps {steps})")

    subsets = [(k, K) for k in range(K)] + [(k, K - 1, K) for k in range(K - 1)]
    results = []
    for metric, floor in (("error", floors[K]), ("mmd", floors_mmd[K])):
        for tau in TARGETS:
            row = compare_at(b, singles, subsets, ml_steps, metric, tau, floor, a, log)
            if row is not None:
                results.append(row)
    with open(os.path.join(a.out, "testbed.json"), "w", encoding="utf-8") as f:
        json.dump(dict(widths=list(w), flops=b.flops.tolist(), heldout=hist, floors=floors, floors_mmd=floors_mmd,
                       singles=singles,
                       targets=results, args=vars(a)), f, indent=1)
    log(f"\ntestbed: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
