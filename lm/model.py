"""The Llama-family decoder: one forward for training, scoring, reward heads and decoding.

`model(tokens_bs, positions_bs=None, attn_mask=None, cache=None) -> (logits_bsv, cache)`.
`model.trunk(...)` hands out the residual stream after chosen layers from the same forward (and
can stop after the deepest one); `cfg.scan_layers` runs the stack as one `lax.scan`, `cfg.remat`
picks what each block keeps for the backward pass. Both leave the numbers unchanged.

Padding is expressed by `attn_mask` (`[B, S]`, 1 = real token; left padding for prompts), or by a
full `[B, S, T]` mask that is ANDed with causality (packing). The KV cache is an explicit pytree of
static shape; a call with a cache writes its S tokens at `cache.index` and attends to every valid
slot written so far.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import inputs
from lm.attention import fused_attention
from lm.config import ModelConfig
from lm.layers import Embed, Linear, RMSNorm, apply_rope, param, rope_tables
from lm.sharding import constrain

_NEG = float(np.finfo(np.float32).min)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Static-shape KV cache.

  k, v: one `[B, kv_heads, S_max, head_dim]` array per layer: the layout the attention GEMMs
    read, so a decode step writes one slot and never transposes the cache.
  mask_bt: `[B, S_max]` bool, slot holds a real (non-pad) token.
  index: int32 scalar, next slot to write (shared by the batch: prompts are left-padded).
  lengths_b: int32 `[B]`, real tokens written so far per row (= the next RoPE position).
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask_bt: jax.Array
  index: jax.Array
  lengths_b: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> "KVCache":
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    dt = jnp.dtype(dtype or cfg.dtype)
    zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))
    return cls(
        k=zeros,
        v=tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)),
        mask_bt=jnp.zeros((batch, max_len), bool),
        index=jnp.zeros((), jnp.int32),
        lengths_b=jnp.zeros((batch,), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.mask_bt.shape[1]

  def take_rows(self, rows_n: jax.Array) -> "KVCache":
    """The cache with row n replaced by row rows_n[n] (every layer's k/v, mask and lengths)."""
    # "clip": rows are always in range, and the default "fill" mode adds a masked copy per step.
    take = functools.partial(jnp.take, indices=rows_n, axis=0, mode="clip")
    return KVCache(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)),
                   mask_bt=take(self.mask_bt), index=self.index, lengths_b=take(self.lengths_b))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Trunk:
  """One pass through the layer stack.

  hidden_bsd: final-norm hidden states `[B, S, D]`; None when the pass stopped early.
  cache: the updated KV cache (None without one).
  residual: layer index L -> the residual stream after block L, `[B, S, D]`, before the final
    norm (HF's `hidden_states[L + 1]`).
  """

  hidden_bsd: jax.Array | None
  cache: KVCache | None
  residual: dict[int, jax.Array]


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_fn(graphdef, remat: str):
  """`(state, x, cos, sin, mask) -> (x, rng_state)` for one block, rematerialised per `remat`.

  The block's rng state (LoRA dropout counters) comes back out so the caller can store it: a
  block rebuilt from its state inside `checkpoint`/`scan` cannot update the model in place.
  """
  def run(state, x_bsd, cos, sin, mask_bst):
    block = nnx.merge(graphdef, state)
    x_bsd, _ = block(x_bsd, cos, sin, mask_bst)
    return constrain(x_bsd, ("act_batch", "act_seq", "act_embed")), nnx.state(block, nnx.RngState)

  if remat == "none":
    return run
  return jax.checkpoint(run, policy=_REMAT[remat])


