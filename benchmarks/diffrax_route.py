"""ML-EM through diffrax.diffeqsolve against the lax.scan route, in one run.

(a) a toy SDE (dimension 4, three affine levels), batch 256, 200 steps;
(b) a small UNet-like drift (two conv levels on 16x16x1 images), batch 32, 50 steps.
Both routes use the same probabilities, per-sample noise keys and an unbatched level
key; diffrax uses UnsafeBrownianPath (the fast choice; a VirtualBrownianTree per sample
is many times slower, see docs/diffrax.md). Prints the time ratio diffrax / scan.

    python benchmarks/diffrax_route.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from mlem_jax import MultilevelDrift, MultilevelEuler, multilevel_euler_maruyama

from _common import device_description, median_time, out_dir


def routes(levels, probs, sigma, shape, batch, steps):
    ts = jnp.linspace(0.0, 1.0, steps + 1)
    keys = jax.random.split(jax.random.key(0), batch)
    level_key = jax.random.key(1)
    y0 = jnp.zeros(shape)

    def scan_one(k, lk):
        return multilevel_euler_maruyama(levels, probs, lambda t, y, a: sigma, y0, ts, k, level_key=lk).y

    def diffrax_one(k, lk):
        bm = diffrax.UnsafeBrownianPath(shape=shape, key=k)
        terms = diffrax.MultiTerm(MultilevelDrift(levels, probs, lk),
                                  diffrax.ControlTerm(
                                      lambda t, y, a: lx.DiagonalLinearOperator(jnp.full(shape, sigma)), bm))
        return diffrax.diffeqsolve(terms, MultilevelEuler(), 0.0, 1.0, 1.0 / steps, y0, max_steps=steps + 1,
                                   saveat=diffrax.SaveAt(t1=True), adjoint=diffrax.ForwardMode()).ys[0]

    scan = jax.jit(jax.vmap(scan_one, in_axes=(0, None)))
    dfx = jax.jit(jax.vmap(diffrax_one, in_axes=(0, None)))
    return median_time(scan, keys, level_key), median_time(dfx, keys, level_key)


def conv_level(key, width):
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (3, 3, 1, width)) / 3
    w2 = jax.random.normal(k2, (3, 3, width, 1)) / (3 * np.sqrt(width))

    def f(t, y, args):
        h = jax.lax.conv_general_dilated(y[None], w1, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jnp.tanh(h)
        h = jax.lax.conv_general_dilated(h, w2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return h[0] - y

    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="benchmarks/out")
    args = ap.parse_args()
    print(f"device: {device_description()}")
    res = {"device": device_description()}

    batch, steps = (64, 50) if args.quick else (256, 200)
    toy = tuple((lambda t, y, a, c=c: -(1 + c) * y + c) for c in (0.5, 0.25, 0.0))
    t_scan, t_dfx = routes(toy, jnp.array([1.0, 0.3, 0.1]), 0.5, (4,), batch, steps)
    print(f"(a) toy SDE, batch {batch}, {steps} steps: scan {1e3 * t_scan:.2f} ms, diffrax {1e3 * t_dfx:.2f} ms, "
          f"ratio diffrax / scan {t_dfx / t_scan:.2f}")
    res["toy"] = {"batch": batch, "steps": steps, "scan_s": t_scan, "diffrax_s": t_dfx, "ratio": t_dfx / t_scan}

    batch, steps = (8, 20) if args.quick else (32, 50)
    convs = tuple(conv_level(jax.random.key(i), w) for i, w in enumerate((8, 64)))
    t_scan, t_dfx = routes(convs, jnp.array([1.0, 0.2]), 0.5, (16, 16, 1), batch, steps)
    print(f"(b) conv drift 16x16, widths 8 and 64, batch {batch}, {steps} steps: scan {1e3 * t_scan:.2f} ms, "
          f"diffrax {1e3 * t_dfx:.2f} ms, ratio diffrax / scan {t_dfx / t_scan:.2f}")
    res["conv"] = {"batch": batch, "steps": steps, "scan_s": t_scan, "diffrax_s": t_dfx, "ratio": t_dfx / t_scan}
    folder = out_dir(args.out)
    with open(os.path.join(folder, "diffrax_route_quick.json" if args.quick else "diffrax_route.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
