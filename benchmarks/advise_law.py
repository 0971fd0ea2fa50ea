"""Does the law fitted on short pilots predict the measured equal-error gain? (issue 42, item 5)

On the exact testbed (the Gaussian mixture with its exact denoiser, the shipped MLP ladder):

1. Pilots on their own batch of prior draws (`--pilot-size`, seed 1): every level's floor and two
   short runs per level and sampler, and two firing counts per base with the top
   (`mlem_jax.compare.run_pilots`, `fit_law`).
2. Prediction at each target (a multiple of the pilot batch's top floor): the law's cheapest
   single-network run and cheapest multilevel run, the gain in FLOPs and its bootstrap interval
   (80%) over the pilot samples (`predict`).
3. Measurement on the main batch (`--batch-size`, seed 0), at the same multiple of its own top
   floor: the cheapest single run and the cheapest multilevel run found on real runs (the searches
   of `mlem-jax demo`).

Prints each target's predicted and measured gain, their ratio and whether the measured gain lies in
the interval; the goal (issue 42) is within 1.3x at every target, inside the interval. Writes
law.json with every figure.

    python benchmarks/advise_law.py --out docs/figures/advise_law
    python benchmarks/advise_law.py --quick --out benchmarks/out/advise_law_quick
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

import jax
import numpy as np

from mlem_jax.compare import fit_law, law_error, predict, predict_settled, run_pilots
from mlem_jax.diffusion.samplers import CALLS_PER_STEP
from mlem_jax.diffusion.testbed import Run, Testbed, best_multilevel, best_single

SAMPLERS = ("dpm++2m", "unipc")
IID_FIRINGS = (2, 4, 8)  # the iid-coin pilots (the law reports their constants; the measurement runs stratified coins)
SINGLE_STEPS = (3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
ML_STEPS = (6, 8, 12, 16, 24)


def testbed_outputs(tb: Testbed):
    """outputs(levels, sampler, steps, firings) -> the run's samples from the testbed's prior draws."""
    def outputs(levels, sampler, steps, firings, coins="stratified"):
        return tb.outputs(Run(tuple(levels), sampler, steps, firings, 0.0, 0.0, 0.0, 0.0, ()), coins=coins)[0]

    return outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out/advise_law")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--pilot-size", type=int, default=128)
    ap.add_argument("--targets", type=float, nargs="+", default=[1.1, 1.25, 1.5])
    ap.add_argument("--quick", action="store_true", help="32 + 16 samples, one target: the CI smoke run")
    ap.add_argument("--family", default=None,
                    help="instead of the testbed, a UNet family: the law at the error of its top network with "
                         "DPM-Solver++(2M) at --steps, against compare_best_samplers (what demo --family runs)")
    ap.add_argument("--steps", type=int, nargs="+", default=[8])
    ap.add_argument("--name", default="law_family", help="with --family: the stem of the files written to --out")
    ap.add_argument("--refit", action="store_true",
                    help="with --family: no new runs; refit the law on the pilots and re-predict against the "
                         "measurements recorded by an earlier run of the same --name (after a change to the law)")
    ap.add_argument("--max-pilot-size", type=int, default=None,
                    help="where a verdict is unsettled, pilots on more batches of --pilot-size draws, up to this many "
                         "(default 4x --pilot-size on the testbed, 2x on a family; --quick: no more)")
    args = ap.parse_args(argv)
    single_steps, ml_steps = SINGLE_STEPS, ML_STEPS
    if args.quick:
        args.batch_size, args.pilot_size, args.targets, args.max_pilot_size = 32, 16, [1.25], 16
        single_steps, ml_steps = (4, 5, 6, 8, 10), (8, 12)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    log_lines = []

    def log(s=""):
        print(s, flush=True)
        log_lines.append(s)

    log(f"advise_law: {' '.join(sys.argv[1:]) or '(defaults)'}; {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")
    if args.family is not None:
        return (_refit if args.refit else _family)(args, log, log_lines, t0)
    pilot_tb = Testbed(batch_size=args.pilot_size, seed=1, truth_steps=100)
    K = len(pilot_tb.levels)
    costs = pilot_tb.level_flops
    t_p = time.perf_counter()
    # --quick: a smoke run (CI), with the fewest pilots the law accepts
    small = dict(pilot_steps=(5, 8), ml_steps=(12,), ml_firings=(2, 4)) if args.quick else {}
    iid_firings = (2, 4) if args.quick else IID_FIRINGS
    pilots = run_pilots(testbed_outputs(pilot_tb), pilot_tb.truth, K, SAMPLERS, iid_firings=iid_firings, **small)
    batches = [pilots]

    def more(i):  # the same pilots on the i-th further batch of draws (seed 1 + i; the measurement's is 0)
        extra = Testbed(batch_size=args.pilot_size, seed=1 + i, truth_steps=100)
        log(f"  pilots on a further batch of {args.pilot_size} draws (seed {1 + i})")
        return run_pilots(testbed_outputs(extra), extra.truth, K, SAMPLERS, iid_firings=iid_firings, **small)
    law = fit_law(pilots)
    log(f"pilots: {len(pilots.floors) + len(pilots.discretisation) + len(pilots.coins)} runs on {args.pilot_size} "
        f"samples in {time.perf_counter() - t_p:.0f} s")
    log("law: floors " + ", ".join(f"{f:.4f}" for f in law.floors)
        + "; " + "; ".join(f"{s}: p {law.p[s]:.2f}, C " + ", ".join(f"{c:.3f}" for c in law.C[s]) for s in law.p)
        + "; " + _coins_text(law))

    tb = Testbed(batch_size=args.batch_size, seed=0, truth_steps=100)
    top_floor = tb.single(K - 1, "dpm++2m", 50).error
    rows = []
    for tau in args.targets:
        # the law searches the step counts the measurement searches: an equal question on both sides
        pred = predict(pilots, tau * law.floors[-1], costs, CALLS_PER_STEP, steps=single_steps, ml_steps=ml_steps,
                       measured_size=args.batch_size, coins=("stratified",))
        goal = tau * top_floor
        eligible = [k for k in range(K) if tb.single(k, "dpm++2m", 50).error < goal]
        single = best_single(tb, goal, "error", eligible, SAMPLERS, single_steps)
        ml = None
        if single is not None:
            ml = best_multilevel(tb, goal, "error", [(b, K - 1) for b in range(K - 1)], "dpm++2m", ml_steps,
                                 single.flops)
        measured = None if (single is None or ml is None) else single.flops / ml.flops
        # the prediction following its own advice: pilots on more draws while its verdict is unsettled
        settled, on = predict_settled(batches, more, lambda p: tau * fit_law(p).floors[-1], costs, CALLS_PER_STEP,
                                      max_draws=args.max_pilot_size or 4 * args.pilot_size, steps=single_steps,
                                      ml_steps=ml_steps, measured_size=args.batch_size, coins=("stratified",))
        row = dict(target=tau, predicted=pred.gain, low=pred.low, high=pred.high, pays=pred.pays, verdict=pred.verdict,
                   measured=measured, settled=_settled_row(settled, on, measured),
                   predicted_single=None if pred.single is None else [list(pred.single.levels), pred.single.sampler,
                                                                      pred.single.steps, pred.single.cost],
                   predicted_multilevel=None if pred.multilevel is None else [
                       list(pred.multilevel.levels), pred.multilevel.sampler, pred.multilevel.steps,
                       pred.multilevel.firings, pred.multilevel.cost],
                   measured_single=None if single is None else [list(single.levels), single.sampler, single.steps,
                                                                single.flops, single.error],
                   measured_multilevel=None if ml is None else [list(ml.levels), ml.sampler, ml.steps, ml.firings,
                                                                ml.flops, ml.error])
        rows.append(row)
        fmt = lambda g: "none (a single network is cheapest)" if g is None else f"{g:.2f}x"
        interval = ("" if pred.low is None else f" [{pred.low:.2f}, {pred.high:.2f}]") + \
            f" (pays in {100 * pred.pays:.0f}% of the replicas; verdict: {pred.verdict})"
        verdict = ""
        if pred.gain is not None and measured is not None:
            ratio = max(pred.gain / measured, measured / pred.gain)
            inside = pred.low is not None and pred.low <= measured <= pred.high
            verdict = f"; ratio {ratio:.2f} ({'within' if ratio <= 1.3 else 'NOT within'} 1.3x), " \
                      f"measured {'inside' if inside else 'OUTSIDE'} the interval"
            row.update(ratio=ratio, inside=inside)
        elif (pred.gain is None) == (measured is None):
            verdict = "; both say no multilevel run is cheaper"
        elif pred.verdict == "unsettled":
            verdict = "; they differ, where the prediction's verdict is unsettled (it does not say either way)"
        else:
            verdict = "; they DISAGREE on whether multilevel pays"
        log(f"target {tau} x the top's floor (both sides at most this pathwise error): predicted "
            f"{fmt(pred.gain)}{interval} in FLOPs, measured "
            f"{fmt(measured)}{verdict}")
        log("  " + _settled_line(row["settled"]))
        for what, c in (("single", pred.single), ("multilevel", pred.multilevel)):
            if c is not None:
                run = tb.single(c.levels[0], c.sampler, c.steps) if len(c.levels) == 1 else \
                    tb.multilevel(c.levels, c.sampler, c.steps, c.firings)
                row[f"law_{what}_measured_error"] = run.error
                log(f"  the law's {what} choice measured on the main batch: error {run.error:.4f} against the "
                    f"target {goal:.4f}: {'reaches it' if run.error <= goal else 'misses it'}")
        if pred.single is not None:
            log(f"  law's single: level {pred.single.levels[0]}, {pred.single.sampler} {pred.single.steps} steps "
                f"(predicted error {pred.single.error:.4f}); measured single: "
                + ("none" if single is None else f"level {single.levels[0]}, {single.sampler} {single.steps} steps "
                   f"(error {single.error:.4f}, "
                   f"law {law_error(law, single.levels, single.sampler, single.steps):.4f})"))
        if pred.multilevel is not None or ml is not None:
            p_ml = pred.multilevel
            log("  law's multilevel: " + ("none" if p_ml is None else
                                          f"base {p_ml.levels[0]}, {p_ml.steps} steps, m {p_ml.firings} "
                                          f"(predicted error {p_ml.error:.4f})")
                + "; measured multilevel: " + ("none" if ml is None else
                                               f"base {ml.levels[0]}, {ml.steps} steps, m {ml.firings} "
                                               f"(error {ml.error:.4f}, law "
                                               f"{law_error(law, ml.levels, ml.sampler, ml.steps, ml.firings):.4f})"))
        if ml is not None:  # the iid-coin term, checked at the same run with iid coins (m expected firings)
            iid = tb.multilevel(ml.levels, ml.sampler, ml.steps, ml.firings, coins="iid")
            row["iid_at_measured_multilevel"] = dict(
                measured=iid.error, law=law_error(law, ml.levels, ml.sampler, ml.steps, ml.firings, "iid"))
            log(f"  the same run with iid coins: error {iid.error:.4f}, the law's "
                f"{row['iid_at_measured_multilevel']['law']:.4f}")
    # the same law fitted on the main batch's own draws: what is left of the gap is the law's form, not
    # the pilots' noise (the pilots then share the measurement's prior draws and truth)
    own = None if args.quick else run_pilots(testbed_outputs(tb), tb.truth, K, SAMPLERS)  # stratified only, as measured
    own_floor = None if own is None else fit_law(own).floors[-1]
    for row in rows if own is not None else ():
        p = predict(own, row["target"] * own_floor, costs, CALLS_PER_STEP, steps=SINGLE_STEPS, ml_steps=ML_STEPS)
        row["own_draws"] = dict(predicted=p.gain, low=p.low, high=p.high, pays=p.pays)
        gain = "none (a single network is cheapest)" if p.gain is None else \
            f"{p.gain:.2f}x [{p.low:.2f}, {p.high:.2f}]"
        log(f"the law on the main batch's own draws, target {row['target']}: predicted {gain} (pays in "
            f"{100 * p.pays:.0f}% of the replicas), measured "
            + ("none" if row["measured"] is None else f"{row['measured']:.2f}x"))
    log(f"total {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(args.out, "law.json"), "w") as f:
        json.dump(dict(command="python benchmarks/advise_law.py " + " ".join(sys.argv[1:]),
                       law=dict(floors=law.floors.tolist(), p=law.p, C={s: c.tolist() for s, c in law.C.items()},
                                coin=law.coin.tolist(), r=law.r.tolist(), u=law.u.tolist(),
                                iid_coin=law.iid_coin.tolist(), iid_r=law.iid_r.tolist()),
                       rows=rows), f, indent=1)
    with open(os.path.join(args.out, "law.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    return 0


def _coins_text(law) -> str:
    """Each base's coin constants: stratified c_b, r_b, u_b; iid c_b, r_b."""
    return "coins per base (c, r, u; iid c, r): " + "; ".join(
        f"{law.coin[b]:.3f}, {law.r[b]:.2f}, {law.u[b]:.2f}"
        + (f"; iid {law.iid_coin[b]:.3f}, {law.iid_r[b]:.2f}" if len(law.iid_coin) else "")
        for b in range(len(law.coin)))


