"""The law behind the equal-error comparisons, fitted on short pilots, and the gain it predicts.

For a single network k with sampler s at N steps, the pathwise mean squared error against the
reference (the truth, or the top network's fine ODE) is modelled as

    e^2(k, s, N) = F_k^2 + C_{k,s}^2 N^(-2 p_s),

F_k the network's floor (its own fine ODE against the reference), C_{k,s}^2 N^(-2 p_s) the excess of
the N-step run over it: the squared distance of the N-step run from the same network's fine run
(same prior draws), plus twice its inner product with the fine run's own error where the pilots
resolve that cross term (the two errors are not orthogonal; on the exact testbed the cross term
decided which single run reached 1.1-1.25x the floor). Between the pilots' step counts the law
follows their measured points, so that it gives a pilot run exactly the error it measured. For a
multilevel run with base b and top K, the top fired m times
(stratified coins) in N steps with sampler s,

    e^2(b, s, N, m) = F_K^2 + C_{K,s}^2 N^(-2 p_s) + c_b^2 (1/m - 1/N)^r N^(-u),

the last term the coin noise of the correction D^K - D^b: the RMS distance of the multilevel run
from the top alone at the same N. With iid coins at p = m/N its linearised variance is
h^2 sum_n V (1/p - 1), which is proportional to 1/m - 1/N (r = 1, u = 0) and vanishes at m = N;
stratified coins fall faster, and with N as well, since each firing stands for a shorter stretch of
the path (r and u are fitted on two step counts). iid coins get a term of their own,
c_b,iid^2 (1/m - 1/N)^r_iid, m the expected firings, with r_iid fitted too: at few firings one large
correction (weight N/m) bends the path, and the noise grows faster than the linearised 1/m (on the
exact testbed at N = 24 the ratio of the noise to 1/m - 1/N is 0.49, 0.15 and 0.10 at m = 2, 4, 8).
The three terms are taken as uncorrelated. Every constant is fitted on pilots (every distance is
paired, sample by sample): a fine run and five short runs per network and sampler, and four firing
counts per base and step count (m = 2, 4, 6, 8: the coin noise is not one power of 1/m - 1/N from 2
firings, where one large correction bends the path, to 8; on the exact testbed, adding m = 6 moved
the law's error at the measured run from 0.1508 to 0.1479, against 0.1467 measured on the same
draws).
The cost of a run is its calls x each level's cost (FLOPs or seconds). `predict` searches both
sides on the law, as the measured comparisons do on real runs (on their step ladders when given),
and gives the gain with an interval from refits on resampled pilots, each leaving out one pilot
step or firing count in turn (`law_variants`), so that the interval holds some of the law's own
error as well as the pilots' noise, and, for a measurement on other draws, that measurement's
noise too (`measured_size`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from mlem_jax._errors import InputError

MAX_STEPS = 64  # the most steps a prediction considers; the fewest are the pilots' fewest (no extrapolation)
SETTLED = 0.8  # the share of bootstrap replicas that must agree with the law on all the pilots for a verdict
ML_EXTRAPOLATION = 1.5  # multilevel runs up to this multiple of the coin pilots' most steps, no further


class Pilots(NamedTuple):
    """Per-sample squared distances (each (B,), mean over a sample's components, the same B prior draws
    everywhere): `floors[k]` (level k's fine run to the reference), `discretisation[(k, s, N)]` (the
    N-step run to level k's fine run), `coins[(b, s, N, m)]` (the multilevel run to the top alone at
    N steps; top = the last level), `cross[(k, s, N)]`, the inner product of the N-step run's
    discretisation error with the fine run's own error (y_N - fine) . (fine - reference): the run's
    squared error is floor + discretisation + 2 cross, sample by sample; and `iid_coins[(b, s, N, m)]`,
    as `coins` with iid coins of probability m / N (m firings on average). With a user's distribution
    metric, `metrics[(levels, sampler, steps, firings, coins)]` is (the metric of the run's samples, its
    mean squared error against the reference) for every pilot run: what `metric_law` fits."""

    floors: dict
    discretisation: dict
    coins: dict
    cross: dict = {}
    iid_coins: dict = {}
    metrics: dict = {}


class Law(NamedTuple):
    """The fitted constants: floors F_k (K,), per sampler p_s and C_{k,s} (K,), per base c_b and its
    exponents r_b and u_b (arrays (K - 1,), or one number for every base).
    `measured[(k, s)]`: the pilots' (log N, log squared distance) points, which the law follows between
    them (piecewise linear in log-log; beyond the last, along p_s): the discretisation error of a few
    steps is rarely one power of N. `iid_coin`: per base c_b,iid of iid coins, with exponent `iid_r`
    (u = 0; empty when the pilots ran none)."""

    floors: np.ndarray
    p: dict
    C: dict
    coin: np.ndarray
    r: np.ndarray | float
    u: np.ndarray | float = 0.0
    measured: dict = {}
    iid_coin: np.ndarray = np.zeros(0)
    iid_r: np.ndarray | float = 1.0


class Choice(NamedTuple):
    """The cheapest run the law says reaches the target: levels, sampler, steps, firings (expected, with
    iid coins), cost and the predicted RMS error, and the coins of a multilevel run."""

    levels: tuple
    sampler: str
    steps: int
    firings: int
    cost: float
    error: float
    coins: str = "stratified"


class Prediction(NamedTuple):
    """The law's best single-network run and best multilevel run at `target`, the predicted gain
    (single cost / multilevel cost; None when no multilevel run is cheaper) and its bootstrap interval
    (`low`, `high`: the `level` central interval over pilot samples; None where a replica has none), and
    `pays`: the share of bootstrap replicas in which a multilevel run is cheaper. Near a target where
    the cheapest run changes (one step more or less), the gain jumps, and `pays` says how settled the
    verdict is: `verdict` is "unsettled" unless at least `SETTLED` of the replicas agree with the law."""

    target: float
    single: Choice | None
    multilevel: Choice | None
    gain: float | None
    low: float | None
    high: float | None
    level: float
    pays: float = float("nan")

    @property
    def verdict(self) -> str:
        """"pays", "does not pay", or "unsettled": settled only where the law on all the pilots and at least
        `SETTLED` of the bootstrap replicas agree (a share near a threshold, where one step more or less
        flips the cheapest run, is pilot noise, not an answer)."""
        if not math.isfinite(self.pays):
            return "does not pay" if self.gain is None else "pays"
        if self.gain is not None and self.pays >= SETTLED:
            return "pays"
        if self.gain is None and 1.0 - self.pays >= SETTLED:
            return "does not pay"
        return "unsettled"


def run_pilots(outputs: Callable, reference, num_levels: int, samplers: Sequence[str], *, fine_steps: int = 50,
               pilot_steps: Sequence[int] = (5, 6, 8, 10, 12), ml_sampler: str | None = None,
               ml_steps: Sequence[int] = (12, 24), ml_firings: Sequence[int] = (2, 4, 6, 8),
               iid_firings: Sequence[int] = (), metric: Callable | None = None,
               tick: Callable[[], None] = lambda: None) -> Pilots:
    """Run the pilots through `outputs(levels, sampler, steps, firings) -> (B, ...)` samples from the
    same B prior draws every time: every level's fine run (its first sampler at `fine_steps`; against
    `reference`, the truth or the top's fine run), every level x sampler at `pilot_steps`, and every
    base with the top at each of `ml_steps` with each of `ml_firings` (below the steps), with
    stratified coins; with `iid_firings`, also every base at the most `ml_steps` with iid coins of
    probability m / N for each m, through `outputs(levels, sampler, steps, m, coins="iid")`.

    Args:
      outputs: `outputs(levels, sampler, steps, firings)` -> samples from the same prior draws.
      reference: the samples to measure floors against (the truth, or the top's fine run).
      num_levels: K.
      samplers: the samplers whose discretisation is fitted.
      fine_steps: steps of each level's fine run.
      pilot_steps: the short runs' steps (at least two).
      ml_sampler: the multilevel pilots' sampler (default the first).
      ml_steps: the multilevel pilots' steps.
      ml_firings: the multilevel pilots' firings of the top (at least two).
      iid_firings: the iid-coin pilots' expected firings of the top (none by default; two or more fit
        r_iid as well, one keeps the linearised r_iid = 1).
      metric: optionally a distribution metric of a run's (B, ...) samples (lower is better; an MMD,
        a Frechet distance): recorded for every pilot run beside its squared error, so that a target
        in that metric can be turned into a pathwise one (`metric_law`).
      tick: called after every pilot run.
    """
    if num_levels < 2:
        raise InputError(f"num_levels: the law needs at least two levels, got {num_levels}.")
    if len(pilot_steps) < 2 or len(ml_firings) < 2:
        raise InputError("pilot_steps, ml_firings: the law fits two constants from each, give at least two values.")
    ml_sampler = ml_sampler or samplers[0]
    top = num_levels - 1
    flat = lambda y: np.asarray(y, np.float64).reshape(np.shape(y)[0], -1)
    reference = flat(reference)
    dist2 = lambda a, b: np.mean((a - b) ** 2, axis=1)

    metrics = {}

    def run(*a, **kw):
        raw = outputs(*a, **kw)
        y = flat(raw)
        if metric is not None:
            metrics[tuple(a) + (kw.get("coins", "stratified"),)] = (float(metric(raw)),
                                                                    float(np.mean(dist2(y, reference))))
        tick()
        return y

    fine = {k: run((k,), samplers[0], fine_steps, 0) for k in range(num_levels)}
    floors = {k: dist2(fine[k], reference) for k in range(num_levels)}
    short = {(k, s, n): run((k,), s, n, 0) for k in range(num_levels) for s in samplers for n in pilot_steps}
    for n in ml_steps:
        if (top, ml_sampler, n) not in short:
            short[(top, ml_sampler, n)] = run((top,), ml_sampler, n, 0)
    discretisation = {key: dist2(y, fine[key[0]]) for key, y in short.items()}
    cross = {key: np.mean((y - fine[key[0]]) * (fine[key[0]] - reference), axis=1) for key, y in short.items()}
    coins = {(b, ml_sampler, n, f): dist2(run((b, top), ml_sampler, n, f), short[(top, ml_sampler, n)])
             for b in range(top) for n in ml_steps for f in ml_firings if f < n}
    iid, n = {}, max(ml_steps)
    for b in range(top):
        for f in (f for f in iid_firings if f < n):
            iid[(b, ml_sampler, n, f)] = dist2(run((b, top), ml_sampler, n, f, coins="iid"),
                                               short[(top, ml_sampler, n)])
    return Pilots(floors, discretisation, coins, cross, iid, metrics)


def merge_pilots(*batches: Pilots) -> Pilots:
    """The pilots of several batches of prior draws as one, on all their draws: each run's per-sample
    values concatenated (pilots on more draws, where a verdict is unsettled). Every batch must hold the
    same runs.

    Args:
      *batches: `Pilots` of the same runs on separate prior draws.
    """
    if not batches:
        raise InputError("batches: give at least one Pilots.")
    first = batches[0]
    for i, b in enumerate(batches[1:], 1):
        for field in Pilots._fields:
            if set(getattr(b, field)) != set(getattr(first, field)):
                raise InputError(f"batches: batch {i} holds other {field} runs than batch 0; run the same pilots "
                                 "(the same levels, samplers, steps and firings) on every batch.")
    sizes = np.array([len(next(iter(b.floors.values()))) for b in batches], np.float64)
    merged = {field: {k: np.concatenate([getattr(b, field)[k] for b in batches]) for k in getattr(first, field)}
              for field in Pilots._fields if field != "metrics"}
    # a distribution metric is not per sample: each batch's value, averaged (weighted by the batch's draws)
    merged["metrics"] = {k: tuple(np.average([b.metrics[k] for b in batches], axis=0, weights=sizes).tolist())
                         for k in first.metrics}
    return Pilots(**merged)


def _pooled_power(groups: dict, fallback: float) -> tuple[float, dict]:
    """Fit y = a_g - q x with one slope q over every group and an intercept a_g per group, on the points
    each group holds ((x, y, weight) triples); `fallback` when no group has two points. Returns
    (q, {group: a_g}); a group without points gets the intercept that its one point, or nothing, gives."""
    xs, ys, ws, gs = [], [], [], []
    for g, pts in groups.items():
        for x, y, w in pts:
            xs.append(x), ys.append(y), ws.append(w), gs.append(g)
    multi = [g for g, pts in groups.items() if len(pts) >= 2]
    q = fallback
    if multi:  # the slope from the centred points of groups with two or more
        num = den = 0.0
        for g in multi:
            x, y, w = (np.array(v, np.float64) for v in zip(*groups[g]))
            xm, ym = np.average(x, weights=w), np.average(y, weights=w)
            num += np.sum(w * (x - xm) * (y - ym))
            den += np.sum(w * (x - xm) ** 2)
        q = -num / den if den > 0 else fallback
    intercepts = {}
    for g, pts in groups.items():
        if pts:
            x, y, w = (np.array(v, np.float64) for v in zip(*pts))
            intercepts[g] = float(np.average(y + q * x, weights=w))
    return q, intercepts


def _weight(mean: float, se: float) -> float:
    """The weight of a log mean in a fit: (mean / s.e.)^2, at most 1e4 (a resample of one sample has no
    spread at all)."""
    return 1e4 if se <= mean * 1e-2 else (mean / se) ** 2


def _power_groups(values: dict, index, z: float) -> dict:
    """{group: [(log x, log mean, weight)]} of the squared distances `values[(group, x)]` whose mean is
    above `z` standard errors (the others are noise, not a trend)."""
    groups = {}
    for (g, x), v in values.items():
        d = v if index is None else v[index]
        mean, se = float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d)))
        groups.setdefault(g, [])
        if mean > z * se:
            groups[g].append((math.log(x), math.log(mean), _weight(mean, se)))
    return groups


def _excess(pilots: Pilots, index, z: float) -> dict:
    """Each short run's squared error above its level's floor, per sample (over `index`): the
    discretisation distance, plus twice its cross term with the network's own error where that term
    is resolved (its mean beyond `z` standard errors). The two errors are not orthogonal: on the exact
    testbed the cross term decided which single run reaches 1.1-1.25x the floor. An unresolved cross
    term is left out, since its noise (about the floor x the distance) would swamp a small distance."""
    out = {}
    for key, d in pilots.discretisation.items():
        d = d if index is None else d[index]
        c = pilots.cross.get(key)
        if c is not None:
            c = c if index is None else c[index]
            if abs(float(np.mean(c))) > z * float(np.std(c, ddof=1)) / math.sqrt(len(c)):
                d = d + 2.0 * c
        out[key] = d
    return out


def fit_law(pilots: Pilots, index: np.ndarray | None = None, z: float = 2.0) -> Law:
    """The constants of the law from the pilots (over the samples `index`, all by default: a bootstrap
    replica passes a resample): in log-log, one exponent per sampler (p), shared over the levels, and
    one constant per level; per base, the coins' constant and exponents (r, u; `_fit_coins`); only
    distances above `z` standard errors enter, and p falls back to 1 and r to 2 (stratified coins) when
    no level resolves two points.

    Args:
      pilots: the `Pilots`.
      index: the samples to use (a bootstrap resample; default all).
      z: the standard errors a distance must exceed to enter a fit.
    """
    K = len(pilots.floors)
    floor2 = np.array([float(np.mean(pilots.floors[k] if index is None else pilots.floors[k][index]))
                       for k in range(K)])
    p, C, measured = {}, {}, {}
    excess = _excess(pilots, index, z)
    for s in sorted({s for (_, s, _) in pilots.discretisation}):
        groups = _power_groups({(k, n): v for (k, s2, n), v in excess.items() if s2 == s}, None, z)
        q, a = _pooled_power(groups, 2.0)
        p[s] = max(0.25, q / 2)
        C[s] = np.array([math.exp(a[k] / 2) if k in a else 0.0 for k in range(K)])
        for k, pts in groups.items():
            if len(pts) >= 2:
                xs, ys, _ = zip(*sorted(pts))
                measured[(k, s)] = (np.array(xs), np.array(ys))
    coin, r, u = _fit_coins(pilots.coins, index, z, K, 2.0)
    iid_coin, iid_r, _ = _fit_coins(pilots.iid_coins, index, z, K if pilots.iid_coins else 1, 1.0)
    return Law(np.sqrt(floor2), p, C, coin, r, u, measured, iid_coin, iid_r)


def _fit_coins(values: dict, index, z: float, K: int, fallback_r: float) -> tuple[np.ndarray, np.ndarray,
                                                                                  np.ndarray]:
    """(c_b, r_b, u_b) for each of the K - 1 bases: log Q^2 = log c_b^2 + r_b log(1/m - 1/N) - u_b log N on
    the coin pilots `values[(b, s, N, m)]` above `z` standard errors, by weighted least squares. First one
    r and u pooled over the bases (one intercept each); then each base that resolves three points over
    two values of 1/m - 1/N gets its own r_b (and u_b where it has two step counts): each correction
    D^K - D^b bends the path in its own way (on the five-level family at 12 steps, nf 8's noise over
    1/m - 1/N is 17.6 at m = 2 and 0.55 at m = 4; nf 16's and nf 32's stay within 0.04-0.18). A base
    with fewer keeps the pooled exponents. r is clipped to [0.5, 3] and u to [-1, 3]; u needs two step
    counts and r two values of 1/m - 1/N (else u = 0, r = `fallback_r`). A base with no resolved
    distance gets c_b = inf."""
    rows, ys, ws, bases = [], [], [], sorted({b for (b, _, _, _) in values})
    for (b, _, n, f), v in values.items():
        d = v if index is None else v[index]
        mean, se = float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d)))
        if f < n and mean > z * se:
            rows.append([math.log(1.0 / f - 1.0 / n), -math.log(n)] + [float(b == g) for g in bases])
            ys.append(math.log(mean))
            ws.append(math.sqrt(_weight(mean, se)))
    # a base none of whose distances is resolved has an unknown coin noise, not a zero one: a mean within
    # z standard errors of 0 comes from a few large distances among small ones (a heavy tail), since a
    # small noise on every draw is resolved; such a base gets c_b = inf and is never a multilevel base
    coin, r, u = np.full(K - 1, np.inf), np.full(K - 1, fallback_r), np.zeros(K - 1)

    def solve(mine, intercepts):
        A, y, w = np.array([rows[j] for j in mine]), np.array([ys[j] for j in mine]), np.array([ws[j] for j in mine])
        used = [0] if len({row[0] for row in A.tolist()}) > 1 else []
        used += [1] if len({row[1] for row in A.tolist()}) > 1 else []  # u needs two step counts
        sol = np.linalg.lstsq(A[:, used + intercepts] * w[:, None], y * w, rcond=None)[0]
        return (float(np.clip(sol[used.index(0)], 0.5, 3.0)) if 0 in used else fallback_r,
                float(np.clip(sol[used.index(1)], -1.0, 3.0)) if 1 in used else 0.0)

    if rows:
        pooled = solve(range(len(rows)), [2 + i for i in range(len(bases))])
        for i, b in enumerate(bases):
            mine = [j for j, row in enumerate(rows) if row[2 + i] == 1.0]
            if not mine:
                continue
            own = len(mine) >= 3 and len({rows[j][0] for j in mine}) > 1
            r[b], u[b] = solve(mine, [2 + i]) if own else pooled
            # c_b at the clipped exponents
            coin[b] = math.exp(0.5 * float(np.average(
                [ys[j] - r[b] * rows[j][0] - u[b] * rows[j][1] for j in mine], weights=[ws[j] for j in mine])))
    return coin, r, u


def discretisation(law: Law, k: int, sampler: str, steps: int) -> float:
    """The squared discretisation distance of level k with `sampler` at `steps`: through the pilots'
    points where there are two or more (log-log linear between them, along p beyond the last, along the
    first segment below the first), else C_{k,s}^2 N^-2p."""
    pts = law.measured.get((k, sampler))
    if pts is None:
        return law.C[sampler][k] ** 2 * steps ** (-2 * law.p[sampler])
    xs, ys = pts
    x = math.log(steps)
    if x > xs[-1]:
        return math.exp(ys[-1] - 2 * law.p[sampler] * (x - xs[-1]))
    if x < xs[0]:
        slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
        return math.exp(ys[0] + slope * (x - xs[0]))
    return math.exp(float(np.interp(x, xs, ys)))


def coin_noise(law: Law, base: int, steps: int, firings: float, coins: str = "stratified") -> float:
    """The squared coin noise the law gives a multilevel run with `base`: c_b^2 (1/m - 1/N)^r N^-u with
    stratified coins, c_b,iid^2 (1/m - 1/N)^r_iid with iid coins (m their expected firings).

    Args:
      law: the fitted `Law`.
      base: b, the base level.
      steps: N.
      firings: m, the top's firings (expected, with iid coins); none at m >= N.
      coins: "stratified" or "iid".
    """
    if firings >= steps:
        return 0.0
    if coins == "iid":
        if not len(law.iid_coin):
            raise InputError("coins: the law has no iid-coin constants; run the pilots with iid_firings.")
        return law.iid_coin[base] ** 2 * (1.0 / firings - 1.0 / steps) ** _of(law.iid_r, base)
    return law.coin[base] ** 2 * (1.0 / firings - 1.0 / steps) ** _of(law.r, base) * steps ** (-_of(law.u, base))


def _of(exponent, base: int) -> float:
    """A base's exponent: one per base, or one for all."""
    return float(exponent[base]) if np.ndim(exponent) else float(exponent)


