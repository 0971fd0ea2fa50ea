"""Calibration files: a schedule with what it was made for, written atomically and refused
for another setting."""

from __future__ import annotations

import os
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError
from mlem_jax._schedules import PiecewiseConstant


class Calibration(NamedTuple):
    """A calibration file's content: the schedule and what it was made for.

    probs: PiecewiseConstant (pass it as `probs`).
    levels: the nf (or any identifier) of each level, cheapest first.
    steps, grid: the sampling grid it was calibrated on (number of steps, grid kind).
    coins, coupling: the coin scheme and coupling it assumed.
    meta: everything else in the file (command, predictions, how it was made).
    """

    probs: PiecewiseConstant
    levels: list
    steps: int
    grid: str
    coins: str
    coupling: str
    meta: dict


def save_calibration(path: str, probs, *, levels, steps: int, grid: str, coins: str = "iid",
                     coupling: str = "independent", solver: str = "em", control: str | None = None,
                     exclusive: bool = False, **meta) -> str:
    """Write a schedule (PiecewiseConstant or constant array) with the grid, coins, solver and
    control variate it was made for, atomically, as JSON. With `exclusive`, a file that exists
    at write time is not replaced (`FileExistsError`).

    Args:
      path: the JSON file to write.
      probs: a `PiecewiseConstant` or a constant array (K,).
      levels: what the levels are (recorded, checked on use).
      steps: the grid's number of steps it was made for.
      grid: the grid's name.
      coins: "iid" or "stratified".
      coupling: "independent" or "nested".
      solver: the sampler it was made for.
      control: the control variate, or None.
      exclusive: never replace a file that exists at write time.
      **meta: recorded as they are (the command, predicted speedup, ...).
    """
    import json
    import os

    if isinstance(probs, PiecewiseConstant):
        edges, values = np.asarray(probs.edges, np.float64), np.asarray(probs.values, np.float64)
    else:
        values = np.atleast_2d(np.asarray(probs, np.float64))
        edges = np.array([0.0, 1.0])
    record = {"levels": list(levels), "edges": edges.tolist(), "values": values.tolist(), "steps": int(steps),
              "grid": grid, "coins": coins, "coupling": coupling, "solver": solver, "control": control, **meta}
    _check_calibration_values(record, path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from mlem_jax._atomic import atomic_path

    with atomic_path(path, exclusive=exclusive) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=lambda x: np.asarray(x).tolist())
    return path


