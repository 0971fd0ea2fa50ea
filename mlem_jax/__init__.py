"""mlem-jax: the Multilevel Euler-Maruyama method (arXiv 2603.24594) in JAX."""

from mlem_jax._progress import StepInfo
from mlem_jax._solvers import (
    MultilevelSolution,
    euler_maruyama,
    level_coins,
    multilevel_drift,
    multilevel_euler_maruyama,
)

__all__ = [
    "MultilevelSolution",
    "StepInfo",
    "euler_maruyama",
    "level_coins",
    "multilevel_drift",
    "multilevel_euler_maruyama",
]

__version__ = "0.1.0"