def law_error(law: Law, levels: tuple, sampler: str, steps: int, firings: int = 0, coins: str = "stratified") -> float:
    """The RMS error the law gives a run.

    Args:
      law: the fitted `Law`.
      levels: (k,) for one network, (b, K) for a multilevel run.
      sampler: the sampler.
      steps: N.
      firings: m, the top's firings (multilevel; expected firings with iid coins).
      coins: "stratified" or "iid" (multilevel).
    """
    top = levels[-1]
    e2 = law.floors[top] ** 2 + discretisation(law, top, sampler, steps)
    if len(levels) > 1:
        e2 += coin_noise(law, levels[0], steps, firings, coins)
    return math.sqrt(e2)


def cheapest(law: Law, target: float, costs: np.ndarray, calls: dict, ml_sampler: str, min_steps: int = 2,
             max_cost: float = math.inf, ml_min_steps: int | None = None, steps: Sequence[int] | None = None,
             ml_steps: Sequence[int] | None = None, coins: Sequence[str] | None = None,
             ml_max_steps: int = MAX_STEPS) -> tuple[Choice | None, Choice | None]:
    """(best single run, best multilevel run cheaper than the single one) on the law, over
    `min_steps`..`MAX_STEPS` steps (multilevel runs from `ml_min_steps`, default `min_steps`), or over
    the step counts `steps` / `ml_steps` where given (those of the comparison being predicted: a
    search over every N finds runs that a search over a ladder cannot).

    Args:
      law: the fitted `Law`.
      target: the RMS error to reach.
      costs: (K,) cost of one call of each level.
      calls: model calls per step of each sampler (`CALLS_PER_STEP`).
      ml_sampler: the multilevel side's sampler.
      min_steps: the fewest steps considered.
      max_cost: multilevel runs must cost less than this (and than the single run).
      ml_min_steps: the fewest steps of a multilevel run (default `min_steps`).
      steps: the single runs' step counts (default every N from `min_steps`).
      ml_steps: the multilevel runs' step counts (default every N from `ml_min_steps`).
      coins: the coin schemes searched ("stratified", "iid"; default those the law has constants for).
      ml_max_steps: the most steps of a multilevel run.
    """
    K = len(law.floors)
    coins = tuple(coins) if coins is not None else ("stratified",) + (("iid",) if len(law.iid_coin) else ())
    ml_min = min_steps if ml_min_steps is None else ml_min_steps
    steps_range = range(min_steps, MAX_STEPS + 1) if steps is None else sorted(n for n in steps if n >= min_steps)
    ml_top = min(MAX_STEPS, ml_max_steps)
    ml_range = range(ml_min, ml_top + 1) if ml_steps is None else sorted(n for n in ml_steps if ml_min <= n <= ml_top)
    single = None
    for k in range(K):
        for s in law.p:
            for n in steps_range:
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
        for n in ml_range:
            base = calls[ml_sampler] * n * costs[b]
            if base >= cap:
                break
            disc = law.floors[K - 1] ** 2 + discretisation(law, K - 1, ml_sampler, n)
            room = target ** 2 - disc
            if room <= 0:
                continue
            for scheme in coins:
                # the least m with c_b^2 (1/m - 1/N)^r N^-u <= room (iid: r_iid, u = 0)
                c, r, u = (law.iid_coin[b], _of(law.iid_r, b), 0.0) if scheme == "iid" else \
                    (law.coin[b], _of(law.r, b), _of(law.u, b))
                if not math.isfinite(c):  # its coin noise is not resolved by the pilots
                    continue
                m = max(1, math.ceil(1.0 / ((room * n ** u / c ** 2) ** (1.0 / r) + 1.0 / n))) if c > 0 else 1
                if m > n:
                    continue
                cost = base + calls[ml_sampler] * m * costs[K - 1]
                if cost < cap:
                    ml = Choice((b, K - 1), ml_sampler, n, m, cost,
                                law_error(law, (b, K - 1), ml_sampler, n, m, scheme), scheme)
                    cap = cost
    return single, ml


