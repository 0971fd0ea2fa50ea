"""Per-step sensitivity: nf=16 on step j only (nf=64 elsewhere), DPM-Solver++(2M) at N steps; coupled error
against the reference, 64 samples. Also the sum-of-e_j allocation's predicted variance against uniform."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax.compare._best_samplers import _Batch
from mlem_jax.diffusion.family import load_family
from mlem_jax.diffusion.metrics import coupled_error
from mlem_jax.diffusion.samplers import SAMPLERS
from mlem_jax.diffusion.sde import logsnr_grid

fam = load_family(sys.argv[1]); N = int(sys.argv[2])
b = _Batch(fam, 64, 0, 32, coin_plans=4)
d16, d64 = b.denoisers
ts = logsnr_grid(fam.sde, N)
top, _ = b.images((1,), "dpm++2m", N, 0)
print("top alone", coupled_error(top, b.reference).value)
@jax.jit
def run(j):
    def mixed(t, x, args):
        use = jnp.abs(t - ts[j]) < 1e-9
        return jax.lax.cond(use, lambda: d16(t, x, args), lambda: d64(t, x, args))
    return jax.vmap(lambda y: SAMPLERS["dpm++2m"](mixed, fam.sde, y, ts))(b.y0)
es = []
for j in range(N):
    y = run(j)
    e = float(np.sqrt(np.mean((np.asarray(y) - np.asarray(top)) ** 2)))  # difference from the top's own run
    es.append(e); print(j, f"t={float(ts[j]):.3f}", f"{e:.4f}", flush=True)
es = np.array(es)
for m in (2, 3, 4, 6):
    uni = N * (es ** 2).sum() / m - (es ** 2).sum()
    p = np.minimum(1, es / es.sum() * m)
    for _ in range(20):  # cap at 1, redistribute
        free = p < 1
        rest = m - (~free).sum()
        p[free] = np.minimum(1, es[free] / es[free].sum() * rest)
    opt = (es ** 2 * (1 / p - 1)).sum()
    print(f"m={m}: uniform sqrt var {np.sqrt(uni):.4f}, allocated {np.sqrt(opt):.4f}, p={np.round(p, 2)}")
