"""The exact testbed: a Gaussian mixture's closed-form posterior against brute force, Monte
Carlo and autodiff, and the MLP ladder's training, checkpoints and files."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax.diffusion.ladder import LadderConfig, load_ladder, mlp_flops, train_ladder
from mlem_jax.diffusion.mixture import GaussianMixture, fit_mixture, load_mixture, save_mixture
from mlem_jax.diffusion.samplers import dpm_solver_pp
from mlem_jax.diffusion.sde import VE, VP, SubVP, logsnr_grid


def random_mixture(J=4, D=6, r=2, seed=0, dtype=jnp.float32, shape=()):
    rng = np.random.default_rng(seed)
    return GaussianMixture(jnp.log(jnp.asarray(rng.dirichlet(np.ones(J)), dtype)),
                           jnp.asarray(rng.normal(size=(J, D)), dtype),
                           jnp.asarray(rng.normal(size=(J, D, r)) * 0.5, dtype),
                           jnp.asarray(rng.uniform(0.1, 1.0, size=(J, D)), dtype), shape=shape)


def dense_posterior(m, x, alpha, sigma):
    """log p_t, E[x_0 | x_t] and the score from the dense covariances (no Woodbury)."""
    m = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), m)
    x = np.asarray(x, np.float64)
    S = np.einsum("jdr,jer->jde", m.factors, m.factors) + np.stack([np.diag(d) for d in m.diagonals])
    log_c, means, scores = [], [], []
    for j in range(S.shape[0]):
        cov = alpha**2 * S[j] + sigma**2 * np.eye(S.shape[1])
        inv = np.linalg.inv(cov)
        y = x - alpha * m.means[j]
        log_c.append(m.log_weights[j] - 0.5 * (np.einsum("bd,de,be->b", y, inv, y) + np.linalg.slogdet(cov)[1]
                                               + S.shape[1] * np.log(2 * np.pi)))
        means.append(m.means[j] + alpha * y @ inv @ S[j])
        scores.append(-y @ inv)
    log_c = np.stack(log_c, 1)
    log_p = np.logaddexp.reduce(log_c, 1)
    r = np.exp(log_c - log_p[:, None])
    return log_p, np.einsum("bj,jbd->bd", r, np.stack(means)), np.einsum("bj,jbd->bd", r, np.stack(scores))


@pytest.mark.parametrize("alpha,sigma", [(0.8, 0.5), (1.0, 0.0), (0.05, 1.0), (1.0, 3.0)])
def test_woodbury_posterior_equals_the_dense_one(alpha, sigma):
    with jax.enable_x64(True):
        m = random_mixture(dtype=jnp.float64)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 6)))
        log_p, mean, score = dense_posterior(m, x, alpha, sigma)
        np.testing.assert_allclose(m.log_density(x, alpha, sigma), log_p, rtol=1e-10)
        np.testing.assert_allclose(m.denoise(x, alpha, sigma), mean, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m.score(x, alpha, sigma), score, rtol=1e-9, atol=1e-12)
        # Tweedie: E[x_0 | x_t] = (x + sigma^2 score) / alpha
        if alpha > 0.5:
            np.testing.assert_allclose(m.denoise(x, alpha, sigma), (x + sigma**2 * score) / alpha, rtol=1e-8,
                                       atol=1e-10)


def test_score_is_the_gradient_of_the_log_density():
    with jax.enable_x64(True):
        m = random_mixture(dtype=jnp.float64, shape=(3, 2))
        x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3, 2)))
        for alpha, sigma in [(0.7, 0.6), (1.0, 2.0)]:
            grad = jax.vmap(jax.grad(lambda xi: m.log_density(xi, alpha, sigma)))(x)
            np.testing.assert_allclose(m.score(x, alpha, sigma), grad, rtol=1e-9, atol=1e-12)


def test_denoiser_matches_a_monte_carlo_posterior_mean():
    """E[x_0 | x_t = x] by self-normalised importance sampling from the prior (the mixture
    itself): within 4 standard errors (delta method) in every coordinate."""
    m = random_mixture(J=3, D=2, r=1, seed=3)
    alpha, sigma = 0.6, 0.8
    x = jnp.asarray([[0.3, -0.5]])
    x0 = m.sample(jax.random.key(0), 400_000)
    logw = -0.5 * jnp.sum((x - alpha * x0) ** 2, -1) / sigma**2
    w = np.asarray(jnp.exp(logw - logw.max()), np.float64)
    w /= w.sum()
    x0 = np.asarray(x0, np.float64)
    est = w @ x0
    se = np.sqrt(np.sum(w[:, None] ** 2 * (x0 - est) ** 2, 0))
    exact = np.asarray(m.denoise(x, alpha, sigma))[0]
    assert np.all(np.abs(est - exact) < 4 * se), (est, exact, se)
    assert np.all(se < 0.02)  # the test can tell a wrong posterior apart


def test_samples_have_the_mixture_moments():
    m = random_mixture(J=3, D=4, r=2, seed=4)
    x = np.asarray(m.sample(jax.random.key(1), 200_000), np.float64)
    w = np.exp(np.asarray(m.log_weights, np.float64))
    mu = w @ np.asarray(m.means)
    S = np.einsum("jdr,jer->jde", m.factors, m.factors) + np.stack([np.diag(d) for d in m.diagonals])
    cov = np.einsum("j,jde->de", w, S + np.einsum("jd,je->jde", m.means - mu, m.means - mu))
    se = np.sqrt(np.diag(cov) / len(x))
    assert np.all(np.abs(x.mean(0) - mu) < 4 * se)
    np.testing.assert_allclose(np.cov(x, rowvar=False), cov, atol=0.05)


@pytest.mark.parametrize("sde", [VP(), SubVP(), VE()], ids=["VP", "subVP", "VE"])
def test_exact_denoiser_ode_maps_the_prior_near_the_data(sde):
    """The exact denoiser's probability-flow ODE lands on the data: the mean log-density of its
    samples is within the data's own mean log-density +- a few standard errors."""
    m = random_mixture(J=3, D=4, r=2, seed=5)
    n = 2000
    x1 = sde.prior_sample(jax.random.key(2), (n, 4))
    y = dpm_solver_pp(m.denoiser(sde), sde, x1, logsnr_grid(sde, 200, t_min=1e-4))
    ll_samples = np.asarray(m.log_density(y))
    ll_data = np.asarray(m.log_density(m.sample(jax.random.key(3), n)))
    se = np.sqrt(ll_samples.var() / n + ll_data.var() / n)
    assert abs(ll_samples.mean() - ll_data.mean()) < 4 * se, (ll_samples.mean(), ll_data.mean(), se)


