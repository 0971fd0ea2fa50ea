"""The mlem-jax command end to end on tiny configurations, and its error paths."""

import os

import numpy as np
import pytest
from conftest import TINY

from mlem_jax.cli import main
from mlem_jax.diffusion.family import load_family, shipped_family_path


def test_train_resume_and_family_files(trained, capsys):
    fam = load_family(str(trained / "family"))
    assert [m.nf for m in fam.models] == [4, 8] and fam.image_shape == (16, 16, 1)
    assert "mlem-jax train" in fam.meta["command"]
    # resuming a finished run trains nothing more and rewrites the same family
    before = np.load(trained / "family.npz")["level0/Conv_0/kernel"]
    assert main(["train", "--dataset", "procedural", "--steps", "2", "--out", str(trained), "--resume", *TINY]) == 0
    np.testing.assert_array_equal(before, np.load(trained / "family.npz")["level0/Conv_0/kernel"])


@pytest.mark.parametrize("extra", [["--em"], ["--probs", "1", "0.5"], ["--coupling", "nested", "--ode"],
                                   ["--solver", "dpm++2m", "--grid", "logsnr", "--probs", "1", "0.5",
                                    "--control", "cached"],
                                   ["--solver", "edm-heun", "--grid", "karras", "--em"]])
def test_sample_writes_png_and_npz(trained, tmp_path, extra, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", "--family", str(trained / "family"), "--steps", "4", "--batch-size", "4",
                 "--out", str(out), "--no-progress", *extra]) == 0
    from PIL import Image

    assert Image.open(out).size[0] > 0
    d = np.load(tmp_path / "s.npz")
    assert d["images"].shape == (4, 16, 16, 1)
    text = capsys.readouterr().out
    assert "wall time" in text and "evaluations" in text
    if "--solver" in extra and "--em" not in extra:
        assert "multilevel dpm++2m" in text and "control cached" in text


