"""SDEs, parameterisations and sampling with exact Gaussian scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import euler_maruyama, multilevel_euler_maruyama
from mlem_jax.diffusion import (
    PARAMETERIZATIONS,
    VE,
    VP,
    SubVP,
    denoised_from_output,
    karras_grid,
    network_denoiser,
    network_score,
    quadratic_grid,
    reverse_diffusion,
    reverse_drift,
    score_from_output,
    target_from_noise,
    uniform_grid,
)

SDES = [VP(), SubVP(), VE()]


@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_marginals_solve_the_moment_odes(sde):
    """For dx = f x dt + g dW from x_0 = 1: mean' = f mean, var' = 2 f var + g^2, whose
    solutions must be alpha(t) and std(t)^2 (integrated with RK4 on a fine grid)."""
    def rhs(t, s):
        m, v = s
        f, g = sde.drift_coeff(t), sde.diffusion(t)
        return jnp.array([f * m, 2 * f * v + g**2])

    n = 20_000
    ts = np.linspace(0.0, 1.0, n + 1)
    s = jnp.array([1.0, 0.0])
    def rk4_step(t, s, h):
        k1 = rhs(t, s)
        k2 = rhs(t + h / 2, s + h / 2 * k1)
        k3 = rhs(t + h / 2, s + h / 2 * k2)
        k4 = rhs(t + h, s + h * k3)
        return s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    rk4 = jax.jit(rk4_step)
    check = {5_000, 10_000, 20_000}
    for i in range(n):
        s = rk4(ts[i], s, ts[1] - ts[0])
        if i + 1 in check:
            t = ts[i + 1]
            np.testing.assert_allclose(s[0], sde.alpha(t), rtol=1e-3)
            np.testing.assert_allclose(s[1], sde.std(t) ** 2, rtol=2e-3, atol=1e-5)


def test_forward_em_reaches_the_vp_marginal():
    sde = VP()
    M = 20_000
    ts = jnp.linspace(0.0, 0.5, 501)
    x = jax.vmap(lambda k: euler_maruyama(lambda t, y, a: sde.drift_coeff(t) * y,
                                          lambda t, y, a: sde.diffusion(t), jnp.float32(2.0), ts, k))(
        jax.random.split(jax.random.key(0), M))
    x = np.asarray(x, np.float64)
    # EM on this linear SDE has exact moments, whose distance to the marginal is EM's
    # O(h) bias: halving the step halves it ...
    def em_moments(grid):
        m, v = 2.0, 0.0
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h, f, g = t1 - t0, float(sde.drift_coeff(t0)), float(sde.diffusion(t0))
            m, v = (1 + h * f) * m, (1 + h * f) ** 2 * v + g**2 * h
        return m, v

    mean, var = 2.0 * float(sde.alpha(0.5)), float(sde.std(0.5)) ** 2
    m, v = em_moments(np.linspace(0.0, 0.5, 501))
    m2, v2 = em_moments(np.linspace(0.0, 0.5, 1001))
    assert 1.8 < (m - mean) / (m2 - mean) < 2.2 and 1.8 < (v - var) / (v2 - var) < 2.2
    # ... and the samples match the EM moments within 4 standard errors
    assert abs(x.mean() - m) < 4 * x.std() / np.sqrt(M)
    assert abs(x.var() - v) < 4 * v * np.sqrt(2 / M)


@pytest.mark.parametrize("parameterization", PARAMETERIZATIONS)
@pytest.mark.parametrize("sde", SDES, ids=lambda s: type(s).__name__)
def test_parameterizations_give_the_true_conditional_score(sde, parameterization):
    """An output equal to the DSM target turns into -eps / std, the score of x_t | x_0."""
    k1, k2 = jax.random.split(jax.random.key(1))
    x0, eps = jax.random.normal(k1, (5,)), jax.random.normal(k2, (5,))
    t = 0.37
    xt = sde.alpha(t) * x0 + sde.std(t) * eps
    out = target_from_noise(sde, parameterization, t, x0, eps)
    np.testing.assert_allclose(score_from_output(sde, parameterization, t, xt, out), -eps / sde.std(t), rtol=2e-4,
                               atol=2e-4)
    np.testing.assert_allclose(denoised_from_output(sde, parameterization, t, xt, out), x0, rtol=2e-3, atol=2e-3)
    # the same through a network(t, x, args), the one convention
    network = lambda t_, x_, args: target_from_noise(sde, parameterization, t_, x0, eps)
    np.testing.assert_array_equal(network_score(sde, parameterization, network)(t, xt, None),
                                  score_from_output(sde, parameterization, t, xt, out))
    np.testing.assert_array_equal(network_denoiser(sde, parameterization, network)(t, xt, None),
                                  denoised_from_output(sde, parameterization, t, xt, out))


def test_the_old_argument_order_is_refused():
    """(output, x, t) and (x0, eps, t), t last, are recognised by shape and refused at trace time
    with the order to write instead; t first works."""
    from mlem_jax import InputError

    sde, t = VP(), 0.37
    x0, eps = jax.random.normal(jax.random.key(1), (2, 5))
    xt = sde.alpha(t) * x0 + sde.std(t) * eps
    with pytest.raises(InputError, match=r"target_from_noise: expected the arguments \(sde, parameterization, t"):
        target_from_noise(sde, "v", x0, eps, t)
    out = target_from_noise(sde, "v", t, x0, eps)
    for fn in (score_from_output, denoised_from_output):
        with pytest.raises(InputError, match=f"{fn.__name__}: expected the arguments .*old order"):
            jax.jit(lambda o, x, s: fn(sde, "v", o, x, s))(out, xt, t)
        assert np.all(np.isfinite(fn(sde, "v", t, xt, out)))


def gaussian_score(sde, mu, s):
    def score(t, y, args):
        a = sde.alpha(t)
        return -(y - a * mu) / (a**2 * s**2 + sde.std(t) ** 2)
    return score


@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_sampling_recovers_gaussian_data(probability_flow):
    sde = VP()
    mu, s = jnp.array([1.5, -0.5]), jnp.array([0.5, 1.2])
    drift = reverse_drift(sde, gaussian_score(sde, mu, s), probability_flow=probability_flow)
    g = None if probability_flow else reverse_diffusion(sde)
    ts = uniform_grid(1000)
    M = 20_000
    keys = jax.random.split(jax.random.key(2), M)

    def one(k):
        kp, kn = jax.random.split(k)
        return euler_maruyama(drift, g, sde.prior_sample(kp, (2,)), ts, kn)

    x = np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)
    # The drift is affine, y' = A(t) y + B(t), so EM's mean and variance follow exactly.
    # Started from the exact marginal at t = 1, their distance to the marginal at t_min is
    # EM's O(h) bias: it halves with the step. Started from the N(0, 1) prior (as the
    # samples are), they also carry the prior's mismatch (alpha(1) = 0.0066, not 0).
    # The samples must match the prior-started moments within 4 standard errors.
    def em_moments(grid, mean, var):
        for t0, t1 in zip(grid[:-1], grid[1:]):
            h = t1 - t0
            B = np.asarray(drift(t0, jnp.zeros(2), None), np.float64)
            A = np.asarray(drift(t0, jnp.ones(2), None), np.float64) - B
            g2 = 0.0 if probability_flow else float(sde.diffusion(t0)) ** 2
            mean, var = (1 + h * A) * mean + h * B, (1 + h * A) ** 2 * var + g2 * abs(h)
        return mean, var

    def marginal(t):
        a, sd = float(sde.alpha(t)), float(sde.std(t))
        return a * np.asarray(mu, np.float64), a**2 * np.asarray(s, np.float64) ** 2 + sd**2

    target_mean, target_var = marginal(1e-3)
    mean1, var1 = em_moments(np.asarray(ts, np.float64), *marginal(1.0))
    mean2, var2 = em_moments(np.asarray(uniform_grid(2000), np.float64), *marginal(1.0))
    for e1, e2 in ((mean1 - target_mean, mean2 - target_mean), (var1 - target_var, var2 - target_var)):
        np.testing.assert_array_less(np.abs(e1 / e2 - 2.0), 0.25)
    mean, var = em_moments(np.asarray(ts, np.float64), np.zeros(2), np.ones(2))
    se_mean, se_var = np.sqrt(var / M), var * np.sqrt(2 / M)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4 * se_mean)
    np.testing.assert_array_less(np.abs(x.var(0) - var), 4 * se_var)


def test_mlem_on_a_gaussian_level_family_is_unbiased():
    """Levels with s_k^2 = s^2 (1 + 2^-k): ML-EM's mean equals EM's on the finest level."""
    sde = VP()
    mu, s = 1.0, 0.6
    levels = tuple(reverse_drift(sde, gaussian_score(sde, mu, s * np.sqrt(1 + 2.0**-k))) for k in (1, 2, 3))
    ts = uniform_grid(200)
    M = 20_000
    keys = jax.random.split(jax.random.key(3), M)
    lkeys = jax.random.split(jax.random.key(4), M)
    g = reverse_diffusion(sde)

    def both(k, lk):
        y0 = sde.prior_sample(jax.random.fold_in(k, 1), ())
        ml = multilevel_euler_maruyama(levels, jnp.array([1.0, 0.3, 0.1]), g, y0, ts, k, level_key=lk).y
        em = euler_maruyama(levels[-1], g, y0, ts, k)
        return ml, em

    ml, em = map(lambda a: np.asarray(a, np.float64), jax.jit(jax.vmap(both))(keys, lkeys))
    d = ml - em
    assert abs(d.mean()) < 4 * d.std() / np.sqrt(M)
    assert d.std() > 0


def test_grids():
    for grid in (uniform_grid(10), quadratic_grid(10), karras_grid(VP(), 10), karras_grid(VE(), 10)):
        g = np.asarray(grid)
        assert g.shape == (11,) and g[0] == pytest.approx(1.0) and g[-1] == pytest.approx(1e-3)
        assert np.all(np.diff(g) < 0)
    sde = VE()
    sig = np.asarray(sde.noise_to_signal(karras_grid(sde, 8)))
    rho = 7.0
    expected = (sig[0] ** (1 / rho) + np.arange(9) / 8 * (sig[-1] ** (1 / rho) - sig[0] ** (1 / rho))) ** rho
    np.testing.assert_allclose(sig, expected, rtol=1e-3)
    with pytest.raises(ValueError, match="num_steps"):
        uniform_grid(0)
    with pytest.raises(ValueError, match="parameterization"):
        score_from_output(VP(), "noise", 0.5, 0.0, 0.0)
