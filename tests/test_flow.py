"""Flow matching: the rectified-flow schedule, velocity models, shifts, and every sampler and
the multilevel estimator on it, checked against the closed-form flow of Gaussian data."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import BatchedLevelKeyWarning, Multilevel
from mlem_jax.diffusion import (
    VP,
    Flow,
    denoised_from_output,
    dpm_solver_pp,
    edm_euler,
    edm_heun,
    karras_grid,
    logsnr_grid,
    network_denoiser,
    resolution_shift,
    sde_dpm_solver_pp,
    shift_times,
    stretch_to_terminal,
    target_from_noise,
    uniform_grid,
    unipc,
)

FLOW = Flow()
M, S = 0.3, 0.5


def gaussian_denoiser(t, x, args=None):
    a, s = FLOW.alpha(t), FLOW.std(t)
    return M + a * S**2 / (a**2 * S**2 + s**2) * (x - a * M)


def exact_flow(x, t, t_end):
    a, s, a2, s2 = FLOW.alpha(t), FLOW.std(t), FLOW.alpha(t_end), FLOW.std(t_end)
    return a2 * M + jnp.sqrt((a2**2 * S**2 + s2**2) / (a**2 * S**2 + s**2)) * (x - a * M)


def test_the_forward_sde_matches_the_path():
    """d alpha / dt = f alpha and d std^2 / dt = 2 f std^2 + g^2: f = -1/(1-t), g^2 = 2t/(1-t)."""
    for t in (0.1, 0.5, 0.9, 0.999):
        t = jnp.float32(t)
        f, g = FLOW.drift_coeff(t), FLOW.diffusion(t)
        np.testing.assert_allclose(jax.grad(FLOW.alpha)(t), f * FLOW.alpha(t), rtol=1e-5)
        np.testing.assert_allclose(jax.grad(lambda u: FLOW.std(u) ** 2)(t), 2 * f * FLOW.std(t) ** 2 + g**2, rtol=1e-4)
    assert FLOW.t_max == 0.999 and float(logsnr_grid(FLOW, 4)[0]) == pytest.approx(0.999)


def test_velocity_parameterization():
    """u = eps - x_0 on the flow path; from the exact velocity the denoiser is x_0 exactly, on
    any schedule (the derivatives by autodiff)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    x0, eps = jax.random.normal(k1, (5, 3)), jax.random.normal(k2, (5, 3))
    for sde, t in ((FLOW, 0.3), (FLOW, 0.999), (VP(), 0.4)):
        u = target_from_noise(sde, "flow", t, x0, eps)
        xt = sde.alpha(t) * x0 + sde.std(t) * eps
        if isinstance(sde, Flow):
            np.testing.assert_allclose(u, eps - x0, rtol=1e-6)
        np.testing.assert_allclose(denoised_from_output(sde, "flow", t, xt, u), x0, rtol=1e-4, atol=1e-4)
        d = network_denoiser(sde, "flow", lambda t, x, a: u)(t, xt, None)
        np.testing.assert_allclose(d, x0, rtol=1e-4, atol=1e-4)


FLOW_SAMPLERS = {
    "euler": (edm_euler, 1.0, (32, 64, 128)),
    "heun": (edm_heun, 2.0, (16, 32, 64)),
    "dpm++2m": (lambda *a, **k: dpm_solver_pp(*a, order=2, **k), 2.0, (32, 64, 128)),
    "dpm++3m": (lambda *a, **k: dpm_solver_pp(*a, order=3, **k), 3.0, (32, 64, 128)),
    "unipc-bh1": (lambda *a, **k: unipc(*a, order=2, variant="bh1", **k), 3.0, (32, 64, 128)),
    "unipc-bh2": (lambda *a, **k: unipc(*a, order=2, variant="bh2", **k), 3.0, (32, 64, 128)),
}


