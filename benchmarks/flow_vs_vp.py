"""Flow matching against VP, and UniPC against DPM-Solver++(2M), on Fashion-MNIST 16x16 (issue 43, item 6).

Two families of the same UNets (nf 8, 16, 32), trained with the same budget (2000 steps per level,
batch 128, seed 0): the VP family with eps-prediction (benchmarks/weights/fmnist16, its levels
nf 8..32) and the rectified-flow family with velocity prediction and logit-normal times
(benchmarks/weights/fmnist16_flow, `make fmnist16-flow-weights`). Every level of each family with
DPM-Solver++(2M) and UniPC-bh2 on the log-SNR grid at `--steps`, on the same prior draws; FID on the
features of a classifier trained here (not comparable with published FIDs) with bootstrap standard
errors, against the test set. Then, at equal FID (targets: multiples of the best FID either family
reaches), the cheapest run of each family and of each sampler, in GFLOP per sample.

    python benchmarks/flow_vs_vp.py --out docs/figures/flow_vs_vp
    python benchmarks/flow_vs_vp.py --quick --out benchmarks/out/flow_vs_vp_quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN  # noqa: E402
from mlem_jax.diffusion.family import combine_families, load_family  # noqa: E402
from mlem_jax.diffusion.metrics import frechet_distance  # noqa: E402
from mlem_jax.diffusion.samplers import CALLS_PER_STEP  # noqa: E402
from mlem_jax.diffusion.sampling import sample  # noqa: E402
from mlem_jax.diffusion.sde import logsnr_grid  # noqa: E402
from mlem_jax.diffusion.unet import family_summary  # noqa: E402

from _common import device_description, fashion_mnist_and_classifier  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLER_NAMES = {"dpm++2m": "DPM-Solver++(2M)", "unipc": "UniPC-bh2"}
TARGETS = (1.1, 1.5, 2.0)


def families(scratch: str):
    """(name, family) of the VP family's levels nf 8..32 (combined into `scratch`) and the flow family."""
    vp_path = os.path.join(scratch, "vp_nf8_32")
    combine_families([os.path.join(HERE, "weights", "fmnist16")], vp_path, nfs=(8, 16, 32))
    return [("VP (eps)", load_family(vp_path)), ("flow (velocity)", load_family(os.path.join(HERE, "weights",
                                                                                           "fmnist16_flow")))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/out/flow_vs_vp")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--source-dir", default=FASHION_MNIST_DEBIAN)
    ap.add_argument("--quick", action="store_true", help="64 samples, 5 steps, a 20-step classifier: the CI run")
    args = ap.parse_args(argv)
    classifier_steps = 1500
    if args.quick:
        args.samples, args.steps, classifier_steps = 64, [5], 20
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    log(f"flow_vs_vp: {' '.join(sys.argv[1:]) or '(defaults)'}; {device_description()}")
    _, _, test_x, _, clf = fashion_mnist_and_classifier(args.source_dir, args.quick, classifier_steps)
    reference = clf.features(test_x)
    runs = []
    import tempfile

    scratch = tempfile.TemporaryDirectory(prefix="flow_vs_vp_")  # the combined VP family, removed at exit
    for name, fam in families(scratch.name):
        gflop = [s["gflop"] for s in family_summary(fam.models, fam.params, fam.image_shape)]
        for k, model in enumerate(fam.models):
            for solver in SAMPLER_NAMES:
                for n in args.steps:
                    res = sample(fam, [k], logsnr_grid(fam.sde, n), seed=0, batch_size=args.samples, solver=solver,
                                 probability_flow=True)
                    fid = frechet_distance(clf.features(res.images), reference, num_bootstrap=20)
                    cost = CALLS_PER_STEP[solver] * n * gflop[k]
                    runs.append(dict(family=name, nf=model.nf, sampler=solver, steps=n, fid=fid.value,
                                     fid_se=fid.stderr, gflop=cost, seconds=res.run_seconds))
                    log(f"  {name:16s} nf={model.nf:2d} {SAMPLER_NAMES[solver]:17s} {n:3d} steps: FID "
                        f"{fid.value:7.2f} +- {fid.stderr:5.2f}, {cost:7.3f} GFLOP/sample, {res.run_seconds:6.2f} s")
    best = min(r["fid"] for r in runs)
    log(f"equal FID (targets: multiples of the best FID reached, {best:.2f}); the cheapest run reaching each:")
    summary = []
    for tau in TARGETS:
        goal = tau * best
        row = {"target": tau, "fid": goal}
        for key, pick in (("family", lambda r, v: r["family"] == v), ("sampler", lambda r, v: r["sampler"] == v)):
            values = sorted({r[key] for r in runs})
            for v in values:
                ok = [r for r in runs if pick(r, v) and r["fid"] <= goal]
                row[f"{key}:{v}"] = min(ok, key=lambda r: r["gflop"]) if ok else None
        summary.append(row)
        fmt = lambda r: "none" if r is None else (f"{r['family']} nf={r['nf']} {SAMPLER_NAMES[r['sampler']]} "
                                                  f"{r['steps']} steps, {r['gflop']:.3f} GFLOP (FID {r['fid']:.2f})")
        vp, fl = row["family:VP (eps)"], row["family:flow (velocity)"]
        ratio = "" if (vp is None or fl is None) else f"; VP / flow in GFLOP: {vp['gflop'] / fl['gflop']:.2f}x"
        log(f"  FID <= {goal:.2f} ({tau} x best): VP {fmt(vp)}; flow {fmt(fl)}{ratio}")
        dp, un = row["sampler:dpm++2m"], row["sampler:unipc"]
        ratio = "" if (dp is None or un is None) else \
            f"; DPM-Solver++ / UniPC in GFLOP: {dp['gflop'] / un['gflop']:.2f}x"
        log(f"    same target by sampler: DPM-Solver++(2M) {fmt(dp)}; UniPC {fmt(un)}{ratio}")
    log(f"total {time.perf_counter() - t0:.0f} s")
    with open(os.path.join(args.out, "flow_vs_vp.json"), "w") as f:
        json.dump(dict(command="python benchmarks/flow_vs_vp.py " + " ".join(sys.argv[1:]), device=device_description(),
                       runs=runs, summary=summary), f, indent=1, default=lambda o: None if o is None else float(o))
    with open(os.path.join(args.out, "flow_vs_vp.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    assert all(math.isfinite(r["fid"]) for r in runs), "a run produced a non-finite FID"
    return 0


if __name__ == "__main__":
    sys.exit(main())