class Attention(nnx.Module):
  """Grouped-query attention with RoPE, optional sliding window and attention sinks."""

  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kw = dict(use_bias=cfg.attention_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.q_proj = Linear((d,), (n, h), axes=("embed", "heads", "head_dim"), **kw)
    self.k_proj = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), **kw)
    self.v_proj = Linear((d,), (k, h), axes=("embed", "kv_heads", "head_dim"), **kw)
    kw["use_bias"] = cfg.attention_bias
    self.o_proj = Linear((n, h), (d,), axes=("heads", "head_dim", "embed"), **kw)
    self.sinks = (
        param(jnp.zeros((n,), cfg.param_dtype), ("heads",)) if cfg.attention_sinks else None
    )

  def __call__(self, x_bsd, cos_bsh, sin_bsh, mask_bst, kv=None, index=None):
    """`mask_bst` None (fused path only): plain causal attention."""
    cfg = self.cfg
    if cfg.attention_impl == "fused" and kv is None:
      q = apply_rope(self.q_proj(x_bsd), cos_bsh, sin_bsh)
      k = apply_rope(self.k_proj(x_bsd), cos_bsh, sin_bsh)
      sinks = None if self.sinks is None else self.sinks[...]
      return self.o_proj(fused_attention(q, k, self.v_proj(x_bsd), mask_bst, sinks)), None
    b, s, _ = x_bsd.shape
    probs, v_t, kv = self.probabilities(x_bsd, cos_bsh, sin_bsh, mask_bst, kv, index)
    kh, g, hd, t = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, v_t.shape[2]
    out = jnp.einsum("bkqt,bkth->bkqh", probs.reshape(b, kh, g * s, t).astype(v_t.dtype), v_t)
    out = out.reshape(b, kh, g, s, hd).transpose(0, 3, 1, 2, 4).reshape(b, s, cfg.n_heads, hd)
    return self.o_proj(out), kv

  def probabilities(self, x_bsd, cos_bsh, sin_bsh, mask_bst, kv=None, index=None):
    """Attention weights `[B, kv_heads, G, S, T]` (float32; head n = kv head n // G, member
    n % G), the values `[B, kv_heads, T, H]` and the updated (k, v) cache arrays. With sinks the
    weights of a query sum to 1 minus the mass on its sink column."""
    cfg = self.cfg
    b, s, _ = x_bsd.shape
    g = cfg.n_heads // cfg.n_kv_heads
    q = apply_rope(self.q_proj(x_bsd), cos_bsh, sin_bsh)
    k = apply_rope(self.k_proj(x_bsd), cos_bsh, sin_bsh)
    # K/V as [B, K, T, H] and queries grouped by their kv head, [B, K, G*S, H]: one GEMM per
    # (row, kv head) against the un-repeated K/V (no [B, T, N, H] copies of the cache when
    # decoding); XLA:CPU runs these plain GEMMs far faster than a 5-D "bskgh,btkh" contraction.
    k_t = k.transpose(0, 2, 1, 3)
    v_t = self.v_proj(x_bsd).transpose(0, 2, 1, 3)
    if kv is not None:
      k_t = jax.lax.dynamic_update_slice(kv[0], k_t.astype(kv[0].dtype), (0, 0, index, 0))
      v_t = jax.lax.dynamic_update_slice(kv[1], v_t.astype(kv[1].dtype), (0, 0, index, 0))
      kv = (k_t, v_t)
    kh, hd = cfg.n_kv_heads, cfg.head_dim
    t = k_t.shape[2]
    q = q.reshape(b, s, kh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * s, hd)
    k_t = k_t.astype(q.dtype)
    if s == 1:  # a decode step: XLA:CPU fuses this multiply-reduce; it beats M=G tiny GEMMs
      scores = jnp.sum(q.astype(jnp.float32)[:, :, :, None, :] * k_t[:, :, None, :, :], axis=-1)
    else:
      scores = jnp.einsum("bkqh,bkth->bkqt", q, k_t, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kh, g, s, t) * (hd**-0.5)
    return attention_weights(scores, mask_bst[:, None, None], self.sinks), v_t, kv


