"""Coupled errors (DPM-Solver++(2M), 64 samples, reference nf=64 3M at 32 steps): nf=16 alone at 8/12/24
steps, nf=64 alone at 8, and nf16+64 stratified at 12 steps with m = 2, 3, 4, 6, for each family given."""
import sys

import numpy as np

from mlem_jax.compare._best_samplers import _Batch
from mlem_jax.diffusion.family import load_family
from mlem_jax.diffusion.metrics import coupled_error

for path in sys.argv[1:]:
    fam = load_family(path)
    b = _Batch(fam, 64, 0, 32, coin_plans=4)
    row = []
    for lv, n, m in [((0,), 8, 0), ((0,), 12, 0), ((0,), 24, 0), ((1,), 8, 0), ((1,), 6, 0)] + [((0, 1), 12, m) for m in (2, 3, 4, 6)]:
        y, _ = b.images(lv, "dpm++2m", n, m)
        e = coupled_error(y, b.reference)
        row.append(f"{lv} n={n} m={m}: {e.value:.4f}±{e.stderr:.4f}")
    print(path, "\n  " + "\n  ".join(row), flush=True)
