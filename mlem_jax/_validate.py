"""Trace-time argument checks that say what was wrong and what to write instead.

Every check here runs while the solver is being traced, so a bad argument fails
before anything is compiled. Checks on values (monotone grids, probabilities in
(0, 1]) only run when the values are concrete, that is not traced by `jax.jit`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._schedules import PiecewiseConstant

SMALL_PROBABILITY = 1e-6
COUPLINGS = ("independent", "nested")
COIN_SCHEMES = ("iid", "stratified")


def is_concrete(x: Any) -> bool:
    """True when no leaf of `x` is a tracer (its values can be inspected now)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def _describe(tree: Any) -> str:
    shapes = jax.tree_util.tree_map(lambda x: f"{x.dtype}{list(x.shape)}", tree)
    if isinstance(shapes, str):
        return shapes
    return str(shapes)


def check_ts(ts: Any) -> jax.Array:
    """`ts` must be a 1-D, strictly monotone grid of at least two times."""
    try:
        ts = jnp.asarray(ts)
    except TypeError as e:
        raise TypeError(f"ts: expected a 1-D array of times, got {type(ts).__name__}.") from e
    if ts.ndim != 1:
        raise InputError(
            f"ts: expected a 1-D array of times, got shape {ts.shape}. "
            "Pass the time grid itself, for example jnp.linspace(0.0, 1.0, 101)."
        )
    if ts.shape[0] < 2:
        raise InputError(
            f"ts: expected at least 2 times (a start and an end), got {ts.shape[0]}."
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    if is_concrete(ts):
        d = np.diff(np.asarray(ts))
        if not np.all(np.isfinite(np.asarray(ts))):
            raise InputError("ts: contains NaN or infinite times.")
        if not (np.all(d > 0) or np.all(d < 0)):
            bad = int(np.argmax(~((d > 0) if d[0] > 0 else (d < 0))))
            raise InputError(
                "ts: expected a strictly monotone grid (all increasing, or all decreasing "
                f"for sampling backwards in time); the step from ts[{bad}]={float(ts[bad])} "
                f"to ts[{bad + 1}]={float(ts[bad + 1])} breaks it."
            )
    else:  # traced (under jit): checked when the program runs
        import equinox as eqx

        d = jnp.diff(ts)
        bad = ~(jnp.all(d > 0) | jnp.all(d < 0)) | ~jnp.all(jnp.isfinite(ts))
        ts = eqx.error_if(ts, bad, "ts: expected a strictly monotone grid of finite times (all increasing, or "
                                   "all decreasing for sampling backwards in time).")
    return ts


def is_prng_key(key: Any) -> bool:
    """A typed key (`jax.random.key`) or a raw uint32[2] key (`jax.random.PRNGKey`)."""
    if not hasattr(key, "dtype") or not hasattr(key, "shape"):
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return key.dtype == jnp.uint32 and key.shape == (2,)


def check_key(key: Any, name: str) -> None:
    if not is_prng_key(key):
        got = f"{key.dtype}{list(key.shape)}" if hasattr(key, "shape") else type(key).__name__
        raise TypeError(
            f"{name}: expected a single PRNG key such as jax.random.key(0), got {got}. "
            "To sample a batch, jax.vmap over an array of keys "
            "(jax.random.split(key, batch)) instead of passing the array here."
        )


def check_y0(y0: Any) -> Any:
    """y0 as arrays, every leaf floating point (an integer state cannot take a step)."""
    y0 = jax.tree_util.tree_map(jnp.asarray, y0)
    for leaf in jax.tree_util.tree_leaves(y0):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"y0: expected floating-point states, got dtype {leaf.dtype}; pass "
                            f"jnp.asarray(y0, jnp.float32) (an integer state cannot take an Euler step).")
    return y0


def check_coupling(coupling: Any) -> str:
    if coupling not in COUPLINGS:
        raise InputError(
            f"coupling: expected one of {COUPLINGS}, got {coupling!r}. 'independent' draws "
            "one coin per level (the paper's scheme); 'nested' draws one uniform per step."
        )
    return coupling


def check_coins(coins: Any) -> str:
    if coins not in COIN_SCHEMES:
        raise InputError(
            f"coins: expected one of {COIN_SCHEMES}, got {coins!r}. 'iid' draws fresh coins at "
            "every step (the paper's scheme); 'stratified' spreads each level's firings evenly "
            "in time (same marginals, strong order 1)."
        )
    return coins


