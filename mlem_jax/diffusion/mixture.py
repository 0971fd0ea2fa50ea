"""A Gaussian mixture whose denoiser is exact: the testbed's data distribution.

The data x_0 in R^D follow sum_j w_j N(mu_j, S_j) with low-rank plus diagonal covariances
S_j = W_j W_j^T + diag(d_j) (W_j is D x r). Under any forward process with Gaussian
marginals x_t = alpha_t x_0 + sigma_t eps (VP, sub-VP, VE; flows once alpha = 1 - t,
sigma = t), x_t given component j is Gaussian:

    x_t | j  ~  N(alpha mu_j, Sigma_j),    Sigma_j = alpha^2 S_j + sigma^2 I.

So everything a sampler needs is exact in closed form at every t:

* responsibilities  r_j(x) = w_j N(x; alpha mu_j, Sigma_j) / sum_i w_i N(x; alpha mu_i, Sigma_i);
* the score  grad log p_t(x) = -sum_j r_j Sigma_j^{-1} (x - alpha mu_j);
* the denoiser (the responsibility-weighted Wiener filter)
      E[x_0 | x_t = x] = sum_j r_j [mu_j + alpha S_j Sigma_j^{-1} (x - alpha mu_j)];
* the log-density of x_t (at t = 0, of the data).

Sigma_j^{-1} and log det Sigma_j use the Woodbury identity with the diagonal
a_j = alpha^2 d_j + sigma^2 and the r x r capacitance K_j = I + alpha^2 W_j^T diag(1/a_j) W_j,
so one evaluation costs O(J D r) per sample rather than O(J D^3).

`fit_mixture` fits one to images in seconds: k-means (scikit-learn, seeded) for the
components, then each cluster's mean, its top-r principal directions and the residual
variance per coordinate (floored). `fashion_mnist_mixture` does it for Fashion-MNIST at
16x16 from Debian's `dataset-fashion-mnist` files.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlem_jax._errors import InputError

__all__ = ["GaussianMixture", "fit_mixture", "fashion_mnist_mixture", "save_mixture", "load_mixture",
           "shipped_mixture_path"]


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """sum_j w_j N(mu_j, W_j W_j^T + diag(d_j)) over vectors of `shape` (flattened to D).

    Attributes:
      log_weights: (J,) log w_j (normalised).
      means: (J, D) mu_j.
      factors: (J, D, r) W_j.
      diagonals: (J, D) d_j > 0.
      shape: the shape of one sample (an image (H, W, C), say); the last len(shape) axes of
        every input are that shape.
    """

    log_weights: jax.Array
    means: jax.Array
    factors: jax.Array
    diagonals: jax.Array
    shape: tuple = dataclasses.field(metadata=dict(static=True), default=())

    def __post_init__(self):
        J, D = np.shape(self.means)
        if np.shape(self.log_weights) != (J,) or np.shape(self.diagonals) != (J, D) or (
                np.ndim(self.factors) != 3 or np.shape(self.factors)[:2] != (J, D)):
            raise InputError(
                f"GaussianMixture: expected log_weights (J,), means (J, D), factors (J, D, r) and diagonals (J, D); "
                f"got {np.shape(self.log_weights)}, {np.shape(self.means)}, {np.shape(self.factors)} and "
                f"{np.shape(self.diagonals)}.")
        shape = tuple(self.shape) or (D,)
        if math.prod(shape) != D:
            raise InputError(f"GaussianMixture: shape {shape} has {math.prod(shape)} entries, the means have D = {D}.")
        object.__setattr__(self, "shape", shape)

    @property
    def num_components(self) -> int:
        return int(np.shape(self.means)[0])

    @property
    def dim(self) -> int:
        return int(np.shape(self.means)[1])

    @property
    def rank(self) -> int:
        return int(np.shape(self.factors)[2])

    # ------------------------------------------------------------------ sampling
    def sample(self, key, num: int) -> jax.Array:
        """`num` draws of x_0, shape (num, *shape)."""
        kj, kz, ke = jax.random.split(key, 3)
        j = jax.random.categorical(kj, self.log_weights, shape=(num,))
        z = jax.random.normal(kz, (num, self.rank), self.means.dtype)
        e = jax.random.normal(ke, (num, self.dim), self.means.dtype)
        x = self.means[j] + jnp.einsum("ndr,nr->nd", self.factors[j], z) + jnp.sqrt(self.diagonals[j]) * e
        return x.reshape((num, *self.shape))

    # ------------------------------------------------------------- the exact posterior
    def _flat(self, x):
        x = jnp.asarray(x)
        n = len(self.shape)
        if x.shape[x.ndim - n:] != self.shape:
            raise InputError(f"x: expected trailing shape {self.shape} (one mixture sample), got {x.shape}.")
        batch = x.shape[:x.ndim - n]
        return x.reshape((-1, self.dim)), batch

    def _posterior(self, x, alpha, sigma):
        """For flat x (B, D): the normalised log-responsibilities log r (B, J), the log-density
        log p_t(x) (B,), and the pieces the denoiser and the score share.

        Everything is written as (B, D) x (D, J r) matrix products: with a = alpha^2 d + sigma^2,
        s_j = (W_j / a_j)^T (x - alpha mu_j), u_j = alpha s_j, v_j = K_j^{-1} u_j and
        P_j = W_j^T diag(1/a_j) W_j, the quadratic form is |y_j|^2_{1/a_j} - u_j^T v_j and
        W_j^T Sigma_j^{-1} y_j = s_j - alpha P_j v_j."""
        alpha = jnp.asarray(alpha, x.dtype)
        sigma = jnp.asarray(sigma, x.dtype)
        J, D, r = self.num_components, self.dim, self.rank
        inv_a = 1.0 / (alpha**2 * self.diagonals + sigma**2)  # (J, D)
        Wa = self.factors * inv_a[..., None]  # (J, D, r)
        P = jnp.einsum("jdr,jds->jrs", self.factors, Wa)  # W^T diag(1/a) W
        K = jnp.eye(r, dtype=x.dtype) + alpha**2 * P
        chol = jnp.linalg.cholesky(K)
        logdet = -jnp.sum(jnp.log(inv_a), -1) + 2 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
        mu_a = self.means * inv_a
        quad = (x**2) @ inv_a.T - 2 * alpha * x @ mu_a.T + alpha**2 * jnp.sum(self.means * mu_a, -1)  # (B, J)
        s = (x @ Wa.transpose(1, 0, 2).reshape(D, J * r)).reshape(-1, J, r) - alpha * jnp.einsum(
            "jdr,jd->jr", Wa, self.means)
        u = alpha * s
        w = jax.vmap(lambda L, b: jax.scipy.linalg.solve_triangular(L, b.T, lower=True).T, in_axes=(0, 1),
                     out_axes=1)(chol, u)  # L^{-1} u, (B, J, r)
        v = jax.vmap(lambda L, b: jax.scipy.linalg.solve_triangular(L, b.T, lower=True, trans=1).T, in_axes=(0, 1),
                     out_axes=1)(chol, w)  # K^{-1} u
        quad = quad - jnp.sum(w**2, -1)
        log_comp = self.log_weights[None] - 0.5 * (quad + logdet[None] + D * jnp.log(2 * jnp.pi))
        log_p = jax.scipy.special.logsumexp(log_comp, axis=-1)
        pieces = dict(inv_a=inv_a, Wa=Wa, P=P, s=s, v=v, alpha=alpha)
        return log_comp - log_p[:, None], log_p, pieces

    def _weighted_z(self, x, resp, q):
        """sum_j r_j Sigma_j^{-1} (x - alpha mu_j), (B, D)."""
        J, D, r = self.num_components, self.dim, self.rank
        alpha = q["alpha"]
        rv = (resp[..., None] * q["v"]).reshape(-1, J * r)
        return (x * (resp @ q["inv_a"]) - alpha * resp @ (self.means * q["inv_a"])
                - alpha * rv @ q["Wa"].transpose(0, 2, 1).reshape(J * r, D))

    def denoise(self, x, alpha, sigma) -> jax.Array:
        """E[x_0 | x_t = x] where x_t = alpha x_0 + sigma eps (any leading batch axes)."""
        flat, _ = self._flat(x)
        log_r, _, q = self._posterior(flat, alpha, sigma)
        resp = jnp.exp(log_r)
        J, D, r = self.num_components, self.dim, self.rank
        alpha = q["alpha"]
        # alpha S_j z_j = alpha d_j z_j + alpha W_j (W_j^T z_j), with W_j^T z_j = s_j - alpha P_j v_j
        d_inv_a = self.diagonals * q["inv_a"]
        rv = (resp[..., None] * q["v"]).reshape(-1, J * r)
        diag_part = (flat * (resp @ d_inv_a) - alpha * resp @ (self.means * d_inv_a)
                     - alpha * rv @ (self.factors * d_inv_a[..., None]).transpose(0, 2, 1).reshape(J * r, D))
        wtz = q["s"] - alpha * jnp.einsum("jrs,bjs->bjr", q["P"], q["v"])
        low_rank = (resp[..., None] * wtz).reshape(-1, J * r) @ self.factors.transpose(0, 2, 1).reshape(J * r, D)
        mean = resp @ self.means + alpha * (diag_part + low_rank)
        return mean.reshape(x.shape)

    def score(self, x, alpha, sigma) -> jax.Array:
        """grad_x log p_t(x) where x_t = alpha x_0 + sigma eps."""
        flat, _ = self._flat(x)
        log_r, _, q = self._posterior(flat, alpha, sigma)
        return -self._weighted_z(flat, jnp.exp(log_r), q).reshape(x.shape)

    def log_density(self, x, alpha=1.0, sigma=0.0) -> jax.Array:
        """log p_t(x) where x_t = alpha x_0 + sigma eps; the defaults give the data's density."""
        flat, batch = self._flat(x)
        return self._posterior(flat, alpha, sigma)[1].reshape(batch)

    def responsibilities(self, x, alpha=1.0, sigma=0.0) -> jax.Array:
        """P(component j | x_t = x), shape (*batch, J)."""
        flat, batch = self._flat(x)
        return jnp.exp(self._posterior(flat, alpha, sigma)[0]).reshape((*batch, self.num_components))

    def denoiser(self, sde):
        """The exact data prediction as a level: `D(t, x, args)` for the diffusion samplers
        (`ddim`, `dpm_solver_pp`, ... and `Multilevel`), under `sde`'s alpha(t) and std(t)."""

        def exact_denoiser(t, x, args=None):
            return self.denoise(x, sde.alpha(t), sde.std(t))

        return exact_denoiser

    def astype(self, dtype) -> "GaussianMixture":
        return GaussianMixture(*(jnp.asarray(a, dtype) for a in (self.log_weights, self.means, self.factors,
                                                                  self.diagonals)), shape=self.shape)


