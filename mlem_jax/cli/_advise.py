"""`mlem-jax advise`: will multilevel sampling pay on this family? Held-out diagnostics of its
levels (`mlem_jax.compare._advise`), a verdict in words, a text report and a plot."""

from __future__ import annotations

import math
import os
import time

from mlem_jax.cli._common import CLIError, family_arg, positive, seed, writing


def add_parser(sub):
    """Register `mlem-jax advise` on the subparsers `sub`."""
    a = sub.add_parser("advise", help="held-out diagnostics of a family's levels and a verdict: does the top level "
                                      "add accuracy a multilevel estimator could buy, or only noise?")
    a.add_argument("--family", default=None, help="a family (default: the shipped digits family)")
    a.add_argument("--data", default=None,
                   help="held-out images: a dataset name, a folder or an .npy/.npz file (default: the dataset the "
                        "family records, its test split)")
    a.add_argument("--data-dir", default=None, help="tfds data dir for a prepared dataset")
    a.add_argument("--draws", type=positive(int), default=2048, help="held-out draws shared by every level")
    a.add_argument("--seed", type=seed, default=0, help="seed of the draws")
    a.add_argument("--predict", type=positive(int), nargs="*", default=None, metavar="STEPS",
                   help="also fit the law on short pilots and predict the equal-error gain at the error of the top "
                        "network with DPM-Solver++(2M) at each STEPS (default 10 and 20; about 3.5 minutes more on "
                        "2 CPU cores for the shipped digits family)")
    a.add_argument("--target", type=float, nargs="+", default=None, metavar="ERROR",
                   help="also (or instead of --predict's) targets given as pathwise RMS errors per pixel against the "
                        "top network's fine ODE; implies --predict")
    a.add_argument("--pilot-size", type=positive(int), default=32, help="with --predict: prior draws of the pilots")
    a.add_argument("--max-pilot-size", type=positive(int), default=None,
                   help="with --predict: where a verdict is unsettled, run the pilots on further batches of "
                        "--pilot-size draws, up to this many in all (default: no further batches)")
    a.add_argument("--pilot-steps", type=positive(int), nargs="+", default=[5, 6, 8, 10, 12], metavar="N",
                   help="with --predict: the pilots' step counts (at least two; the law follows its points between "
                        "them)")
    a.add_argument("--out", default="out/advise", help="folder of advise.txt and advise.png")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.set_defaults(func=run)


def run(args):
    from tqdm.auto import tqdm

    from mlem_jax.compare._advise import family_diagnostics, held_out_images, plot_advice

    t0 = time.perf_counter()
    if args.target is not None and any(not (t > 0) for t in args.target):
        raise CLIError(f"--target: expected positive RMS errors, got {args.target}.")
    family = family_arg(args.family)
    if len(family.models) < 2:
        raise CLIError(f"--family: advise compares levels, and this family has {len(family.models)}.")
    os.makedirs(args.out, exist_ok=True)
    txt, png = os.path.join(args.out, "advise.txt"), os.path.join(args.out, "advise.png")
    try:
        images = held_out_images(family, args.data, args.data_dir)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(f"--data: {e}") from e
    bar = tqdm(total=len(family.models), desc="advise: levels", disable=args.no_progress, unit="level")
    try:
        advice = family_diagnostics(family, images, draws=args.draws, seed=args.seed, progress=lambda: bar.update(1))
    finally:
        bar.close()
    report = advice.report()
    if args.predict is not None or args.target is not None:
        report += "\n\n" + _prediction(args, family)
    print(report)
    with writing(txt, png):
        from mlem_jax._atomic import atomic_path

        with atomic_path(txt) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(report + "\n")
        plot = plot_advice(advice, png)
    print(f"wrote {os.path.abspath(txt)}" + (f" and {os.path.abspath(plot)}" if plot else "")
          + f" in {time.perf_counter() - t0:.0f} s")


