"""Which Gaussian-kernel bandwidth lets the paired MMD^2 resolve the testbed's levels.

Every level's floor (DPM-Solver++(2M), 100 steps) and four few-step runs of the top level, on
512 prior draws, against the truth, at 1, 0.5, 0.3 and 0.2 times the truth's median pairwise
distance, and with the sum of the kernels at 1 and 0.2 times; the paired U-statistic with its
jackknife standard error (`kernel_distance(..., paired=True)`). Run:
python docs/figures/testbed/mmd_bandwidth.py > docs/figures/testbed/mmd_bandwidth.log
"""

from mlem_jax.diffusion.metrics import kernel_distance
from mlem_jax.diffusion.testbed import Testbed

tb = Testbed(batch_size=512, bandwidth_scale=1.0)
outs = {f"width {tb.widths[k]} floor": tb.outputs(tb.single(k, "dpm++2m", 100))[0] for k in range(len(tb.levels))}
K = len(tb.levels) - 1
for s, n in (("dpm++2m", 8), ("dpm++2m", 12), ("unipc", 8), ("ddim", 8)):
    outs[f"top, {s}, {n} steps"] = tb.outputs(tb.single(K, s, n))[0]
for f in (1.0, 0.5, 0.3, 0.2, (1.0, 0.2)):
    b = tuple(x * tb.bandwidth for x in f) if isinstance(f, tuple) else f * tb.bandwidth
    print(f"bandwidth {f} x the median distance = {b if isinstance(b, tuple) else round(b, 2)}")
    for name, y in outs.items():
        e = kernel_distance(y, tb.truth, b, paired=True)
        print(f"   {name:22s} MMD^2 {e.value:9.2e} +- {e.stderr:.1e}  ({e.value / e.stderr:5.1f} s.e.)")
