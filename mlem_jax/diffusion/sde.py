"""Forward SDEs dx = f(t) x dt + g(t) dW on t in [0, 1] with Gaussian marginals
x_t | x_0 ~ N(alpha(t) x_0, std(t)^2 I), and sampling grids as plain arrays.

* VP (DDPM / score SDE): beta(t) = beta_min + t (beta_max - beta_min), f = -beta/2,
  g = sqrt(beta), alpha = exp(-B(t)/2) with B(t) = int_0^t beta, std^2 = 1 - alpha^2.
* sub-VP: as VP with g^2 = beta (1 - exp(-2 B(t))) and std^2 = (1 - alpha^2)^2.
* VE (SMLD): sigma(t) = sigma_min (sigma_max / sigma_min)^t, f = 0,
  g = sigma sqrt(2 log(sigma_max / sigma_min)), alpha = 1, std^2 = sigma^2 - sigma_min^2.
* Flow (rectified flow / flow matching, Lipman et al. 2023, Liu et al. 2023): the linear
  path x_t = (1 - t) x_0 + t eps, alpha = 1 - t, std = t; its forward SDE has
  f = -1 / (1 - t) and g^2 = 2 t / (1 - t), which diverge at t = 1, so its grids start at
  `Flow.t_max` = 0.999 (where x_t is noise up to 0.001 x_0). Shifts (SD3's constant and
  resolution-dependent ones, the terminal stretch) are maps of a grid's times:
  `shift_times`, `resolution_shift`, `stretch_to_terminal`.

Each SDE is a frozen dataclass registered as a pytree (its parameters are the leaves).
"""

from __future__ import annotations

import abc
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError


class AbstractSDE(abc.ABC):
    """The interface every SDE provides, and what all of them share."""

    t_max = 1.0

    @abc.abstractmethod
    def drift_coeff(self, t): ...  # f(t), the drift is f(t) x

    @abc.abstractmethod
    def diffusion(self, t): ...  # g(t)

    @abc.abstractmethod
    def alpha(self, t): ...  # marginal mean coefficient

    @abc.abstractmethod
    def std(self, t): ...  # marginal standard deviation

    @abc.abstractmethod
    def prior_sample(self, key, shape): ...

    def marginal(self, key, x0, t):
        """A draw of x_t given x_0, and the noise used: (alpha x0 + std eps, eps)."""
        eps = jax.random.normal(key, jnp.shape(x0), jnp.result_type(x0))
        return self.alpha(t) * x0 + self.std(t) * eps, eps

    def noise_to_signal(self, t):
        """sigma(t) = std / alpha, the noise level of the rescaled marginal."""
        return self.std(t) / self.alpha(t)


@dataclasses.dataclass(frozen=True)
class VP(AbstractSDE):
    """Variance-preserving SDE: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dW, beta linear from
    beta_min to beta_max."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def _int_beta(self, t):
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def drift_coeff(self, t):
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min))

    def diffusion(self, t):
        return jnp.sqrt(self.beta_min + t * (self.beta_max - self.beta_min))

    def alpha(self, t):
        return jnp.exp(-0.5 * self._int_beta(t))

    def std(self, t):
        return jnp.sqrt(-jnp.expm1(-self._int_beta(t)))

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape)


@dataclasses.dataclass(frozen=True)
class SubVP(VP):
    """The VP schedule and drift, with g^2 = beta (1 - exp(-2 B(t)))."""

    def diffusion(self, t):
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return jnp.sqrt(beta * -jnp.expm1(-2.0 * self._int_beta(t)))

    def std(self, t):
        return -jnp.expm1(-self._int_beta(t))

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape) * self.std(1.0)


@dataclasses.dataclass(frozen=True)
class VE(AbstractSDE):
    """Variance-exploding SDE: dx = sqrt(d sigma(t)^2 / dt) dW, sigma geometric from
    sigma_min to sigma_max."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift_coeff(self, t):
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def diffusion(self, t):
        return self.sigma(t) * jnp.sqrt(2.0 * jnp.log(self.sigma_max / self.sigma_min))

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def std(self, t):
        return jnp.sqrt(self.sigma(t) ** 2 - self.sigma_min**2)

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape) * self.sigma_max


