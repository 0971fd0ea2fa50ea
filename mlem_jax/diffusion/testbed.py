"""The exact testbed's comparison: every level's sampler runs against the true flow, and the
cheapest single-network and multilevel runs that reach a target.

The data are the Fashion-MNIST 16x16 Gaussian mixture (`mixture.load_mixture`), whose
denoiser is exact, so the probability-flow ODE of the *data* can be solved finely from each
prior draw: the truth. The levels are the MLP ladder (`ladder.load_ladder`). A run's error
is measured against the truth from the same prior draws, in two metrics:

* pathwise: the RMS per coordinate of the output minus the truth;
* in distribution: MMD^2 with a Gaussian kernel (characteristic, so a proper two-sample
  statistic; the sum of the kernels at 1 and 0.2 x the truth's median pairwise distance, which
  resolves every adjacent pair of levels where either alone does not:
  docs/figures/testbed/mmd_bandwidth.log) between the outputs and the
  truth's samples, whose law is the data's up to the fine solver's error. Row i of both comes
  from prior draw i, so the statistic is the paired U-statistic (`kernel_distance(...,
  paired=True)`), unbiased for the MMD^2 of the two laws, with a small standard error when
  the outputs are close to the truth;
* in distribution, through the exact density: W1, the 1-Wasserstein distance between the
  laws of log p_{t_min}(y) under the outputs and under the truth's samples (p_{t_min} the
  mixture's exact marginal at the grid's last time). A two-sample distance on one exact
  feature, not a full divergence (a sampler could match it and differ elsewhere), but the
  log-density sees the residual noise and the mode masses that MMD^2 at a few hundred
  samples cannot resolve.

A level's floor is its own fine ODE against the truth. Costs are FLOPs per sample (the
MLPs' dense layers x evaluations); `time_runs` measures both sides' seconds interleaved.
The multilevel runs use stratified coins that fire the top level m times in N steps (p = m
/ N; with three levels the middle one 2m times), over `plans` coin plans (one per slice of
the batch).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import Multilevel
from mlem_jax.diffusion.samplers import CALLS_PER_STEP, SAMPLERS
from mlem_jax.diffusion.sde import VP, logsnr_grid, uniform_grid

SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "dpm++3m": "DPM-Solver++(3M)", "edm-heun": "EDM Heun",
                 "unipc": "UniPC-bh2(2)", "sde-dpm++2m": "SDE-DPM-Solver++(2M)", "em": "Euler-Maruyama"}
STOCHASTIC = ("sde-dpm++2m", "em")
"""Samplers of the reverse SDE: their pathwise error against the ODE's truth means nothing, so
they are compared in distribution only."""


class Run(NamedTuple):
    """One sampler run on the testbed's batch: what ran, its errors and its cost per sample."""

    levels: tuple  # ladder indices, cheapest first; one index: a single network
    sampler: str
    steps: int
    firings: int  # of the top level (multilevel), 0 for a single network
    error: float  # pathwise RMS against the truth
    mmd: float  # MMD^2 against the truth's samples
    w1: float  # W1 between the laws of the exact log-density under the outputs and the truth
    flops: float  # per sample
    evaluations: tuple  # per level, per sample

    def metric(self, name: str) -> float:
        return {"error": self.error, "mmd": self.mmd, "w1": self.w1}[name]

    def describe(self, widths: Sequence[int]) -> str:
        name = f"{SAMPLER_NAMES.get(self.sampler, self.sampler)}, {self.steps} steps"
        if len(self.levels) == 1:
            return f"width {widths[self.levels[0]]} alone, {name}"
        ws = " + ".join(str(widths[k]) for k in self.levels)
        return f"multilevel widths {ws}, {name}, top fired {self.firings} times"


MAX_PROGRAMS = 96
"""Compiled programs kept at once: the full benchmark compiles several hundred, and with all of
them alive XLA's CPU backend ran out of memory maps ("LLVM compilation error: Cannot allocate
memory") after about 300; runs already made are kept as `Run`s, so a cleared program costs only
a recompilation if it is asked for again."""


