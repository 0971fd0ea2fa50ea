"""Diffusion models as ML-EM drift levels: SDEs, parameterisations, a Flax UNet family,
training with optax, checkpoints with orbax, and datasets.

Sampling a diffusion model is the core solver called with `reverse_drift(...)` levels;
nothing here imports the calibration or diffrax layers.

Public surface: `__all__`. The SDEs and parameterisations are imported eagerly (they need
only jax); the names of the Flax, optax and orbax modules (the UNet, training, families,
data, metrics) are re-exported lazily, on first access, so that `import mlem_jax.diffusion`
stays light. The modules themselves (`mlem_jax.diffusion.train`, ...) remain importable;
`train` itself is `mlem_jax.diffusion.train.train` (the name is the module's).
"""

from mlem_jax.diffusion.parameterization import (
    PARAMETERIZATIONS,
    denoised_from_output,
    network_denoiser,
    network_score,
    reverse_diffusion,
    reverse_drift,
    score_from_denoiser,
    score_from_output,
    target_from_noise,
)
from mlem_jax.diffusion.samplers import SAMPLERS, ddim, dpm_solver_pp, edm_euler, edm_heun, sde_dpm_solver_pp, unipc
from mlem_jax.diffusion.sde import (
    VE,
    VP,
    AbstractSDE,
    Flow,
    SubVP,
    karras_grid,
    logsnr_grid,
    quadratic_grid,
    resolution_shift,
    shift_times,
    stretch_to_terminal,
    uniform_grid,
)

_LAZY = {
    "classifier": ("Classifier", "TrainedClassifier", "train_classifier"),
    "data": ("EMBEDDED", "load_dataset", "digits", "procedural", "batches", "prepare_local", "read_local"),
    "folder": ("load_images",),
    "family": ("Family", "save_family", "load_family", "shipped_family_path", "combine_families"),
    "images": ("to_grid", "save_png", "side_by_side", "with_caption"),
    "ladder": ("MLPDenoiser", "LadderConfig", "Ladder", "train_ladder", "load_ladder", "save_ladder", "mlp_flops"),
    "mixture": ("GaussianMixture", "fit_mixture", "fashion_mnist_mixture", "save_mixture", "load_mixture"),
    "metrics": ("Estimate", "coupled_error", "frechet_distance", "frechet_gaussian", "kernel_distance",
                "paired_frechet", "sliced_wasserstein"),
    "sampling": ("SampleResult", "SampleRangeWarning", "sample", "solver_function", "solver_levels", "outside_range"),
    "objective": ("TrainConfig", "TrainState", "dsm_loss"),
    "train": ("History", "train_family"),
    "checkpoint": ("Checkpoints", "save_checkpoint", "restore_checkpoint", "load_level"),
    "unet": ("UNet", "unet_family", "init_params", "compiled_init", "count_params", "forward_flops", "family_summary",
             "score_model", "denoiser_model", "nnx_apply"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _HOME:
        import importlib

        value = getattr(importlib.import_module(f"mlem_jax.diffusion.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mlem_jax.diffusion' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOME))


__all__ = [
    "AbstractSDE",
    "Flow",
    "resolution_shift",
    "shift_times",
    "stretch_to_terminal",
    "PARAMETERIZATIONS",
    "SubVP",
    "VE",
    "VP",
    "karras_grid",
    "logsnr_grid",
    "SAMPLERS",
    "ddim",
    "dpm_solver_pp",
    "sde_dpm_solver_pp",
    "edm_euler",
    "edm_heun",
    "unipc",
    "denoised_from_output",
    "network_denoiser",
    "network_score",
    "score_from_denoiser",
    "quadratic_grid",
    "reverse_diffusion",
    "reverse_drift",
    "score_from_output",
    "target_from_noise",
    "uniform_grid",
    *_HOME,
]
