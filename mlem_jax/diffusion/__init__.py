"""Diffusion models as ML-EM drift levels: SDEs, parameterisations, a Flax UNet family,
training with optax, checkpoints with orbax, and datasets.

Sampling a diffusion model is the core solver called with `reverse_drift(...)` levels;
nothing here imports the calibration or diffrax layers.
"""

from mlem_jax.diffusion.parameterization import (
    PARAMETERIZATIONS,
    reverse_diffusion,
    reverse_drift,
    score_from_output,
    target_from_noise,
)
from mlem_jax.diffusion.sde import (
    VE,
    VP,
    AbstractSDE,
    SubVP,
    karras_grid,
    quadratic_grid,
    uniform_grid,
)

__all__ = [
    "AbstractSDE",
    "PARAMETERIZATIONS",
    "SubVP",
    "VE",
    "VP",
    "karras_grid",
    "quadratic_grid",
    "reverse_diffusion",
    "reverse_drift",
    "score_from_output",
    "target_from_noise",
    "uniform_grid",
]
