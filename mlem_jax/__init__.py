"""mlem-jax: the Multilevel Euler-Maruyama method (arXiv 2603.24594) in JAX."""

from mlem_jax._baselines import heun, switched_drift
from mlem_jax._coins import level_coins, stratified_coins
from mlem_jax._diffrax import (
    MultilevelDrift,
    MultilevelEuler,
    check_multilevel_solver,
    multilevel_diffeqsolve,
)
from mlem_jax._errors import InputError
from mlem_jax._multilevel import BiasedEstimatorWarning, Multilevel
from mlem_jax._progress import StepInfo
from mlem_jax._schedules import FixedFirings, PiecewiseConstant, geometric_probabilities, schedule_values
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
    "FixedFirings",
    "PiecewiseConstant",
    "Multilevel",
    "MultilevelSolution",
    "BiasedEstimatorWarning",
    "StepInfo",
    "BatchedLevelKeyWarning",
    "InputError",
    "geometric_probabilities",
    "schedule_values",
    "euler_maruyama",
    "heun",
    "switched_drift",
    "level_coins",
    "stratified_coins",
    "multilevel_drift",
    "multilevel_euler_maruyama",
    "planned_evaluations",
]

try:  # the one version string is pyproject.toml's
    from importlib.metadata import PackageNotFoundError as _NotInstalled
    from importlib.metadata import version as _version

    __version__ = _version("mlem-jax")
except _NotInstalled:  # a source tree on sys.path without an install
    __version__ = "0+unknown"
