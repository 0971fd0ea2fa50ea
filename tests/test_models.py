"""The UNet family, training, checkpoints and resuming."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import multilevel_euler_maruyama
from mlem_jax.diffusion import VP, reverse_diffusion, reverse_drift, uniform_grid
from mlem_jax.diffusion.checkpoint import latest_step, load_level, restore_checkpoint
from mlem_jax.diffusion.classifier import Classifier
from mlem_jax.diffusion.data import procedural
from mlem_jax.diffusion.objective import TrainConfig, dsm_loss
from mlem_jax.diffusion.train import train, train_family
from mlem_jax.diffusion.unet import (
    UNet,
    compiled_init,
    family_summary,
    init_params,
    nnx_apply,
    score_model,
    unet_family,
)

# one resolution at twice nf: about half the compile time of (1, 2), with GroupNorm groups of 2 channels
# (UNet(nf <= 8, ch_mult=(1,)) has 1-channel groups everywhere, which the norms make blind to t, and is
# refused); the architecture's own tests use more resolutions
TINY = dict(ch_mult=(2,), num_res_blocks=1)


def test_family_maps_images_to_images():
    shape = (8, 8, 3)
    family = unet_family((4, 8), ch_mult=(1, 2))
    params = [init_params(m, jax.random.key(0), shape) for m in family]
    x = jax.random.normal(jax.random.key(1), (2, *shape))
    for m, p in zip(family, params):
        assert m.apply({"params": p}, x, jnp.array([0.1, 0.9])).shape == x.shape
    summary = family_summary(family, params, shape)
    assert summary[1]["params"] > 3 * summary[0]["params"]
    assert summary[1]["gflop"] > 3 * summary[0]["gflop"] > 0


@pytest.mark.parametrize("module, inputs", [
    (UNet(nf=4, ch_mult=(2,), attn_resolutions=(4,), num_classes=3), (jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,)))),
    (Classifier(3, 8), (jnp.zeros((1, 8, 8, 1)),))])
def test_compiled_init_is_flax_init_bit_for_bit(module, inputs):
    """compiled_init compiles flax's init as one program at a low optimisation level: the same values
    (here at XLA_FLAGS' level 0, which eager init uses too)."""
    eager = module.init(jax.random.key(3), *inputs)
    compiled = compiled_init(module, jax.random.key(3), *inputs)
    assert jax.tree_util.tree_structure(eager) == jax.tree_util.tree_structure(compiled)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(compiled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_INIT_AT_THE_DEFAULT_LEVEL = """
import jax, jax.numpy as jnp, numpy as np
from mlem_jax.diffusion.classifier import Classifier
from mlem_jax.diffusion.unet import compiled_init
m, x = Classifier(3, 8), jnp.zeros((1, 8, 8, 1))
eager, compiled = m.init(jax.random.key(3), x), compiled_init(m, jax.random.key(3), x)
print(all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(compiled))))
"""


def test_compiled_init_is_flax_init_bit_for_bit_at_xlas_default_level():
    """The tests run XLA at optimisation level 0 (conftest.py), where compiled_init follows; a user's
    process runs eager init at the default level, and compiled_init at level 1 agrees with it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", _INIT_AT_THE_DEFAULT_LEVEL], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_attention_variant_builds():
    m = UNet(nf=4, ch_mult=(1, 2), attn_resolutions=(4,))
    p = init_params(m, jax.random.key(0), (8, 8, 1))
    assert m.apply({"params": p}, jnp.zeros((1, 8, 8, 1)), jnp.ones(1)).shape == (1, 8, 8, 1)


def test_bad_model_inputs():
    with pytest.raises(ValueError, match=r"x: image size 10x10 is not divisible by 4"):
        init_params(UNet(nf=4, ch_mult=(1, 2, 2)), jax.random.key(0), (10, 10, 1))
    with pytest.raises(ValueError, match=r"nf: width 6 .* num_groups=4"):
        init_params(UNet(nf=6, num_groups=4, **TINY), jax.random.key(0), (8, 8, 1))
    with pytest.raises(ValueError, match=r"nfs: expected increasing"):
        unet_family((16, 8))
    # one channel per group in every block: the network could not depend on t
    with pytest.raises(ValueError, match=r"num_groups: 8 GroupNorm groups of one channel .* ignore t"):
        unet_family((8,), ch_mult=(1,))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    for m in (UNet(nf=8, ch_mult=(1,), num_groups=4), UNet(nf=4, ch_mult=(2,))):  # 2-channel groups: t matters
        p = jax.tree_util.tree_map(lambda a: a + 0.1, init_params(m, jax.random.key(0), (8, 8, 1)))
        y0, y1 = (m.apply({"params": p}, x, jnp.full(2, s)) for s in (0.1, 0.9))
        assert float(jnp.max(jnp.abs(y0 - y1))) > 1e-3


def test_training_lowers_the_held_out_loss(tmp_path):
    x = procedural(jax.random.key(0), 64, (8, 8, 1))
    test = procedural(jax.random.key(1), 32, (8, 8, 1))
    model = UNet(nf=4, **TINY)
    cfg = TrainConfig(steps=60, batch_size=32, learning_rate=3e-3, warmup_steps=5, eval_every=60, ema_decay=0.9)
    p0 = init_params(model, jax.random.split(jax.random.key(cfg.seed))[0], (8, 8, 1))
    held = lambda p: np.mean([float(dsm_loss(p, model, VP(), jnp.asarray(test), jax.random.key(i))) for i in range(4)])
    state, history = train(model, x, cfg, test_images=test, progress=False)
    assert held(state.params) < 0.8 * held(p0)
    assert len(history.train) == 60 and history.test[-1][0] == 60


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    x = procedural(jax.random.key(0), 40, (8, 8, 1))
    model = UNet(nf=4, **TINY)
    cfg = TrainConfig(steps=6, batch_size=16, checkpoint_every=2, warmup_steps=2)
    full, _ = train(model, x, cfg, checkpoint_dir=str(tmp_path / "a"), progress=False)

    class Stop(Exception):
        pass

    def interrupt(step, loss):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(model, x, cfg, checkpoint_dir=str(tmp_path / "b"), progress=False, on_step=interrupt)
    # the save at step 4 runs in the background while step 5 computes; the exception must not lose it
    assert latest_step(str(tmp_path / "b")) == 4  # nothing lost beyond the last checkpoint
    resumed, hist = train(model, x, cfg, checkpoint_dir=str(tmp_path / "b"), resume=True, progress=False)
    assert [s for s, _ in hist.train] == [5, 6]
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(resumed.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # a round trip through load_level gives the EMA parameters and the model back
    m, ema, sde, par, meta = load_level(str(tmp_path / "b"))
    assert m.nf == 4 and par == "eps" and isinstance(sde, VP)
    for a, b in zip(jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(resumed.ema_params)):
        np.testing.assert_array_equal(a, b)


def test_a_run_opens_one_checkpoint_manager_and_saves_on_its_cadence(tmp_path, monkeypatch):
    """One orbax manager for a fresh run (not one per save or per query), saves at multiples of
    checkpoint_every and at the last step, every one complete when `train` returns."""
    import orbax.checkpoint as ocp

    from mlem_jax.diffusion.checkpoint import all_steps

    opened = []
    real = ocp.CheckpointManager

    def counting(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ocp, "CheckpointManager", counting)
    x = procedural(jax.random.key(0), 16, (8, 8, 1))
    cfg = TrainConfig(steps=5, batch_size=8, checkpoint_every=2, warmup_steps=1)
    train(UNet(nf=4, **TINY), x, cfg, checkpoint_dir=str(tmp_path / "c"), progress=False)
    assert len(opened) == 1
    monkeypatch.setattr(ocp, "CheckpointManager", real)
    assert all_steps(str(tmp_path / "c")) == [4, 5]  # max_to_keep=2 of 2, 4, 5
    restore_checkpoint(str(tmp_path / "c"), UNet(nf=4, **TINY), (8, 8, 1), cfg, step=4)


def test_a_save_in_flight_is_not_lost_when_training_is_interrupted(tmp_path, monkeypatch):
    """Ctrl-C right after a background save has started: `train` unwinds through `Checkpoints.close`,
    which waits for orbax, so that step's checkpoint is complete and restores to the saved state."""
    from mlem_jax.diffusion.checkpoint import Checkpoints, all_steps

    real_save, saved = Checkpoints.save, {}

    def save_then_interrupt(self, state, meta, force=False):
        did = real_save(self, state, meta, force)
        if did and int(state.step) == 4:
            saved["params"] = jax.tree_util.tree_map(np.asarray, state.params)
            raise KeyboardInterrupt  # orbax is still writing in the background here
        return did

    monkeypatch.setattr(Checkpoints, "save", save_then_interrupt)
    x = procedural(jax.random.key(0), 16, (8, 8, 1))
    cfg = TrainConfig(steps=6, batch_size=8, checkpoint_every=4, warmup_steps=1)
    with pytest.raises(KeyboardInterrupt):
        train(UNet(nf=4, **TINY), x, cfg, checkpoint_dir=str(tmp_path / "c"), progress=False)
    assert all_steps(str(tmp_path / "c"))[-1] == 4
    state, _ = restore_checkpoint(str(tmp_path / "c"), UNet(nf=4, **TINY), (8, 8, 1), cfg, step=4)
    back = jax.tree_util.tree_leaves(state.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(saved["params"]), back))


def test_checkpoint_errors(tmp_path):
    x = procedural(jax.random.key(0), 16, (8, 8, 1))
    cfg = TrainConfig(steps=1, batch_size=8)
    train(UNet(nf=4, **TINY), x, cfg, checkpoint_dir=str(tmp_path / "c"), progress=False)
    with pytest.raises(ValueError, match=r"checkpoint: .* written for a model with nf=4, but this model has nf=8"):
        restore_checkpoint(str(tmp_path / "c"), UNet(nf=8, **TINY), (8, 8, 1), cfg)
    with pytest.raises(ValueError, match=r"checkpoint: .* images of shape"):
        restore_checkpoint(str(tmp_path / "c"), UNet(nf=4, **TINY), (16, 16, 1), cfg)
    # corrupt the array data of the only checkpoint
    import pathlib

    for f in pathlib.Path(tmp_path / "c" / "1" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"checkpoint: step 1 .* corrupt or incomplete"):
        restore_checkpoint(str(tmp_path / "c"), UNet(nf=4, **TINY), (8, 8, 1), cfg)
    with pytest.raises(FileNotFoundError, match=r"checkpoint: no checkpoint"):
        load_level(str(tmp_path / "empty"))


def test_trained_family_samples_with_mlem(tmp_path):
    x = procedural(jax.random.key(0), 32, (8, 8, 1))
    family = unet_family((4, 8), **TINY)
    out = train_family(family, x, TrainConfig(steps=2, batch_size=16), checkpoint_root=str(tmp_path), progress=False)
    sde = VP()
    levels = tuple(reverse_drift(sde, score_model(m, s.ema_params, sde)) for m, (s, _) in zip(family, out))
    ts = uniform_grid(10)
    sample = jax.jit(jax.vmap(lambda k, lk: multilevel_euler_maruyama(
        levels, jnp.array([1.0, 0.5]), reverse_diffusion(sde), sde.prior_sample(k, (8, 8, 1)), ts, k, level_key=lk),
        in_axes=(0, None)))
    sol = sample(jax.random.split(jax.random.key(1), 3), jax.random.key(2))
    assert sol.y.shape == (3, 8, 8, 1) and np.all(np.isfinite(sol.y))
    assert (tmp_path / "nf4").is_dir() and (tmp_path / "nf8").is_dir()


def test_nnx_adapter():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 3, rngs=rngs)

        def __call__(self, x, t):
            return self.lin(x) * t

    module = Tiny(nnx.Rngs(0))
    network, params = nnx_apply(module)
    x = jnp.ones((2, 3))
    out = network(params, 2.0, x)
    np.testing.assert_array_equal(out, module(x, 2.0))
    assert jnp.allclose(jax.jit(network)(params, 2.0, x, None), out)
    from mlem_jax import InputError

    with pytest.raises(InputError, match=r"network\(params, t, x, args\), t first.*swap t and x"):
        network(params, x, 2.0)


