"""Stratified firings with p_j proportional to e_j^alpha (e_j: nf=16 on step j alone, measured on a
separate 32-sample batch) against uniform p = m/N; coupled errors on 64 samples."""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import Multilevel, PiecewiseConstant
from mlem_jax.compare._best_samplers import _Batch
from mlem_jax.diffusion.family import load_family
from mlem_jax.diffusion.metrics import coupled_error
from mlem_jax.diffusion.samplers import SAMPLERS
from mlem_jax.diffusion.sde import logsnr_grid

fam = load_family(sys.argv[1]); N = int(sys.argv[2])
ts = logsnr_grid(fam.sde, N)
pil = _Batch(fam, 32, 1, 32, coin_plans=4)
d16, d64 = pil.denoisers
top_p, _ = pil.images((1,), "dpm++2m", N, 0)
@jax.jit
def run_j(y0, j):
    def mixed(t, x, args):
        return jax.lax.cond(jnp.abs(t - ts[j]) < 1e-9, lambda: d16(t, x, args), lambda: d64(t, x, args))
    return jax.vmap(lambda y: SAMPLERS["dpm++2m"](mixed, fam.sde, y, ts))(y0)
es = np.array([float(np.sqrt(np.mean((np.asarray(run_j(pil.y0, j)) - np.asarray(top_p)) ** 2))) for j in range(N)])
print("e_j", np.round(es, 4))
main = _Batch(fam, 64, 0, 32, coin_plans=4)
t_desc = np.asarray(ts)
edges_t = np.concatenate([[0.0], (t_desc[1:N][::-1] + t_desc[:N - 1][::-1]) / 2, [1.5]])  # bins increasing in t
def schedule(p_steps):
    vals = np.stack([np.ones(N), p_steps], 1)[::-1]  # bin b (increasing t) holds step N-1-b
    return PiecewiseConstant(jnp.asarray(edges_t), jnp.asarray(vals))
def alloc(w, m):
    p = np.full(N, 0.0); free = np.ones(N, bool)
    for _ in range(N):
        p[free] = w[free] / w[free].sum() * (m - (~free).sum())
        over = free & (p >= 1)
        if not over.any(): break
        p[over] = 1; free &= ~over
    return np.minimum(p, 1)
prog = jax.jit(jax.vmap(lambda y, lk, sch: SAMPLERS["dpm++2m"](Multilevel([d16, d64], sch, coins="stratified", level_key=lk),
                                                               fam.sde, y, ts), in_axes=(0, None, None)))
top, _ = main.images((1,), "dpm++2m", 8, 0)
print("target nf64 8 steps", coupled_error(top, main.reference))
for m in (2, 3, 4, 5):
    for name, w in (("uniform", np.ones(N)), ("e^1", es), ("e^0.5", np.sqrt(es)), ("e^(2/3)", es ** (2 / 3))):
        p = alloc(w, m)
        chunks = np.array_split(np.arange(64), 4)
        outs = [prog(main.y0[c], jax.random.fold_in(main.level_key, i), schedule(p)) for i, c in enumerate(chunks)]
        y = jnp.concatenate([o.y for o in outs]); ev = np.mean(np.concatenate([np.asarray(o.evaluations)[:, 1] for o in outs]))  # top firings per sample
        print(f"m={m} {name:8s} firings {ev:.2f} error {coupled_error(y, main.reference)}  p={np.round(p, 2)}", flush=True)
