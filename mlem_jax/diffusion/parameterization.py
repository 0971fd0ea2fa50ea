"""What a denoising network predicts, and the drift that samples with it.

With x_t = alpha x_0 + std eps, a network may predict
* "eps":   the noise eps;                       score = -eps / std
* "score": the score grad log p_t(x_t);         score = output
* "x0":    the clean data x_0;                  score = (alpha x0 - x) / std^2
* "v":     v = alpha eps - std x_0;             eps = (std x + alpha v) / (alpha^2 + std^2)

`reverse_drift` turns a score function into the drift of the reverse-time SDE
dx = [f(t) x - g(t)^2 score] dt + g(t) dW (integrated from t = 1 down to t_min, so
the solvers' steps are negative) or of the probability-flow ODE
dx = [f(t) x - g(t)^2 score / 2] dt.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

PARAMETERIZATIONS = ("eps", "score", "x0", "v")


def _check(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}."
        )


def score_from_output(sde, parameterization: str, output, x, t):
    """The score implied by a network output under `parameterization`."""
    _check(parameterization)
    alpha, std = sde.alpha(t), sde.std(t)
    if parameterization == "eps":
        return -output / std
    if parameterization == "score":
        return output
    if parameterization == "x0":
        return (alpha * output - x) / std**2
    eps = (std * x + alpha * output) / (alpha**2 + std**2)
    return -eps / std


def denoised_from_output(sde, parameterization: str, output, x, t):
    """The data prediction D = E[x_0 | x_t = x] implied by a network output: from the
    score, D = (x + std^2 score) / alpha (Tweedie's formula)."""
    _check(parameterization)
    if parameterization == "x0":
        return output
    alpha, std = sde.alpha(t), sde.std(t)
    return (x + std**2 * score_from_output(sde, parameterization, output, x, t)) / alpha


def score_from_denoiser(sde, denoiser: Callable) -> Callable:
    """score_fn(t, y, args) = (alpha D(t, y, args) - y) / std^2 from a data prediction D:
    what `reverse_drift` needs, so that EM and the diffusion samplers share one model."""
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable denoiser(t, x, args), got {type(denoiser).__name__}.")

    def score_fn(t, y, args):
        return (sde.alpha(t) * denoiser(t, y, args) - y) / sde.std(t) ** 2

    return score_fn


def target_from_noise(sde, parameterization: str, x0, eps, t):
    """What the network should output for x_t = alpha x0 + std eps (the DSM target)."""
    _check(parameterization)
    alpha, std = sde.alpha(t), sde.std(t)
    if parameterization == "eps":
        return eps
    if parameterization == "score":
        return -eps / std
    if parameterization == "x0":
        return x0
    return alpha * eps - std * x0


def reverse_drift(sde, score_fn: Callable, probability_flow: bool = False) -> Callable:
    """The drift f(t, y, args) of the reverse-time SDE (or the probability-flow ODE).

    `score_fn(t, y, args)` returns the score at (t, y). Use it with a decreasing grid
    (for example `uniform_grid`) and `reverse_diffusion(sde)` (or None for the ODE).
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
