"""Batched sampling of a trained family with any solver of the library, on one level or
with the multilevel estimator: the jit(vmap(...)) pattern
with per-sample keys and an unbatched level key, over every device of every process,
timed with compilation separated."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import euler_maruyama
from mlem_jax._errors import InputError
from mlem_jax.diffusion.parameterization import reverse_diffusion


class SampleResult(NamedTuple):
    """Samples, the evaluations of each level per sample path, and compile and run seconds."""

    images: np.ndarray  # (B, H, W, C)
    evaluations: np.ndarray  # (K,) evaluations of each level per sample path
    compile_seconds: float
    run_seconds: float
    outside_range: float = 0.0  # share of pixels beyond the data's range [-1, 1] by more than half of it


DATA_RANGE = (-1.0, 1.0)  # the pixels of every family's training data (datasets are scaled to it)
RANGE_SLACK = 0.5  # a sample pixel counts as out of range beyond [-1.5, 1.5]
WARN_SHARE = 0.01  # `sample` warns when more of the pixels than this are out of range
BROKEN = 1e6  # and refuses samples larger than this: the weights or the SDE are broken


class SampleRangeWarning(UserWarning):
    """Many sample pixels fall outside the data's range: the family looks undertrained."""


def outside_range(images) -> float:
    """The share of pixels beyond the data's range [-1, 1] by more than RANGE_SLACK."""
    lo, hi = DATA_RANGE
    x = np.asarray(images)
    return float(np.mean((x < lo - RANGE_SLACK) | (x > hi + RANGE_SLACK)))


def range_message(images, share: float) -> str:
    """One line saying how far the samples fall outside the data's range, and what it means."""
    return (f"{100 * share:.1f}% of the sample pixels fall outside the data's range [-1, 1] (up to "
            f"{float(np.max(np.abs(images))):.3g}): the family looks undertrained (a usable 16x16 family takes about "
            "2000 steps per level, 45 min for four levels on 2 CPU cores; see its held-out loss), or the grid has "
            "too few steps for it.")


SOLVERS = ("em", "heun", "ddim", "dpm++2m", "dpm++3m", "sde-dpm++2m", "edm-euler", "edm-heun", "unipc")
"""What `sample(..., solver=)` and `mlem-jax sample --solver` take: EM and Heun on the
family's drifts (EM on the reverse SDE, or on the probability-flow ODE with
`probability_flow=True`; Heun always on the ODE), the others on its denoisers."""


def solver_function(sde, solver: str, ts, *, probability_flow: bool = False, progress: bool = False):
    """`solve(model, y0, key)` for a solver of `SOLVERS` on the grid `ts`: EM on the reverse
    SDE of `sde` (or its probability-flow ODE), Heun on the ODE, or a diffusion sampler;
    `model` is a drift (em, heun), a denoiser (the others) or a `Multilevel` of them. The
    form `sample` runs and `mlem_jax.calibrate` takes as `solver=`.

    Args:
      sde: the family's SDE.
      solver: a name of `SOLVERS`.
      ts: the time grid.
      probability_flow: EM on the probability-flow ODE instead of the reverse SDE.
      progress: a bar over the steps.
    """
    from mlem_jax import heun
    from mlem_jax.diffusion.samplers import SAMPLERS

    if solver not in SOLVERS:
        raise InputError(f"solver: expected one of {SOLVERS}, got {solver!r}.")
    g = None if (probability_flow or solver == "heun") else reverse_diffusion(sde)

    def solve(model, y0, key, args=None):
        if solver == "em":
            return euler_maruyama(model, g, y0, ts, key, args, progress=progress)
        if solver == "heun":
            return heun(model, None, y0, ts, key, args, progress=progress)
        return SAMPLERS[solver](model, sde, y0, ts, key, args, progress=progress)

    return solve


