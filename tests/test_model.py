"""Invariants of the one forward on the tiny preset: caching, padding, packing, input checks."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from tests_helpers import scrambled

SEQ = 10
LENGTHS = (10, 7, 3)


@pytest.fixture(scope="module")
def model():
  """Tiny preset with large random weights, so position or mask mistakes move the logits."""
  return scrambled(lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0)), seed=1)


def _padded_batch(seed=0, seq=SEQ, lengths=LENGTHS):
  rng = np.random.default_rng(seed)
  mask_bs = np.zeros((len(lengths), seq), np.int32)
  for i, n in enumerate(lengths):
    mask_bs[i, seq - n:] = 1
  return (rng.integers(1, 256, (len(lengths), seq)) * mask_bs).astype(np.int32), mask_bs


def _forward(model, tokens_bs, mask_bs=None, **kw):
  mask = None if mask_bs is None else jnp.asarray(mask_bs)
  return np.asarray(model(jnp.asarray(tokens_bs), attn_mask=mask, **kw)[0])


@pytest.mark.parametrize("bounds", [
    (0, 4, 5, 6, 7, 8, 9, 10),  # prefill, then one token per step
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10),  # token by token from the first (padded) column
    (0, 3, 7, 10),  # chunked prefill
], ids=["prefill+steps", "steps", "chunks"])
def test_cached_decode_equals_full_forward(model, bounds):
  tokens_bs, mask_bs = _padded_batch()
  full_bsv = _forward(model, tokens_bs, mask_bs)
  cache = lm.KVCache.init(model.cfg, len(LENGTHS), SEQ + 3)
  chunks = []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    logits_bsv, cache = model(jnp.asarray(tokens_bs[:, lo:hi]), attn_mask=jnp.asarray(mask_bs[:, lo:hi]),
                              cache=cache)
    assert logits_bsv.shape == (len(LENGTHS), hi - lo, model.cfg.vocab_size)
    chunks.append(np.asarray(logits_bsv))
  real = mask_bs.astype(bool)
  np.testing.assert_allclose(np.concatenate(chunks, axis=1)[real], full_bsv[real], atol=1e-5, rtol=0)
  assert int(cache.index) == SEQ
  np.testing.assert_array_equal(np.asarray(cache.lengths_b), LENGTHS)
  np.testing.assert_array_equal(np.asarray(cache.mask_bt)[:, :SEQ], real)
  assert not np.asarray(cache.mask_bt)[:, SEQ:].any()


def test_cached_decode_under_jit(model):
  tokens_bs, mask_bs = _padded_batch(seed=1)
  full_bsv = _forward(model, tokens_bs, mask_bs)

  @nnx.jit
  def step(m, tok_bs, mask_bs, cache):
    return m(tok_bs, attn_mask=mask_bs, cache=cache)

  cache = lm.KVCache.init(model.cfg, len(LENGTHS), SEQ)
  logits_bsv, cache = step(model, jnp.asarray(tokens_bs[:, :6]), jnp.asarray(mask_bs[:, :6]), cache)
  chunks = [np.asarray(logits_bsv)]
  for t in range(6, SEQ):
    logits_bsv, cache = step(model, jnp.asarray(tokens_bs[:, t:t + 1]),
                             jnp.asarray(mask_bs[:, t:t + 1]), cache)
    chunks.append(np.asarray(logits_bsv))
  real = mask_bs.astype(bool)
  np.testing.assert_allclose(np.concatenate(chunks, axis=1)[real], full_bsv[real], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_real_logits(model):
  tokens_bs, mask_bs = _padded_batch(seed=2)
  padded_bsv = _forward(model, tokens_bs, mask_bs)
  for b, n in enumerate(LENGTHS):
    alone_sv = _forward(model, tokens_bs[b:b + 1, SEQ - n:])[0]
    np.testing.assert_allclose(padded_bsv[b, SEQ - n:], alone_sv, atol=1e-5, rtol=0)


def test_pad_token_id_is_irrelevant(model):
  tokens_bs, mask_bs = _padded_batch(seed=3)
  other_bs = np.where(mask_bs.astype(bool), tokens_bs, 77)
  real = mask_bs.astype(bool)
  np.testing.assert_allclose(_forward(model, other_bs, mask_bs)[real],
                             _forward(model, tokens_bs, mask_bs)[real], atol=1e-6, rtol=0)


def test_default_positions_are_cumsum_of_mask(model):
  tokens_bs, mask_bs = _padded_batch(seed=4)
  positions_bs = np.maximum(np.cumsum(mask_bs, axis=1) - 1, 0)
  real = mask_bs.astype(bool)
  np.testing.assert_allclose(
      _forward(model, tokens_bs, mask_bs, positions_bs=jnp.asarray(positions_bs))[real],
      _forward(model, tokens_bs, mask_bs)[real], atol=1e-6, rtol=0)
  # RoPE is relative: a shift of every position is invisible, a stretch is not.
  shifted_bsv = _forward(model, tokens_bs, mask_bs, positions_bs=jnp.asarray(positions_bs + 3))
  np.testing.assert_allclose(shifted_bsv[real], _forward(model, tokens_bs, mask_bs)[real],
                             atol=1e-4, rtol=0)
  stretched_bsv = _forward(model, tokens_bs, mask_bs, positions_bs=jnp.asarray(positions_bs * 2))
  assert np.abs(stretched_bsv - _forward(model, tokens_bs, mask_bs))[real].max() > 1e-2


def test_packed_mask_equals_separate_sequences(model):
  """Two sequences packed in one row with a block-diagonal [B, S, T] mask and reset positions."""
  rng = np.random.default_rng(5)
  a, b = rng.integers(0, 256, 6), rng.integers(0, 256, 4)
  tokens_bs = np.concatenate([a, b])[None].astype(np.int32)
  segment_s = np.array([0] * 6 + [1] * 4)
  mask_bst = (segment_s[:, None] == segment_s[None, :])[None]
  positions_bs = np.concatenate([np.arange(6), np.arange(4)])[None]
  packed_sv = _forward(model, tokens_bs, mask_bst, positions_bs=jnp.asarray(positions_bs))[0]
  np.testing.assert_allclose(packed_sv[:6], _forward(model, a[None])[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(packed_sv[6:], _forward(model, b[None])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens_bs, match", [
    (np.array([[1, 2, 256]]), r"id 256, outside the vocabulary \[0, 256\)"),
    (np.array([[1, -1, 2]]), r"id -1, outside the vocabulary"),
    (np.array([1, 2, 3]), r"\[batch, seq\].*tokens\[None\]"),
    (np.ones((1, 2, 3), np.int32), r"\[batch, seq\]"),
    (np.array([[1.0, 2.0]]), r"integer array"),
])
def test_bad_tokens_raise(model, tokens_bs, match):
  with pytest.raises(ValueError, match=match):
    model(jnp.asarray(tokens_bs))


def test_bad_shapes_raise(model):
  tokens_bs = jnp.ones((2, 5), jnp.int32)
  with pytest.raises(ValueError, match=r"positions_bs has shape \(2, 4\)"):
    model(tokens_bs, positions_bs=jnp.zeros((2, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 4\)"):
    model(tokens_bs, attn_mask=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r"cache is for batch 3"):
    model(tokens_bs, cache=lm.KVCache.init(model.cfg, 3, 8))


def test_sequence_longer_than_cache_raises(model):
  cache = lm.KVCache.init(model.cfg, 1, 4)
  with pytest.raises(ValueError, match=r"6 tokens does not fit the KV cache \(max_len=4"):
    model(jnp.ones((1, 6), jnp.int32), cache=cache)
  _, cache = model(jnp.ones((1, 3), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match=r"max_len=4, 3 slots used.*max_len>="):
    model(jnp.ones((1, 2), jnp.int32), cache=cache)
  _, cache = model(jnp.ones((1, 1), jnp.int32), cache=cache)  # exactly full is fine
  assert int(cache.index) == 4


@pytest.mark.parametrize("kw, match", [
    (dict(n_heads=4, n_kv_heads=3), r"n_heads=4 must be a multiple of n_kv_heads=3"),
    (dict(layer_types=("sliding", "full")), r"'sliding' layers but sliding_window is not set"),
    (dict(layer_types=("full",)), r"layer_types has 1 entries but n_layers=2"),
    (dict(layer_types=("full", "local")), r"\['local'\].*'full' or 'sliding'"),
    (dict(head_dim=15), r"head_dim=15 must be even"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    lm.preset("tiny", **kw)


def test_rope_and_preset_errors():
  with pytest.raises(ValueError, match=r"rope_scaling.kind='ntk' is not supported.*'yarn'"):
    lm.RopeScaling(kind="ntk")
  with pytest.raises(ValueError, match=r"Unknown model preset 'huge'.*'tiny'"):
    lm.preset("huge")
  from lm.hub import weights
  with pytest.raises(ValueError, match=r"'longrope' is not supported"):
    weights.config_from_hf(dict(
        model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=8,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}))


def test_derived_config_fields():
  assert lm.preset("tiny").layer_types == ("full", "full")
  assert lm.preset("tiny").head_dim == 16
  cfg = lm.ModelConfig(vocab_size=8, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=8,
                       sliding_window=4)
  assert cfg.layer_types == ("sliding",) * 3 and cfg.head_dim == 8


# Fields derived by default (head_dim, layer_types) re-derive from overridden fields.
@pytest.mark.parametrize("kw, field, want", [
    (dict(sliding_window=4), "layer_types", ("sliding", "sliding")),
    (dict(d_model=128), "head_dim", 32),
    (dict(n_layers=3), "layer_types", ("full",) * 3),
], ids=["sliding_window", "d_model", "n_layers"])
def test_preset_overrides_rederive_fields(kw, field, want):
  assert getattr(lm.preset("tiny", **kw), field) == want
