"""Checkpoints and the descriptions stored with them, through orbax.

`Checkpoints` holds one orbax `CheckpointManager` for a directory, for as long as a
training run (or a read) needs it. A save is made in the background (orbax copies the
arrays to the host, then writes while training goes on) every `every` steps, orbax's
`save_interval_steps`; closing it, which a `with` block does even on an exception, Ctrl-C
or SIGTERM, waits for the save in flight, so that no save is lost at exit. Orbax writes
into a temporary folder and renames it when complete: an interrupted save leaves the
previous checkpoint intact.

The module functions (`save_checkpoint`, `restore_checkpoint`, `read_metadata`,
`latest_step`, `all_steps`, `load_level`) open one for a single call. `model_config` /
`sde_config` describe a UNet and an SDE as JSON for checkpoints and families.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax

from mlem_jax._errors import InputError
from mlem_jax.diffusion.objective import RESUME_FIELDS, TrainConfig, TrainState, init_state
from mlem_jax.diffusion.sde import VE, VP, Flow, SubVP
from mlem_jax.diffusion.unet import UNet


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


class Checkpoints:
    """One orbax `CheckpointManager` over `directory` (created when missing).

    `save(state, meta)` may be called at every step: it saves at multiples of `every` (orbax's
    `save_interval_steps`; 1 when None) and when `force=True`, in the background. `close()`
    waits for a save in flight and releases the manager; use it as a context manager."""

    def __init__(self, directory: str, every: int | None = None, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = directory
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 save_interval_steps=max(1, int(every or 1))))

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Wait for the save in flight, then release the manager."""
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def steps(self) -> list[int]:
        """The steps of the checkpoints, oldest first."""
        return sorted(int(s) for s in self.manager.all_steps())

    def save(self, state: TrainState, meta: dict, force: bool = False) -> bool:
        """Save `state` at `state.step` with `meta` when the cadence (or `force`) says so; True if it did."""
        import orbax.checkpoint as ocp

        return bool(self.manager.save(int(state.step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state._asdict()), meta=ocp.args.JsonSave(meta)), force=force))

    def _restore(self, step: int, **items):
        import orbax.checkpoint as ocp

        quiet_closed_loop_callbacks()  # before: a failing restore's reads may end while its error is raised
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise InputError(f"checkpoint: step {step} in {self.directory!r} is corrupt or incomplete "
                             f"({type(e).__name__}: {first_line(e)}).") from e

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of the latest (or given) checkpoint; names the step when it is corrupt."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"checkpoint: no checkpoint in {self.directory!r}.")
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, model: UNet, image_shape, config: TrainConfig, step: int | None = None, mesh=None):
        """(state, meta) of the latest (or given) step, after checking it matches `model` and the image
        shape; with `mesh`, the state comes back replicated over it as global arrays."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step() if step is None else step
        meta = self.metadata(step)
        check_compatible(meta, model, image_shape, self.directory)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          init_state(model, image_shape, config)._asdict())
        if mesh is not None:
            from mlem_jax.parallel._mesh import replicated

            abstract = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated(mesh)), abstract)
        restored = self._restore(step, state=ocp.args.StandardRestore(abstract))["state"]
        return TrainState(**restored), meta

    def restore_latest_intact(self, model: UNet, image_shape, config: TrainConfig, mesh=None,
                              set_aside: bool = False):
        """(state, meta) of the newest checkpoint that restores; a corrupt newer one (a kill during a
        save that orbax did not finish renaming, a damaged disk) is skipped with a warning. Fails only
        when none restores. `set_aside=True` (a run that resumes and will save those steps again)
        renames each skipped one to `<step>.unreadable`, kept for inspection."""
        import warnings

        errors, skipped = [], []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(model, image_shape, config, step, mesh=mesh)
            except InputError as e:
                if "corrupt or incomplete" not in str(e):
                    raise
                errors.append(str(e))
                skipped.append(step)
                continue
            if errors:
                kept = ""
                if set_aside:
                    self._set_aside(skipped)
                    kept = "; kept as " + ", ".join(f"{s}.unreadable" for s in skipped)
                warnings.warn(f"checkpoint: skipped {len(errors)} unreadable checkpoint(s) in {self.directory!r}; "
                              f"resuming from step {step}{kept}. First error: {errors[0]}", stacklevel=2)
            return state, meta
        raise InputError(f"checkpoint: no checkpoint in {self.directory!r} can be restored: " + " | ".join(errors))

    def _set_aside(self, steps) -> None:
        if jax.process_index() == 0:
            for step in steps:
                old = os.path.join(self.directory, str(step))
                new = old + ".unreadable"
                if os.path.exists(new):  # an earlier one set aside at the same step: keep both
                    new = f"{new}.{os.getpid()}.{len(os.listdir(self.directory))}"
                os.rename(old, new)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("mlem_jax set aside " + os.path.abspath(self.directory))
        self.manager.reload()


def save_checkpoint(directory: str, state: TrainState, meta: dict) -> None:
    """Write state and metadata for `state.step` and wait until it is on disk.

    Args:
      directory: the checkpoint folder.
      state: the `TrainState`, saved at `state.step`.
      meta: JSON metadata (model, image shape, SDE, recipe).
    """
    with Checkpoints(directory) as c:
        c.save(state, meta, force=True)


def all_steps(directory: str) -> list[int]:
    """The steps of the finalized checkpoints in `directory`, oldest first ([] when it does not exist).

    A listing of the folder only: no orbax manager, so no barrier between processes, and any
    one process may call it on its own."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return []
    return sorted(ocp.path.step.checkpoint_steps(directory))