def solver_levels(family, levels, solver: str, probability_flow: bool = False, guidance=0.0) -> tuple:
    """The models `solver` takes from `family` for the level indices `levels`: its denoisers
    for the diffusion samplers, its drifts (of the reverse SDE, or of the probability-flow
    ODE for Heun and with `probability_flow`) for em and heun; each guided with weight
    `guidance` (`guidance.guided`) when it is not 0.

    Args:
      family: the `Family`.
      levels: level indices, cheapest first.
      solver: a name of `SOLVERS`.
      probability_flow: the probability-flow ODE's drifts (EM).
      guidance: classifier-free guidance weight w, or a function w(t).
    """
    from mlem_jax.diffusion.guidance import guided
    from mlem_jax.diffusion.samplers import SAMPLERS

    if solver in SAMPLERS:
        chosen = tuple(family.denoisers()[i] for i in levels)
    else:
        chosen = tuple(family.drifts(probability_flow or solver == "heun")[i] for i in levels)
    return tuple(guided(f, guidance) for f in chosen)


def check_levels(family, levels) -> list:
    """`levels` as a list of level indices into `family`, refused unless they are distinct,
    in range and cheapest first (increasing): the multilevel estimator's corrections telescope
    from the first to the last, so an unsorted list would sample the wrong level."""
    K = len(family.models)
    try:
        idx = [int(k) for k in levels]
    except (TypeError, ValueError):
        raise TypeError(f"levels: expected a sequence of level indices (0..{K - 1}), got {levels!r}.") from None
    if not idx or any(not 0 <= k < K for k in idx):
        raise InputError(f"levels: expected indices in 0..{K - 1} (the family has {K} levels), got {idx}.")
    if idx != sorted(set(idx)):
        raise InputError(f"levels: expected distinct indices from cheapest to dearest (increasing), got {idx}; "
                         f"write levels={sorted(set(idx))}.")
    return idx


def check_labels(family, labels, guidance, batch_size: int):
    """The per-sample labels (batch_size,) int32 (or None), after refusing labels or guidance an
    unconditional family cannot take, labels outside its classes, and guidance without labels."""
    from mlem_jax.diffusion.guidance import NULL_LABEL

    classes = family.num_classes
    weighted = callable(guidance) or float(guidance) != 0.0
    if not classes and (labels is not None or weighted):
        name = "labels" if labels is not None else "guidance"
        raise InputError(f"{name}: this family is unconditional (its levels take no class); sample without "
                         "labels and guidance, or train a conditional family (mlem-jax train --conditional).")
    if labels is None:
        if weighted:
            raise InputError("guidance: guides towards a class; give labels (mlem-jax sample --class C).")
        return None
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer) or labels.ndim > 1:
        raise InputError(f"labels: expected integer class labels, one or one per sample, got {labels.dtype} "
                         f"of shape {labels.shape}.")
    labels = np.broadcast_to(labels, (batch_size,)) if labels.ndim == 0 or labels.size == 1 else labels
    if labels.shape != (batch_size,):
        raise InputError(f"labels: expected one label or {batch_size} (one per sample), got {labels.size}.")
    bad = labels[(labels < NULL_LABEL) | (labels >= classes)]
    if bad.size:
        raise InputError(f"labels: the family has {classes} classes, labels 0..{classes - 1} (or {NULL_LABEL}: no "
                         f"class); got {int(bad[0])}.")
    return jnp.asarray(labels, jnp.int32)


