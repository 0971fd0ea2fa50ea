"""What training minimises, and one step of it: the denoising score matching loss, the
optimiser, the EMA of the parameters and the jitted train step.

The loss at a batch x_0: t ~ U(t_min, 1) (or logit-normal for flows), eps ~ N(0, I),
x_t = alpha(t) x_0 + std(t) eps, and the mean squared error between the network output at
(x_t, t) and the target of its parameterisation (eps, the score, x_0, v or the flow
velocity; `target_from_noise`). Optimiser: gradient clipping, then Adam with a linear
warm-up. The EMA of the parameters (`optax.incremental_update`) is what samples.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlem_jax._errors import InputError
from mlem_jax.diffusion.parameterization import target_from_noise
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
    conditional and the unconditional denoiser that classifier-free guidance contrasts.

    Args:
      params: the model's parameters.
      model: a linen module with `__call__(x, t)` (and labels when conditional).
      sde: the schedule.
      x0: a batch (B, ...).
      key: draws t, the noise and the label dropout.
      parameterization: what the model predicts: "eps", "score", "x0", "v" or "flow".
      t_min: the smallest training time.
      labels: (B,) class labels of a conditional model.
      label_dropout: the share of labels replaced by the null class -1.
      time_sampling: "uniform" or "logit-normal".
    """
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
