"""Building blocks: the one linear layer, embeddings, RMSNorm and rotary position embeddings.

Every parameter carries logical axis names in its `logical_axes` metadata (resolved to mesh axes by
`lm.sharding`), not flax's `out_sharding`, so models build the same with or without a mesh.

LoRA lives inside `Linear` (`Linear.add_lora`, driven by `lm.lora`): factors are `nnx.LoRAParam`
(A `[*in, r]`, B `[r, *out]`, B zero at init), so one forward serves base and adapted models and
`nnx.split(model, nnx.LoRAParam, ...)` picks the adapter. LoRA dropout is an `nnx.Dropout` per layer
on its own rng stream `LORA_DROPOUT_STREAM`; its key/count live in `nnx.RngState` variables
(exclude them from checkpoints with `nnx.Not(nnx.RngState)`). `reseed_lora_dropout` replaces the
stream object rather than writing its variables, so it works on a model merged inside `jax.grad`
whose other state was captured from an outer trace.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ModelConfig, rope_frequencies

_INIT_STD = 0.02
LORA_DROPOUT_STREAM = "lora_dropout"


def param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
  """An `nnx.Param` named with logical axes, one per dimension."""
  if len(axes) != value.ndim:
    raise ValueError(f"axes {axes} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, logical_axes=axes)


class Linear(nnx.Module):
  """`y = x · W (+ b)` contracting the last `len(in_shape)` dims of x; the only matmul layer.

  Shapes are tuples so attention keeps heads as their own axis (`[D] -> [N, H]`) for sharding.
  With `add_lora`, `y += B(A(dropout(x))) · alpha / rank` (PEFT's LoRA) unless the adapter is
  switched off (`lora_enabled=False`) or folded into the kernel (`lora_merged=True`).
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
    self.lora_rank = 0
    self.lora_scaling = 0.0
    self.lora_enabled = True
    self.lora_merged = False
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_dropout = nnx.data(None)

  def add_lora(self, rank: int, alpha: float, dropout: float, *, rngs: nnx.Rngs) -> None:
    """Add LoRA factors A `[*in, rank]` (uniform ±1/sqrt(fan_in), as PEFT) and B `[rank, *out]` = 0.

    The adapter output is scaled by alpha / rank; dropout (rate `dropout`) acts on its input only.
    """
    if self.lora_rank:
      raise ValueError(f"this Linear already has a rank-{self.lora_rank} LoRA adapter.")
    if rank < 1:
      raise ValueError(f"LoRA rank must be >= 1; got {rank}.")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1); got {dropout}.")
    axes = self.kernel.get_metadata().get("logical_axes") or (None,) * self.kernel[...].ndim
    n_in = len(self.in_shape)
    pdtype = self.kernel[...].dtype
    bound = 1.0 / math.sqrt(math.prod(self.in_shape))
    a = jax.random.uniform(rngs.params(), self.in_shape + (rank,), pdtype, -bound, bound)
    self.lora_a = nnx.LoRAParam(a, logical_axes=tuple(axes[:n_in]) + ("lora_rank",))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank,) + self.out_shape, pdtype),
                                logical_axes=("lora_rank",) + tuple(axes[n_in:]))
    self.lora_rank = rank
    self.lora_scaling = float(alpha) / rank
    if dropout > 0:
      stream = nnx.Rngs(**{LORA_DROPOUT_STREAM: getattr(rngs, LORA_DROPOUT_STREAM)()})
      self.lora_dropout = nnx.Dropout(dropout, rng_collection=LORA_DROPOUT_STREAM, rngs=stream)

  def reseed_lora_dropout(self, key: jax.Array) -> None:
    """Give the LoRA dropout a fresh rng stream from `key` (a new object, so valid in any trace)."""
    if self.lora_dropout is not None:
      self.lora_dropout.rngs = nnx.RngStream(key, tag=LORA_DROPOUT_STREAM)

  def lora_delta(self) -> jax.Array:
    """`A·B·scaling` shaped like the kernel `[*in, *out]`, in float32."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return jnp.tensordot(a, b, axes=1) * self.lora_scaling

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), (contract, ((), ()))
    )
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_rank and self.lora_enabled and not self.lora_merged:
      y = y + self._lora(x)
    return y

  def _lora(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    if self.lora_dropout is not None:
      x = self.lora_dropout(x)
    n_in = len(self.in_shape)
    lead = x.shape[:x.ndim - n_in]
    a = self.lora_a[...].astype(self.dtype).reshape(-1, self.lora_rank)
    b = self.lora_b[...].astype(self.dtype).reshape(self.lora_rank, -1)
    y = lora_product(x.reshape(-1, a.shape[0]), a, b, self.lora_scaling)
    return y.reshape(lead + self.out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_product(x_ti: jax.Array, a_ir: jax.Array, b_ro: jax.Array, scaling: float) -> jax.Array:
  """`(x·A)·B·scaling` over flattened tokens `[T, in]`, with a hand-written backward.

  Autodiff's backward lets XLA:CPU transpose the `[T, out]` cotangent for the `[r, out]` weight
  gradient (fused with elementwise work, it took 2x the whole MLP forward at 8x256 tokens). Here
  every backward product is a plain row-major GEMM and only rank-`r` tensors are transposed.
  """
  return _lora_fwd(x_ti, a_ir, b_ro, scaling)[0]


def _lora_fwd(x_ti, a_ir, b_ro, scaling):
  h_tr = x_ti @ a_ir
  return h_tr @ b_ro * jnp.asarray(scaling, x_ti.dtype), (x_ti, a_ir, b_ro, h_tr)


def _lora_bwd(scaling, res, dy_to):
  x_ti, a_ir, b_ro, h_tr = res
  dy_to = dy_to * jnp.asarray(scaling, dy_to.dtype)
  g_tr = dy_to @ b_ro.T
  d_b = h_tr.T @ dy_to
  d_a = (g_tr.T @ x_ti).T
  return g_tr @ a_ir.T, d_a, d_b


lora_product.defvjp(_lora_fwd, _lora_bwd)


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
