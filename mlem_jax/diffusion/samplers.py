"""The samplers diffusion practitioners use, on one signature, each an update rule on the
core's stepping skeleton:

    sampler(denoiser, sde, x, ts, key=None, args=None, *, saveat, callback, progress, check_finite)

`denoiser(t, x, args)` is the data prediction D = E[x_0 | x_t = x] (`Family.denoisers()`),
`ts` a decreasing grid (`uniform_grid`, `logsnr_grid`, `karras_grid`), `x` the prior draw
at ts[0]. With x_t = alpha_t x_0 + sigma_t eps, lambda = log(alpha / sigma) and
h_i = lambda_{t_i} - lambda_{t_{i-1}} > 0:

* `ddim` (eta = 0; DPM-Solver++ order 1):
      x_i = (sigma_i / sigma_{i-1}) x_{i-1} + alpha_i (1 - e^{-h}) D_{i-1}.
* `dpm_solver_pp` (Lu et al. 2022, arXiv 2211.01095), multistep in the data prediction:
  order 2 replaces D_{i-1} by (1 + 1/(2r)) D_{i-1} - D_{i-2} / (2r), r = h_{i-1} / h_i
  (Algorithm 2); order 3 adds the second divided difference with the exact phi functions
  phi_2 = (e^{-h} - 1)/h + 1, phi_3 = phi_2 / h - 1/2 (the 3M form of k-diffusion). The
  first steps use the orders their history allows (1, then 2), and a step whose earlier
  step is less than `MIN_STEP_RATIO` of its length in lambda drops to order 1 (3M: order 2
  where only the step before that is short). That happens at the end of uniform-in-t grids,
  where the last step spans most of the log-SNR range; on log-SNR grids no order is lowered.
* `sde_dpm_solver_pp` (the 2M SDE solver, midpoint form, eta = 1):
      x_i = (sigma_i / sigma_{i-1}) e^{-h} x_{i-1} + alpha_i (1 - e^{-2h}) [D_{i-1} + (D_{i-1} - D_{i-2}) / (2r)]
            + sigma_i sqrt(1 - e^{-2h}) z_i.
* `unipc` (Zhao et al. 2023, arXiv 2302.04867), data prediction, variants bh1 / bh2: a
  multistep predictor (UniP) of order p and a corrector (UniC) that raises it to p + 1 using
  the model call the next step makes anyway at the predicted point, so one call per step.
* `edm_euler`, `edm_heun` (Karras et al. 2022, arXiv 2206.00364): Euler and Heun on
  d(x/alpha)/d s = (x/alpha - D) / s in s = sigma / alpha. Euler is DDIM written another
  way; Heun makes two model calls per step, on every step (the grid ends at t_min > 0, so
  EDM's final Euler step to s = 0 does not arise).

Every update is affine in the D values it uses, so each sampler accepts a `Multilevel` in
place of `denoiser`: each D becomes the multilevel estimate of the finest level's, the
coins planned over the sampler's model calls, and the sampler returns a
`MultilevelSolution(y, evaluations)`. A `Multilevel` with a control variate and no
`control_scale` gets sigma / alpha: an eps-network's error enters D multiplied by it, so
the correction last seen at high noise is rescaled before it predicts the next one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax import _noise, _validate
from mlem_jax._errors import InputError
from mlem_jax._multilevel import Multilevel, model_calls
from mlem_jax._stepping import axpy, combine, integrate

__all__ = ["ddim", "dpm_solver_pp", "sde_dpm_solver_pp", "edm_euler", "edm_heun", "unipc", "SAMPLERS"]


def _check_noise_grid(sde, ts):
    """A concrete grid must run from noise to data (strictly decreasing) at noise levels > 0:
    the samplers take log(std) and divide by it. A traced grid is checked by the caller."""
    if not _validate.is_concrete(ts):
        return
    t = np.asarray(ts, np.float64)
    if np.any(np.diff(t) >= 0):
        raise InputError(f"ts: the diffusion samplers integrate from noise to data, so the grid must be strictly "
                         f"decreasing; got {np.round(t[:4], 6).tolist()}... Reverse it (ts[::-1]) or build it with "
                         "uniform_grid / logsnr_grid / karras_grid.")
    with jax.ensure_compile_time_eval():  # the grid is concrete: evaluate std now, even inside a jit trace
        std = sde.std(jnp.asarray(ts))
    if not _validate.is_concrete(std):  # an SDE whose parameters are traced
        return
    std = np.asarray(std, np.float64)
    if np.any(~(std > 0)):
        i = int(np.argmax(~(std > 0)))
        raise InputError(f"ts: the noise level std(t) is {std[i]:g} at ts[{i}] = {t[i]:g}; the samplers need "
                         "std(t) > 0 at every grid time (their log-SNR is infinite at zero noise). End the grid at a "
                         "small positive time such as 1e-3.")


def _prepare(denoiser, sde, x, ts, key, args, call_times=None):
    ts = _validate.check_ts(ts)
    x = _validate.check_y0(x)
    if not hasattr(sde, "alpha") or not hasattr(sde, "std"):
        raise TypeError(f"sde: expected an SDE with alpha(t) and std(t) (VP, SubVP, VE), got {type(sde).__name__}.")
    _check_noise_grid(sde, ts)
    call_times = ts[:-1] if call_times is None else call_times
    if isinstance(denoiser, Multilevel) and denoiser.control is not None and denoiser.control_scale is None:
        # corrections of D grow like sigma / alpha (D = (x - sigma eps) / alpha): cache them in those units
        denoiser = dataclasses.replace(denoiser, control_scale=sde.noise_to_signal)
    return ts, x, model_calls(denoiser, call_times, x, args, key, name="denoiser", diffusion_given=False)


def _coefficients(sde, t0, t1):
    """(alpha_1, sigma_0, sigma_1, h) between t0 and t1."""
    a0, s0, a1, s1 = sde.alpha(t0), sde.std(t0), sde.alpha(t1), sde.std(t1)
    return a1, s0, s1, (jnp.log(a1) - jnp.log(s1)) - (jnp.log(a0) - jnp.log(s0))


def _run(step, x, ts, state0, calls, desc, saveat, callback, progress, check_finite):
    y, state = integrate(step, x, ts, state0, saveat=saveat, progress=progress, callback=callback, desc=desc,
                         check_finite=check_finite)
    return calls.result(y, state[0])


MIN_STEP_RATIO = 0.5
"""DPM-Solver++ lowers a step's order where a previous step in lambda is shorter than this
fraction of the current one: the multistep difference then extrapolates a slope measured
over a short baseline across a long step (coefficients 1 / (2r) and more), which amplifies
the data prediction's errors. On a log-SNR grid every ratio is 1 and nothing changes."""