jax.tree_util.register_dataclass(GaussianMixture, data_fields=["log_weights", "means", "factors", "diagonals"],
                                 meta_fields=["shape"])


# ----------------------------------------------------------------------------- fitting


def fit_mixture(images, num_components: int = 256, rank: int = 12, min_variance: float = 4e-4, seed: int = 0,
                ) -> GaussianMixture:
    """A low-rank plus diagonal Gaussian mixture fitted to `images` (N, *shape).

    Args:
      images: the data, (N, *shape); each row one sample.
      num_components: J, the k-means clusters (each becomes a component, w_j its share).
      rank: r, the principal directions kept per component (at most the cluster size - 1).
      min_variance: the floor of the residual variance d_j per coordinate, so that constant
        pixels (a background) still have a density.
      seed: k-means' seed; the fit is deterministic given it.

    The fit is not maximum likelihood: hard k-means clusters, each summarised by its mean,
    its top-r principal directions W_j = U_r diag(sqrt(lambda_r)) and the residual variance
    d_j = max(diag(C_j) - diag(W_j W_j^T), min_variance). Every marginal variance is kept."""
    from sklearn.cluster import KMeans

    x = np.asarray(images, np.float64)
    shape = tuple(x.shape[1:])
    x = x.reshape(x.shape[0], -1)
    N, D = x.shape
    if num_components < 1 or num_components * 2 > N:
        raise InputError(f"num_components: expected 1 <= J <= N / 2 = {N // 2}, got {num_components}.")
    if not 0 <= rank < D:
        raise InputError(f"rank: expected 0 <= r < D = {D}, got {rank}.")
    if not min_variance > 0:
        raise InputError(f"min_variance: expected > 0, got {min_variance}.")
    labels = KMeans(num_components, n_init=1, random_state=seed).fit_predict(x.astype(np.float32))
    counts = np.bincount(labels, minlength=num_components)
    means = np.zeros((num_components, D))
    factors = np.zeros((num_components, D, rank))
    diagonals = np.zeros((num_components, D))
    for j in range(num_components):
        xj = x[labels == j]
        means[j] = xj.mean(0)
        c = np.cov(xj, rowvar=False, bias=True) if len(xj) > 1 else np.zeros((D, D))
        lam, u = np.linalg.eigh(c)
        lam, u = lam[::-1][:rank], u[:, ::-1][:, :rank]
        keep = min(rank, max(len(xj) - 1, 0))
        w = u * np.sqrt(np.clip(lam, 0.0, None))
        w[:, keep:] = 0.0
        factors[j] = w
        diagonals[j] = np.maximum(np.diag(c) - np.sum(w**2, 1), min_variance)
    log_w = np.log(counts / N)
    return GaussianMixture(jnp.asarray(log_w, jnp.float32), jnp.asarray(means, jnp.float32),
                           jnp.asarray(factors, jnp.float32), jnp.asarray(diagonals, jnp.float32), shape=shape)


