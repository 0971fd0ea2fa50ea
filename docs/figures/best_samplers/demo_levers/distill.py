"""Prototype: fine-tune the demo family's nf=16 toward its nf=64 (teacher regression in eps space
at x_t = alpha x0 + std eps, t ~ U[t_min, 1]); writes runs/distill/family_<step>.{npz,json}."""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlem_jax.diffusion.data import batches, read_local
from mlem_jax.diffusion.family import demo_family_path, load_family, save_family

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 600
LR = float(sys.argv[2]) if len(sys.argv) > 2 else 5e-4
fam = load_family(demo_family_path())
(ms, mt), (ps, pt) = fam.models, fam.params
sde = fam.sde
x = read_local("fashion_mnist", "/usr/share/datasets/fashion-mnist", "train", 16)
print("data", x.shape, flush=True)
opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.linear_schedule(0.0, LR, 50)))
state = (ps, ps, opt.init(ps))

def loss_fn(p, x0, key):
    kt, kn = jax.random.split(key)
    t = jax.random.uniform(kt, (x0.shape[0],), minval=1e-3, maxval=1.0)
    eps = jax.random.normal(kn, x0.shape)
    tb = t.reshape(-1, 1, 1, 1)
    xt = sde.alpha(tb) * x0 + sde.std(tb) * eps
    teacher = mt.apply({"params": pt}, xt, t)
    out = ms.apply({"params": p}, xt, t)
    return jnp.mean((out - jax.lax.stop_gradient(teacher)) ** 2), jnp.mean((out - eps) ** 2)

@jax.jit
def step(state, x0, key, i):
    p, ema, o = state
    (l, dsm), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x0, key)
    u, o = opt.update(g, o, p)
    p = optax.apply_updates(p, u)
    ema = jax.tree_util.tree_map(lambda e, q: 0.995 * e + 0.005 * q, ema, p)
    return (p, ema, o), l, dsm

data = batches(x, 128, jax.random.key(7))
t0 = time.time()
acc = []
for i in range(STEPS):
    state, l, dsm = step(state, next(data), jax.random.fold_in(jax.random.key(11), i), i)
    acc.append((float(l), float(dsm)))
    if (i + 1) % 50 == 0:
        a = np.mean(acc[-50:], 0)
        print(f"step {i+1}: distill {a[0]:.5f} dsm {a[1]:.5f} ({time.time()-t0:.0f} s)", flush=True)
    if (i + 1) % 200 == 0 or i + 1 == STEPS:
        save_family(f"runs/distill/family_{i+1}", [ms, mt], [state[1], pt], sde, fam.parameterization,
                    fam.image_shape, {"distilled": {"from": "fmnist16_demo", "steps": i + 1, "lr": LR}})