def _settled_row(pred, pilots, measured) -> dict:
    """The settled prediction's figures, and how it compares with the measured gain."""
    row = dict(draws=len(next(iter(pilots.floors.values()))), predicted=pred.gain, low=pred.low, high=pred.high,
               pays=pred.pays, verdict=pred.verdict, measured=measured)
    if pred.gain is not None and measured is not None:
        row.update(ratio=max(pred.gain / measured, measured / pred.gain),
                   inside=pred.low is not None and pred.low <= measured <= pred.high)
    return row


def _settled_line(row) -> str:
    gain = "none (a single network is cheapest)" if row["predicted"] is None else \
        f"{row['predicted']:.2f}x [{row['low']:.2f}, {row['high']:.2f}]"
    measured = "none" if row["measured"] is None else f"{row['measured']:.2f}x"
    tail = ""
    if "ratio" in row:
        tail = f"; ratio {row['ratio']:.2f}, measured {'inside' if row['inside'] else 'OUTSIDE'} the interval"
    return (f"settled on {row['draws']} pilot draws: predicted {gain} (pays in {100 * row['pays']:.0f}% of the "
            f"replicas; verdict: {row['verdict']}), measured {measured}{tail}")


def _measure_choices(fam, pred, batch_size: int) -> dict:
    """The coupled error, on the comparison's main batch (seed 0, the top's 100-step reference), of the
    single and multilevel runs the law chose."""
    from mlem_jax.compare._best_samplers import _Batch
    from mlem_jax.diffusion.metrics import coupled_error

    batch = _Batch(fam, batch_size, 0, 100, 4)
    out = {}
    for what, c in (("single", pred.single), ("multilevel", pred.multilevel)):
        if c is not None:
            y, _ = batch.images(c.levels, c.sampler, c.steps, c.firings)
            out[what] = coupled_error(y, batch.reference).value
    return out