def grid(sde, sampler: str, steps: int):
    """The grid each sampler is designed for: uniform in t for DDIM and EM, log-SNR otherwise."""
    return uniform_grid(steps) if sampler in ("ddim", "em") else logsnr_grid(sde, steps)


def firing_probs(num_levels: int, steps: int, firings: int) -> jax.Array:
    """(1, ..., 2m / N, m / N): the top fires m times in N steps, each level below it twice as often."""
    return jnp.array([1.0] + [min(1.0, firings * 2 ** (num_levels - 2 - i) / steps) for i in range(num_levels - 1)])


class Testbed:
    """Prior draws, the truth, the ladder's levels, and one compiled program per run shape.

    Args:
      ladder: a `ladder.Ladder` (default: the shipped one).
      batch_size: prior draws.
      seed: of the draws and the coin plans.
      truth_steps: DPM-Solver++(3M) log-SNR steps of the exact denoiser's ODE.
      bandwidth_scale: the MMD's Gaussian-kernel bandwidth over the truth's median pairwise distance;
        a sequence sums the kernels (default: 1 and 0.2, which resolves every adjacent pair of the
        shipped ladder's floors at 512 draws, where either alone does not).
    """

    def __init__(self, ladder=None, batch_size: int = 256, seed: int = 0, truth_steps: int = 200,
                 bandwidth_scale=(1.0, 0.2)):
        from mlem_jax.diffusion.ladder import load_ladder
        from mlem_jax.diffusion.mixture import load_mixture

        self.mixture = load_mixture()
        self.sde = VP()
        self.ladder = load_ladder() if ladder is None else ladder
        self.dim = self.mixture.dim
        self.levels = self.ladder.denoisers(self.sde, (self.dim,))
        self.widths = tuple(self.ladder.config.widths)
        self.level_flops = np.array(self.ladder.flops(self.dim), float)
        self.y0 = jax.random.normal(jax.random.key(seed), (batch_size, self.dim))
        self.level_key = jax.random.key(seed + 1)
        self.noise_keys = jax.random.split(jax.random.key(seed + 2), batch_size)  # per sample, for the SDE samplers
        shape = self.mixture.shape
        exact = self.mixture.denoiser(self.sde)
        self.exact = lambda t, x, a=None: exact(t, x.reshape(-1, *shape)).reshape(x.shape)
        solve = jax.jit(lambda y, ts: SAMPLERS["dpm++3m"](self.exact, self.sde, y, ts))
        self.truth = solve(self.y0, logsnr_grid(self.sde, truth_steps))
        self.truth_check = float(jnp.sqrt(jnp.mean((solve(self.y0, logsnr_grid(self.sde, truth_steps // 2))
                                                    - self.truth) ** 2)))
        t = np.asarray(self.truth, np.float64)
        sq = np.sum(t**2, 1)
        d2 = sq[:, None] + sq[None] - 2 * t @ t.T
        median = float(np.sqrt(np.median(d2[np.triu_indices(len(t), 1)])))
        scales = np.atleast_1d(np.asarray(bandwidth_scale, np.float64))
        self.bandwidth = float(median * scales[0]) if scales.size == 1 else tuple(float(median * s) for s in scales)
        t_min = 1e-3  # every grid's last time
        self._marginal = (self.sde.alpha(t_min), self.sde.std(t_min))
        self.truth_logp = np.sort(self.log_density(self.truth))
        self.programs = {}
        self._runs = {}  # every run made, by what it ran: a search that asks again gets the same Run

    def log_density(self, y) -> np.ndarray:
        """log p_{t_min}(y) of flat samples (the mixture's exact marginal at the grid's end)."""
        y = jnp.asarray(y).reshape(-1, *self.mixture.shape)
        return np.asarray(self.mixture.log_density(y, *self._marginal), np.float64)

    def w1(self, y) -> float:
        """W1 between the laws of log p_{t_min} under `y` and under the truth (equal sizes: sorted pairs)."""
        return float(np.mean(np.abs(np.sort(self.log_density(y)) - self.truth_logp)))

    def mmd(self, y) -> float:
        """MMD^2 between the laws of `y` and of the truth, rows paired by prior draw."""
        return self.mmd_estimate(y).value

    def mmd_estimate(self, y):
        """`mmd` with its standard error (`metrics.kernel_distance(..., paired=True)`): `y` row i
        comes from the truth's prior draw i, so the cross term of each pair is left out."""
        from mlem_jax.diffusion.metrics import kernel_distance

        return kernel_distance(y, self.truth, self.bandwidth, paired=True)

    def program(self, levels: tuple, sampler: str, steps: int, coins: str = "stratified", control: str | None = None):
        """f(y, noise_keys, level_key, probs) -> (outputs, evaluations per level), jitted."""
        key = (levels, sampler, steps, coins, control)
        if key not in self.programs:
            if len(self.programs) >= MAX_PROGRAMS:  # each compiled program holds memory maps: release them
                self.programs.clear()
                jax.clear_caches()
            self.programs[key] = jax.jit(self._solver(levels, sampler, steps, coins, control))
        return self.programs[key]

    def _solver(self, levels, sampler, steps, coins, control):
        from mlem_jax import euler_maruyama
        from mlem_jax.diffusion.parameterization import reverse_diffusion, reverse_drift, score_from_denoiser

        ts, sde = grid(self.sde, sampler, steps), self.sde
        chosen = [self.levels[k] for k in levels]
        if sampler == "em":  # the reverse SDE's drift from each denoiser (one sample at a time)
            chosen = [reverse_drift(sde, score_from_denoiser(sde, d)) for d in chosen]
            g = reverse_diffusion(sde)
            one = lambda model, y, k: euler_maruyama(model, g, y, ts, k)
        else:
            one = lambda model, y, k: SAMPLERS[sampler](model, sde, y, ts, k)
        batched = sampler in STOCHASTIC  # per-sample Brownian paths: vmap over samples, the level key shared

        def run(model, y, keys):
            if not batched:
                return one(model, y, keys[0])
            return jax.vmap(lambda yi, ki: one(model, yi, ki), out_axes=0)(y, keys)

        if len(levels) == 1:
            calls = CALLS_PER_STEP[sampler] * steps

            def f(y, keys, lk, probs):
                return run(chosen[0], y, keys), jnp.full((1,), calls, jnp.int32)
        else:
            def f(y, keys, lk, probs):
                out = run(Multilevel(chosen, probs, coins=coins, level_key=lk, control=control), y, keys)
                ev = out.evaluations if out.evaluations.ndim == 1 else out.evaluations[0]
                return out.y, ev
        return f

    def single(self, k: int, sampler: str, steps: int) -> Run:
        key = ((k,), sampler, steps)
        if key not in self._runs:
            y, ev = self.program((k,), sampler, steps)(self.y0, self.noise_keys, None, None)
            self._runs[key] = self._run((k,), sampler, steps, 0, y, np.asarray(ev, float))
        return self._runs[key]

    def outputs(self, run: Run, plans: int = 4, salt: int = 0, coins: str = "stratified", control=None):
        """(outputs, mean evaluations per level) of `run`: a multilevel run over `plans` coin plans."""
        f = self.program(tuple(run.levels), run.sampler, run.steps, coins, control)
        if len(run.levels) == 1:
            y, ev = f(self.y0, self.noise_keys, None, None)
            return y, np.asarray(ev, float)
        probs = firing_probs(len(run.levels), run.steps, run.firings)
        chunks = np.array_split(np.arange(self.y0.shape[0]), plans)
        ys, evs = [], []
        for i, c in enumerate(chunks):
            y, ev = f(self.y0[c], self.noise_keys[c], jax.random.fold_in(self.level_key, 1000 * salt + i), probs)
            ys.append(y)
            evs.append(np.asarray(ev, float) * len(c))
        return jnp.concatenate(ys), sum(evs) / self.y0.shape[0]

    def multilevel(self, levels: Sequence[int], sampler: str, steps: int, firings: int, plans: int = 4,
                   salt: int = 0, coins: str = "stratified", control: str | None = None) -> Run:
        key = (tuple(levels), sampler, steps, firings, plans, salt, coins, control)
        if key not in self._runs:
            run = Run(tuple(levels), sampler, steps, firings, 0.0, 0.0, 0.0, 0.0, ())
            y, ev = self.outputs(run, plans, salt, coins, control)
            self._runs[key] = self._run(tuple(levels), sampler, steps, firings, y, ev)
        return self._runs[key]

    def _run(self, levels, sampler, steps, firings, y, evaluations) -> Run:
        err = float(jnp.sqrt(jnp.mean((y - self.truth) ** 2)))
        return Run(tuple(levels), sampler, steps, firings, err, self.mmd(y), self.w1(y),
                   float(evaluations @ self.level_flops[list(levels)]), tuple(float(e) for e in evaluations))


def best_single(tb: Testbed, target: float, metric: str, levels: Sequence[int], samplers: Sequence[str],
                steps: Sequence[int], done: list | None = None, tick=lambda: None) -> Run | None:
    """The cheapest single-network run reaching `target` in `metric`; each (level, sampler) climbs
    `steps` until it reaches the target or costs more than the best found. Runs made go to `done`."""
    best = None
    done = [] if done is None else done
    for k in levels:
        for s in samplers:
            for n in sorted(steps):
                if best is not None and CALLS_PER_STEP[s] * n * tb.level_flops[k] >= best.flops:
                    break
                known = [r for r in done if (r.levels, r.sampler, r.steps) == ((k,), s, n)]
                r = known[0] if known else tb.single(k, s, n)
                if not known:
                    done.append(r)
                    tick()
                if r.metric(metric) <= target:
                    best = r if best is None or r.flops < best.flops else best
                    break
    return best


def best_multilevel(tb: Testbed, target: float, metric: str, subsets: Sequence[tuple], sampler: str,
                    steps: Sequence[int], max_flops: float, plans: int = 4, done: list | None = None,
                    tick=lambda: None) -> Run | None:
    """The cheapest multilevel run (stratified coins, the top fired m times) reaching `target`:
    for each subset and N, the least m by bisection (the error falls with m); runs that cannot
    cost less than `max_flops` or than a candidate already found are skipped."""
    best = None
    done = [] if done is None else done
    for sub in subsets:
        for n in sorted(steps):
            cap = max_flops if best is None else min(max_flops, best.flops)
            if CALLS_PER_STEP[sampler] * n * tb.level_flops[sub[0]] >= cap:
                break
            lo, hi = 1, n
            while lo <= hi:
                m = (lo + hi) // 2
                r = tb.multilevel(sub, sampler, n, m, plans)
                done.append(r)
                tick()
                if r.metric(metric) <= target:
                    if r.flops < cap:
                        best, cap = r, r.flops
                    hi = m - 1
                else:
                    lo = m + 1
    return best


def time_runs(tb: Testbed, a: Run, b: Run, repeats: int = 3) -> tuple:
    """Measured seconds of `a` and `b` on the whole batch (one coin plan), interleaved, best of `repeats`."""
    from mlem_jax.timing import time_pair

    def go(run):
        f = tb.program(tuple(run.levels), run.sampler, run.steps)
        if len(run.levels) == 1:
            return lambda: f(tb.y0, tb.noise_keys, None, None)[0]
        probs = firing_probs(len(run.levels), run.steps, run.firings)
        return lambda: f(tb.y0, tb.noise_keys, tb.level_key, probs)[0]

    return time_pair(go(a), go(b), repeats)