def fashion_mnist_mixture(source_dir: str | None = None, image_size: int = 16, **kwargs: Any) -> GaussianMixture:
    """`fit_mixture` on the 60000 Fashion-MNIST training images at `image_size` (in [-1, 1]),
    read from Debian's `dataset-fashion-mnist` files (`apt-get install dataset-fashion-mnist`)."""
    from mlem_jax.diffusion.data import FASHION_MNIST_DEBIAN, read_local

    images = read_local("fashion_mnist", source_dir or FASHION_MNIST_DEBIAN, "train", image_size=image_size)
    return fit_mixture(images, **kwargs)


# ----------------------------------------------------------------------------- files


def save_mixture(mixture: GaussianMixture, path: str, dtype=np.float16) -> str:
    """Write `mixture` to `path` (.npz, float16 by default). The stored diagonals are
    rounded up so that d_j > 0 survives the cast. Returns the path.

    Args:
      mixture: the `GaussianMixture` to write.
      path: the .npz file.
      dtype: the stored float type.
    """
    from mlem_jax._atomic import atomic_path

    arrays = dict(log_weights=np.asarray(mixture.log_weights, np.float32), means=np.asarray(mixture.means, dtype),
                  factors=np.asarray(mixture.factors, dtype),
                  diagonals=np.maximum(np.asarray(mixture.diagonals, dtype), np.finfo(dtype).tiny),
                  shape=np.asarray(mixture.shape, np.int64))
    path = path if path.endswith(".npz") else path + ".npz"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_mixture(path: str | None = None) -> GaussianMixture:
    """Read a mixture written by `save_mixture` (float32 in memory); None reads the shipped
    Fashion-MNIST 16x16 mixture."""
    path = shipped_mixture_path() if path is None else path
    path = path if path.endswith(".npz") else path + ".npz"
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("log_weights", "means", "factors", "diagonals", "shape")}
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no mixture file at {path!r}; write one with save_mixture.") from None
    except KeyError as e:
        raise InputError(f"path: {path!r} is not a mixture file (missing {e}).") from None
    return GaussianMixture(*(jnp.asarray(arrays[k], jnp.float32) for k in ("log_weights", "means", "factors",
                                                                            "diagonals")),
                           shape=tuple(int(s) for s in arrays["shape"]))


def shipped_mixture_path() -> str:
    """The Fashion-MNIST 16x16 mixture shipped in the package (`make testbed-mixture` rebuilds it)."""
    import os

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "fmnist16_mixture.npz")
