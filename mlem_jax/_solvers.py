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
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import _noise, _progress, _validate
from mlem_jax._coins import (
    Coins,
    Coupling,
    level_coins,
    probabilities_on_grid,
    stratified_coins,
    stratified_fixed_firings,
)
from mlem_jax._probabilities import FixedFirings

PyTree = Any
Drift = Callable[[jax.Array, PyTree, Any], PyTree]


class MultilevelSolution(NamedTuple):
    """Result of `multilevel_euler_maruyama`.

    y: the final state, or with `saveat` the states at the saved grid points stacked
       on a new leading axis.
    evaluations: int32 array (K,), how many times each level f^k was evaluated.
    """

    y: PyTree
    evaluations: jax.Array


def multilevel_drift(
    drifts: Sequence[Drift], probs: jax.Array, coins: jax.Array, t, y, args
) -> tuple[PyTree, jax.Array]:
    """The ML-EM estimator F = sum_k (B_k / p_k)(f^k - f^{k-1}) at (t, y).

    Returns F and the bool array (K,) of the levels that were evaluated. f^1 always runs
    (p_1 = 1); level k > 1 runs under `lax.cond` only when B_k or B_{k+1} fired.
    """
    scaled = jnp.where(coins, 1.0 / probs, 0.0).astype(probs.dtype)
    weights = scaled - jnp.append(scaled[1:], 0.0)
    needed = (coins | jnp.append(coins[1:], False)).at[0].set(True)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, y)
    total = None
    for k, f in enumerate(drifts):
        if k == 0:
            fk = f(t, y, args)
        else:
            fk = jax.lax.cond(needed[k], lambda f=f: f(t, y, args), lambda: zeros)
        term = jax.tree_util.tree_map(lambda v, w=weights[k]: w.astype(v.dtype) * v, fk)
        total = term if total is None else jax.tree_util.tree_map(jnp.add, total, term)
    return total, needed


def _coin_source(probs, num_levels, coupling, coins, ts, level_key):
    """`(n, t) -> (p, B)` for step n: the probabilities and the coins of that step.

    iid coins come from fold_in(level_key, n); stratified coins and a `FixedFirings` are
    planned for the whole grid at once from level_key (an (N, K) mask, cheap next to
    any drift), then read by step index.
    """
    num_steps = ts.shape[0] - 1
    if isinstance(probs, FixedFirings):
        firings = _validate.check_firings(probs.firings, num_levels, num_steps, coupling)
        p = jnp.concatenate([jnp.ones(1), jnp.asarray(firings) / num_steps]).astype(ts.dtype)
        if coins == "stratified":
            mask = stratified_fixed_firings(level_key, firings, num_steps, coupling)
            return lambda n, t: (p, mask[n])
        m = jnp.asarray(firings, jnp.int32)
        if coupling == "independent":
            u = jax.random.uniform(level_key, (num_levels - 1, num_steps))
        else:
            u = jnp.broadcast_to(jax.random.uniform(level_key, (num_steps,)), (num_levels - 1, num_steps))
        rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)  # rank of each step's uniform
        mask = jnp.concatenate([jnp.ones((1, num_steps), bool), rank < m[:, None]], axis=0)
        return lambda n, t: (p, mask[:, n])
    probs_fn = _validate.check_probs(probs, num_levels, coupling, ts)
    if coins == "stratified":
        p_grid = probabilities_on_grid(probs_fn, ts)
        mask = stratified_coins(level_key, p_grid, coupling)
        return lambda n, t: (p_grid[n], mask[n])

    def flip(n, t):
        p = jnp.asarray(probs_fn(t))
        return p, level_coins(jax.random.fold_in(level_key, n), p, coupling)

    return flip


def planned_evaluations(probs, ts, level_key, num_levels: int, *, coupling: Coupling = "independent",
                        coins: Coins = "iid") -> jax.Array:
    """The evaluations (K,) of each level that `multilevel_euler_maruyama` with this
    `level_key` runs on `ts` (with the level key shared by the batch), from the coins alone,
    without evaluating any drift. Vmap it over level keys to average the cost over coin
    plans where the samples themselves were drawn with per-sample level keys."""
    ts = _validate.check_ts(ts)
    coupling = _validate.check_coupling(coupling)
    coins = _validate.check_coins(coins)
    coin_flips = _coin_source(probs, num_levels, coupling, coins, ts, level_key)

    def count(n):
        _, fired = coin_flips(n, ts[n])
        return (fired | jnp.append(fired[1:], False)).at[0].set(True).astype(jnp.int32)

    return jnp.sum(jax.vmap(count)(jnp.arange(ts.shape[0] - 1)), axis=0)


def _em_update(y, F, h, diffusion, t, args, dw):
    """y + h F + g(t, y) dW, leaf by leaf (the one update both solvers share)."""
    drift_part = jax.tree_util.tree_map(lambda a, f: a + h.astype(f.dtype) * f, y, F)
    if diffusion is None:
        return drift_part
    g = diffusion(t, y, args)
    if jax.tree_util.tree_structure(g) != jax.tree_util.tree_structure(y):
        g = jax.tree_util.tree_map(lambda _: g, y)
    return jax.tree_util.tree_map(
        lambda a, gg, w: a + jnp.asarray(gg, w.dtype) * w, drift_part, g, dw
    )


