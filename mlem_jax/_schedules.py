"""Level probability schedules, the `probs` of a `Multilevel`: a constant array (K,) with
p_1 = 1, a `PiecewiseConstant` in time, `FixedFirings` (exactly m_k firings per run), or
the paper's geometric p_k = ratio^(k-1). How to choose them is `mlem_jax.calibrate`'s job.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError


class _Bins(NamedTuple):
    edges: jax.Array  # (B + 1,) increasing
    values: jax.Array  # (B, K)


class PiecewiseConstant(_Bins):
    """A time-dependent schedule, constant on each bin: probs(t) = values[b] for t in
    [edges[b], edges[b+1]). A pytree and a function of t, usable as the `probs` of
    `multilevel_euler_maruyama`. Checked at construction: one row of values per bin and
    (when concrete) increasing edges; the solvers check that the edges cover their grid."""

    __slots__ = ()

    def __new__(cls, edges, values):
        shape_e, shape_v = getattr(edges, "shape", None), getattr(values, "shape", None)
        if shape_e is not None and shape_v is not None and len(shape_e) == 1:  # not a batch of schedules
            if len(shape_v) != 2 or shape_v[0] != shape_e[0] - 1:
                raise InputError(
                    f"values: expected one row of probabilities per bin, shape ({shape_e[0] - 1}, K) for "
                    f"{shape_e[0]} edges, got shape {tuple(shape_v)}.")
            concrete = isinstance(edges, (np.ndarray, jax.Array)) and not isinstance(edges, jax.core.Tracer)
            if concrete and not np.all(np.diff(np.asarray(edges, np.float64)) > 0):
                raise InputError(f"edges: expected strictly increasing bin edges, got "
                                 f"{np.array2string(np.asarray(edges), precision=4)}.")
        return super().__new__(cls, edges, values)

    def __call__(self, t):
        b = jnp.searchsorted(self.edges, t, side="right") - 1
        return self.values[jnp.clip(b, 0, self.values.shape[0] - 1)]


def schedule_values(probs) -> np.ndarray:
    """The values of a probability schedule as a float64 array (bins, K): a
    `PiecewiseConstant`'s values, or a constant array as a single bin."""
    values = probs.values if isinstance(probs, PiecewiseConstant) else probs
    return np.atleast_2d(np.asarray(values, np.float64))


class FixedFirings(NamedTuple):
    """Fire level k (k >= 2) at exactly firings[k-2] steps per trajectory, chosen uniformly
    at random from level_key, and weight it by num_steps / firings so that every step's
    drift is unbiased on average: E[B_{n,k} / p_k] = 1 with p_k = firings / num_steps.

    Gives a predictable latency. The coins of different steps are dependent (sampling
    without replacement), so unlike Bernoulli coins a step is not unbiased given the past;
    when the corrections depend on the state this adds a small bias (docs/calibration.md).
    With coupling="nested" the fired steps of level k+1 are a subset of those of level k.
    """

    firings: tuple  # (K - 1,) firings of levels 2..K per trajectory


def geometric_probabilities(num_levels: int, ratio: float) -> np.ndarray:
    """p_k = ratio^(k-1): the simple schedule of the paper (about 0.21 is optimal at
    gamma = 2.5 for a dyadic hierarchy, see docs/method.md)."""
    if num_levels < 1:
        raise InputError(f"num_levels: expected at least 1, got {num_levels}.")
    if not 0 < ratio <= 1:
        raise InputError(f"ratio: expected a value in (0, 1], got {ratio}.")
    return ratio ** np.arange(num_levels, dtype=np.float64)
