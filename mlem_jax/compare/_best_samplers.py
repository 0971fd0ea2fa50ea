"""The best single-network sampler against the best multilevel sampler at equal coupled
error: the comparison behind `mlem-jax demo`.

The error is pathwise. Every run starts from the same prior draws x_T, and its error is the
RMS difference per pixel (`metrics.coupled_error`) from the top network's probability-flow
ODE solved finely from the same x_T (DPM-Solver++(3M), `reference_steps` log-SNR steps).
It measures discretisation, the coin noise of a multilevel run, and, for a lower network,
its distance from the top network. A lower network alone therefore has a floor that no
number of steps removes. The multilevel estimator removes that floor in the mean: D^base
plus (D^top - D^base) / p on the steps whose coin fires. Stratified coins fire the top
exactly m times, spread evenly over the grid (p = m / N on every step), so the coin noise
falls about like 1 / m rather than 1 / sqrt(m).

1. Target: the top network with `sampler` on its `grid` at `steps`, on the main batch. Its
   error is the target.
2. Single-network side: the cheapest run (modelled seconds) whose error is at most the
   target, among every network x `samplers` x `step_ladder`.
3. Multilevel side: a pilot batch with its own prior draws and its own reference. For every
   lower network as the base and every step count in `ml_step_ladder`, the fewest firings
   m of the top whose pilot error is at most the pilot's target (bisection). These
   candidates are run on the main batch in order of modelled seconds, and the first within
   1.1 times the single-network side's error there is the multilevel side: both sides are
   then the cheapest of their candidates that reach their limit on the main batch. Where
   none does, the cheapest candidate's m grows by half until it does (at m = N every step
   runs both networks, which is the top network's sampler plus a wasted base); the result
   says how many candidates were run and how many times m grew.

Costs: modelled seconds (evaluations x each level's seconds per sample, timed once at the
batch size), GFLOP (evaluations x XLA FLOPs), and, for the two sides, their own measured
seconds (the best of `repeats` rounds after compilation, the two sides interleaved in every
round). The error of a multilevel run averages `coin_plans` coin plans, one per slice of the
batch; its timing runs the whole batch on one plan, as a user would (every plan fires the top
exactly m times, so every plan costs the same). The speedup is the ratio of measured seconds.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import Multilevel
from mlem_jax._errors import InputError
from mlem_jax.diffusion.metrics import Estimate, coupled_error
from mlem_jax.diffusion.samplers import CALLS_PER_STEP, SAMPLERS
from mlem_jax.diffusion.sde import logsnr_grid, uniform_grid

SAMPLER_NAMES = {"ddim": "DDIM", "dpm++2m": "DPM-Solver++(2M)", "dpm++3m": "DPM-Solver++(3M)"}


class Run(NamedTuple):
    """One sampler run on a batch: what ran, its coupled error and its costs per sample."""

    levels: tuple  # family indices, cheapest first; one index: a single network
    sampler: str
    steps: int
    firings: int  # firings of the top level (multilevel), 0 for a single network
    error: Estimate
    evaluations: np.ndarray  # (len(levels),) per sample
    gflop: float  # per sample
    modelled_seconds: float  # per sample: evaluations x level seconds
    seconds: float = float("nan")  # measured for the whole batch (the two sides only)
    images: np.ndarray | None = None

    def describe(self, nfs: Sequence[int]) -> str:
        name = f"{SAMPLER_NAMES.get(self.sampler, self.sampler)}, {self.steps} steps"
        if len(self.levels) == 1:
            return f"{name}, nf={nfs[self.levels[0]]} only"
        return (f"multilevel {name}, nf={nfs[self.levels[0]]} + nf={nfs[self.levels[-1]]} "
                f"fired {self.firings} times")


class Comparison(NamedTuple):
    """The target run, the single-network side, the multilevel side, every single-network
    run, the pilot's multilevel runs, how often the firings grew on the main batch, each
    level's seconds and GFLOP per call, and the pilot's candidates run on the main batch."""

    target: Run
    single: Run
    multilevel: Run
    singles: list
    pilot: list
    stepped_up: int
    level_seconds: np.ndarray
    level_gflop: np.ndarray
    main_candidates: list = []

    @property
    def speedup(self) -> float:
        """Measured seconds of the single-network side over the multilevel side's."""
        return self.single.seconds / self.multilevel.seconds

    @property
    def flop_ratio(self) -> float:
        return self.single.gflop / self.multilevel.gflop