def check_drifts(drifts: Any, t0: Any, y0: Any, args: Any) -> tuple[Callable, ...]:
    """Every level's output must have the structure, shapes and dtypes of `y0`."""
    if callable(drifts):
        raise TypeError(
            "drifts: expected a sequence of drift functions (f^1, ..., f^K) from cheap to "
            "expensive, got a single function. For one level write drifts=(f,), or use "
            "euler_maruyama."
        )
    try:
        drifts = tuple(drifts)
    except TypeError as e:
        raise TypeError(
            f"drifts: expected a sequence of drift functions, got {type(drifts).__name__}."
        ) from e
    if len(drifts) == 0:
        raise InputError("drifts: expected at least one drift function, got an empty sequence.")
    for k, f in enumerate(drifts):
        if not callable(f):
            raise TypeError(f"drifts[{k}]: expected a callable f(t, y, args), got {type(f).__name__}.")
        check_drift(f, t0, y0, args, name=f"drifts[{k}]")
    return drifts


def check_drift(drift: Any, t0: Any, y0: Any, args: Any, name: str = "drift") -> None:
    if not callable(drift):
        raise TypeError(f"{name}: expected a callable f(t, y, args), got {type(drift).__name__}.")
    out = jax.eval_shape(drift, t0, y0, args)
    y_struct = jax.tree_util.tree_structure(y0)
    if jax.tree_util.tree_structure(out) != y_struct:
        raise InputError(
            f"{name}: its output must have the pytree structure of y0; got {_describe(out)} "
            f"for y0 of {_describe(jax.eval_shape(lambda: y0))}."
        )
    for o, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(y0)):
        y = jnp.asarray(y) if not hasattr(y, "shape") else y
        if o.shape != y.shape or o.dtype != y.dtype:
            raise InputError(
                f"{name}: its output must match y0 leaf by leaf in shape and dtype; got "
                f"{o.dtype}{list(o.shape)} where y0 has {y.dtype}{list(y.shape)}. A drift "
                "returns dy/dt for one state, shaped like that state."
            )


def check_diffusion(diffusion: Any, t0: Any, y0: Any, args: Any) -> None:
    """`diffusion(t, y, args)`: a scalar, an array broadcastable to every leaf of y, or a
    pytree like y whose leaves broadcast to the leaves of y (diagonal noise)."""
    if diffusion is None:
        return
    if not callable(diffusion):
        raise TypeError(
            f"diffusion: expected a callable g(t, y, args) or None (for an ODE), got "
            f"{type(diffusion).__name__}."
        )
    out = jax.eval_shape(diffusion, t0, y0, args)
    y_leaves = jax.tree_util.tree_leaves(y0)
    if jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(y0):
        pairs = list(zip(jax.tree_util.tree_leaves(out), y_leaves))
    elif len(jax.tree_util.tree_leaves(out)) == 1:
        (g,) = jax.tree_util.tree_leaves(out)
        pairs = [(g, y) for y in y_leaves]
    else:
        raise InputError(
            f"diffusion: its output must be one array or a pytree like y0; got {_describe(out)}."
        )
    for g, y in pairs:
        try:
            ok = jnp.broadcast_shapes(g.shape, y.shape) == tuple(y.shape)
        except ValueError:
            ok = False
        if not ok:
            raise InputError(
                f"diffusion: its output of shape {tuple(g.shape)} does not broadcast to the state "
                f"shape {tuple(y.shape)}. mlem-jax uses diagonal noise: return a scalar, or an "
                "array broadcastable to y (for example shape (1,) * y.ndim)."
            )


