"""The law behind the demo's capped gain: the single network's error against its steps N, and the
multilevel error against the top's firings m (uniform stratified firings, nf=16 every step), on 64
samples of the demo family; then the gain in top evaluations and the time ratio that law allows.

Single network (DPM-Solver++(2M), second order):   e(N) ~ C / N^2
Multilevel on M steps with m stratified firings:   e(M, m)^2 ~ e(M)^2 + (c / m)^2
At a target eps the top runs N = sqrt(C / eps) times alone and at least m = c / eps times inside
the multilevel sampler, so the gain in top evaluations is at most N / m = sqrt(C eps) / c, which
shrinks as the target tightens, and the time ratio single / multilevel is at most
1 / (1 / r + m / N) with r the top's cost over the base's per evaluation."""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import Multilevel, PiecewiseConstant
from mlem_jax.compare._best_samplers import _Batch
from mlem_jax.diffusion.family import load_family
from mlem_jax.diffusion.metrics import coupled_error
from mlem_jax.diffusion.samplers import SAMPLERS
from mlem_jax.diffusion.sde import logsnr_grid

fam = load_family(sys.argv[1])
main = _Batch(fam, 64, 0, 32, coin_plans=4)
d16, d64 = main.denoisers
singles = {}
for N in (6, 8, 10, 12, 15, 20):
    y, _ = main.images((1,), "dpm++2m", N, 0)
    singles[N] = coupled_error(y, main.reference).value
    print(f"nf=64 alone, {N} steps: error {singles[N]:.4f}", flush=True)
Ns = np.array(list(singles)); es = np.array(list(singles.values()))
order, logC = np.polyfit(np.log(Ns), np.log(es), 1)
C = float(np.exp(np.mean(np.log(es) + 2 * np.log(Ns))))
print(f"fit: e(N) ~ N^{order:.2f}; with order 2, C = {C:.2f}")
def run(M, m):
    ts = logsnr_grid(fam.sde, M)
    sch = PiecewiseConstant(jnp.asarray([0.0, 1.5]), jnp.asarray([[1.0, m / M]]))
    prog = jax.jit(jax.vmap(lambda y, lk: SAMPLERS["dpm++2m"](
        Multilevel([d16, d64], sch, coins="stratified", level_key=lk), fam.sde, y, ts), in_axes=(0, None)))
    chunks = np.array_split(np.arange(64), 4)
    outs = [prog(main.y0[c], jax.random.fold_in(main.level_key, i)) for i, c in enumerate(chunks)]
    y = jnp.concatenate([o.y for o in outs])
    fired = np.mean(np.concatenate([np.asarray(o.evaluations)[:, 1] for o in outs]))
    return coupled_error(y, main.reference), fired
rows = []
for M in (12, 20):
    y, _ = main.images((1,), "dpm++2m", M, 0)
    eM = coupled_error(y, main.reference).value
    for m in (1, 2, 3, 4, 6, 8):
        e, fired = run(M, m)
        coin = float(np.sqrt(max(e.value ** 2 - eM ** 2, 0.0)))
        rows.append((M, m, e.value, coin))
        print(f"M={M} m={m} (top fired {fired:.2f} per sample): error {e.value:.4f} ± {e.stderr:.4f}; "
              f"coin part sqrt(e^2 - e(M)^2) = {coin:.4f}, m x coin = {m * coin:.3f}", flush=True)
c = float(np.exp(np.mean([np.log(m * coin) for _, m, _, coin in rows if coin > 0])))
slope = np.polyfit(np.log([r[1] for r in rows]), np.log([max(r[3], 1e-9) for r in rows]), 1)[0]
print(f"fit: coin error ~ m^{slope:.2f}; with 1/m, c = {c:.3f}")
# the top over the base in CPU seconds per evaluation, timed here
x = main.y0[:32]; t = jnp.full((32,), 0.5)
f16 = jax.jit(jax.vmap(lambda t, x: d16(t, x, None))); f64 = jax.jit(jax.vmap(lambda t, x: d64(t, x, None)))
def best(f):
    f(t, x).block_until_ready(); out = []
    for _ in range(10):
        s = time.perf_counter(); f(t, x).block_until_ready(); out.append(time.perf_counter() - s)
    return min(out)
r = best(f64) / best(f16)
print(f"r = nf64 / nf16 seconds per evaluation at batch 32: {r:.1f}")
for N in (6, 8, 10, 15, 20):
    eps = C / N ** 2; m = c / eps
    print(f"target nf=64 at {N} steps (eps {eps:.3f}): m >= {m:.1f} firings, gain in top evaluations <= {N / m:.2f}, "
          f"time ratio <= {1 / (1 / r + m / N):.2f}x")
