"""Euler-Maruyama and the Multilevel Euler-Maruyama method (ML-EM, arXiv 2603.24594).

For dX = f(t, X) dt + g(t, X) dW on a grid t_0, ..., t_N (increasing or decreasing),
with h_n = t_{n+1} - t_n and dW_n ~ N(0, |h_n| I):

    EM:     X_{n+1} = X_n + h_n f(t_n, X_n) + g(t_n, X_n) dW_n

ML-EM replaces f by drifts f^1, ..., f^K of growing accuracy and cost (f^0 := 0) and,
at every step, by the unbiased estimator

    F_n = sum_k (B_{n,k} / p_k) (f^k - f^{k-1})(t_n, X_n),   B_{n,k} ~ Bernoulli(p_k(t_n)),

so that E[F_n | X_n] = f^K(t_n, X_n). Regrouped by level, F_n = sum_k w_k f^k with
w_k = B_k / p_k - B_{k+1} / p_{k+1} (B_{K+1} := 0): level k is needed only when B_k or
B_{k+1} fires, and every level that is not needed is skipped with `lax.cond`.

Couplings of the coins (same mean, different variance and cost):
* "independent": one uniform per level, B_k = [U_k < p_k] (the paper's scheme);
* "nested": one uniform per step, B_k = [U < p_k] with p non-increasing, so the fired
  levels form a prefix 1..m and each needed network runs once.

Coin schemes (`_coins.py`): coins="iid" draws fresh coins at every step (the paper);
coins="stratified" spreads the firings of each level evenly in time (systematic
sampling), which turns ML-EM's strong order 1/2 into EM's order 1 on additive noise.

The coins come from `level_key`, shared by a whole vmapped batch: a batched
`lax.cond` predicate turns into `select` and runs every level.

The estimator, its coins and its control variates live in `_multilevel.py` (`Multilevel`),
the scan loop in `_stepping.py`; this file is the update rule. `euler_maruyama` given a
`Multilevel` and `multilevel_euler_maruyama` are the same solver.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from mlem_jax import _noise, _validate
from mlem_jax._coins import Coins, Coupling
from mlem_jax._multilevel import Multilevel, MultilevelSolution, coin_source, model_calls, multilevel_drift
from mlem_jax._stepping import axpy, integrate

PyTree = Any
Drift = Callable[[jax.Array, PyTree, Any], PyTree]

__all__ = ["MultilevelSolution", "euler_maruyama", "multilevel_drift", "multilevel_euler_maruyama",
           "planned_evaluations"]


def planned_evaluations(probs, ts, level_key, num_levels: int, *, coupling: Coupling = "independent",
                        coins: Coins = "iid") -> jax.Array:
    """The evaluations (K,) of each level that `multilevel_euler_maruyama` with this
    `level_key` runs on `ts` (with the level key shared by the batch), from the coins alone,
    without evaluating any drift. Vmap it over level keys to average the cost over coin
    plans where the samples themselves were drawn with per-sample level keys.

    Args:
      probs: the schedule (a (K,) array, a `PiecewiseConstant`, a callable p(t) or
        `FixedFirings`), as given to the solver.
      ts: the time grid.
      level_key: the key of the coin plan.
      num_levels: K.
      coupling: "independent" or "nested".
      coins: "iid" or "stratified"."""
    ts = _validate.check_ts(ts)
    coupling = _validate.check_coupling(coupling)
    coins = _validate.check_coins(coins)
    coin_flips = coin_source(probs, num_levels, coupling, coins, ts, level_key)

    def count(n):
        _, fired = coin_flips(n, ts[n])
        return (fired | jnp.append(fired[1:], False)).at[0].set(True).astype(jnp.int32)

    return jnp.sum(jax.vmap(count)(jnp.arange(ts.shape[0] - 1)), axis=0)


def _em_update(y, F, h, diffusion, t, args, dw):
    """y + h F + g(t, y) dW, leaf by leaf."""
    drift_part = axpy(y, h, F)
    if diffusion is None:
        return drift_part
    g = diffusion(t, y, args)
    if jax.tree_util.tree_structure(g) != jax.tree_util.tree_structure(y):
        g = jax.tree_util.tree_map(lambda _: g, y)
    return jax.tree_util.tree_map(lambda a, gg, w: a + jnp.asarray(gg, w.dtype) * w, drift_part, g, dw)


def euler_maruyama(
    drift: Drift | Multilevel,
    diffusion: Callable | None,
    y0: PyTree,
    ts: jax.Array,
    key: Any,
    args: Any = None,
    *,
    saveat: Any = None,
    callback: Callable | None = None,
    progress: bool = False,
    check_finite: bool = False,
) -> PyTree:
    """Euler-Maruyama for dy = drift(t, y, args) dt + diffusion(t, y, args) dW over `ts`.

    Args:
      drift: f(t, y, args), returning a pytree shaped like y; or a `Multilevel`, which makes
        this ML-EM and the result a `MultilevelSolution(y, evaluations)`.
      diffusion: g(t, y, args), a scalar or an array broadcastable to y (diagonal noise),
        or a pytree like y; None integrates the ODE dy = f dt.
      y0: initial state (a pytree of arrays).
      ts: strictly monotone 1-D grid, increasing or decreasing.
      key: a PRNG key, a diffrax Brownian path, or increments of shape
        (len(ts) - 1, *y0.shape); may be None when `diffusion` is None.
      args: passed to drift and diffusion.
      saveat: None for the final state, "all" for every grid point, or integer indices
        into ts; saved states are stacked on a new leading axis.
      callback: called on the host after every step with a `StepInfo(step, t, y)`.
      progress: show a progress bar over the steps.
      check_finite: raise (through `equinox.error_if`, also under jit and vmap) when the
        final state is not finite: NaN and inf propagate, so this tells whether the path
        stayed finite. Off by default; costs one reduction over the state (measured in
        benchmarks/overhead.py).

    Returns:
      The final state, or the saved states.
    """
    ts = _validate.check_ts(ts)
    y0 = _validate.check_y0(y0)
    multilevel = isinstance(drift, Multilevel)
    _validate.check_diffusion(diffusion, ts[0], y0, args)
    noise = None if (diffusion is None and (key is None or multilevel)) else _noise.brownian_source(key, y0, ts)
    calls = model_calls(drift, ts[:-1], y0, args, key, name="drift", diffusion_given=diffusion is not None)

    def step(n, y, state):
        t0, t1 = ts[n], ts[n + 1]
        F, state = calls.call(n, t0, y, state)
        dw = None if diffusion is None else noise.increment(n, t0, t1)
        return _em_update(y, F, t1 - t0, diffusion, t0, args, dw), state

    y, state = integrate(step, y0, ts, calls.state0, saveat=saveat, progress=progress, callback=callback,
                         desc="ML-EM" if multilevel else "EM", check_finite=check_finite)
    return calls.result(y, state)


def multilevel_euler_maruyama(
    drifts: Sequence[Drift],
    probs: Any,
    diffusion: Callable | None,
    y0: PyTree,
    ts: jax.Array,
    key: Any,
    args: Any = None,
    *,
    level_key: jax.Array | None = None,
    coupling: Coupling = "independent",
    coins: Coins = "iid",
    control: str | None = None,
    saveat: Any = None,
    callback: Callable | None = None,
    progress: bool = False,
    check_finite: bool = False,
) -> MultilevelSolution:
    """The Multilevel Euler-Maruyama method: EM with the unbiased multilevel drift.

    The same as `euler_maruyama(Multilevel(drifts, probs, coins=..., coupling=...,
    level_key=..., control=...), diffusion, y0, ts, key, args)`.

    Args:
      drifts: (f^1, ..., f^K) from cheapest to most expensive, each f(t, y, args).
      probs: length-K array of level probabilities with p_1 = 1, a function of t
        returning one (a time-dependent schedule such as `PiecewiseConstant`), or a
        `FixedFirings` (an exact number of firings per level and trajectory).
      diffusion: g(t, y, args), as in `euler_maruyama` (None for an ODE).
      y0: the initial state (a pytree).
      ts: the strictly monotone time grid.
      args: passed to every drift and the diffusion.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
      key: a PRNG key, a diffrax Brownian path, or precomputed increments. With a key,
        the noise is the noise `euler_maruyama` draws from the same key.
      level_key: the key of the level coins (one draw per step). Defaults to a key
        derived from `key`. Under `jax.vmap`, pass it unbatched (in_axes=None) so that
        skipped levels stay skipped. Required when `key` is not a PRNG key.
      coupling: "independent" (one coin per level) or "nested" (one uniform per step;
        needs non-increasing probabilities).
      coins: "iid" (fresh coins at every step, the paper's scheme: every step unbiased
        given its state, strong order 1/2) or "stratified" (each level's firings evenly
        spread in time with the same marginals p_k(t_n): strong order 1 and an O(h)
        bias, see docs/method.md). With a `FixedFirings`, "stratified" spreads exactly
        the requested firings evenly instead of at random steps.
      control: None (the paper's estimator) or "cached" / "extrapolated" (the last
        observed corrections as a control variate; see `Multilevel`).

    Returns:
      A `MultilevelSolution(y, evaluations)`: the final (or saved) states and the
      number of evaluations of each level.
    """
    ts = _validate.check_ts(ts)
    coupling = _validate.check_coupling(coupling)
    coins = _validate.check_coins(coins)
    y0 = _validate.check_y0(y0)
    drifts = _validate.check_drifts(drifts, ts[0], y0, args)
    ml = Multilevel(drifts, probs, coins=coins, coupling=coupling, level_key=level_key, control=control)
    return euler_maruyama(ml, diffusion, y0, ts, key, args, saveat=saveat, callback=callback, progress=progress,
                          check_finite=check_finite)