def check_probs(probs: Any, num_levels: int, coupling: str, ts: jax.Array) -> Callable:
    """Return `probs` as a function of t, after checking its shape and (when concrete)
    its values: finite, in (0, 1], p_1 = 1, non-increasing for the nested coupling."""
    if callable(probs):
        fn = probs
        try:
            out = jax.eval_shape(fn, ts[0])
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerBoolConversionError) as e:
            raise TypeError(
                "probs: the schedule p(t) branches on t with Python control flow (`if t < ...`), but the "
                "solvers call it with a traced t inside jit and scan. Write it with jnp.where (for example "
                "lambda t: jnp.where(t < 0.5, jnp.array([1.0, 0.2]), jnp.array([1.0, 0.05]))) or use "
                f"PiecewiseConstant. ({type(e).__name__})"
            ) from None
        if out.shape != (num_levels,):
            raise InputError(
                f"probs: the schedule must return one probability per level, shape "
                f"({num_levels},), got shape {out.shape}."
            )
        _check_coverage(probs, ts)
        try:
            values = jax.vmap(fn)(ts[:-1])
        except Exception:  # a schedule that cannot be vmapped is checked at one time only
            values = fn(ts[0])[None]
        if is_concrete(values):
            _check_prob_values(np.asarray(values), coupling, "probs(t)")
            return fn
        return _checked_when_run(fn, values, coupling)
    p = jnp.asarray(probs)
    if p.shape != (num_levels,):
        raise InputError(
            f"probs: expected one probability per level, shape ({num_levels},) for "
            f"{num_levels} drifts, got shape {p.shape}."
        )
    if not jnp.issubdtype(p.dtype, jnp.floating):
        p = p.astype(jnp.result_type(float))
    if is_concrete(p):
        _check_prob_values(np.asarray(p)[None], coupling, "probs")
    return lambda t: p


def _check_coverage(probs, ts) -> None:
    """A PiecewiseConstant's edges must cover the grid: a time outside them would use the nearest bin, a
    schedule made for another interval."""
    if not (isinstance(probs, PiecewiseConstant) and is_concrete((probs.edges, ts))):
        return
    edges, t = np.asarray(probs.edges, np.float64), np.asarray(ts, np.float64)
    lo, hi = t.min(), t.max()
    slack = 1e-5 * max(hi - lo, 1e-12)
    if edges[0] > lo + slack or edges[-1] < hi - slack:
        raise InputError(
            f"probs: the schedule's edges cover [{edges[0]:.6g}, {edges[-1]:.6g}], but the solver calls the "
            "model at times in "
            f"[{lo:.6g}, {hi:.6g}]; a schedule is made for the times it was calibrated on. Calibrate on this "
            "grid, or give edges that span those times."
        )


def _checked_when_run(fn: Callable, values, coupling: str) -> Callable:
    """A schedule whose values are traced (under jit): its values on the grid checked once, outside the
    solver's loop, through `equinox.error_if`; the schedule then depends on that check."""
    import equinox as eqx

    bad = jnp.any(jnp.isnan(values)) | jnp.any(values <= 0) | jnp.any(values > 1) | jnp.any(values[:, 0] != 1)
    if coupling == "nested":
        bad = bad | jnp.any(jnp.diff(values, axis=1) > 0)
    checked = eqx.error_if(values[0, 0], bad, "probs(t): every probability must lie in (0, 1], with p_1 = 1"
                           + (" and p non-increasing (nested coupling)" if coupling == "nested" else ""))
    zero = jnp.zeros((), values.dtype) * checked  # ties the check into every use of the schedule

    return lambda t: fn(t) + zero


def probabilities_checked_at_call(p, coupling: str):
    """The probabilities `p` (K,) of one model call, checked there through `equinox.error_if` (also under
    jit and vmap): for a schedule called at times no grid gives in advance (diffrax without `ts`)."""
    import equinox as eqx

    bad = jnp.any(jnp.isnan(p)) | jnp.any(p <= 0) | jnp.any(p > 1) | (p[0] != 1)
    if coupling == "nested":
        bad = bad | jnp.any(jnp.diff(p) > 0)
    return eqx.error_if(p, bad, "probs(t): at a time the solver stepped to, a probability is outside (0, 1] or "
                        "p_1 != 1" + (" or p increases (nested coupling)" if coupling == "nested" else "")
                        + "; every probability must lie in (0, 1], with p_1 = 1")


def _check_prob_values(p: np.ndarray, coupling: str, name: str) -> None:
    """`p` has shape (num_times, K)."""
    if np.any(np.isnan(p)):
        raise InputError(f"{name}: contains NaN.")
    if np.any(p <= 0) or np.any(p > 1):
        raise InputError(
            f"{name}: every probability must lie in (0, 1]; got min {p.min():.3g}, max "
            f"{p.max():.3g}. A level that should never run is better left out of drifts."
        )
    if np.any(p[:, 0] != 1):
        raise InputError(
            f"{name}: the first (cheapest) level must have probability 1, got "
            f"{p[:, 0].min():.3g}. The estimator is f^1 + sum_k (B_k / p_k)(f^k - f^(k-1)); "
            "f^1 is the base that every step pays for."
        )
    if coupling == "nested" and np.any(np.diff(p, axis=1) > 0):
        raise InputError(
            f"{name}: the nested coupling needs non-increasing probabilities "
            "(p_1 >= p_2 >= ... >= p_K), since level k fires when U < p_k; got "
            f"{np.array2string(p[np.argmax(np.any(np.diff(p, axis=1) > 0, axis=1))], precision=3)}. "
            "Sort the levels or use coupling='independent'."
        )
    if np.any(p < SMALL_PROBABILITY):
        warnings.warn(
            f"{name}: some probabilities are below {SMALL_PROBABILITY:g} (min {p.min():.3g}); "
            "the 1/p weights make the variance of the estimator explode.",
            stacklevel=4,
        )


