"""compare_best_samplers on the tiny trained family: the multilevel runs are what they say
(exact firing counts, m = N is the top network), and the comparison's sides obey its rules."""

import numpy as np
import pytest

from mlem_jax.compare._best_samplers import _Batch, compare_best_samplers, planned_runs
from mlem_jax.diffusion.family import load_family


@pytest.fixture(scope="module")
def family(trained):
    return load_family(str(trained / "family"))


def test_firings_are_exact_and_firing_every_step_is_the_top_network(family):
    b = _Batch(family, 4, 0, 8, coin_plans=2)
    for m in (1, 2, 3):
        _, ev = b.images((0, 1), "dpm++2m", 6, m)
        np.testing.assert_array_equal(ev, [6, m])  # base every step, the top exactly m times
    y_ml, _ = b.images((0, 1), "dpm++2m", 6, 6)
    y_top, ev = b.images((1,), "dpm++2m", 6, 0)
    np.testing.assert_array_equal(ev, [6])
    # D^1 + (D^2 - D^1) / 1 on every step: the top network's sampler, up to rounding
    np.testing.assert_allclose(np.asarray(y_ml), np.asarray(y_top), atol=1e-4)


def test_the_comparison_keeps_its_rules(family):
    kw = dict(steps=4, batch_size=8, pilot_size=4, reference_steps=8, step_ladder=(2, 3, 4, 6),
              ml_step_ladder=(4, 6), samplers=("dpm++2m", "ddim"), coin_plans=2, repeats=1)
    ticks = []
    c = compare_best_samplers(family, tick=lambda: ticks.append(1), **kw)
    # every sampler run ticks once
    assert len(ticks) == len(c.singles) + 1 + len(c.pilot) + len(c.main_candidates) + c.stepped_up
    assert len(c.singles) + 1 + len(c.pilot) + 1 <= planned_runs(family, **kw)
    # skipping the runs that cannot win changes neither side, only the tables
    lean = compare_best_samplers(family, exhaustive=False, **kw)
    assert len(lean.singles) + len(lean.pilot) < len(c.singles) + len(c.pilot)
    for a, b in ((c.single, lean.single), (c.multilevel, lean.multilevel)):
        assert (a.levels, a.sampler, a.steps, a.firings) == (b.levels, b.sampler, b.steps, b.firings)
        assert a.error.value == pytest.approx(b.error.value, rel=1e-6)
    assert c.single.error.value <= c.target.error.value  # the single side reaches the target
    # the cheapest single run that reaches it
    assert c.single.modelled_seconds == min(r.modelled_seconds for r in c.singles
                                            if r.error.value <= c.target.error.value)
    ml = c.multilevel
    assert len(ml.levels) == 2 and 1 <= ml.firings <= ml.steps
    assert ml.error.value <= 1.1 * c.single.error.value or ml.firings == ml.steps or c.stepped_up == 4
    assert c.speedup == pytest.approx(c.single.seconds / ml.seconds) and np.isfinite(c.speedup)
    assert c.flop_ratio == pytest.approx(c.single.gflop / ml.gflop)
    assert ml.gflop == pytest.approx(float(ml.evaluations @ c.level_gflop[list(ml.levels)]))


@pytest.mark.parametrize("kw, match", [(dict(steps=1), "steps"), (dict(sampler="em"), "sampler"),
                                       (dict(batch_size=9, coin_plans=2), "coin_plans")])
def test_bad_arguments_name_themselves(family, kw, match):
    with pytest.raises(ValueError, match=match):
        compare_best_samplers(family, **kw)


def test_the_multilevel_side_is_the_cheapest_candidate_that_reaches_the_limit_on_the_main_batch():
    """The pilot's candidates run on the main batch cheapest first; the first within the limit wins, and the
    ones after it are not run (measured on the five-level family at 12 steps: the cheapest candidate missed
    on the main batch and growing its firings gave 0.65x, where the next candidate reached the limit)."""
    from types import SimpleNamespace

    from mlem_jax.compare._best_samplers import _candidates_on_main

    errors = {"a": 0.5, "b": 0.2, "c": 0.1}
    cands = [SimpleNamespace(levels=name, sampler="s", steps=8, firings=2) for name in "abc"]
    ran = []

    def run(batch, levels, sampler, steps, firings):
        ran.append(levels)
        return SimpleNamespace(levels=levels, error=SimpleNamespace(value=errors[levels]))

    lines = []
    out = _candidates_on_main(run, None, cands, 0.25, lambda c: c.levels, lines.append)
    assert ran == ["a", "b"] and out[-1].levels == "b" and len(lines) == 1 and "a errs 0.5000" in lines[0]
    ran.clear()
    out = _candidates_on_main(run, None, cands, 0.05, lambda c: c.levels, lines.append)
    assert ran == ["a", "b", "c"] and all(r.error.value > 0.05 for r in out)  # none: the caller grows the first
