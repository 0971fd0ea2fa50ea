"""Heun's order and the T-Stitch switch."""

import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import euler_maruyama, heun, switched_drift


def test_heun_has_order_two_and_euler_order_one():
    """dy = (cos t - y) dt, exact y(t) = (cos t + sin t)/2 + (y0 - 1/2) e^-t: halving h
    divides Heun's error by 4 and Euler's by 2 (within 10%)."""
    f = lambda t, y, a: jnp.cos(t) - y
    exact = lambda t, y0: 0.5 * (np.cos(t) + np.sin(t)) + (y0 - 0.5) * np.exp(-t)
    errs = {}
    for n in (20, 40, 80):
        ts = jnp.linspace(0.0, 2.0, n + 1)
        errs[n] = (abs(float(heun(f, None, jnp.float32(1.0), ts)) - exact(2.0, 1.0)),
                   abs(float(euler_maruyama(f, None, jnp.float32(1.0), ts, None)) - exact(2.0, 1.0)))
    for a, b in ((20, 40), (40, 80)):
        assert errs[a][0] / errs[b][0] == pytest.approx(4.0, rel=0.1)
        assert errs[a][1] / errs[b][1] == pytest.approx(2.0, rel=0.1)


def test_heun_backwards_pytrees_saveat_and_refuses_sdes():
    f = lambda t, y, a: {"u": -y["u"], "v": jnp.ones(())}
    ts = jnp.linspace(1.0, 0.0, 11)
    out = heun(f, None, {"u": jnp.ones(2), "v": jnp.zeros(())}, ts, saveat="all")
    assert out["u"].shape == (11, 2) and float(out["v"][-1]) == pytest.approx(-1.0, abs=1e-5)
    with pytest.raises(ValueError, match="diffusion: heun integrates ODEs only"):
        heun(f, lambda t, y, a: 1.0, {"u": jnp.ones(2), "v": jnp.zeros(())}, ts)


def test_switched_drift_runs_one_network_per_side():
    small, large = (lambda t, y, a: -y), (lambda t, y, a: -2 * y)
    d = switched_drift(small, large, 0.5)
    assert float(d(0.7, 1.0, None)) == -1.0 and float(d(0.3, 1.0, None)) == -2.0
    ts = jnp.linspace(1.0, 0.0, 101)
    y = euler_maruyama(d, None, jnp.float32(1.0), ts, None)
    # 50 steps of (1 + 0.01), then 50 of (1 + 0.02) (backwards in time)
    assert float(y) == pytest.approx(1.01**50 * 1.02**50, rel=1e-5)
