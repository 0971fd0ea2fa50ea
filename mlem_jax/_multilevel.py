"""The multilevel estimator as a value, `Multilevel`, that every solver accepts.

At a model call n at time t_n and state x_n, with levels f^1, ..., f^K (drifts, or the
data predictions D^k of a diffusion model), corrections c_k = f^k - f^{k-1} and coins
B_{n,k} ~ Bernoulli(p_k(t_n)) (B_{n,1} = 1), the paper's estimator (arXiv 2603.24594) is

    F_n = f^1(x_n) + sum_{k>=2} (B_{n,k} / p_k) c_k(x_n),      E[F_n | x_n] = f^K(x_n).

control="cached" (a lagged control variate, beyond the paper) keeps in the solver's state
the correction last observed for each level, chat_k, and uses

    F_n = f^1(x_n) + sum_{k>=2} [ chat_k + (B_{n,k} / p_k) (c_k(x_n) - chat_k) ],
    then chat_k <- c_k(x_n) wherever B_{n,k} fired.

chat_k depends only on the past, and iid coins are independent of the past and of x_n, so
E[F_n | past, x_n] = f^K(x_n) exactly (the paper's estimator is chat = 0), while the
conditional variance sum_k ((1 - p_k) / p_k) |c_k(x_n) - chat_k|^2 shrinks with the change
of the correction since its last firing. control="extrapolated" uses the line through the
last two firings, chat_k(t) = c_k(s_1) + (t - s_1) (c_k(s_1) - c_k(s_2)) / (s_1 - s_2),
which is also known before the coin is drawn. With either control every level fires at the
first call, so the caches start from an observation (counted in `evaluations`). With
coins="stratified" a coin depends on earlier firings and the argument fails: that
combination is biased (measured in docs/samplers.md) and warns.

The coins are planned over the solver's model calls (one per step for Euler-Maruyama and
the multistep solvers, two for Heun) from an unbatched level key, so that `lax.cond`
keeps skipping the levels that did not fire under `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mlem_jax import _noise, _validate
from mlem_jax._coins import (
    Coins,
    Coupling,
    level_coins,
    probabilities_on_grid,
    stratified_coins,
    stratified_fixed_firings,
)
from mlem_jax._errors import InputError
from mlem_jax._schedules import FixedFirings

PyTree = Any
Control = Literal["cached", "extrapolated"]
CONTROLS = (None, "cached", "extrapolated")


@dataclasses.dataclass(frozen=True)
class Multilevel:
    """The multilevel estimate of the finest of `levels`, for any solver of the library.

    Args:
      levels: (f^1, ..., f^K) from cheapest to most expensive, each `f(t, x, args)`: drifts
        for `euler_maruyama` / `heun`, data predictions (denoisers) for the diffusion
        samplers (`ddim`, `dpm_solver_pp`, ...).
      probs: the level probabilities (K,) with p_1 = 1, a schedule `p(t)`, or a `FixedFirings`.
      coins: "iid" (the paper's coins: every call unbiased given the past) or "stratified"
        (firings spread evenly in time; lower error, an O(h) bias).
      coupling: "independent" (one coin per level) or "nested" (one uniform per call).
      level_key: the key of the coins; under `jax.vmap` pass it unbatched. None derives it
        from the solver's `key`.
      control: None (the paper's estimator), "cached" (the last observed correction as a
        control variate: unbiased with iid coins, smaller variance) or "extrapolated" (the
        line through the last two observed corrections).
      control_scale: a known scalar function s(t) by which the corrections grow or shrink
        along the grid; the control then predicts c(t) = s(t) / s(t_last) c(t_last) (and
        extrapolates c / s). Any past-measurable prediction keeps the estimator unbiased. The
        diffusion samplers set it to sigma / alpha, the factor by which an eps-network's error
        enters its data prediction, unless given; EM leaves it None.

    A solver given a `Multilevel` returns a `MultilevelSolution(y, evaluations)`.
    """

    levels: Sequence[Callable]
    probs: Any
    coins: Coins = dataclasses.field(default="iid", kw_only=True)
    coupling: Coupling = dataclasses.field(default="independent", kw_only=True)
    level_key: Any = dataclasses.field(default=None, kw_only=True)
    control: Control | None = dataclasses.field(default=None, kw_only=True)
    control_scale: Callable | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self):
        levels = self.levels
        if callable(levels) or not isinstance(levels, (list, tuple)) or not levels:
            raise TypeError("Multilevel: levels must be a non-empty sequence of callables f(t, x, args), cheapest "
                            f"first, got {type(levels).__name__}. For one network, pass the callable itself to "
                            "the solver instead of a Multilevel.")
        for k, f in enumerate(levels):
            if not callable(f):
                raise TypeError(f"Multilevel: levels[{k}] is a {type(f).__name__}, expected a callable f(t, x, args).")
        object.__setattr__(self, "levels", tuple(levels))
        object.__setattr__(self, "coins", _validate.check_coins(self.coins))
        object.__setattr__(self, "coupling", _validate.check_coupling(self.coupling))
        if self.control not in CONTROLS:
            raise InputError(f"control: expected None, 'cached' or 'extrapolated', got {self.control!r}.")
        if self.control is not None and self.coins == "stratified":
            warnings.warn(
                f"Multilevel: control={self.control!r} with coins='stratified' is biased (a stratified coin depends "
                "on earlier firings, so the cache no longer cancels in the mean; measured in docs/samplers.md). Use "
                "control with coins='iid', or stratified coins without a control.", BiasedEstimatorWarning,
                stacklevel=3)


class BiasedEstimatorWarning(UserWarning):
    """A multilevel configuration whose mean is not the finest level's (stratified coins
    with a control variate)."""


class MultilevelSolution(NamedTuple):
    """What a solver given a `Multilevel` returns.

    y: the final state, or with `saveat` the states at the saved grid points stacked
       on a new leading axis.
    evaluations: int32 array (K,), how many times each level was evaluated.
    """

    y: PyTree
    evaluations: jax.Array


def _level_values(levels, needed, t, y, args):
    """f^k(t, y) for every level, f^1 always and level k > 1 under `lax.cond` when needed."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, y)
    values = [levels[0](t, y, args)]
    for k in range(1, len(levels)):
        values.append(jax.lax.cond(needed[k], lambda f=levels[k]: f(t, y, args), lambda: zeros))
    return values


