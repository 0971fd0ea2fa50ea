"""Denoising score matching with optax, EMA parameters, progress bars, and resumable
orbax checkpoints.

The loss at a batch x_0: t ~ U(t_min, 1), eps ~ N(0, I), x_t = alpha(t) x_0 + std(t) eps,
and the mean squared error between the network output at (x_t, t) and the target of its
parameterisation (eps, the score, x_0 or v; `target_from_noise`). Optimiser: gradient
clipping, then Adam with a linear warm-up. The EMA of the parameters is what samples.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlem_jax._errors import InputError
from mlem_jax.diffusion.data import batches
from mlem_jax.diffusion.parameterization import PARAMETERIZATIONS, target_from_noise
from mlem_jax.diffusion.sde import VE, VP, Flow, SubVP
from mlem_jax.diffusion.unet import UNet, init_params


class TrainConfig(NamedTuple):
    """The training recipe of a level: steps, batch, learning rate and warm-up, clipping,
    EMA, seed, cadence."""

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    eval_every: int = 250
    checkpoint_every: int = 500
    seed: int = 0
    parameterization: str = "eps"
    t_min: float = 1e-3
    label_dropout: float = 0.0  # conditional models: the share of labels replaced by the null class -1 (for CFG)
    time_sampling: str = "uniform"  # or "logit-normal": t = sigmoid(n), n ~ N(0, 1) (SD3's flow-matching recipe)


class TrainState(NamedTuple):
    """Step, parameters, EMA parameters, optimiser state and the raw training key (a pytree,
    checkpointed as is)."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    key: jax.Array  # raw uint32 key data (checkpointable)


class History(NamedTuple):
    """Training losses (step, loss), held-out losses (step, loss) and wall time of a level."""

    train: list  # (step, loss)
    test: list  # (step, held-out loss)
    seconds: float = 0.0  # training wall time of this level, earlier sessions of a resumed run included


# the fields of TrainConfig a resumed run must share with the run it continues (steps,
# eval_every and checkpoint_every may change: training longer is the point of resuming)
RESUME_FIELDS = ("batch_size", "learning_rate", "warmup_steps", "grad_clip", "ema_decay", "seed",
                 "parameterization", "t_min", "label_dropout")


TIME_SAMPLINGS = ("uniform", "logit-normal")


def sample_times(key, num: int, t_min: float = 1e-3, time_sampling: str = "uniform"):
    """Training times in [t_min, 1]: uniform, or logit-normal t = sigmoid(n), n ~ N(0, 1) (Esser et
    al. 2024's choice for rectified flows: more weight on the middle of the path), clipped to t_min."""
    if time_sampling == "uniform":
        return jax.random.uniform(key, (num,), minval=t_min, maxval=1.0)
    if time_sampling == "logit-normal":
        return jnp.clip(jax.nn.sigmoid(jax.random.normal(key, (num,))), t_min, 1.0)
    raise InputError(f"time_sampling: expected one of {TIME_SAMPLINGS}, got {time_sampling!r}.")


def dsm_loss(params, model: UNet, sde, x0, key, parameterization: str = "eps", t_min: float = 1e-3,
             labels=None, label_dropout: float = 0.0, time_sampling: str = "uniform"):
    """Denoising score matching loss of `model` (any linen module with `__call__(x, t)`, t of shape (B,))
    on the batch x0 (B, ...): the mean squared error of its output against `target_from_noise`.

    With `labels` (B,), a conditional model is called as `model(x, t, labels)`, each label replaced by
    the null class -1 with probability `label_dropout`: the one network then learns both the
    conditional and the unconditional denoiser that classifier-free guidance contrasts."""
    kt, kn, kd = jax.random.split(key, 3)
    t = sample_times(kt, x0.shape[0], t_min, time_sampling)
    eps = jax.random.normal(kn, x0.shape, x0.dtype)
    tb = t.reshape((-1,) + (1,) * (x0.ndim - 1))  # images (B, H, W, C) or any (B, ...)
    xt = sde.alpha(tb) * x0 + sde.std(tb) * eps
    if labels is None:
        out = model.apply({"params": params}, xt, t)
    else:
        dropped = jax.random.uniform(kd, (x0.shape[0],)) < label_dropout
        out = model.apply({"params": params}, xt, t, jnp.where(dropped, -1, labels))
    target = target_from_noise(sde, parameterization, tb, x0, eps)
    return jnp.mean((out - target) ** 2)