def law_standard_errors(pilots: Pilots, replicas: int = 100, seed: int = 0) -> Law:
    """The bootstrap standard error of every constant of `fit_law(pilots)`, as a `Law` of standard
    errors (its `measured` empty): the spread of the refits on `replicas` resamples of the pilots'
    samples (the same resample for every run: they share their prior draws).

    Args:
      pilots: the `Pilots`.
      replicas: bootstrap resamples.
      seed: of the resamples.
    """
    size = len(next(iter(pilots.floors.values())))
    rng = np.random.default_rng(seed)
    laws = [fit_law(pilots, rng.integers(0, size, size)) for _ in range(replicas)]
    def sd(xs):  # nan where a replica left a constant unresolved (inf)
        with np.errstate(invalid="ignore"):
            return np.std(np.asarray(xs, np.float64), axis=0, ddof=1)

    return Law(sd([w.floors for w in laws]), {s: float(sd([w.p[s] for w in laws])) for s in laws[0].p},
               {s: sd([w.C[s] for w in laws]) for s in laws[0].C}, sd([w.coin for w in laws]),
               sd([w.r for w in laws]), sd([w.u for w in laws]), {}, sd([w.iid_coin for w in laws]),
               sd([w.iid_r for w in laws]))


def law_variants(pilots: Pilots) -> list[Pilots]:
    """The pilots, and the pilots less one of their step counts (short runs) or one of their firing
    counts (coin runs), each left out in turn where at least two remain: refits on them show how much
    the law's own form (how it joins its points, one exponent for every level) moves a prediction,
    which resampling the samples cannot show."""
    variants = [pilots]
    disc_steps = sorted({n for (_, _, n) in pilots.discretisation})
    firings = sorted({f for (_, _, _, f) in pilots.coins})
    if len(disc_steps) > 2:
        for n in disc_steps:
            variants.append(pilots._replace(
                discretisation={key: v for key, v in pilots.discretisation.items() if key[2] != n}))
    if len(firings) > 2:
        for f in firings:
            variants.append(pilots._replace(coins={key: v for key, v in pilots.coins.items() if key[3] != f}))
    return variants


