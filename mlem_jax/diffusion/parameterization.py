"""What a denoising network predicts, and the drift that samples with it.

With x_t = alpha x_0 + std eps, a network may predict
* "eps":   the noise eps;                       score = -eps / std
* "score": the score grad log p_t(x_t);         score = output
* "x0":    the clean data x_0;                  score = (alpha x0 - x) / std^2
* "v":     v = alpha eps - std x_0;             eps = (std x + alpha v) / (alpha^2 + std^2)
  (the VP v-prediction of Salimans and Ho, 2022);
* "flow":  the velocity u = alpha' x_0 + std' eps = d x_t / dt along the path (for the
  flow schedule, u = eps - x_0); x_0 = (std' x - std u) / (alpha std' - std alpha'), with
  the derivatives of alpha(t) and std(t) taken by forward-mode autodiff, so it holds for any
  schedule (for `Flow`, x_0 = x - t u).

Every function here takes (t, x) first, as every callable of the library does ((t, x, args);
docs/api.md). `network_score` / `network_denoiser` turn a network `network(t, x, args) -> output`
into the score or the data prediction the samplers take.

`reverse_drift` turns a score function into the drift of the reverse-time SDE
dx = [f(t) x - g(t)^2 score] dt + g(t) dW (integrated from t = 1 down to t_min, so
the solvers' steps are negative) or of the probability-flow ODE
dx = [f(t) x - g(t)^2 score / 2] dt.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mlem_jax._errors import InputError

PARAMETERIZATIONS = ("eps", "score", "x0", "v", "flow")


def _check(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise InputError(
            f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}."
        )


def _check_order(name: str, order: str, t, x, value, value_name: str) -> None:
    """Refuse, at trace time, a call in the old (value, x, t) order: t shaped like x while the value
    is not (a value is always shaped like x)."""
    if jnp.shape(t) == jnp.shape(x) and jnp.shape(value) != jnp.shape(x):
        raise InputError(f"{name}: expected the arguments {order}, with {value_name} shaped like x "
                         f"{jnp.shape(x)}; got t of shape {jnp.shape(t)} and {value_name} of shape "
                         f"{jnp.shape(value)}, which looks like the old order with t last: put t and x first.")


def score_from_output(sde, parameterization: str, t, x, output):
    """The score implied by a network output at (t, x) under `parameterization`.

    (t, x) come first, as in every callable of the library; `output` is shaped like x (a call in the
    old order `(output, x, t)` is refused).

    Args:
      sde: the schedule.
      parameterization: what the output is: "eps", "score", "x0", "v" or "flow".
      t: the time.
      x: the state x_t.
      output: the network's output at (t, x), shaped like x.
    """
    _check(parameterization)
    _check_order("score_from_output", "(sde, parameterization, t, x, output)", t, x, output, "output")
    return _score(sde, parameterization, t, x, output)


def _rates(sde, t):
    """(alpha, std, alpha', std') at t, the derivatives by forward-mode autodiff."""
    t = jnp.asarray(t, jnp.result_type(float))
    alpha, d_alpha = jax.jvp(sde.alpha, (t,), (jnp.ones_like(t),))
    std, d_std = jax.jvp(sde.std, (t,), (jnp.ones_like(t),))
    return alpha, std, d_alpha, d_std


def _x0_from_velocity(sde, t, x, u):
    alpha, std, d_alpha, d_std = _rates(sde, t)
    return (d_std * x - std * u) / (alpha * d_std - std * d_alpha)


def _score(sde, parameterization, t, x, output):
    alpha, std = sde.alpha(t), sde.std(t)
    if parameterization == "flow":
        return (alpha * _x0_from_velocity(sde, t, x, output) - x) / std**2
    if parameterization == "eps":
        return -output / std
    if parameterization == "score":
        return output
    if parameterization == "x0":
        return (alpha * output - x) / std**2
    eps = (std * x + alpha * output) / (alpha**2 + std**2)
    return -eps / std


def denoised_from_output(sde, parameterization: str, t, x, output):
    """The data prediction D = E[x_0 | x_t = x] implied by a network output at (t, x): from the
    score, D = (x + std^2 score) / alpha (Tweedie's formula). The old order `(output, x, t)` is refused.

    Args:
      sde: the schedule.
      parameterization: what the output is: "eps", "score", "x0", "v" or "flow".
      t: the time.
      x: the state x_t.
      output: the network's output at (t, x), shaped like x.
    """
    _check(parameterization)
    _check_order("denoised_from_output", "(sde, parameterization, t, x, output)", t, x, output, "output")
    if parameterization == "x0":
        return output
    if parameterization == "flow":
        return _x0_from_velocity(sde, t, x, output)
    alpha, std = sde.alpha(t), sde.std(t)
    return (x + std**2 * _score(sde, parameterization, t, x, output)) / alpha


def network_score(sde, parameterization: str, network: Callable) -> Callable:
    """score_fn(t, x, args) from a network `network(t, x, args) -> output` that predicts eps, the score,
    x_0 or v (`parameterization`): what `reverse_drift` and the EM levels take.

    Args:
      sde: the schedule.
      parameterization: what the network predicts: "eps", "score", "x0", "v" or "flow".
      network: network(t, x, args) -> output.
    """
    _check(parameterization)
    if not callable(network):
        raise TypeError(f"network: expected a callable network(t, x, args) -> output, got {type(network).__name__}.")
    return lambda t, x, args: _score(sde, parameterization, t, x, network(t, x, args))


def network_denoiser(sde, parameterization: str, network: Callable) -> Callable:
    """denoiser(t, x, args) = E[x_0 | x_t = x] from a network `network(t, x, args) -> output` that predicts
    eps, the score, x_0 or v: what `ddim`, `dpm_solver_pp` and the other diffusion samplers take.

    Args:
      sde: the schedule.
      parameterization: what the network predicts: "eps", "score", "x0", "v" or "flow".
      network: network(t, x, args) -> output.
    """
    _check(parameterization)
    if not callable(network):
        raise TypeError(f"network: expected a callable network(t, x, args) -> output, got {type(network).__name__}.")

    def denoiser(t, x, args):
        out = network(t, x, args)
        if parameterization == "x0":
            return out
        if parameterization == "flow":
            return _x0_from_velocity(sde, t, x, out)
        return (x + sde.std(t) ** 2 * _score(sde, parameterization, t, x, out)) / sde.alpha(t)

    return denoiser


def score_from_denoiser(sde, denoiser: Callable) -> Callable:
    """score_fn(t, y, args) = (alpha D(t, y, args) - y) / std^2 from a data prediction D:
    what `reverse_drift` needs, so that EM and the diffusion samplers share one model."""
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable denoiser(t, x, args), got {type(denoiser).__name__}.")

    def score_fn(t, y, args):
        return (sde.alpha(t) * denoiser(t, y, args) - y) / sde.std(t) ** 2

    return score_fn


def target_from_noise(sde, parameterization: str, t, x0, eps):
    """What the network should output at time t for x_t = alpha x0 + std eps (the DSM target).
    The old order `(x0, eps, t)` is refused.

    Args:
      sde: the schedule.
      parameterization: "eps", "score", "x0", "v" or "flow".
      t: the time.
      x0: the data.
      eps: the noise, shaped like x0.
    """
    _check(parameterization)
    if jnp.shape(t) == jnp.shape(x0) and jnp.shape(eps) != jnp.shape(x0):
        raise InputError(f"target_from_noise: expected the arguments (sde, parameterization, t, x0, eps) with eps "
                         f"shaped like x0 {jnp.shape(x0)}; got t of shape {jnp.shape(t)} and eps of shape "
                         f"{jnp.shape(eps)}, which looks like the old order (x0, eps, t): put t first.")
    alpha, std = sde.alpha(t), sde.std(t)
    if parameterization == "eps":
        return eps
    if parameterization == "score":
        return -eps / std
    if parameterization == "x0":
        return x0
    if parameterization == "flow":
        _, _, d_alpha, d_std = _rates(sde, t)
        return d_alpha * x0 + d_std * eps
    return alpha * eps - std * x0


def reverse_drift(sde, score_fn: Callable, probability_flow: bool = False) -> Callable:
    """The drift f(t, y, args) of the reverse-time SDE (or the probability-flow ODE).

    `score_fn(t, y, args)` returns the score at (t, y). Use it with a decreasing grid
    (for example `uniform_grid`) and `reverse_diffusion(sde)` (or None for the ODE).

    Args:
      sde: the forward SDE.
      score_fn: score_fn(t, y, args), the score at (t, y).
      probability_flow: the probability-flow ODE's drift instead of the reverse SDE's.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn: expected a callable score_fn(t, y, args), got {type(score_fn).__name__}.")
    weight = 0.5 if probability_flow else 1.0

    def drift(t, y, args):
        g2 = sde.diffusion(t) ** 2
        return (sde.drift_coeff(t) * y - weight * g2 * score_fn(t, y, args)).astype(y.dtype)

    return drift


def reverse_diffusion(sde) -> Callable:
    """g(t, y, args) of the reverse-time SDE (a scalar, broadcast over the state)."""
    return lambda t, y, args: sde.diffusion(t).astype(jnp.result_type(y))
