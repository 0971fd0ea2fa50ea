"""The methods of the image experiment: one `Run` per (method, grid, knobs), and the
samplers they use. A run is data; `image_runner.Runner` owns compilation and timing.

Every sampler has the signature `sampler(y0, dw, ts, knobs, level_key) -> (y, evaluations)`
for one sample (vmapped by the runner), so runs of one `kind` share one compiled
function per grid size.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from mlem_jax import euler_maruyama, geometric_probabilities, heun, multilevel_euler_maruyama, switched_drift
from mlem_jax.calibrate import calibrated_probabilities, stratified_schedule
from mlem_jax.diffusion import reverse_diffusion, uniform_grid


@dataclasses.dataclass(frozen=True)
class Run:
    label: str  # this run, e.g. "EM nf=32, 100 steps"
    method: str  # the method it belongs to (one cost-error front per method), e.g. "EM nf=32"
    kind: tuple  # the sampler: ("em", level), ("stitch", level), ("mlem", coupling, coins), ("heun",)
    steps: int
    ode: bool = False
    knobs: Any = None  # run-time argument of the sampler: probabilities, a switch time
    evaluations: tuple | None = None  # per level, when the sampler does not count them
    distribution: bool = False  # sample the full distribution batch (else the coupled subset only)


def sampler_factory(family):
    """`make(kind, ode) -> sampler(y0, dw, ts, knobs, level_key) -> (y, evaluations or None)`."""
    sde_drifts, ode_drifts = family.drifts(False), family.drifts(True)
    g = reverse_diffusion(family.sde)

    def make(kind, ode):
        drifts = ode_drifts if ode else sde_drifts
        diffusion = None if ode else g
        noise = (lambda dw: None) if ode else (lambda dw: dw)  # the ODE runs get a dummy dw
        name = kind[0]
        if name == "em":
            return lambda y, dw, ts, knobs, lk: (euler_maruyama(drifts[kind[1]], diffusion, y, ts, noise(dw)), None)
        if name == "stitch":
            return lambda y, dw, ts, t_switch, lk: (
                euler_maruyama(switched_drift(drifts[kind[1]], drifts[-1], t_switch), diffusion, y, ts, noise(dw)),
                None)
        if name == "heun":
            return lambda y, dw, ts, knobs, lk: (heun(drifts[-1], None, y, ts), None)
        if name == "mlem":
            _, coupling, coins = kind

            def run(y, dw, ts, probs, lk):
                sol = multilevel_euler_maruyama(drifts, probs, diffusion, y, ts, noise(dw), level_key=lk,
                                                coupling=coupling, coins=coins)
                return sol.y, sol.evaluations

            return run
        raise ValueError(f"kind: unknown sampler {kind!r}")

    return make


def _counts(K, level, n):
    e = np.zeros(K, int)
    e[level] = n
    return tuple(int(v) for v in e)


def learned_runs(cfg, learned: dict) -> list[Run]:
    """ML-EM (iid coins, independent coupling) with the schedules of `learn_probabilities`,
    `learned[(steps, cost_ratio)]`, next to the closed-form calibrated ones of the same cost ratios."""
    label = "ML-EM iid learned (independent)"
    return [Run(f"{label}, {n} steps, cost ratio {rho}", label, ("mlem", "independent", "iid"), n, knobs=p,
                distribution=True) for (n, rho), p in learned.items()]


def sde_runs(cfg, nfs, stats, prob_costs, log=print) -> list[Run]:
    """EM per level, the T-Stitch switch, ML-EM (iid and stratified coins, several
    schedules) on the reverse SDE. Runs marked `distribution` are also sampled at the full
    distribution batch."""
    K, top = len(nfs), f"nf={nfs[-1]}"
    runs = [Run(f"EM {top}, {n} steps", f"EM {top}", ("em", K - 1), n, evaluations=_counts(K, K - 1, n),
                distribution=True) for n in cfg.em_steps]
    for k in range(K - 1):
        runs += [Run(f"EM nf={nfs[k]}, {n} steps", f"EM nf={nfs[k]}", ("em", k), n, evaluations=_counts(K, k, n),
                     distribution=(k == K - 2)) for n in cfg.small_steps]
    for k in cfg.stitch_levels:
        for frac in cfg.stitch_fractions:
            for n in cfg.stitch_steps:
                ts = np.asarray(uniform_grid(n, cfg.t_min))
                m = int(round(frac * n))
                t_switch = jnp.float32(0.5 * (ts[m - 1] + ts[m])) if m > 0 else jnp.float32(2.0)
                ev = np.zeros(K, int)
                ev[k], ev[-1] = m, n - m
                runs.append(Run(f"T-Stitch nf={nfs[k]}->{nfs[-1]} ({frac:.0%} small), {n} steps",
                                f"T-Stitch nf={nfs[k]}->{nfs[-1]} ({frac:.0%} small)", ("stitch", k), n,
                                knobs=t_switch, evaluations=tuple(int(v) for v in ev),
                                distribution=(frac == cfg.stitch_fractions[0])))
    for coupling in cfg.couplings:
        p = jnp.asarray(geometric_probabilities(K, cfg.geometric_ratio), jnp.float32)
        for coins in ("iid", "stratified"):
            lab = f"ML-EM geometric r={cfg.geometric_ratio} ({coupling}, {coins})"
            runs += [Run(f"{lab}, {n} steps", lab, ("mlem", coupling, coins), n, knobs=p)
                     for n in cfg.geometric_steps]
        for time_dependent, name in ((False, "constant"), (True, "calibrated")):
            runs += _cost_ratio_sweep(f"ML-EM iid {name} ({coupling})", cfg, stats, prob_costs, coupling, "iid",
                                  time_dependent, log)
            runs += _cost_ratio_sweep(f"ML-EM stratified {name} ({coupling})", cfg, stats, prob_costs, coupling,
                                  "stratified", time_dependent, log)
    return runs


def _cost_ratio_sweep(label, cfg, stats, prob_costs, coupling, coins, time_dependent, log, ode=False) -> list[Run]:
    """ML-EM at each grid and cost ratio (expected cost per step / one step of the finest
    level): the iid optimum of `calibrated_probabilities`, or the stratified cube-root
    schedule of `stratified_schedule`."""
    out = []
    steps, ratios = (cfg.ode_mlem_steps, cfg.ode_mlem_cost_ratios) if ode else (cfg.mlem_steps, cfg.mlem_cost_ratios)
    for n in steps:
        for rho in ratios:
            budget = rho * n * prob_costs[-1]
            try:
                if coins == "iid":
                    p = calibrated_probabilities(stats, prob_costs, (1.0 - cfg.t_min) / n, budget=budget, num_steps=n,
                                                 time_dependent=time_dependent, coupling=coupling)
                else:
                    p, _ = stratified_schedule(stats, prob_costs, n, budget, coupling=coupling,
                                               time_dependent=time_dependent)
            except ValueError as e:
                log(f"  {label}, {n} steps, cost ratio {rho}: skipped ({e})")
                continue
            out.append(Run(f"{label}, {n} steps, cost ratio {rho}", label, ("mlem", coupling, coins), n, ode=ode,
                           knobs=p,
                           distribution=(not ode and time_dependent and coins == "stratified"
                                         and coupling == cfg.couplings[0])))
    return out


def ode_runs(cfg, nfs, stats_ode, prob_costs, log=print) -> list[Run]:
    """Euler, Heun and ML-EM (iid and stratified coins) on the probability-flow ODE."""
    K, top = len(nfs), f"nf={nfs[-1]}"
    runs = [Run(f"Euler {top}, {n} steps", f"Euler {top}", ("em", K - 1), n, ode=True,
                evaluations=_counts(K, K - 1, n)) for n in cfg.ode_steps]
    runs += [Run(f"Heun {top}, {n} steps", f"Heun {top}", ("heun",), n, ode=True,
                 evaluations=_counts(K, K - 1, 2 * n)) for n in cfg.heun_steps]
    for coins in ("iid", "stratified"):
        runs += _cost_ratio_sweep(f"ML-EM ODE {coins} calibrated", cfg, stats_ode, prob_costs, "independent", coins,
                              True, log, ode=True)
    return runs
