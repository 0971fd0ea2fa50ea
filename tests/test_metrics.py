"""Distribution distances and the feature classifier."""

import jax
import numpy as np
import pytest

from mlem_jax.diffusion.classifier import train_classifier
from mlem_jax.diffusion.metrics import kernel_distance, sliced_wasserstein


@pytest.mark.parametrize("bandwidth", [None, 1.5], ids=["cubic", "gaussian"])
def test_kernel_distance_is_unbiased_with_an_honest_standard_error(bandwidth):
    # two distributions on five points: the exact MMD^2 is (p - q)' K (p - q)
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(5, 3))
    p, q = np.array([0.3, 0.2, 0.2, 0.2, 0.1]), np.array([0.1, 0.2, 0.2, 0.2, 0.3])
    sq = np.sum((pts[:, None] - pts[None]) ** 2, -1)
    K = (pts @ pts.T / 3 + 1) ** 3 if bandwidth is None else np.exp(-sq / (2 * bandwidth**2))
    exact = (p - q) @ K @ (p - q)
    est = [kernel_distance(pts[rng.choice(5, 20, p=p)], pts[rng.choice(5, 30, p=q)], bandwidth)
           for _ in range(1000)]
    values = np.array([e.value for e in est])
    assert abs(values.mean() - exact) < 4 * values.std(ddof=1) / np.sqrt(values.size)
    # the jackknife standard error matches the spread across replicates (it is known to be
    # slightly conservative); the spread's own sampling error is about 1/sqrt(2 * 1000)
    ratio = np.sqrt(np.mean([e.stderr**2 for e in est])) / values.std(ddof=1)
    assert 0.9 < ratio < 1.3


def test_kernel_distance_of_one_distribution_is_zero_within_its_standard_error():
    rng = np.random.default_rng(1)
    e = kernel_distance(rng.normal(size=(300, 8)), rng.normal(size=(400, 8)))
    assert abs(e.value) < 4 * e.stderr


def test_paired_kernel_distance_is_unbiased_for_coupled_draws_where_the_unpaired_one_is_not():
    """y_i = x_i + shift + small noise, x_i ~ N(0, I): the laws are N(0, I) and N(shift, (1 + e^2) I),
    whose Gaussian-kernel MMD^2 is in closed form. The paired statistic is unbiased for it with an
    honest standard error; the unpaired one, fed the coupled rows, is biased (below zero here)."""
    d, b, e, n = 2, 1.0, 0.1, 60
    shift = np.array([0.3, 0.0])
    s2x, s2y = 1.0, 1.0 + e**2
    c = lambda v: (b**2 / (b**2 + v)) ** (d / 2)  # E k(x, x') for a Gaussian pair whose difference has variance v
    exact = c(2 * s2x) + c(2 * s2y) - 2 * c(s2x + s2y) * np.exp(-shift @ shift / (2 * (b**2 + s2x + s2y)))
    rng = np.random.default_rng(4)
    paired, unpaired = [], []
    for _ in range(1000):
        x = rng.normal(size=(n, d))
        y = x + shift + e * rng.normal(size=(n, d))
        paired.append(kernel_distance(x, y, b, paired=True))
        unpaired.append(kernel_distance(x, y, b).value)
    values = np.array([p.value for p in paired])
    assert abs(values.mean() - exact) < 4 * values.std(ddof=1) / np.sqrt(values.size)
    ratio = np.sqrt(np.mean([p.stderr**2 for p in paired])) / values.std(ddof=1)
    assert 0.9 < ratio < 1.3
    bias = np.mean(unpaired) - exact
    assert bias < -10 * np.std(unpaired, ddof=1) / np.sqrt(len(unpaired))
    # a sum of kernels: its MMD^2 is the sum of theirs, paired or not
    for pair in (True, False):
        both = kernel_distance(x, y, (b, 0.3), paired=pair).value
        assert np.isclose(both, kernel_distance(x, y, b, paired=pair).value
                          + kernel_distance(x, y, 0.3, paired=pair).value, rtol=1e-10, atol=1e-14)
    # identical rows: every h(z_i, z_j) is zero
    x = rng.normal(size=(10, d))
    assert kernel_distance(x, x, b, paired=True) == (0.0, 0.0)
    with pytest.raises(ValueError, match="paired: expected as many rows"):
        kernel_distance(x, x[:5], b, paired=True)


