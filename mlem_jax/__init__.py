"""mlem-jax: the Multilevel Euler-Maruyama method (arXiv 2603.24594) in JAX."""

from mlem_jax._baselines import heun, switched_drift
from mlem_jax._coins import level_coins, stratified_coins
from mlem_jax._diffrax import (
    MultilevelDrift,
    MultilevelEuler,
    check_multilevel_solver,
    multilevel_diffeqsolve,
)
from mlem_jax._probabilities import (
    FixedBudget,
    PiecewiseConstant,
    correction_costs,
    expected_cost,
    geometric_probabilities,
    injected_variance,
    optimal_probabilities,
)
from mlem_jax._progress import StepInfo
from mlem_jax._solvers import (
    MultilevelSolution,
    euler_maruyama,
    multilevel_drift,
    multilevel_euler_maruyama,
    planned_evaluations,
)
from mlem_jax._validate import BatchedLevelKeyWarning

__all__ = [
    "MultilevelDrift",
    "MultilevelEuler",
    "check_multilevel_solver",
    "multilevel_diffeqsolve",
    "FixedBudget",
    "PiecewiseConstant",
    "expected_cost",
    "MultilevelSolution",
    "StepInfo",
    "BatchedLevelKeyWarning",
    "correction_costs",
    "geometric_probabilities",
    "injected_variance",
    "optimal_probabilities",
    "euler_maruyama",
    "heun",
    "switched_drift",
    "level_coins",
    "stratified_coins",
    "multilevel_drift",
    "multilevel_euler_maruyama",
    "planned_evaluations",
]

__version__ = "0.1.0"
