"""token_logprobs and sliding-window perplexity on hand-computed cases."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from lm import scoring


def test_token_logprobs_matches_log_softmax():
  logits = jnp.array([[[0.0, math.log(3.0)], [2.0, 2.0]]])
  lp = scoring.token_logprobs(logits, jnp.array([[1, 0]]))
  np.testing.assert_allclose(np.asarray(lp), [[math.log(0.75), math.log(0.5)]], rtol=1e-6)
  lp_t = scoring.token_logprobs(logits, jnp.array([[1, 0]]), temperature=0.5)
  np.testing.assert_allclose(float(lp_t[0, 0]), math.log(9 / 10), rtol=1e-6)


def test_windows_score_each_token_once():
  spans = scoring.sliding_windows(10, window=4, stride=2)
  assert spans == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
  # Through perplexity(): with log p(v) distinct per token id and ids 0..9 each once, the summed
  # NLL is the sum over tokens 1..9 exactly when every token but the first is scored once.
  logp = np.log(np.arange(1, 11) / 55.0)
  res = scoring.perplexity(_Fixed(logp), list(range(10)), window=4, stride=2, batch_size=3)
  assert res.n_tokens == 9
  assert res.nll_sum == pytest.approx(-logp[1:].sum(), rel=1e-6)
  with pytest.raises(ValueError, match="stride"):
    scoring.sliding_windows(10, window=4, stride=5)


class _Uniform(nnx.Module):
  """A 'model' whose next-token distribution is uniform over V: perplexity must be exactly V."""

  def __init__(self, vocab):
    self.vocab = vocab
    self.cfg = lm.preset("tiny").replace(vocab_size=vocab)  # the limits scoring checks inputs by

  def __call__(self, tokens_bs, attn_mask=None, **kw):
    return jnp.zeros(tokens_bs.shape + (self.vocab,)), None


class _Fixed(nnx.Module):
  """Next-token log-probs `logp` `[V]` at every position, whatever the context."""

  def __init__(self, logp):
    self.logp = nnx.Variable(jnp.asarray(logp, jnp.float32))
    self.cfg = lm.preset("tiny").replace(vocab_size=len(logp))  # the limits inputs are checked by

  def __call__(self, tokens_bs, attn_mask=None, **kw):
    return jnp.broadcast_to(self.logp[...], tokens_bs.shape + self.logp.shape), None


def test_perplexity_of_uniform_model_is_vocab_size():
  res = scoring.perplexity(_Uniform(7), list(range(7)) * 5, window=8, stride=3, batch_size=2)
  assert res.n_tokens == 34
  assert res.perplexity == pytest.approx(7.0, rel=1e-6)


def test_perplexity_equals_full_forward_when_window_covers_text():
  model = lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0))
  ids = list(np.random.default_rng(0).integers(0, 256, 30))
  lp = scoring.next_token_logprobs(model, jnp.asarray([ids]))
  res = scoring.perplexity(model, ids, window=32, stride=32)
  assert res.perplexity == pytest.approx(math.exp(-float(lp.mean())), rel=1e-5)


@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_selected_logprobs_equal_full_logits_values_and_gradients(chunk):
  """Chunked, skipping head = full-logits log-probs at selected positions: values and gradients
  w.r.t. hidden states and every parameter (tied head, so the embedding's too)."""
  import jax

  model = lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b, s = 3, 23
  h = jnp.asarray(rng.normal(size=(b, s, model.cfg.d_model)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, model.cfg.vocab_size, (b, s)))
  select = np.zeros((b, s), bool)
  select[0, 15:] = True  # a response at the end
  select[1, 2:6] = True  # a short one early
  select = jnp.asarray(select)  # row 2: nothing selected
  graphdef, params = nnx.split(model)
  w = jnp.asarray(rng.normal(size=(b, s)), jnp.float32)

  def full(params, h):
    m = nnx.merge(graphdef, params)
    return (jnp.where(select, scoring.token_logprobs(m.logits(h), targets), 0.0) * w).sum()

  def chunked(params, h):
    m = nnx.merge(graphdef, params)
    return (scoring.selected_token_logprobs(m, h, targets, select, chunk=chunk) * w).sum()

  lp_full = jnp.where(select, scoring.token_logprobs(model.logits(h), targets), 0.0)
  lp = scoring.selected_token_logprobs(model, h, targets, select, chunk=chunk)
  np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_full), rtol=1e-6, atol=1e-6)
  g_full = jax.grad(full, argnums=(0, 1))(params, h)
  g = jax.jit(jax.grad(chunked, argnums=(0, 1)))(params, h)
  for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-6)
