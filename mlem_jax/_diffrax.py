"""ML-EM inside `diffrax.diffeqsolve`: a drift term and a thin Euler solver.

    terms = diffrax.MultiTerm(MultilevelDrift(drifts, probs, key), diffrax.ControlTerm(g, brownian))
    sol = diffrax.diffeqsolve(terms, MultilevelEuler(), t0, t1, dt0, y0,
                              saveat=diffrax.SaveAt(t1=True, solver_state=True),
                              adjoint=diffrax.ForwardMode())
    sol.solver_state   # evaluations of each level

The term's vector field is the ML-EM estimator, its coins keyed by (key, t) the way
`diffrax.UnsafeBrownianPath` keys its noise, so it also works with the stock
`diffrax.Euler`. Solvers that evaluate the drift more than once per step (Heun,
Milstein, SRK, ...) or adaptive step sizes would silently change the scheme: use
`multilevel_diffeqsolve`, which refuses them, or `MultilevelEuler` directly.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlem_jax._solvers import level_coins, multilevel_drift
from mlem_jax._validate import check_coupling, check_key, is_concrete


def _time_key(key, t):
    """fold_in(key, bits of t), as diffrax.UnsafeBrownianPath does for its noise."""
    t = jnp.asarray(t, jnp.float32)
    return jax.random.fold_in(key, lax.bitcast_convert_type(t, jnp.int32))


class MultilevelDrift(diffrax.AbstractTerm):
    """The ML-EM drift estimator as a diffrax term (control: dt).

    `vf(t, y, args)` returns `(F, needed)`: the estimator
    F = sum_k (B_k / p_k)(f^k - f^{k-1})(t, y) with coins drawn from fold_in(key, t),
    and the int32 (K,) mask of the levels that ran. `prod` multiplies F by dt.
    """

    drifts: tuple = eqx.field(static=True)
    probs: Any
    key: Any
    coupling: str = eqx.field(static=True, default="independent")

    def __check_init__(self):
        if not isinstance(self.drifts, tuple) or not self.drifts or not all(callable(f) for f in self.drifts):
            raise TypeError("drifts: expected a non-empty tuple of drift functions f(t, y, args), cheapest first.")
        check_coupling(self.coupling)
        check_key(self.key, "key")
        if not callable(self.probs):
            shape = jnp.shape(self.probs)
            if shape != (len(self.drifts),):
                raise ValueError(f"probs: expected shape ({len(self.drifts)},), one per level, got {shape}.")
            if is_concrete(self.probs):
                p = np.asarray(self.probs)
                if p[0] != 1 or np.any(p <= 0) or np.any(p > 1) or np.any(np.isnan(p)):
                    raise ValueError(f"probs: expected p_1 = 1 and every p in (0, 1], got {p}.")

    def _probs(self, t):
        return jnp.asarray(self.probs(t) if callable(self.probs) else self.probs, jnp.float32)

    def vf(self, t, y, args):
        p = self._probs(t)
        coins = level_coins(_time_key(self.key, t), p, self.coupling)
        F, needed = multilevel_drift(self.drifts, p, coins, t, y, args)
        return F, needed.astype(jnp.int32)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def is_vf_expensive(self, t0, t1, y, args):
        # Every Runge-Kutta solver (Heun, Midpoint, Tsit5, Dopri5, ...) asks this before
        # its stages; Euler and MultilevelEuler never do. Refuse at trace time.
        raise ValueError(
            "solver: a Runge-Kutta solver (such as diffrax.Heun) evaluates a MultilevelDrift at "
            "several stages per step; each evaluation draws new coins, which silently biases "
            "ML-EM. Use mlem_jax.MultilevelEuler() (or diffrax.Euler())."
        )

    def prod(self, vf, control):
        F, _ = vf
        return jax.tree_util.tree_map(lambda v: v * jnp.asarray(control, v.dtype), F)


def _is_ml(x) -> bool:
    return isinstance(x, MultilevelDrift)


def _position(terms) -> int | None:
    """Where the MultilevelDrift sits: None if terms is (a wrapper of) it, else its
    index in the MultiTerm. Raises a TypeError for any other structure."""
    found = [x for x in jax.tree_util.tree_leaves(terms, is_leaf=_is_ml) if _is_ml(x)]
    if len(found) != 1:
        raise TypeError(
            "MultilevelEuler: terms must contain exactly one MultilevelDrift: either "
            "MultilevelDrift(...) (an ODE) or diffrax.MultiTerm(MultilevelDrift(...), "
            f"diffrax.ControlTerm(g, brownian)); found {len(found)}."
        )
    if isinstance(terms, diffrax.MultiTerm):
        hits = [i for i, t in enumerate(terms.terms)
                if any(_is_ml(x) for x in jax.tree_util.tree_leaves(t, is_leaf=_is_ml))]
        return hits[0]
    return None


class MultilevelEuler(diffrax.AbstractItoSolver):
    """Euler for a `MultilevelDrift` (plus an optional diffusion term): one estimator
    evaluation per step, and the solver state counts the evaluations of each level
    (read it with `SaveAt(..., solver_state=True)` as `sol.solver_state`)."""

    term_structure: ClassVar = diffrax.AbstractTerm
    interpolation_cls: ClassVar[Callable[..., diffrax.LocalLinearInterpolation]] = diffrax.LocalLinearInterpolation

    def order(self, terms):
        return 1

    def strong_order(self, terms):
        return 0.5

    def init(self, terms, t0, t1, y0, args):
        _position(terms)
        ml = [x for x in jax.tree_util.tree_leaves(terms, is_leaf=_is_ml) if _is_ml(x)][0]
        return jnp.zeros(len(ml.drifts), jnp.int32)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        pos = _position(terms)
        control = terms.contr(t0, t1)
        vfs = terms.vf(t0, y0, args)
        needed = (vfs if pos is None else vfs[pos])[1]
        dy = terms.prod(vfs, control)
        y1 = jax.tree_util.tree_map(lambda a, b: a + b, y0, dy)
        return y1, None, dict(y0=y0, y1=y1), solver_state + needed, diffrax.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


_ONE_EVALUATION = (diffrax.Euler, MultilevelEuler)
_FIXED_STEPS = (diffrax.ConstantStepSize, diffrax.StepTo)


def check_multilevel_solver(solver, stepsize_controller) -> None:
    """Refuse what would silently change ML-EM: several drift evaluations per step, or
    adaptive steps (whose error estimates are meaningless for a randomized drift)."""
    if not isinstance(solver, _ONE_EVALUATION):
        raise ValueError(
            f"solver: {type(solver).__name__} evaluates the drift more than once per step (or is not "
            "a plain Euler step); with a MultilevelDrift each evaluation draws new coins, which "
            "silently biases the scheme. Use mlem_jax.MultilevelEuler() (or diffrax.Euler())."
        )
    if not isinstance(stepsize_controller, _FIXED_STEPS):
        raise ValueError(
            f"stepsize_controller: {type(stepsize_controller).__name__} adapts the step from error "
            "estimates, which a randomized drift makes meaningless; use diffrax.ConstantStepSize() "
            "with dt0, or diffrax.StepTo(ts)."
        )


def multilevel_diffeqsolve(terms, solver, t0, t1, dt0, y0, args=None, *,
                           stepsize_controller=diffrax.ConstantStepSize(), adjoint=None, **kwargs):
    """`diffrax.diffeqsolve` after `check_multilevel_solver`; the adjoint defaults to
    `diffrax.ForwardMode()` (pure sampling, and what UnsafeBrownianPath needs)."""
    if not any(_is_ml(x) for x in jax.tree_util.tree_leaves(terms, is_leaf=_is_ml)):
        raise TypeError("terms: expected a MultilevelDrift (alone, or first in a diffrax.MultiTerm).")
    check_multilevel_solver(solver, stepsize_controller)
    return diffrax.diffeqsolve(terms, solver, t0, t1, dt0, y0, args, stepsize_controller=stepsize_controller,
                               adjoint=diffrax.ForwardMode() if adjoint is None else adjoint, **kwargs)