def _prediction(args, family) -> str:
    from tqdm.auto import tqdm

    from mlem_jax.compare._law import (
        family_pilots,
        fit_law,
        format_prediction,
        law_error,
        law_standard_errors,
        merge_pilots,
        predict_settled,
    )
    from mlem_jax.diffusion.samplers import CALLS_PER_STEP

    steps = args.predict or ([] if args.target else [10, 20])
    K = len(family.models)
    names = [f"nf={m.nf}" for m in family.models]
    bar = tqdm(total=None, desc="advise: pilots", disable=args.no_progress, unit="run",
               bar_format="{desc}: {n} runs {elapsed}")

    # the coin pilots at the steps a multilevel run at these targets takes (1.5x to 2.5x theirs; the
    # law's multilevel runs go to 1.5x the most): (12, 24) for pathwise targets alone
    ml_steps = (12, 24) if not steps else tuple(sorted({max(6, round(1.5 * min(steps))), round(2.5 * max(steps))}))

    def pilots_on(i):  # the i-th batch of pilot draws
        return family_pilots(family, batch_size=args.pilot_size, seed=args.seed + 1 + i,
                             pilot_steps=tuple(args.pilot_steps), ml_steps=ml_steps, tick=lambda: bar.update(1))

    try:
        first, flops = pilots_on(0)
        batches, predictions = [first], []
        asked = [(f"nf={family.models[-1].nf} with DPM-Solver++(2M) at {n} steps",
                  lambda p, n=n: law_error(fit_law(p), (K - 1,), "dpm++2m", n)) for n in steps]
        asked += [(f"pathwise RMS error {e:g}", e) for e in args.target or ()]
        for name, target in asked:  # later targets reuse the batches an earlier one added
            pred, on = predict_settled(batches, lambda i: pilots_on(i)[0], target, flops, CALLS_PER_STEP,
                                       max_draws=max(args.max_pilot_size or 0, args.pilot_size))
            predictions.append((name, pred, len(next(iter(on.floors.values())))))
    finally:
        bar.close()
    pilots = merge_pilots(*batches)  # every batch any target ran
    law, se = fit_law(pilots), law_standard_errors(pilots)
    def pm(v, e, f=".4f"):
        if not math.isfinite(v):
            return "unresolved (no pilot distance beyond 2 s.e.)"
        if not math.isfinite(e):
            return f"{v:{f}} (s.e. undefined: some refits leave it unresolved)"
        return f"{v:{f}} +- {e:{f}}"

    runs = len(first.floors) + len(first.discretisation) + len(first.coins) + len(first.iid_coins)
    draws = len(next(iter(pilots.floors.values())))
    lines = [f"the law from {runs} pilot runs on {draws} prior draws ({len(batches)} batch(es) of {args.pilot_size}; "
             f"reference: nf={family.models[-1].nf}'s fine ODE; every +- a bootstrap standard error):",
             "  floors F_k: " + ", ".join(f"{n} {pm(f, e)}" for n, f, e in zip(names, law.floors, se.floors)),
             "  orders p: " + ", ".join(f"{s} {pm(law.p[s], se.p[s], '.2f')}" for s in law.p),
             "  coins, stratified (squared coin noise c_b^2 (1/m - 1/N)^r N^-u, per base + the top): "
             + ", ".join(f"{names[b]} c {pm(law.coin[b], se.coin[b], '.3f')}, r {pm(law.r[b], se.r[b], '.2f')}, "
                         f"u {pm(law.u[b], se.u[b], '.2f')}" for b in range(K - 1))]
    if len(law.iid_coin):
        lines.append("  coins, iid (c_b,iid^2 (1/m - 1/N)^r_iid, m the expected firings): "
                     + ", ".join(f"{names[b]} c {pm(law.iid_coin[b], se.iid_coin[b], '.3f')}, r "
                                 f"{pm(law.iid_r[b], se.iid_r[b], '.2f')}" for b in range(K - 1)))
    for name, pred, on_draws in predictions:
        lines.append(f"target: {name} (predicted on {on_draws} pilot draws)")
        lines.append(format_prediction(pred, names))
    return "\n".join(lines)
