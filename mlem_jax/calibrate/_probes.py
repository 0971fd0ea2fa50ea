"""Probes: models that record where a solver calls them and with which weight each call
enters the result, so that calibration can weigh each call's correction (`solver_calls`,
`solver_sensitivities`). A probe plugs into any solver of the library through the core's
`model_calls` extension point: it plans its own calls."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from mlem_jax import _validate
from mlem_jax._errors import InputError
from mlem_jax._multilevel import ModelCalls

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CallProbe:
    """A model that records where a solver calls it, for calibration.

    Call n returns model(t_n, x_n) + offsets[n] (a scalar added to every component, or a
    perturbation shaped like the state) and stores x_n; the solver then returns a
    `ProbeRecord`. With `through_model=False` the model sees its input through
    `stop_gradient`, so the derivative of the solver's output with respect to offsets[n]
    is the coefficient with which call n's output enters the result through the solver's
    own linear algebra (for Euler-Maruyama h_n; for DPM-Solver++ the multistep weights,
    summed over the steps that reuse the value). With `through_model=True` it is the whole
    sensitivity of the output to call n's value, carried through the later model calls
    (their Jacobians) as well.
    """

    model: Callable
    offsets: Any = None  # (number of calls,) or a pytree like y of (number of calls, ...); None adds nothing
    through_model: bool = False  # False: the model sees stop_gradient(x)

    def model_calls(self, call_times, y0, args, name="drift") -> ModelCalls:
        """The solver's calls: the model plus offsets[n] at call n, recording x_n (see the class)."""
        return _probe_calls(self, call_times, y0, args, name)


class ProbeRecord(NamedTuple):
    """What a solver run on a `CallProbe` returns: its final state `y`, the time of every
    model call (N,) and the state it was made at (a pytree of (N, ...) arrays)."""

    y: PyTree
    times: jax.Array
    states: PyTree


def _probe_calls(probe: CallProbe, call_times, y0, args, name) -> ModelCalls:
    """The calls of a solver run on `probe` (its `model_calls`)."""
    _validate.check_drift(probe.model, call_times[0], y0, args, name=name)
    num_calls = call_times.shape[0]
    offsets = jnp.zeros(num_calls) if probe.offsets is None else probe.offsets  # None: only record
    scalar = not isinstance(offsets, (tuple, list, dict)) and jnp.ndim(offsets) == 1
    if scalar and jnp.shape(offsets) != (num_calls,):
        raise InputError(f"offsets: expected one offset per model call ({num_calls}), got shape "
                         f"{jnp.shape(offsets)}.")
    states0 = jax.tree_util.tree_map(lambda a: jnp.zeros((num_calls, *jnp.shape(a)), jnp.result_type(a)), y0)

    def call(n, t, x, states):
        out = probe.model(t, x if probe.through_model else jax.lax.stop_gradient(x), args)
        if scalar:
            out = jax.tree_util.tree_map(lambda o: o + offsets[n].astype(o.dtype), out)
        else:
            out = jax.tree_util.tree_map(lambda o, d: o + d[n].astype(o.dtype), out, offsets)
        return out, jax.tree_util.tree_map(lambda buf, v: buf.at[n].set(v), states, x)

    return ModelCalls(states0, call, lambda y, states: ProbeRecord(y, call_times, states))
