"""ML-EM inside `diffrax.diffeqsolve`: a drift term and a thin Euler solver.

    terms = diffrax.MultiTerm(MultilevelDrift(drifts, probs, key), diffrax.ControlTerm(g, brownian))
    sol = diffrax.diffeqsolve(terms, MultilevelEuler(), t0, t1, dt0, y0,
                              saveat=diffrax.SaveAt(t1=True, solver_state=True),
                              adjoint=diffrax.ForwardMode())
    sol.solver_state   # evaluations of each level

The term's vector field is the ML-EM estimator. Without a grid its coins are keyed by
(key, t) the way `diffrax.UnsafeBrownianPath` keys its noise, so it also works with the
stock `diffrax.Euler`. Given the grid (`ts=`, the times of `diffrax.StepTo(ts)` or of a
constant step size), the coins are keyed by the step index instead: the same key then
gives exactly the coins of `multilevel_euler_maruyama(..., level_key=key)`, and
`coins="stratified"` (planned over the whole grid) becomes available. Solvers that
evaluate the drift more than once per step (Heun, Milstein, SRK, ...) or adaptive step
sizes would silently change the scheme: use `multilevel_diffeqsolve`, which refuses them, or `MultilevelEuler` directly.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mlem_jax._coins import Coins, Coupling, level_coins, probabilities_on_grid, stratified_coins
from mlem_jax._errors import InputError
from mlem_jax._multilevel import multilevel_drift
from mlem_jax._validate import (
    check_coins,
    check_coupling,
    check_drifts,
    check_key,
    check_probs,
    check_ts,
    check_y0,
    is_concrete,
)


def _time_key(key, t):
    """fold_in(key, bits of t), as diffrax.UnsafeBrownianPath does for its noise."""
    t = jnp.asarray(t, jnp.float32)
    return jax.random.fold_in(key, lax.bitcast_convert_type(t, jnp.int32))


class MultilevelDrift(diffrax.AbstractTerm):
    """The ML-EM drift estimator as a diffrax term (control: dt).

    `vf(t, y, args)` returns `(F, needed)`: the estimator
    F = sum_k (B_k / p_k)(f^k - f^{k-1})(t, y) and the int32 (K,) mask of the levels that
    ran. `prod` multiplies F by dt.

    Args:
      drifts: (f^1, ..., f^K), cheapest first.
      probs: (K,) probabilities with p_1 = 1, or a function of t returning them.
      key: the level key.
      coupling: "independent" or "nested".
      coins: "iid" or "stratified" (needs `ts`).
      ts: the step grid the solver will use (the times of `diffrax.StepTo(ts)`, or
        t0 + dt0 * arange(N + 1) for a constant step). With it, the coins of step n come
        from the step index, as on the scan route; a time off this grid is an error.
    """

    drifts: tuple = eqx.field(static=True)
    probs: Any
    key: Any
    coupling: str = eqx.field(static=True)
    coins: str = eqx.field(static=True)
    ts: Any
    plan: Any  # (N, K) bool stratified coins, or None

    def __init__(self, drifts, probs, key, *, coupling: Coupling = "independent", coins: Coins = "iid", ts=None):
        if not isinstance(drifts, tuple) or not drifts or not all(callable(f) for f in drifts):
            raise TypeError("drifts: expected a non-empty tuple of drift functions f(t, y, args), cheapest first.")
        self.drifts = drifts
        self.coupling = check_coupling(coupling)
        self.coins = check_coins(coins)
        check_key(key, "key")
        self.key = key
        if coins == "stratified" and ts is None:
            raise InputError(
                "ts: coins='stratified' plans the firings over the whole grid, so the term needs the "
                "grid: pass ts=... (the times of diffrax.StepTo(ts), or t0 + dt0 * jnp.arange(N + 1) "
                "for diffrax.ConstantStepSize())."
            )
        ts = None if ts is None else check_ts(ts)
        # without a grid, a schedule's values are checked at t = 0 here, and at every time the solver steps to
        probs_fn = check_probs(probs, len(drifts), self.coupling, jnp.zeros(2) if ts is None else ts)
        self.probs = probs
        self.ts = ts
        if coins == "stratified":
            p_grid = probabilities_on_grid(probs_fn, ts).astype(jnp.float32)
            self.plan = stratified_coins(key, p_grid, self.coupling)
        else:
            self.plan = None

    def _probs(self, t):
        p = jnp.asarray(self.probs(t) if callable(self.probs) else self.probs, jnp.float32)
        if self.ts is None and callable(self.probs):  # times no grid gave in advance: checked where they occur
            from mlem_jax._validate import probabilities_checked_at_call

            p = probabilities_checked_at_call(p, self.coupling)
        return p

    def step_index(self, t):
        """The index n of the grid point ts[n] that t is (an error if t is off the grid)."""
        grid = self.ts[:-1]
        n = jnp.argmin(jnp.abs(grid - t))
        tol = 1e-5 * jnp.max(jnp.abs(self.ts)) + 1e-6 * jnp.min(jnp.abs(jnp.diff(self.ts)))
        n = eqx.error_if(
            n, jnp.abs(grid[n] - t) > tol,
            "MultilevelDrift: the solver stepped at a time that is not on the grid ts the term was "
            "built with; use diffrax.StepTo(ts) (or a ConstantStepSize whose steps are ts)."
        )
        return n

    def vf(self, t, y, args):
        p = self._probs(t)
        if self.ts is None:
            coins = level_coins(_time_key(self.key, t), p, self.coupling)
        else:
            n = self.step_index(t)
            if self.plan is None:
                coins = level_coins(jax.random.fold_in(self.key, n), p, self.coupling)
            else:
                coins = self.plan[n]
        F, needed = multilevel_drift(self.drifts, p, coins, t, y, args)
        return F, needed.astype(jnp.int32)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def is_vf_expensive(self, t0, t1, y, args):
        # Every Runge-Kutta solver (Heun, Midpoint, Tsit5, Dopri5, ...) asks this before
        # its stages; Euler and MultilevelEuler never do. Refuse at trace time.
        raise InputError(
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
        raise InputError(
            f"solver: {type(solver).__name__} evaluates the drift more than once per step (or is not "
            "a plain Euler step); with a MultilevelDrift each evaluation draws new coins, which "
            "silently biases the scheme. Use mlem_jax.MultilevelEuler() (or diffrax.Euler())."
        )
    if not isinstance(stepsize_controller, _FIXED_STEPS):
        raise InputError(
            f"stepsize_controller: {type(stepsize_controller).__name__} adapts the step from error "
            "estimates, which a randomized drift makes meaningless; use diffrax.ConstantStepSize() "
            "with dt0, or diffrax.StepTo(ts)."
        )


def check_grid(term: MultilevelDrift, t0, t1, dt0, stepsize_controller) -> None:
    """A term built with `ts` must be solved on exactly that grid (checked when concrete)."""
    if term.ts is None or not is_concrete((term.ts, t0, t1, dt0)):
        return
    ts = np.asarray(term.ts, np.float64)
    if isinstance(stepsize_controller, diffrax.StepTo):
        steps = np.asarray(stepsize_controller.ts, np.float64)
        ok = steps.shape == ts.shape and np.allclose(steps, ts, rtol=1e-6, atol=1e-9)
        what = "diffrax.StepTo's ts"
    else:
        dt = None if dt0 is None else float(dt0)
        ok = dt is not None and np.allclose(np.diff(ts), dt, rtol=1e-4, atol=1e-9)
        what = f"a constant step dt0={dt0}"
    ok = ok and np.isclose(float(t0), ts[0]) and np.isclose(float(t1), ts[-1])
    if not ok:
        raise InputError(
            f"ts: the MultilevelDrift was built for a grid of {ts.size - 1} steps from {ts[0]:g} to "
            f"{ts[-1]:g}, but the solve uses {what} from t0={float(t0):g} to t1={float(t1):g}; its "
            "coins are planned per step of that grid. Solve with stepsize_controller="
            "diffrax.StepTo(ts) (and dt0=None), using the same ts."
        )


def multilevel_diffeqsolve(terms, solver, t0, t1, dt0, y0, args=None, *,
                           stepsize_controller=diffrax.ConstantStepSize(), adjoint=None, **kwargs):
    """`diffrax.diffeqsolve` after `check_multilevel_solver`; the adjoint defaults to
    `diffrax.ForwardMode()` (pure sampling, and what UnsafeBrownianPath needs).

    Args:
      terms: the diffrax terms, with a `MultilevelDrift` as the drift of an SDE or ODE.
      solver: a `MultilevelEuler` (or another solver `check_multilevel_solver` accepts).
      t0: the start of the interval.
      t1: its end.
      dt0: the constant step (adaptive steps are refused).
      y0: the initial state (a pytree).
      args: passed to every term.
      stepsize_controller: `diffrax.ConstantStepSize()` or `StepTo` only.
      adjoint: default `diffrax.ForwardMode()`.
      **kwargs: passed to `diffrax.diffeqsolve` (saveat, max_steps, ...)."""
    found = [x for x in jax.tree_util.tree_leaves(terms, is_leaf=_is_ml) if _is_ml(x)]
    if not found:
        raise TypeError("terms: expected a MultilevelDrift (alone, or first in a diffrax.MultiTerm).")
    check_multilevel_solver(solver, stepsize_controller)
    check_grid(found[0], t0, t1, dt0, stepsize_controller)
    y0 = check_y0(y0)
    check_drifts(found[0].drifts, jnp.asarray(t0), y0, args)  # the scan route's message, not a cond error
    return diffrax.diffeqsolve(terms, solver, t0, t1, dt0, y0, args, stepsize_controller=stepsize_controller,
                               adjoint=diffrax.ForwardMode() if adjoint is None else adjoint, **kwargs)