def predict(pilots: Pilots, target: float, costs: Sequence[float], calls: dict, *, replicas: int = 200,
            level: float = 0.8, seed: int = 0, steps: Sequence[int] | None = None,
            ml_steps: Sequence[int] | None = None, leave_out: bool = True,
            measured_size: int | None = None, coins: Sequence[str] | None = None) -> Prediction:
    """The law's gain at `target` (an RMS error), with an interval: the law refitted on `replicas`
    bootstrap resamples of the pilots' samples (the same resample for every run: they share their
    prior draws), each on one of the `law_variants` in turn when `leave_out` (so the interval holds
    the law's own error as well as the pilots' noise), and both sides searched again. With
    `measured_size`, the interval is for a measurement of the gain on that many other draws, which
    has noise of its own: each resample draws m of the pilots' n samples, 1/m = 1/n + 1/measured_size
    (a resample of m stands for the variance of both estimates together).

    Args:
      pilots: the `Pilots`.
      target: the RMS error to reach.
      costs: (K,) cost of one call of each level.
      calls: model calls per step of each sampler.
      replicas: bootstrap resamples of the pilots' samples.
      level: of the central interval.
      seed: of the resamples.
      steps: the single runs' step counts to search (default every N the law covers).
      ml_steps: the multilevel runs' step counts to search (default every N the law covers).
      leave_out: whether the replicas also leave out one pilot step or firing count in turn.
      measured_size: the draws of the measurement the interval should cover (default: none, the
        interval is for the law's gain itself).
      coins: the coin schemes searched (default those the pilots ran; a comparison that runs only
        stratified coins is predicted with ("stratified",)).
    """
    costs = np.asarray(costs, np.float64)
    ml_sampler = next(iter(pilots.coins))[1]
    # the law is not extrapolated below the pilots' steps: single runs from the fewest steps of the
    # discretisation pilots, multilevel runs from the fewest of the coin pilots and up to
    # ML_EXTRAPOLATION x their most (a coin exponent in N fitted on two step counts goes no further)
    fewest = min(n for (_, _, n) in pilots.discretisation)
    ml_fewest = min(n for (_, _, n, _) in pilots.coins)
    ml_most = math.floor(ML_EXTRAPOLATION * max(n for (_, _, n, _) in pilots.coins))
    search = dict(ml_min_steps=ml_fewest, steps=steps, ml_steps=ml_steps, coins=coins, ml_max_steps=ml_most)
    single, ml = cheapest(fit_law(pilots), target, costs, calls, ml_sampler, fewest, **search)
    gain = None if (single is None or ml is None) else single.cost / ml.cost
    size = len(next(iter(pilots.floors.values())))
    draws = size if measured_size is None else max(2, round(1.0 / (1.0 / size + 1.0 / measured_size)))
    rng = np.random.default_rng(seed)
    variants = law_variants(pilots) if leave_out else [pilots]
    gains = []
    for i in range(replicas):
        s, m = cheapest(fit_law(variants[i % len(variants)], rng.integers(0, size, draws)), target, costs, calls,
                        ml_sampler, fewest, **search)
        gains.append(np.nan if (s is None or m is None) else s.cost / m.cost)
    gains = np.asarray(gains)
    low = high = None
    if gain is not None and np.all(np.isfinite(gains)):
        low, high = (float(q) for q in np.quantile(gains, [(1 - level) / 2, (1 + level) / 2]))
    elif gain is not None:  # some replicas found no cheaper multilevel run: the interval reaches 1 or below
        finite = gains[np.isfinite(gains)]
        low, high = min(1.0, float(np.min(finite, initial=1.0))), float(np.quantile(finite, (1 + level) / 2)) \
            if finite.size else 1.0
    return Prediction(target, single, ml, gain, low, high, level, float(np.mean(np.isfinite(gains))))


