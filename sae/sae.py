"""Sparse autoencoders as pure functions over a parameter dict, so many instances vmap.

x̂ = z D + b_dec with z = σ((x − b_dec) W_enc + b_enc), W_enc `[d, m]`, D `[m, d]`. σ is one of

  topk       the k largest of ReLU(pre) per row, values kept (Gao et al. 2024; SAELens, sparsify)
  batchtopk  the k·B largest of ReLU(pre) over the batch (Bussmann et al. 2024); at inference a
             single threshold (the running mean of the smallest kept value) replaces the batch rule
  relu       ReLU(pre), with an L1 penalty l1_coef · Σ_c z_c ‖D_c‖ (Anthropic's April 2024 update)
  jumprelu   pre · H(pre − θ_c), θ = exp(log_threshold) learned through a straight-through
             estimator with a rectangle kernel of width `bandwidth`, and an L0 penalty
             l0_coef · Σ_c H(pre − θ_c) (Rajamanoharan et al. 2024)

Decoder rows have unit norm, one of two ways (`decoder_norm`): `project` keeps W_dec's rows at unit
norm by removing each row's gradient component parallel to the row before the update and
renormalising after it (dictionary_learning, sparsify); `forward` divides by the row norm inside
every forward (overcomplete, the official USAE code), so W_dec itself may drift.

Initialisation: W_dec rows random unit vectors, W_enc = W_decᵀ, b_enc = 0, b_dec = the data mean
when given (else 0). AuxK (Gao et al.): latents that have not fired for `dead_after` steps
reconstruct the main residual (its gradient stopped) with their top `aux_k` pre-activations; the
loss is aux_coef · ‖e − ê‖² / ‖e − ē‖² (dictionary_learning's normalisation).

Reconstruction loss: mean over rows of Σ_d (x − x̂)² (the convention of dictionary_learning and
SAELens' trainer).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

ACTIVATIONS = ("topk", "batchtopk", "relu", "jumprelu")
DECODER_NORMS = ("project", "forward")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  d_in: int
  n_latents: int
  activation: str = "topk"
  k: int = 32
  l1_coef: float = 0.0
  l0_coef: float = 0.0
  jumprelu_init: float = 1e-3
  bandwidth: float = 1e-3
  decoder_norm: str = "project"
  aux_k: int = 0  # 0: d_in // 2 (Gao et al.)
  aux_coef: float = 1.0 / 32.0
  dead_after: int = 1000

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}: use one of {ACTIVATIONS}.")
    if self.decoder_norm not in DECODER_NORMS:
      raise ValueError(f"decoder_norm={self.decoder_norm!r}: use one of {DECODER_NORMS}.")
    if self.activation in ("topk", "batchtopk") and not 0 < self.k <= self.n_latents:
      raise ValueError(f"k={self.k} must be in [1, n_latents={self.n_latents}].")


def _unit_rows(w):
  return w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + 1e-8)


def init(key, cfg: SAEConfig, data_mean=None) -> dict:
  w_dec = _unit_rows(jax.random.normal(key, (cfg.n_latents, cfg.d_in)))
  params = {"W_enc": w_dec.T, "b_enc": jnp.zeros((cfg.n_latents,)), "W_dec": w_dec,
            "b_dec": jnp.zeros((cfg.d_in,)) if data_mean is None else jnp.asarray(data_mean)}
  if cfg.activation == "jumprelu":
    params["log_threshold"] = jnp.full((cfg.n_latents,), jnp.log(cfg.jumprelu_init))
  return params


def dictionary(params: dict, cfg: SAEConfig):
  """The decoder rows D `[m, d]` the forward uses."""
  return _unit_rows(params["W_dec"]) if cfg.decoder_norm == "forward" else params["W_dec"]


def _jump_fwd(pre, threshold, bandwidth):
  return _jump(pre, threshold, bandwidth), (pre, threshold)


def _jump_bwd(bandwidth, res, g):
  pre, threshold = res
  kernel = (jnp.abs((pre - threshold) / bandwidth) <= 0.5).astype(pre.dtype) / bandwidth
  return jnp.zeros_like(pre), jnp.sum(-kernel * g, axis=tuple(range(pre.ndim - 1)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jump(pre, threshold, bandwidth: float):
  """H(pre − θ) `[B, m]` with the straight-through gradient for θ `[m]`: −(1/ε) K((pre − θ)/ε),
  K the rectangle on [−½, ½]; none to pre."""
  return (pre > threshold).astype(pre.dtype)


_jump.defvjp(_jump_fwd, _jump_bwd)


def _jumprelu(pre, threshold, bandwidth: float):
  """pre · H(pre − θ): gradient H to pre and −(θ/ε) K((pre − θ)/ε) to θ (the paper's STE), from
  (pre − θ) · H (H constant) + θ · H (H straight-through)."""
  step = jax.lax.stop_gradient((pre > threshold).astype(pre.dtype))
  return (pre - threshold) * step + threshold * _jump(pre, threshold, bandwidth)


def topk_mask(acts_bm, k: int) -> jax.Array:
  """`[B, m]` bool: True at the k largest entries of each row of `acts_bm` (ties as
  `jax.lax.top_k` breaks them). The topk activation and AuxK keep the values it marks."""
  _, idx = jax.lax.top_k(acts_bm, k)
  return jnp.zeros(acts_bm.shape, bool).at[jnp.arange(acts_bm.shape[0])[:, None], idx].set(True)


def encode(params: dict, x, cfg: SAEConfig, *, threshold=None):
  """(pre `[B, m]`, z `[B, m]`). `threshold`: batchtopk at inference (one scalar) instead of the
  batch rule."""
  pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
  if cfg.activation == "topk":
    acts = jax.nn.relu(pre)
    return pre, jnp.where(topk_mask(acts, cfg.k), acts, 0.0)
  if cfg.activation == "batchtopk":
    acts = jax.nn.relu(pre)
    if threshold is None:
      kept = jax.lax.top_k(acts.reshape(-1), cfg.k * acts.shape[0])[0]
      threshold = jax.lax.stop_gradient(kept[-1])
    return pre, jnp.where(acts >= threshold, acts, 0.0) * (acts > 0)
  if cfg.activation == "relu":
    return pre, jax.nn.relu(pre)
  theta = jnp.exp(params["log_threshold"])
  return pre, _jumprelu(pre, theta, cfg.bandwidth)


def decode(params: dict, z, cfg: SAEConfig):
  return z @ dictionary(params, cfg) + params["b_dec"]


def batch_threshold(pre, cfg: SAEConfig):
  """The smallest value batchtopk keeps on this batch (its running mean is the inference θ)."""
  acts = jax.nn.relu(pre)
  return jax.lax.top_k(acts.reshape(-1), cfg.k * acts.shape[0])[0][-1]


def loss_fn(params: dict, x, cfg: SAEConfig, dead=None, *, l1_coef=None, l0_coef=None):
  """(loss, (metrics, z)) on a batch x `[B, d]`; `dead` `[m]` bool marks latents for AuxK.
  `l1_coef` / `l0_coef` override the config's (they may be traced: one per vmapped instance)."""
  l1_coef = cfg.l1_coef if l1_coef is None else l1_coef
  l0_coef = cfg.l0_coef if l0_coef is None else l0_coef
  pre, z = encode(params, x, cfg)
  x_hat = decode(params, z, cfg)
  e = x - x_hat
  mse = jnp.mean(jnp.sum(e ** 2, axis=-1))
  loss = mse
  metrics = {"mse": mse, "l0": jnp.mean(jnp.sum(z > 0, axis=-1))}
  if cfg.activation == "relu":
    l1 = jnp.mean(jnp.sum(z * jnp.linalg.norm(dictionary(params, cfg), axis=-1), axis=-1))
    loss = loss + l1_coef * l1
    metrics["l1"] = l1
  if cfg.activation == "jumprelu":  # the L0 the penalty differentiates (straight-through θ)
    l0 = jnp.mean(jnp.sum(_jump(pre, jnp.exp(params["log_threshold"]), cfg.bandwidth), axis=-1))
    loss = loss + l0_coef * l0
  if dead is not None and cfg.aux_coef:
    aux = aux_loss(params, pre, jax.lax.stop_gradient(e), dead, cfg)
    loss = loss + cfg.aux_coef * aux
    metrics["aux"] = aux
  metrics["loss"] = loss
  return loss, (metrics, z)


def aux_loss(params, pre, e, dead, cfg: SAEConfig) -> jax.Array:
  """AuxK (Gao et al. 2024), a scalar: ‖e − ê‖² / ‖e − ē‖² over the batch (0 when no latent is
  dead). e `[B, d]` is the residual to explain (its gradient stopped by the caller), ê the decoding
  of the top aux_k (`cfg.aux_k`, 0: d_in // 2; at most m) ReLU pre-activations `pre` `[B, m]` among
  the latents `dead` `[m]` bool marks, and ē the batch mean of e."""
  aux_k = min(cfg.aux_k or cfg.d_in // 2, cfg.n_latents)
  acts = jnp.where(dead, jax.nn.relu(pre), 0.0)
  z_aux = jnp.where(topk_mask(acts, aux_k), acts, 0.0)
  e_hat = z_aux @ dictionary(params, cfg)
  num = jnp.sum((e - e_hat) ** 2)
  den = jnp.sum((e - jnp.mean(e, axis=0)) ** 2)
  return jnp.where(jnp.any(dead), num / jnp.maximum(den, 1e-12), 0.0)


def remove_parallel_grads(params: dict, grads: dict, cfg: SAEConfig) -> dict:
  """`project`: each decoder row's gradient minus its component along the (unit) row."""
  if cfg.decoder_norm != "project":
    return grads
  w, g = params["W_dec"], grads["W_dec"]
  return {**grads, "W_dec": g - jnp.sum(g * w, axis=-1, keepdims=True) * w}


def renormalise(params: dict, cfg: SAEConfig) -> dict:
  """`project`: decoder rows back to unit norm after the update."""
  if cfg.decoder_norm != "project":
    return params
  return {**params, "W_dec": _unit_rows(params["W_dec"])}
