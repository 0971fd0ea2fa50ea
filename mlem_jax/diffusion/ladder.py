"""A ladder of MLP denoisers trained against an exact denoiser: the testbed's levels.

Each level is an MLP of width w_k (the same depth) on flattened samples, wrapped in EDM's
preconditioning (Karras et al. 2022, arXiv 2206.00364) in the scaled variable
x~ = x / alpha = x_0 + s eps, s = sigma / alpha:

    D(x, t) = c_skip(s) x~ + c_out(s) F(c_in(s) x~, log(s) / 4),
    c_in = 1 / sqrt(s^2 + sd^2),  c_skip = sd^2 / (s^2 + sd^2),  c_out = s sd / sqrt(s^2 + sd^2),

so that every level's data prediction is sane at every noise level (a level's error enters D
multiplied by c_out, which vanishes as s -> 0), and the regression target of F has unit
scale. The loss is E |F - (D* - c_skip x~) / c_out|^2 with log s uniform over the sampling
range, where D* is the *exact* denoiser of the data distribution (a `GaussianMixture`): the
target carries no sampling noise, so a level's error measures its capacity, not the noise
of its gradient. Every batch is a fresh draw of the mixture: nothing is memorised.

A level trains until its held-out error against the exact denoiser stops falling: every
`eval_every` steps the EMA parameters are scored on a fixed held-out set; after `patience`
evaluations without a `min_improvement` relative gain the learning rate drops 10x once,
and after the next such plateau (or `max_steps`) the level stops. Training resumes from the
last orbax checkpoint of each level.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlem_jax._errors import InputError

__all__ = ["MLPDenoiser", "LadderConfig", "Ladder", "ladder_denoiser", "train_ladder", "load_ladder", "save_ladder",
           "mlp_flops", "denoiser_errors", "shipped_ladder_path"]


class MLPDenoiser(nn.Module):
    """F(x, c_noise): an MLP of `depth` residual blocks (LayerNorm, Dense, SiLU, Dense) of
    `width`, with a Fourier embedding of c_noise added before every block's activation."""

    width: int
    depth: int = 4
    features: int = 16

    @nn.compact
    def __call__(self, x, c_noise):
        freqs = jnp.exp(jnp.linspace(0.0, math.log(100.0), self.features))
        arg = jnp.asarray(c_noise, x.dtype)[..., None] * freqs
        emb = nn.silu(nn.Dense(self.width, name="embed")(jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1)))
        h = nn.Dense(self.width, name="input")(x)
        for i in range(self.depth):
            g = nn.Dense(self.width, name=f"block{i}_in")(nn.LayerNorm(name=f"block{i}_norm")(h))
            h = h + nn.Dense(self.width, name=f"block{i}_out")(nn.silu(g + emb))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros, name="output")(
            nn.silu(nn.LayerNorm(name="output_norm")(h)))


def mlp_flops(dim: int, width: int, depth: int = 4) -> int:
    """Multiply-adds x 2 of one MLPDenoiser call per sample (dense layers only; the
    embedding depends on t alone and is shared by a batch in sampling).

    Args:
      dim: the data dimension.
      width: the hidden width.
      depth: the number of hidden layers.
    """
    return 2 * (dim * width + depth * 2 * width * width + width * dim)


def _preconditioning(s, sigma_data):
    c_in = 1.0 / jnp.sqrt(s**2 + sigma_data**2)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data * c_in
    return c_in, c_skip, c_out


def ladder_denoiser(module: MLPDenoiser, params, sde, sigma_data: float = 0.5, shape: tuple | None = None):
    """The data prediction D(t, x, args) of one level, for the diffusion samplers. `x` has
    any leading batch axes followed by the sample `shape` (flattened for the MLP)."""

    def denoiser(t, x, args=None):
        trailing = tuple(shape) if shape is not None else x.shape[-1:]
        batch = x.shape[: x.ndim - len(trailing)]
        flat = x.reshape((-1, math.prod(trailing)))
        alpha = sde.alpha(t)
        s = sde.noise_to_signal(t)
        c_in, c_skip, c_out = _preconditioning(s, sigma_data)
        scaled = flat / alpha
        out = module.apply(params, c_in * scaled, jnp.broadcast_to(jnp.log(s) / 4, flat.shape[:1]))
        return (c_skip * scaled + c_out * out).reshape((*batch, *trailing))

    return denoiser