class MetricLaw(NamedTuple):
    """A user's distribution metric against the pathwise error over the pilot runs, metric = a + b e^2
    (least squares; `r2` its coefficient of determination over the `runs` points): the map that turns a
    target in the metric into a pathwise target (`error_at`)."""

    a: float
    b: float
    r2: float
    runs: int

    def error_at(self, value: float) -> float:
        """The pathwise RMS error at which the metric is `value`: sqrt((value - a) / b)."""
        if self.b <= 0:
            raise InputError(f"metric: over the pilots the metric does not grow with the pathwise error (slope "
                             f"{self.b:.3g}), so no pathwise target stands for a value of it; use a pathwise target.")
        if value <= self.a:
            raise InputError(f"target: {value:.4g} is at or below the metric's floor over the pilots ({self.a:.4g}): "
                             "no run's error is that small; ask for a larger value.")
        return math.sqrt((value - self.a) / self.b)


def metric_law(pilots: Pilots) -> MetricLaw:
    """Fit metric = a + b e^2 over the pilot runs that recorded a metric (`run_pilots(..., metric=...)`),
    e^2 each run's mean squared error against the reference. A distribution metric does not see every
    pathwise error (two runs that send a draw to different but equally likely samples differ pathwise,
    not in distribution): `r2` says how much of the metric the pathwise error explains.

    Args:
      pilots: `Pilots` run with a `metric`.
    """
    if len(pilots.metrics) < 3:
        raise InputError("pilots: fewer than three runs recorded a metric; run the pilots with metric=.")
    m, e2 = (np.array(v, np.float64) for v in zip(*pilots.metrics.values()))
    b, a = np.polyfit(e2, m, 1)
    resid = m - (a + b * e2)
    total = float(np.sum((m - m.mean()) ** 2))
    return MetricLaw(float(a), float(b), 1.0 - float(np.sum(resid ** 2)) / total if total > 0 else 1.0, len(m))