def _grid(sde, sampler: str, steps: int):
    return uniform_grid(steps) if sampler == "ddim" else logsnr_grid(sde, steps)


class _Batch:
    """Prior draws, the reference, and one compiled program per (levels, sampler, steps)."""

    def __init__(self, family, batch_size: int, seed: int, reference_steps: int, coin_plans: int,
                 programs: dict | None = None, denoisers: tuple | None = None):
        self.family, self.sde, self.plans = family, family.sde, coin_plans
        self.denoisers = denoisers or family.denoisers()
        keys = jax.random.split(jax.random.key(seed), batch_size)
        self.y0 = jax.vmap(lambda k: self.sde.prior_sample(k, tuple(family.image_shape)))(keys)
        # a class-conditional family samples sample i of class i mod C (every class, the same in every run)
        classes = getattr(family, "num_classes", 0) or 0
        self.labels = jnp.arange(batch_size) % classes if classes else None
        self.level_key = jax.random.key(seed + 1_000_003)
        self.programs = {} if programs is None else programs  # shared by batches: one compilation per shape
        top = len(self.denoisers) - 1
        ref = self.program((top,), "dpm++3m", reference_steps)
        self.reference = np.asarray(ref(self.y0, self.labels, None, None)[0])

    def program(self, levels: tuple, sampler: str, steps: int, coins: str = "stratified") -> Callable:
        key = (levels, sampler, steps) + (() if coins == "stratified" or len(levels) == 1 else (coins,))
        if key not in self.programs:
            ts = _grid(self.sde, sampler, steps)
            solve, sde = SAMPLERS[sampler], self.sde
            chosen = [self.denoisers[k] for k in levels]
            if len(levels) == 1:
                def one(y, label, lk, probs):
                    return solve(chosen[0], sde, y, ts, args=label), jnp.full((1,), CALLS_PER_STEP[sampler] * steps)
            else:
                def one(y, label, lk, probs):
                    sol = solve(Multilevel(chosen, probs, coins=coins, level_key=lk), sde, y, ts, args=label)
                    return sol.y, sol.evaluations

            labelled = 0 if self.labels is not None else None
            self.programs[key] = jax.jit(jax.vmap(one, in_axes=(0, labelled, None, None)))
        return self.programs[key]

    def images(self, levels: tuple, sampler: str, steps: int, firings: int, plans: int | None = None,
               coins: str = "stratified"):
        """(images, evaluations per sample): a multilevel run in `plans` chunks (default: the
        batch's), each its own coin plan. With stratified coins its cost does not depend on the
        plan (exactly `firings` of the top), so one plan for the whole batch is what a timing
        calls; with iid coins (probability firings / steps) `firings` is the expected count."""
        fn = self.program(levels, sampler, steps, coins)
        if len(levels) == 1:
            y, ev = fn(self.y0, self.labels, None, None)
            return y, np.asarray(ev[0], float)
        # p = m / N on every step with stratified coins: exactly m firings, one per stretch of N / m steps
        probs = jnp.array([1.0] + [firings / steps] * (len(levels) - 1))
        chunks = np.array_split(np.arange(self.y0.shape[0]), plans or self.plans)
        outs = [fn(self.y0[c], None if self.labels is None else self.labels[c], jax.random.fold_in(self.level_key, i),
                   probs) for i, c in enumerate(chunks)]
        y = jnp.concatenate([o[0] for o in outs])
        ev = sum(np.asarray(o[1][0], float) * len(c) for o, c in zip(outs, chunks))  # every chunk's counts, per sample
        return y, ev / self.y0.shape[0]