@pytest.mark.parametrize("name", sorted(FLOW_SAMPLERS))
def test_orders_on_the_flow_schedule(name):
    sampler, order, steps = FLOW_SAMPLERS[name]
    x = jax.random.normal(jax.random.key(1), (2048,))
    errors = []
    for n in steps:
        ts = karras_grid(FLOW, n)
        y = jax.jit(lambda x: sampler(gaussian_denoiser, FLOW, x, ts))(x)
        errors.append(float(jnp.sqrt(jnp.mean((y - exact_flow(x, ts[0], ts[-1])) ** 2))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.35, (name, errors, slope)


def test_the_reverse_sde_ends_at_the_exact_marginal():
    """SDE-DPM-Solver++ on the flow schedule (the reverse SDE, whose drift and diffusion diverge
    at t = 1: the grid starts at 0.999) from the prior ends at the Gaussian's marginal."""
    ts = logsnr_grid(FLOW, 200)
    n = 20000
    x = FLOW.prior_sample(jax.random.key(2), (n,))
    y = np.asarray(sde_dpm_solver_pp(gaussian_denoiser, FLOW, x, ts, jax.random.key(3)), np.float64)
    a, s = float(FLOW.alpha(ts[-1])), float(FLOW.std(ts[-1]))
    mean, var = a * M, a**2 * S**2 + s**2
    assert abs(y.mean() - mean) < 4 * np.sqrt(var / n)
    assert abs(y.var() - var) < 4 * var * np.sqrt(2 / n) + 2e-3  # + the prior's 0.001 x_0 left at t_max


def _levels():
    v1, v2 = jnp.linspace(-1.0, 1.0, 4), jnp.cos(jnp.arange(4) + 1.0)
    return (lambda t, x, a: gaussian_denoiser(t, x) + 0.3 * jnp.sin(3 * t) * v1 + 0.2 * v2,
            lambda t, x, a: gaussian_denoiser(t, x) + 0.1 * t * v2,
            lambda t, x, a: gaussian_denoiser(t, x))


@pytest.mark.parametrize("sampler", [unipc, dpm_solver_pp, sde_dpm_solver_pp], ids=["unipc", "dpm++2m", "sde-dpm++"])
def test_multilevel_on_flows_is_exact_at_p_one_and_unbiased(sampler):
    levels, ts = _levels(), logsnr_grid(FLOW, 10)
    x = jax.random.normal(jax.random.key(4), (4,))
    ml = Multilevel(levels, jnp.ones(3), level_key=jax.random.key(5))
    top = sampler(levels[-1], FLOW, x, ts, jax.random.key(6))
    np.testing.assert_allclose(sampler(ml, FLOW, x, ts, jax.random.key(6)).y, top, rtol=1e-5, atol=1e-6)
    for coins, control in (("iid", None), ("iid", "cached"), ("stratified", None)):
        def one(level_key):
            m = Multilevel(levels, jnp.array([1.0, 0.5, 0.25]), coins=coins, level_key=level_key, control=control)
            return sampler(m, FLOW, x, ts, jax.random.key(6)).y

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BatchedLevelKeyWarning)
            ys = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), 2000)), np.float64)
        z = (ys.mean(0) - np.asarray(top)) / (ys.std(0) / np.sqrt(ys.shape[0]))
        assert np.all(np.abs(z) < 4.0), (coins, control, z)


@pytest.mark.parametrize("name", ["dpm++2m", "dpm++3m", "unipc", "ddim"])
def test_exponential_integrators_take_the_same_steps_on_every_schedule(name):
    """On grids with the same noise-to-signal ratios s = std / alpha, the data-prediction
    integrators see only s: VP and Flow give the same x / alpha at every step, given a denoiser
    that is a function of (x / alpha, s) (here the Gaussian one). So a flow schedule can differ
    from VP in these samplers only through its grid (what benchmarks/flow_testbed.py measures)."""
    vp = VP()

    def scaled_denoiser(sde):
        def d(t, x, args=None):
            a, sd = sde.alpha(t), sde.std(t)
            s = sd / a
            return M + S**2 / (S**2 + s**2) * (x / a - M)
        return d

    ts_vp = logsnr_grid(vp, 7, t_min=1e-3)
    s = np.asarray(vp.std(ts_vp) / vp.alpha(ts_vp), np.float64)
    ts_flow = jnp.asarray(s / (1.0 + s), jnp.float32)  # Flow's s(t) = t / (1 - t)
    x = jax.random.normal(jax.random.key(3), (64,))
    solve = {"dpm++2m": lambda *a: dpm_solver_pp(*a, order=2), "dpm++3m": lambda *a: dpm_solver_pp(*a, order=3),
             "unipc": unipc, "ddim": lambda *a: dpm_solver_pp(*a, order=1)}[name]
    y_vp = solve(scaled_denoiser(vp), vp, x * vp.alpha(ts_vp[0]), ts_vp)
    y_flow = solve(scaled_denoiser(FLOW), FLOW, x * FLOW.alpha(ts_flow[0]), ts_flow)
    same = float(jnp.max(jnp.abs(y_vp / vp.alpha(ts_vp[-1]) - y_flow / FLOW.alpha(ts_flow[-1]))))
    assert same < 2e-5  # float32 rounding
    # another grid over the same range (uniform in Flow's t) gives another result: the grid is what matters
    other = solve(scaled_denoiser(FLOW), FLOW, x * FLOW.alpha(ts_flow[0]), uniform_grid(7, float(ts_flow[-1]),
                                                                                       float(ts_flow[0])))
    assert float(jnp.max(jnp.abs(other - y_flow))) > 20 * same + 1e-4