def make_optimizer(config: TrainConfig):
    """Gradient clipping by global norm, then Adam with a linear warm-up to the learning
    rate."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1)),
         optax.constant_schedule(config.learning_rate)],
        [max(config.warmup_steps, 1)],
    )
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), optax.adam(schedule))


def init_state(model: UNet, image_shape, config: TrainConfig) -> TrainState:
    """The state at step 0: parameters from the seed, the optimiser state, and the training
    key."""
    key = jax.random.key(config.seed)
    k_init, k_train = jax.random.split(key)
    params = init_params(model, k_init, image_shape)
    opt_state = make_optimizer(config).init(params)
    return TrainState(jnp.int32(0), params, params, opt_state, jax.random.key_data(k_train))


def make_train_step(model: UNet, sde, config: TrainConfig) -> Callable:
    """A jitted `step(state, batch) -> (state, loss)`: one DSM gradient step and the EMA update; the
    batch is x0, or (x0, labels) for a conditional model."""
    optimizer = make_optimizer(config)

    @jax.jit
    def step(state: TrainState, batch):
        x0, labels = batch if isinstance(batch, tuple) else (batch, None)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        loss, grads = jax.value_and_grad(dsm_loss)(
            state.params, model, sde, x0, key, config.parameterization, config.t_min, labels, config.label_dropout,
            config.time_sampling)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = jnp.minimum(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema = optax.incremental_update(params, state.ema_params, 1.0 - decay)  # decay e + (1 - decay) p
        return TrainState(state.step + 1, params, ema, opt_state, state.key), loss

    return step


def evaluate(params, model: UNet, sde, images, config: TrainConfig, num_batches: int = 4, labels=None) -> float:
    """Held-out DSM loss with fixed noise (the same at every call); conditional on `labels` when given."""
    f = jax.jit(lambda p, x, k, y: dsm_loss(p, model, sde, x, k, config.parameterization, config.t_min, y,
                                            time_sampling=config.time_sampling))
    bs = min(config.batch_size, images.shape[0])
    losses = []
    for i in range(num_batches):
        start = (i * bs) % images.shape[0]
        x = images[start:][:bs]
        y = None if labels is None else jnp.asarray(labels[start:][:bs])
        losses.append(float(f(params, jnp.asarray(x), jax.random.key(10_000 + i), y)))
    return float(np.mean(losses))


# ---------------------------------------------------------------------- checkpoints


def model_config(model: UNet) -> dict:
    """The constructor arguments of a UNet as a JSON-able dict (stored in checkpoints and
    families)."""
    config = {"nf": model.nf, "ch_mult": list(model.ch_mult), "num_res_blocks": model.num_res_blocks,
              "attn_resolutions": list(model.attn_resolutions), "num_groups": model.groups()}
    if model.num_classes:  # unconditional models keep the description (and checkpoints) they had
        config["num_classes"] = model.num_classes
    return config


def model_from_config(cfg: dict) -> UNet:
    """The UNet that `model_config` describes."""
    return UNet(nf=cfg["nf"], ch_mult=tuple(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
                attn_resolutions=tuple(cfg["attn_resolutions"]), num_groups=cfg["num_groups"],
                num_classes=cfg.get("num_classes", 0))


def sde_config(sde) -> dict:
    """An SDE as a JSON-able dict: its class name and fields."""
    return {"kind": type(sde).__name__, **dataclasses.asdict(sde)}


def sde_from_config(cfg: dict):
    """The SDE that `sde_config` describes."""
    kinds = {"VP": VP, "SubVP": SubVP, "VE": VE, "Flow": Flow}
    cfg = dict(cfg)
    return kinds[cfg.pop("kind")](**cfg)


def _manager(directory: str, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    )


def save_checkpoint(directory: str, state: TrainState, meta: dict) -> None:
    """Write state and metadata for `state.step`. Orbax writes into a temporary folder
    and renames it when complete, so an interrupted save leaves the previous one intact."""
    import orbax.checkpoint as ocp

    mngr = _manager(directory)
    mngr.save(int(state.step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state._asdict()), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    mngr.close()


def latest_step(directory: str) -> int | None:
    """The newest checkpoint's step, or None."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def read_metadata(directory: str, step: int | None = None) -> dict:
    """The JSON metadata of the latest (or given) checkpoint; names the step when it is
    corrupt."""
    import orbax.checkpoint as ocp

    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"checkpoint: no checkpoint in {directory!r}.")
    mngr = _manager(directory)
    try:
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        quiet_closed_loop_callbacks()
        raise InputError(f"checkpoint: step {step} in {directory!r} is corrupt or incomplete ({type(e).__name__}: "
                         f"{first_line(e)}).") from e
    finally:
        mngr.close()
    return meta


