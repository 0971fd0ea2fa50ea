"""Exact moment recursions for ML-EM on affine levels (see docs/method.md).

Levels f^k(x) = -a_k x + b_k on a scalar state with additive noise sigma. At each step
the estimator is F = -A x + B with random A = sum_k c_k (a_k - a_{k-1}),
B = sum_k c_k (b_k - b_{k-1}), c_k = B_k / p_k, independent of the state, so that the
mean m, second moment q and coupled mean-square difference d = E(X^ML - X^EM)^2 on the
same noise follow closed recursions.
"""

import numpy as np


def affine_levels(a, b):
    """Drifts f^k(t, y, args) = -a_k y + b_k."""
    return tuple((lambda t, y, args, ak=ak, bk=bk: -ak * y + bk) for ak, bk in zip(a, b))


def weight_covariance(p, coupling):
    """Cov(c_j, c_k) of the scaled coins c_k = B_k / p_k."""
    p = np.asarray(p, dtype=np.float64)
    if coupling == "independent":
        return np.diag(1.0 / p - 1.0)
    return 1.0 / np.maximum(p[:, None], p[None, :]) - 1.0


def affine_moments(a, b, probs, ts, x0, sigma, coupling):
    """Exact E X_N, E X_N^2 and E (X^ML_N - X^EM_N)^2 for ML-EM on affine levels.

    `probs` is an array (K,) or a function of t returning one.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    da = np.diff(a, prepend=0.0)
    db = np.diff(b, prepend=0.0)
    aK, bK = a[-1], b[-1]
    m, q, d = float(x0), float(x0) ** 2, 0.0
    ts = np.asarray(ts, np.float64)
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        p = np.asarray(probs(t0) if callable(probs) else probs, np.float64)
        S = weight_covariance(p, coupling)
        var_a, var_b, cov_ab = da @ S @ da, db @ S @ db, da @ S @ db
        d = (1 - h * aK) ** 2 * d + h**2 * (var_a * q - 2 * cov_ab * m + var_b)
        q_new = ((1 - h * aK) ** 2 + h**2 * var_a) * q
        q_new += 2 * h * (bK - h * (aK * bK + cov_ab)) * m
        q_new += h**2 * (bK**2 + var_b) + sigma**2 * abs(h)
        m = (1 - h * aK) * m + h * bK
        q = q_new
    return m, q, d


def em_moment_path(a, b, ts, x0, sigma):
    """E X_n and E X_n^2 at every grid point for EM on the affine drift -a x + b."""
    m, q = [float(x0)], [float(x0) ** 2]
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        m_new = (1 - h * a) * m[-1] + h * b
        q_new = (1 - h * a) ** 2 * q[-1] + 2 * h * b * (1 - h * a) * m[-1] + h**2 * b**2 + sigma**2 * abs(h)
        m.append(m_new)
        q.append(q_new)
    return np.array(m), np.array(q)