@dataclasses.dataclass(frozen=True)
class Flow(AbstractSDE):
    """The rectified-flow path x_t = (1 - t) x_0 + t eps (alpha = 1 - t, std = t), whose
    velocity is u = eps - x_0. Samplers and grids take it like any SDE; start grids at
    `t_max` = 0.999 (the default of `logsnr_grid` and `karras_grid` for it), where the
    reverse SDE's drift and diffusion are still finite."""

    t_max = 0.999

    def drift_coeff(self, t):
        return -1.0 / (1.0 - jnp.asarray(t, jnp.result_type(float)))

    def diffusion(self, t):
        t = jnp.asarray(t, jnp.result_type(float))
        return jnp.sqrt(2.0 * t / (1.0 - t))

    def alpha(self, t):
        return 1.0 - jnp.asarray(t, jnp.result_type(float))

    def std(self, t):
        return jnp.asarray(t, jnp.result_type(float)) * 1.0

    def prior_sample(self, key, shape):
        return jax.random.normal(key, shape)


for _cls in (VP, SubVP, VE, Flow):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
    )


# ----------------------------------------------------------------------------- grids


def _check_grid(n: int, t_min: float, t_max: float) -> None:
    if int(n) != n or n < 1:
        raise InputError(f"num_steps: expected a positive integer, got {n!r}.")
    if not 0 < t_min < t_max:
        hint = (" At t = 0 the noise level is zero, where the samplers' log-SNR and the score are infinite; use a "
                "small positive t_min such as 1e-3 (the default) or 1e-5.") if t_min == 0 else ""
        raise InputError(f"t_min: expected 0 < t_min < t_max = {t_max}, got {t_min}.{hint}")


def uniform_grid(num_steps: int, t_min: float = 1e-3, t_max: float = 1.0) -> jax.Array:
    """num_steps + 1 times from t_max down to t_min, equally spaced.

    Args:
      num_steps: the number of steps (num_steps + 1 times).
      t_min: the last time.
      t_max: the first time.
    """
    _check_grid(num_steps, t_min, t_max)
    return jnp.linspace(t_max, t_min, num_steps + 1)


def quadratic_grid(num_steps: int, t_min: float = 1e-3, t_max: float = 1.0) -> jax.Array:
    """Times t_min + (t_max - t_min) u^2 for u from 1 to 0: finer steps near the data.

    Args:
      num_steps: the number of steps (num_steps + 1 times).
      t_min: the last time.
      t_max: the first time.
    """
    _check_grid(num_steps, t_min, t_max)
    u = jnp.linspace(1.0, 0.0, num_steps + 1)
    return t_min + (t_max - t_min) * u**2


def _times_at_noise_levels(sde, target, t_min: float, t_max: float) -> jax.Array:
    """The times whose sigma = std / alpha equals `target` (decreasing), by bisection
    (sigma increases with t), with the ends pinned to t_max and t_min."""
    sig = lambda t: np.asarray(sde.noise_to_signal(jnp.asarray(t, jnp.float32)), np.float64)
    lo, hi = np.full_like(target, t_min), np.full_like(target, t_max)
    for _ in range(60):
        mid = (lo + hi) / 2
        up = sig(mid) < target
        lo, hi = np.where(up, mid, lo), np.where(up, hi, mid)
    t = (lo + hi) / 2
    t[0], t[-1] = t_max, t_min
    return jnp.asarray(t, jnp.float32)


def _noise_range(sde, t_min, t_max):
    sig = lambda t: float(np.asarray(sde.noise_to_signal(jnp.asarray(t, jnp.float32)), np.float64))
    return sig(t_min), sig(t_max)


def karras_grid(sde, num_steps: int, t_min: float = 1e-3, t_max: float | None = None, rho: float = 7.0) -> jax.Array:
    """Karras et al. (2022): noise levels sigma_i = (s_max^(1/rho) + i/n (s_min^(1/rho) -
    s_max^(1/rho)))^rho in sigma = std/alpha, mapped back to times by bisection. `t_max`
    defaults to the SDE's (1, or 0.999 for `Flow`).

    Args:
      sde: the schedule whose sigma / alpha is spaced.
      num_steps: the number of steps (num_steps + 1 times).
      t_min: the last time.
      t_max: the first time (default: the schedule's `t_max`).
      rho: Karras et al.'s exponent.
    """
    t_max = sde.t_max if t_max is None else t_max
    _check_grid(num_steps, t_min, t_max)
    s_min, s_max = _noise_range(sde, t_min, t_max)
    i = np.arange(num_steps + 1) / num_steps
    target = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _times_at_noise_levels(sde, target, t_min, t_max)


