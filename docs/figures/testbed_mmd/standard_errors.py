"""Standard errors of the paired MMD^2 of the runs that decide testbed_mmd/testbed.log's comparisons
(the benchmark logs values only). Same draws (512, seed 0), same coin plans (4; salt 0 as searched,
salt 1 the fresh plans). Run: python docs/figures/testbed_mmd/standard_errors.py > docs/figures/testbed_mmd/standard_errors.log
"""

from mlem_jax.diffusion.testbed import Testbed

tb = Testbed(batch_size=512)
K = len(tb.levels) - 1
rows = [("top floor, DPM-Solver++(2M) 100 steps", tb.single(K, "dpm++2m", 100), 0),
        ("width 272 floor", tb.single(K - 1, "dpm++2m", 100), 0),
        ("top, DPM-Solver++(3M) 12 steps", tb.single(K, "dpm++3m", 12), 0),
        ("top, UniPC 10 steps", tb.single(K, "unipc", 10), 0),
        ("top, DPM-Solver++(2M) 10 steps", tb.single(K, "dpm++2m", 10), 0),
        ("top, Euler-Maruyama 50 steps", tb.single(K, "em", 50), 0),
        ("width 272, Euler-Maruyama 400 steps", tb.single(K - 1, "em", 400), 0)]
for levels, sampler, steps, m in (((3, 4), "dpm++2m", 16, 4), ((3, 4), "unipc", 12, 3), ((1, 3, 4), "dpm++2m", 12, 3),
                                  ((0, 3, 4), "em", 400, 10)):
    run = tb.multilevel(levels, sampler, steps, m, 4)
    name = f"widths {' + '.join(str(tb.widths[k]) for k in levels)}, {sampler} {steps} steps, top fired {m}"
    rows += [(name, run, 0), (name + " (fresh plans)", run, 1)]
for name, run, salt in rows:
    y, _ = tb.outputs(run, 4, salt=salt)
    e = tb.mmd_estimate(y)
    print(f"{name:62s} MMD^2 {e.value:10.3e} +- {e.stderr:.1e}")