def _needed(coins):
    """Level k runs when its coin or coin k + 1 fired; level 1 always."""
    return (coins | jnp.append(coins[1:], False)).at[0].set(True)


def _weighted(values, probs, coins):
    """sum_k w_k f^k with w_k = B_k / p_k - B_{k+1} / p_{k+1}: the paper's estimator regrouped."""
    scaled = jnp.where(coins, 1.0 / probs, 0.0).astype(probs.dtype)
    weights = scaled - jnp.append(scaled[1:], 0.0)
    total = None
    for k, fk in enumerate(values):
        term = jax.tree_util.tree_map(lambda v, w=weights[k]: w.astype(v.dtype) * v, fk)
        total = term if total is None else jax.tree_util.tree_map(jnp.add, total, term)
    return total, scaled


def multilevel_drift(drifts: Sequence[Callable], probs: jax.Array, coins: jax.Array, t, y, args
                     ) -> tuple[PyTree, jax.Array]:
    """The ML-EM estimator F = sum_k (B_k / p_k)(f^k - f^{k-1}) at (t, y).

    Returns F and the bool array (K,) of the levels that were evaluated. f^1 always runs
    (p_1 = 1); level k > 1 runs under `lax.cond` only when B_k or B_{k+1} fired.

    Args:
      drifts: f^1..f^K, cheapest first, each f(t, y, args).
      probs: (K,) probabilities of this step, p_1 = 1.
      coins: (K,) bool coins of this step (`level_coins` or a row of `stratified_coins`).
      t: the time of the step.
      y: the state at which the drifts are evaluated.
      args: passed to the drifts.
    """
    needed = _needed(coins)
    total, _ = _weighted(_level_values(drifts, needed, t, y, args), probs, coins)
    return total, needed