def test_fit_keeps_means_and_marginal_variances(tmp_path):
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(3, 8)) * 5
    x = np.concatenate([c + rng.normal(size=(300, 8)) * 0.3 for c in centers]).reshape(-1, 2, 4, 1)
    m = fit_mixture(x, num_components=3, rank=2, min_variance=1e-4)
    assert m.shape == (2, 4, 1)
    np.testing.assert_allclose(np.sort(np.exp(np.asarray(m.log_weights))), [1 / 3] * 3, rtol=1e-6)
    order = np.argsort(np.asarray(m.means)[:, 0])
    np.testing.assert_allclose(np.asarray(m.means)[order], centers[np.argsort(centers[:, 0])], atol=0.1)
    marginal = np.asarray(m.diagonals) + np.sum(np.asarray(m.factors) ** 2, -1)
    np.testing.assert_allclose(marginal, 0.09, rtol=0.35)
    path = save_mixture(m, str(tmp_path / "mix"))
    back = load_mixture(path)
    assert back.shape == m.shape
    np.testing.assert_allclose(back.means, m.means, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="num_components"):
        fit_mixture(x, num_components=10_000)
    with pytest.raises(FileNotFoundError, match="save_mixture"):
        load_mixture(str(tmp_path / "missing"))


def test_mixture_refuses_wrong_shapes():
    m = random_mixture()
    with pytest.raises(ValueError, match="trailing shape"):
        m.denoise(jnp.zeros((2, 5)), 1.0, 0.5)
    with pytest.raises(ValueError, match="expected log_weights"):
        GaussianMixture(m.log_weights[:2], m.means, m.factors, m.diagonals)


def test_shipped_mixture_loads_and_denoises():
    m = load_mixture()
    assert m.shape == (16, 16, 1) and m.num_components >= 100
    x0 = m.sample(jax.random.key(0), 8)
    d = m.denoise(x0 * 0.99 + 0.01 * jax.random.normal(jax.random.key(1), x0.shape), 0.99, 0.01)
    assert float(jnp.sqrt(jnp.mean((d - x0) ** 2))) < 0.05


