"""Calibration: measure what ML-EM's probabilities depend on, then choose them.

1. `level_costs`: wall time (median of jitted calls on this device) and XLA FLOPs of
   one evaluation of each level.
2. `level_statistics`: at the model calls of a solver (EM by default, or any sampler of
   the library: `solver_calls` finds them and the weight of each) driven by the finest
   level, per level k and time bin, V_k(t) = E|f^k - f^{k-1}|^2, the mean correction, its
   kurtosis, an MLMC-style consistency check, the error of each level against the
   finest, and for the cached control variate the residuals against the cache by gap.
3. `calibrated_probabilities`: the optimal allocation of `optimal_probabilities`, constant
   or piecewise constant in time, for a target injected variance or a budget (iid coins);
   `stratified_probabilities`: for stratified coins, whose error the iid variance formula
   does not describe, a one-parameter family of schedules scaled on pilot runs.
4. `fit_gamma`: error ~ cost^(-power/gamma) (+ an optional floor), with a confidence
   interval.
5. `calibration_report`: all of the above in the layout of the MLMC test report
   (Giles' mlmc_test), plus a plot of V_k(t) and p_k(t).
6. `learn_probabilities`: the paper's SGD on p_k(t) with score-function gradients.
7. `level_diagnostics`: before any sampling, from held-out predictions: each level's loss,
   the spread of each pair against its loss gap (nested errors or added noise), gamma with
   an irreducible loss, and the levels worth keeping.

The implementation lives in private modules of this package, one concept each
(`_allocation`, `_costs`, `_probes`, `_statistics`, `_closed_form`, `_stratified`, `_gamma`,
`_report`, `_file`, `_learning`, `_diagnostics`), and is re-exported here; `__all__` is
the public surface. It imports only the core (docs/architecture.md).
"""

from mlem_jax._flops import flops_of
from mlem_jax.calibrate._allocation import correction_costs, expected_cost, injected_variance, optimal_probabilities
from mlem_jax.calibrate._closed_form import calibrated_probabilities, check_bins
from mlem_jax.calibrate._costs import LevelCosts, check_cost_order, level_costs
from mlem_jax.calibrate._diagnostics import (
    LevelDiagnostics,
    Measured,
    PairDiagnostic,
    format_diagnostics,
    level_diagnostics,
)
from mlem_jax.calibrate._file import Calibration, check_calibration_use, load_calibration, save_calibration
from mlem_jax.calibrate._gamma import GammaFit, fit_gamma
from mlem_jax.calibrate._learning import (
    LearnedProbabilities,
    LearningHistory,
    NotConvergedWarning,
    coupled_error_gradient,
    learn_probabilities,
    scaled_to_budget,
    unsettled,
)
from mlem_jax.calibrate._report import CalibrationReport, calibration_report, format_report, plot_report
from mlem_jax.calibrate._statistics import (
    LevelStatistics,
    cached_variances,
    level_statistics,
    solver_calls,
    solver_sensitivities,
)
from mlem_jax.calibrate._stratified import (
    StratifiedCalibration,
    stratified_probabilities,
    stratified_schedule,
    stratified_shape,
)

__all__ = [
    "correction_costs",
    "expected_cost",
    "injected_variance",
    "optimal_probabilities",
    "cached_variances",
    "calibrated_probabilities",
    "Calibration",
    "calibration_report",
    "CalibrationReport",
    "check_bins",
    "check_calibration_use",
    "check_cost_order",
    "coupled_error_gradient",
    "fit_gamma",
    "flops_of",
    "format_diagnostics",
    "level_diagnostics",
    "LevelDiagnostics",
    "Measured",
    "PairDiagnostic",
    "format_report",
    "GammaFit",
    "learn_probabilities",
    "LearnedProbabilities",
    "LearningHistory",
    "NotConvergedWarning",
    "level_costs",
    "level_statistics",
    "LevelCosts",
    "LevelStatistics",
    "unsettled",
    "load_calibration",
    "plot_report",
    "save_calibration",
    "scaled_to_budget",
    "solver_calls",
    "solver_sensitivities",
    "stratified_probabilities",
    "stratified_schedule",
    "stratified_shape",
    "StratifiedCalibration",
]
