"""A trained family of UNets in one small file pair: `<name>.npz` (parameters, stored as
float16 to keep shipped weights small, loaded as float32) and `<name>.json` (the models,
the SDE, the parameterisation, and how the weights were made)."""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mlem_jax.diffusion.parameterization import reverse_drift
from mlem_jax.diffusion.train import model_config, sde_config, sde_from_config
from mlem_jax.diffusion.unet import UNet, score_model


class Family(NamedTuple):
    models: tuple  # UNet per level, cheapest first
    params: tuple  # parameters per level
    sde: Any
    parameterization: str
    image_shape: tuple
    meta: dict

    def drifts(self, probability_flow: bool = False) -> tuple:
        """The ML-EM levels: reverse-time drifts f(t, y, args) for single images."""
        return tuple(
            reverse_drift(self.sde, score_model(m, p, self.sde, self.parameterization), probability_flow)
            for m, p in zip(self.models, self.params)
        )


def save_family(path: str, models: Sequence[UNet], params: Sequence[Any], sde, parameterization: str,
                image_shape, extra: dict | None = None, dtype=np.float16) -> str:
    """Write `path`.npz and `path`.json; returns the npz path."""
    base = path[:-4] if path.endswith(".npz") else path
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    arrays = {}
    for k, p in enumerate(params):
        for name, v in traverse_util.flatten_dict(jax.device_get(p), sep="/").items():
            arrays[f"level{k}/{name}"] = np.asarray(v, dtype)
    meta = {"levels": [model_config(m) for m in models], "sde": sde_config(sde),
            "parameterization": parameterization, "image_shape": list(image_shape), **(extra or {})}
    tmp = base + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, base + ".npz")  # atomic: a reader never sees half a file
    with open(base + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(base + ".json.tmp", base + ".json")
    return base + ".npz"


def load_family(path: str) -> Family:
    base = path[:-4] if path.endswith(".npz") else path
    if not os.path.exists(base + ".npz") or not os.path.exists(base + ".json"):
        raise FileNotFoundError(f"family: expected {base}.npz and {base}.json (written by save_family / mlem-jax train).")
    with open(base + ".json") as f:
        meta = json.load(f)
    try:
        arrays = np.load(base + ".npz")
        models, params = [], []
        for k, cfg in enumerate(meta["levels"]):
            models.append(UNet(nf=cfg["nf"], ch_mult=tuple(cfg["ch_mult"]), num_res_blocks=cfg["num_res_blocks"],
                               attn_resolutions=tuple(cfg["attn_resolutions"]), num_groups=cfg["num_groups"]))
            prefix = f"level{k}/"
            flat = {name[len(prefix):]: jnp.asarray(arrays[name], jnp.float32) for name in arrays.files if name.startswith(prefix)}
            if not flat:
                raise KeyError(f"no parameters for level {k}")
            params.append(traverse_util.unflatten_dict(flat, sep="/"))
    except Exception as e:
        raise ValueError(f"family: {base}.npz is corrupt or does not match {base}.json ({type(e).__name__}: {e}).") from e
    return Family(tuple(models), tuple(params), sde_from_config(meta["sde"]), meta["parameterization"],
                  tuple(meta["image_shape"]), meta)


def shipped_family_path() -> str:
    """The pretrained digits family that ships inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "digits16")


def combine_families(paths: Sequence[str], out: str, nfs: Sequence[int] | None = None) -> str:
    """Write one family made of the levels of several (for example a new, larger level
    trained on its own with the same recipe), cheapest first; `nfs` selects levels by
    width. The families must share the SDE, parameterisation and image shape. The .json
    records where every level came from. Returns the npz path."""
    families = [load_family(p) for p in paths]
    first = families[0]
    for p, f in zip(paths[1:], families[1:]):
        for field in ("parameterization", "image_shape"):
            if getattr(f, field) != getattr(first, field):
                raise ValueError(f"{p}: its {field} {getattr(f, field)} differs from {paths[0]}'s {getattr(first, field)}.")
        if f.meta["sde"] != first.meta["sde"]:
            raise ValueError(f"{p}: its SDE {f.meta['sde']} differs from {paths[0]}'s {first.meta['sde']}.")
    levels = [(m.nf, m, prm, p) for p, f in zip(paths, families) for m, prm in zip(f.models, f.params)]
    if nfs is not None:
        missing = sorted(set(nfs) - {nf for nf, *_ in levels})
        if missing:
            raise ValueError(f"nfs: no level with nf={missing} in {list(paths)}.")
        levels = [next(lv for lv in levels if lv[0] == nf) for nf in nfs]
    widths = [nf for nf, *_ in levels]
    if widths != sorted(set(widths)):
        raise ValueError(f"nfs: the combined levels must have distinct increasing widths, got {widths}.")
    sources = {str(nf): {"family": p, "command": next(f.meta.get("command") for q, f in zip(paths, families) if q == p),
                         "held_out_loss": next(f.meta.get("held_out_loss", {}).get(str(nf))
                                               for q, f in zip(paths, families) if q == p)}
               for nf, _, _, p in levels}
    extra = {"sources": sources, "dataset": first.meta.get("dataset"),
             "held_out_loss": {k: v["held_out_loss"] for k, v in sources.items()}}
    return save_family(out, [m for _, m, _, _ in levels], [prm for _, _, prm, _ in levels], first.sde,
                       first.parameterization, first.image_shape, extra=extra)