def sample(family, levels, ts, seed: int, batch_size: int, probs=None, coupling="independent",
           probability_flow: bool = False, progress: bool = False, coins: str = "iid", solver: str = "em",
           control: str | None = None, labels=None, guidance=0.0, coin_plans: int = 1) -> SampleResult:
    """`solver` on the last of `levels` when `probs` is None, else the same solver with the
    multilevel estimator (`Multilevel`) over `levels` (indices into the family, cheapest
    first). Sample i uses key fold_in(key(seed), i) for its prior draw and noise, so the
    single-level and multilevel runs with the same seed share noise, and the level coins
    come from one unbatched key. One program over every device of every process
    (`mlem_jax.parallel.sharded_sampler`): in a multi-process run each process samples
    the rows of its own devices and every process gets the whole batch back, the same
    samples as on one device.

    A conditional family takes `labels` (one int, or one per sample; -1: no class) as the
    levels' `args`, and `guidance` (a weight w or a function w(t)) guides every level
    (`guidance.guided`: each call then runs the network twice).

    `coin_plans` splits the batch into that many consecutive chunks, run one after another,
    each with its own level key (chunk c: fold_in(level key, c); chunk 0's is the key of
    `coin_plans=1`): within a chunk the samples share one plan of level coins, which is what
    lets a level that does not fire be skipped for the whole chunk, and across chunks the
    plans are independent, so that a statistic of the batch (a FID) averages over several
    coin plans instead of resting on one. Sample i keeps its prior draw and noise whatever
    the split; `evaluations` is then the mean over the plans.

    Args:
      family: the `Family`.
      levels: level indices into the family, cheapest first.
      ts: the time grid.
      seed: sample i uses fold_in(key(seed), i).
      batch_size: samples.
      probs: the multilevel probabilities (None: the last level alone).
      coupling: "independent" or "nested".
      probability_flow: EM and Heun on the probability-flow ODE instead of the reverse SDE.
      progress: a bar over the steps.
      coins: "iid" or "stratified".
      solver: a name of `SOLVERS`.
      control: None, "cached" or "extrapolated".
      labels: class labels of a conditional family (one, or one per sample; -1 none).
      guidance: classifier-free guidance weight w, or a function w(t).
      coin_plans: chunks of the batch, each with its own coin plan.
    """
    from mlem_jax import Multilevel
    from mlem_jax.diffusion.samplers import CALLS_PER_STEP

    labels = check_labels(family, labels, guidance, batch_size)
    levels = check_levels(family, levels)
    if isinstance(coin_plans, bool) or not isinstance(coin_plans, (int, np.integer)) or coin_plans < 1:
        raise InputError(f"coin_plans: expected a positive integer, got {coin_plans!r}.")
    if batch_size % coin_plans:
        raise InputError(f"coin_plans: {coin_plans} does not divide batch_size={batch_size}; every plan serves an "
                         f"equal chunk (try coin_plans={math.gcd(batch_size, coin_plans)}).")
    run = solver_function(family.sde, solver, ts, probability_flow=probability_flow, progress=progress)
    chosen = solver_levels(family, levels, solver, probability_flow, guidance)
    sde = family.sde
    base = jax.random.key(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch_size))
    level_key = jax.random.fold_in(jax.random.key(seed + 1_000_003), 0)
    shape = tuple(family.image_shape)

    def one(key, lk, label=None):
        y0 = sde.prior_sample(jax.random.fold_in(key, 7), shape)
        if probs is None:
            y = run(chosen[-1], y0, key, label)
            return y, jnp.zeros(len(chosen), jnp.int32).at[-1].set(CALLS_PER_STEP[solver] * (ts.shape[0] - 1))
        ml = Multilevel(chosen, probs, coins=coins, coupling=coupling, level_key=lk, control=control)
        sol = run(ml, y0, key, label)
        return sol.y, sol.evaluations

    from mlem_jax.parallel._mesh import sharded_sampler

    size = batch_size // coin_plans
    chunks = [(keys[c * size:(c + 1) * size], jax.random.fold_in(level_key, c) if c else level_key)
              + (() if labels is None else (labels[c * size:(c + 1) * size],)) for c in range(coin_plans)]
    outs, t_compile, t_run = sharded_sampler(one).timed_chunks(chunks)
    images = np.concatenate([np.asarray(o[0]) for o in outs])
    evals = np.mean([np.asarray(o[1][0], float) for o in outs], axis=0) if coin_plans > 1 else np.asarray(outs[0][1][0])
    bad = ~np.isfinite(images.reshape(images.shape[0], -1)).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"sample: {int(bad.sum())} of {images.shape[0]} samples are not finite (NaN or inf), first at index "
            f"{int(np.argmax(bad))}; nothing was written. A family with damaged weights is refused by load_family, "
            "so look at the grid (too few steps for these probabilities?) or the level probabilities.")
    if np.max(np.abs(images)) > BROKEN:
        raise FloatingPointError(
            f"sample: the samples reach |x| = {float(np.max(np.abs(images))):.3g}, far beyond the data's range "
            "[-1, 1]; nothing was written. The family's weights or its SDE are broken (beta_max?).")
    share = outside_range(images)
    if share > WARN_SHARE:
        import warnings

        warnings.warn(range_message(images, share), SampleRangeWarning, stacklevel=2)
    return SampleResult(images, evals, t_compile, t_run, share)