def _integrate(step_drift, diffusion, y0, ts, noise, args, saveat, aux0, progress, callback, desc,
               check_finite=False):
    """One `lax.scan` over the grid. `step_drift(n, t, y, aux) -> (F, aux)`."""
    num_times = ts.shape[0]
    save_idx = _validate.check_saveat(saveat, num_times)
    bar = _progress.ProgressBar(num_times - 1, desc) if progress else None
    if save_idx is not None:
        # slot[n] = where the state at grid point n goes, or len(save_idx) (dropped).
        slot = np.full(num_times, len(save_idx), dtype=np.int32)
        slot[save_idx] = np.arange(len(save_idx), dtype=np.int32)
        saved0 = jax.tree_util.tree_map(
            lambda y: jnp.zeros((len(save_idx), *jnp.shape(y)), jnp.result_type(y)), y0
        )
        saved0 = jax.tree_util.tree_map(
            lambda s, y: s.at[slot[0]].set(y, mode="drop"), saved0, y0
        )
        slot = jnp.asarray(slot)
    else:
        saved0 = None

    def body(carry, n):
        y, aux, saved = carry
        t0, t1 = ts[n], ts[n + 1]
        F, aux = step_drift(n, t0, y, aux)
        dw = None if diffusion is None else noise.increment(n, t0, t1)
        y1 = _em_update(y, F, t1 - t0, diffusion, t0, args, dw)
        if saved is not None:
            saved = jax.tree_util.tree_map(
                lambda s, v: s.at[slot[n + 1]].set(v, mode="drop"), saved, y1
            )
        _progress.report_step(n, t1, y1, bar, callback)
        return (y1, aux, saved), None

    steps = jnp.arange(num_times - 1)
    (y, aux, saved), _ = jax.lax.scan(body, (y0, aux0, saved0), steps)
    out = y if saved is None else saved
    if check_finite:  # NaN and inf propagate, so the final state tells whether the path stayed finite
        import equinox as eqx

        bad = jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(y)])))
        out = jax.tree_util.tree_map(lambda a: eqx.error_if(
            a, bad, f"{desc}: the trajectory went non-finite (NaN or inf); look at the drifts, the step size "
                    "and the probabilities (check_finite=True)"), out)
    return out, aux


def euler_maruyama(
    drift: Drift,
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
      drift: f(t, y, args), returning a pytree shaped like y.
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
    _validate.check_drift(drift, ts[0], y0, args, name="drift")
    _validate.check_diffusion(diffusion, ts[0], y0, args)
    noise = None if (diffusion is None and key is None) else _noise.brownian_source(key, y0, ts)

    def step_drift(n, t, y, aux):
        return drift(t, y, args), aux

    y, _ = _integrate(
        step_drift, diffusion, y0, ts, noise, args, saveat, None, progress, callback, "EM", check_finite
    )
    return y


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
    saveat: Any = None,
    callback: Callable | None = None,
    progress: bool = False,
    check_finite: bool = False,
) -> MultilevelSolution:
    """The Multilevel Euler-Maruyama method: EM with the unbiased multilevel drift.

    Args:
      drifts: (f^1, ..., f^K) from cheapest to most expensive, each f(t, y, args).
      probs: length-K array of level probabilities with p_1 = 1, a function of t
        returning one (a time-dependent schedule such as `PiecewiseConstant`), or a
        `FixedFirings` (an exact number of firings per level and trajectory).
      diffusion, y0, ts, args, saveat, callback, progress, check_finite: as in
        `euler_maruyama`.
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

    Returns:
      A `MultilevelSolution(y, evaluations)`: the final (or saved) states and the
      number of evaluations of each level.
    """
    ts = _validate.check_ts(ts)
    coupling = _validate.check_coupling(coupling)
    coins = _validate.check_coins(coins)
    y0 = _validate.check_y0(y0)
    drifts = _validate.check_drifts(drifts, ts[0], y0, args)
    _validate.check_diffusion(diffusion, ts[0], y0, args)
    noise = None if diffusion is None else _noise.brownian_source(key, y0, ts)
    if level_key is None:
        if diffusion is None:
            _validate.check_key(key, "key")
        if not _validate.is_prng_key(key):
            raise TypeError(
                "level_key: required when key is a Brownian path or precomputed increments "
                "(there is no PRNG key to derive the level coins from); pass "
                "level_key=jax.random.key(...)."
            )
        _, level_key = _noise.split_key(key)
    _validate.check_key(level_key, "level_key")
    every_level_runs = _validate.warn_if_batched(level_key)  # batched cond: select runs every branch
    coin_flips = _coin_source(probs, len(drifts), coupling, coins, ts, level_key)

    def step_drift(n, t, y, evaluations):
        p, fired = coin_flips(n, t)
        F, needed = multilevel_drift(drifts, p, fired, t, y, args)
        ran = jnp.ones_like(needed) if every_level_runs else needed
        return F, evaluations + ran.astype(jnp.int32)

    evaluations0 = jnp.zeros(len(drifts), jnp.int32)
    y, evaluations = _integrate(
        step_drift, diffusion, y0, ts, noise, args, saveat, evaluations0, progress, callback, "ML-EM",
        check_finite)
    return MultilevelSolution(y, evaluations)