def test_ladder_trains_resumes_and_loads(tmp_path):
    """Two tiny levels: the held-out error falls, the second run resumes (no step redone),
    another config on the same folder is refused, and the saved ladder denoises like the
    trained one to float16 precision."""
    m = random_mixture(J=3, D=16, r=2, seed=7, shape=(4, 4, 1))
    cfg = LadderConfig(widths=(8, 16), depth=1, max_steps=100, eval_every=50, eval_size=64, batch_size=32,
                       patience=100)
    logs = []
    ladder = train_ladder(m, VP(), cfg, str(tmp_path), progress=False, log=logs.append)
    for h in ladder.history:
        assert [e["step"] for e in h] == [50, 100]
        assert h[-1]["error"] < h[0]["error"]
    again = train_ladder(m, VP(), cfg, str(tmp_path), progress=False, log=logs.append)
    assert any("resumed at step 100 (done)" in line for line in logs)
    assert again.history == ladder.history
    with pytest.raises(ValueError, match="another ladder config"):
        train_ladder(m, VP(), LadderConfig(widths=(8, 32), depth=1), str(tmp_path), progress=False)
    back = load_ladder(str(tmp_path))
    assert back.config == cfg and json.load(open(tmp_path / "ladder.json"))["config"]["widths"] == [8, 16]
    x = m.sample(jax.random.key(0), 4)
    for d_trained, d_loaded in zip(ladder.denoisers(VP(), m.shape), back.denoisers(VP(), m.shape)):
        np.testing.assert_allclose(d_loaded(0.5, x), d_trained(0.5, x), atol=2e-2)
    assert mlp_flops(16, 8, 1) == 2 * (16 * 8 + 2 * 64 + 8 * 16)


def test_plateau_rule():
    from mlem_jax.diffusion.ladder import _plateau

    cfg = LadderConfig(patience=2, min_improvement=0.01)
    assert not _plateau([1.0, 0.5], cfg)  # too few evaluations to judge
    assert not _plateau([1.0, 0.9, 0.8], cfg)  # still falling by more than 1%
    assert _plateau([1.0, 0.995, 0.999], cfg)  # the last two bettered 1.0 by less than 1%
    assert _plateau([0.5, 0.6, 0.7], cfg)  # rising


def test_demo_on_the_testbed_compares_at_equal_error_against_the_truth(tmp_path, capsys, monkeypatch):
    """`mlem-jax demo` on a tiny ladder of the shipped mixture, with short step ladders: both
    sides run against the truth, the figures are written, and the last line gives the speedup
    with the multilevel error within 1.1x of the single network's (or says it is unequal)."""
    import re

    from mlem_jax.cli import _demo_testbed, main

    m = load_mixture()
    cfg = LadderConfig(widths=(8, 16), depth=1, max_steps=40, eval_every=20, eval_size=64, batch_size=32)
    train_ladder(m, VP(), cfg, str(tmp_path / "ladder"), progress=False, log=lambda s: None)
    monkeypatch.setattr(_demo_testbed, "SINGLE_STEPS", (3, 6))
    monkeypatch.setattr(_demo_testbed, "ML_STEPS", (6,))
    monkeypatch.setattr(_demo_testbed, "TAUS", (2.0,))
    out = tmp_path / "demo"
    assert main(["demo", "--ladder", str(tmp_path / "ladder"), "--batch-size", "8", "--target", "2",
                 "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"equal-error speedup: (\d+\.\d\d)x \(single-network error (\d+\.\d{4}), multilevel error "
                         r"(\d+\.\d{4})\)( slower: .*)?", lines[-1])
    assert match, lines[-1]
    speedup, a, b = map(float, match.groups()[:3])
    assert (b <= 1.1 * a + 1e-4) or any("UNEQUAL" in line for line in lines)
    assert (match.group(4) is not None) == (round(speedup, 2) < 1)
    assert (tmp_path / "demo.png").exists() and (tmp_path / "demo.npz").exists()
    d = np.load(tmp_path / "demo.npz")
    assert d["truth"].shape == d["single"].shape == (8, 256)
