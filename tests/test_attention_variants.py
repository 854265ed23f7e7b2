"""Attention sinks and sliding windows against a dense numpy reference of the whole decoder."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from tests_helpers import scrambled

SEQ = 12
WINDOW = 4
LENGTHS = (12, 9, 5)  # left-padded rows of one batch

VARIANTS = {
    "sliding": dict(sliding_window=WINDOW, layer_types=("sliding", "full")),
    "sinks": dict(attention_sinks=True),
    "sliding+sinks": dict(sliding_window=WINDOW, layer_types=("full", "sliding"),
                          attention_sinks=True),
    # StreamingLLM: the first 2 positions stay visible beside the window
    "sliding+sink_tokens": dict(sliding_window=WINDOW, layer_types=("sliding", "sliding"),
                                sink_tokens=2),
}


def _cfg(**kw):
  return lm.preset("tiny", tie_embeddings=False, **kw)


def _model(cfg, seed=0, std=0.15):
  """A tiny model with large random weights (peaky attention) and nonzero sinks."""
  model = scrambled(lm.Transformer(cfg, rngs=nnx.Rngs(seed)), seed + 1, std)
  if cfg.attention_sinks:
    for block in model.layers:
      block.attn.sinks[...] = jnp.linspace(-1.0, 2.0, cfg.n_heads)
  return model


def _params(model) -> dict[str, np.ndarray]:
  """Dotted path -> float64 numpy array, e.g. 'layers.0.attn.q_proj.kernel'."""
  return {".".join(map(str, path)): np.asarray(var.get_value(), np.float64)
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _rms(x_sd, scale_d, eps):
  return scale_d * x_sd / np.sqrt(np.mean(x_sd * x_sd, axis=-1, keepdims=True) + eps)


def _rope(x_snh, positions_s, theta):
  h = x_snh.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
  angle_sh = np.concatenate([positions_s[:, None] * inv_freq] * 2, axis=-1)
  rotated = np.concatenate([-x_snh[..., h // 2:], x_snh[..., :h // 2]], axis=-1)
  return x_snh * np.cos(angle_sh)[:, None] + rotated * np.sin(angle_sh)[:, None]


def _reference_logits(p, cfg, tokens_s):
  """Logits `[S, V]` of one unpadded sequence (positions 0..S-1), loop by loop, in float64."""
  s_len = len(tokens_s)
  pos_s = np.arange(s_len)
  group = cfg.n_heads // cfg.n_kv_heads
  x = p["embed.embedding"][tokens_s]
  for i in range(cfg.n_layers):
    pre = f"layers.{i}."
    h = _rms(x, p[pre + "input_norm.scale"], cfg.rms_eps)
    q_snh = _rope(np.einsum("sd,dnh->snh", h, p[pre + "attn.q_proj.kernel"]), pos_s, cfg.rope_theta)
    k_skh = _rope(np.einsum("sd,dkh->skh", h, p[pre + "attn.k_proj.kernel"]), pos_s, cfg.rope_theta)
    v_skh = np.einsum("sd,dkh->skh", h, p[pre + "attn.v_proj.kernel"])
    out_snh = np.zeros_like(q_snh)
    for n in range(cfg.n_heads):
      kv = n // group
      for qi in range(s_len):
        allowed = [
            ki for ki in range(s_len)
            if 0 <= qi - ki and (cfg.layer_types[i] == "full" or qi - ki < cfg.sliding_window
                                 or ki < cfg.sink_tokens)
        ]
        logits = [q_snh[qi, n] @ k_skh[ki, kv] / np.sqrt(cfg.head_dim) for ki in allowed]
        if cfg.attention_sinks:
          logits.append(p[pre + "attn.sinks"][n])
        w = np.exp(np.array(logits) - max(logits))
        w = w / w.sum()
        out_snh[qi, n] = sum(w[j] * v_skh[ki, kv] for j, ki in enumerate(allowed))
    x = x + np.einsum("snh,nhd->sd", out_snh, p[pre + "attn.o_proj.kernel"])
    h = _rms(x, p[pre + "post_attn_norm.scale"], cfg.rms_eps)
    gate = h @ p[pre + "mlp.gate_proj.kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ p[pre + "mlp.up_proj.kernel"])) @ p[
        pre + "mlp.down_proj.kernel"]
  x = _rms(x, p["final_norm.scale"], cfg.rms_eps)
  return x @ p["lm_head.kernel"]


def _padded_batch(seed=0, seq=SEQ, lengths=LENGTHS, vocab=256):
  rng = np.random.default_rng(seed)
  mask_bs = np.zeros((len(lengths), seq), np.int32)
  for i, n in enumerate(lengths):
    mask_bs[i, seq - n:] = 1
  return (rng.integers(1, vocab, (len(lengths), seq)) * mask_bs).astype(np.int32), mask_bs


def _forward(model, tokens_bs, mask_bs=None):
  mask = None if mask_bs is None else jnp.asarray(mask_bs)
  return np.asarray(model(jnp.asarray(tokens_bs), attn_mask=mask)[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_dense_reference(variant):
  cfg = _cfg(**VARIANTS[variant])
  model = _model(cfg)
  p = _params(model)
  tokens_bs, mask_bs = _padded_batch()
  logits_bsv = _forward(model, tokens_bs, mask_bs)
  for b, n in enumerate(LENGTHS):
    ref_sv = _reference_logits(p, cfg, tokens_bs[b, SEQ - n:])
    np.testing.assert_allclose(logits_bsv[b, SEQ - n:], ref_sv, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_changes_logits(variant):
  """The variant is live: the same weights as plain full attention give other logits."""
  cfg = _cfg(**VARIANTS[variant])
  model = _model(cfg)
  plain = lm.Transformer(_cfg(), rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(model, lambda path, _: path[-1] != "sinks"))
  tokens_bs, _ = _padded_batch()
  diff_s = np.abs(_forward(model, tokens_bs) - _forward(plain, tokens_bs)).max(axis=(0, 2))
  if cfg.attention_sinks:
    assert diff_s.min() > 1e-2
  else:  # until a query loses a key, a sliding layer (+ sink tokens) is exactly full attention
    start = WINDOW + cfg.sink_tokens
    assert diff_s[:start].max() < 1e-6
    assert diff_s[start:].min() > 1e-2


def test_very_negative_sinks_equal_no_sinks():
  model = _model(_cfg(attention_sinks=True))
  for block in model.layers:
    block.attn.sinks[...] = jnp.full((model.cfg.n_heads,), -1e9)
  plain = lm.Transformer(_cfg(), rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(model, lambda path, _: path[-1] != "sinks"))
  tokens_bs, mask_bs = _padded_batch(seed=1)
  real = mask_bs.astype(bool)
  np.testing.assert_allclose(_forward(model, tokens_bs, mask_bs)[real],
                             _forward(plain, tokens_bs, mask_bs)[real], atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefill", [1, 5])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decode_equals_full_forward(variant, prefill):
  model = _model(_cfg(**VARIANTS[variant]))
  tokens_bs, mask_bs = _padded_batch(seed=2)
  full_bsv = _forward(model, tokens_bs, mask_bs)
  cache = lm.KVCache.init(model.cfg, len(LENGTHS), SEQ + 2)
  steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, SEQ)]
  chunks = []
  for lo, hi in steps:
    logits_bsv, cache = model(jnp.asarray(tokens_bs[:, lo:hi]), attn_mask=jnp.asarray(mask_bs[:, lo:hi]),
                              cache=cache)
    chunks.append(np.asarray(logits_bsv))
  cached_bsv = np.concatenate(chunks, axis=1)
  real = mask_bs.astype(bool)
  np.testing.assert_allclose(cached_bsv[real], full_bsv[real], atol=1e-5, rtol=0)
  assert int(cache.index) == SEQ
  np.testing.assert_array_equal(np.asarray(cache.lengths_b), LENGTHS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_attention_maps_equal_the_reference_weights(variant):
  """`attention_maps` of layer 0 = the float64 reference's softmax weights (sink column dropped,
  so rows sum to 1 minus the sink's mass); every layer's maps are causal and masked alike."""
  cfg = _cfg(**VARIANTS[variant])
  model = _model(cfg)
  p = _params(model)
  tokens_bs, mask_bs = _padded_batch()
  maps = model.attention_maps(jnp.asarray(tokens_bs), attn_mask=jnp.asarray(mask_bs))
  assert sorted(maps) == list(range(cfg.n_layers))
  b, n = 0, LENGTHS[0]
  x = p["embed.embedding"][tokens_bs[b]]
  h = _rms(x, p["layers.0.input_norm.scale"], cfg.rms_eps)
  pos = np.arange(n)
  q = _rope(np.einsum("sd,dnh->snh", h, p["layers.0.attn.q_proj.kernel"]), pos, cfg.rope_theta)
  k = _rope(np.einsum("sd,dkh->skh", h, p["layers.0.attn.k_proj.kernel"]), pos, cfg.rope_theta)
  group = cfg.n_heads // cfg.n_kv_heads
  got = np.asarray(maps[0][b])
  for head in range(cfg.n_heads):
    scores = q[:, head] @ k[:, head // group].T / np.sqrt(cfg.head_dim)
    i = np.arange(n)
    allowed = i[None, :] <= i[:, None]
    if cfg.layer_types[0] == "sliding":
      allowed &= ((i[:, None] - i[None, :]) < cfg.sliding_window) | (i[None, :] < cfg.sink_tokens)
    scores = np.where(allowed, scores, -np.inf)
    cols = [scores]
    if cfg.attention_sinks:
      cols.append(np.full((n, 1), p["layers.0.attn.sinks"][head]))
    full = np.concatenate(cols, axis=1)
    w = np.exp(full - full.max(axis=1, keepdims=True))
    w = (w / w.sum(axis=1, keepdims=True))[:, :n]
    np.testing.assert_allclose(got[head], w, atol=1e-5)