def controlled_estimate(levels, probs, coins, t, y, args, cache):
    """The estimator with a control variate: F = f^1 + sum_k [chat_k + (B_k / p_k)(c_k - chat_k)].

    `cache` holds chat_k for k = 2..K (pytrees like y). Returns (F, needed, corrections):
    corrections[k - 2] is c_k where B_k fired (and garbage elsewhere, masked by the caller).
    """
    needed = _needed(coins)
    values = _level_values(levels, needed, t, y, args)
    total, scaled = _weighted(values, probs, coins)
    corrections = []
    for k in range(1, len(levels)):
        total = jax.tree_util.tree_map(lambda a, c, s=scaled[k]: a + (1 - s).astype(c.dtype) * c, total, cache[k - 1])
        corrections.append(jax.tree_util.tree_map(jnp.subtract, values[k], values[k - 1]))
    return total, needed, corrections


def coin_source(probs, num_levels, coupling, coins, grid, level_key):
    """`(n, t) -> (p, B)` for model call n: its probabilities and coins.

    `grid` holds the times of the calls followed by the end time (len = calls + 1). iid
    coins come from fold_in(level_key, n); stratified coins and a `FixedFirings` are
    planned for all calls at once from level_key (an (N, K) mask), then read by index.
    """
    num_calls = grid.shape[0] - 1
    if isinstance(probs, FixedFirings):
        firings = _validate.check_firings(probs.firings, num_levels, num_calls, coupling)
        p = jnp.concatenate([jnp.ones(1), jnp.asarray(firings) / num_calls]).astype(grid.dtype)
        if coins == "stratified":
            mask = stratified_fixed_firings(level_key, firings, num_calls, coupling)
            return lambda n, t: (p, mask[n])
        m = jnp.asarray(firings, jnp.int32)
        if coupling == "independent":
            u = jax.random.uniform(level_key, (num_levels - 1, num_calls))
        else:
            u = jnp.broadcast_to(jax.random.uniform(level_key, (num_calls,)), (num_levels - 1, num_calls))
        rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)  # rank of each call's uniform
        mask = jnp.concatenate([jnp.ones((1, num_calls), bool), rank < m[:, None]], axis=0)
        return lambda n, t: (p, mask[:, n])
    probs_fn = _validate.check_probs(probs, num_levels, coupling, grid)
    if coins == "stratified":
        p_grid = probabilities_on_grid(probs_fn, grid)
        mask = stratified_coins(level_key, p_grid, coupling)
        return lambda n, t: (p_grid[n], mask[n])

    def flip(n, t):
        p = jnp.asarray(probs_fn(t))
        return p, level_coins(jax.random.fold_in(level_key, n), p, coupling)

    return flip


class ModelCalls(NamedTuple):
    """How a solver evaluates its model: `call(n, t, x, state) -> (value, state)` for the
    n-th model call of the run, from `state0`; `result(y, state)` is what the solver returns."""

    state0: PyTree
    call: Callable
    result: Callable


def model_calls(model, call_times: jax.Array, y0, args, key=None, *, name: str = "drift",
                diffusion_given: bool = True) -> ModelCalls:
    """The model calls of a solver whose n-th call happens at `call_times[n]`.

    `model` is a callable `f(t, x, args)` (checked against y0 and evaluated as is), a
    `Multilevel` (its levels checked here, the coins planned over all the calls, the
    estimate at each), or any object with a method `model_calls(call_times, y0, args, name)`
    returning its own `ModelCalls` (the calibration's `CallProbe`). `key` is the solver's
    key, from which a missing level key is derived.
    """
    own = getattr(model, "model_calls", None)
    if own is not None and not isinstance(model, Multilevel):
        return own(call_times, y0, args, name)
    if not isinstance(model, Multilevel):
        _validate.check_drift(model, call_times[0], y0, args, name=name)
        return ModelCalls((), lambda n, t, x, s: (model(t, x, args), s), lambda y, s: y)
    ml = model
    levels = _validate.check_drifts(ml.levels, call_times[0], y0, args)
    level_key = _level_key_of(ml, key, diffusion_given)
    every_level_runs = _validate.warn_if_batched(level_key)  # batched cond: select runs every branch
    grid = jnp.append(call_times, call_times[-1])
    coins_at = coin_source(ml.probs, len(levels), ml.coupling, ml.coins, grid, level_key)
    evaluations0 = jnp.zeros(len(levels), jnp.int32)

    def count(evaluations, needed):
        ran = jnp.ones_like(needed) if every_level_runs else needed
        return evaluations + ran.astype(jnp.int32)

    if ml.control is not None:
        return _controlled_calls(ml, levels, coins_at, count, call_times[0], y0, args, evaluations0)

    def call(n, t, x, evaluations):
        p, fired = coins_at(n, t)
        F, needed = multilevel_drift(levels, p, fired, t, x, args)
        return F, count(evaluations, needed)

    return ModelCalls(evaluations0, call, lambda y, ev: MultilevelSolution(y, ev))


