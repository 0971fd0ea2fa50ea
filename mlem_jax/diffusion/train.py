"""The training loop: a level (`train`) or a family (`train_family`), with held-out losses,
progress, and resumable checkpoints.

What is minimised and one step of it are in `objective` (the DSM loss, the optimiser, the
EMA); the orbax I/O is in `checkpoint`. The data order and the noise are functions of the
step, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax.diffusion.checkpoint import Checkpoints, all_steps, check_resume, model_config, sde_config
from mlem_jax.diffusion.data import batches
from mlem_jax.diffusion.objective import (
    TIME_SAMPLINGS,
    TrainConfig,
    TrainState,
    evaluate,
    init_state,
    make_train_step,
)
from mlem_jax.diffusion.parameterization import PARAMETERIZATIONS
from mlem_jax.diffusion.sde import VP
from mlem_jax.diffusion.unet import UNet


class History(NamedTuple):
    """Training losses (step, loss), held-out losses (step, loss) and wall time of a level."""

    train: list  # (step, loss)
    test: list  # (step, held-out loss)
    seconds: float = 0.0  # training wall time of this level, earlier sessions of a resumed run included


def train(
    model: UNet,
    train_images: np.ndarray,
    config: TrainConfig = TrainConfig(),
    sde=VP(),
    test_images: np.ndarray | None = None,
    checkpoint_dir: str | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    desc: str | None = None,
    mesh=None,
    overwrite: bool = False,
    train_labels: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> tuple[TrainState, History]:
    """Train `model` by denoising score matching; returns the final state and losses.

    With `mesh` (for example `mlem_jax.parallel.batch_mesh()`), data parallel: the state is
    replicated and every batch split over the mesh's devices, which may belong to several
    processes (after `initialize_distributed`): every process runs this same call, feeds
    only its own devices' rows of the batch, and XLA's collectives average the gradients.
    Only process 0 shows progress; checkpoints are written once, through orbax.

    With `checkpoint_dir`, a checkpoint is written every `config.checkpoint_every` steps
    and at the end, in the background (one orbax manager for the run, `Checkpoints`; the
    save in flight is finished before `train` returns or raises, Ctrl-C included).
    `resume=True` continues from the newest checkpoint that restores (the data order and
    the noise are functions of the step, so a resumed run equals an uninterrupted one) and
    refuses another recipe. A directory that already holds checkpoints is never restarted
    silently: pass `resume=True` or `overwrite=True`.

    A conditional model (`UNet(num_classes=C)`) takes `train_labels` (and `test_labels` with
    `test_images`), integers in [0, C); `config.label_dropout` of them are replaced by the null class.
    """
    train_images = np.asarray(train_images, np.float32)
    image_shape = _check_training(model, train_images, config, resume, overwrite)
    train_labels = _checked_labels(model, train_images, train_labels, "train_labels")
    if test_images is not None:
        test_labels = _checked_labels(model, np.asarray(test_images), test_labels, "test_labels")
    meta = {"model": model_config(model), "image_shape": list(image_shape), "sde": sde_config(sde),
            "parameterization": config.parameterization, "config": config._asdict()}
    evaluate_ema = None if test_images is None else (
        lambda s: evaluate(s.ema_params, model, sde, test_images, config, labels=test_labels))
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        ckpt = None
        if checkpoint_dir is not None:
            _clear_for_a_new_run(checkpoint_dir, resume, overwrite)
            ckpt = stack.enter_context(Checkpoints(checkpoint_dir, every=config.checkpoint_every))
        state, earlier = _starting_state(ckpt, model, image_shape, config, resume, mesh)
        start = int(state.step)
        if start > config.steps:
            raise InputError(f"steps: {checkpoint_dir!r} is already at step {start}, past the {config.steps} "
                             "asked for.")
        elapsed = lambda: earlier + time.perf_counter() - t_start
        save = None if ckpt is None else (
            lambda s, last: ckpt.save(s, {**meta, "train_seconds": elapsed()}, force=last))
        bar = _progress_bar(progress, config.steps, start, desc or f"train nf={model.nf}")
        with contextlib.closing(bar) if bar is not None else contextlib.nullcontext():
            data = (train_images if train_labels is None else (train_images, train_labels))
            state, history = _steps(make_train_step(model, sde, config), state, data, config, mesh, start,
                                    evaluate_ema, save, on_step, bar)
    if start == config.steps and evaluate_ema is not None:  # nothing left to train: the held-out loss anyway
        history.test.append((start, evaluate_ema(state)))
    return state, history._replace(seconds=elapsed())


def _steps(step_fn, state, data, config: TrainConfig, mesh, start: int, evaluate_ema, save, on_step, bar):
    """The loop from `start` to `config.steps`: a step, the held-out loss every `eval_every`, a checkpoint
    (when `save`) and the bar. Losses stay on the device; the host waits for one only to show it (every
    `BAR_EVERY` steps), to give it to `on_step`, or at the end."""
    n = data[0].shape[0] if isinstance(data, tuple) else data.shape[0]
    state, put = _data_parallel(state, mesh, min(config.batch_size, n))
    batch_iter = batches(data, min(config.batch_size, n), jax.random.key(config.seed + 1))
    for _ in range(start):  # the batches already consumed before an interruption
        next(batch_iter)
    losses, test = [], []
    for s in range(start, config.steps):
        state, loss = step_fn(state, put(next(batch_iter)))
        losses.append(loss)
        last = s + 1 == config.steps
        if on_step is not None:
            on_step(s + 1, float(loss))
        if evaluate_ema is not None and ((s + 1) % config.eval_every == 0 or last):
            test.append((s + 1, evaluate_ema(state)))
        if save is not None:
            save(state, last)
        if bar is not None:
            if (s + 1) % BAR_EVERY == 0 or last:
                post = {"loss": f"{float(loss):.4f}"}
                if test:
                    post["held-out"] = f"{test[-1][1]:.4f}"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
    values = np.asarray(jnp.stack(losses), np.float64) if losses else np.zeros(0)
    return state, History([(start + i + 1, float(v)) for i, v in enumerate(values)], test)


BAR_EVERY = 25  # steps between the loss shown on the bar (each one makes the host wait for the device)


def _progress_bar(progress: bool, total: int, initial: int, desc: str):
    if not progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False)


def _checked_labels(model, images, labels, name: str):
    """The labels as int32 (None for an unconditional model), after refusing labels a model cannot take."""
    if not model.num_classes:
        if labels is not None:
            raise InputError(f"{name}: this UNet is unconditional (num_classes=0); give no labels, or a "
                             "UNet(num_classes=...) to train a conditional family.")
        return None
    if labels is None:
        raise InputError(f"{name}: a conditional UNet (num_classes={model.num_classes}) trains on class labels; "
                         "pass them (mlem-jax train --conditional reads the dataset's labels).")
    labels = np.asarray(labels)
    if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{name}: expected {images.shape[0]} integer labels, one per image, got "
                         f"{labels.dtype} of shape {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= model.num_classes):
        raise InputError(f"{name}: expected labels in [0, {model.num_classes}), got [{labels.min()}, "
                         f"{labels.max()}].")
    return labels.astype(np.int32)


def _check_training(model, train_images, config: TrainConfig, resume: bool, overwrite: bool) -> tuple:
    """The image shape, after refusing a bad recipe, images the model cannot take or a batch beyond the data."""
    if config.parameterization not in PARAMETERIZATIONS:
        raise InputError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {config.parameterization!r}.")
    if config.time_sampling not in TIME_SAMPLINGS:
        raise InputError(f"time_sampling: expected one of {TIME_SAMPLINGS}, got {config.time_sampling!r}.")
    if config.steps < 1:
        raise InputError(f"steps: expected a positive number of training steps, got {config.steps}.")
    if not 0.0 <= config.label_dropout < 1.0:
        raise InputError(f"label_dropout: expected a share in [0, 1), got {config.label_dropout}.")
    image_shape = tuple(train_images.shape[1:])
    model.check_input((1, *image_shape))
    if config.batch_size > train_images.shape[0]:
        raise InputError(f"batch_size: {config.batch_size} is larger than the {train_images.shape[0]} training "
                         "images; use at most that many.")
    if resume and overwrite:
        raise InputError("resume, overwrite: give at most one (continue the run, or start it again).")
    return image_shape


def _clear_for_a_new_run(checkpoint_dir: str, resume: bool, overwrite: bool) -> None:
    """Checkpoints already in `checkpoint_dir` are never restarted silently: without `resume`, refuse them,
    or delete them with `overwrite`.

    With several processes, process 0's listing decides for all: the branches differ in their barriers, and a
    slower process could otherwise list the folder after process 0 has created or cleared it, take the other
    branch and wait forever at a barrier that process 0 never reaches (measured: 2 of 6 two-process runs hung
    on a loaded 2-core machine)."""
    import shutil

    from jax.experimental import multihost_utils

    existing = all_steps(checkpoint_dir)
    held = bool(existing)
    if jax.process_count() > 1:
        held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
    if not held or resume:
        return
    if not overwrite:
        raise FileExistsError(
            f"checkpoint_dir: {checkpoint_dir!r} already holds checkpoints (steps {existing or 'seen by process 0'}); "
            "pass resume=True (--resume) to continue them, overwrite=True (--overwrite) to start again from step 0, "
            "or use another directory.")
    if jax.process_index() == 0:
        shutil.rmtree(checkpoint_dir)
    if jax.process_count() > 1:  # the others wait until process 0 has removed it
        multihost_utils.sync_global_devices("mlem_jax overwrite " + os.path.abspath(checkpoint_dir))


def _starting_state(ckpt, model, image_shape, config: TrainConfig, resume: bool, mesh):
    """(state, training seconds of earlier sessions): the newest intact checkpoint with `resume`, else step 0."""
    if resume and ckpt is not None and ckpt.steps():
        state, saved = ckpt.restore_latest_intact(model, image_shape, config, mesh=mesh, set_aside=True)
        check_resume(saved, config, ckpt.directory)
        return state, float(saved.get("train_seconds", 0.0))
    return init_state(model, image_shape, config), 0.0


def _data_parallel(state, mesh, batch: int):
    """(state, put): without a mesh, as they are; with one, the state replicated over it and `put` splitting
    each batch over its devices."""
    if mesh is None:
        return state, lambda x: x
    from mlem_jax.parallel._mesh import batch_sharding, replicated, to_global

    if batch % mesh.devices.size:
        raise InputError(
            f"batch_size: {batch} does not split over the {mesh.devices.size} devices of the mesh; "
            "use a multiple of the device count."
        )
    return to_global(state, replicated(mesh)), lambda x: to_global(x, batch_sharding(mesh))


def train_family(
    family: Sequence[UNet],
    train_images: np.ndarray,
    config: TrainConfig = TrainConfig(),
    sde=VP(),
    test_images: np.ndarray | None = None,
    checkpoint_root: str | None = None,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    mesh=None,
    parallel: bool = False,
    train_labels: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> list[tuple[TrainState, History]]:
    """Train every level on the same data with the same recipe and seed; level k
    checkpoints to checkpoint_root/nf{nf}.

    By default the levels train one after another, each data parallel over `mesh` when it
    is given. With `parallel=True` (one process) they train at the same time: the local
    devices are split into min(K, devices) groups, level k trains on group k mod groups
    (data parallel within it), each group in its own thread. Every level's result is the
    same as when trained alone on its group.

    Args:
      family: the UNets, cheapest first.
      train_images: (N, H, W, C) in [-1, 1].
      config: the `TrainConfig` every level shares.
      sde: the schedule (`VP()`, or `Flow()` with parameterization "flow").
      test_images: held-out images for the held-out loss.
      checkpoint_root: level k checkpoints to checkpoint_root/nf{nf} (None: no checkpoints).
      resume: continue from the newest intact checkpoints.
      progress: a bar per level.
      overwrite: delete the checkpoints there and start again.
      mesh: data parallel over this mesh.
      parallel: train the levels side by side on groups of local devices.
      train_labels: class labels of a conditional family.
      test_labels: labels of `test_images`.
    """
    def one(i, model, level_mesh):
        ckpt = None if checkpoint_root is None else os.path.join(checkpoint_root, f"nf{model.nf}")
        return train(model, train_images, config, sde, test_images, ckpt, resume, progress,
                     desc=f"level {i + 1}/{len(family)} nf={model.nf}", overwrite=overwrite, mesh=level_mesh,
                     train_labels=train_labels, test_labels=test_labels)

    if not parallel:
        return [one(i, m, mesh) for i, m in enumerate(family)]
    if mesh is not None or jax.process_count() > 1:
        raise InputError("parallel: trains the levels on groups of this process's devices; give no mesh, and run "
                         "one process (a multi-process run trains the levels one after another over the global mesh).")
    from concurrent.futures import ThreadPoolExecutor

    from mlem_jax.parallel._mesh import batch_mesh

    devices = np.array(jax.local_devices())
    groups = [batch_mesh(g) for g in np.array_split(devices, min(len(family), len(devices)))]
    results: list = [None] * len(family)

    def run_group(g):
        for i in range(g, len(family), len(groups)):
            results[i] = one(i, family[i], groups[g])

    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        for f in [pool.submit(run_group, g) for g in range(len(groups))]:
            f.result()
    return results