def predict_settled(batches: list, more: Callable[[int], Pilots], target, costs: Sequence[float],
                    calls: dict, *, max_draws: int, **kwargs) -> tuple[Prediction, Pilots]:
    """`predict` on the merged pilots of `batches`, following its own advice: while the verdict is
    unsettled and the pilots hold fewer than `max_draws` draws, one more batch, `more(len(batches))`,
    is appended to `batches` (the caller's list, so that later targets reuse it) and the prediction is
    repeated. Returns (prediction, the pilots it rests on). A verdict that stays unsettled at `max_draws`
    is reported as such: the target is within the pilots' noise of a threshold.

    Args:
      batches: the pilots run so far, one `Pilots` per batch of draws (appended to).
      more: `more(i)` runs the pilots on a new, i-th batch of draws.
      target: as in `predict`, or `target(pilots)` for a target set by the pilots (a multiple of the
        top's floor, the top's error at some steps), which more draws move too.
      costs: as in `predict`.
      calls: as in `predict`.
      max_draws: the most draws the pilots may hold.
      **kwargs: passed to `predict`.
    """
    while True:
        pilots = merge_pilots(*batches)
        pred = predict(pilots, target(pilots) if callable(target) else target, costs, calls, **kwargs)
        size = len(next(iter(pilots.floors.values())))
        if pred.verdict != "unsettled" or size + len(next(iter(batches[-1].floors.values()))) > max_draws:
            return pred, pilots
        batches.append(more(len(batches)))