def check_compatible(meta: dict, model: UNet, image_shape, directory: str) -> None:
    """Refuse a checkpoint written for another model configuration or image shape."""
    expected = model_config(model)
    for k, v in expected.items():
        if meta.get("model", {}).get(k) != v:
            raise InputError(
                f"checkpoint: {directory!r} was written for a model with {k}={meta.get('model', {}).get(k)!r}, "
                f"but this model has {k}={v!r}; use the matching model or another checkpoint directory."
            )
    if image_shape is not None and list(meta.get("image_shape", [])) != list(image_shape):
        raise InputError(
            f"checkpoint: {directory!r} was written for images of shape {meta.get('image_shape')}, "
            f"got {list(image_shape)}."
        )


def all_steps(directory: str) -> list[int]:
    """The steps of the checkpoints in `directory`, oldest first."""
    if not os.path.isdir(directory):
        return []
    mngr = _manager(directory)
    steps = sorted(int(s) for s in mngr.all_steps())
    mngr.close()
    return steps


def check_resume(meta: dict, config: TrainConfig, directory: str) -> None:
    """Refuse to resume a run with another recipe (seed, batch size, learning rate, ...)."""
    saved = meta.get("config", {})
    diff = [f"{k}={saved[k]!r} (now {getattr(config, k)!r})" for k in RESUME_FIELDS
            if k in saved and saved[k] != getattr(config, k)]
    if diff:
        raise InputError(f"resume: {directory!r} was trained with " + ", ".join(diff) + "; resume with the same "
                         "recipe, or start a new run in another directory (or overwrite this one).")


def restore_latest_intact(directory: str, model: UNet, image_shape, config: TrainConfig, mesh=None):
    """(state, meta) of the newest checkpoint that restores; a corrupt newer one (a kill
    during a save that orbax did not finish renaming, a damaged disk) is skipped with a
    warning. Fails only when none restores."""
    import warnings

    steps = all_steps(directory)
    errors = []
    for step in reversed(steps):
        try:
            state, meta = restore_checkpoint(directory, model, image_shape, config, step, mesh=mesh)
        except ValueError as e:
            if "corrupt or incomplete" not in str(e):
                raise
            errors.append(str(e))
            continue
        if errors:
            warnings.warn(f"checkpoint: skipped {len(errors)} unreadable checkpoint(s) in {directory!r}; resuming "
                          f"from step {step}. First error: {errors[0]}", stacklevel=2)
        return state, meta
    raise InputError(f"checkpoint: no checkpoint in {directory!r} can be restored: " + " | ".join(errors))


def quiet_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" errors of a failed orbax restore from then on.

    When a restore fails, tensorstore's pending reads still complete, and each one's callback
    calls `call_soon_threadsafe` on the asyncio loop orbax has already closed: one
    "Exception ignored" traceback per array (about 500 for a UNet level), which buries the
    one-line error. Only that exact error is dropped; every other unraisable exception still
    reaches the hook that was installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True
    sys.unraisablehook = hook


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's text, at most `limit` characters: tensorstore's read errors
    carry a 60-line spec that would bury the one-line message."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def restore_checkpoint(directory: str, model: UNet, image_shape, config: TrainConfig, step: int | None = None,
                       mesh=None):
    """(state, meta) of the latest (or given) step, after checking it matches `model`.

    With `mesh`, the state comes back replicated over it as global arrays (every process
    of a multi-process run calls this); the checkpoint may have been written by another
    number of processes or devices."""
    import orbax.checkpoint as ocp

    meta = read_metadata(directory, step)
    check_compatible(meta, model, image_shape, directory)
    step = latest_step(directory) if step is None else step
    template = init_state(model, image_shape, config)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template._asdict())
    if mesh is not None:
        from mlem_jax.parallel._mesh import replicated

        abstract = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), abstract)
    mngr = _manager(directory)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:
        quiet_closed_loop_callbacks()
        raise InputError(f"checkpoint: step {step} in {directory!r} is corrupt or incomplete ({type(e).__name__}: "
                         f"{first_line(e)}).") from e
    finally:
        mngr.close()
    return TrainState(**restored), meta


