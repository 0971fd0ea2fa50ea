"""What learning p_k(t) (`learn_probabilities`) costs on an image family, against the
closed-form calibration's level statistics on the same trajectories.

    python benchmarks/learn_cost.py                  # Fashion-MNIST nf 4..32, 100 steps, 4 x 4 paths
    python benchmarks/learn_cost.py --quick          # two levels of the shipped digits family, 10 steps (CI)

Two runs of 2 and 6 SGD steps: their difference / 4 is the time of one SGD step
(compilation excluded), reported with the peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from mlem_jax.calibrate import learn_probabilities, level_statistics  # noqa: E402
from mlem_jax.diffusion import reverse_diffusion, uniform_grid  # noqa: E402
from mlem_jax.diffusion.family import load_family, shipped_family_path  # noqa: E402

from _common import device_description  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    family = load_family(shipped_family_path() if args.quick else os.path.join(HERE, "weights", "fmnist16"))
    steps, groups, paths = (10, 2, 3) if args.quick else (100, 4, 4)
    drifts, g = family.drifts(), reverse_diffusion(family.sde)
    if args.quick:
        drifts = drifts[:2]  # two levels: the code path, at half the compilation
    keys = jax.random.split(jax.random.key(0), groups * paths)
    y0 = jax.vmap(lambda k: family.sde.prior_sample(k, tuple(family.image_shape)))(keys)
    ts = uniform_grid(steps, 1e-3)
    costs = 4.0 ** np.arange(len(drifts))  # FLOP-like level costs; only the budget's scale depends on them
    print(f"device: {device_description()}; levels nf={[m.nf for m in family.models][:len(drifts)]}, {steps} steps, "
          f"{groups} groups of {paths} paths")
    t0 = time.perf_counter()
    jax.block_until_ready(level_statistics(drifts, g, y0, ts, keys, num_bins=min(10, steps // 2)))
    stats_s = time.perf_counter() - t0
    sgd = 3 if args.quick else 6
    res = learn_probabilities(drifts, g, y0, ts, jax.random.key(1), costs=costs, budget=0.5 * steps * costs[-1],
                              num_bins=min(10, steps // 2), steps=sgd, num_groups=groups, group_size=paths,
                              progress=False)
    first, per_step = float(res.history.seconds[0]), float(np.median(res.history.seconds[1:]))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"level statistics (the closed form's input): {stats_s:.1f} s (compilation included)")
    print(f"learning: first SGD step {first:.0f} s (compilation included), then {per_step:.1f} s per step "
          f"(median of {sgd - 1}); 300 steps would take about {(first + 299 * per_step) / 60:.0f} min; "
          f"peak RSS {peak_gb:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