def family_pilots(family, *, batch_size: int = 32, seed: int = 1, samplers: Sequence[str] = ("dpm++2m", "unipc"),
                  pilot_steps: Sequence[int] = (5, 6, 8, 10, 12), ml_steps: Sequence[int] = (12, 24),
                  coin_plans: int = 8,
                  iid_firings: Sequence[int] = (2, 4, 8),
                  tick: Callable[[], None] = lambda: None) -> tuple[Pilots, np.ndarray]:
    """(pilots, FLOPs per call of each level) of a UNet family, the reference being its top network's
    probability-flow ODE solved finely (DPM-Solver++(3M), 100 log-SNR steps) from the same prior draws, as
    in `compare_best_samplers`: the top's floor is then 0, and a lower level's is its distance from the top.
    A multilevel pilot averages `coin_plans` coin plans (one per slice of the batch; fewer where they
    would not divide it): one plan shared by every draw would measure one realisation of where the top
    fires, not the coin noise's mean, and no resampling of the draws could show it.

    Args:
      family: a UNet `Family`.
      batch_size: prior draws of the pilots.
      seed: of the pilots' draws.
      samplers: the samplers whose discretisation is fitted.
      pilot_steps: the short runs' steps (at least two).
      ml_steps: the multilevel pilots' steps (the law's multilevel runs reach 1.5x the most).
      coin_plans: coin plans per multilevel pilot (the most that divide `batch_size`, up to this).
      iid_firings: the iid-coin pilots' expected firings (empty: stratified coins only).
      tick: called after every pilot run.
    """
    from mlem_jax.compare._best_samplers import _Batch
    from mlem_jax.diffusion.unet import family_summary

    plans = max(d for d in range(1, max(1, coin_plans) + 1) if batch_size % d == 0)
    batch = _Batch(family, batch_size, seed, 100, plans)

    def outputs(levels, sampler, steps, firings, coins="stratified"):
        return batch.images(tuple(levels), sampler, steps, firings, coins=coins)[0]

    pilots = run_pilots(outputs, batch.reference, len(family.models), samplers, pilot_steps=pilot_steps,
                        ml_steps=ml_steps, iid_firings=iid_firings, tick=tick)
    flops = np.array([1e9 * s["gflop"] for s in family_summary(family.models, family.params, family.image_shape)])
    return pilots, flops