def attention_weights(scores_bkgst: jax.Array, visible, sinks: nnx.Param | None) -> jax.Array:
  """Softmax over the last axis of scaled scores `[B, kv_heads, G, S, T]` (float32) where
  `visible` (broadcastable bool), with the per-head sink logits (`[n_heads]`, head = kv head * G +
  member) as an extra column dropped after the softmax. Every unfused attention computes its
  weights here (the model's, the streaming cache's)."""
  scores = jnp.where(visible, scores_bkgst, _NEG)
  if sinks is None:
    return jax.nn.softmax(scores, axis=-1)
  b, kh, g, s, _ = scores.shape
  sink = sinks[...].astype(jnp.float32).reshape(1, kh, g, 1, 1)
  sink = jnp.broadcast_to(sink, (b, kh, g, s, 1))
  return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.d_model, cfg.d_ff
    kw = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = Linear((d,), (f,), axes=("embed", "mlp"), **kw)
    self.up_proj = Linear((d,), (f,), axes=("embed", "mlp"), **kw)
    self.down_proj = Linear((f,), (d,), axes=("mlp", "embed"), **kw)

  def __call__(self, x_bsd):
    return self.down_proj(jax.nn.silu(self.gate_proj(x_bsd)) * self.up_proj(x_bsd))


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=cfg.param_dtype)
    self.attn = Attention(cfg, layer_idx, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=cfg.param_dtype)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_bsd, cos, sin, mask_bst, kv=None, index=None):
    h, kv = self.attn(self.input_norm(x_bsd), cos, sin, mask_bst, kv, index)
    x_bsd = x_bsd + h
    return x_bsd + self.mlp(self.post_attn_norm(x_bsd)), kv