def level_seconds(denoisers, image_shape, batch_size: int, repeats: int = 3) -> np.ndarray:
    """Seconds per sample of one evaluation of each denoiser at `batch_size` (`level_costs`, median of
    `repeats`).

    Args:
      denoisers: the levels, each D(t, x, args) on one sample.
      image_shape: one sample's shape.
      batch_size: the batch at which they are timed.
      repeats: timed calls after the first.
    """
    from mlem_jax.calibrate import level_costs

    x = jnp.zeros((batch_size, *image_shape))
    vmapped = [jax.vmap(d, in_axes=(None, 0, None)) for d in denoisers]
    return level_costs(vmapped, 0.5, x, None, repeats=repeats, flops=False).seconds / batch_size


def compare_best_samplers(family, *, steps: int = 10, sampler: str = "dpm++2m", batch_size: int = 32,
                          pilot_size: int = 16, seed: int = 0, reference_steps: int = 100,
                          samplers: Sequence[str] = ("dpm++2m", "dpm++3m", "ddim"),
                          step_ladder: Sequence[int] = (5, 6, 8, 10, 12, 15, 20),
                          ml_step_ladder: Sequence[int] = (10, 15, 20, 30), coin_plans: int = 4,
                          repeats: int = 2, max_step_ups: int = 4, exhaustive: bool = True,
                          skip_far: float | None = None,
                          log: Callable[[str], None] = lambda s: None,
                          stage: Callable[[str], None] = lambda s: None,
                          tick: Callable[[], None] = lambda: None) -> Comparison:
    """The best single-network sampler against the best multilevel sampler at the coupled
    error of the top network with `sampler` at `steps` (see the module docstring).

    With `exhaustive=False`, runs that cannot change either side are skipped: a (network,
    sampler) stops climbing `step_ladder` at its first run that reaches the target or that
    costs as much as the target (which reaches it), and a bisection stops once every m left
    costs more than a multilevel candidate already found. Both sides are the same; the
    tables of `singles` and `pilot` are shorter. With `skip_far=c`, a lower network whose
    finest run cheaper than the target (with `sampler`) has an error above c x the target's is
    not searched further: a heuristic (a lower network's distance from the top is a floor that
    fewer steps rarely undercut), off by default.
    `stage(name)` is called as each stage starts and `tick()` after every sampler run: what
    a progress bar shows (`planned_runs` gives the total to expect).

    Args:
      family: a `Family` of at least two levels, cheapest first.
      steps: the target: the top network with `sampler` at this many steps.
      sampler: the target's sampler.
      batch_size: prior draws of the main batch.
      pilot_size: prior draws of the multilevel pilot batch.
      seed: of the main batch (the pilot's is seed + 1).
      reference_steps: DPM-Solver++(3M) log-SNR steps of the top network's reference ODE.
      samplers: the single-network side's samplers.
      step_ladder: the single-network side's step counts.
      ml_step_ladder: the multilevel side's step counts.
      coin_plans: coin plans per batch (each chunk of the batch its own).
      repeats: interleaved timings of both sides.
      max_step_ups: times the multilevel firings may grow on the main batch.
      exhaustive: run every candidate (False skips runs that cannot win).
      skip_far: skip a lower network whose affordable run errs above this multiple of the target.
      log: receives one line per notable event.
      stage: called with each stage's name.
      tick: called after every sampler run.
    """
    from mlem_jax.diffusion.unet import family_summary
    from mlem_jax.timing import time_pair

    _check_comparison(family, sampler, steps, batch_size, pilot_size, coin_plans)
    top = len(family.models) - 1
    gflop = np.array([s["gflop"] for s in family_summary(family.models, family.params, family.image_shape)])
    secs = level_seconds(family.denoisers(), tuple(family.image_shape), batch_size)
    run = _Runner(gflop, secs, tick)
    stage("reference")
    programs, denoisers = {}, family.denoisers()
    main = _Batch(family, batch_size, seed, reference_steps, coin_plans, programs, denoisers)
    stage("single networks")
    target = run(main, (top,), sampler, steps)
    log(f"target: the top network with {SAMPLER_NAMES[sampler]} at {steps} steps, coupled error "
        f"{target.error.value:.4f}")
    singles = _single_runs(run, main, family, target, samplers, step_ladder, exhaustive, skip_far, log)
    single = min((r for r in singles if r.error.value <= target.error.value), key=lambda r: r.modelled_seconds)
    stage("multilevel pilot")
    pilot = _Batch(family, pilot_size, seed + 1, reference_steps, coin_plans, programs, denoisers)
    goal = run(pilot, (top,), sampler, steps).error.value
    tried, best = _multilevel_bisections(run, pilot, top, sampler, ml_step_ladder, goal, secs, exhaustive)
    # none reached it (a family whose coin noise never falls that low): the closest one, which the main batch steps up
    candidates = sorted(best, key=lambda r: r.modelled_seconds) if best else [min(tried, key=lambda r: r.error.value)]
    nfs = [m.nf for m in family.models]
    log(f"pilot ({pilot_size} samples, target {goal:.4f}): {len(tried)} multilevel runs; {len(candidates)} "
        f"candidate(s), the cheapest {candidates[0].describe(nfs)} (pilot error {candidates[0].error.value:.4f})")
    stage("multilevel on the main batch")
    limit = 1.1 * single.error.value
    on_main = _candidates_on_main(run, main, candidates, limit, lambda c: c.describe(nfs), log)
    ml, stepped = on_main[-1], 0
    if ml.error.value > limit:  # none did: grow the cheapest one's firings
        ml, stepped = _step_up(run, main, candidates[0], limit, max_step_ups, log, on_main[0])
    stage("timing both sides")
    t_single, t_ml = time_pair(lambda: main.images(single.levels, single.sampler, single.steps, 0)[0],
                               lambda: main.images(ml.levels, ml.sampler, ml.steps, ml.firings, plans=1)[0],
                               repeats)
    return Comparison(target, single._replace(seconds=t_single), ml._replace(seconds=t_ml), singles, tried, stepped,
                      secs, gflop, on_main)