# --------------------------------------------------------------------------- train


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
    and at the end; `resume=True` continues from the newest checkpoint that restores (the
    data order and the noise are functions of the step, so a resumed run equals an
    uninterrupted one) and refuses another recipe. A directory that already holds
    checkpoints is never restarted silently: pass `resume=True` or `overwrite=True`.

    A conditional model (`UNet(num_classes=C)`) takes `train_labels` (and `test_labels` with
    `test_images`), integers in [0, C); `config.label_dropout` of them are replaced by the null class.
    """
    train_images = np.asarray(train_images, np.float32)
    image_shape = _check_training(model, train_images, config, resume, overwrite)
    train_labels = _checked_labels(model, train_images, train_labels, "train_labels")
    train_data = train_images if train_labels is None else (train_images, train_labels)
    if test_images is not None:
        test_labels = _checked_labels(model, np.asarray(test_images), test_labels, "test_labels")
    meta = {"model": model_config(model), "image_shape": list(image_shape), "sde": sde_config(sde),
            "parameterization": config.parameterization, "config": config._asdict()}
    t_start = time.perf_counter()
    state, earlier_seconds = _starting_state(checkpoint_dir, model, image_shape, config, resume, overwrite, mesh)
    start = int(state.step)
    if start > config.steps:
        raise InputError(f"steps: {checkpoint_dir!r} is already at step {start}, past the {config.steps} asked for.")
    step_fn = make_train_step(model, sde, config)
    state, put = _data_parallel(state, mesh, min(config.batch_size, train_images.shape[0]))
    data = batches(train_data, min(config.batch_size, train_images.shape[0]), jax.random.key(config.seed + 1))
    for _ in range(start):  # the batches already consumed before an interruption
        next(data)
    history = History([], [])
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc=desc or f"train nf={model.nf}", leave=False)
    try:
        for s in range(start, config.steps):
            state, loss = step_fn(state, put(next(data)))
            loss = float(loss)
            history.train.append((s + 1, loss))
            if on_step is not None:
                on_step(s + 1, loss)
            if test_images is not None and ((s + 1) % config.eval_every == 0 or s + 1 == config.steps):
                history.test.append((s + 1, evaluate(state.ema_params, model, sde, test_images, config,
                                                     labels=test_labels)))
            if checkpoint_dir is not None and ((s + 1) % config.checkpoint_every == 0 or s + 1 == config.steps):
                save_checkpoint(checkpoint_dir, state,
                                {**meta, "train_seconds": earlier_seconds + time.perf_counter() - t_start})
            if bar is not None:
                post = {"loss": f"{loss:.4f}"}
                if history.test:
                    post["held-out"] = f"{history.test[-1][1]:.4f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if start == config.steps and test_images is not None:  # nothing left to train: report the held-out loss anyway
        history.test.append((start, evaluate(state.ema_params, model, sde, test_images, config, labels=test_labels)))
    return state, history._replace(seconds=earlier_seconds + time.perf_counter() - t_start)


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


def _starting_state(checkpoint_dir, model, image_shape, config: TrainConfig, resume, overwrite, mesh):
    """(state, training seconds of earlier sessions): the newest intact checkpoint with `resume`, else step 0;
    checkpoints already there are never restarted silently (`overwrite` deletes them)."""
    import shutil

    existing = all_steps(checkpoint_dir) if checkpoint_dir is not None else []
    if existing and not resume:
        if not overwrite:
            raise FileExistsError(
                f"checkpoint_dir: {checkpoint_dir!r} already holds checkpoints (steps {existing}); pass resume=True "
                "(--resume) to continue them, overwrite=True (--overwrite) to start again from step 0, or use "
                "another directory.")
        if jax.process_index() == 0:
            shutil.rmtree(checkpoint_dir)
        if jax.process_count() > 1:  # the others wait until process 0 has removed it
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mlem_jax overwrite " + os.path.abspath(checkpoint_dir))
    if resume and existing:
        state, saved = restore_latest_intact(checkpoint_dir, model, image_shape, config, mesh=mesh)
        check_resume(saved, config, checkpoint_dir)
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


def load_level(directory: str, step: int | None = None):
    """(model, ema_params, sde, parameterization, meta) from a checkpoint directory, the
    model rebuilt from the checkpoint's metadata."""
    meta = read_metadata(directory, step)
    model = model_from_config(meta["model"])
    config = TrainConfig(**{k: v for k, v in meta["config"].items() if k in TrainConfig._fields})
    state, meta = restore_checkpoint(directory, model, meta["image_shape"], config, step)
    return model, state.ema_params, sde_from_config(meta["sde"]), meta["parameterization"], meta