def _level_key_of(ml: Multilevel, key, diffusion_given: bool):
    """The estimator's level key, or one derived from the solver's PRNG key (an error when there is none)."""
    level_key = ml.level_key
    if level_key is None:
        if not diffusion_given and key is not None:
            _validate.check_key(key, "key")
        if not _validate.is_prng_key(key):
            raise TypeError(
                "level_key: required when key is a Brownian path, precomputed increments or None "
                "(there is no PRNG key to derive the level coins from); pass "
                "level_key=jax.random.key(...).")
        _, level_key = _noise.split_key(key)
    _validate.check_key(level_key, "level_key")
    return level_key


def _predicted_corrections(memory, t, scale, extrapolate):
    """The control of each level k >= 2 at time t from its cache: the last observed correction (rescaled by
    control_scale(t) / control_scale(s1)), or the line through the last two ("extrapolated")."""
    out = []
    for last, prev, s1, s2, seen in memory:
        # in units of control_scale: u = c / scale(s); the prediction is scale(t) u
        r1 = 1.0 if scale is None else scale(t) / scale(s1)
        if extrapolate:
            r2 = 1.0 if scale is None else scale(t) / scale(s2)
            ok = (seen >= 2) & (s1 != s2)  # two firings at one time (Heun's calls at t_{n+1}): no line
            slope = jnp.where(ok, (t - s1) / jnp.where(ok, s1 - s2, 1.0), 0.0)
            out.append(jax.tree_util.tree_map(
                lambda a, b: (r1 * (1 + slope)).astype(a.dtype) * a - (r2 * slope).astype(b.dtype) * b, last, prev))
        else:
            out.append(jax.tree_util.tree_map(lambda a: jnp.asarray(r1, a.dtype) * a, last))
    return out


def _controlled_calls(ml, levels, coins_at, count, t0, y0, args, evaluations0) -> ModelCalls:
    """The calls of the estimator with the lagged control variate: every level fires at the first call (the
    caches start from an observation), then each cache is updated where its level fires."""
    extrapolate = ml.control == "extrapolated"
    zeros = jax.tree_util.tree_map(jnp.zeros_like, y0)
    # per level k >= 2: (c at the last firing, c at the one before, their times, firings seen); t0 is a time
    # where control_scale is defined (the caches are empty until the first call)
    memory0 = tuple((zeros, zeros, t0, t0, jnp.zeros((), jnp.int32)) for _ in range(len(levels) - 1))

    def call(n, t, x, state):
        memory, evaluations = state
        p, fired = coins_at(n, t)
        first = n == 0  # every cache starts from an observation
        p = jnp.where(first, jnp.ones_like(p), p)
        fired = jnp.where(first, jnp.ones_like(fired), fired)
        predicted = _predicted_corrections(memory, t, ml.control_scale, extrapolate)
        F, needed, corrections = controlled_estimate(levels, p, fired, t, x, args, predicted)
        new = []
        for k, ((last, prev, s1, s2, seen), c) in enumerate(zip(memory, corrections)):
            b = fired[k + 1]
            pick = lambda new_value, old: jax.tree_util.tree_map(lambda u, v: jnp.where(b, u, v), new_value, old)
            if extrapolate:  # only the line needs the firing before the last
                prev, s2 = pick(last, prev), jnp.where(b, s1, s2)
            new.append((pick(c, last), prev, jnp.where(b, t, s1), s2, seen + b))
        return F, (tuple(new), count(evaluations, needed))

    return ModelCalls((memory0, evaluations0), call, lambda y, s: MultilevelSolution(y, s[1]))