def _check_calibration_values(record: dict, path: str) -> None:
    for field in ("levels", "edges", "values", "steps", "grid"):
        if field not in record:
            raise InputError(f"calibration {path}: missing the field {field!r}; write the file with "
                             "mlem-jax calibrate (or mlem_jax.calibrate.save_calibration).")
    if not isinstance(record["levels"], list) or not record["levels"]:
        raise InputError(f"calibration {path}: levels must be a non-empty list (the nf of each level), got "
                         f"{record['levels']!r}.")
    try:
        edges = np.asarray(record["edges"], np.float64)
        values = np.asarray(record["values"], np.float64)
    except (TypeError, ValueError) as e:
        raise InputError(f"calibration {path}: edges and values must be numbers ({e}).") from e
    K = len(record["levels"])
    if values.ndim != 2 or values.shape[1] != K or edges.shape != (values.shape[0] + 1,):
        raise InputError(f"calibration {path}: expected values of shape (bins, {K}) and bins + 1 edges, got "
                         f"values {values.shape} and {edges.shape[0]} edges.")
    if not np.all(np.isfinite(edges)) or np.any(np.diff(edges) <= 0):
        raise InputError(f"calibration {path}: the bin edges must be finite and increasing, got {edges.tolist()}.")
    if not np.all(np.isfinite(values)) or np.any(values <= 0) or np.any(values > 1):
        raise InputError(f"calibration {path}: every probability must lie in (0, 1]; got min {np.nanmin(values):.3g}, "
                         f"max {np.nanmax(values):.3g}" + (" and NaN" if np.isnan(values).any() else "") + ".")
    if np.any(values[:, 0] != 1):
        raise InputError(f"calibration {path}: the first level must have probability 1, got {values[:, 0].min():.3g}.")
    if record.get("coupling", "independent") == "nested" and np.any(np.diff(values, axis=1) > 0):
        raise InputError(f"calibration {path}: the nested coupling needs non-increasing probabilities.")
    if record.get("coins", "iid") not in ("iid", "stratified"):
        raise InputError(f"calibration {path}: coins must be 'iid' or 'stratified', got {record['coins']!r}.")
    steps = record["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InputError(f"calibration {path}: steps must be an integer in [1, {MAX_STEPS}], got {steps!r}.")
    _check_choice(record, path, "grid", GRIDS, None)
    _check_choice(record, path, "coupling", ("independent", "nested"), "independent")
    _check_choice(record, path, "control", (None, "cached", "extrapolated"), None)
    _check_choice(record, path, "solver", SOLVER_NAMES, "em")


MAX_STEPS = 10_000_000
GRIDS = ("uniform", "quadratic", "karras", "logsnr")
SOLVER_NAMES = ("em", "heun", "ddim", "dpm++2m", "dpm++3m", "sde-dpm++2m", "edm-euler", "edm-heun")


def _check_choice(record, path, field, choices, default):
    value = record.get(field, default)
    if isinstance(value, bool) or value not in choices:
        raise InputError(f"calibration {path}: {field} must be one of {list(choices)}, got {value!r}.")


def load_calibration(path: str) -> Calibration:
    """Read and validate a calibration file (outside any trace, so bad values fail here)."""
    from mlem_jax._atomic import read_json

    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration {path}: file not found (write one with mlem-jax calibrate).")
    record = read_json(path, f"calibration {path}:")
    if not isinstance(record, dict):
        raise InputError(f"calibration {path}: expected a JSON object.")
    _check_calibration_values(record, path)
    probs = PiecewiseConstant(jnp.asarray(record["edges"], jnp.float32), jnp.asarray(record["values"], jnp.float32))
    known = ("levels", "edges", "values", "steps", "grid", "coins", "coupling")
    return Calibration(probs, list(record["levels"]), int(record["steps"]), str(record["grid"]),
                       record.get("coins", "iid"), record.get("coupling", "independent"),
                       {k: v for k, v in record.items() if k not in known})


def check_calibration_use(cal: Calibration, path: str, *, levels, steps: int, grid: str, coins: str,
                          coupling: str, solver: str = "em", control: str | None = None) -> None:
    """Refuse a calibration used on another grid, other levels, other coins, coupling, solver
    or control variate: its probabilities were chosen for those (p scales with the step size,
    and each solver weighs its model calls differently). A file without a solver was made
    for EM without a control.

    Args:
      cal: the loaded `Calibration`.
      path: its file, named in the error.
      levels: the levels it is about to be used with.
      steps: the grid's number of steps.
      grid: the grid's name.
      coins: "iid" or "stratified".
      coupling: "independent" or "nested".
      solver: the sampler's name.
      control: the control variate, or None.
    """
    problems = []
    made_solver, made_control = cal.meta.get("solver", "em"), cal.meta.get("control")
    if solver != made_solver:
        problems.append(f"solver {made_solver!r} (sampling solver {solver!r})")
    if control != made_control:
        problems.append(f"control={made_control!r} (sampling control={control!r})")
    if list(levels) != list(cal.levels):
        problems.append(f"levels {cal.levels} (sampling {list(levels)})")
    if steps != cal.steps or grid != cal.grid:
        problems.append(f"a {cal.grid} grid of {cal.steps} steps (sampling {grid}, {steps} steps)")
    if coins != cal.coins:
        problems.append(f"coins={cal.coins!r} (sampling coins={coins!r})")
    if coupling != cal.coupling:
        problems.append(f"coupling={cal.coupling!r} (sampling coupling={coupling!r})")
    if problems:
        raise InputError(
            f"calibration {path}: made for " + "; ".join(problems) + ". Its probabilities are chosen for that "
            "setting; recalibrate (mlem-jax calibrate) or sample with the setting it was made for."
        )
