"""Held-out level diagnostics: nested errors give a ratio of 1, added noise more, a known
power law gives back its gamma, and the verdict keeps the right levels."""

import numpy as np
import pytest

from mlem_jax.calibrate import format_diagnostics, level_diagnostics

N, D = 4000, 16


def nested_levels(rng, scales):
    """out_k = y + sum_{j >= k} e_j with independent errors e_j of RMS scales[j]: level k's error
    is level k+1's plus an independent part, so every pair's spread equals its gap."""
    y = rng.normal(size=(N, D))
    parts = [s * rng.normal(size=(N, D)) for s in scales]
    outs = [y + sum(parts[k:]) for k in range(len(scales))]
    return np.stack(outs), y


def test_nested_errors_give_ratio_one_and_added_noise_more():
    rng = np.random.default_rng(0)
    outs, y = nested_levels(rng, [1.0, 0.6, 0.3, 0.1])
    d = level_diagnostics(outs, y)
    for p in d.pairs:  # E V_ab = E gap exactly; the sampling error of the ratio is a few percent here
        assert abs(p.spread.value - p.gap.value) < 4 * np.hypot(p.spread.stderr, p.gap.stderr), p
        assert 0.9 < p.ratio < 1.1
    assert d.keep == (0, 1, 2, 3) and not d.dropped
    # a top level that is another network of the same quality as level 3 (its own error, same size)
    noisy = np.concatenate([outs, (y + 0.1 * rng.normal(size=(N, D)))[None]])
    d = level_diagnostics(noisy, y)
    p = d.pair(3, 4)
    assert abs(p.gap.value) < 3 * p.gap.stderr  # no accuracy gained ...
    assert abs(p.spread.value - 0.02) < 4 * p.spread.stderr  # ... yet a correction of 2 x 0.1^2 per coordinate
    assert 4 in d.dropped and "within two standard errors" in d.dropped[4]
    # a level that gains a little accuracy while adding much noise: ratio far above 1
    worse = y + 0.45 * rng.normal(size=(N, D))  # independent: ratio (0.46 + 0.2) / (0.46 - 0.2) = 2.5
    d = level_diagnostics(np.stack([outs[1], worse]), y)
    assert d.pairs[0].ratio > 1.5 and 1 in d.dropped and "adds noise" in d.dropped[1]
    assert "ratio" in format_diagnostics(d, ["small", "large"])


@pytest.mark.parametrize("gamma, floor", [(2.5, 0.0), (3.0, 0.05)])
def test_a_known_power_law_is_recovered(gamma, floor):
    """Levels whose squared error is A cost^(-2/gamma), with (noisy target) or without
    (exact target) an irreducible loss: the fit's interval holds the true gamma."""
    rng = np.random.default_rng(1)
    costs = np.array([1.0, 4.0, 16.0, 64.0, 256.0])
    rms = 0.8 * costs ** (-1 / gamma)
    y_exact = rng.normal(size=(N, D))
    y = y_exact + np.sqrt(floor) * rng.normal(size=(N, D))
    outs = np.stack([y_exact + r * rng.normal(size=(N, D)) for r in rms])
    d = level_diagnostics(outs, y, costs=costs, exact_target=floor == 0.0)
    assert d.gamma is not None and d.gamma.low <= gamma <= d.gamma.high, d.gamma
    assert abs(d.gamma.gamma - gamma) < 0.2 * gamma
    if floor:
        assert abs(d.gamma.offset - floor) < 0.01


def test_bands_and_bad_input():
    rng = np.random.default_rng(2)
    outs, y = nested_levels(rng, [1.0, 0.5])
    t = rng.uniform(size=N)
    d = level_diagnostics(outs, y, covariate=t, bands=4)
    assert d.band_losses.shape == (4, 2) and np.all(d.band_losses[:, 0] > d.band_losses[:, 1])
    with pytest.raises(ValueError, match="outputs: expected"):
        level_diagnostics(outs[:, :, :3], y)
    with pytest.raises(ValueError, match="covariate: expected one value per draw"):
        level_diagnostics(outs, y, covariate=t[:5])
    with pytest.raises(ValueError, match="costs: expected one cost per level"):
        level_diagnostics(outs, y, costs=[1.0])
