"""`sample(..., coin_plans=)`: the batch split into chunks with their own plan of level coins,
each sample keeping its prior draw and noise."""

import jax
import numpy as np
import pytest

from mlem_jax.diffusion import VP, logsnr_grid
from mlem_jax.diffusion.family import load_family, save_family
from mlem_jax.diffusion.sampling import sample
from mlem_jax.diffusion.unet import UNet, init_params

SHAPE = (8, 8, 1)
pytestmark = pytest.mark.filterwarnings("ignore::mlem_jax.diffusion.sampling.SampleRangeWarning")  # untrained


def _close(got, want):
    """Equal up to float32 rounding at the scale of `want` (batches of other sizes round differently)."""
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(want))))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    models = [UNet(nf=nf, ch_mult=(2,)) for nf in (4, 8)]
    params = []
    for i, m in enumerate(models):
        p = init_params(m, jax.random.key(i), SHAPE)
        leaves, tree = jax.tree_util.tree_flatten(p)
        keys = jax.random.split(jax.random.key(50 + i), len(leaves))  # move the zero output layer
        params.append(jax.tree_util.tree_unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape)
                                                          for a, k in zip(leaves, keys)]))
    stem = str(tmp_path_factory.mktemp("fam") / "family")
    save_family(stem, models, params, VP(), "eps", SHAPE)
    return load_family(stem)


def test_a_single_network_batch_is_the_same_whatever_the_split(family):
    ts = logsnr_grid(family.sde, 4)
    whole = sample(family, [1], ts, 0, 8, solver="dpm++2m")
    split = sample(family, [1], ts, 0, 8, solver="dpm++2m", coin_plans=4)
    _close(split.images, whole.images)
    np.testing.assert_array_equal(split.evaluations, whole.evaluations)


def test_each_chunk_has_its_own_coin_plan(family):
    ts = logsnr_grid(family.sde, 6)
    probs = np.array([1.0, 0.5])
    one = sample(family, [0, 1], ts, 0, 16, probs, solver="dpm++2m")
    plans = sample(family, [0, 1], ts, 0, 16, probs, solver="dpm++2m", coin_plans=8)
    # chunk 0 keeps the one-plan key: the same samples as the first two of the single plan
    _close(plans.images[:2], one.images[:2])
    # the other chunks draw other coins: some of them differ from the single plan's samples
    differ = [not np.allclose(plans.images[2 * c:2 * c + 2], one.images[2 * c:2 * c + 2], rtol=1e-3, atol=1e-3)
              for c in range(1, 8)]
    assert any(differ)
    # evaluations: the mean over 8 plans of the top level's firings (a multiple of 1/8, base always 6)
    assert plans.evaluations[0] == 6 and float(plans.evaluations[1] * 8) == round(plans.evaluations[1] * 8)
    assert 0 < plans.evaluations[1] < 6


@pytest.mark.parametrize("bad, match", [(0, "positive integer"), (1.5, "positive integer"), (True, "positive"),
                                        (3, "does not divide batch_size=8")])
def test_bad_coin_plans_are_refused(family, bad, match):
    with pytest.raises(ValueError, match=f"coin_plans: .*{match}"):
        sample(family, [0, 1], logsnr_grid(family.sde, 2), 0, 8, np.array([1.0, 0.5]), solver="dpm++2m",
               coin_plans=bad)
