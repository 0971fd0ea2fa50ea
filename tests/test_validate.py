"""Every bad input gets a clear error that names the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlem_jax import FixedFirings, euler_maruyama, multilevel_euler_maruyama

TS = jnp.linspace(0.0, 1.0, 5)
Y0 = jnp.ones(3)
KEY = jax.random.key(0)
F = lambda t, y, a: -y
G = lambda t, y, a: 0.5


def mlem(**kw):
    base = dict(drifts=(F, F), probs=jnp.array([1.0, 0.5]), diffusion=G, y0=Y0, ts=TS, key=KEY)
    base.update(kw)
    return multilevel_euler_maruyama(**base)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(drifts=()), r"drifts: expected at least one"),
        (dict(drifts=F), r"drifts: expected a sequence"),
        (dict(drifts=(F, lambda t, y, a: y[:2])), r"drifts\[1\]: .*shape and dtype"),
        (dict(drifts=(F, lambda t, y, a: y.astype(jnp.int32))), r"drifts\[1\]: .*int32"),
        (dict(drifts=(F, lambda t, y, a: (y, y))), r"drifts\[1\]: .*pytree structure"),
        (dict(probs=jnp.array([1.0, 0.5, 0.2])), r"probs: .*shape \(2,\)"),
        (dict(probs=jnp.array([1.0, 1.5])), r"probs: .*\(0, 1\]"),
        (dict(probs=jnp.array([1.0, 0.0])), r"probs: .*\(0, 1\]"),
        (dict(probs=jnp.array([0.5, 0.5])), r"probs: the first .* probability 1"),
        (dict(probs=jnp.array([1.0, jnp.nan])), r"probs: contains NaN"),
        (dict(probs=lambda t: jnp.array([1.0, 0.5, 0.1])), r"probs: the schedule .*\(2,\)"),
        (dict(probs=lambda t: jnp.array([1.0, 2.0 * t])), r"probs\(t\): .*\(0, 1\]"),
        (
            dict(drifts=(F, F, F), probs=jnp.array([1.0, 0.2, 0.5]), coupling="nested"),
            r"probs: the nested coupling needs non-increasing",
        ),
        (dict(coupling="antithetic"), r"coupling: expected one of"),
        (dict(ts=jnp.ones((2, 3))), r"ts: expected a 1-D"),
        (dict(ts=jnp.array([0.0])), r"ts: expected at least 2"),
        (dict(ts=jnp.array([0.0, 0.5, 0.5, 1.0])), r"ts: expected a strictly monotone"),
        (dict(ts=jnp.array([0.0, 0.5, 0.2])), r"ts: expected a strictly monotone"),
        (dict(diffusion=lambda t, y, a: jnp.ones(4)), r"diffusion: .*does not broadcast"),
        (dict(diffusion=lambda t, y, a: jnp.ones((2, 3))), r"diffusion: .*does not broadcast"),
        (dict(key=0), r"key: expected a PRNG key"),
        (dict(key=jax.random.split(KEY, 4)), r"key: expected a PRNG key"),
        (dict(key=jnp.ones((3, 3))), r"key: precomputed Brownian increments must have shape"),
        (dict(level_key=jax.random.split(KEY, 2)), r"level_key: expected a single PRNG key"),
        (dict(key=jnp.zeros((4, 3))), r"level_key: required when key is"),
        (dict(key=jnp.zeros((4, 3), jnp.int32), level_key=KEY), r"key: precomputed Brownian increments must be floati"),
        (dict(saveat="everything"), r"saveat: expected None, 'all'"),
        (dict(saveat=[0, 9]), r"saveat: indices must lie"),
        (dict(y0=jnp.ones(3, jnp.int32)), r"y0: expected floating-point states, got dtype int32"),
        (dict(probs=FixedFirings((2.7,))), r"probs: FixedFirings.firings must be whole numbers"),
        (dict(probs=FixedFirings(("two",))), r"probs: FixedFirings.firings must be a sequence of integers"),
    ],
)
def test_bad_multilevel_inputs(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mlem(**kw)


def test_errors_raise_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"drifts\[1\]"):
        jax.jit(lambda k: mlem(key=k, drifts=(F, lambda t, y, a: y[:1])).y)(KEY)
    with pytest.raises(TypeError, match=r"level_key"):
        jax.jit(lambda lk: mlem(level_key=lk).y)(jnp.ones(2))


def test_small_probability_warns():
    with pytest.warns(UserWarning, match=r"below 1e-06"):
        mlem(probs=jnp.array([1.0, 1e-8]))


def test_bad_em_inputs():
    with pytest.raises(ValueError, match=r"drift: .*shape"):
        euler_maruyama(lambda t, y, a: y.sum(), G, Y0, TS, KEY)
    with pytest.raises(TypeError, match=r"drift: expected a callable"):
        euler_maruyama(None, G, Y0, TS, KEY)
    with pytest.raises(TypeError, match=r"diffusion: expected a callable"):
        euler_maruyama(F, 0.5, Y0, TS, KEY)
    with pytest.raises(ValueError, match=r"ts: expected a strictly monotone"):
        euler_maruyama(F, G, Y0, np.array([1.0, 0.0, 0.5]), KEY)


def test_brownian_path_of_wrong_shape():
    import diffrax

    path = diffrax.VirtualBrownianTree(0.0, 1.0, tol=1e-3, shape=(2,), key=KEY)
    with pytest.raises(ValueError, match=r"key: the Brownian path's increments must be shaped like y0"):
        euler_maruyama(F, G, Y0, TS, path)


def test_a_batched_level_key_warns_and_an_unbatched_one_does_not():
    """The default level_key=None under vmap derives one level key per sample: every level
    then runs at every step. The jaxpr shows it (select instead of cond), and we warn."""
    import warnings

    from mlem_jax import BatchedLevelKeyWarning, multilevel_euler_maruyama

    levels = (lambda t, y, a: -y, lambda t, y, a: -1.1 * y)
    ts = jnp.linspace(0.0, 1.0, 5)
    keys = jax.random.split(jax.random.key(0), 3)
    run = lambda k, **kw: multilevel_euler_maruyama(levels, jnp.array([1.0, 0.5]), lambda t, y, a: 0.1,
                                                    jnp.ones(2), ts, k, **kw).y
    with pytest.warns(BatchedLevelKeyWarning, match=r"level_key: the level key is batched .* level_key=level_key"):
        batched = jax.make_jaxpr(jax.vmap(run))(keys)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchedLevelKeyWarning)
        shared = jax.make_jaxpr(jax.vmap(lambda k: run(k, level_key=jax.random.key(1))))(keys)
    assert "cond" in str(shared) and "cond" not in str(batched)
    # evaluations say what ran: every level at every step when batched, fewer when shared
    with pytest.warns(BatchedLevelKeyWarning):
        ev_batched = jax.vmap(lambda k: multilevel_euler_maruyama(levels, jnp.array([1.0, 0.5]), lambda t, y, a: 0.1,
                                                                  jnp.ones(2), ts, k).evaluations)(keys)
    assert np.all(np.asarray(ev_batched) == 4)
    ev_shared = jax.vmap(lambda k: multilevel_euler_maruyama(levels, jnp.array([1.0, 0.01]), lambda t, y, a: 0.1,
                                                             jnp.ones(2), ts, k, level_key=jax.random.key(1))
                         .evaluations)(keys)
    assert np.all(np.asarray(ev_shared)[:, 0] == 4) and np.all(np.asarray(ev_shared)[:, 1] < 4)


def test_check_finite_raises_when_a_path_goes_non_finite():
    """Opt-in: a drift that turns NaN after t = 0.5 raises inside jit(vmap); finite paths
    pass unchanged, and without the flag the NaN is returned as is."""
    from mlem_jax import multilevel_euler_maruyama

    levels = (lambda t, y, a: -y, lambda t, y, a: jnp.where(t > 0.5, jnp.nan, -1.1 * y))
    ts = jnp.linspace(0.0, 1.0, 11)
    keys = jax.random.split(jax.random.key(0), 3)

    def run(levels, check):
        return jax.jit(jax.vmap(lambda k: multilevel_euler_maruyama(
            levels, jnp.array([1.0, 1.0]), lambda t, y, a: 0.1, jnp.ones(2), ts, k, level_key=jax.random.key(1),
            check_finite=check).y))(keys)

    with pytest.raises(Exception, match=r"ML-EM: the trajectory went non-finite"):
        jax.block_until_ready(run(levels, True))
    assert np.isnan(np.asarray(run(levels, False))).all()
    fine = (levels[0], lambda t, y, a: -1.1 * y)
    np.testing.assert_array_equal(np.asarray(run(fine, True)), np.asarray(run(fine, False)))
    with pytest.raises(Exception, match=r"EM: the trajectory went non-finite"):
        jax.block_until_ready(euler_maruyama(levels[1], None, jnp.ones(2), ts, None, check_finite=True))


def test_the_old_name_of_fixed_firings_is_gone():
    import mlem_jax

    assert not hasattr(mlem_jax, "FixedBudget") and mlem_jax.FixedFirings.__name__ == "FixedFirings"


def test_a_schedule_is_checked_at_construction_and_against_the_grid():
    from mlem_jax import PiecewiseConstant

    with pytest.raises(ValueError, match=r"values: expected one row of probabilities per bin, shape \(2, K\)"):
        PiecewiseConstant(jnp.array([0.0, 0.5, 1.0]), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="edges: expected strictly increasing"):
        PiecewiseConstant(jnp.array([0.0, 0.6, 0.5]), jnp.ones((2, 2)))
    short = PiecewiseConstant(jnp.array([0.0, 0.25, 0.5]), jnp.ones((2, 2)).at[:, 1].set(0.5))
    with pytest.raises(ValueError, match=r"probs: the schedule's edges cover \[0, 0.5\], but the solver calls "
                                         r"the model at times in \[0, 0.75\]"):
        mlem(probs=short)
    covering = PiecewiseConstant(jnp.array([0.0, 0.5, 1.0]), short.values)
    assert mlem(probs=covering).y.shape == (3,)
    # a pytree still: vmapped over a batch of schedules, rebuilt by tree_map
    doubled = jax.tree_util.tree_map(lambda x: x, covering)
    assert isinstance(doubled, PiecewiseConstant)


def test_traced_grids_and_schedules_are_checked_when_the_program_runs():
    """Under jit the values are not known at trace time: equinox.error_if raises when it runs."""

    run = jax.jit(lambda ts: euler_maruyama(F, G, Y0, ts, KEY))
    assert run(TS).shape == (3,)
    with pytest.raises(Exception, match="ts: expected a strictly monotone grid"):
        run(jnp.array([0.0, 0.5, 0.3, 1.0, 1.1])).block_until_ready()
    sched = jax.jit(lambda c: multilevel_euler_maruyama((F, F), lambda t: jnp.array([1.0, c]), G, Y0, TS, KEY,
                                                        level_key=jax.random.key(1)).y)
    assert sched(0.5).shape == (3,)
    with pytest.raises(Exception, match=r"probs\(t\): every probability must lie in \(0, 1\]"):
        sched(1.5).block_until_ready()


@pytest.mark.parametrize("field, value, match", [
    ("steps", 1e30, r"steps must be an integer in \[1, 10000000\], got 1e\+30"),
    ("steps", True, "steps must be an integer"),
    ("grid", 7, r"grid must be one of \['uniform'"),
    ("coupling", "tight", r"coupling must be one of \['independent', 'nested'\], got 'tight'"),
    ("solver", "rk4", "solver must be one of"),
    ("levels", 5, "levels must be a non-empty list"),
])
def test_a_calibration_file_with_fields_of_the_wrong_type_is_refused_at_load(tmp_path, field, value, match):
    import json

    from mlem_jax.calibrate import load_calibration, save_calibration

    path = save_calibration(str(tmp_path / "c.json"), jnp.array([1.0, 0.5]), levels=[4, 8], steps=10, grid="uniform")
    record = json.loads(open(path).read())
    record[field] = value
    open(path, "w").write(json.dumps(record))
    with pytest.raises(ValueError, match=f"calibration {path}: {match}"):
        load_calibration(path)
    open(path, "wb").write(b'{"levels": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8 text"):
        load_calibration(path)


def test_writes_are_atomic_and_never_follow_a_planted_temporary_name(tmp_path):
    """The temporary file is created exclusively under a fresh name: a symlink planted at the old fixed
    names (path + '.tmp', stem + '.tmp.npz') is left alone, and so is the file it points to."""
    import os

    from mlem_jax._atomic import atomic_path
    from mlem_jax.calibrate import load_calibration, save_calibration

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = tmp_path / "c.json"
    os.symlink(victim, str(path) + ".tmp")
    save_calibration(str(path), jnp.array([1.0, 0.5]), levels=[4, 8], steps=10, grid="uniform")
    assert victim.read_text() == "keep me" and load_calibration(str(path)).steps == 10
    with pytest.raises(RuntimeError, match="boom"):  # a failed write leaves the old file and no temporary one
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("boom")
    assert load_calibration(str(path)).steps == 10
    assert sorted(os.listdir(tmp_path)) == ["c.json", "c.json.tmp", "victim"]


def test_exclusive_writes_never_replace_a_file_that_appeared_and_the_umask_is_not_touched(tmp_path, monkeypatch):
    """Two runs on one output: with exclusive=True the second write finds the first's file and
    fails, leaving it whole and no temporary file; the mode follows the umask, read without
    calling os.umask (which would race with other threads)."""
    import os

    from mlem_jax._atomic import atomic_path
    from mlem_jax.calibrate import load_calibration, save_calibration

    path = tmp_path / "same.json"
    save_calibration(str(path), jnp.array([1.0, 0.5]), levels=[4, 8], steps=10, grid="uniform", exclusive=True)
    with pytest.raises(FileExistsError, match="appeared while this run computed"):
        save_calibration(str(path), jnp.array([1.0, 0.25]), levels=[4, 8], steps=20, grid="uniform", exclusive=True)
    assert load_calibration(str(path)).steps == 10 and os.listdir(tmp_path) == ["same.json"]
    save_calibration(str(path), jnp.array([1.0, 0.25]), levels=[4, 8], steps=20, grid="uniform")  # replaces
    assert load_calibration(str(path)).steps == 20
    mask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda m: (_ for _ in ()).throw(AssertionError("umask changed")))
        with atomic_path(str(tmp_path / "m.txt")) as tmp:
            open(tmp, "w").write("x")
    finally:
        monkeypatch.undo()
        os.umask(mask)
    assert os.stat(tmp_path / "m.txt").st_mode & 0o777 == 0o640


def test_a_schedule_with_python_branches_on_t_is_one_teaching_error():
    def branching(t):
        return jnp.array([1.0, 0.2]) if t < 0.5 else jnp.array([1.0, 0.05])

    with pytest.raises(TypeError, match=r"probs: the schedule p\(t\) branches on t with Python control.*jnp.where"):
        mlem(probs=branching)
    assert mlem(probs=lambda t: jnp.where(t < 0.5, jnp.array([1.0, 0.2]), jnp.array([1.0, 0.05]))).y.shape == (3,)