# ---------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class LadderConfig:
    """How a ladder is trained (one config for every level but the widths).

    Args:
      widths: the levels' widths, cheapest first.
      depth: residual blocks per level.
      batch_size: fresh mixture samples per step.
      learning_rate: Adam's rate before the one 10x drop.
      max_steps: the most steps a level trains.
      eval_every: steps between held-out evaluations (and checkpoints).
      patience: evaluations without a `min_improvement` relative gain that make a plateau.
      min_improvement: the relative gain of the held-out error that counts as progress.
      ema_decay: the decay of the evaluated (and shipped) parameter average.
      t_min: the smallest time trained (and sampled); log s is uniform on [s(t_min), s(1)].
      sigma_data: EDM's sd in the preconditioning.
      eval_size: held-out draws (x_0, t, eps), shared by every level.
      seed: the seed of the data, the initialisations and the held-out set.
    """

    widths: tuple = (24, 64, 144, 272, 512)
    depth: int = 4
    batch_size: int = 256
    learning_rate: float = 1e-3
    max_steps: int = 30000
    eval_every: int = 500
    patience: int = 4
    min_improvement: float = 0.01
    ema_decay: float = 0.999
    t_min: float = 1e-3
    sigma_data: float = 0.5
    eval_size: int = 2048
    seed: int = 0

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class Ladder(NamedTuple):
    """Trained levels: `params[k]` of `MLPDenoiser(widths[k], depth)`, cheapest first, and
    what they were trained for."""

    config: LadderConfig
    params: tuple
    history: tuple  # per level: a list of {"step", "error", "lr"} evaluations

    def modules(self) -> tuple:
        return tuple(MLPDenoiser(w, self.config.depth) for w in self.config.widths)

    def denoisers(self, sde, shape: tuple | None = None) -> tuple:
        """One `D(t, x, args)` per level, cheapest first."""
        return tuple(ladder_denoiser(m, p, sde, self.config.sigma_data, shape)
                     for m, p in zip(self.modules(), self.params))

    def flops(self, dim: int) -> tuple:
        return tuple(mlp_flops(dim, w, self.config.depth) for w in self.config.widths)


GROUP = 16
"""Draws per noise level in a batch: the exact denoiser's Woodbury factors depend on s, so
rows that share one s share them (a batch of 256 holds 16 noise levels)."""