def test_kernel_distance_errors():
    with pytest.raises(ValueError, match="features_b: expected 4 features"):
        kernel_distance(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 3 samples"):
        kernel_distance(np.zeros((2, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="bandwidth: expected None"):
        kernel_distance(np.zeros((5, 4)), np.zeros((5, 4)), bandwidth=0.0)


def test_sliced_wasserstein_exact_in_one_dimension_and_zero_on_itself():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 1)), rng.normal(1.0, 2.0, size=(50, 1))
    # in one dimension every direction is +-1: W_2 pairs the sorted samples
    expect = np.sqrt(np.mean((np.sort(a[:, 0]) - np.sort(b[:, 0])) ** 2))
    assert np.isclose(sliced_wasserstein(a, b, jax.random.key(0), 8), expect, rtol=1e-5)
    assert sliced_wasserstein(a, a, jax.random.key(0)) == 0.0
    # unequal sizes: both quantile functions (linear between the levels (i + 0.5) / n, flat
    # beyond them) on the common grid of max(N, M) levels
    c = rng.normal(1.0, 2.0, size=(37, 1))
    levels = (np.arange(50) + 0.5) / 50
    qa = np.interp(levels, (np.arange(50) + 0.5) / 50, np.sort(a[:, 0]))
    qc = np.interp(levels, (np.arange(37) + 0.5) / 37, np.sort(c[:, 0]))
    assert np.isclose(sliced_wasserstein(a, c, jax.random.key(0), 8), np.sqrt(np.mean((qa - qc) ** 2)), rtol=1e-5)


def test_sliced_wasserstein_between_shifted_gaussians():
    # SW_2^2(N(0, I), N(mu, I)) = E_theta (theta . mu)^2 = |mu|^2 / d; the empirical
    # samples add a bias of order log(n) / n, far below the tolerance at n = 20000
    rng = np.random.default_rng(3)
    d, mu = 4, np.array([1.0, 0.0, 0.0, 0.0])
    a = rng.normal(size=(20000, d))
    b = rng.normal(size=(16000, d)) + mu  # unequal sizes: the quantile route
    sw = sliced_wasserstein(a, b, jax.random.key(1), num_projections=2000)
    # the projection average's Monte Carlo error: (theta . mu)^2 = theta_1^2 ~ Beta(1/2, 3/2)
    # for theta uniform on the sphere in d = 4, whose variance is 0.75 / (4 * 3)
    sd = np.sqrt(0.5 * 1.5 / (2.0**2 * 3.0))
    # the empirical samples add about (1/n + 1/m) log n ~ 1e-3 on top; 0.005 bounds it
    assert abs(sw**2 - 0.25) < 4 * sd / np.sqrt(2000) + 0.005


def test_sliced_wasserstein_errors():
    with pytest.raises(ValueError, match="samples_b: expected samples of 4 values"):
        sliced_wasserstein(np.zeros((5, 4)), np.zeros((5, 3)), jax.random.key(0))
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(np.zeros((5, 4)), np.zeros((5, 4)), jax.random.key(0), 0)


def test_classifier_learns_a_separable_toy_and_gives_features():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 0.3, size=(256, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 2, 256)
    x[y == 1, :4] += 1.0  # class 1: the top half is brighter (flip-invariant)
    clf = train_classifier(x[:192], y[:192], x[192:], y[192:], jax.random.key(0), steps=60, batch_size=32,
                           width=8, progress=False)
    assert clf.test_accuracy > 0.95
    assert clf.features(x[:10]).shape == (10, clf.model.feature_dim)
    with pytest.raises(ValueError, match="images, labels"):
        train_classifier(x, y[:5], x, y, jax.random.key(0), steps=1)


def test_frechet_gaussian_closed_form():
    """Diagonal covariances commute: the distance is |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2."""
    from mlem_jax.diffusion.metrics import frechet_gaussian

    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
    assert frechet_gaussian(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # rotation invariance: rotate both Gaussians by the same orthogonal matrix
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    rotated = frechet_gaussian(q @ mu_a, q @ np.diag(a) @ q.T, q @ mu_b, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    assert frechet_gaussian(mu_a, np.diag(a), mu_a, np.diag(a)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_estimates_the_gaussian_value():
    """Samples of two Gaussians: the estimate is within 3 bootstrap standard errors (plus its
    O(d/N) small-sample bias) of the closed form, and the standard error is of the size of
    the spread over independent repetitions."""
    from mlem_jax.diffusion.metrics import frechet_distance, frechet_gaussian

    rng = np.random.default_rng(1)
    d, n = 4, 4000
    mu_b, sd_b = np.array([0.5, 0.0, -0.5, 0.0]), np.array([1.0, 1.5, 0.5, 1.0])
    truth = frechet_gaussian(np.zeros(d), np.eye(d), mu_b, np.diag(sd_b**2))
    values, ses = [], []
    for _ in range(8):
        est = frechet_distance(rng.normal(size=(n, d)), mu_b + sd_b * rng.normal(size=(n, d)), num_bootstrap=30)
        values.append(est.value)
        ses.append(est.stderr)
    bias = 2 * d / n  # the plug-in covariances add O(d / N)
    assert abs(np.mean(values) - truth) < 3 * np.std(values, ddof=1) / np.sqrt(8) + bias
    assert 0.5 < np.mean(ses) / np.std(values, ddof=1) < 2.0


def test_coupled_error_known_answers():
    from mlem_jax.diffusion.metrics import coupled_error

    x = np.random.default_rng(0).normal(size=(10, 4, 4, 1))
    assert coupled_error(x, x) == (0.0, 0.0)
    est = coupled_error(x + 0.3, x)  # every pair differs by 0.3 everywhere
    assert est.value == pytest.approx(0.3, rel=1e-12) and est.stderr == pytest.approx(0.0, abs=1e-12)
    r = np.random.default_rng(1).normal(size=x.shape)
    e = ((x - r) ** 2).reshape(10, -1).mean(1)
    assert coupled_error(x, r).value == pytest.approx(np.sqrt(e.mean()))
    with pytest.raises(ValueError, match="reference: expected the shape of samples"):
        coupled_error(x, x[:5])