def logsnr_grid(sde, num_steps: int, t_min: float = 1e-3, t_max: float | None = None) -> jax.Array:
    """Times from t_max down to t_min at equally spaced half log-SNR lambda = log(alpha / std)
    (equivalently, log sigma equally spaced), the grid DPM-Solver++ is designed for (Lu et
    al. 2022): every step has the same h = lambda_{i} - lambda_{i-1}. `t_max` defaults to
    the SDE's (1, or 0.999 for `Flow`).

    Args:
      sde: the schedule whose log-SNR is spaced.
      num_steps: the number of steps (num_steps + 1 times).
      t_min: the last time.
      t_max: the first time (default: the schedule's `t_max`).
    """
    t_max = sde.t_max if t_max is None else t_max
    _check_grid(num_steps, t_min, t_max)
    s_min, s_max = _noise_range(sde, t_min, t_max)
    target = np.exp(np.linspace(np.log(s_max), np.log(s_min), num_steps + 1))
    return _times_at_noise_levels(sde, target, t_min, t_max)


# ----------------------------------------------------------------------- flow shifts


def shift_times(ts, shift: float) -> jax.Array:
    """The shifted times t' = shift t / (1 + (shift - 1) t) of a grid (SD3's timestep shift,
    Esser et al. 2024; `FlaxFlowMatchScheduler` in maxdiffusion): shift > 1 spends more steps
    at high noise. On the flow path it multiplies sigma / alpha = t / (1 - t) by `shift`, so a
    log-SNR grid keeps its spacing and moves its ends."""
    if not (np.isfinite(shift) and shift > 0):
        raise InputError(f"shift: expected a finite shift > 0 (1: none), got {shift!r}.")
    ts = jnp.asarray(ts)
    return shift * ts / (1.0 + (shift - 1.0) * ts)


def resolution_shift(num_tokens: int, min_tokens: int = 1024, max_tokens: int = 4096, min_mu: float = 0.95,
                     max_mu: float = 2.05) -> float:
    """SD3's resolution-dependent shift e^mu, mu linear in the number of image tokens from
    `min_mu` at `min_tokens` to `max_mu` at `max_tokens` (t' = e^mu / (e^mu + 1/t - 1), which is
    `shift_times` with shift = e^mu). The defaults are the figures of the issue that asked for it
    (mu 0.95..2.05 over 1024..4096 tokens); FLUX uses 0.5..1.15 over 256..4096.

    Args:
      num_tokens: the image's tokens (patches).
      min_tokens: the resolution at which the shift is exp(min_mu).
      max_tokens: the resolution at which it is exp(max_mu).
      min_mu: log of the shift at `min_tokens`.
      max_mu: log of the shift at `max_tokens`.
    """
    if not num_tokens > 0 or not max_tokens > min_tokens:
        raise InputError(f"num_tokens: expected > 0 with max_tokens > min_tokens, got {num_tokens}, {min_tokens}, "
                         f"{max_tokens}.")
    mu = min_mu + (max_mu - min_mu) * (num_tokens - min_tokens) / (max_tokens - min_tokens)
    return float(np.exp(mu))


def stretch_to_terminal(ts, terminal: float) -> jax.Array:
    """Stretch a decreasing grid so that it ends at `terminal`, keeping t_max: 1 - t is scaled
    by (1 - terminal) / (1 - ts[-1]) (the terminal stretch of SD3.5 and Wan's schedulers)."""
    ts = jnp.asarray(ts)
    if not 0 < terminal < float(ts[0]):
        raise InputError(f"terminal: expected 0 < terminal < ts[0] = {float(ts[0])}, got {terminal!r}.")
    one_minus = 1.0 - ts
    return 1.0 - one_minus * (1.0 - terminal) / one_minus[-1]
