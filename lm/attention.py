"""The fused attention path: `jax.nn.dot_product_attention` (cuDNN flash attention on a GPU in
bf16/fp16, XLA's implementation elsewhere) with the model's masks and learned sink logits.

The unfused path in `lm.model.Attention` materialises the `[B, N, S, T]` probabilities; it stays the
parity reference, the decode path (KV cache) and the attention-map path. This one never forms the
probabilities outside the kernel:

- masks: `mask_bst=None` means plain causal attention (`is_causal`, so cuDNN skips the masked
  blocks); any other mask (padding, packed documents, sliding windows with always-visible sink
  positions) goes to the kernel as a boolean mask, which cuDNN applies as an additive bias.
- sinks (one learned logit s per head, an extra softmax column with a zero value): from the kernel's
  log-sum-exp `L` over the real keys, the sinked output is `o · sigmoid(L - s)` (the real keys'
  share of `exp(L) + exp(s)`). The backward is written out (`_sink_attention`): cuDNN's vjp drops
  the cotangent of `L`, so autodiff through it would be silently wrong. With `w = sigmoid(L - s)`,
  `D = dO · o` and `g = D w (1 - w)`, the gradients are the kernel's vjp at cotangent `w dO` plus
  the `L` path, whose score gradient is `g P` (P the sink-free probabilities): `dq += scale g (P K)`
  and `dk += scale Pᵀ (g q)`, both one more kernel call (values = keys), and `ds = -Σ g`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def kernel_for(dtype) -> str:
  """'cudnn' on a GPU for bf16/fp16 operands (its flash kernel takes no float32), else 'xla'."""
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def fused_attention(q_bsnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                    mask_bst: jax.Array | None, sinks_n: jax.Array | None = None,
                    kernel: str | None = None) -> jax.Array:
  """Causal grouped-query attention `[B, S, N, H]` without a KV cache.

  q `[B, S, N, H]`, k/v `[B, T, K, H]` (T = S), `mask_bst` bool `[B, S, T]` ANDed with causality
  (None: causal only), `sinks_n` the per-head sink logits (None: plain softmax); `kernel` 'cudnn'
  or 'xla' (None: `kernel_for(q.dtype)`). Scale 1/sqrt(H), as the unfused path.
  """
  kernel = kernel or kernel_for(q_bsnh.dtype)
  if sinks_n is None:
    return _attend(q_bsnh, k_btkh, v_btkh, mask_bst, kernel)
  return _sink_attention(q_bsnh, k_btkh, v_btkh, sinks_n, mask_bst, kernel)


def _attend(q, k, v, mask_bst, kernel, return_lse=False):
  mask = None if mask_bst is None else mask_bst[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=kernel,
                                      return_residual=return_lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sink_attention(q, k, v, sinks_n, mask_bst, kernel):
  return _sink_fwd(q, k, v, sinks_n, mask_bst, kernel)[0]


def _sink_fwd(q, k, v, sinks_n, mask_bst, kernel):
  o, lse_bsn = _attend(q, k, v, mask_bst, kernel, return_lse=True)
  w_bsn = jax.nn.sigmoid(lse_bsn.astype(jnp.float32) - sinks_n.astype(jnp.float32))
  out = (o.astype(jnp.float32) * w_bsn[..., None]).astype(o.dtype)
  return out, (q, k, v, sinks_n, mask_bst, o, w_bsn)


def _sink_bwd(kernel, res, d_out):
  q, k, v, sinks_n, mask_bst, o, w_bsn = res
  d_out = d_out.astype(jnp.float32)
  g_bsn = jnp.sum(d_out * o.astype(jnp.float32), axis=-1) * w_bsn * (1.0 - w_bsn)
  _, vjp = jax.vjp(lambda q, k, v: _attend(q, k, v, mask_bst, kernel), q, k, v)
  dq, dk, dv = vjp((w_bsn[..., None] * d_out).astype(o.dtype))
  scale = q.shape[-1] ** -0.5
  pk, vjp_keys = jax.vjp(lambda vals: _attend(q, k, vals, mask_bst, kernel), k)
  (dk_lse,) = vjp_keys((scale * g_bsn[..., None] * q.astype(jnp.float32)).astype(q.dtype))
  dq = (dq.astype(jnp.float32) + scale * g_bsn[..., None] * pk.astype(jnp.float32)).astype(q.dtype)
  dk = (dk.astype(jnp.float32) + dk_lse.astype(jnp.float32)).astype(k.dtype)
  d_sinks = (-jnp.sum(g_bsn, axis=(0, 1))).astype(sinks_n.dtype)
  return dq, dk, dv, d_sinks, None


_sink_attention.defvjp(_sink_fwd, _sink_bwd)
