"""Runs the methods of `image_methods` on shared noise: one compiled sampler per (kind,
grid, batch), wall time measured apart from compilation, samples produced in chunks
with a progress bar, and every run scored against the reference and the held-out data.

Noise: chunk c of the batch gets its prior draws and its Brownian increments on the
reference grid from fold_in(noise_key, c); a coarser grid sums the fine increments, so
every method of every chunk follows the same path as the reference.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax.diffusion import uniform_grid
from mlem_jax.diffusion.metrics import coupled_error, kernel_distance


class Runner:
    def __init__(self, family, make_sampler: Callable, cfg, level_flops, key, log=print):
        self.family, self.make, self.cfg, self.log = family, make_sampler, cfg, log
        self.flops = np.asarray(level_flops, np.float64)
        self.shape = tuple(family.image_shape)
        self.noise_key, self.level_key = jax.random.fold_in(key, 5), jax.random.fold_in(key, 6)
        self.n_ref = cfg.ref_factor * max(cfg.em_steps)
        self.compiled: dict = {}
        self.references: dict = {}  # ode -> reference samples of the coupled subset

    # -------------------------------------------------------------------- noise
    def noise(self, start: int, size: int, n: int, ode: bool):
        """(y0, increments on a grid of n steps) of samples start .. start + size - 1; sample i
        draws from fold_in(noise_key, i) whatever the chunking."""
        keys = jax.vmap(lambda i: jax.random.fold_in(self.noise_key, i))(start + jnp.arange(size))
        y0 = jax.vmap(lambda k: self.family.sde.prior_sample(jax.random.fold_in(k, 0), self.shape))(keys)
        if ode:
            return y0, jnp.zeros((size, 1))
        if self.n_ref % n:
            raise ValueError(f"steps: {n} does not divide the reference grid of {self.n_ref} steps.")
        h = (1.0 - self.cfg.t_min) / self.n_ref
        dw = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (self.n_ref, *self.shape)))(
            keys) * math.sqrt(h)
        return y0, dw.reshape(size, n, self.n_ref // n, *self.shape).sum(2)

    # ---------------------------------------------------------------------- run
    def sample(self, run, size: int, equal_batch: bool | None = None):
        """Samples of `run` for the first `size` samples of the shared noise, the wall
        time of sampling them (compilation excluded) and the evaluations per path."""
        # every run is timed at the same batch (a GPU's cost per sample falls steeply with the
        # batch); a run of fewer samples computes one whole chunk and keeps its first `size`
        equal_batch = self.cfg.equal_batch if equal_batch is None else equal_batch
        chunk = self.cfg.chunk if equal_batch else min(self.cfg.chunk, size)
        ts = uniform_grid(run.steps, self.cfg.t_min)
        knob_shapes = str(jax.tree_util.tree_map(jnp.shape, run.knobs))
        key = (run.kind, run.ode, run.steps, chunk, knob_shapes)
        if key not in self.compiled:
            fn = jax.jit(jax.vmap(self.make(run.kind, run.ode), in_axes=(0, 0, None, None, None)))
            y0, dw = jax.eval_shape(lambda: self.noise(0, chunk, run.steps, run.ode))  # shapes only
            self.compiled[key] = fn.lower(y0, dw, ts, run.knobs, self.level_key).compile()
        fn = self.compiled[key]
        out, seconds, evaluations = [], 0.0, None
        for c in range(math.ceil(size / chunk)):
            y0, dw = self.noise(c * chunk, chunk, run.steps, run.ode)
            jax.block_until_ready((y0, dw))
            t0 = time.perf_counter()
            y, ev = jax.block_until_ready(fn(y0, dw, ts, run.knobs, jax.random.fold_in(self.level_key, c)))
            seconds += time.perf_counter() - t0
            out.append(np.asarray(y))
            evaluations = run.evaluations if ev is None else np.asarray(ev).mean(0)
        return np.concatenate(out)[:size], seconds * size / (chunk * math.ceil(size / chunk)), np.asarray(evaluations)

    def reference(self, ode: bool):
        """EM (SDE) or Heun (ODE) with the finest level on the reference grid, coupled subset."""
        if ode not in self.references:
            from image_methods import Run

            K = len(self.family.models)
            run = (Run("reference", "reference", ("heun",), self.cfg.ode_ref_steps, ode=True, evaluations=(0,) * K)
                   if ode else Run("reference", "reference", ("em", K - 1), self.n_ref, evaluations=(0,) * K))
            t0 = time.perf_counter()
            self.references[ode] = self.sample(run, self.cfg.coupled_samples, equal_batch=False)[0]  # not timed
            self.log(f"reference ({'Heun, ODE' if ode else 'EM, SDE'}, {run.steps} steps, "
                     f"{self.cfg.coupled_samples} samples): {time.perf_counter() - t0:.0f} s")
        return self.references[ode]

    def score(self, run, features: Callable, held_features) -> tuple[dict, np.ndarray | None]:
        """Run and score: coupled error on the coupled subset; for distribution runs also the
        features of the full batch (for the paired Fréchet distances) and KID."""
        cfg = self.cfg
        size = cfg.samples if run.distribution else cfg.coupled_samples
        y, seconds, ev = self.sample(run, size)
        err = coupled_error(y[: cfg.coupled_samples], self.reference(run.ode))
        record = dict(label=run.label, method=run.method, steps=run.steps, ode=run.ode, samples=size,
                      seconds=seconds / size * 1000.0,  # per 1000 samples
                      evaluations=[float(e) for e in ev], flops=float(np.dot(ev, self.flops)),
                      rms=err.value, rms_se=err.stderr, distribution=run.distribution)
        feats = None
        if run.distribution:
            feats = features(np.clip(y, -1, 1))
            kid = kernel_distance(feats, held_features)
            record.update(kid=kid.value, kid_se=kid.stderr)
        self.log(f"  {run.label:<58s} {record['seconds']:8.1f} s/1000  {record['flops'] / 1e9:7.3f} GFLOP  "
                 f"rms {err.value:.4f}±{err.stderr:.4f}  evals {np.round(ev, 1).tolist()}")
        return record, feats, np.clip(y[:16], -1, 1)
