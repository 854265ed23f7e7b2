"""Streaming decoding with attention sinks (StreamingLLM, Xiao et al. 2023): a rolling KV cache of
the first `sinks` tokens plus the last `window` tokens, with positions re-indexed inside the cache,
so a model decodes (and scores) streams far beyond its training context in constant memory.

StreamingLLM gives every cached token its slot index in the cache as position. RoPE scores depend
on the query-key distance only, so that equals: the window's keys keep their true distance to the
query (slots shift with the evictions), and the sink keys sit just before the window, at distance
`sinks + window - 1 - i` for sink i. Here keys are cached rotated at their absolute positions and
the sink keys get one extra rotation by the number of evicted window tokens at each step
(R(a) R(b) = R(a + b)); the same numbers as re-rotating the whole cache each step, for `sinks`
rotations instead of `sinks + window`. (Absolute positions grow with the stream; RoPE tables are
float32 angles, exact enough here for streams of 10^5 tokens.) `sinks = 0` is window attention,
the baseline that collapses once the first token is evicted.

`streaming_logprobs` teacher-forces a token stream one token a step through this cache (one
`lax.scan`, compiled once per shape): log p(token t+1 | cache after token t). Every layer uses the
rolling cache (a model's own sliding-window layers see the whole cache); gpt-oss sink logits stay
an extra softmax column.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import inputs
from lm.layers import apply_rope, rope_tables
from lm.model import attention_weights


def _check(cfg, window: int, sinks: int) -> None:
  if window < 1 or sinks < 0:
    raise ValueError(f"streaming needs window >= 1 and sinks >= 0; got window={window}, "
                     f"sinks={sinks}.")
  if cfg.rope_scaling.kind == "yarn":
    raise ValueError("yarn RoPE scales cos/sin, so rotations do not compose; streaming supports "
                     "default, linear and llama3 RoPE.")
  if cfg.rope_scaling.kind == "dynamic":
    raise ValueError("dynamic NTK RoPE changes its base with the position; streaming needs a "
                     "fixed one (rope_scaling.kind default, linear or llama3).")


def _layer_step(block, cfg, h_b1d, t, cache, window: int, sinks: int):
  """One block for the token at absolute position t; cache = (ks, vs, kw, vw) of this layer."""
  ks, vs, kw, vw = cache
  b = h_b1d.shape[0]
  a = block.attn
  kh, g, hd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
  cos, sin = rope_tables(cfg, jnp.full((b, 1), t, jnp.int32))
  xn = block.input_norm(h_b1d)
  q = apply_rope(a.q_proj(xn), cos, sin)[:, 0]  # [B, N, H]
  k = apply_rope(a.k_proj(xn), cos, sin)[:, 0].astype(kw.dtype)  # [B, K, H]
  v = a.v_proj(xn)[:, 0].astype(vw.dtype)
  is_sink = t < sinks
  if sinks:
    slot = jnp.minimum(t, sinks - 1)
    ks = jnp.where(is_sink, jax.lax.dynamic_update_slice(ks, k[:, :, None], (0, 0, slot, 0)), ks)
    vs = jnp.where(is_sink, jax.lax.dynamic_update_slice(vs, v[:, :, None], (0, 0, slot, 0)), vs)
  w_slot = jnp.mod(jnp.maximum(t - sinks, 0), window)
  kw = jnp.where(is_sink, kw, jax.lax.dynamic_update_slice(kw, k[:, :, None], (0, 0, w_slot, 0)))
  vw = jnp.where(is_sink, vw, jax.lax.dynamic_update_slice(vw, v[:, :, None], (0, 0, w_slot, 0)))
  # sink keys move up to just before the window: one extra rotation by the evicted count
  evicted = jnp.maximum(t - sinks - window + 1, 0)
  if sinks:
    c_d, s_d = rope_tables(cfg, jnp.full((b, sinks), evicted, jnp.int32))
    ks_rot = apply_rope(ks.transpose(0, 2, 1, 3), c_d, s_d).transpose(0, 2, 1, 3)
    keys, values = jnp.concatenate([ks_rot, kw], axis=2), jnp.concatenate([vs, vw], axis=2)
  else:
    keys, values = kw, vw
  n_sink_valid = jnp.minimum(t + 1, sinks)
  n_win_valid = jnp.minimum(jnp.maximum(t + 1 - sinks, 0), window)
  slots = jnp.arange(sinks + window)
  valid = jnp.where(slots < sinks, slots < n_sink_valid, (slots - sinks) < n_win_valid)
  qg = q.reshape(b, kh, g, 1, hd).astype(jnp.float32)
  scores = jnp.einsum("bkgsh,bkth->bkgst", qg, keys.astype(jnp.float32)) * (hd**-0.5)
  probs = attention_weights(scores, valid, a.sinks)
  out = jnp.einsum("bkgst,bkth->bskgh", probs, values.astype(jnp.float32)).reshape(
      b, 1, cfg.n_heads, hd)
  h_b1d = h_b1d + a.o_proj(out.astype(h_b1d.dtype))
  h_b1d = h_b1d + block.mlp(block.post_attn_norm(h_b1d))
  return h_b1d, (ks, vs, kw, vw)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _stream(graphdef, state, tokens_bt, window: int, sinks: int):
  model = nnx.merge(graphdef, state)
  cfg = model.cfg
  b, t_len = tokens_bt.shape
  dt = jnp.dtype(cfg.dtype)
  shape = lambda n: (b, cfg.n_kv_heads, n, cfg.head_dim)
  cache = tuple((jnp.zeros(shape(sinks), dt), jnp.zeros(shape(sinks), dt),
                 jnp.zeros(shape(window), dt), jnp.zeros(shape(window), dt))
                for _ in range(cfg.n_layers))

  def step(cache, inp):
    t, tok_b, nxt_b = inp
    h = model.embed(tok_b[:, None])
    new = []
    for i, block in enumerate(model.layers):
      h, c = _layer_step(block, cfg, h, t, cache[i], window, sinks)
      new.append(c)
    logits = model.logits(model.final_norm(h))[:, 0]
    lp = jax.nn.log_softmax(logits, axis=-1)
    return tuple(new), jnp.take_along_axis(lp, nxt_b[:, None], axis=-1)[:, 0]

  xs = (jnp.arange(t_len - 1), tokens_bt[:, :-1].T, tokens_bt[:, 1:].T)
  _, lp_tb = jax.lax.scan(step, cache, xs)
  return lp_tb.T


def streaming_logprobs(model, tokens: Sequence[int] | np.ndarray, *, window: int, sinks: int
                       ) -> np.ndarray:
  """`[T-1]` (or `[B, T-1]` for a `[B, T]` array) log-probs of each next token under the rolling
  sink + window cache (module docstring)."""
  arr = np.asarray(tokens, np.int32)
  single = arr.ndim == 1
  arr = arr[None] if single else arr
  inputs.token_array(arr, vocab_size=model.cfg.vocab_size, what="tokens")
  _check(model.cfg, window, sinks)
  graphdef, state = nnx.split(model)
  out = np.asarray(_stream(graphdef, state, jnp.asarray(arr), int(window), int(sinks)))
  return out[0] if single else out


def streaming_perplexity(model, tokens: Sequence[int], *, window: int, sinks: int,
                         skip: int = 0) -> float:
  """exp(mean NLL) of the stream's tokens after the first `skip + 1` under the rolling cache."""
  lp = streaming_logprobs(model, tokens, window=window, sinks=sinks)
  return math.exp(-float(np.mean(lp[skip:], dtype=np.float64)))