def _draw(mixture, sde, key, num, t_min):
    """x_0 from the mixture, log s uniform between s(t_min) and s(1) (one per group of
    GROUP rows), and x~ = x_0 + s eps."""
    if num % GROUP:
        raise InputError(f"batch_size / eval_size: expected a multiple of {GROUP}, got {num}.")
    k0, kt, ke = jax.random.split(key, 3)
    x0 = mixture.sample(k0, num).reshape(num, -1)
    lo, hi = jnp.log(sde.noise_to_signal(t_min)), jnp.log(sde.noise_to_signal(1.0))
    log_s = jnp.repeat(jax.random.uniform(kt, (num // GROUP,), minval=lo, maxval=hi), GROUP)
    eps = jax.random.normal(ke, x0.shape)
    return x0, jnp.exp(log_s), x0 + jnp.exp(log_s)[:, None] * eps


def _exact_scaled(mixture, scaled, s):
    """E[x_0 | x~] for x~ = x_0 + s eps (alpha = 1, sigma = s), one s per group of GROUP rows."""
    groups = (scaled.reshape(-1, GROUP, scaled.shape[-1]), s.reshape(-1, GROUP)[:, 0])
    return jax.lax.map(lambda g: mixture.denoise(g[0].reshape((GROUP, *mixture.shape)), 1.0, g[1]).reshape(GROUP, -1),
                       groups).reshape(scaled.shape)


def _loss(module, params, scaled, s, target, sigma_data):
    c_in, c_skip, c_out = _preconditioning(s[:, None], sigma_data)
    out = module.apply(params, c_in * scaled, jnp.log(s) / 4)
    return jnp.mean((out - (target - c_skip * scaled) / c_out) ** 2)


def heldout_set(mixture, sde, config: LadderConfig):
    """The shared held-out draws (x~, s, D*) every level is scored on."""
    key = jax.random.fold_in(jax.random.key(config.seed), 10**6)
    _, s, scaled = _draw(mixture, sde, key, config.eval_size, config.t_min)
    return scaled, s, jax.jit(_exact_scaled)(mixture, scaled, s)


def denoiser_errors(module, params, heldout, sigma_data: float = 0.5) -> jax.Array:
    """Per held-out draw, |F - F*|^2 / D (the training loss, log s uniform) for one level."""
    scaled, s, target = heldout
    c_in, c_skip, c_out = _preconditioning(s[:, None], sigma_data)
    out = module.apply(params, c_in * scaled, jnp.log(s) / 4)
    return jnp.mean((out - (target - c_skip * scaled) / c_out) ** 2, -1)


def _level_dir(out, k, width):
    return os.path.join(out, f"level{k}_w{width}")


def train_ladder(mixture, sde, config: LadderConfig, out: str, progress: bool = True,
                 log: Callable[[str], None] = print) -> Ladder:
    """Train every level of `config` on fresh draws of `mixture` (see the module docstring),
    resuming from the checkpoints under `out`; writes `out/ladder.npz` (float16 EMA params)
    and `out/ladder.json` (config and histories) when every level is done.

    Args:
      mixture: the `GaussianMixture` the levels learn the denoiser of.
      sde: the forward SDE of the training times and noise levels.
      config: the widths, depth, steps and optimiser of the levels (`LadderConfig`).
      out: the folder of checkpoints and results; a run there is resumed.
      progress: show a progress bar.
      log: receives one line per notable event.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    _check_config_matches(out, config)
    heldout = heldout_set(mixture, sde, config)
    dim = mixture.dim
    all_params, histories = [], []
    for k, width in enumerate(config.widths):
        module = MLPDenoiser(width, config.depth)
        key = jax.random.fold_in(jax.random.key(config.seed), k)
        params = module.init(key, jnp.zeros((1, dim)), jnp.zeros((1,)))
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=config.learning_rate)
        state = dict(params=params, ema=params, opt=opt.init(params), step=jnp.zeros((), jnp.int32))
        mngr = ocp.CheckpointManager(os.path.abspath(_level_dir(out, k, width)),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        history, done = [], False
        if mngr.latest_step() is not None:
            abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
            restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
            state, meta = restored["state"], restored["meta"]
            history, done = meta["history"], meta["done"]
            log(f"level {k} (width {width}): resumed at step {int(state['step'])}" + (" (done)" if done else ""))

        @jax.jit
        def train_steps(state, key):
            def one(state, key):
                _, s, scaled = _draw(mixture, sde, key, config.batch_size, config.t_min)
                target = _exact_scaled(mixture, scaled, s)
                loss, grads = jax.value_and_grad(lambda p: _loss(module, p, scaled, s, target, config.sigma_data))(
                    state["params"])
                updates, opt_state = opt.update(grads, state["opt"], state["params"])
                params = optax.apply_updates(state["params"], updates)
                ema = optax.incremental_update(params, state["ema"], 1.0 - config.ema_decay)
                return dict(params=params, ema=ema, opt=opt_state, step=state["step"] + 1), loss

            keys = jax.random.split(key, config.eval_every)
            return jax.lax.scan(one, state, keys)

        evaluate = jax.jit(lambda p: jnp.mean(denoiser_errors(module, p, heldout, config.sigma_data)))
        bar = tqdm(total=config.max_steps, initial=int(state["step"]), desc=f"level {k} (width {width})",
                   disable=not progress, leave=True)
        start = time.time()
        while not done:
            step = int(state["step"])
            state, losses = train_steps(state, jax.random.fold_in(key, step + 1))
            error = float(evaluate(state["ema"]))
            lr = float(state["opt"].hyperparams["learning_rate"])
            history.append(dict(step=step + config.eval_every, error=error, lr=lr, train_loss=float(losses.mean()),
                                seconds=time.time() - start))
            bar.update(config.eval_every)
            bar.set_postfix(error=f"{error:.4g}", lr=f"{lr:.0e}")
            plateau = _plateau([h["error"] for h in history if h["lr"] == lr], config)
            if plateau and math.isclose(lr, config.learning_rate, rel_tol=1e-5):
                state["opt"].hyperparams["learning_rate"] = jnp.asarray(lr / 10, jnp.float32)
            elif plateau or int(state["step"]) >= config.max_steps:
                done = True
            mngr.save(int(state["step"]), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(history=history, done=done))))
        mngr.wait_until_finished()
        mngr.close()
        bar.close()
        log(f"level {k} (width {width}): {int(state['step'])} steps, held-out error {history[-1]['error']:.4g}")
        all_params.append(state["ema"])
        histories.append(history)
    ladder = Ladder(config, tuple(all_params), tuple(histories))
    save_ladder(ladder, out)
    return ladder


def _plateau(errors: Sequence[float], config: LadderConfig) -> bool:
    """True when the last `patience` evaluations improved the best earlier error by less than
    `min_improvement` (relatively)."""
    if len(errors) <= config.patience:
        return False
    before = min(errors[: -config.patience])
    return min(errors[-config.patience:]) > before * (1.0 - config.min_improvement)


def _check_config_matches(out, config):
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        if old != config.to_json():
            changed = sorted(k for k in old if old.get(k) != config.to_json().get(k))
            raise InputError(f"out: {out!r} holds checkpoints of another ladder config (differs in {changed}); "
                             "resume with the same settings or choose another --out.")
    else:
        from mlem_jax._atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(config.to_json(), f, indent=1)


# ------------------------------------------------------------------------------ files


def save_ladder(ladder: Ladder, out: str) -> str:
    """`out/ladder.npz` (float16 EMA parameters) and `out/ladder.json` (config, histories)."""
    from flax.traverse_util import flatten_dict

    from mlem_jax._atomic import atomic_path

    arrays = {}
    for k, p in enumerate(ladder.params):
        for name, v in flatten_dict(jax.device_get(p), sep="/").items():
            arrays[f"level{k}/{name}"] = np.asarray(v, np.float16)
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, "ladder.npz")) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    with atomic_path(os.path.join(out, "ladder.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(config=ladder.config.to_json(), history=list(ladder.history)), f, indent=1)
    return os.path.join(out, "ladder.npz")


def load_ladder(path: str | None = None) -> Ladder:
    """A ladder written by `save_ladder` (a folder holding ladder.npz and ladder.json); None
    reads the shipped Fashion-MNIST mixture ladder. Parameters load as float32."""
    from flax.traverse_util import unflatten_dict

    path = shipped_ladder_path() if path is None else path
    try:
        with open(os.path.join(path, "ladder.json"), encoding="utf-8") as f:
            meta = json.load(f)
        with np.load(os.path.join(path, "ladder.npz")) as z:
            flat = {name: np.asarray(z[name], np.float32) for name in z.files}
    except FileNotFoundError as e:
        raise FileNotFoundError(f"path: {path!r} holds no ladder ({e.filename} is missing); train one with "
                                "train_ladder or `make testbed-ladder`.") from None
    cfg = dict(meta["config"])
    cfg["widths"] = tuple(cfg["widths"])
    config = LadderConfig(**cfg)
    params = []
    for k in range(len(config.widths)):
        prefix = f"level{k}/"
        sub = {tuple(n[len(prefix):].split("/")): jnp.asarray(v) for n, v in flat.items() if n.startswith(prefix)}
        params.append(unflatten_dict(sub))
    return Ladder(config, tuple(params), tuple(meta["history"]))


def shipped_ladder_path() -> str:
    """The folder of the shipped testbed ladder (`make testbed-ladder` retrains it)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "fmnist16_ladder")