class Transformer(nnx.Module):
  """Decoder-only Llama-family language model."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       rngs=rngs)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, param_dtype=cfg.param_dtype)
    self.lm_head = (
        None if cfg.tie_embeddings else
        Linear((cfg.d_model,), (cfg.vocab_size,), axes=("embed", "vocab"), dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, rngs=rngs)
    )

  def __call__(self, tokens_bs, positions_bs=None, attn_mask=None, cache: KVCache | None = None):
    """Logits `[B, S, V]` (float32) and the updated cache (None without one)."""
    h_bsd, cache = self.hidden_states(tokens_bs, positions_bs, attn_mask, cache)
    return self.logits(h_bsd), cache

  def logits(self, h_bsd: jax.Array) -> jax.Array:
    """Output projection of final hidden states, in float32."""
    out = self.embed.attend(h_bsd) if self.lm_head is None else self.lm_head(h_bsd)
    return constrain(out.astype(jnp.float32), ("act_batch", "act_seq", "act_vocab"))

  def hidden_states(self, tokens_bs, positions_bs=None, attn_mask=None,
                    cache: KVCache | None = None):
    """Final-norm hidden states `[B, S, D]` and the updated cache: the shared trunk."""
    out = self.trunk(tokens_bs, positions_bs, attn_mask, cache)
    return out.hidden_bsd, out.cache

  def residual_stream(self, tokens_bs, layers, positions_bs=None, attn_mask=None
                      ) -> dict[int, jax.Array]:
    """The residual stream after each block in `layers` (`[B, S, D]` each, before the final norm);
    the forward stops after the deepest one."""
    layers = tuple(layers)
    if not layers:
      raise ValueError("layers is empty; name at least one layer index to capture.")
    return self.trunk(tokens_bs, positions_bs, attn_mask, capture=layers,
                      stop_after=max(layers)).residual

  def trunk(self, tokens_bs, positions_bs=None, attn_mask=None, cache: KVCache | None = None, *,
            capture=(), stop_after: int | None = None) -> Trunk:
    """The layer stack once: final hidden states, the cache, and the residual stream after each
    layer in `capture`. `stop_after=L` ends the pass after block L (no final norm, no cache)."""
    cfg = self.cfg
    _check_inputs(cfg, tokens_bs, positions_bs, attn_mask, cache)
    capture = frozenset(int(i) for i in capture)
    for i in sorted(capture) + ([] if stop_after is None else [stop_after]):
      if not 0 <= i < cfg.n_layers:
        raise ValueError(f"layer index {i} is outside the model's layers [0, {cfg.n_layers}).")
    if stop_after is not None and cache is not None:
      raise ValueError("stop_after ends the pass early, which leaves a KV cache half written; "
                       "capture layers from a pass without a cache.")
    valid_bs, key_valid_bt, index, masks, cos, sin = self._prepare(
        tokens_bs, positions_bs, attn_mask, cache, fused=cfg.attention_impl == "fused")
    b, s = tokens_bs.shape
    x = constrain(self.embed(tokens_bs), ("act_batch", "act_seq", "act_embed"))
    last = cfg.n_layers - 1 if stop_after is None else stop_after
    if cache is None and (cfg.scan_layers or cfg.remat != "none"):
      x, residual = self._stack_without_cache(x, cos, sin, masks, capture, last)
    else:
      residual = {}
      new_k, new_v = [], []
      for i in range(last + 1):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, kv = self.layers[i](x, cos, sin, masks[cfg.layer_types[i]], kv, index)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        if i in capture:
          residual[i] = x
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
      if cache is not None:
        cache = KVCache(
            k=tuple(new_k), v=tuple(new_v), mask_bt=key_valid_bt,
            index=cache.index + s,
            lengths_b=cache.lengths_b + valid_bs.sum(axis=1).astype(jnp.int32),
        )
    hidden = self.final_norm(x) if stop_after is None else None
    return Trunk(hidden, cache, residual)

  def _prepare(self, tokens_bs, positions_bs, attn_mask, cache, fused=False):
    """(valid_bs, key_valid_bt, cache index, {"full"|"sliding": [B, S, T] mask}, cos, sin).

    `fused`: the mask of full layers is None when it is plain causal (no cache, no attn_mask,
    every layer full), so `lm.attention` runs the kernel's own causal mask and builds no mask.
    """
    cfg = self.cfg
    b, s = tokens_bs.shape
    if attn_mask is None:
      valid_bs = jnp.ones((b, s), bool)
      extra_mask = None
    elif attn_mask.ndim == 2:
      valid_bs = attn_mask.astype(bool)
      extra_mask = None
    else:
      valid_bs = jnp.ones((b, s), bool)
      extra_mask = attn_mask.astype(bool)

    offset_b = jnp.zeros((b,), jnp.int32) if cache is None else cache.lengths_b
    explicit_positions = positions_bs is not None
    if positions_bs is None:
      positions_bs = offset_b[:, None] + jnp.maximum(jnp.cumsum(valid_bs, axis=1) - 1, 0)

    if cache is None:
      index = 0
      key_valid_bt = valid_bs
      q_slot = jnp.arange(s)
      k_slot = jnp.arange(s)
    else:
      index = cache.index
      key_valid_bt = jax.lax.dynamic_update_slice(cache.mask_bt, valid_bs, (0, index))
      q_slot = index + jnp.arange(s)
      k_slot = jnp.arange(cache.max_len)

    causal_st = k_slot[None, :] <= q_slot[:, None]
    full_bst = causal_st[None] & key_valid_bt[:, None, :]
    if extra_mask is not None:
      full_bst = full_bst & extra_mask
    plain_causal = (fused and cache is None and attn_mask is None
                    and "sliding" not in cfg.layer_types)
    masks = {"full": None if plain_causal else full_bst}
    if "sliding" in cfg.layer_types:
      window_bst = ((q_slot[:, None] - k_slot[None, :]) < cfg.sliding_window)[None]
      if cfg.sink_tokens:
        # a key's position in its sequence: the given positions (packed rows restart them per
        # document), else its rank among the row's real keys (left padding, cache slots)
        if cache is None and explicit_positions:
          key_pos_bt = positions_bs
        else:
          key_pos_bt = jnp.cumsum(key_valid_bt, axis=1) - 1
        window_bst = window_bst | (key_pos_bt < cfg.sink_tokens)[:, None, :]
      masks["sliding"] = full_bst & window_bst

    cos, sin = rope_tables(cfg, positions_bs)
    return valid_bs, key_valid_bt, index, masks, cos, sin

  def attention_maps(self, tokens_bs, positions_bs=None, attn_mask=None, layers=None
                     ) -> dict[int, jax.Array]:
    """Attention weights `[B, n_heads, S, T]` (float32) of each layer in `layers` (default all),
    from one unrolled pass without a cache. With `attention_sinks` a query's weights sum to 1
    minus the mass its head puts on the sink column."""
    cfg = self.cfg
    _check_inputs(cfg, tokens_bs, positions_bs, attn_mask, None)
    layers = range(cfg.n_layers) if layers is None else sorted(int(i) for i in layers)
    _, _, _, masks, cos, sin = self._prepare(tokens_bs, positions_bs, attn_mask, None)
    x = self.embed(tokens_bs)
    maps = {}
    for i in range(max(layers) + 1):
      block = self.layers[i]
      mask = masks[cfg.layer_types[i]]
      if i in layers:
        probs = block.attn.probabilities(block.input_norm(x), cos, sin, mask)[0]
        b, k, g, s, t = probs.shape
        maps[i] = probs.reshape(b, k * g, s, t)
      x, _ = block(x, cos, sin, mask)
    return maps

  def _stack_without_cache(self, x, cos, sin, masks, capture, last):
    """Blocks 0..last, each under `cfg.remat`; with `cfg.scan_layers` every run of blocks between
    captured layers is one `lax.scan` over its layers' stacked weights."""
    cfg = self.cfg
    residual = {}
    if not cfg.scan_layers:
      for i in range(last + 1):
        graphdef, state = nnx.split(self.layers[i])
        x, rng = _block_fn(graphdef, cfg.remat)(state, x, cos, sin, masks[cfg.layer_types[i]])
        nnx.update(self.layers[i], rng)
        if i in capture:
          residual[i] = x
      return x, residual
    graphdef = nnx.graphdef(self.layers[0])
    for i in range(1, last + 1):
      if nnx.graphdef(self.layers[i]) != graphdef:
        raise ValueError(
            f"scan_layers needs every layer to share one structure, but layer {i} differs from "
            "layer 0 (e.g. LoRA on some layers only); set scan_layers=False for this model.")
    block = _block_fn(graphdef, cfg.remat)
    sliding = "sliding" in masks

    def body(x_bsd, layer):
      state, is_sliding = layer
      mask = jnp.where(is_sliding, masks["sliding"], masks["full"]) if sliding else masks["full"]
      return block(state, x_bsd, cos, sin, mask)

    cuts = sorted(i for i in capture if i < last) + [last]
    start = 0
    for end in cuts:  # scan blocks start..end, then hand out the residual after `end`
      ids = range(start, end + 1)
      states = [nnx.state(self.layers[i]) for i in ids]
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
      flags = jnp.asarray([cfg.layer_types[i] == "sliding" for i in ids])
      x, rngs = jax.lax.scan(body, x, (stacked, flags))
      for j, i in enumerate(ids):
        nnx.update(self.layers[i], jax.tree.map(lambda r, j=j: r[j], rngs))
      if end in capture:
        residual[end] = x
      start = end + 1
    return x, residual


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def _check_inputs(cfg: ModelConfig, tokens_bs, positions_bs, attn_mask, cache) -> None:
  """Shape checks always; value checks where the inputs are concrete (not under jit)."""
  if tokens_bs.ndim != 2 or not jnp.issubdtype(tokens_bs.dtype, jnp.integer):
    raise ValueError(
        f"tokens_bs must be an integer array [batch, seq]; got shape {tokens_bs.shape} "
        f"dtype {tokens_bs.dtype}. Add a batch axis with tokens[None] for one sequence."
    )
  b, s = tokens_bs.shape
  if _is_concrete(tokens_bs):
    # numpy: a concrete array captured under jit must not be traced
    inputs.token_array(np.asarray(tokens_bs), vocab_size=cfg.vocab_size, what="tokens_bs")
  if positions_bs is not None and positions_bs.shape != (b, s):
    raise ValueError(f"positions_bs has shape {positions_bs.shape}; expected {(b, s)}.")
  if attn_mask is not None and attn_mask.shape not in ((b, s), (b, s, s if cache is None else
                                                                  cache.max_len)):
    raise ValueError(
        f"attn_mask has shape {attn_mask.shape}; expected [B, S]={(b, s)} (padding) or [B, S, T] "
        "(full mask)."
    )
  if cache is not None:
    if cache.mask_bt.shape[0] != b:
      raise ValueError(f"cache is for batch {cache.mask_bt.shape[0]} but tokens_bs has batch {b}.")
    if s > cache.max_len or (_is_concrete(cache.index) and int(cache.index) + s > cache.max_len):
      used = int(cache.index) if _is_concrete(cache.index) else "?"
      raise ValueError(
          f"sequence of {s} tokens does not fit the KV cache (max_len={cache.max_len}, "
          f"{used} slots used). Build the cache with KVCache.init(..., max_len>=prompt+new tokens)."
      )