def test_shifts():
    ts = uniform_grid(10)
    for shift in (1.0, 3.0, 5.0):
        np.testing.assert_allclose(shift_times(ts, shift), shift * ts / (1 + (shift - 1) * ts), rtol=1e-6)
    # the shift multiplies sigma / alpha by `shift`: a log-SNR grid keeps its spacing
    g = logsnr_grid(FLOW, 8)
    lam = np.log(np.asarray(FLOW.noise_to_signal(shift_times(g, 3.0)), np.float64))
    np.testing.assert_allclose(np.diff(lam), np.diff(np.log(np.asarray(FLOW.noise_to_signal(g), np.float64))),
                               rtol=1e-3)
    np.testing.assert_allclose(lam - np.log(np.asarray(FLOW.noise_to_signal(g))), np.log(3.0), rtol=1e-3)  # float32 t
    # SD3's resolution shift: mu linear in tokens, t' = e^mu / (e^mu + 1/t - 1)
    assert resolution_shift(1024) == pytest.approx(np.exp(0.95))
    assert resolution_shift(4096) == pytest.approx(np.exp(2.05))
    mu = np.log(resolution_shift(2560))
    np.testing.assert_allclose(shift_times(ts[1:], np.exp(mu)), np.exp(mu) / (np.exp(mu) + 1 / ts[1:] - 1),
                               rtol=1e-5)
    stretched = stretch_to_terminal(shift_times(ts, 3.0), 0.02)
    assert float(stretched[-1]) == pytest.approx(0.02, rel=1e-5) and float(stretched[0]) == pytest.approx(1.0)
    assert np.all(np.diff(np.asarray(stretched)) < 0)
    with pytest.raises(ValueError, match="shift: expected a finite shift > 0"):
        shift_times(ts, 0.0)
    with pytest.raises(ValueError, match="terminal: expected"):
        stretch_to_terminal(ts, 1.5)


def test_a_flow_family_saves_and_loads(tmp_path):
    """A family of velocity networks on the flow schedule: saved, loaded, and its denoiser is
    x - t u(x, t) (the network's output u)."""
    from mlem_jax.diffusion.family import load_family, save_family
    from mlem_jax.diffusion.unet import init_params, unet_family

    family = unet_family((4,), ch_mult=(2,), num_groups=2)
    params = [init_params(m, jax.random.key(0), (8, 8, 1)) for m in family]
    save_family(str(tmp_path / "fam"), family, params, FLOW, "flow", (8, 8, 1))
    fam = load_family(str(tmp_path / "fam"))
    assert isinstance(fam.sde, Flow) and fam.parameterization == "flow"
    x = jax.random.normal(jax.random.key(1), (8, 8, 1))
    u = fam.models[0].apply({"params": fam.params[0]}, x[None], jnp.full((1,), 0.5))[0]
    np.testing.assert_allclose(fam.denoisers()[0](0.5, x, None), x - 0.5 * u, rtol=1e-4, atol=1e-5)


def test_train_a_flow_family_from_the_command_line(tmp_path, capsys):
    """`mlem-jax train --schedule flow`: velocity prediction on the flow path with logit-normal
    times; the family records Flow and "flow", samples with UniPC, and its held-out flow-matching
    loss falls below the loss of predicting u = 0 (E|eps - x_0|^2 per pixel)."""
    from mlem_jax.cli import main
    from mlem_jax.diffusion.family import load_family
    from mlem_jax.diffusion.objective import sample_times

    out = tmp_path / "run"
    assert main(["train", "--dataset", "procedural", "--schedule", "flow", "--nfs", "4", "--ch-mult", "2",
                 "--steps", "30", "--batch-size", "16", "--out", str(out), "--no-progress"]) == 0
    fam = load_family(str(out / "family"))
    assert isinstance(fam.sde, Flow) and fam.parameterization == "flow"
    from mlem_jax.diffusion.data import load_dataset

    x0 = load_dataset("procedural", "test")
    zero_velocity = 1.0 + float(np.mean(x0**2))  # E|eps - x_0|^2 per pixel: the loss of predicting u = 0
    assert fam.meta["held_out_loss"]["4"] < 0.95 * zero_velocity
    y = unipc(fam.denoisers()[0], fam.sde, jax.random.normal(jax.random.key(0), (16, 16, 1)), logsnr_grid(fam.sde, 4))
    assert np.all(np.isfinite(np.asarray(y)))
    for extra in (["--solver", "unipc", "--shift", "3"], ["--solver", "em"]):  # EM from the flow's t_max = 0.999
        assert main(["sample", "--family", str(out / "family"), "--steps", "4", "--batch-size", "2", "--no-progress",
                     "--out", str(tmp_path / extra[1]), *extra]) == 0
    t = sample_times(jax.random.key(1), 20000, time_sampling="logit-normal")
    assert abs(float(jnp.mean(t)) - 0.5) < 0.01 and float(jnp.std(t)) < 0.25  # sigmoid(N(0,1)): sd 0.21
