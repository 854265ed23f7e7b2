"""Reconstruction and universality metrics for SAEs and USAEs, each under its own name.

The field reports five different numbers as "explained variance" or "R²"; they differ in the
mean the residual is compared against. With x, x̂ `[N, d]`, e = x − x̂, x̄_d the per-column mean
and x̿ the scalar mean of every entry:

  r2_global           1 − Σe² / Σ(x − x̿)²                  overcomplete, the official USAE code
  explained_variance  1 − Σe² / Σ(x − x̄_d)²                sparsify's 1 − FVU, SAELens' trainer
  explained_variance_per_token
                      mean_n [1 − ‖e_n‖² / ‖x_n − x̄‖²]      SAELens' legacy EV, SAEBench's paper
  fraction_variance_explained
                      1 − Σ_d var(e_d) / Σ_d var(x_d)        dictionary_learning (ignores a constant
                                                             residual bias)
  r2_per_dimension    mean_d [1 − Σ_n e_nd² / Σ_n (x_nd − x̄_d)²]   sklearn's "uniform_average"

Firing statistics take each model's codes z `[N, m]` on its own inputs of the same N items, and a
threshold τ (a latent fires on item n when z_nc > τ).

All functions are pure jnp: they run inside a jitted or vmapped step as well as on host arrays.
"""

from __future__ import annotations

import jax.numpy as jnp


def r2_global(x, x_hat):
  """1 − Σ(x − x̂)² / Σ(x − x̿)², x̿ the mean of every entry of x (a scalar)."""
  return 1.0 - jnp.sum((x - x_hat) ** 2) / jnp.sum((x - jnp.mean(x)) ** 2)


def explained_variance(x, x_hat):
  """1 − Σ(x − x̂)² / Σ(x − x̄_d)², x̄_d the mean over items of each dimension."""
  return 1.0 - jnp.sum((x - x_hat) ** 2) / jnp.sum((x - jnp.mean(x, axis=0)) ** 2)


def explained_variance_per_token(x, x_hat):
  """mean_n [1 − ‖x_n − x̂_n‖² / ‖x_n − x̄‖²], x̄ the per-dimension mean vector."""
  num = jnp.sum((x - x_hat) ** 2, axis=-1)
  den = jnp.sum((x - jnp.mean(x, axis=0)) ** 2, axis=-1)
  return jnp.mean(1.0 - num / den)


def fraction_variance_explained(x, x_hat):
  """1 − Σ_d var_n(x − x̂)_d / Σ_d var_n(x_d): a constant offset in the residual costs nothing."""
  return 1.0 - jnp.sum(jnp.var(x - x_hat, axis=0)) / jnp.sum(jnp.var(x, axis=0))


def r2_per_dimension(x, x_hat):
  """mean_d [1 − Σ_n e_nd² / Σ_n (x_nd − x̄_d)²]: each dimension weighted equally."""
  num = jnp.sum((x - x_hat) ** 2, axis=0)
  den = jnp.sum((x - jnp.mean(x, axis=0)) ** 2, axis=0)
  return jnp.mean(1.0 - num / den)


RECONSTRUCTION = {
    "r2_global": r2_global,
    "explained_variance": explained_variance,
    "explained_variance_per_token": explained_variance_per_token,
    "fraction_variance_explained": fraction_variance_explained,
    "r2_per_dimension": r2_per_dimension,
}


def r2_matrix(sources, reconstructions, metric=r2_global):
  """R[i, j] = metric(A_j, dec_j(enc_i(A_i))): rows are the encoded source, columns the target.

  `sources[j]` is model j's activations `[N, d_j]`; `reconstructions[i][j]` its reconstruction from
  model i's code of the same items."""
  n = len(sources)
  return jnp.array([[metric(sources[j], reconstructions[i][j]) for j in range(n)]
                    for i in range(n)])


def cross_r2(matrix):
  """Mean of the off-diagonal entries of an R² matrix (the official USAE's cross R²)."""
  n = matrix.shape[0]
  off = ~jnp.eye(n, dtype=bool)
  return jnp.sum(jnp.where(off, matrix, 0.0)) / (n * n - n)


def alignment_tax(independent_r2, usae_self_r2):
  """R²(an independent SAE on model A) − R[A, A] of the USAE: what sharing the latent costs A."""
  return independent_r2 - usae_self_r2


def l0(z, threshold: float = 0.0):
  """Mean number of latents above `threshold` per item: mean_n #{c: z_nc > τ}."""
  return jnp.mean(jnp.sum(z > threshold, axis=-1))


def firing_counts(codes, threshold: float = 0.1):
  """F[m, c] = #{n: z^m_nc > τ} for each model m's codes `[N, C]` on its own inputs: `[M, C]`."""
  return jnp.stack([jnp.sum(z > threshold, axis=0) for z in codes])


def dead_latents(counts):
  """`[C]` bool: latents that no model fires on any item (U_c = Σ_m F_mc = 0)."""
  return jnp.sum(counts, axis=0) == 0


def firing_entropy(counts):
  """H_c = −Σ_m p_mc log2 p_mc / log2 M, p_mc = F_mc / Σ_m F_mc, `[C]` in [0, 1].

  1: every model fires the latent equally often ("universal"); 0: one model only ("specific").
  Dead latents (no firing at all) get NaN, not 0: count them apart (`dead_latents`), since the
  official code's 0 would call them specific."""
  counts = jnp.asarray(counts, jnp.float32)
  total = jnp.sum(counts, axis=0)
  p = counts / jnp.where(total > 0, total, 1.0)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.log2(jnp.where(p > 0, p, 1.0)), 0.0), axis=0)
  h = h / jnp.log2(counts.shape[0])
  return jnp.where(total > 0, h, jnp.nan)


def co_firing(codes, threshold: float = 0.1, model: int = 0):
  """Co-firing of each latent and its aggregates, `codes[m]` `[N, C]` on the same N items.

  C_c = #{n: every model fires c on n}. Returns a dict:
    per_latent   C_c / F_model,c (NaN where model `model` never fires c)
    pooled       Σ_c C_c / Σ_c F_model,c: of all of model's firings, the share the other models
                 share on the same item (the number to put beside chance k/m for TopK codes)
    mean         mean over latents model fires of per_latent
    iou          C_c / #{n: any model fires c} per latent (NaN for dead latents)
  """
  fires = jnp.stack([z > threshold for z in codes])  # [M, N, C]
  both = jnp.sum(jnp.all(fires, axis=0), axis=0)
  own = jnp.sum(fires[model], axis=0)
  any_ = jnp.sum(jnp.any(fires, axis=0), axis=0)
  per = jnp.where(own > 0, both / jnp.where(own > 0, own, 1), jnp.nan)
  return {"per_latent": per,
          "pooled": jnp.sum(both) / jnp.maximum(jnp.sum(own), 1),
          "mean": jnp.nanmean(per),
          "iou": jnp.where(any_ > 0, both / jnp.where(any_ > 0, any_, 1), jnp.nan)}


def energy(z, decoder):
  """E_c = ‖mean_n z_nc · D_c‖₂ with decoder rows D `[C, d]`: how much of the mean reconstruction
  latent c carries (the official USAE code sorts concepts by its sum over models)."""
  return jnp.abs(jnp.mean(z, axis=0)) * jnp.linalg.norm(decoder, axis=-1)