def _multistep_weights(order, n, h, h1, h2):
    """Weights (w0, w1, w2) of D_{i-1}, D_{i-2}, D_{i-3} in DPM-Solver++'s data term, using
    the highest order (up to `order`) that the history of step n allows, lowered where the
    step ratios fall below `MIN_STEP_RATIO` (the uniform grid's final steps, for example)."""
    c = -jnp.expm1(-h)
    r0 = jnp.where(n >= 1, h1, h) / h
    r1 = jnp.where(n >= 2, h2, h) / h
    w_first = (c, 0.0 * c, 0.0 * c)
    w_second = (c * (1 + 0.5 / r0), -c * 0.5 / r0, 0.0 * c)
    phi2 = jnp.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    a = phi2 * (1 + r0 / (r0 + r1)) - 2 * phi3 / (r0 + r1)  # coefficient of (D_{i-1} - D_{i-2}) / r0
    b = -phi2 * r0 / (r0 + r1) + 2 * phi3 / (r0 + r1)  # coefficient of (D_{i-2} - D_{i-3}) / r1
    w_third = (c + a / r0, -a / r0 + b / r1, -b / r1)
    used = jnp.minimum(order, n + 1)
    used = jnp.where((n >= 1) & (r0 < MIN_STEP_RATIO), 1, used)
    used = jnp.where((used == 3) & (r1 < MIN_STEP_RATIO), 2, used)
    pick = lambda i: jnp.where(used >= 3, w_third[i], jnp.where(used == 2, w_second[i], w_first[i]))
    return pick(0), pick(1), pick(2)


