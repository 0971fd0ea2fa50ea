import numpy as np
import pytest

from mlem_jax import geometric_probabilities
from mlem_jax.calibrate import correction_costs, injected_variance, optimal_probabilities

V = np.array([1.0, 0.25, 0.06, 0.016, 0.004])
C = correction_costs(2.0 ** (2.5 * np.arange(1, 6)))


@pytest.mark.parametrize("nu2", [1e-1, 1e-3, 1e-5])
def test_optimal_hits_target_and_beats_perturbations(nu2):
    h = 0.01
    p = optimal_probabilities(V, C, h, nu2)
    assert p[0] == 1 and np.all((p > 0) & (p <= 1))
    assert np.isclose(injected_variance(V, p, h), nu2, rtol=1e-10) or np.all(p == 1)
    cost = np.sum(p * C)
    rng = np.random.default_rng(0)
    free = np.flatnonzero(p < 1)
    for _ in range(200):
        # perturb the free probabilities, then rescale one level to restore the variance
        q = p.copy()
        q[free] *= np.exp(0.3 * rng.standard_normal(free.size))
        q = np.minimum(q, 1.0)
        j = free[-1] if free.size else None
        if j is None:
            break
        rest = nu2 / h - np.sum(np.delete(V[1:] * (1 / q[1:] - 1), j - 1))
        if rest <= 0:
            continue
        q[j] = V[j] / (rest + V[j])
        assert np.isclose(injected_variance(V, q, h), nu2, rtol=1e-8)
        assert np.sum(q * C) >= cost * (1 - 1e-12)


def test_clamps_at_one_when_variance_is_tight():
    p = optimal_probabilities(V, C, 0.5, 1e-9)
    assert p[1] == 1.0
    assert np.isclose(injected_variance(V, p, 0.5), 1e-9, rtol=1e-6)


def test_geometric_and_errors():
    np.testing.assert_allclose(geometric_probabilities(3, 0.5), [1, 0.5, 0.25])
    with pytest.raises(ValueError, match="ratio"):
        geometric_probabilities(3, 0.0)
    with pytest.raises(ValueError, match="variances"):
        optimal_probabilities([1.0, -1.0], [1.0, 2.0], 0.1, 0.1)
    with pytest.raises(ValueError, match="costs: expected one cost per level"):
        optimal_probabilities([1.0, 1.0], [1.0, 2.0, 3.0], 0.1, 0.1)
    with pytest.raises(ValueError, match="level_costs"):
        correction_costs([1.0, np.nan])
