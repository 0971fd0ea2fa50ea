"""A small Flax (linen) UNet whose size is one integer, the base width `nf`.

UNet(nf, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), num_groups=None):
sinusoidal time embedding -> MLP; per resolution `num_res_blocks` residual blocks
(GroupNorm, swish, conv, + time embedding) at width nf * ch_mult[i], then a strided
down-sampling conv; a middle block (with attention when requested); the mirror path up
with skip connections and nearest-neighbour up-sampling; GroupNorm, swish, conv out.

A level of ML-EM is `model.apply` with its own parameters; `unet_family` builds the
levels, and `family_summary` reports parameters and FLOPs of each.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._flops import flops_of


def default_groups(nf: int, ch_mult: Sequence[int], max_groups: int = 8) -> int:
    """The largest group count <= max_groups dividing every width nf * m."""
    widths = [nf * m for m in ch_mult] + [nf]
    g = math.gcd(*widths)
    return max(d for d in range(1, max_groups + 1) if g % d == 0)


def timestep_embedding(t, dim: int, scale: float = 1000.0):
    """Sinusoidal embedding of t (shape (B,)) into (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / max(half - 1, 1))
    args = scale * t[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class ResBlock(nn.Module):
    """Residual block: GroupNorm, SiLU, 3x3 convolution, twice, with the time embedding added
    in between."""

    out_ch: int
    groups: int

    @nn.compact
    def __call__(self, x, temb):
        h = nn.swish(nn.GroupNorm(self.groups)(x))
        h = nn.Conv(self.out_ch, (3, 3))(h)
        h = h + nn.Dense(self.out_ch)(nn.swish(temb))[:, None, None, :]
        h = nn.swish(nn.GroupNorm(self.groups)(h))
        h = nn.Conv(self.out_ch, (3, 3), kernel_init=nn.initializers.variance_scaling(1e-2, "fan_avg", "uniform"))(h)
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1))(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions, with a residual connection."""

    groups: int

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        h = nn.GroupNorm(self.groups)(x).reshape(B, H * W, C)
        h = nn.MultiHeadDotProductAttention(num_heads=1, qkv_features=C)(h)
        return x + h.reshape(B, H, W, C)


class UNet(nn.Module):
    """A denoising network: `model.apply({"params": p}, x, t) -> output`, x of shape (B, H, W, C), t of shape (B,).

    Flax's own call order is (x, t); `score_model` / `denoiser_model` wrap it into the library's
    `(t, x, args)` convention for one image."""

    nf: int = 16
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: Sequence[int] = ()
    num_groups: int | None = None
    num_classes: int = 0  # > 0: class-conditional, labels in [0, num_classes), -1 the null class of guidance

    def groups(self) -> int:
        return self.num_groups if self.num_groups is not None else default_groups(self.nf, self.ch_mult)

    def check_input(self, shape) -> None:
        check_unet_config(self.nf, self.ch_mult, self.groups())
        if len(shape) != 4:
            raise InputError(f"x: expected a batch of images (B, H, W, C), got shape {tuple(shape)}.")
        factor = 2 ** (len(self.ch_mult) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise InputError(
                f"x: image size {shape[1]}x{shape[2]} is not divisible by {factor}, the down-sampling "
                f"of a UNet with ch_mult={tuple(self.ch_mult)}; pad or resize the images, or use "
                "fewer resolutions."
            )

    @nn.compact
    def __call__(self, x, t, labels=None):
        self.check_input(x.shape)
        g = self.groups()
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        temb = timestep_embedding(t, self.nf)
        temb = nn.Dense(4 * self.nf)(temb)
        temb = nn.Dense(4 * self.nf)(nn.swish(temb))
        if self.num_classes:
            temb = temb + nn.Embed(self.num_classes + 1, 4 * self.nf, name="label_embed")(
                null_as_last(labels, self.num_classes, x.shape[0]))
        elif labels is not None:
            raise InputError("labels: this UNet is unconditional (num_classes=0); give no labels, or train a "
                             "conditional family (mlem-jax train --conditional).")
        h = nn.Conv(self.nf, (3, 3))(x)
        skips = [h]
        for i, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = ResBlock(self.nf * mult, g)(h, temb)
                if h.shape[1] in self.attn_resolutions:
                    h = Attention(g)(h)
                skips.append(h)
            if i < len(self.ch_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                skips.append(h)
        h = ResBlock(h.shape[-1], g)(h, temb)
        if self.attn_resolutions:
            h = Attention(g)(h)
        h = ResBlock(h.shape[-1], g)(h, temb)
        for i, mult in reversed(list(enumerate(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = ResBlock(self.nf * mult, g)(jnp.concatenate([h, skips.pop()], -1), temb)
                if h.shape[1] in self.attn_resolutions:
                    h = Attention(g)(h)
            if i > 0:
                B, H, W, C = h.shape
                h = jax.image.resize(h, (B, 2 * H, 2 * W, C), "nearest")
                h = nn.Conv(C, (3, 3))(h)
        h = nn.swish(nn.GroupNorm(g)(h))
        return nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros)(h)


def null_as_last(labels, num_classes: int, batch: int):
    """Class labels (B,) as embedding rows: class c is row c, the null class -1 (and `labels=None`) row
    `num_classes`. A label outside [-1, num_classes) is an error, also under jit and vmap."""
    import equinox as eqx

    if labels is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels: expected integer class labels, got dtype {labels.dtype}.")
    labels = jnp.broadcast_to(labels.astype(jnp.int32), (batch,))
    bad = jnp.any((labels < -1) | (labels >= num_classes))
    labels = eqx.error_if(labels, bad, f"labels: expected class labels in [0, {num_classes}) or -1 (no class, "
                                       "what guidance contrasts with), got one outside that range.")
    return jnp.where(labels < 0, num_classes, labels)


def check_unet_config(nf: int, ch_mult: Sequence[int], groups: int) -> None:
    """Refuse widths that are not positive integers or not divisible by the GroupNorm groups, and
    groups of one channel in every block: each block adds the time (and label) embedding as one
    value per channel and normalises right after, over each group, which removes a per-channel
    constant when a group is one channel, so such a network would not depend on t at all."""
    if int(nf) != nf or nf < 1:
        raise InputError(f"nf: expected a positive integer width, got {nf!r}.")
    bad = [nf * m for m in ch_mult if (nf * m) % groups]
    if nf % groups or bad:
        raise InputError(
            f"nf: width {nf} with ch_mult={tuple(ch_mult)} gives channel counts "
            f"{[nf * m for m in ch_mult]}, not all divisible by num_groups={groups} (GroupNorm); "
            f"use num_groups=None to pick a valid count ({default_groups(nf, ch_mult)} here)."
        )
    if all(nf * m == groups for m in ch_mult):
        raise InputError(
            f"num_groups: {groups} GroupNorm groups of one channel each in every block (nf={nf}, "
            f"ch_mult={tuple(ch_mult)}): the norm after each block's time embedding removes it, so the network "
            f"would ignore t and the class label; use a channel multiplier of 2 or more (ch_mult=(2,)), a "
            f"wider nf" + (f", or fewer groups (num_groups={groups // 2})." if groups > 1 else ".")
        )


def unet_family(nfs: Sequence[int] = (8, 16, 32, 64), **kwargs) -> tuple[UNet, ...]:
    """One UNet per width, otherwise identical: the levels of ML-EM, cheapest first."""
    if len(nfs) == 0:
        raise InputError("nfs: expected at least one width.")
    if list(nfs) != sorted(nfs):
        raise InputError(f"nfs: expected increasing widths (levels go from cheap to expensive), got {tuple(nfs)}.")
    family = tuple(UNet(nf=nf, **kwargs) for nf in nfs)
    for m in family:
        check_unet_config(m.nf, m.ch_mult, m.groups())
    return family


# XLA's LLVM optimisation level for `compiled_init` on a CPU: at the default level, compiling
# one initialiser (a truncated normal per weight) takes about 18 s for a tiny UNet; at level 1
# about 4 s. Levels 1 and up give flax's eager values bit for bit, and level 0 changes their
# last bits, unless eager init itself runs at level 0 (XLA_FLAGS names it, as the test suite
# does): then level 0 is the one that agrees (both tested).
_INIT_OPTIMIZATION_LEVEL = 1


def _init_optimization_level() -> int:
    match = re.search(r"--xla_backend_optimization_level=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return min(_INIT_OPTIMIZATION_LEVEL, int(match.group(1))) if match else _INIT_OPTIMIZATION_LEVEL


def compiled_init(module: nn.Module, key, *inputs):
    """`module.init(key, *inputs)`, the same values bit for bit, in less compile time on a CPU.

    Flax's eager `init` compiles every initialiser of the network on its own, one small
    program per parameter shape (about 30 s for a tiny UNet on 2 CPU cores, paid again in
    every new process). On a CPU this compiles the whole initialisation as one program at a
    low LLVM optimisation level (it runs once; 4-5 s, kept by the persistent compilation
    cache); on other backends, and inside a traced function, it is flax's `init`."""
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((key, inputs)))
    if traced or jax.default_backend() != "cpu":  # inside jit or eval_shape, flax's init is already staged
        return module.init(key, *inputs)
    options = {"xla_backend_optimization_level": _init_optimization_level()}
    return jax.jit(module.init, compiler_options=options)(key, *inputs)


