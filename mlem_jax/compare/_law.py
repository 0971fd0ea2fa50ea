"""The law behind the equal-error comparisons, fitted on short pilots, and the gain it predicts.

For a single network k with sampler s at N steps, the pathwise mean squared error against the
reference (the truth, or the top network's fine ODE) is modelled as

    e^2(k, s, N) = F_k^2 + C_{k,s}^2 N^(-2 p_s),

F_k the network's floor (its own fine ODE against the reference), C_{k,s} / N^p_s the
discretisation error of s. For a multilevel run with base b and top K, the top fired m times
(stratified coins) in N steps with sampler s,

    e^2(b, s, N, m) = F_K^2 + C_{K,s}^2 N^(-2 p_s) + c_b^2 m^(-r),

the last term the coin noise of the correction D^K - D^b, which depends on m and hardly on N.
Every constant is fitted on pilots: a fine run and two short runs per network and sampler, and
two firing counts per base. The cost of a run is its calls x each level's cost (FLOPs or
seconds). `predict` searches both sides on the law, as the measured comparisons do on real
runs, and gives the gain with a bootstrap interval over the pilots' samples.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from mlem_jax._errors import InputError

STEPS = tuple(range(2, 65))  # the step counts a prediction searches


class Pilots(NamedTuple):
    """Per-sample squared errors (each (B,), the same B prior draws everywhere) of the pilot runs:
    `floors[k]`, `singles[(k, s, N)]`, `multilevel[(b, s, N, m)]` (top = the last level)."""

    floors: dict
    singles: dict
    multilevel: dict


class Law(NamedTuple):
    """The fitted constants: floors F_k (K,), per sampler p_s and C_{k,s} (K,), per base c_b and r."""

    floors: np.ndarray
    p: dict
    C: dict
    coin: np.ndarray
    r: float


class Choice(NamedTuple):
    """The cheapest run the law says reaches the target: levels, sampler, steps, firings, cost and the
    predicted RMS error."""

    levels: tuple
    sampler: str
    steps: int
    firings: int
    cost: float
    error: float


class Prediction(NamedTuple):
    """The law's best single-network run and best multilevel run at `target`, the predicted gain
    (single cost / multilevel cost; None when no multilevel run is cheaper) and its bootstrap interval
    (`low`, `high`: the `level` central interval over pilot samples; None where a replica has none)."""

    target: float
    single: Choice | None
    multilevel: Choice | None
    gain: float | None
    low: float | None
    high: float | None
    level: float


def run_pilots(measure: Callable, num_levels: int, samplers: Sequence[str], *, fine_steps: int = 50,
               pilot_steps: Sequence[int] = (4, 8), ml_sampler: str | None = None, ml_steps: int = 12,
               ml_firings: Sequence[int] = (2, 6), tick: Callable[[], None] = lambda: None) -> Pilots:
    """Run the pilots through `measure(levels, sampler, steps, firings) -> (B,) squared errors per sample`
    (mean over the sample's components): every level's floor (its first sampler at `fine_steps`), every
    level x sampler at `pilot_steps`, and every base with the top at `ml_steps` with each of `ml_firings`."""
    if num_levels < 2:
        raise InputError(f"num_levels: the law needs at least two levels, got {num_levels}.")
    if len(pilot_steps) < 2 or len(ml_firings) < 2:
        raise InputError("pilot_steps, ml_firings: the law fits two constants from each, give at least two values.")
    ml_sampler = ml_sampler or samplers[0]
    top = num_levels - 1

    def m(*a):
        out = np.asarray(measure(*a), np.float64)
        tick()
        return out

    floors = {k: m((k,), samplers[0], fine_steps, 0) for k in range(num_levels)}
    singles = {(k, s, n): m((k,), s, n, 0) for k in range(num_levels) for s in samplers for n in pilot_steps}
    for n in pilot_steps:  # the top's discretisation at ml_steps comes from the law; the pilots fit it
        singles.setdefault((top, ml_sampler, n), m((top,), ml_sampler, n, 0))
    multilevel = {(b, ml_sampler, ml_steps, f): m((b, top), ml_sampler, ml_steps, f)
                  for b in range(top) for f in ml_firings}
    singles.setdefault((top, ml_sampler, ml_steps), m((top,), ml_sampler, ml_steps, 0))
    return Pilots(floors, singles, multilevel)


def fit_law(pilots: Pilots, index: np.ndarray | None = None) -> Law:
    """The constants of the law from the pilots' mean squared errors (over the samples `index`, all by
    default: a bootstrap replica passes a resample)."""
    mean = (lambda v: float(np.mean(v))) if index is None else (lambda v: float(np.mean(v[index])))
    K = len(pilots.floors)
    floor2 = np.array([mean(pilots.floors[k]) for k in range(K)])
    samplers = sorted({s for (_, s, _) in pilots.singles})
    p, C = {}, {}
    for s in samplers:
        steps = sorted({n for (k, s2, n) in pilots.singles if s2 == s and k == K - 1})
        excess = [max(mean(pilots.singles[(K - 1, s, n)]) - floor2[K - 1], 1e-12) for n in steps]
        # p from the top network's two coarsest step counts, where discretisation dominates
        p[s] = max(0.25, -0.5 * math.log(excess[1] / excess[0]) / math.log(steps[1] / steps[0]))
        C[s] = np.array([
            math.sqrt(np.median([max(mean(pilots.singles[(k, s, n)]) - floor2[k], 1e-12) * n ** (2 * p[s])
                                 for (k2, s2, n) in pilots.singles if k2 == k and s2 == s]))
            for k in range(K)])
    keys = sorted(pilots.multilevel)
    ml_sampler, ml_steps = keys[0][1], keys[0][2]
    top_disc = C[ml_sampler][K - 1] ** 2 * ml_steps ** (-2 * p[ml_sampler])
    coin, rs = np.zeros(K - 1), []
    for b in range(K - 1):
        fs = sorted(f for (b2, _, _, f) in keys if b2 == b)
        ex = [max(mean(pilots.multilevel[(b, ml_sampler, ml_steps, f)]) - floor2[K - 1] - top_disc, 1e-12)
              for f in fs]
        rs.append(-math.log(ex[-1] / ex[0]) / math.log(fs[-1] / fs[0]))
        coin[b] = math.sqrt(ex[0] * fs[0] ** max(rs[-1], 0.5))
    r = float(np.clip(np.median(rs), 0.5, 3.0))
    for b in range(K - 1):  # refit each c_b at the shared r
        fs = sorted(f for (b2, _, _, f) in keys if b2 == b)
        ex = [max(mean(pilots.multilevel[(b, ml_sampler, ml_steps, f)]) - floor2[K - 1] - top_disc, 1e-12)
              for f in fs]
        coin[b] = math.sqrt(float(np.exp(np.mean([math.log(e * f ** r) for e, f in zip(ex, fs)]))))
    return Law(np.sqrt(floor2), p, C, coin, r)


def law_error(law: Law, levels: tuple, sampler: str, steps: int, firings: int = 0) -> float:
    """The RMS error the law gives a run."""
    top = levels[-1]
    e2 = law.floors[top] ** 2 + law.C[sampler][top] ** 2 * steps ** (-2 * law.p[sampler])
    if len(levels) > 1:
        e2 += law.coin[levels[0]] ** 2 * firings ** (-law.r)
    return math.sqrt(e2)


def cheapest(law: Law, target: float, costs: np.ndarray, calls: dict, ml_sampler: str,
             max_cost: float = math.inf) -> tuple[Choice | None, Choice | None]:
    """(best single run, best multilevel run cheaper than the single one) on the law."""
    K = len(law.floors)
    single = None
    for k in range(K):
        for s in law.p:
            for n in STEPS:
                cost = calls[s] * n * costs[k]
                if single is not None and cost >= single.cost:
                    break
                e = law_error(law, (k,), s, n)
                if e <= target:
                    single = Choice((k,), s, n, 0, cost, e)
                    break
    cap = min(max_cost, single.cost if single is not None else math.inf)
    ml = None
    for b in range(K - 1):
        for n in STEPS:
            base = calls[ml_sampler] * n * costs[b]
            if base >= cap:
                break
            disc = law.floors[K - 1] ** 2 + law.C[ml_sampler][K - 1] ** 2 * n ** (-2 * law.p[ml_sampler])
            room = target ** 2 - disc
            if room <= 0:
                continue
            m = max(1, math.ceil((law.coin[b] ** 2 / room) ** (1.0 / law.r)))
            if m > n:
                continue
            cost = base + calls[ml_sampler] * m * costs[K - 1]
            if cost < cap:
                ml, cap = Choice((b, K - 1), ml_sampler, n, m, cost, law_error(law, (b, K - 1), ml_sampler, n, m)), cost
    return single, ml


def predict(pilots: Pilots, target: float, costs: Sequence[float], calls: dict, *, replicas: int = 200,
            level: float = 0.8, seed: int = 0) -> Prediction:
    """The law's gain at `target` (an RMS error), with a bootstrap interval: the pilots' samples
    resampled `replicas` times (the same resample for every run: they share their prior draws), the law
    refitted and both sides searched again."""
    costs = np.asarray(costs, np.float64)
    ml_sampler = sorted(pilots.multilevel)[0][1]
    law = fit_law(pilots)
    single, ml = cheapest(law, target, costs, calls, ml_sampler)
    gain = None if (single is None or ml is None) else single.cost / ml.cost
    size = len(next(iter(pilots.floors.values())))
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(replicas):
        s, m = cheapest(fit_law(pilots, rng.integers(0, size, size)), target, costs, calls, ml_sampler)
        gains.append(np.nan if (s is None or m is None) else s.cost / m.cost)
    gains = np.asarray(gains)
    low = high = None
    if gain is not None and np.all(np.isfinite(gains)):
        low, high = (float(q) for q in np.quantile(gains, [(1 - level) / 2, (1 + level) / 2]))
    elif gain is not None:  # some replicas found no cheaper multilevel run: the interval reaches 1 or below
        finite = gains[np.isfinite(gains)]
        low, high = min(1.0, float(np.min(finite, initial=1.0))), float(np.quantile(finite, (1 + level) / 2)) \
            if finite.size else 1.0
    return Prediction(target, single, ml, gain, low, high, level)
