"""Flow schedules against VP on the exact testbed: the error against the truth (issue 43, item 6).

`flow_vs_vp.py` compares two trained families by FID, so the schedule and the training differ
together. Here the networks are the same: the testbed ladder's top level (width 512), an
EDM-preconditioned denoiser D(x / alpha, sigma / alpha) that serves any (alpha, sigma), and
the mixture's exact denoiser beside it. What changes is only the sampling schedule and its grid:

* VP: DDIM on the uniform-t grid, DPM-Solver++(2M) and UniPC-bh2 on the log-SNR grid (the
  library's defaults for VP);
* Flow, and Flow with SD3's shift 3: every sampler on the uniform-t grid (shifted), the grid
  flow models sample on (DDIM on the flow path is the flow's Euler step), ending at the same
  times as the truth (t_max 0.999, t_min 1e-3: the shift is applied to a uniform grid whose
  ends are the unshifted images of those);
* Flow on the log-SNR grid, as a check: an exponential integrator on a log-SNR grid takes
  the same steps on every schedule over the same noise range, so it differs from VP's only
  through the range (Flow's ends are sigma / alpha = 999 and 0.001, VP's 152 and 0.01).

Each schedule's truth is the exact denoiser's probability-flow ODE from the same prior draws
(DPM-Solver++(3M), 200 log-SNR steps). The error is the RMS per coordinate against it (the
pathwise metric of the testbed), and W1 between the laws of the exact log-density
log p_{t_min} under the outputs and under the truth (the testbed's distribution metric).
The top network's floor on each schedule is its own fine ODE against that truth. The
cost of a run is its network calls (one per step for all three samplers): the same network
everywhere, so calls are FLOPs.

    python benchmarks/flow_testbed.py --out docs/figures/flow_testbed
    python benchmarks/flow_testbed.py --quick --out benchmarks/out/flow_testbed_quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mlem_jax.diffusion.ladder import load_ladder  # noqa: E402
from mlem_jax.diffusion.mixture import load_mixture  # noqa: E402
from mlem_jax.diffusion.samplers import SAMPLERS  # noqa: E402
from mlem_jax.diffusion.sde import VP, Flow, logsnr_grid, shift_times, uniform_grid  # noqa: E402

from _common import device_description  # noqa: E402

T_MIN = 1e-3
SAMPLER_NAMES = {"ddim": "DDIM (Euler)", "dpm++2m": "DPM-Solver++(2M)", "unipc": "UniPC-bh2"}
TARGETS = (1.1, 1.25, 1.5, 2.0)


def shifted_uniform(num_steps: int, shift: float, t_max: float) -> jax.Array:
    """A uniform grid shifted by `shift` whose ends are exactly t_max and T_MIN."""
    unshift = lambda t: t / (shift - (shift - 1.0) * t)  # the inverse of shift_times
    return shift_times(uniform_grid(num_steps, unshift(T_MIN), unshift(t_max)), shift)


SCHEDULES = {  # name: (sde, grid(sampler, steps))
    "VP": (VP(), lambda s, n: uniform_grid(n) if s == "ddim" else logsnr_grid(VP(), n)),
    "Flow": (Flow(), lambda s, n: shifted_uniform(n, 1.0, Flow.t_max)),
    "Flow, shift 3": (Flow(), lambda s, n: shifted_uniform(n, 3.0, Flow.t_max)),
    "Flow, log-SNR grid": (Flow(), lambda s, n: logsnr_grid(Flow(), n)),
}


class Schedule:
    """The truth, the levels and the metrics of one schedule on fixed prior draws."""

    def __init__(self, name, mixture, ladder, y0, truth_steps, shared: dict):
        self.name, (self.sde, self.grid) = name, SCHEDULES[name]
        self.mixture, shape = mixture, mixture.shape
        exact = mixture.denoiser(self.sde)
        self.models = {"exact": lambda t, x, a=None: exact(t, x.reshape(-1, *shape)).reshape(x.shape),
                       "network": ladder.denoisers(self.sde, (mixture.dim,))[-1]}
        self.y0 = y0
        self.marginal = (self.sde.alpha(T_MIN), self.sde.std(T_MIN))
        kind = type(self.sde).__name__
        if kind not in shared:  # the truth, its check and the floor depend on the schedule, not on the grid
            truth = self.solve("exact", "dpm++3m", logsnr_grid(self.sde, truth_steps))
            half = self.solve("exact", "dpm++3m", logsnr_grid(self.sde, truth_steps // 2))
            fine = self.solve("network", "dpm++3m", logsnr_grid(self.sde, truth_steps))
            shared[kind] = (truth, float(jnp.sqrt(jnp.mean((half - truth) ** 2))), fine)
        self.truth, self.truth_check, fine = shared[kind]
        self.truth_logp = np.sort(self.log_density(self.truth))
        self.floor = self.error(fine)

    def solve(self, model: str, sampler: str, ts) -> jax.Array:
        return jax.jit(lambda y, ts: SAMPLERS[sampler](self.models[model], self.sde, y, ts))(self.y0, ts)

    def log_density(self, y) -> np.ndarray:
        y = jnp.asarray(y).reshape(-1, *self.mixture.shape)
        return np.asarray(self.mixture.log_density(y, *self.marginal), np.float64)

    def error(self, y) -> float:
        return float(jnp.sqrt(jnp.mean((y - self.truth) ** 2)))

    def w1(self, y) -> float:
        return float(np.mean(np.abs(np.sort(self.log_density(y)) - self.truth_logp)))


def cheapest(rows, schedule, sampler, model, target):
    """The fewest steps whose error is at most `target`, or None."""
    hits = [r["steps"] for r in rows if (r["schedule"], r["sampler"], r["model"]) == (schedule, sampler, model)
            and r["error"] <= target]
    return min(hits) if hits else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out/flow_testbed")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 6, 8, 12, 16, 24, 32])
    ap.add_argument("--truth-steps", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="32 samples, 4 and 8 steps, a 40-step truth: the CI run")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.steps, args.truth_steps = 32, [4, 8], 40
    os.makedirs(args.out, exist_ok=True)
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    start = time.perf_counter()
    mixture, ladder = load_mixture(), load_ladder()
    y0 = jax.random.normal(jax.random.key(0), (args.samples, mixture.dim))
    log(f"# Flow schedules against VP on the exact testbed ({device_description()})")
    log(f"command: python benchmarks/flow_testbed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    log(f"{args.samples} prior draws (seed 0); the top network is width {ladder.config.widths[-1]}; "
        f"truth: exact denoiser, DPM-Solver++(3M), {args.truth_steps} log-SNR steps")
    shared = {}
    schedules = {name: Schedule(name, mixture, ladder, y0, args.truth_steps, shared) for name in SCHEDULES}
    for s in schedules.values():
        log(f"- {s.name}: truth checked against half its steps: {s.truth_check:.2e}; "
            f"the network's floor (its fine ODE against the truth) {s.floor:.4f}")
    rows = []
    for s in schedules.values():
        for sampler in SAMPLER_NAMES:
            for model in ("exact", "network"):
                for n in args.steps:
                    y = s.solve(model, sampler, s.grid(sampler, n))
                    rows.append(dict(schedule=s.name, sampler=sampler, model=model, steps=n, error=s.error(y),
                                     w1=s.w1(y)))
    log("\n## Error against the truth (RMS per coordinate; W1 of the log-density in brackets)\n")
    log("| schedule | sampler | model | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
    log("|---|---|---|" + "---|" * len(args.steps))
    for s in schedules:
        for sampler in SAMPLER_NAMES:
            for model in ("exact", "network"):
                cells = [r for r in rows if (r["schedule"], r["sampler"], r["model"]) == (s, sampler, model)]
                log(f"| {s} | {SAMPLER_NAMES[sampler]} | {model} | "
                    + " | ".join(f"{r['error']:.4f} ({r['w1']:.3g})" for r in cells) + " |")
    floor = min(s.floor for s in schedules.values())
    log(f"\n## Network calls to reach a target (the lowest floor, {floor:.4f}, times the factor)\n")
    log("The same network on every row, so the ratio of calls is the ratio of FLOPs. '-': not within "
        f"{max(args.steps)} steps.\n")
    log("| schedule | sampler | " + " | ".join(f"{t}x" for t in TARGETS) + " |")
    log("|---|---|" + "---|" * len(TARGETS))
    best = {}
    for s in schedules:
        for sampler in SAMPLER_NAMES:
            calls = [cheapest(rows, s, sampler, "network", t * floor) for t in TARGETS]
            for t, c in zip(TARGETS, calls):
                if c is not None and c < best.get((s, t), (np.inf,))[0]:
                    best[(s, t)] = (c, sampler)
            log(f"| {s} | {SAMPLER_NAMES[sampler]} | " + " | ".join("-" if c is None else str(c) for c in calls)
                + " |")
    log("\n## Best of each schedule, and VP's calls over each flow schedule's (above 1: the flow is cheaper)\n")
    for t in TARGETS:
        vp = best.get(("VP", t))
        parts = []
        for s in schedules:
            b = best.get((s, t))
            text = "-" if b is None else f"{b[0]} ({SAMPLER_NAMES[b[1]]})"
            if s != "VP" and b is not None and vp is not None:
                text += f", VP/this {vp[0] / b[0]:.2f}x"
            parts.append(f"{s}: {text}")
        log(f"- {t}x the floor: " + "; ".join(parts))
    for s in schedules:
        ratios = []
        for t in TARGETS:
            u, d = cheapest(rows, s, "unipc", "network", t * floor), cheapest(rows, s, "dpm++2m", "network", t * floor)
            ratios.append("-" if u is None or d is None else f"{d / u:.2f}x")
        log(f"- UniPC against DPM-Solver++(2M) on {s} (DPM-Solver++'s calls over UniPC's at "
            f"{', '.join(f'{t}x' for t in TARGETS)}): {', '.join(ratios)}")
    log(f"\n{time.perf_counter() - start:.0f} s")
    with open(os.path.join(args.out, "flow_testbed.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "flow_testbed.json"), "w") as f:
        json.dump(dict(rows=rows, floors={s.name: s.floor for s in schedules.values()},
                       truth_checks={s.name: s.truth_check for s in schedules.values()}), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
