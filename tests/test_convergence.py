"""Measured strong and weak orders of euler_maruyama on SDEs with known solutions.

Strong errors use one Brownian path per sample on a fine grid; coarse grids sum its
increments, and the exact solution is computed from the same path. Weak errors use
exact means. Slopes are fitted in log-log and must be within 0.15 of theory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import euler_maruyama

FINE = 2**12
COARSE = [2**j for j in range(2, 8)]


def _fine_paths(key, M):
    return jax.random.normal(key, (M, FINE)) * jnp.sqrt(1.0 / FINE)


def _coarse(dw_fine, n):
    return dw_fine.reshape(dw_fine.shape[0], n, FINE // n).sum(-1)


def _slope(hs, errs):
    return np.polyfit(np.log(hs), np.log(errs), 1)[0]


def _strong_errors(drift, diffusion, x0, exact_fn, M=4000):
    dw = _fine_paths(jax.random.key(0), M)
    exact = exact_fn(dw)
    errs = []
    for n in COARSE:
        ts = jnp.linspace(0.0, 1.0, n + 1)
        em = jax.jit(jax.vmap(lambda inc: euler_maruyama(drift, diffusion, jnp.float32(x0), ts, inc)))
        errs.append(float(jnp.mean(jnp.abs(em(_coarse(dw, n)) - exact))))
    return np.array([1.0 / n for n in COARSE]), np.array(errs)


def test_strong_order_gbm():
    mu, sigma, x0 = 0.5, 0.8, 1.0
    hs, errs = _strong_errors(
        lambda t, y, a: mu * y,
        lambda t, y, a: sigma * y,
        x0,
        lambda dw: x0 * jnp.exp((mu - sigma**2 / 2) + sigma * dw.sum(-1)),
    )
    assert abs(_slope(hs, errs) - 0.5) < 0.15, errs


def test_strong_order_ou_additive_noise():
    """Additive noise: EM coincides with Milstein and has strong order 1."""
    theta, sigma, x0 = 2.0, 0.5, 1.0

    def exact(dw):
        # X_T = e^{-theta} x0 + sigma W_T - sigma theta int_0^1 e^{-theta(1-s)} W_s ds
        w = jnp.concatenate([jnp.zeros((dw.shape[0], 1)), jnp.cumsum(dw, -1)], -1)
        s = jnp.linspace(0.0, 1.0, FINE + 1)
        integrand = jnp.exp(-theta * (1 - s)) * w
        integral = (integrand[:, 1:] + integrand[:, :-1]).sum(-1) / (2 * FINE)
        return jnp.exp(-theta) * x0 + sigma * w[:, -1] - sigma * theta * integral

    hs, errs = _strong_errors(lambda t, y, a: -theta * y, lambda t, y, a: sigma, x0, exact)
    assert abs(_slope(hs, errs) - 1.0) < 0.15, errs


@pytest.mark.parametrize(
    "name, drift, diffusion, x0, mean, steps",
    [
        ("gbm", lambda t, y, a: 1.0 * y, lambda t, y, a: 0.2 * y, 1.0, np.exp(1.0), [8, 16, 32, 64, 128]),
        ("ou", lambda t, y, a: -2.0 * y, lambda t, y, a: 0.5, 2.0, 2.0 * np.exp(-2.0), [4, 8, 16, 32, 64]),
    ],
)
def test_weak_order(name, drift, diffusion, x0, mean, steps):
    M = 200_000
    keys = jax.random.split(jax.random.key(1), M)
    errs, ses = [], []
    for n in steps:
        ts = jnp.linspace(0.0, 1.0, n + 1)
        x = jax.jit(jax.vmap(lambda k: euler_maruyama(drift, diffusion, jnp.float32(x0), ts, k)))(keys)
        x = np.asarray(x, np.float64)
        errs.append(abs(x.mean() - mean))
        ses.append(x.std() / np.sqrt(M))
    errs = np.array(errs)
    assert np.all(errs > 4 * np.array(ses)), "Monte Carlo noise would dominate the fit"
    assert abs(_slope(1.0 / np.array(steps), errs) - 1.0) < 0.15, errs
