"""Building blocks: the one linear layer, embeddings, RMSNorm and rotary position embeddings.

Every parameter carries logical axis names in its `logical_axes` metadata (resolved to mesh axes by
`lm.sharding`), not flax's `out_sharding`, so models build the same with or without a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig, rope_frequencies

_INIT_STD = 0.02


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  """An `nnx.Param` named with logical axes, one per dimension."""
  if len(axes) != value.ndim:
    raise ValueError(f"axes {axes} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, logical_axes=axes)


class Linear(nnx.Module):
  """`y = x · W (+ b)` contracting the last `len(in_shape)` dims of x; the only matmul layer.

  Shapes are tuples so attention keeps heads as their own axis (`[D] -> [N, H]`) for sharding.
  """

  def __init__(
      self,
      in_shape: tuple[int, ...],
      out_shape: tuple[int, ...],
      *,
      axes: tuple[str | None, ...],
      use_bias: bool = False,
      dtype: str = "float32",
      param_dtype: str = "float32",
      rngs: nnx.Rngs,
  ):
    self.in_shape = tuple(in_shape)
    self.out_shape = tuple(out_shape)
    self.dtype = jnp.dtype(dtype)
    w = _INIT_STD * jax.random.normal(rngs.params(), self.in_shape + self.out_shape, param_dtype)
    self.kernel = param(w, axes)
    self.bias = (
        param(jnp.zeros(self.out_shape, param_dtype), axes[len(self.in_shape):])
        if use_bias else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (contract, ((), ()))
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding `[V, D]`; `attend` is the tied output projection."""

  def __init__(self, vocab_size: int, d_model: int, *, dtype: str, param_dtype: str,
               rngs: nnx.Rngs):
    self.vocab_size = vocab_size
    self.dtype = jnp.dtype(dtype)
    w = _INIT_STD * jax.random.normal(rngs.params(), (vocab_size, d_model), param_dtype)
    self.embedding = param(w, ("vocab", "embed"))

  def __call__(self, tokens_bs: jax.Array) -> jax.Array:
    # Out-of-vocab ids under jit give NaN (not a silently clipped row); eager calls raise earlier.
    x = jnp.take(self.embedding[...], tokens_bs, axis=0, mode="fill", fill_value=jnp.nan)
    return x.astype(self.dtype)

  def attend(self, x_bsd: jax.Array) -> jax.Array:
    return jnp.einsum("bsd,vd->bsv", x_bsd, self.embedding[...].astype(self.dtype))


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

  def __init__(self, dim: int, *, eps: float, param_dtype: str = "float32"):
    self.eps = eps
    self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(cfg: ModelConfig, positions_bs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos, sin `[B, S, head_dim]` for integer positions, in float32 (HF's rotate-half layout)."""
  inv_freq, scale = rope_frequencies(cfg)
  inv_freq = jnp.asarray(inv_freq)
  s = cfg.rope_scaling
  if s.kind == "dynamic":
    # NTK-by-parts: the base grows with the longest position seen in this call (HF's rule).
    dim = cfg.head_dim
    seq = jnp.maximum(jnp.max(positions_bs) + 1, cfg.max_seq_len).astype(jnp.float32)
    base = cfg.rope_theta * ((s.factor * seq / cfg.max_seq_len) - (s.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  freqs = positions_bs.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x_bsnh: jax.Array, cos_bsh: jax.Array, sin_bsh: jax.Array) -> jax.Array:
  half = x_bsnh.shape[-1] // 2
  rotated = jnp.concatenate([-x_bsnh[..., half:], x_bsnh[..., :half]], axis=-1)
  cos, sin = cos_bsh[:, :, None, :], sin_bsh[:, :, None, :]
  out = x_bsnh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x_bsnh.dtype)
