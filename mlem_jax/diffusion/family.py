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

from mlem_jax._errors import InputError
from mlem_jax.diffusion.checkpoint import model_config, model_from_config, sde_config, sde_from_config
from mlem_jax.diffusion.parameterization import reverse_drift
from mlem_jax.diffusion.unet import UNet, denoiser_model, score_model


class Family(NamedTuple):
    """A trained family: the UNet and parameters of each level (cheapest first), its SDE,
    parameterisation, image shape and metadata; `drifts()` gives the ML-EM levels and
    `denoisers()` the data predictions of the diffusion samplers."""

    models: tuple  # UNet per level, cheapest first
    params: tuple  # parameters per level
    sde: Any
    parameterization: str
    image_shape: tuple
    meta: dict

    @property
    def num_classes(self) -> int:
        """The number of classes of a conditional family (its levels take the label as `args`), 0 if unconditional."""
        return self.models[0].num_classes

    def drifts(self, probability_flow: bool = False) -> tuple:
        """The ML-EM levels: reverse-time drifts f(t, y, args) for single images."""
        return tuple(
            reverse_drift(self.sde, score_model(m, p, self.sde, self.parameterization), probability_flow)
            for m, p in zip(self.models, self.params)
        )

    def denoisers(self) -> tuple:
        """The levels as data predictions D^k(t, x, args) for single images, from the
        parameterisation the family was trained with: what the diffusion samplers take."""
        return tuple(denoiser_model(m, p, self.sde, self.parameterization) for m, p in zip(self.models, self.params))


def save_family(path: str, models: Sequence[UNet], params: Sequence[Any], sde, parameterization: str,
                image_shape, extra: dict | None = None, dtype=np.float16) -> str:
    """Write `path`.npz and `path`.json; returns the npz path.

    Args:
      path: the file stem (writes path.npz and path.json).
      models: the UNets, cheapest first.
      params: their (EMA) parameters.
      sde: the schedule.
      parameterization: what the networks predict.
      image_shape: one image's shape.
      extra: more metadata for the .json.
      dtype: of the stored weights.
    """
    base = path[:-4] if path.endswith(".npz") else path
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    arrays = {}
    for k, p in enumerate(params):
        for name, v in traverse_util.flatten_dict(jax.device_get(p), sep="/").items():
            arrays[f"level{k}/{name}"] = np.asarray(v, dtype)
    # what the weights cannot tell: the images they were trained on and the SDE (checked at load)
    arrays["meta/image_shape"] = np.asarray(image_shape, np.int32)
    arrays["meta/sde"] = np.frombuffer(json.dumps(sde_config(sde), sort_keys=True).encode(), np.uint8)
    meta = {"levels": [model_config(m) for m in models], "sde": sde_config(sde),
            "parameterization": parameterization, "image_shape": list(image_shape), **(extra or {})}
    from mlem_jax._atomic import atomic_path

    with atomic_path(base + ".npz") as tmp, open(tmp, "wb") as f:  # a reader never sees half a file
        np.savez_compressed(f, **arrays)
    with atomic_path(base + ".json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return base + ".npz"


def _check_sde(cfg, where: str) -> None:
    if not isinstance(cfg, dict):
        raise InputError(f"family: {where} has sde {cfg!r}; expected an object such as "
                         '{"kind": "VP", "beta_min": 0.1, "beta_max": 20.0}.')
    kind = cfg.get("kind")
    names = {"VP": ("beta_min", "beta_max"), "SubVP": ("beta_min", "beta_max"), "VE": ("sigma_min", "sigma_max"),
             "Flow": ()}
    if kind not in names:
        raise InputError(f"family: {where} has an unknown SDE kind {kind!r}; expected 'VP', 'SubVP', 'VE' or 'Flow'.")
    unknown = sorted(set(cfg) - {"kind", *names[kind]})
    if unknown:
        raise InputError(f"family: {where} has a {kind} SDE with unknown fields {unknown}; expected {names[kind]}.")
    for name in names[kind]:
        value = cfg.get(name)
        if name in cfg and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"family: {where} has {name} = {value!r} ({type(value).__name__}); expected a number.")
    if kind == "Flow":
        return
    if kind in ("VP", "SubVP"):
        lo, hi = cfg.get("beta_min", 0.1), cfg.get("beta_max", 20.0)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 <= lo < hi):
            raise InputError(f"family: {where} has a {kind} SDE with beta_min={lo}, beta_max={hi}; expected "
                             "0 <= beta_min < beta_max.")
    else:
        lo, hi = cfg.get("sigma_min", 0.01), cfg.get("sigma_max", 50.0)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
            raise InputError(f"family: {where} has a VE SDE with sigma_min={lo}, sigma_max={hi}; expected "
                             "0 < sigma_min < sigma_max.")


