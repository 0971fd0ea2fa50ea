"""Diffusion models as ML-EM drift levels: SDEs, parameterisations, a Flax UNet family,
training with optax, checkpoints with orbax, and datasets.

Sampling a diffusion model is the core solver called with `reverse_drift(...)` levels;
nothing here imports the calibration or diffrax layers.

Public surface: `__all__`, re-exported from the modules below (the one way this package
exports). `import mlem_jax.diffusion` loads flax and optax; orbax, tensorflow-datasets and
matplotlib load on first use. `train` itself is `mlem_jax.diffusion.train.train` (the name
is the module's).
"""

from mlem_jax.diffusion.checkpoint import (
    Checkpoints,
    load_level,
    restore_checkpoint,
    save_checkpoint,
)
from mlem_jax.diffusion.classifier import (
    Classifier,
    TrainedClassifier,
    train_classifier,
)
from mlem_jax.diffusion.data import (
    EMBEDDED,
    batches,
    digits,
    load_dataset,
    prepare_local,
    procedural,
    read_local,
)
from mlem_jax.diffusion.family import (
    Family,
    combine_families,
    load_family,
    save_family,
    shipped_family_path,
)
from mlem_jax.diffusion.folder import (
    load_images,
)
from mlem_jax.diffusion.images import (
    save_png,
    side_by_side,
    to_grid,
    with_caption,
)
from mlem_jax.diffusion.ladder import (
    Ladder,
    LadderConfig,
    MLPDenoiser,
    load_ladder,
    mlp_flops,
    save_ladder,
    train_ladder,
)
from mlem_jax.diffusion.metrics import (
    Estimate,
    coupled_error,
    frechet_distance,
    frechet_gaussian,
    kernel_distance,
    paired_frechet,
    sliced_wasserstein,
)
from mlem_jax.diffusion.mixture import (
    GaussianMixture,
    fashion_mnist_mixture,
    fit_mixture,
    load_mixture,
    save_mixture,
)
from mlem_jax.diffusion.objective import (
    TrainConfig,
    TrainState,
    dsm_loss,
)
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
from mlem_jax.diffusion.sampling import (
    SampleRangeWarning,
    SampleResult,
    outside_range,
    sample,
    solver_function,
    solver_levels,
)
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
from mlem_jax.diffusion.train import (
    History,
    train_family,
)
from mlem_jax.diffusion.unet import (
    UNet,
    compiled_init,
    count_params,
    denoiser_model,
    family_summary,
    forward_flops,
    init_params,
    nnx_apply,
    score_model,
    unet_family,
)

__all__ = [
    "AbstractSDE",
    "batches",
    "Checkpoints",
    "Classifier",
    "combine_families",
    "compiled_init",
    "count_params",
    "coupled_error",
    "ddim",
    "denoised_from_output",
    "denoiser_model",
    "digits",
    "dpm_solver_pp",
    "dsm_loss",
    "edm_euler",
    "edm_heun",
    "EMBEDDED",
    "Estimate",
    "Family",
    "family_summary",
    "fashion_mnist_mixture",
    "fit_mixture",
    "Flow",
    "forward_flops",
    "frechet_distance",
    "frechet_gaussian",
    "GaussianMixture",
    "History",
    "init_params",
    "karras_grid",
    "kernel_distance",
    "Ladder",
    "LadderConfig",
    "load_dataset",
    "load_family",
    "load_images",
    "load_ladder",
    "load_level",
    "load_mixture",
    "logsnr_grid",
    "mlp_flops",
    "MLPDenoiser",
    "network_denoiser",
    "network_score",
    "nnx_apply",
    "outside_range",
    "paired_frechet",
    "PARAMETERIZATIONS",
    "prepare_local",
    "procedural",
    "quadratic_grid",
    "read_local",
    "resolution_shift",
    "restore_checkpoint",
    "reverse_diffusion",
    "reverse_drift",
    "sample",
    "SampleRangeWarning",
    "SampleResult",
    "SAMPLERS",
    "save_checkpoint",
    "save_family",
    "save_ladder",
    "save_mixture",
    "save_png",
    "score_from_denoiser",
    "score_from_output",
    "score_model",
    "sde_dpm_solver_pp",
    "shift_times",
    "shipped_family_path",
    "side_by_side",
    "sliced_wasserstein",
    "solver_function",
    "solver_levels",
    "stretch_to_terminal",
    "SubVP",
    "target_from_noise",
    "to_grid",
    "train_classifier",
    "train_family",
    "train_ladder",
    "TrainConfig",
    "TrainedClassifier",
    "TrainState",
    "UNet",
    "unet_family",
    "uniform_grid",
    "unipc",
    "VE",
    "VP",
    "with_caption",
]