def dpm_solver_pp(denoiser: Callable | Multilevel, sde, x, ts, key: Any = None, args: Any = None, *, order: int = 2,
                  saveat: Any = None, callback: Callable | None = None, progress: bool = False,
                  check_finite: bool = False):
    """DPM-Solver++ multistep of `order` 1, 2 or 3 on the probability-flow ODE (one model
    call per step). `key` only derives the level key of a `Multilevel`.

    Args:
      denoiser: D(t, x, args) = E[x_0 | x_t = x] for one sample, or a `Multilevel` of denoisers.
      sde: the schedule (`VP`, `SubVP`, `VE` or `Flow`).
      x: the state at ts[0], one sample (vmap over a batch).
      ts: the decreasing time grid.
      key: derives a `Multilevel`'s level key when it has none (no noise is drawn).
      args: passed to the denoiser.
      order: 2 (2M) or 3 (3M).
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    if order not in (1, 2, 3):
        raise InputError(f"order: DPM-Solver++ multistep is implemented for orders 1, 2 and 3, got {order!r}.")
    ts, x, calls = _prepare(denoiser, sde, x, ts, key, args)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, x)
    h0 = jnp.zeros((), ts.dtype)

    def step(n, x, state):
        calls_state, d1, d2, h1, h2 = state
        a1, s0, s1, h = _coefficients(sde, ts[n], ts[n + 1])
        d0, calls_state = calls.call(n, ts[n], x, calls_state)
        w0, w1, w2 = _multistep_weights(order, n, h, h1, h2)
        x1 = combine((s1 / s0, x), (a1 * w0, d0), (a1 * w1, d1), (a1 * w2, d2))
        return x1, (calls_state, d0, d1, h, h1)

    return _run(step, x, ts, (calls.state0, zeros, zeros, h0, h0), calls, f"DPM-Solver++({order}M)", saveat,
                callback, progress, check_finite)


def ddim(denoiser: Callable | Multilevel, sde, x, ts, key: Any = None, args: Any = None, *, saveat: Any = None,
         callback: Callable | None = None, progress: bool = False, check_finite: bool = False):
    """DDIM (eta = 0), the first-order exponential integrator of the probability-flow ODE.

    Args:
      denoiser: D(t, x, args) = E[x_0 | x_t = x] for one sample, or a `Multilevel` of denoisers.
      sde: the schedule (`VP`, `SubVP`, `VE` or `Flow`).
      x: the state at ts[0], one sample (vmap over a batch).
      ts: the decreasing time grid.
      key: derives a `Multilevel`'s level key when it has none (no noise is drawn).
      args: passed to the denoiser.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    return dpm_solver_pp(denoiser, sde, x, ts, key, args, order=1, saveat=saveat, callback=callback,
                         progress=progress, check_finite=check_finite)