def _check_comparison(family, sampler, steps, batch_size, pilot_size, coin_plans) -> None:
    if len(family.models) < 2:
        raise InputError(f"family: the comparison needs at least two levels, got {len(family.models)}.")
    if sampler not in SAMPLER_NAMES:
        raise InputError(f"sampler: expected one of {sorted(SAMPLER_NAMES)}, got {sampler!r}.")
    for name, v, low in (("steps", steps, 2), ("batch_size", batch_size, 2), ("pilot_size", pilot_size, 2),
                         ("coin_plans", coin_plans, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise InputError(f"{name}: expected an integer of at least {low}, got {v!r}.")
    if batch_size % coin_plans or pilot_size % coin_plans:
        raise InputError(f"coin_plans: {coin_plans} must divide batch_size={batch_size} and pilot_size={pilot_size}.")


class _Runner:
    """One sampler run on a batch, measured: its coupled error against the batch's reference, its
    evaluations, modelled FLOPs and seconds (from the levels' costs); `tick` after each."""

    def __init__(self, gflop, secs, tick):
        self.gflop, self.secs, self.tick = gflop, secs, tick

    def __call__(self, batch: _Batch, levels: tuple, name: str, n: int, m: int = 0) -> Run:
        y, ev = batch.images(levels, name, n, m)
        idx = list(levels)
        out = Run(tuple(levels), name, n, m, coupled_error(y, batch.reference), ev, float(ev @ self.gflop[idx]),
                  float(ev @ self.secs[idx]), images=np.asarray(y))
        self.tick()
        return out


def _single_runs(run, main, family, target, samplers, step_ladder, exhaustive, skip_far, log) -> list:
    """The single-network side: every network x sampler x step count (fewer with `exhaustive=False` or
    `skip_far`), the target run first."""
    top, secs, sampler = len(family.models) - 1, run.secs, target.sampler
    singles = [target]
    for k in range(top + 1):
        if skip_far is not None and k < top:  # its finest affordable run first: is it anywhere near the target?
            n = max([n for n in step_ladder if CALLS_PER_STEP[sampler] * n * secs[k] < target.modelled_seconds],
                    default=None)
            if n is not None:
                probe = run(main, (k,), sampler, n)
                singles.append(probe)
                if probe.error.value > skip_far * target.error.value:
                    log(f"nf={family.models[k].nf} alone: coupled error {probe.error.value:.4f} at {n} steps, more "
                        f"than {skip_far:g} x the target; its other runs are skipped")
                    continue
        for s in samplers:
            for n in sorted(step_ladder):
                if not exhaustive and CALLS_PER_STEP[s] * n * secs[k] >= target.modelled_seconds:
                    break  # no cheaper than the target, which reaches the target
                done = [r for r in singles if (r.levels, r.sampler, r.steps) == ((k,), s, n)]
                r = done[0] if done else run(main, (k,), s, n)
                if not done:
                    singles.append(r)
                if not exhaustive and r.error.value <= target.error.value:
                    break
    return singles


def _multilevel_bisections(run, pilot, top, sampler, ml_step_ladder, goal, secs, exhaustive) -> tuple[list, list]:
    """(every pilot run, the least-m run meeting `goal` of each base and step count): a bisection on the
    top's firings m, whose error falls with m."""
    tried, best = [], []
    calls = CALLS_PER_STEP[sampler]
    for base in range(top):
        for n in sorted(ml_step_ladder):
            lo, hi, found = 1, n, None
            while lo <= hi:
                cheapest = min((b.modelled_seconds for b in best), default=math.inf)
                if not exhaustive and calls * (n * secs[base] + lo * secs[top]) >= cheapest:
                    break  # every m left costs more than a candidate already found
                m = (lo + hi) // 2
                r = run(pilot, (base, top), sampler, n, m)
                tried.append(r)
                if r.error.value <= goal:
                    found, hi = r, m - 1
                else:
                    lo = m + 1
            if found is not None:
                best.append(found)
    return tried, best


def _candidates_on_main(run, main, candidates: list, limit: float, describe, log) -> list:
    """The pilot's `candidates` (cheapest first) run on the main batch until one errs at most `limit`:
    the runs, the last the one that reached it unless none did."""
    on_main = []
    for c in candidates:
        on_main.append(run(main, c.levels, c.sampler, c.steps, c.firings))
        if on_main[-1].error.value <= limit:
            break
        log(f"  main batch: {describe(c)} errs {on_main[-1].error.value:.4f} > {limit:.4f}")
    return on_main


def _step_up(run, main, choice, limit: float, max_step_ups: int, log, first: Run | None = None) -> tuple:
    """The pilot's choice on the main batch (`first`, when it has run there), its firings grown 1.5x
    while its error exceeds `limit` (at most `max_step_ups` times, m up to N): (run, times grown)."""
    stepped, m = 0, choice.firings
    while True:
        fresh = first is None or stepped > 0
        ml = run(main, choice.levels, choice.sampler, choice.steps, m) if fresh else first
        if ml.error.value <= limit or m >= choice.steps or stepped >= max_step_ups:
            return ml, stepped
        stepped += 1
        m = min(choice.steps, math.ceil(1.5 * m))
        log(f"  main batch: multilevel error {ml.error.value:.4f} > {limit:.4f}; {m} firings")


def planned_runs(family, *, steps: int = 10, sampler: str = "dpm++2m",
                 samplers: Sequence[str] = ("dpm++2m", "dpm++3m", "ddim"),
                 step_ladder: Sequence[int] = (5, 6, 8, 10, 12, 15, 20),
                 ml_step_ladder: Sequence[int] = (10, 15, 20, 30), **_) -> int:
    """At most how many sampler runs `compare_best_samplers` makes with these arguments before
    any step-up (exactly that many with `exhaustive=True`, less where a bisection ends early):
    the total of a progress bar.

    Args:
      family: as in `compare_best_samplers`.
      steps: as in `compare_best_samplers`.
      sampler: as in `compare_best_samplers`.
      samplers: as in `compare_best_samplers`.
      step_ladder: as in `compare_best_samplers`.
      ml_step_ladder: as in `compare_best_samplers`.
    """
    top = len(family.models) - 1
    singles = len(family.models) * len(samplers) * len(set(step_ladder))
    singles += 0 if (sampler in samplers and steps in step_ladder) else 1  # the target
    bisections = sum(math.floor(math.log2(n)) + 1 for n in ml_step_ladder)
    return singles + 1 + top * bisections + 1  # + the pilot's target, + the main batch's first candidate
