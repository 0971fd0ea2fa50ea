"""Class-conditional levels and classifier-free guidance: the wrapper's algebra, its composition with
`Multilevel` and every sampler, conditional training and families, and the errors of bad labels."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import BatchedLevelKeyWarning, Multilevel
from mlem_jax.diffusion import VP, ddim, dpm_solver_pp, edm_heun, sde_dpm_solver_pp, uniform_grid
from mlem_jax.diffusion.family import load_family, save_family
from mlem_jax.diffusion.guidance import NULL_LABEL, guided, guided_passes
from mlem_jax.diffusion.objective import TrainConfig, dsm_loss
from mlem_jax.diffusion.sampling import sample
from mlem_jax.diffusion.train import train
from mlem_jax.diffusion.unet import UNet, denoiser_model, init_params

SDE = VP()
SHAPE = (8, 8, 1)
CLASSES = 3


@pytest.fixture(scope="module")
def levels():
    """Two untrained conditional UNets (random weights; the algebra does not need training)."""
    models = [UNet(nf=nf, ch_mult=(2,), num_classes=CLASSES) for nf in (4, 8)]
    params = [_perturbed(init_params(m, jax.random.key(i), SHAPE), i) for i, m in enumerate(models)]
    return models, params


def _perturbed(params, seed):
    """Every weight moved by noise: the output convolution starts at zero, which would hide the classes."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _close(got, want):
    """Equal up to float32 rounding of values of the size of `want` (the networks are untrained: large outputs)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(jnp.asarray(want)))))


def _denoisers(levels):
    models, params = levels
    return [denoiser_model(m, p, SDE) for m, p in zip(models, params)]


def test_weight_zero_is_the_conditional_model(levels):
    d = _denoisers(levels)[1]
    assert guided(d, 0.0) is d and guided_passes(0.0) == 1 and guided_passes(1.0) == 2
    x = jax.random.normal(jax.random.key(0), SHAPE)
    zero_schedule = guided(d, lambda t: 0.0 * t)  # a schedule that is 0: both passes, the same value
    _close(zero_schedule(0.5, x, 2), d(0.5, x, 2))


def test_the_batched_call_equals_two_separate_calls(levels):
    d = _denoisers(levels)[1]
    x = jax.random.normal(jax.random.key(1), (5, *SHAPE))
    labels = jnp.array([0, 1, 2, 1, 0])
    w = 2.5
    got = jax.vmap(guided(d, w), in_axes=(None, 0, 0))(0.4, x, labels)
    cond = jax.vmap(d, in_axes=(None, 0, 0))(0.4, x, labels)
    uncond = jax.vmap(d, in_axes=(None, 0, None))(0.4, x, NULL_LABEL)
    _close(got, (1 + w) * cond - w * uncond)
    assert float(jnp.max(jnp.abs(cond - uncond))) > 1e-3  # the classes matter, so the test can fail


def test_a_weight_schedule_and_autoguidance(levels):
    small, big = _denoisers(levels)
    x = jax.random.normal(jax.random.key(2), SHAPE)
    interval = guided(big, lambda t: jnp.where(t < 0.5, 2.0, 0.0))
    _close(interval(0.7, x, 1), big(0.7, x, 1))
    _close(interval(0.3, x, 1), 3 * big(0.3, x, 1) - 2 * big(0.3, x, NULL_LABEL))
    auto = guided(big, 1.5, guide=small)
    _close(auto(0.3, x, 1), 2.5 * big(0.3, x, 1) - 1.5 * small(0.3, x, 1))


SAMPLERS = {"ddim": ddim, "dpm++2m": dpm_solver_pp, "sde-dpm++2m": sde_dpm_solver_pp, "edm-heun": edm_heun}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_multilevel_guidance_at_p_one_is_guided_single_network_sampling(levels, name):
    run = SAMPLERS[name]
    g = [guided(d, 2.0) for d in _denoisers(levels)]
    ts = uniform_grid(6)
    x = jax.random.normal(jax.random.key(3), SHAPE)
    key = jax.random.key(4)
    single = run(g[-1], SDE, x, ts, key, 1)
    multi = run(Multilevel(g, jnp.ones(2), level_key=jax.random.key(5)), SDE, x, ts, key, 1)
    _close(multi.y, single)  # f^1 + (f^2 - f^1) = f^2 up to float32 rounding (measured: <= 1.2e-6 of the scale)
    np.testing.assert_array_equal(multi.evaluations, [multi.evaluations[0]] * 2)


def _affine_levels():
    """D^k(t, x, c) = 0.5 x + m_k[c]: corrections m_k[c] - m_{k-1}[c] that do not depend on the state."""
    means = jnp.array([[0.0, 0.1, -0.2, 0.05], [0.3, -0.1, 0.4, 0.0], [0.2, 0.5, -0.3, -0.25]])  # [level, class+null]

    def level(k):
        return lambda t, x, c: 0.5 * x + means[k, jnp.where(c < 0, CLASSES, c)]

    return [level(k) for k in range(3)]


@pytest.mark.parametrize("name,coins", [("ddim", "iid"), ("sde-dpm++2m", "iid"), ("dpm++2m", "stratified")])
def test_multilevel_guidance_is_unbiased_for_the_guided_top_level(name, coins):
    run = SAMPLERS[name]
    g = [guided(d, 3.0) for d in _affine_levels()]
    ts = uniform_grid(10, t_min=0.2)
    x = jax.random.normal(jax.random.key(7), (4,))
    probs = jnp.array([1.0, 0.5, 0.25])

    def one(level_key):
        return run(Multilevel(g, probs, coins=coins, level_key=level_key), SDE, x, ts, jax.random.key(8), 2).y

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchedLevelKeyWarning)
        ys = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(9), 2000)), np.float64)
    top = np.asarray(run(g[-1], SDE, x, ts, jax.random.key(8), 2), np.float64)
    se = ys.std(0) / np.sqrt(ys.shape[0])
    assert np.all(se > 0)
    assert np.all(np.abs((ys.mean(0) - top) / se) < 4.0)


def test_labels_out_of_range_are_an_error_also_under_jit(levels):
    d = _denoisers(levels)[0]
    x = jnp.zeros(SHAPE)
    with pytest.raises(Exception, match="labels: expected class labels in"):
        jax.block_until_ready(jax.jit(d)(0.5, x, CLASSES))
    with pytest.raises(TypeError, match="labels: expected integer"):
        d(0.5, x, 1.0)
    with pytest.raises(ValueError, match="weight: expected a finite guidance weight"):
        guided(d, -1.0)
    with pytest.raises(ValueError, match=r"weight: w\(t\) = -2 at t = 0; expected a finite guidance weight"):
        guided(d, lambda t: -2.0)  # round 4: a function is checked like a constant
    with pytest.raises(ValueError, match=r"weight: w\(t\) = -1 at t = 0.5"):
        guided(d, lambda t: jnp.where(t < 0.5, 1.0, -1.0))
    assert callable(guided(d, lambda t: jnp.where(t < 0.7, 2.0, 0.0)))
    from flax.errors import ScopeParamShapeError

    def other_shape(t, x, a):  # what a level of another image shape raises when called
        raise ScopeParamShapeError("kernel", "/Conv_0", (3, 3, 3, 4), (3, 3, 1, 4))

    with pytest.raises(ValueError, match=r"guide: the guide level's parameters do not fit the samples"):
        guided(d, 1.0, guide=other_shape)(0.5, x, 0)
    with pytest.raises(ValueError, match="args: a guided level needs the class label"):
        guided(d, 1.0)(0.5, x, None)
    unconditional = UNet(nf=4, ch_mult=(1, 2))
    with pytest.raises(ValueError, match="labels: this UNet is unconditional"):
        unconditional.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


@pytest.fixture(scope="module")
def conditional_path(tmp_path_factory, levels):
    models, params = levels
    path = str(tmp_path_factory.mktemp("cond") / "family")
    save_family(path, models, params, SDE, "eps", SHAPE, extra={"num_classes": CLASSES})
    return path


@pytest.fixture(scope="module")
def conditional_family(conditional_path):
    return load_family(conditional_path)


def test_a_conditional_family_samples_per_sample_labels_and_refuses_bad_ones(conditional_family):
    f = conditional_family
    assert f.num_classes == CLASSES
    ts = uniform_grid(5)
    labels = np.array([0, 1, 2, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = sample(f, [0, 1], ts, 0, 4, probs=jnp.array([1.0, 0.5]), labels=labels, guidance=1.0, solver="ddim")
        # sample i with label c equals the same sample drawn alone with that label (labels are per sample)
        alone = sample(f, [0, 1], ts, 0, 4, probs=jnp.array([1.0, 0.5]), labels=np.full(4, 1), guidance=1.0,
                       solver="ddim")
    np.testing.assert_allclose(r.images[1], alone.images[1], rtol=1e-4, atol=1e-4)
    assert float(np.abs(r.images[0] - alone.images[0]).max()) > 1e-4
    with pytest.raises(ValueError, match="labels: the family has 3 classes"):
        sample(f, [1], ts, 0, 2, labels=np.array([0, 3]))
    with pytest.raises(ValueError, match="guidance: guides towards a class"):
        sample(f, [1], ts, 0, 2, guidance=2.0)


def test_guidance_on_an_unconditional_family_is_an_error(tmp_path):
    models = [UNet(nf=4, ch_mult=(2,))]
    path = str(tmp_path / "plain")
    save_family(path, models, [init_params(models[0], jax.random.key(0), SHAPE)], SDE, "eps", SHAPE)
    f = load_family(path)
    assert f.num_classes == 0 and "label_embed" not in f.params[0]
    with pytest.raises(ValueError, match="guidance: this family is unconditional"):
        sample(f, [0], uniform_grid(4), 0, 2, guidance=1.0)
    with pytest.raises(ValueError, match="labels: this family is unconditional"):
        sample(f, [0], uniform_grid(4), 0, 2, labels=np.array([0, 1]))


def test_label_dropout_trains_the_null_class():
    model = UNet(nf=4, ch_mult=(2,), num_classes=CLASSES)
    x = np.asarray(jax.random.uniform(jax.random.key(0), (64, *SHAPE), minval=-1, maxval=1), np.float32)
    y = np.asarray(jax.random.randint(jax.random.key(1), (64,), 0, CLASSES), np.int32)
    params = _perturbed(init_params(model, jax.random.key(2), SHAPE), 2)  # the zero output layer passes no gradient

    def null_row_grad(dropout):
        g = jax.grad(dsm_loss)(params, model, SDE, jnp.asarray(x), jax.random.key(3), labels=jnp.asarray(y),
                               label_dropout=dropout)
        return float(jnp.abs(g["label_embed"]["embedding"][CLASSES]).sum())

    assert null_row_grad(0.0) == 0.0  # without dropout the null row never enters the loss
    assert null_row_grad(0.5) > 0.0
    state, history = train(model, x, TrainConfig(steps=3, batch_size=16, label_dropout=0.1), SDE, x[:16],
                           train_labels=y, test_labels=y[:16], progress=False)
    assert int(state.step) == 3 and np.isfinite(history.test[-1][1])
    with pytest.raises(ValueError, match="train_labels: a conditional UNet"):
        train(model, x, TrainConfig(steps=1, batch_size=16), SDE, progress=False)
    with pytest.raises(ValueError, match=r"train_labels: expected labels in \[0, 3\)"):
        train(model, x, TrainConfig(steps=1, batch_size=16), SDE, train_labels=y + 1, progress=False)
    with pytest.raises(ValueError, match="train_labels: this UNet is unconditional"):
        train(UNet(nf=4, ch_mult=(2,)), x, TrainConfig(steps=1, batch_size=16), SDE, train_labels=y,
              progress=False)



def test_the_cli_samples_classes_with_guidance_and_refuses_what_cannot_be(conditional_path, tmp_path, capsys):
    from mlem_jax.cli import main

    out = str(tmp_path / "s")
    assert main(["sample", "--family", conditional_path, "--levels", "1", "2", "--probs", "1", "0.5", "--steps", "4",
                 "--batch-size", "4", "--solver", "ddim", "--classes", "0", "2", "--guidance", "1.5", "--out", out,
                 "--no-progress"]) == 0
    saved = np.load(out + ".npz")
    np.testing.assert_array_equal(saved["labels"], [0, 2, 0, 2])
    assert float(saved["guidance"]) == 1.5 and "two network passes" in capsys.readouterr().out
    for argv, message in [
        (["--family", conditional_path, "--class", "3"], "--class: the family has 3 classes"),
        (["--family", conditional_path, "--guidance", "2"], "--guidance: guides towards a class"),
        (["--family", conditional_path, "--class", "1", "--guidance", "-1"], "--guidance: expected a weight >= 0"),
        (["--guidance", "2"], "--guidance: this family is unconditional"),
        (["--class", "1"], "--class: this family is unconditional"),
    ]:
        assert main(["sample", "--steps", "4", "--batch-size", "2", "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_the_comparison_samples_a_conditional_family_with_every_class(levels):
    """compare_best_samplers' batches give sample i the label i mod C: each sample equals the same
    network sampled for that label alone, and differs from the unconditional sample."""
    from mlem_jax.compare._best_samplers import _Batch
    from mlem_jax.diffusion import dpm_solver_pp, logsnr_grid
    from mlem_jax.diffusion.family import Family

    models, params = levels
    family = Family(tuple(models), tuple(params), SDE, "eps", SHAPE, {})
    batch = _Batch(family, 4, 0, 4, coin_plans=1)
    np.testing.assert_array_equal(np.asarray(batch.labels), [0, 1, 2, 0])
    y, _ = batch.images((1,), "dpm++2m", 3, 0)
    d = family.denoisers()[1]
    ts = logsnr_grid(SDE, 3)
    for i in range(4):
        alone = dpm_solver_pp(d, SDE, batch.y0[i], ts, args=i % CLASSES)
        _close(np.asarray(y[i]), np.asarray(alone))
    unconditional = dpm_solver_pp(d, SDE, batch.y0[0], ts)
    assert float(jnp.max(jnp.abs(unconditional - y[0]))) > 1e-3