def sde_dpm_solver_pp(denoiser: Callable | Multilevel, sde, x, ts, key: Any, args: Any = None, *,
                      saveat: Any = None, callback: Callable | None = None, progress: bool = False,
                      check_finite: bool = False):
    """SDE-DPM-Solver++(2M) on the reverse SDE (one model call per step). `key` is a PRNG
    key, a diffrax Brownian path or increments like `euler_maruyama`'s: z_i is the
    increment over step i divided by sqrt(|t_i - t_{i-1}|).

    Args:
      denoiser: D(t, x, args) = E[x_0 | x_t = x] for one sample, or a `Multilevel` of denoisers.
      sde: the schedule (`VP`, `SubVP`, `VE` or `Flow`).
      x: the state at ts[0], one sample (vmap over a batch).
      ts: the decreasing time grid.
      key: draws the noise of every step (and a `Multilevel`'s level key when it has none).
      args: passed to the denoiser.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    ts, x, calls = _prepare(denoiser, sde, x, ts, key, args)
    noise = _noise.brownian_source(key, x, ts)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, x)

    def step(n, x, state):
        calls_state, d1, h1 = state
        a1, s0, s1, h = _coefficients(sde, ts[n], ts[n + 1])
        d0, calls_state = calls.call(n, ts[n], x, calls_state)
        half_over_r = jnp.where(n >= 1, 0.5 * h / jnp.where(n >= 1, h1, h), 0.0)
        c = -jnp.expm1(-2 * h)
        z = jax.tree_util.tree_map(lambda w: w / jnp.sqrt(jnp.abs(ts[n + 1] - ts[n])).astype(w.dtype),
                                   noise.increment(n, ts[n], ts[n + 1]))
        x1 = combine((s1 / s0 * jnp.exp(-h), x), (a1 * c * (1 + half_over_r), d0), (-a1 * c * half_over_r, d1),
                     (s1 * jnp.sqrt(c), z))
        return x1, (calls_state, d0, h)

    return _run(step, x, ts, (calls.state0, zeros, jnp.zeros((), ts.dtype)), calls, "SDE-DPM-Solver++(2M)",
                saveat, callback, progress, check_finite)


def edm_euler(denoiser: Callable | Multilevel, sde, x, ts, key: Any = None, args: Any = None, *,
              saveat: Any = None, callback: Callable | None = None, progress: bool = False,
              check_finite: bool = False):
    """EDM's Euler step in s = sigma / alpha: x_i / alpha_i = x/alpha + (s_i - s) (x/alpha - D) / s.

    Args:
      denoiser: D(t, x, args) = E[x_0 | x_t = x] for one sample, or a `Multilevel` of denoisers.
      sde: the schedule (`VP`, `SubVP`, `VE` or `Flow`).
      x: the state at ts[0], one sample (vmap over a batch).
      ts: the decreasing time grid.
      key: derives a `Multilevel`'s level key when it has none (no noise is drawn).
      args: passed to the denoiser.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    ts, x, calls = _prepare(denoiser, sde, x, ts, key, args)

    def step(n, x, state):
        (calls_state,) = state
        t0, t1 = ts[n], ts[n + 1]
        s0, s1 = sde.noise_to_signal(t0), sde.noise_to_signal(t1)
        d0, calls_state = calls.call(n, t0, x, calls_state)
        scaled = combine((1 / sde.alpha(t0), x))
        slope = combine((1 / s0, scaled), (-1 / s0, d0))
        return combine((sde.alpha(t1), axpy(scaled, s1 - s0, slope))), (calls_state,)

    return _run(step, x, ts, (calls.state0,), calls, "EDM Euler", saveat, callback, progress, check_finite)