def test_combine_families(tmp_path):
    """Levels of two families make one, in width order, with their sources recorded; a
    mismatch of image shape is refused."""
    import jax

    from mlem_jax.diffusion.family import combine_families, load_family, save_family
    from mlem_jax.diffusion.sde import VP
    from mlem_jax.diffusion.unet import compiled_init, unet_family

    def make(nfs, name, shape=(8, 8, 1)):
        models = unet_family(nfs, ch_mult=(2,))
        params = [compiled_init(m, jax.random.key(i), jnp.zeros((1, *shape)), jnp.ones(1))["params"] for i,
                  m in enumerate(models)]
        return save_family(str(tmp_path / name), models, params, VP(), "eps", shape, extra={"command": f"make {name}"})

    small, big = make((4, 8), "small"), make((16,), "big")
    path = combine_families([small, big], str(tmp_path / "all"), nfs=(4, 16))
    fam = load_family(path)
    assert [m.nf for m in fam.models] == [4, 16]
    assert fam.meta["sources"]["16"]["command"] == "make big"
    np.testing.assert_array_equal(fam.params[1]["Conv_0"]["kernel"], load_family(big).params[0]["Conv_0"]["kernel"])
    again = load_family(combine_families([small, path], str(tmp_path / "again"), nfs=(8, 16)))
    assert again.meta["sources"]["16"]["command"] == "make big"  # a combined family passes on where a level came from
    odd = make((4,), "odd", shape=(16, 16, 1))
    with pytest.raises(ValueError, match="image_shape"):
        combine_families([small, odd], str(tmp_path / "bad"))