def format_prediction(pred: Prediction, names: Sequence[str], unit: str = "FLOPs") -> str:
    """One line per side and the gain, in words.

    Args:
      pred: the `Prediction`.
      names: the levels' names.
      unit: the cost's unit.
    """
    def run(c: Choice) -> str:
        if len(c.levels) == 1:
            return f"{names[c.levels[0]]} alone, {c.sampler} {c.steps} steps"
        fired = f"the top fired {c.firings} times" if c.coins == "stratified" else \
            f"iid coins, the top fired {c.firings} times on average"
        return f"{names[c.levels[0]]} + {names[c.levels[-1]]}, {c.sampler} {c.steps} steps, {fired}"

    lines = [f"at error {pred.target:.4f}:"]
    lines.append("  single network: " + ("none reaches it" if pred.single is None else
                                         f"{run(pred.single)} (law's error {pred.single.error:.4f})"))
    share = "" if not math.isfinite(pred.pays) else \
        f"multilevel pays in {100 * pred.pays:.0f}% of the bootstrap replicas"
    if pred.multilevel is None:
        lines.append("  multilevel: no run is cheaper than the single network")
    else:
        lines.append(f"  multilevel: {run(pred.multilevel)} (law's error {pred.multilevel.error:.4f})")
        lines.append(f"  predicted gain {pred.gain:.2f}x in {unit} [{pred.low:.2f}, {pred.high:.2f}] "
                     f"({100 * pred.level:.0f}% interval: refits on resampled pilots, each leaving out one pilot "
                     "step or firing count in turn)")
    verdict = pred.verdict
    if verdict == "unsettled":
        lines.append(f"  verdict: unsettled ({share}; {100 * SETTLED:.0f}% would settle it): the target is near a "
                     "threshold where the pilots' noise decides; run the pilots on more draws, or measure")
    else:
        slim = verdict == "pays" and pred.gain < 1.05  # cheaper, but by less than a timing's noise
        lines.append(f"  verdict: multilevel {'pays' if verdict == 'pays' else 'does not pay'} here"
                     + (f" ({share})" if share else "")
                     + (f", but by {100 * (pred.gain - 1):.0f}%: about the cost of the single network" if slim else ""))
    return "\n".join(lines)