def edm_heun(denoiser: Callable | Multilevel, sde, x, ts, key: Any = None, args: Any = None, *,
             saveat: Any = None, callback: Callable | None = None, progress: bool = False,
             check_finite: bool = False):
    """EDM's Heun (Karras et al. 2022, Algorithm 1 without churn): an Euler predictor in
    s = sigma / alpha, then the trapezoid of the two slopes; two model calls per step.

    Args:
      denoiser: D(t, x, args) = E[x_0 | x_t = x] for one sample, or a `Multilevel` of denoisers.
      sde: the schedule (`VP`, `SubVP`, `VE` or `Flow`).
      x: the state at ts[0], one sample (vmap over a batch).
      ts: the decreasing time grid.
      key: derives a `Multilevel`'s level key when it has none (no noise is drawn).
      args: passed to the denoiser.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    ts0 = _validate.check_ts(ts)
    call_times = jnp.stack([ts0[:-1], ts0[1:]], axis=1).reshape(-1)  # call 2n at t_n, 2n + 1 at t_{n+1}
    ts, x, calls = _prepare(denoiser, sde, x, ts0, key, args, call_times)

    def step(n, x, state):
        (calls_state,) = state
        t0, t1 = ts[n], ts[n + 1]
        s0, s1 = sde.noise_to_signal(t0), sde.noise_to_signal(t1)
        d0, calls_state = calls.call(2 * n, t0, x, calls_state)
        scaled = combine((1 / sde.alpha(t0), x))
        slope0 = combine((1 / s0, scaled), (-1 / s0, d0))
        predicted = axpy(scaled, s1 - s0, slope0)
        d1, calls_state = calls.call(2 * n + 1, t1, combine((sde.alpha(t1), predicted)), calls_state)
        slope1 = combine((1 / s1, predicted), (-1 / s1, d1))
        return combine((sde.alpha(t1), axpy(scaled, s1 - s0, combine((0.5, slope0), (0.5, slope1))))), (calls_state,)

    return _run(step, x, ts, (calls.state0,), calls, "EDM Heun", saveat, callback, progress, check_finite)


def _unipc_weights(lam, k, p, variant):
    """Weights of UniPC's step k (from ts[k] to ts[k+1]) of order p in {1, 2, 3}, in the data
    prediction form of the reference implementation (`multistep_uni_pc_bh_update`):

        x_pred = (s1 / s0) x - a1 (e^{-h} - 1) D_k - a1 B(h) sum_i rho^p_i (D_{k-i} - D_k) / r_i,
        x_corr = (s1 / s0) x - a1 (e^{-h} - 1) D_k - a1 B(h) [sum_i rho^c_i (D_{k-i} - D_k) / r_i
                                                           + rho^c_p (D_{k+1} - D_k)],

    with h = lambda_{k+1} - lambda_k, r_i = (lambda_{k-i} - lambda_k) / h, B(h) = -h (bh1) or
    e^{-h} - 1 (bh2), and rho from R rho = b, R_{ji} = r_i^(j-1), b_j = j! phi_{j+1}(-h) (-h)^? / B(h)
    as built below (rho^p_1 = 1/2 at p = 2 and rho^c = 1/2 at p = 1, as in the reference).
    Returns (pred, corr): pred = (w_k, w_{k-1}, w_{k-2}) for D_k, D_{k-1}, D_{k-2}, and corr
    the same plus the weight of D_{k+1}; the factor -a1 B(h) is folded in by the caller."""
    h = lam[k + 1] - lam[k]
    hh = -h
    r1 = (lam[jnp.maximum(k - 1, 0)] - lam[k]) / h
    r2 = (lam[jnp.maximum(k - 2, 0)] - lam[k]) / h
    b_h = hh if variant == "bh1" else jnp.expm1(hh)
    phi = jnp.expm1(hh) / hh - 1.0
    b, fact = [], 1.0
    for j in range(1, 4):
        b.append(phi * fact / b_h)
        fact *= j + 1
        phi = phi / hh - 1.0 / fact
    zero = 0.0 * h

    def from_rho(rho, rs):  # sum_i rho_i (D_{k-i} - D_k) / r_i as weights of (D_k, D_{k-1}, D_{k-2})
        w = [zero, zero, zero]
        for i, (c, r) in enumerate(zip(rho, rs)):
            w[i + 1] = w[i + 1] + c / r
            w[0] = w[0] - c / r
        return w

    pred = {1: [zero, zero, zero], 2: from_rho([0.5], [r1])}
    rho3 = jnp.linalg.solve(jnp.array([[1.0, 1.0], [r1, r2]]), jnp.stack([b[0], b[1]]))
    pred[3] = from_rho([rho3[0], rho3[1]], [r1, r2])
    corr = {1: ([zero, zero, zero], 0.5 + zero)}
    rho_c2 = jnp.linalg.solve(jnp.array([[1.0, 1.0], [r1, 1.0]]), jnp.stack([b[0], b[1]]))
    corr[2] = (from_rho([rho_c2[0]], [r1]), rho_c2[1])
    rho_c3 = jnp.linalg.solve(jnp.array([[1.0, 1.0, 1.0], [r1, r2, 1.0], [r1**2, r2**2, 1.0]]),
                              jnp.stack([b[0], b[1], b[2]]))
    corr[3] = (from_rho([rho_c3[0], rho_c3[1]], [r1, r2]), rho_c3[2])
    pick = lambda table: [jnp.where(p == 3, table[3][i], jnp.where(p == 2, table[2][i], table[1][i]))
                          for i in range(3)]
    wp = pick(pred)
    wc = pick({q: corr[q][0] for q in corr})
    wt = jnp.where(p == 3, corr[3][1], jnp.where(p == 2, corr[2][1], corr[1][1]))
    return h, b_h, wp, wc, wt


def unipc(denoiser: Callable | Multilevel, sde, x, ts, key: Any = None, args: Any = None, *, order: int = 2,
          variant: str = "bh2", lower_order_final: bool = True, saveat: Any = None, callback: Callable | None = None,
          progress: bool = False, check_finite: bool = False):
    """UniPC (Zhao et al. 2023) on the probability-flow ODE: predictor order `order` (1-3) and
    the UniC corrector, one model call per step (the corrector of step k uses the call step k + 1
    makes at the predicted point; the last step has no corrector, as in the reference).

    `variant`: "bh1" (B(h) = h, the reference's choice for unconditional sampling) or "bh2"
    (B(h) = e^h - 1, for guided sampling and few steps). Orders lowered: step k uses order
    min(order, k + 1) (the history it has) and, with `lower_order_final`, min(order, N - k)
    (the reference's default), so the first and the last order - 1 steps are of lower order.
    A `Multilevel` is accepted: every update is affine in the D values it uses.

    Args:
      denoiser: D(t, x, args) = E[x_0 | x_t = x] for one sample, or a `Multilevel` of denoisers.
      sde: the schedule (`VP`, `SubVP`, `VE` or `Flow`).
      x: the state at ts[0], one sample (vmap over a batch).
      ts: the decreasing time grid.
      key: derives a `Multilevel`'s level key when it has none (no noise is drawn).
      args: passed to the denoiser.
      order: the predictor's order, 1 to 3 (the corrector adds one).
      variant: "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1).
      lower_order_final: lower the order on the last steps, as the reference implementation does.
      saveat: as in `euler_maruyama`.
      callback: as in `euler_maruyama`.
      progress: as in `euler_maruyama`.
      check_finite: as in `euler_maruyama`.
    """
    if order not in (1, 2, 3):
        raise InputError(f"order: UniPC is implemented for orders 1, 2 and 3, got {order!r}.")
    if variant not in ("bh1", "bh2"):
        raise InputError(f"variant: expected 'bh1' or 'bh2', got {variant!r}.")
    ts, x, calls = _prepare(denoiser, sde, x, ts, key, args)
    N = ts.shape[0] - 1
    lam = jnp.log(sde.alpha(ts)) - jnp.log(sde.std(ts))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, x)

    def order_at(k):
        p = jnp.minimum(order, k + 1)
        return jnp.minimum(p, N - k) if lower_order_final else p

    def step(n, x, state):
        calls_state, x_prev, d1, d2, d3 = state  # x_prev: the corrected start of step n - 1; d_i = D_{n-i}
        d0, calls_state = calls.call(n, ts[n], x, calls_state)
        # UniC: correct step n - 1 (t_{n-1} -> t_n) with the call just made at its predicted end
        k = jnp.maximum(n - 1, 0)
        h, b_h, _, wc, wt = _unipc_weights(lam, k, order_at(k), variant)
        a1, s0, s1 = sde.alpha(ts[k + 1]), sde.std(ts[k]), sde.std(ts[k + 1])
        corrected = combine((s1 / s0, x_prev), (-a1 * jnp.expm1(-h), d1),
                            (-a1 * b_h * (wc[0] - wt), d1), (-a1 * b_h * wc[1], d2), (-a1 * b_h * wc[2], d3),
                            (-a1 * b_h * wt, d0))
        x = jax.tree_util.tree_map(lambda c, p: jnp.where(n >= 1, c, p), corrected, x)
        # UniP: predict step n (t_n -> t_{n+1})
        h, b_h, wp, _, _ = _unipc_weights(lam, n, order_at(n), variant)
        a1, s0, s1 = sde.alpha(ts[n + 1]), sde.std(ts[n]), sde.std(ts[n + 1])
        x1 = combine((s1 / s0, x), (-a1 * jnp.expm1(-h), d0), (-a1 * b_h * wp[0], d0), (-a1 * b_h * wp[1], d1),
                     (-a1 * b_h * wp[2], d2))
        return x1, (calls_state, x, d0, d1, d2)

    return _run(step, x, ts, (calls.state0, x, zeros, zeros, zeros), calls, f"UniPC-{variant}({order})", saveat,
                callback, progress, check_finite)


SAMPLERS = {
    "ddim": ddim,
    "dpm++2m": lambda *a, **k: dpm_solver_pp(*a, order=2, **k),
    "dpm++3m": lambda *a, **k: dpm_solver_pp(*a, order=3, **k),
    "sde-dpm++2m": sde_dpm_solver_pp,
    "edm-euler": edm_euler,
    "edm-heun": edm_heun,
    "unipc": unipc,
}
"""The samplers by their command-line names (`mlem-jax sample --solver`)."""

CALLS_PER_STEP = {"em": 1, "heun": 2, "ddim": 1, "dpm++2m": 1, "dpm++3m": 1, "sde-dpm++2m": 1, "edm-euler": 1,
                  "edm-heun": 2, "unipc": 1}
"""Model calls per step of each solver of `sampling.SOLVERS` (what a step costs in network evaluations)."""