def test_restarts_are_never_silent(tmp_path):
    """A directory with checkpoints is not restarted without resume or overwrite; a resume
    with another recipe is refused; a corrupt newest checkpoint falls back to the previous
    one; a finished level still reports its held-out loss; seconds accumulate."""
    import pathlib

    from mlem_jax.diffusion.checkpoint import all_steps

    x = procedural(jax.random.key(0), 40, (8, 8, 1))
    model = UNet(nf=4, **TINY)
    cfg = TrainConfig(steps=4, batch_size=16, checkpoint_every=2, warmup_steps=2)
    d = str(tmp_path / "run")
    _, first = train(model, x, cfg, checkpoint_dir=d, progress=False)
    assert all_steps(d) == [2, 4] and first.seconds > 0
    with pytest.raises(FileExistsError, match=r"already holds checkpoints \(steps \[2, 4\]\); pass resume=True"):
        train(model, x, cfg, checkpoint_dir=d, progress=False)
    with pytest.raises(ValueError, match=r"resume: .* trained with seed=0 \(now 1\)"):
        train(model, x, cfg._replace(seed=1), checkpoint_dir=d, resume=True, progress=False)
    with pytest.raises(ValueError, match=r"resume: .* batch_size=16 \(now 8\), learning_rate"):
        train(model, x, cfg._replace(batch_size=8, learning_rate=1e-3), checkpoint_dir=d, resume=True, progress=False)
    # nothing left to train: the held-out loss is still reported, and the time of the first session counted
    _, again = train(model, x, cfg, test_images=x[:16], checkpoint_dir=d, resume=True, progress=False)
    assert again.train == [] and again.test[0][0] == 4 and np.isfinite(again.test[0][1])
    # the checkpoint records the time up to its own save (first.seconds also counts that save's duration)
    from mlem_jax.diffusion.checkpoint import restore_latest_intact

    recorded = restore_latest_intact(d, model, x.shape[1:], cfg)[1]["train_seconds"]
    assert 0 < recorded <= first.seconds and again.seconds > recorded
    # corrupt the newest checkpoint: a longer resumed run restarts from step 2 with a warning
    for f in pathlib.Path(d, "4", "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable checkpoint.*resuming from step 2; kept as "
                                         r"4.unreadable"):
        _, h = train(model, x, cfg, checkpoint_dir=d, resume=True, progress=False)
    assert [s for s, _ in h.train] == [3, 4]
    # the resumed run saved step 4 again (the damaged one is kept aside), and it restores
    assert all_steps(d) == [2, 4] and pathlib.Path(d, "4.unreadable").is_dir()
    restore_latest_intact(d, model, x.shape[1:], cfg)
    # overwrite starts again from step 0
    _, fresh = train(model, x, cfg, checkpoint_dir=d, overwrite=True, progress=False)
    assert [s for s, _ in fresh.train] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"batch_size: 64 is larger than the 40 training images"):
        train(model, x, cfg._replace(batch_size=64), progress=False)