def check_saveat(saveat: Any, num_times: int) -> np.ndarray | None:
    """None (final state only), "all", or integer indices into ts."""
    if saveat is None:
        return None
    if isinstance(saveat, str):
        if saveat != "all":
            raise InputError(f"saveat: expected None, 'all' or integer indices into ts, got {saveat!r}.")
        return np.arange(num_times)
    if not is_concrete(saveat):
        raise TypeError("saveat: the indices must be concrete (not traced); pass them as a static list.")
    idx = np.asarray(saveat)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise InputError(f"saveat: expected a 1-D sequence of integer indices into ts, got {idx!r}.")
    idx = np.where(idx < 0, idx + num_times, idx)
    if np.any(idx < 0) or np.any(idx >= num_times):
        raise InputError(f"saveat: indices must lie in [-{num_times}, {num_times}), got {saveat!r}.")
    if np.any(np.diff(idx) <= 0):
        raise InputError(f"saveat: indices must be strictly increasing, got {saveat!r}.")
    return idx


def check_firings(firings: Any, num_levels: int, num_steps: int, coupling: str) -> tuple[int, ...]:
    """A `FixedFirings` gives the firings of levels 2..K, each in [1, num_steps]."""
    try:
        values = [float(x) for x in firings]
    except (TypeError, ValueError) as e:
        raise TypeError(f"probs: FixedFirings.firings must be a sequence of integers, got {firings!r}.") from e
    if any(v != int(v) for v in values):
        raise InputError(f"probs: FixedFirings.firings must be whole numbers of firings, got {tuple(firings)}; round "
                         "them yourself (the weights num_steps / firings depend on the exact count).")
    m = tuple(int(v) for v in values)
    if len(m) != num_levels - 1:
        raise InputError(
            f"probs: FixedFirings gives the firings of levels 2..K, expected {num_levels - 1} values "
            f"for {num_levels} drifts, got {len(m)}."
        )
    if any(not 1 <= x <= num_steps for x in m):
        raise InputError(
            f"probs: FixedFirings firings must lie in [1, {num_steps}] (the number of steps), got {m}."
        )
    if coupling == "nested" and any(b > a for a, b in zip(m, m[1:])):
        raise InputError(f"probs: the nested coupling needs non-increasing firings, got {m}.")
    return m


class BatchedLevelKeyWarning(UserWarning):
    """The level key of ML-EM is batched under vmap, so no level is skipped. Filter this
    category where per-sample coins are wanted (averaging an error over coin plans)."""


def warn_if_batched(level_key) -> bool:
    """Warn when the level key is batched by an enclosing `jax.vmap` (seen directly; a vmap
    around a jitted function hides it): each sample then draws its own coins, `lax.cond`
    becomes `select`, and every level runs at every step. Returns whether it is."""
    import warnings

    try:  # a private module: if it moves, the warning is lost, never the sampling
        from jax._src.interpreters import batching

        dim = getattr(level_key, "batch_dim", None) if isinstance(level_key, batching.BatchTracer) else None
        not_mapped = getattr(batching, "NotMapped", ())
        batched = dim is not None and not (isinstance(not_mapped, type) and isinstance(dim, not_mapped))
    except Exception:  # pragma: no cover
        return False
    if batched:
        warnings.warn(
            "level_key: the level key is batched (one per sample of a vmapped batch, as the default "
            "level_key=None derives it from each sample's key), so under vmap every level runs at every step "
            "and ML-EM saves nothing (`evaluations` reports that). "
            "Pass one level key for the whole batch, unbatched: jax.vmap(lambda k: multilevel_euler_maruyama("
            "..., k, level_key=level_key))(keys).", BatchedLevelKeyWarning, stacklevel=3)
    return batched