def load_family(path: str) -> Family:
    """Read a family written by `save_family` (path to the .npz or its stem), checking that
    the .json and the .npz agree (levels, every parameter's shape), that the weights are
    finite and the SDE valid: a mismatch is an error naming the file, never a wrong sample."""
    base = path[:-4] if path.endswith(".npz") else path
    if not os.path.exists(base + ".npz") or not os.path.exists(base + ".json"):
        raise FileNotFoundError(f"family: expected {base}.npz and {base}.json "
                                "(written by save_family / mlem-jax train).")
    meta = _read_meta(base + ".json")
    shape = meta["image_shape"]
    arrays = _read_arrays(base + ".npz")
    if "meta/image_shape" in arrays and list(arrays["meta/image_shape"]) != list(shape):
        trained = arrays["meta/image_shape"].tolist()
        raise InputError(f"family: {base}.npz was trained on images of shape {trained}, but "
                         f"{base}.json says {shape}; the two files do not belong together.")
    if "meta/sde" in arrays:
        try:
            trained_sde = json.loads(arrays["meta/sde"].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"family: {base}.npz has a damaged 'meta/sde' record ({type(e).__name__}: {e}); the file "
                             "is damaged or not written by save_family.") from e
        if trained_sde != dict(meta["sde"]):
            raise InputError(f"family: {base}.npz was trained with the SDE {trained_sde}, but {base}.json says "
                             f"{meta['sde']}; the two files do not belong together.")
    stored = sorted({n.split("/", 1)[0] for n in arrays if n.startswith("level")})
    expected = [f"level{k}" for k in range(len(meta["levels"]))]
    if sorted(stored) != sorted(expected):
        raise InputError(f"family: {base}.npz holds {len(stored)} levels ({stored}) but {base}.json describes "
                         f"{len(expected)}; the two files do not belong together.")
    levels = [_read_level(k, cfg, arrays, shape, base) for k, cfg in enumerate(meta["levels"])]
    classes = [m.num_classes for m, _ in levels]
    if len(set(classes)) > 1:
        raise InputError(f"family: the levels of {base}.json have num_classes {classes}; every level of a family "
                         "takes the same labels.")
    return Family(tuple(m for m, _ in levels), tuple(p for _, p in levels), sde_from_config(meta["sde"]),
                  meta["parameterization"], tuple(shape), meta)


def _read_meta(where: str) -> dict:
    """The family's JSON, with every field the loader uses type-checked (an error naming the file and field)."""
    from mlem_jax._atomic import read_json
    from mlem_jax.diffusion.parameterization import PARAMETERIZATIONS

    meta = read_json(where, f"family: {where} is")
    if not isinstance(meta, dict):
        raise InputError(f"family: {where} holds a {type(meta).__name__}, not an object; write families with "
                         "save_family / mlem-jax train.")
    missing = [k for k in ("levels", "sde", "parameterization", "image_shape") if k not in meta]
    if missing:
        raise InputError(f"family: {where} lacks {missing}; write families with save_family / mlem-jax train.")
    levels = meta["levels"]
    if not (isinstance(levels, list) and levels and all(isinstance(c, dict) for c in levels)):
        raise InputError(f"family: {where} has levels = {str(levels)[:80]!r}; expected a non-empty list of UNet "
                         'descriptions ({"nf": 8, "ch_mult": [1, 2, 2], ...}).')
    if meta["parameterization"] not in PARAMETERIZATIONS:
        raise InputError(f"family: {where} has parameterization {meta['parameterization']!r}; expected one of "
                         f"{PARAMETERIZATIONS}.")
    shape = meta["image_shape"]
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise InputError(f"family: {where} has image_shape {shape!r}; expected [height, width, channels].")
    _check_sde(meta["sde"], where)
    return meta


def _read_arrays(where: str) -> dict:
    """Every member of the npz, read now (no pickles): a damaged member or an object array is an error
    naming the file and the member."""
    try:
        archive = np.load(where, allow_pickle=False)
        names = archive.files
    except Exception as e:
        raise InputError(f"family: {where} is not a readable npz file ({type(e).__name__}: {e}).") from e
    arrays = {}
    with archive:
        for name in names:
            try:
                arrays[name] = archive[name]
            except Exception as e:  # BadZipFile, a CRC error, an object array (allow_pickle=False), ...
                raise InputError(f"family: member {name!r} of {where} cannot be read ({type(e).__name__}: {e}); "
                                 "the file is damaged or was not written by save_family.") from e
    return arrays