def init_params(model: UNet, key, image_shape: Sequence[int]):
    """Parameters of `model` for images of shape (H, W, C) (`compiled_init`).

    Args:
      model: the `UNet`.
      key: a JAX key for the initialisation.
      image_shape: (H, W, C) of one image.
    """
    x = jnp.zeros((1, *image_shape))
    return compiled_init(model, key, x, jnp.zeros((1,)))["params"]  # a conditional UNet's null row too


def count_params(params: Any) -> int:
    """The number of scalar parameters in a pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def forward_flops(model: UNet, params: Any, image_shape: Sequence[int], batch: int = 1) -> float:
    """FLOPs of one forward pass on `batch` images, from XLA's cost analysis (`flops_of`).

    Args:
      model: the `UNet`.
      params: its parameters.
      image_shape: (H, W, C) of one image.
      batch: images per forward pass.
    """
    x = jnp.zeros((batch, *image_shape))
    f = lambda p, x: model.apply({"params": p}, x, jnp.zeros((batch,)))
    return flops_of(f, params, x)


def family_summary(family, params_list, image_shape) -> list[dict]:
    """Per level: nf, parameter count and forward GFLOP per image.

    Args:
      family: the `UNet`s, cheapest first.
      params_list: their parameters, in the same order.
      image_shape: (H, W, C) of one image.
    """
    return [
        {"nf": m.nf, "params": count_params(p), "gflop": forward_flops(m, p, image_shape) / 1e9}
        for m, p in zip(family, params_list)
    ]


def _one_image(model: UNet, params: Any):
    """network(t, x, args) for ONE image x (H, W, C): the module on x[None] (its own order is (x, t)).
    A conditional UNet takes its class label as `args` (an int; -1 or None: no class)."""
    if not model.num_classes:
        return lambda t, x, args: model.apply({"params": params}, x[None], jnp.reshape(t, (1,)))[0]
    return lambda t, x, args: model.apply({"params": params}, x[None], jnp.reshape(t, (1,)),
                                          None if args is None else jnp.reshape(args, (1,)))[0]


def score_model(model: UNet, params: Any, sde, parameterization: str = "eps"):
    """score_fn(t, y, args) for ONE image y (H, W, C): the network on y[None], turned
    into a score. Vmapping the sampler over images batches the network calls.

    Args:
      model: the `UNet`.
      params: its parameters.
      sde: the forward SDE it was trained on.
      parameterization: what the network predicts ("eps", "score", "x0", "v" or "flow").
    """
    from mlem_jax.diffusion.parameterization import network_score

    return network_score(sde, parameterization, _one_image(model, params))


def denoiser_model(model: UNet, params: Any, sde, parameterization: str = "eps"):
    """denoiser(t, x, args) for ONE image x (H, W, C): the network on x[None], turned into
    the data prediction D = E[x_0 | x_t = x] that `ddim`, `dpm_solver_pp` and the other
    diffusion samplers take. Vmapping the sampler over images batches the network calls.

    Args:
      model: the `UNet`.
      params: its parameters.
      sde: the forward SDE it was trained on.
      parameterization: what the network predicts ("eps", "score", "x0", "v" or "flow").
    """
    from mlem_jax.diffusion.parameterization import network_denoiser

    return network_denoiser(sde, parameterization, _one_image(model, params))


def nnx_apply(module):
    """Adapt a `flax.nnx` module whose `__call__(x, t)` is the network to the library's convention:
    returns `(network, state)` with `network(params, t, x, args=None) = nnx.merge(graph, params)(x, t)`
    and the module's parameter state. `functools.partial(network, state)` is then a
    `network(t, x, args)` for `network_score` / `network_denoiser`.

    A call in the old order `network(params, x, t)` (t with more dimensions than x) is refused."""
    from flax import nnx

    graphdef, state = nnx.split(module)

    def network(params, t, x, args=None):
        if jnp.ndim(t) > jnp.ndim(x):  # the old order (params, x, t)
            raise InputError(f"nnx_apply: the network is called as network(params, t, x, args), t first; got t "
                             f"with {jnp.ndim(t)} dimensions and x with {jnp.ndim(x)}, which looks like the old "
                             "order (params, x, t): swap t and x.")
        return nnx.merge(graphdef, params)(x, t)

    return network, state
