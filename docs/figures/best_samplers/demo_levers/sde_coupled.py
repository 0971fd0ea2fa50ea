"""Prototype: SDE-DPM-Solver++(2M) coupled (same prior, same Brownian path) errors for
nf16 alone, nf64 alone, and multilevel nf16+64 stratified, on the demo family."""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import Multilevel
from mlem_jax.compare import level_seconds
from mlem_jax.diffusion.family import demo_family_path, load_family
from mlem_jax.diffusion.metrics import coupled_error
from mlem_jax.diffusion.samplers import sde_dpm_solver_pp
from mlem_jax.diffusion.sde import logsnr_grid

B = int(sys.argv[1]) if len(sys.argv) > 1 else 32
FINE = 240
fam = load_family(demo_family_path())
sde, shape = fam.sde, tuple(fam.image_shape)
den = fam.denoisers()
k0, k1 = jax.random.split(jax.random.key(0))
y0 = jax.vmap(lambda k: sde.prior_sample(k, shape))(jax.random.split(k0, B))
ts_f = logsnr_grid(sde, FINE)
h = jnp.abs(jnp.diff(ts_f)).reshape(1, -1, 1, 1, 1)
dw = jax.random.normal(k1, (B, FINE, *shape)) * jnp.sqrt(h)

def coarse(n):
    r = FINE // n
    return dw.reshape(B, n, r, *shape).sum(2)

progs = {}
def run(levels, n, m=0, seed=0):
    ts = logsnr_grid(sde, n)
    key = (levels, n)
    if key not in progs:
        if len(levels) == 1:
            d = den[levels[0]]
            f = lambda y, w, lk, p: (sde_dpm_solver_pp(d, sde, y, ts, w), jnp.zeros(2))  # w: this grid's increments
        else:
            ds = [den[k] for k in levels]
            def f(y, w, lk, p):
                s = sde_dpm_solver_pp(Multilevel(ds, p, coins="stratified", level_key=lk), sde, y, ts, w)
                return s.y, s.evaluations
        progs[key] = jax.jit(jax.vmap(f, in_axes=(0, 0, None, None)))
    w = coarse(n)
    p = jnp.array([1.0, m / n])
    chunks = np.array_split(np.arange(B), 4)
    ys = [progs[key](y0[c], w[c], jax.random.key(1000 + seed * 10 + i), p)[0] for i, c in enumerate(chunks)]
    return jnp.concatenate(ys)

t0 = time.time()
ref = run((1,), FINE)
print("ref", time.time() - t0, flush=True)
secs = level_seconds(den, shape, B)
print("level seconds/sample", secs, secs[1] / secs[0], flush=True)
out = []
def rec(levels, n, m, y):
    e = coupled_error(y, ref)
    cost = n * secs[levels[0]] + (m * secs[1] if len(levels) > 1 else 0)
    row = dict(levels=levels, n=n, m=m, err=float(e.value), se=float(e.stderr) if hasattr(e, 'stderr') else None, cost=cost)
    print(row, flush=True); out.append(row)
for n in (6, 8, 10, 12, 15, 20, 24, 30, 40, 60):
    rec((1,), n, 0, run((1,), n))
for n in (10, 20, 40, 60):
    rec((0,), n, 0, run((0,), n))
for n in (20, 30, 40, 60):
    for m in (1, 2, 3, 4, 6, 8, 12):
        if m <= n:
            rec((0, 1), n, m, run((0, 1), n, m))
json.dump(out, open("runs/sde_explore_rows.json", "w"))