def test_load_family_refuses_files_that_do_not_belong_together(tmp_path):
    """Every mismatch between the .json and the .npz, and every damaged value, is one
    ValueError naming the file, never a wrong sample."""
    import json as _json

    from mlem_jax.diffusion.family import load_family, save_family

    family = unet_family((4, 8), **TINY)
    params = [init_params(m, jax.random.key(i), (8, 8, 1)) for i, m in enumerate(family)]
    stem = str(tmp_path / "fam")
    save_family(stem, family, params, VP(), "eps", (8, 8, 1))
    assert [m.nf for m in load_family(stem).models] == [4, 8]
    good = _json.loads(open(stem + ".json").read())

    def with_json(change, text=None):
        meta = _json.loads(_json.dumps(good))
        change(meta)
        with open(stem + ".json", "w") as f:
            f.write(text if text is not None else _json.dumps(meta))
        with pytest.raises(ValueError) as info:
            load_family(stem)
        with open(stem + ".json", "w") as f:
            f.write(_json.dumps(good))
        return str(info.value)

    assert "not valid JSON" in with_json(lambda m: None, text=_json.dumps(good)[:50])
    assert "holds 2 levels" in with_json(lambda m: m["levels"].append(m["levels"][-1]))
    assert "but fam.json's model needs" in with_json(lambda m: m["levels"][1].update(nf=16)).replace(stem[:-3], "")
    assert "trained on images of shape [8, 8, 1]" in with_json(lambda m: m.update(image_shape=[16, 16, 1]))
    assert "was trained with the SDE" in with_json(lambda m: m["sde"].update(beta_max=10.0))
    assert "beta_max=-1.0" in with_json(lambda m: m["sde"].update(beta_max=-1.0))
    assert "lacks ['sde']" in with_json(lambda m: m.pop("sde"))
    # fields of the wrong type (issue: malformed files end in tracebacks that name no file)
    assert "has levels = '5'" in with_json(lambda m: m.update(levels=5))
    assert "has sde 'VP'; expected an object" in with_json(lambda m: m.update(sde="VP"))
    assert "beta_max = '20' (str); expected a number" in with_json(lambda m: m["sde"].update(beta_max="20"))
    assert "holds a list, not an object" in with_json(lambda m: None, text="[1, 2]")
    with open(stem + ".json", "wb") as f:
        f.write(b'{"levels": "\xff"}')
    with pytest.raises(ValueError, match=r"fam.json is not UTF-8 text"):
        load_family(stem)
    with open(stem + ".json", "w") as f:
        f.write(_json.dumps(good))
    # a damaged member (bytes flipped inside it: a CRC error) and an object array (a pickle) name file and member
    raw = open(stem + ".npz", "rb").read()
    with open(stem + ".npz", "wb") as f:
        f.write(raw[:len(raw) // 2] + bytes(b ^ 0xFF for b in raw[len(raw) // 2:len(raw) // 2 + 64])
                + raw[len(raw) // 2 + 64:])
    with pytest.raises(ValueError, match=r"fam.npz (cannot be read|is not a readable npz)"):
        load_family(stem)
    with open(stem + ".npz", "wb") as f:
        f.write(raw)
    members = dict(np.load(stem + ".npz"))
    np.savez(stem + ".npz", **{**members, "level0/Conv_0/bias": np.array([None, 1], object)})
    with pytest.raises(ValueError, match=r"member 'level0/Conv_0/bias' of .*fam.npz cannot be read"):
        load_family(stem)
    np.savez(stem + ".npz", **{**members, "meta/sde": np.frombuffer(b"\xff\xfe{", np.uint8)})  # round 4
    with pytest.raises(ValueError, match=r"fam.npz has a damaged 'meta/sde' record \(UnicodeDecodeError"):
        load_family(stem)
    np.savez(stem + ".npz", **members)
    assert [m.nf for m in load_family(stem).models] == [4, 8]
    # NaN weights
    bad = [jax.tree_util.tree_map(lambda v: v * jnp.nan, params[0]), params[1]]
    save_family(stem, family, bad, VP(), "eps", (8, 8, 1))
    with pytest.raises(ValueError, match=r"level 0 \(nf=4\) of .*fam.npz has non-finite weights"):
        load_family(stem)
