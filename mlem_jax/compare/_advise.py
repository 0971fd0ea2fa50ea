"""Will multilevel sampling pay on this family? The held-out part of the answer, before any
sampling (`mlem-jax advise`).

Every level predicts its training target (eps, x_0, v or the velocity) on the same held-out
draws (x_0 from held-out images, t uniform on [t_min, 1], one eps each), so the levels'
errors can be compared pair by pair (`mlem_jax.calibrate.level_diagnostics`): each level's
held-out loss with its standard error and per noise band, the spread of each pair against
its loss gap (1: nested errors, the expensive level corrects the cheap one; above: it adds
noise of its own), gamma from loss against FLOPs with an irreducible loss, and the levels
worth keeping. The verdict says, in words, whether the top level carries accuracy a
multilevel estimator could buy cheaply, or which level to sample alone instead.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax.calibrate._diagnostics import LevelDiagnostics, format_diagnostics, level_diagnostics

__all__ = ["Advice", "family_diagnostics", "held_out_images", "verdict"]


class Advice(NamedTuple):
    """What `family_diagnostics` measured: the diagnostics, each level's GFLOP per image, the
    level names, the verdict in words and the number of held-out draws."""

    diagnostics: LevelDiagnostics
    gflop: np.ndarray
    names: tuple
    verdict: str
    draws: int

    def report(self) -> str:
        head = (f"{self.draws} held-out draws shared by every level; cost per call: "
                + ", ".join(f"{n}: {g:.3g} GFLOP" for n, g in zip(self.names, self.gflop)))
        return "\n".join([head, format_diagnostics(self.diagnostics, self.names), "verdict: " + self.verdict])


def held_out_images(family, data: str | None = None, data_dir: str | None = None):
    """The family's held-out images: `data` (a dataset name, folder or array file) or the dataset
    its metadata records; Fashion-MNIST falls back to Debian's files when no tfds dir is given.

    Args:
      family: the family whose held-out images are wanted.
      data: a dataset name, a folder or an .npy/.npz file (default: the dataset the family records).
      data_dir: the tfds data dir of a prepared dataset.
    """
    from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN, load_dataset, read_local

    name = data or family.meta.get("dataset")
    if not name:
        raise InputError("data: the family records no dataset; pass the held-out images (a dataset name, a folder or "
                         "an .npy/.npz file).")
    size = family.image_shape[0]
    if name == "fashion_mnist" and data_dir is None:
        import os

        if not os.path.isdir(FASHION_MNIST_DEBIAN):
            raise InputError("data: fashion_mnist needs --data-dir (a prepared tfds dir) or Debian's files "
                             "(apt-get install dataset-fashion-mnist).")
        return read_local("fashion_mnist", FASHION_MNIST_DEBIAN, "test", image_size=size)
    return load_dataset(name, "test", data_dir, size)


def family_diagnostics(family, images, *, draws: int = 2048, batch_size: int = 256, seed: int = 0,
                       t_min: float = 1e-3, bands: int = 4, max_ratio: float = 1.5, progress=None) -> Advice:
    """`level_diagnostics` of a trained family on held-out `images` (see the module docstring).

    Args:
      family: a `Family` (unconditional levels; a conditional one is evaluated without labels).
      images: held-out images (N, H, W, C) in [-1, 1].
      draws: held-out draws (x_0 with replacement, t, eps), shared by every level.
      batch_size: network calls per batch.
      seed: of the draws.
      t_min: the smallest t drawn (t uniform on [t_min, 1]).
      bands: noise bands of the per-band losses (equal counts in t).
      max_ratio: the spread-to-gap ratio above which a level adds noise rather than accuracy.
      progress: a callable called once per level evaluated (a progress bar's update).
    """
    from mlem_jax.diffusion.parameterization import target_from_noise
    from mlem_jax.diffusion.unet import family_summary

    x = np.asarray(images, np.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(family.image_shape):
        raise InputError(f"images: expected held-out images of shape (N, {', '.join(map(str, family.image_shape))}), "
                         f"got {x.shape}.")
    if draws < 16:
        raise InputError(f"draws: expected at least 16 held-out draws, got {draws}.")
    k0, kt, ke = jax.random.split(jax.random.key(seed), 3)
    x0 = jnp.asarray(x)[jax.random.randint(k0, (draws,), 0, x.shape[0])]
    t = jax.random.uniform(kt, (draws,), minval=t_min, maxval=1.0)
    eps = jax.random.normal(ke, x0.shape)
    tb = t.reshape(-1, 1, 1, 1)
    sde = family.sde
    xt = sde.alpha(tb) * x0 + sde.std(tb) * eps
    target = target_from_noise(sde, family.parameterization, tb, x0, eps)
    outputs = []
    for model, params in zip(family.models, family.params):
        apply = jax.jit(lambda xb, tb_, m=model, p=params: m.apply({"params": p}, xb, tb_))
        outputs.append(np.concatenate([np.asarray(apply(xt[i:i + batch_size], t[i:i + batch_size]))
                                       for i in range(0, draws, batch_size)]))
        if progress is not None:
            progress()
    gflop = np.array([s["gflop"] for s in family_summary(family.models, family.params, family.image_shape)])
    d = level_diagnostics(np.stack(outputs), np.asarray(target), covariate=np.asarray(t), bands=bands, costs=gflop,
                          exact_target=False, max_ratio=max_ratio)
    names = tuple(f"nf={m.nf}" for m in family.models)
    return Advice(d, gflop, names, verdict(d, names), draws)


def verdict(d: LevelDiagnostics, names) -> str:
    """The diagnostics in plain words."""
    K = len(d.losses)
    top = K - 1
    if top in d.keep:
        p = d.pair(d.keep[-2], top) if len(d.keep) > 1 else None
        gain = "" if p is None else (f" (loss gap to {names[p.a]} {p.gap.value:.3g} +- {p.gap.stderr:.1g}; its "
                                     f"correction is {p.ratio:.2f}x that gap, where 1 means nested errors)")
        text = (f"the top level {names[top]} adds accuracy{gain}: the levels worth keeping are "
                f"{', '.join(names[k] for k in d.keep)}. Multilevel sampling can pay at targets that ask for "
                f"{names[top]}'s accuracy; measure it against the best single-network sampler (mlem-jax demo "
                "--family ...) before relying on it.")
    else:
        best = d.keep[-1]
        text = (f"does not pay here: {names[top]} {d.dropped[top]}. Sample {names[best]} alone with a good solver "
                f"(DPM-Solver++(2M) or UniPC on a log-SNR grid); a multilevel estimator would pay for the correction "
                f"to {names[top]} without buying accuracy.")
    if d.gamma is not None:
        g = d.gamma
        text += (f" gamma (loss against FLOPs, with an irreducible loss {g.offset:.3g}): {g.gamma:.2f} "
                 f"[{g.low:.2f}, {g.high:.2f}]; the paper's regime needs gamma > 2.")
    return text


def plot_advice(advice: Advice, path: str) -> str | None:
    """Loss per noise band for each level, and each adjacent pair's spread-to-gap ratio."""
    from mlem_jax.plotting import pyplot

    plt = pyplot(required=False)
    if plt is None:
        return None
    d = advice.diagnostics
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    mid = [(d.band_edges[b] + d.band_edges[b + 1]) / 2 for b in range(d.band_losses.shape[0])]
    for k, name in enumerate(advice.names):
        a1.plot(mid, d.band_losses[:, k], "-o", label=name)
    a1.set_xlabel("t (band centre)")
    a1.set_ylabel("held-out loss")
    a1.set_yscale("log")
    a1.legend(fontsize=7)
    pairs = [d.pair(k, k + 1) for k in range(len(advice.names) - 1)]
    a2.bar(range(len(pairs)), [min(p.ratio, 10) for p in pairs], color=["C0" if p.ratio <= 1.5 else "C3"
                                                                         for p in pairs])
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xticks(range(len(pairs)), [f"{advice.names[p.a]}\n-> {advice.names[p.b]}" for p in pairs], fontsize=7)
    a2.set_ylabel("spread / loss gap (1: nested)")
    fig.tight_layout()
    from mlem_jax._atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
