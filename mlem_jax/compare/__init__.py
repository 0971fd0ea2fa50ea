"""Comparisons that decide whether multilevel sampling pays, built on `mlem_jax.calibrate`
and `mlem_jax.diffusion` (nothing below imports this package):

- the coupled path (`_coupled`): shared prior draws and Brownian increments, so that every
  run of one comparison sees the same noise, and the EM / ML-EM samplers on it;
- the cheapest stratified ML-EM configuration at EM's coupled error (`_em_search`:
  `search_configuration`, what `mlem-jax calibrate --match-em` writes);
- the best single-network sampler against the best multilevel one at equal error
  (`_best_samplers`: `compare_best_samplers`, what `mlem-jax demo --family` runs). Its
  `Comparison` (two `Run`s and what was tried) is the one comparison result type;
- the held-out diagnostics and verdict of `mlem-jax advise` (`_advise`);
- the law fitted on short pilots and the gain it predicts, with an interval (`_law`).
"""

from mlem_jax.compare._advise import Advice, family_diagnostics, held_out_images, plot_advice, verdict
from mlem_jax.compare._best_samplers import (
    SAMPLER_NAMES,
    Comparison,
    Run,
    compare_best_samplers,
    level_seconds,
    planned_runs,
)
from mlem_jax.compare._coupled import SharedNoise, em_sampler, increments_on, mlem_sampler, shared_noise
from mlem_jax.compare._em_search import (
    LADDER,
    Config,
    Search,
    search_configuration,
)
from mlem_jax.compare._law import (
    Choice,
    Law,
    MetricLaw,
    Pilots,
    Prediction,
    cheapest,
    coin_noise,
    family_pilots,
    fit_law,
    format_prediction,
    law_error,
    law_standard_errors,
    law_variants,
    merge_pilots,
    metric_law,
    predict,
    predict_settled,
    run_pilots,
)

__all__ = ["Advice", "family_diagnostics", "held_out_images", "plot_advice", "verdict", "SAMPLER_NAMES",
           "Comparison", "Run", "compare_best_samplers", "level_seconds", "planned_runs", "SharedNoise",
           "em_sampler", "increments_on", "mlem_sampler", "shared_noise", "LADDER", "Config",
           "Search", "search_configuration", "Choice", "Law", "MetricLaw", "metric_law",
           "Pilots", "Prediction", "cheapest", "coin_noise", "family_pilots", "fit_law", "format_prediction",
           "law_error", "law_standard_errors", "law_variants", "merge_pilots", "predict", "predict_settled",
           "run_pilots"]