def _family(args, log, log_lines, t0) -> int:
    """The law's prediction on a UNet family against the measured comparison, at the top's error at each
    --steps: the pilots on their own `--pilot-size` draws (seed 1), the comparison on `--batch-size`."""
    from mlem_jax.cli._demo import demo_ladders
    from mlem_jax.compare import compare_best_samplers, family_pilots, format_prediction
    from mlem_jax.diffusion.family import load_family

    fam = load_family(args.family)
    names = [f"nf={m.nf}" for m in fam.models]
    pilots, flops = family_pilots(fam, batch_size=args.pilot_size, seed=1, samplers=("dpm++2m", "ddim"))
    batches = [pilots]

    def more(i):  # the same pilots on the i-th further batch of draws (seed 1 + i; the comparison's are 0 and 1)
        log(f"  pilots on a further batch of {args.pilot_size} draws (seed {1 + i})")
        return family_pilots(fam, batch_size=args.pilot_size, seed=1 + i, samplers=("dpm++2m", "ddim"))[0]
    with open(os.path.join(args.out, f"{args.name}_pilots.pkl"), "wb") as f:  # to refit the law without rerunning
        pickle.dump(dict(pilots=pilots._asdict(), flops=flops), f)
    law = fit_law(pilots)
    log(f"law ({args.pilot_size} pilot draws): floors " + ", ".join(f"{f:.4f}" for f in law.floors) + "; "
        + "; ".join(f"{s}: p {law.p[s]:.2f}" for s in law.p) + "; " + _coins_text(law))
    only = dict(coins=("stratified",))  # the comparison runs stratified coins: the law searches those
    rows = []
    for n in args.steps:
        ladders = demo_ladders(n)  # the law searches the step counts the comparison searches
        pred = predict(pilots, law_error(law, (len(names) - 1,), "dpm++2m", n), flops, CALLS_PER_STEP,
                       steps=ladders["step_ladder"], ml_steps=ladders["ml_step_ladder"], measured_size=args.batch_size,
                       **only)
        c = compare_best_samplers(fam, steps=n, sampler="dpm++2m", batch_size=args.batch_size,
                                  pilot_size=max(16, args.pilot_size), seed=0, reference_steps=100, repeats=1,
                                  samplers=("dpm++2m", "ddim"), exhaustive=False, max_step_ups=64, **ladders)
        ml = c.multilevel
        law_ml = law_error(law, ml.levels, ml.sampler, ml.steps, ml.firings)
        log(f"target: {names[-1]} with DPM-Solver++(2M) at {n} steps (measured error {c.target.error.value:.4f} "
            f"+- {c.target.error.stderr:.4f}; the law's {pred.target:.4f})")
        log(format_prediction(pred, names))
        log(f"  measured: single {c.single.describe([m.nf for m in fam.models])} ({c.single.gflop:.3f} GFLOP), "
            f"multilevel {ml.describe([m.nf for m in fam.models])} (error {ml.error.value:.4f} +- "
            f"{ml.error.stderr:.4f}, the law's {law_ml:.4f}): {c.flop_ratio:.2f}x in FLOPs, the multilevel "
            f"error at most 1.1x the single network's; {len(c.main_candidates)} pilot candidate(s) run on the main "
            f"batch, firings grown {c.stepped_up} time(s))")
        if pred.gain is not None:
            log(f"  predicted / measured: {pred.gain / c.flop_ratio:.2f}")
        # the comparison chooses both sides by modelled seconds (evaluations x each level's seconds per call,
        # timed in it), so the like-for-like prediction searches on the same costs
        by_time = predict(pilots, pred.target, c.level_seconds, CALLS_PER_STEP, steps=ladders["step_ladder"],
                          ml_steps=ladders["ml_step_ladder"], measured_size=args.batch_size, **only)
        measured_time = c.single.modelled_seconds / ml.modelled_seconds
        top = len(names) - 1
        settled, on = predict_settled(batches, more, lambda p: law_error(fit_law(p), (top,), "dpm++2m", n),
                                      c.level_seconds, CALLS_PER_STEP, max_draws=args.max_pilot_size or
                                      2 * args.pilot_size, steps=ladders["step_ladder"],
                                      ml_steps=ladders["ml_step_ladder"], measured_size=args.batch_size, **only)
        settled_row = _settled_row(settled, on, measured_time)
        log("  in modelled seconds at the same target (the cost the comparison chooses by; level seconds "
            + ", ".join(f"{1e3 * x:.2f} ms" for x in c.level_seconds) + "): predicted "
            + ("none (a single network is cheapest)" if by_time.gain is None else
               f"{by_time.gain:.2f}x [{by_time.low:.2f}, {by_time.high:.2f}]")
            + f" (pays in {100 * by_time.pays:.0f}% of the replicas; verdict: {by_time.verdict}), measured "
            f"{measured_time:.2f}x")
        log("  in modelled seconds, " + _settled_line(settled_row))
        checks = _measure_choices(fam, pred, args.batch_size)
        for what, err in checks.items():
            near = "within 1.1x of it" if err <= 1.1 * c.target.error.value else "MISSES 1.1x"
            log(f"  the law's {what} choice measured on the main batch: error {err:.4f} against the target "
                f"{c.target.error.value:.4f}: {near}")
        rows.append(dict(steps=n, predicted=pred.gain, low=pred.low, high=pred.high, pays=pred.pays,
                         verdict=pred.verdict, verdict_modelled_seconds=by_time.verdict, measured=c.flop_ratio,
                         predicted_modelled_seconds=[by_time.gain, by_time.low, by_time.high, by_time.pays],
                         measured_modelled_seconds=measured_time, settled_modelled_seconds=settled_row,
                         main_candidates=len(c.main_candidates), stepped_up=c.stepped_up,
                         level_seconds=c.level_seconds.tolist(),
                         measured_multilevel_error=[ml.error.value, ml.error.stderr], law_multilevel_error=law_ml))
    log(f"total {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(args.out, f"{args.name}_pilots.pkl"), "wb") as f:  # every batch the settling ran
        pickle.dump(dict(pilots=[b._asdict() for b in batches], flops=flops), f)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(dict(command="python benchmarks/advise_law.py " + " ".join(sys.argv[1:]), rows=rows), f, indent=1)
    with open(os.path.join(args.out, f"{args.name}.log"), "w") as f:
        f.write("\n".join(log_lines) + "\n")
    return 0


def _refit(args, log, log_lines, t0) -> int:
    """The law refitted on the pilots an earlier `--family` run recorded (`NAME_pilots.pkl`: every batch)
    and predicted again against the measurements it recorded (`NAME.json`; each target's level seconds
    from it, or from `NAME.log` for runs that predate them): what a change to the law does, without
    rerunning the comparison. A verdict is settled within the recorded batches only."""
    import re

    from mlem_jax.cli._demo import demo_ladders
    from mlem_jax.compare import Pilots, format_prediction
    from mlem_jax.diffusion.family import load_family

    stem = os.path.join(args.out, args.name)
    with open(stem + "_pilots.pkl", "rb") as f:
        saved = pickle.load(f)
    batches = [Pilots(**b) for b in (saved["pilots"] if isinstance(saved["pilots"], list) else [saved["pilots"]])]
    with open(stem + ".json") as f:
        recorded = json.load(f)
    with open(stem + ".log") as f:
        logged = [[float(x) / 1e3 for x in re.findall(r"([\d.]+) ms", m)]
                  for m in re.findall(r"level seconds ([^)]*)\)", f.read())]
    fam = load_family(args.family)
    names, flops, top = [f"nf={m.nf}" for m in fam.models], saved["flops"], len(fam.models) - 1
    first = batches[0]
    size = len(next(iter(first.floors.values())))
    law = fit_law(first)
    log(f"refit on {len(batches)} recorded batch(es) of {size} pilot draws: floors "
        + ", ".join(f"{f:.4f}" for f in law.floors) + "; " + _coins_text(law))
    rows = []
    for i, row in enumerate(recorded["rows"]):
        n = row["steps"]
        ladders = demo_ladders(n)
        secs = np.asarray(row.get("level_seconds") or logged[i])
        search = dict(steps=ladders["step_ladder"], ml_steps=ladders["ml_step_ladder"], measured_size=args.batch_size,
                      coins=("stratified",))
        target = lambda p: law_error(fit_law(p), (top,), "dpm++2m", n)
        pred = predict(first, target(first), flops, CALLS_PER_STEP, **search)
        by_time = predict(first, target(first), secs, CALLS_PER_STEP, **search)
        recorded_batches = list(batches)
        settled, on = predict_settled(recorded_batches[:1], lambda j: recorded_batches[j], target, secs,
                                      CALLS_PER_STEP, max_draws=size * len(batches), **search)
        measured = row["measured_modelled_seconds"]
        log(f"target: {names[-1]} with DPM-Solver++(2M) at {n} steps")
        log(format_prediction(pred, names))
        log(f"  measured (recorded): {row['measured']:.2f}x in FLOPs, {measured:.2f}x in modelled seconds")
        log("  in modelled seconds: predicted " + ("none (a single network is cheapest)" if by_time.gain is None else
                                                 f"{by_time.gain:.2f}x [{by_time.low:.2f}, {by_time.high:.2f}]")
            + f" (pays in {100 * by_time.pays:.0f}% of the replicas; verdict: {by_time.verdict})")
        settled_row = _settled_row(settled, on, measured)
        log("  in modelled seconds, " + _settled_line(settled_row))
        checks = _measure_choices(fam, by_time, args.batch_size)
        for what, err in checks.items():
            log(f"  the law's {what} choice (by seconds) measured on the main batch: error {err:.4f}")
        rows.append(dict(steps=n, predicted=pred.gain, low=pred.low, high=pred.high, pays=pred.pays,
                         verdict=pred.verdict, measured=row["measured"],
                         predicted_modelled_seconds=[by_time.gain, by_time.low, by_time.high, by_time.pays],
                         verdict_modelled_seconds=by_time.verdict, measured_modelled_seconds=measured,
                         settled_modelled_seconds=settled_row, law_choices_measured=checks))
    log(f"total {time.perf_counter() - t0:.0f} s")
    with open(stem + "_refit.json", "w") as f:
        json.dump(dict(command="python benchmarks/advise_law.py " + " ".join(sys.argv[1:]), rows=rows), f, indent=1)
    with open(stem + "_refit.log", "w") as f:
        f.write("\n".join(log_lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