def test_shipped_weights_load_and_sample_in_range(tmp_path):
    fam = load_family(shipped_family_path())
    assert len(fam.models) >= 3
    size = os.path.getsize(shipped_family_path() + ".npz")
    assert size < 6e6
    from mlem_jax.diffusion import uniform_grid
    from mlem_jax.diffusion.data import digits
    from mlem_jax.diffusion.sampling import sample

    res = sample(fam, [len(fam.models) - 1], uniform_grid(50), 0, 16)
    x, data = res.images, digits("test")
    assert x.shape == (16, 16, 16, 1)
    # samples live where the data live: in range (up to the last step's noise), with the
    # pixel mean and spread of held-out digits
    assert np.mean(np.abs(x) <= 1.2) > 0.97
    assert abs(x.mean() - data.mean()) < 0.1 and abs(x.std() - data.std()) < 0.1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "nope", "--data-dir", "/tmp"], "unknown dataset"),
        (["train", "--dataset", "fashion_mnist"], "data_dir"),
        (["sample", "--family", "/nonexistent/family"], "--family"),
        (["sample", "--probs", "1", "0.5"], "--probs: expected"),
        (["sample", "--levels", "9"], "--levels"),
        (["sample", "--em", "--probs", "1", "0.5"], "--probs: --em samples the last of --levels alone"),
        (["sample", "--calibration", "/nonexistent.json"], "--calibration"),
        (["demo", "--batch-size", "6"], "--batch-size: expected a multiple of 4"),
        (["demo", "--steps", "1"], "--steps: expected at least 2"),
    ],
)
def test_error_paths(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_argparse_rejects_non_positive_steps(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--steps", "0"])
    assert e.value.code == 2
    assert "expected a positive number" in capsys.readouterr().err


def test_demo_compares_at_equal_error(trained, tmp_path, capsys):
    """On a tiny family: the best single-network and multilevel samplers run, and the last
    line reports the speedup at a multilevel error within 1.1x of the single network's
    (the firings grow up to m = N, the top network on every step; a miss is said)."""
    import re

    out = tmp_path / "demo.png"
    assert main(["demo", "--family", str(trained / "family"), "--steps", "4", "--batch-size", "8",
                 "--pilot-size", "4", "--out", str(out), "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    m = re.fullmatch(r"equal-error speedup: (\d+\.\d\d)x \(single-network error (\d+\.\d{4}), multilevel error "
                     r"(\d+\.\d{4})\)"
                     r"( slower: the multilevel sampler took longer than the single network at this error)?", lines[-1])
    assert m, lines[-1]
    speedup, a, b = map(float, m.groups()[:3])
    assert speedup > 0
    assert b <= 1.1 * a + 1e-4 or any("misses 1.1x" in line for line in lines)
    assert (m.group(4) is not None) == (speedup < 1)  # below 1x it says so
    d = np.load(tmp_path / "demo.npz")
    assert d["single"].shape == d["multilevel"].shape == (8, 16, 16, 1)
    assert d["multilevel_evaluations"].shape == (2,) and d["multilevel_evaluations"][0] >= 4  # the base every step
    assert any(line.startswith("  single network") for line in lines)
    assert any(line.startswith("  multilevel") and "fired" in line for line in lines)


def test_demo_family_ships_small_and_two_levels():
    from mlem_jax.diffusion.family import demo_family_path

    fam = load_family(demo_family_path())
    assert [m.nf for m in fam.models][-1] == 64 and len(fam.models) == 2
    assert os.path.getsize(demo_family_path() + ".npz") < 9e6  # float16
    weights = np.load(demo_family_path() + ".npz")
    assert all(weights[k].dtype == np.float16 for k in weights.files if k.startswith("level"))


def test_out_is_checked_before_any_compute(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["demo", "--out", str(blocker / "sub" / "demo.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "which is a file, not a folder" in err[0]


def test_train_refuses_silent_restarts_duplicate_levels_and_a_held_lock(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "procedural", "--steps", "1", "--out", str(out), *TINY]
    assert main(argv) == 0
    capsys.readouterr()
    for extra, message in [([], "already holds checkpoints"), (["--resume", "--seed", "3"], "--resume: "),
                           (["--nfs", "4", "4"], "--nfs: every level needs its own width")]:
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    from mlem_jax._filelock import DirectoryLock

    with DirectoryLock(str(out)):  # a live trainer holds the run
        assert main(argv + ["--resume"]) == 2
    assert "another trainer (host" in capsys.readouterr().err
    (out / ".lock").write_text("999999999")  # a file left by a trainer that died: no lock is held
    assert main(argv + ["--overwrite"]) == 0 and not (out / ".lock").exists()
    capsys.readouterr()
    # round 4: a resume with other --nfs, or a family without checkpoints, is not replaced silently
    before = (out / "family.json").read_bytes()
    assert main([*argv, "--resume", "--nfs", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nfs: " in err[0] and "holds a family with nf=[4, 8]" in err[0], err
    import shutil

    shutil.rmtree(out / "checkpoints")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a trained family (nf=[4, 8])" in err[0], err
    assert (out / "family.json").read_bytes() == before


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_argparse_rejects_seeds_out_of_range(seed, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--seed", seed])
    assert e.value.code == 2
    assert "expected a seed in [0, 2**30)" in capsys.readouterr().err


def test_non_finite_samples_are_an_error_not_a_png(tmp_path):
    """A family that produces NaN (here: weights damaged after loading) fails with one
    line and writes nothing."""
    import jax

    from mlem_jax.diffusion.sampling import sample

    fam = load_family(shipped_family_path())
    broken = fam._replace(params=(jax.tree_util.tree_map(lambda v: v * np.nan, fam.params[0]),) + fam.params[1:])
    with pytest.raises(FloatingPointError, match=r"sample: 4 of 4 samples are not finite .* nothing was written"):
        sample(broken, [0, 1], np.linspace(1.0, 1e-3, 5), 0, 4, probs=np.array([1.0, 0.5]))


def test_out_of_memory_is_one_line_with_a_hint(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED becomes one line naming --batch-size (simulated: a real OOM
    cannot be provoked safely in CI)."""
    import mlem_jax.diffusion.sampling as sampling

    def exhausted(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.\nmore")

    monkeypatch.setattr(sampling, "sample", exhausted)
    assert main(["sample", "--steps", "4", "--batch-size", "100000", "--out", "/tmp/oom_probe.png"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of device memory at --batch-size 100000; use a smaller one" in err[0]


@pytest.mark.parametrize("command", [["sample", "--steps", "4"], ["train", "--steps", "1"]])
def test_out_under_a_file_fails_before_any_compute(command, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*command, "--out", str(blocker / "sub" / "out.png")]) == 2
    assert "which is a file, not a folder" in capsys.readouterr().err


def test_out_names_a_stem_or_a_folder_and_never_overwrites_silently(trained, tmp_path, capsys):
    fam = str(trained / "family")
    sample = ["sample", "--family", fam, "--em", "--steps", "2", "--batch-size", "2", "--no-progress"]
    assert main([*sample, "--out", str(tmp_path / "x.npy")]) == 0  # a stem: x.png and x.npz, not x.npy.png
    assert f"wrote {tmp_path / 'x.png'} and {tmp_path / 'x.npz'}" in capsys.readouterr().out
    assert main([*sample, "--out", str(tmp_path / "x")]) == 2  # another run's outputs are kept
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.png already exists" in err[0] and "--overwrite" in err[0]
    assert main([*sample, "--out", str(tmp_path / "x"), "--overwrite"]) == 0
    (tmp_path / "folder").mkdir()
    assert main([*sample, "--out", str(tmp_path / "folder")]) == 0  # a folder receives the default name
    assert (tmp_path / "folder" / "samples.png").exists() and not (tmp_path / "folder.png").exists()
    capsys.readouterr()
    assert main([*sample, "--out", str(tmp_path / ("a" * 300))]) == 2  # refused before sampling
    assert "more than this file system's 255" in capsys.readouterr().err
    assert main(["calibrate", "--family", fam, "--out", str(tmp_path / "folder"), "--steps", "4", "--trajectories",
                 "6", "--coins", "iid", "--bins", "2", "--stride", "1", "--no-progress"]) == 0, capsys.readouterr().err
    assert (tmp_path / "folder" / "calibration.json").exists()
    assert not [p for p in os.listdir(tmp_path / "folder") if p.endswith(".tmp")]


def test_a_failed_write_leaves_nothing_and_an_interrupt_is_one_line(trained, tmp_path, capsys, monkeypatch):
    import errno

    import mlem_jax.cli._common as common

    fam = str(trained / "family")
    sample = ["sample", "--family", fam, "--em", "--steps", "2", "--batch-size", "2", "--no-progress",
              "--out", str(tmp_path / "s")]

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.np, "savez_compressed", full_disk)  # the npz fails after the png was written
    assert main(sample) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if ": warning: " not in line]  # noise
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing was written" in err[0]
    assert os.listdir(tmp_path) == []  # no png, no npz, no temporary file
    monkeypatch.undo()

    import mlem_jax.diffusion.sampling as sampling

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling, "sample", interrupted)
    assert main(sample) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mlem-jax sample: interrupted; nothing was written (outputs appear only when complete)."]


def test_an_interrupted_training_says_what_was_kept(tmp_path, capsys, monkeypatch):
    import mlem_jax.diffusion.train as train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_family", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "procedural", "--steps", "2", "--out", str(out), *TINY]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlem-jax train: interrupted; the checkpoints written so far are kept in {out / 'checkpoints'}; "
                   "continue with the same command and --resume."]


def test_sigterm_during_training_unwinds_like_ctrl_c(tmp_path, capsys, monkeypatch):
    """A real SIGTERM to this process while train runs: one line, status 143, the lock on --out
    released (a second train on the same --out may start), and the handler restored after."""
    import os
    import signal

    import mlem_jax.diffusion.train as train

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train, "train_family", terminated)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "procedural", "--steps", "2", "--out", str(out), *TINY]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mlem-jax train: terminated (SIGTERM); the checkpoints written so far are kept in "
                   f"{out / 'checkpoints'}; continue with the same command and --resume."]
    assert signal.getsignal(signal.SIGTERM) is before
    from mlem_jax._filelock import DirectoryLock

    DirectoryLock(str(out)).acquire().release()  # the lock was released


def test_train_on_a_folder_of_your_own_images(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(20):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
        image.save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.jpg")
    (tmp_path / "none").mkdir()
    assert main(["train", "--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dataset: dataset: the folder" in err[0] and "holds no images" in err[0]
    assert main(["train", "--dataset", str(tmp_path / "imgs"), "--image-size", "8", "--nfs", "4", "--ch-mult", "1",
                 "2", "--steps", "1", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "(18 train / 2 held-out images)" in capsys.readouterr().out
    assert load_family(str(tmp_path / "run" / "family")).image_shape == (8, 8, 3)


def test_a_full_disk_is_refused_before_training_and_one_line_during_it(tmp_path, capsys, monkeypatch):
    import shutil

    import mlem_jax.diffusion.train as train

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "run"
    assert main(["train", "--dataset", "procedural", "--steps", "2", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MB free, but the checkpoints of these levels need" in err[0]
    monkeypatch.setattr(shutil, "disk_usage", real)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "train_family", full)
    assert main(["train", "--dataset", "procedural", "--steps", "2", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(No space left on device)" in err[0] and "--resume" in err[0]


@pytest.mark.parametrize("solver, grid", [("em", "uniform"), ("heun", "uniform"), ("ddim", "logsnr"),
                                          ("dpm++3m", "logsnr"), ("sde-dpm++2m", "logsnr"), ("edm-heun", "karras")])
def test_sample_default_grid_follows_the_solver(solver, grid):
    import argparse

    from mlem_jax.cli._sample import ADOPTED, adopt_calibration

    args = argparse.Namespace(calibration=None, **{k: None for k in ADOPTED})
    args.solver = solver
    adopt_calibration(args, None)
    assert args.grid == grid and args.steps == 100
    args = argparse.Namespace(calibration=None, **{k: None for k in ADOPTED})
    args.solver, args.grid = solver, "quadratic"  # a grid given on the command line is kept
    adopt_calibration(args, None)
    assert args.grid == "quadratic"


def test_sample_refuses_levels_out_of_order():
    from mlem_jax.diffusion import uniform_grid
    from mlem_jax.diffusion.sampling import sample

    fam = load_family(shipped_family_path())
    with pytest.raises(ValueError, match=r"levels: expected distinct indices from cheapest to dearest.*\[0, 1\]"):
        sample(fam, [1, 0], uniform_grid(4), 0, 2, probs=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"levels: expected indices in 0\.\.3"):
        sample(fam, [5], uniform_grid(4), 0, 2)


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(trained, capsys):
    family = str(trained / "family")
    argv = ["sample", "--family", family, "--steps", "2", "--batch-size", "2", "--no-progress", "--overwrite"]
    assert main([*argv, "--out", family]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an input of this run (--family" in err[0] and "--overwrite or not" in err[0]
    assert os.path.exists(family + ".npz") and load_family(family).models


def test_a_sample_output_written_meanwhile_by_another_run_is_kept(trained, tmp_path, capsys, monkeypatch):
    """The existing-output check runs again at write time: a file that appeared during the
    compute is not replaced, and neither of this run's two outputs is left behind."""
    import mlem_jax.diffusion.sampling as sampling

    real = sampling.sample
    out = tmp_path / "s"

    def another_run_finishes_first(*args, **kwargs):
        result = real(*args, **kwargs)
        (tmp_path / "s.npz").write_bytes(b"the other run's samples")
        return result

    monkeypatch.setattr(sampling, "sample", another_run_finishes_first)
    assert main(["sample", "--family", str(trained / "family"), "--steps", "2", "--batch-size", "2",
                 "--no-progress", "--out", str(out)]) == 2
    err = [e for e in capsys.readouterr().err.strip().splitlines() if "warning" not in e]  # the tiny family's range
    assert len(err) == 1 and "s.npz appeared while this run computed" in err[0]
    assert (tmp_path / "s.npz").read_bytes() == b"the other run's samples"
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


def test_a_backend_that_cannot_start_is_one_line(capsys, monkeypatch):
    """What JAX raises for JAX_PLATFORMS=gpu on a machine without one (measured: "Unable to
    initialize backend 'rocm': ..."), as one line naming the variable, status 2."""
    import mlem_jax.cli._sample as sample_cli

    def no_backend(args):
        raise RuntimeError("Unable to initialize backend 'cuda': no CUDA devices found (set JAX_PLATFORMS='' ...)")

    monkeypatch.setattr(sample_cli, "run", no_backend)
    monkeypatch.setenv("JAX_PLATFORMS", "gpu")
    assert main(["sample"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "JAX_PLATFORMS='gpu' asks for a backend" in err[0] and "unset JAX_PLATFORMS" in err[0]


def test_advise_on_the_shipped_family(tmp_path, capsys):
    """`mlem-jax advise` on the shipped digits family: each level's held-out loss, every adjacent
    pair's ratio, gamma and a verdict, written to advise.txt with a plot."""
    out = tmp_path / "adv"
    assert main(["advise", "--draws", "256", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "held-out loss per level" in text and "ratio" in text and text.count("verdict:") == 1
    assert (out / "advise.txt").read_text().startswith("256 held-out draws")
    assert (out / "advise.png").exists()
    assert main(["advise", "--data", str(tmp_path / "missing.npy"), "--out", str(out), "--no-progress"]) == 2


def test_advise_predicts_the_gain_from_pilots(trained, tmp_path, capsys):
    """`advise --predict`: the law from pilot runs (floors, exponents) and, at the target, both sides
    and the gain with its interval or the verdict that multilevel does not pay, in advise.txt."""
    out = tmp_path / "adv"
    assert main(["advise", "--family", str(trained / "family"), "--data", "procedural", "--draws", "64",
                 "--predict", "6", "--target", "0.05", "--pilot-size", "4", "--max-pilot-size", "8",
                 "--pilot-steps", "5", "8",
                 "--out", str(out),
                 "--no-progress"]) == 0
    text = (out / "advise.txt").read_text()
    assert "the law from" in text and "pilot runs on" in text and "batch(es) of 4;" in text
    assert "target: nf=8 with DPM-Solver++(2M) at 6 steps (predicted on " in text
    # every constant with its bootstrap standard error, the coin constants for both schemes
    for line in ("  floors F_k: nf=", "  orders p: dpm++2m ", "  coins, stratified ", "  coins, iid "):
        row = next(r for r in text.splitlines() if r.startswith(line))
        assert " +- " in row, row
    assert "target: pathwise RMS error 0.05 (predicted on " in text and text.count("single network:") == 2
    draws = int(text.split("pilot runs on ")[1].split()[0])
    settled = "verdict: unsettled" not in text
    # a second batch only where the first left a verdict unsettled; unsettled only with both
    assert draws in (4, 8) and (settled or draws == 8)
    assert main(["advise", "--family", str(trained / "family"), "--target", "0", "--out", str(out),
                 "--no-progress"]) == 2
    assert "--target: expected positive RMS errors" in capsys.readouterr().err
    assert ("predicted gain" in text and "interval: refits on resampled pilots" in text) \
        or "no run is cheaper than the single network" in text
    assert any(v in text for v in ("verdict: multilevel pays here", "verdict: multilevel does not pay here",
                                   "verdict: unsettled"))


def test_the_package_ships_about_ten_megabytes_of_weights():
    """What ships inside the package: the digits family, the testbed's mixture and ladder (float16)."""
    import glob

    assets = os.path.join(os.path.dirname(shipped_family_path()))
    total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(assets, "**", "*"), recursive=True)
                if os.path.isfile(f))
    assert total < 12e6, total


def test_a_bug_is_not_reported_as_bad_input(monkeypatch, capsys):
    """Only the library's own input errors (`InputError`, a ValueError) become the one-line exit 2;
    a ValueError from anywhere else is a bug and keeps its traceback."""
    from mlem_jax import InputError
    from mlem_jax.cli import _sample

    def bug(args):
        np.ones(3) + np.ones(4)  # numpy's ValueError: operands could not be broadcast

    monkeypatch.setattr(_sample, "run", bug)
    with pytest.raises(ValueError, match="could not be broadcast"):
        main(["sample", "--family", "x", "--no-progress"])

    def bad_input(args):
        raise InputError("steps: expected a positive number of steps, got 0.")

    monkeypatch.setattr(_sample, "run", bad_input)
    assert main(["sample", "--family", "x", "--no-progress"]) == 2
    assert capsys.readouterr().err == "mlem-jax sample: error: steps: expected a positive number of steps, got 0.\n"


def test_a_damaged_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    """Array data of the only checkpoint overwritten: resuming ends in one line of at most a few hundred
    characters naming the step and folder (tensorstore's error carries a 60-line spec), and orbax's
    "Event loop is closed" callbacks (one per array) never reach the unraisable-exception hook."""
    import gc
    import sys
    import time

    out = tmp_path / "r"
    argv = ["train", "--dataset", "procedural", "--steps", "1", "--out", str(out), "--nfs", "4", "--ch-mult", "2",
            "--batch-size", "8", "--no-progress"]
    assert main(argv) == 0
    for f in (out / "checkpoints" / "nf4" / "1" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"damaged" * 10)
    capsys.readouterr()
    time.sleep(0.5)  # reads left pending by earlier tests' restores end on the hook they installed
    gc.collect()
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(repr(u.exc_value)))
    assert main([*argv[:4], "2", *argv[5:], "--resume"]) == 2
    time.sleep(0.5)  # the pending reads complete on tensorstore's threads
    gc.collect()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 700, err
    assert "step 1" in err[0] and "is corrupt or incomplete" in err[0] and "nf4" in err[0]
    assert not [s for s in seen if "Event loop is closed" in s], seen
