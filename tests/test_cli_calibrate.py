"""mlem-jax calibrate end to end on tiny configurations, the files it writes, their use by sample, and
the README's command lines."""

import json
import os

import numpy as np
import pytest
from conftest import CHECK_RANGE

from mlem_jax.cli import _calibrate, main
from mlem_jax.diffusion.family import load_family


def test_calibrate_then_sample(trained, tmp_path, capsys):
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--family", str(trained / "family"), "--steps", "6", "--trajectories", "6",
                 "--bins", "2", "--stride", "1", "--coins", "iid", "--out", str(cal), "--no-progress"]) == 0
    assert "calibration report" in capsys.readouterr().out
    c = json.loads(cal.read_text())
    assert c["levels"] == [4, 8] and np.asarray(c["values"]).shape == (2, 2)
    assert main(["sample", "--family", str(trained / "family"), "--calibration", str(cal), "--steps", "6",
                 "--batch-size", "2", "--out", str(tmp_path / "c.png"), "--no-progress"]) == 0


def test_calibrate_for_another_solver_and_the_cache(trained, tmp_path, capsys):
    """calibrate --solver --control: statistics at that sampler's calls, a file bound to both."""
    fam, cal = str(trained / "family"), tmp_path / "dpm.json"
    grid = ["--steps", "6", "--grid", "logsnr"]
    assert main(["calibrate", "--family", fam, *grid, "--trajectories", "6", "--bins", "2", "--solver", "dpm++2m",
                 "--control", "cached", "--speedup", "1.5", "--out", str(cal), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "multilevel dpm++2m calibration report (control='cached')" in text and "6 model calls" in text
    c = json.loads(cal.read_text())
    assert c["solver"] == "dpm++2m" and c["control"] == "cached" and c["coins"] == "iid"
    sample = ["sample", "--family", fam, "--calibration", str(cal), *grid, "--batch-size", "2",
              "--out", str(tmp_path / "d.png"), "--no-progress"]
    assert main([*sample, "--solver", "dpm++2m", "--control", "cached"]) == 0
    capsys.readouterr()
    # the file's settings are adopted: solver, control, grid, steps, coins, coupling and levels need no retyping
    assert main(["sample", "--family", fam, "--calibration", str(cal), "--batch-size", "2",
                 "--out", str(tmp_path / "e.png"), "--no-progress"]) == 0
    assert "multilevel dpm++2m (independent, iid coins, control cached): 2 samples, 6 steps" in capsys.readouterr().out
    for flag, message in [(["--control", "none"], "--control: none contradicts --calibration"),
                          (["--steps", "7"], "--steps: 7 contradicts --calibration"),
                          (["--solver", "ddim"], "made for solver dpm++2m; drop --solver")]:
        assert main([*sample, *flag]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    for extra, message in [(["--coins", "stratified"], "--control cached: unbiased with iid coins only"),
                           (["--stride", "2"], "--stride: --control cached"),
                           (["--match-em", "--solver", "ddim"], "--match-em: searches or learns")]:
        assert main(["calibrate", "--family", fam, *grid, "--control", "cached", "--out", str(tmp_path / "x.json"),
                     *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_calibrate_default_matches_em_with_stratified_coins(trained, tmp_path, capsys):
    """No target given: the file is the cheapest stratified configuration with EM's coupled
    error (the recipe of the shipped calibration), not iid coins at a fixed speedup."""
    cal = tmp_path / "default.json"
    fam = str(trained / "family")
    assert main(["calibrate", "--family", fam, "--steps", "6", "--trajectories", "6", "--out", str(cal),
                 "--no-progress"]) == 0
    c = json.loads(cal.read_text())
    assert c["coins"] == "stratified" and c["steps"] == 6 and "search_configuration" in c["made_by"]
    capsys.readouterr()
    assert main(["calibrate", "--family", fam, "--steps", "6", "--match-em", "--coins", "stratified", "--speedup", "2",
                 "--out", str(tmp_path / "x.json")]) == 2
    assert "--match-em: the target is EM's own" in capsys.readouterr().err


def test_calibrate_stratified_writes_a_file_bound_to_its_grid(trained, tmp_path, capsys):
    cal = tmp_path / "strat.json"
    assert main(["calibrate", "--family", str(trained / "family"), "--steps", "6", "--trajectories", "16",
                 "--bins", "2", "--stride", "1", "--coins", "stratified", "--speedup", "1.5",
                 "--out", str(cal), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "coins: stratified" in text and "pilot runs" in text
    c = json.loads(cal.read_text())
    assert c["coins"] == "stratified" and c["steps"] == 6 and "pilot" in c["made_by"]
    fam = str(trained / "family")
    # used as made: fine; with other coins or another grid: one line, exit 2
    assert main(["sample", "--family", fam, "--calibration", str(cal), "--steps", "6", "--coins", "stratified",
                 "--batch-size", "2", "--out", str(tmp_path / "s.png"), "--no-progress"]) == 0
    capsys.readouterr()
    # a flag that contradicts the file: one line naming both values, exit 2
    for extra, message in [(["--steps", "20"], "--steps: 20 contradicts --calibration"),
                           (["--coins", "iid"], "--coins: iid contradicts"),
                           (["--solver", "ddim"], "made for solver em"),
                           (["--control", "cached"], "--control: cached contradicts"),
                           (["--levels", "2"], "levels [4, 8] (sampling [8])"),
                           (["--probs", "1", "0.5"], "give one of them")]:
        assert main(["sample", "--family", fam, "--calibration", str(cal), "--batch-size", "2",
                     "--out", str(tmp_path / "x.png"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_calibrate_learn_writes_a_file_that_says_how_it_was_made(trained, tmp_path, capsys):
    cal = tmp_path / "learned.json"
    fam = str(trained / "family")
    assert main(["calibrate", "--family", fam, "--learn", "--learn-steps", "3", "--steps", "6", "--trajectories", "4",
                 "--bins", "2", "--speedup", "1.5", "--out", str(cal), "--no-progress"]) == 0
    assert "learned p_k(t)" in capsys.readouterr().out
    c = json.loads(cal.read_text())
    assert c["coins"] == "iid" and c["steps"] == 6 and "learn_probabilities" in c["made_by"]
    assert len(c["learning"]["coupled_mse"]) == 3 and os.path.exists(tmp_path / "learned.png")
    assert main(["sample", "--family", fam, "--calibration", str(cal), "--steps", "6", "--batch-size", "2",
                 "--out", str(tmp_path / "l.png"), "--no-progress"]) == 0
    capsys.readouterr()
    for extra, message in [(["--coins", "stratified"], "--learn: learning needs the law"),
                           (["--target-variance", "0.1"], "--learn: holds a compute budget")]:
        assert main(["calibrate", "--family", fam, "--learn", "--steps", "6", "--out", str(tmp_path / "y.json"),
                     *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_calibrate_refuses_probabilities_that_predict_noise(tmp_path, capsys):
    """iid coins on the shipped family at 8x: the predicted coupled RMS (about 4 per pixel)
    is far beyond the data's range; one line, exit 2, no file."""
    out = tmp_path / "noise.json"
    assert main(["calibrate", "--steps", "20", "--trajectories", "8", "--bins", "2", "--speedup", "8",
                 "--cost-batch", "8", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "beyond half the data's range" in err[0] and not out.exists()


def test_the_readme_command_lines_run_as_written(tmp_path, capsys, monkeypatch):
    """The README's `mlem-jax` lines in order, at tiny sizes (only sizes change: fewer training steps, two small
    levels, a short grid and few trajectories): the calibration's settings are adopted by `sample`."""
    import re
    import shlex

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = re.search(r"## The command line\n\n```bash\n(.*?)```", text, re.S).group(1)
    lines = [re.sub(r"\s+#.*", "", line).strip() for line in block.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line.startswith("mlem-jax ") and line != "mlem-jax demo"]
    assert [line.split()[1] for line in lines] == ["train", "calibrate", "sample", "sample", "calibrate", "sample"]
    tiny = {"train": ["--nfs", "4", "8", "--ch-mult", "2", "--batch-size", "16", "--no-progress"],
            "calibrate": ["--trajectories", "6", "--bins", "2", "--no-progress"],
            "sample": ["--batch-size", "2", "--no-progress"]}
    monkeypatch.chdir(tmp_path)
    for line in lines:
        argv = shlex.split(line.replace("--steps 2000", "--steps 2").replace("--nfs 4 8 16 32 ", "")
                           .replace("--steps 20 ", "--steps 6 "))[1:]
        argv += tiny[argv[0]] + (["--steps", "6"] if argv[0] == "calibrate" and "--steps" not in argv else [])
        argv += ["--steps", "6"] if "--em" in argv else []
        assert main(argv) == 0, (line, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "multilevel dpm++2m" in out and "levels nf=[4, 8]" in out


def test_an_undertrained_family_is_refused_and_warned(trained, tmp_path, capsys, monkeypatch):
    """2 training steps: the samples are noise (|x| in the hundreds). calibrate refuses before any statistics,
    sample warns in one line, the library's sample warns and reports the share; absurd magnitudes are an
    error."""
    import mlem_jax.diffusion.sampling as sampling

    monkeypatch.setattr(_calibrate, "_check_range", CHECK_RANGE)
    fam = str(trained / "family")
    cal = ["calibrate", "--family", fam, "--steps", "4", "--trajectories", "6", "--coins", "iid", "--bins", "2",
           "--stride", "1", "--no-progress", "--out", str(tmp_path / "c")]
    assert main(cal) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--family: nf=8 alone, 8 samples:" in err[0] and "looks undertrained" in err[0]
    assert not os.path.exists(tmp_path / "c.json")
    assert main([*cal, "--skip-range-check"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(_calibrate, "_check_range", lambda args, family, levels: None)  # the search's own check
    monkeypatch.setattr(_calibrate, "MAX_PILOT_ERROR", 1.0)
    assert main(["calibrate", "--family", fam, "--steps", "4", "--trajectories", "6", "--no-progress",
                 "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--family: EM's own coupled error on the pilot is" in err[0], err
    assert main(["sample", "--family", fam, "--em", "--steps", "4", "--batch-size", "2", "--no-progress",
                 "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlem-jax sample: warning: ") and "fall outside" in err[0]
    family = load_family(fam)
    with pytest.warns(sampling.SampleRangeWarning, match="looks undertrained"):
        res = sampling.sample(family, [1], sampling_grid(4), 0, 2)
    assert res.outside_range == sampling.outside_range(res.images) > 0.5
    monkeypatch.setattr(sampling, "BROKEN", 10.0)
    with pytest.raises(FloatingPointError, match="far beyond the data's range"):
        sampling.sample(family, [1], sampling_grid(4), 0, 2)


def sampling_grid(steps):
    from mlem_jax.diffusion import uniform_grid

    return uniform_grid(steps)
