# exploration for the demo: which target and base pair give a gain (its records are the .jsonl beside it)
import json
import os
import sys
import time
import warnings

os.makedirs('runs/best_samplers_targets', exist_ok=True)
from mlem_jax.compare import compare_best_samplers
from mlem_jax.diffusion.family import combine_families, demo_family_path, load_family

W = "benchmarks/weights"
out = {}
for pair in [tuple(map(int, a.split(","))) for a in sys.argv[1:]]:
    stem = f"runs/best_samplers_targets/family_{pair[0]}_{pair[1]}"
    combine_families([f"{W}/fmnist16", demo_family_path()], stem, nfs=pair)  # the nf=64: once benchmarks/weights/fmnist16_nf64
    fam = load_family(stem)
    for steps in (6, 8, 10):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = compare_best_samplers(fam, steps=steps, batch_size=64, pilot_size=32, samplers=("dpm++2m", "ddim"),
                                      step_ladder=(5, 6, 8, 10, 12, 15), ml_step_ladder=(8, 10, 15, 20))
        nfs = list(pair)
        rec = dict(pair=pair, steps=steps, secs=time.perf_counter() - t0, speedup=c.speedup, flop=c.flop_ratio,
                   single=c.single.describe(nfs), se=c.single.error.value, ss=c.single.seconds,
                   ml=c.multilevel.describe(nfs), me=c.multilevel.error.value, ms=c.multilevel.seconds,
                   mod=c.single.modelled_seconds / c.multilevel.modelled_seconds, up=c.stepped_up,
                   level_seconds=list(map(float, c.level_seconds)),
                   pilot=[(r.steps, r.firings, r.error.value, r.modelled_seconds) for r in c.pilot])
        print(json.dumps({k: v for k, v in rec.items() if k != "pilot"}), flush=True)
        out[f"{pair}_{steps}"] = rec
        json.dump(out, open(f"runs/best_samplers_targets/explore_{pair[0]}.json", "w"), indent=1)
