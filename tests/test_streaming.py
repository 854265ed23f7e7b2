"""Streaming with attention sinks: the rolling sink + window cache equals a fresh forward over the
StreamingLLM keeps (their keys and values as computed when they arrived), at re-indexed
positions, at every step; without evictions it equals the plain forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from lm.pretrain.streaming import streaming_logprobs
from lm.layers import apply_rope, rope_tables
from lm.scoring import next_token_logprobs
from tests_helpers import scrambled

T = 24


def _model(**kw):
  model = scrambled(lm.Transformer(lm.preset("tiny", **kw), rngs=nnx.Rngs(0)), 0)
  if model.cfg.attention_sinks:
    for block in model.layers:
      block.attn.sinks[...] = jnp.linspace(-1.0, 2.0, model.cfg.n_heads)
  return model


def _tokens(seed=0):
  return np.random.default_rng(seed).integers(1, 256, T).astype(np.int32)


@pytest.mark.parametrize("window,sinks", [(T, 0), (T - 2, 2)])
def test_without_evictions_streaming_is_the_plain_forward(window, sinks):
  model = _model()
  toks = _tokens()
  want = np.asarray(next_token_logprobs(model, jnp.asarray(toks[None])))[0]
  np.testing.assert_allclose(streaming_logprobs(model, toks, window=window, sinks=sinks), want,
                             atol=2e-5)


def _reference(model, toks, window, sinks):
  """StreamingLLM step by step, written plainly: per layer a list of every token's key (before
  RoPE) and value, computed when the token arrived; step t attends to the kept tokens with RoPE at
  their slots 0..n-1 in the cache, the query at slot n-1."""
  cfg = model.cfg
  g = cfg.n_heads // cfg.n_kv_heads
  keys = [[] for _ in model.layers]
  values = [[] for _ in model.layers]
  out = []
  for t in range(len(toks) - 1):
    kept = list(range(min(t + 1, sinks))) + list(range(max(sinks, t + 1 - window), t + 1))
    n = len(kept)
    h = model.embed(jnp.asarray([[toks[t]]]))
    for i, block in enumerate(model.layers):
      a = block.attn
      xn = block.input_norm(h)
      keys[i].append(a.k_proj(xn)[0, 0])
      values[i].append(a.v_proj(xn)[0, 0])
      cos, sin = rope_tables(cfg, jnp.arange(n)[None])
      k = apply_rope(jnp.stack([keys[i][j] for j in kept])[None], cos, sin)[0]  # [n, K, H]
      q = apply_rope(a.q_proj(xn), cos[:, -1:], sin[:, -1:])[0, 0]  # [N, H]
      v = jnp.stack([values[i][j] for j in kept])
      heads = []
      for head in range(cfg.n_heads):
        sc = k[:, head // g] @ q[head] / np.sqrt(cfg.head_dim)
        if a.sinks is not None:
          sc = jnp.concatenate([sc, a.sinks[...][head][None]])
        w = jax.nn.softmax(sc)[:n]
        heads.append(w @ v[:, head // g])
      h = h + a.o_proj(jnp.stack(heads)[None, None])
      h = h + block.mlp(block.post_attn_norm(h))
    logits = model.logits(model.final_norm(h))[0, 0]
    out.append(float(jax.nn.log_softmax(logits)[toks[t + 1]]))
  return np.asarray(out)


@pytest.mark.parametrize("window,sinks", [(5, 0), (5, 1), (4, 3)])
@pytest.mark.parametrize("gpt_oss_sinks", [False, True])
def test_rolling_cache_equals_streamingllm_step_by_step(window, sinks, gpt_oss_sinks):
  model = _model(attention_sinks=gpt_oss_sinks)
  toks = _tokens(1)
  got = streaming_logprobs(model, toks, window=window, sinks=sinks)
  np.testing.assert_allclose(got, _reference(model, toks, window, sinks), atol=2e-5)
