"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) and autoguidance (Karras et al.
2024, arXiv 2406.02507) as a wrapper around a level.

With D(t, x, c) a conditional denoiser (the class label c is its `args`, -1 the null class that label
dropout trained), the guided denoiser of weight w is

    D_w(t, x, c) = (1 + w) D(t, x, c) - w D(t, x, -1),

and with autoguidance the null-class pass is replaced by a weaker model of the same family on the
same class, D_w = (1 + w) D(t, x, c) - w G(t, x, c). The weights sum to one, so the same wrapper
guides scores and reverse drifts: each is affine in D with coefficients that do not depend on the
network. D_w is linear in the level outputs, so `Multilevel(tuple(guided(D_k, w) for D_k in levels))`
is an unbiased estimate of the guided top level, and the corrections are those of the conditional
levels multiplied by (1 + w) (less w times those of the unconditional ones).

Cost: a guided call runs the network twice (one batched call of 2B images under `vmap`); count both
passes (`GUIDED_PASSES`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mlem_jax._errors import InputError

__all__ = ["guided", "NULL_LABEL", "guided_passes"]

NULL_LABEL = -1
"""The label of no class: what a conditional family's levels take for the unconditional denoiser."""


def guided_passes(weight, guide=None) -> int:
    """Network passes per guided call: 1 at a constant weight 0 (the conditional model alone), else 2."""
    return 1 if (not callable(weight) and guide is None and float(weight) == 0.0) else 2


def _check_weight_function(weight: Callable) -> None:
    """A w(t) that is negative or not finite on a probe grid of [0, 1] is refused like a constant
    one; a w(t) that cannot be evaluated outside a trace is left to the run."""
    import numpy as np

    try:
        with jax.ensure_compile_time_eval():
            probe = jnp.linspace(0.0, 1.0, 65)
            values = np.asarray(jax.vmap(lambda t: jnp.asarray(weight(t), jnp.float32))(probe), np.float64)
    except Exception:  # a weight that needs a trace (or branches on t) is checked by its own use
        return
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"weight: w(t) = {values.ravel()[i]:g} at t = {float(probe[i]):g}; expected a finite "
                         "guidance weight >= 0 at every time (0: no guidance).")


def _call_guide(guide, t, x, args):
    from flax.errors import ScopeParamShapeError

    try:
        return guide(t, x, args)
    except ScopeParamShapeError as e:
        raise InputError(f"guide: the guide level's parameters do not fit the samples (shape {tuple(x.shape)}): it "
                         "belongs to a model of another image shape or channel count. Autoguidance needs a weaker "
                         f"level of the same family. (flax: {str(e).splitlines()[0][:160]})") from None


def guided(denoiser: Callable, weight: float | Callable, *, guide: Callable | None = None,
           null_args: Any = NULL_LABEL) -> Callable:
    """The guided level `D_w(t, x, args) = (1 + w) D(t, x, args) - w D(t, x, null_args)`.

    Args:
      denoiser: a conditional level `D(t, x, args)` for one sample, `args` its class label
        (`Family.denoisers()` or `Family.drifts()` of a conditional family; any callable affine in D).
      weight: the guidance weight w >= 0, a number or a function `w(t)` (guidance intervals and
        schedules, for example `lambda t: jnp.where(t < 0.7, 2.0, 0.0)`). A constant 0 returns
        `denoiser` itself: one pass, the conditional model.
      guide: autoguidance: a weaker level `G(t, x, args)` of the same family, called with the same
        label, in place of the null-class pass.
      null_args: the `args` of the unconditional pass (the null label -1).

    The conditional and unconditional passes run as one call on a batch of two (under `vmap` over
    samples, one network call on 2B images); with `guide`, two calls of different networks.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser: expected a callable D(t, x, args), got {type(denoiser).__name__}.")
    if guide is not None and not callable(guide):
        raise TypeError(f"guide: expected a callable G(t, x, args) (a smaller level), got {type(guide).__name__}.")
    if not callable(weight):
        try:
            w0 = float(weight)
        except (TypeError, ValueError):
            raise TypeError(f"weight: expected a number or a function w(t), got {type(weight).__name__}.") from None
        if not jnp.isfinite(w0) or w0 < 0:
            raise InputError(f"weight: expected a finite guidance weight >= 0 (0: no guidance), got {w0}.")
        if w0 == 0.0 and guide is None:
            return denoiser
    else:
        _check_weight_function(weight)

    def weight_at(t):
        return jnp.asarray(weight(t) if callable(weight) else weight, jnp.result_type(float))

    def guided_denoiser(t, x, args):
        if args is None:
            raise InputError("args: a guided level needs the class label as args (an int per sample); got None.")
        w = weight_at(t)
        if guide is not None:
            cond, other = denoiser(t, x, args), _call_guide(guide, t, x, args)
        else:
            both = jax.tree_util.tree_map(lambda a, n: jnp.stack([jnp.asarray(a), jnp.broadcast_to(
                jnp.asarray(n, jnp.asarray(a).dtype), jnp.shape(a))]), args, null_args)
            out = jax.vmap(lambda a: denoiser(t, x, a))(both)
            cond, other = out[0], out[1]
        return cond + w * (cond - other)

    return guided_denoiser
