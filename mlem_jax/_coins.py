"""The level coins of ML-EM: which corrections fire at each step.

Both schemes keep the exact marginal P(B_{n,k} = 1) = p_k(t_n) at every step, so every
step's estimator has mean f^K on average. They differ in how firings are spread in time.

* coins="iid" (the paper's scheme): fresh coins at every step, from
  fold_in(level_key, n). The number of firings of level k in a stretch of m steps
  fluctuates like a binomial count, and the error that level k's corrections add,
  sum_n h (B_{n,k} / p_k - 1) Delta_k(t_n, X_n), is a martingale of variance about
  h T (1 / p_k - 1) E|Delta_k|^2: the coupled error shrinks like sqrt(h / p)
  (strong order 1/2).

* coins="stratified" (systematic sampling, beyond the paper): with
  S_k(n) = sum_{m < n} p_k(t_m) and one offset u_k ~ U(0, 1) per level,

      B_{n,k} = 1  iff  floor(S_k(n + 1) + u_k) > floor(S_k(n) + u_k).

  S_k(n) + u_k mod 1 is uniform for every n, so P(B_{n,k}) = p_k(t_n) exactly, while
  the firings are evenly spread: a constant p fires floor(N p) or ceil(N p) times in N
  steps. The weighted corrections become a randomly shifted Riemann sum on a grid of
  spacing about h / p_k, whose error is O(h / p_k): the coupled error shrinks like h
  (strong order 1). A firing depends on earlier ones, so a step is unbiased on average
  but not given its state: the bias is O(h), the order of EM's own weak error.

  With coupling="nested" the fired levels must form a prefix, so all levels share one
  uniform per step, taken from a randomly shifted rank-1 lattice

      U_n = ((n j + s) mod N + v) / N,   j coprime with N, j / N close to the golden
                                         ratio conjugate 0.618..., s ~ U{0..N-1},
                                         v ~ U(0, 1),

  B_{n,k} = [U_n < p_k(t_n)]. U_n is uniform for every n; the N values of U are one
  point in each of the N cells [i/N, (i+1)/N), visited in a well-spread order, so a
  constant p again fires floor(N p) or ceil(N p) times.

The coins depend only on the level key and on p(t), never on the state or on the
per-sample noise: drawn from an unbatched key they are shared by a whole vmapped batch,
and `lax.cond` keeps skipping the levels that did not fire.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError

Coins = Literal["iid", "stratified"]
Coupling = Literal["independent", "nested"]
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def level_coins(key: jax.Array, probs: jax.Array, coupling: Coupling = "independent") -> jax.Array:
    """Draw the iid Bernoulli coins B_1..B_K (bool array (K,)) of one step.

    Args:
      key: the step's PRNG key.
      probs: (K,) probabilities with p_1 = 1.
      coupling: "independent" (B_k ~ Bernoulli(p_k) each) or "nested" (one uniform U,
        B_k = U < p_k: level k+1 fires only where level k does; needs decreasing p)."""
    if coupling == "independent":
        u = jax.random.uniform(key, probs.shape, probs.dtype)
    elif coupling == "nested":
        u = jax.random.uniform(key, (), probs.dtype)
    else:
        raise InputError(f"coupling: expected 'independent' or 'nested', got {coupling!r}.")
    return u < probs


def lattice_generator(num_steps: int) -> int:
    """j coprime with N and closest to N times the golden ratio conjugate: the n j mod N
    then visit 0..N-1 once each, in the well-spread order of a Fibonacci-like lattice."""
    n = int(num_steps)
    if n <= 2:
        return 1
    target = GOLDEN * n
    below = int(target)
    for d in range(n):  # candidates in order of their distance to the target
        ok = [j for j in (below - d, below + 1 + d) if 0 < j < n and math.gcd(j, n) == 1]
        if ok:
            return min(ok, key=lambda j: abs(j - target))
    return 1


def _lattice_order(num_steps: int) -> np.ndarray:
    """(n j) mod N for n = 0..N-1, as int32 (computed exactly in integers)."""
    j = lattice_generator(num_steps)
    return ((np.arange(num_steps, dtype=np.int64) * j) % num_steps).astype(np.int32)


def stratified_coins(level_key: jax.Array, probs: jax.Array, coupling: Coupling = "independent") -> jax.Array:
    """The stratified coins of a whole grid: bool (N, K) from probabilities (N, K).

    probs[n] is p(t_n) for step n. See the module docstring for the construction.

    Args:
      level_key: the key of the run's coin plan.
      probs: (N, K) probabilities per step, p_1 = 1.
      coupling: "independent" or "nested", as in `level_coins`.
    """
    probs = jnp.asarray(probs)
    num_steps, num_levels = probs.shape
    if coupling == "independent":
        offsets = jax.random.uniform(level_key, (num_levels,), probs.dtype)

        def step(r, p):
            s = r + p
            fire = s >= 1.0
            return jnp.where(fire, s - 1.0, s), fire

        _, fired = jax.lax.scan(step, offsets, probs)
        return fired
    shift_key, jitter_key = jax.random.split(level_key)
    s = jax.random.randint(shift_key, (), 0, num_steps)
    v = jax.random.uniform(jitter_key, (), probs.dtype)
    cell = (jnp.asarray(_lattice_order(num_steps)) + s) % num_steps
    u = (cell.astype(probs.dtype) + v) / num_steps
    return u[:, None] < probs


def stratified_fixed_firings(level_key: jax.Array, firings, num_steps: int, coupling: Coupling) -> jax.Array:
    """Stratified coins with exactly firings[k] firings of each level k >= 2: bool (N, K).

    In integers, so the counts are exact: level k fires at step n when
    floor(((n + 1) m + s) / N) > floor((n m + s) / N) with s ~ U{0..N-1} (independent
    coupling, one s per level), or when (n j + s) mod N < m (nested, one s for all).
    P(fire at n) = m / N exactly.
    """
    m = jnp.asarray(firings, jnp.int32)  # (K - 1,)
    n = jnp.arange(num_steps, dtype=jnp.int32)[:, None]
    if coupling == "independent":
        s = jax.random.randint(level_key, (m.shape[0],), 0, num_steps)
        fired = ((n + 1) * m + s) // num_steps > (n * m + s) // num_steps
    else:
        s = jax.random.randint(level_key, (), 0, num_steps)
        cell = (jnp.asarray(_lattice_order(num_steps))[:, None] + s) % num_steps
        fired = cell < m
    return jnp.concatenate([jnp.ones((num_steps, 1), bool), fired], axis=1)


def probabilities_on_grid(probs_fn: Callable, ts: jax.Array) -> jax.Array:
    """p(t_n) for every step n = 0..N-1: (N, K)."""
    try:
        return jnp.asarray(jax.vmap(probs_fn)(ts[:-1]))
    except Exception:  # a schedule that cannot be vmapped
        return jnp.asarray(jax.lax.map(probs_fn, ts[:-1]))