def _read_level(k: int, cfg: dict, arrays: dict, shape, base: str):
    """(UNet, parameters) of level k, its parameter names and shapes checked against the model the JSON
    describes and its weights finite."""
    from mlem_jax.diffusion.unet import init_params

    try:
        model = model_from_config(cfg)
        model.check_input((1, *shape))
        template = traverse_util.flatten_dict(
            jax.eval_shape(lambda: init_params(model, jax.random.key(0), shape)), sep="/")
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"family: level {k} of {base}.json is not a valid UNet description ({e}).") from e
    prefix = f"level{k}/"
    flat = {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}
    if set(flat) != set(template):
        extra, lacking = sorted(set(flat) - set(template)), sorted(set(template) - set(flat))
        raise InputError(f"family: level {k} (nf={cfg['nf']}) of {base}.npz does not match {base}.json: "
                         f"{len(lacking)} parameters missing ({lacking[:2]}), {len(extra)} unexpected "
                         f"({extra[:2]}).")
    for name, spec in template.items():
        if tuple(flat[name].shape) != tuple(spec.shape):
            raise InputError(f"family: level {k} (nf={cfg['nf']}) of {base}.npz has {name} of shape "
                             f"{tuple(flat[name].shape)}, but {base}.json's model needs {tuple(spec.shape)}; "
                             "the two files do not belong together.")
        if not np.issubdtype(flat[name].dtype, np.floating):
            raise InputError(f"family: level {k} (nf={cfg['nf']}) of {base}.npz has {name} of dtype "
                             f"{flat[name].dtype}; weights are floating point: the file is damaged.")
        if not np.all(np.isfinite(flat[name])):
            raise InputError(f"family: level {k} (nf={cfg['nf']}) of {base}.npz has non-finite weights in "
                             f"{name}; the training diverged or the file is damaged.")
    params = traverse_util.unflatten_dict({n: jnp.asarray(v, jnp.float32) for n, v in flat.items()}, sep="/")
    return model, params


_ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")


def shipped_family_path() -> str:
    """The pretrained digits family that ships inside the package."""
    return os.path.join(_ASSETS, "digits16")


def demo_family_path() -> str:
    """The two-level Fashion-MNIST 16x16 UNet family of the earlier demo (`mlem-jax demo --family`):
    levels of `benchmarks/weights/fmnist16` and the separately trained nf=64 top (float16; how
    each was trained is in its .json). It lives in the repository's `benchmarks/weights`, not in
    the package (whose shipped weights are the digits family and the exact testbed)."""
    return os.path.join(os.path.dirname(os.path.dirname(_ASSETS)), "benchmarks", "weights", "fmnist16_demo")


def combine_families(paths: Sequence[str], out: str, nfs: Sequence[int] | None = None) -> str:
    """Write one family made of the levels of several (for example a new, larger level
    trained on its own with the same recipe), cheapest first; `nfs` selects levels by
    width. The families must share the SDE, parameterisation and image shape. The .json
    records where every level came from. Returns the npz path.

    Args:
      paths: the families to take levels from.
      out: the new family's file stem.
      nfs: the widths to keep (default: all).
    """
    families = [load_family(p) for p in paths]
    first = families[0]
    for p, f in zip(paths[1:], families[1:]):
        for field in ("parameterization", "image_shape"):
            if getattr(f, field) != getattr(first, field):
                mine, theirs = getattr(f, field), getattr(first, field)
                raise InputError(f"{p}: its {field} {mine} differs from {paths[0]}'s {theirs}.")
        if f.meta["sde"] != first.meta["sde"]:
            raise InputError(f"{p}: its SDE {f.meta['sde']} differs from {paths[0]}'s {first.meta['sde']}.")
    levels = [(m.nf, m, prm, p) for p, f in zip(paths, families) for m, prm in zip(f.models, f.params)]
    if nfs is not None:
        missing = sorted(set(nfs) - {nf for nf, *_ in levels})
        if missing:
            raise InputError(f"nfs: no level with nf={missing} in {list(paths)}.")
        levels = [next(lv for lv in levels if lv[0] == nf) for nf in nfs]
    widths = [nf for nf, *_ in levels]
    if widths != sorted(set(widths)):
        raise InputError(f"nfs: the combined levels must have distinct increasing widths, got {widths}.")
    def source(nf, p):
        f = families[paths.index(p)]
        if str(nf) in f.meta.get("sources", {}):  # itself combined: where that level came from
            return f.meta["sources"][str(nf)]
        return {"family": p, "command": f.meta.get("command"),
                "held_out_loss": f.meta.get("held_out_loss", {}).get(str(nf))}

    sources = {str(nf): source(nf, p) for nf, _, _, p in levels}
    extra = {"sources": sources, "dataset": first.meta.get("dataset"),
             "held_out_loss": {k: v["held_out_loss"] for k, v in sources.items()}}
    return save_family(out, [m for _, m, _, _ in levels], [prm for _, _, prm, _ in levels], first.sde,
                       first.parameterization, first.image_shape, extra=extra)