def latest_step(directory: str) -> int | None:
    """The newest checkpoint's step, or None."""
    steps = all_steps(directory)
    return steps[-1] if steps else None


def read_metadata(directory: str, step: int | None = None) -> dict:
    """The JSON metadata of the latest (or given) checkpoint; names the step when it is corrupt."""
    if not all_steps(directory):
        raise FileNotFoundError(f"checkpoint: no checkpoint in {directory!r}.")
    with Checkpoints(directory) as c:
        return c.metadata(step)


def restore_checkpoint(directory: str, model: UNet, image_shape, config: TrainConfig, step: int | None = None,
                       mesh=None):
    """(state, meta) of the latest (or given) step, after checking it matches `model`.

    With `mesh`, the state comes back replicated over it as global arrays (every process
    of a multi-process run calls this); the checkpoint may have been written by another
    number of processes or devices.

    Args:
      directory: the checkpoint folder.
      model: the UNet it must have been written for.
      image_shape: the images it must have been written for.
      config: the recipe (its optimiser shapes the state).
      step: the step (default: the latest).
      mesh: restore replicated over this mesh.
    """
    if not all_steps(directory):
        raise FileNotFoundError(f"checkpoint: no checkpoint in {directory!r}.")
    with Checkpoints(directory) as c:
        return c.restore(model, image_shape, config, step, mesh)


def restore_latest_intact(directory: str, model: UNet, image_shape, config: TrainConfig, mesh=None):
    """`Checkpoints.restore_latest_intact` on `directory`."""
    with Checkpoints(directory) as c:
        return c.restore_latest_intact(model, image_shape, config, mesh)


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


def check_resume(meta: dict, config: TrainConfig, directory: str) -> None:
    """Refuse to resume a run with another recipe (seed, batch size, learning rate, ...)."""
    saved = meta.get("config", {})
    diff = [f"{k}={saved[k]!r} (now {getattr(config, k)!r})" for k in RESUME_FIELDS
            if k in saved and saved[k] != getattr(config, k)]
    if diff:
        raise InputError(f"resume: {directory!r} was trained with " + ", ".join(diff) + "; resume with the same "
                         "recipe, or start a new run in another directory (or overwrite this one).")


def quiet_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" errors of a failed orbax restore from then on
    (installed before every restore: the failing restore's reads may complete while its
    error is still being raised, before an `except` clause could install it).

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


def load_level(directory: str, step: int | None = None):
    """(model, ema_params, sde, parameterization, meta) from a checkpoint directory, the
    model rebuilt from the checkpoint's metadata."""
    if not all_steps(directory):
        raise FileNotFoundError(f"checkpoint: no checkpoint in {directory!r}.")
    with Checkpoints(directory) as c:
        meta = c.metadata(step)
        model = model_from_config(meta["model"])
        config = TrainConfig(**{k: v for k, v in meta["config"].items() if k in TrainConfig._fields})
        state, meta = c.restore(model, meta["image_shape"], config, step)
    return model, state.ema_params, sde_from_config(meta["sde"]), meta["parameterization"], meta
