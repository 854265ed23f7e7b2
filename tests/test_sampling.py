"""Each sampling filter equals the matching HF logits processor/warper on random logits."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from decode.sampling import Sampler

pytestmark = pytest.mark.parity  # the reference runs on torch (the parity extra)
torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

V = 64


def _logits(seed=0, b=4, v=V, ties=False):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, v)).astype(np.float32) * 3
  if ties:
    x = np.round(x)  # many exact ties
  return x


def _same(ours, ref):
  ours, ref = np.asarray(ours), ref.numpy()
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  finite = ~np.isinf(ref)
  np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)


def _params(b, **kw):
  return Sampler(**kw).params(b)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("t", [0.2, 0.7, 1.5])
def test_temperature(t, ties):
  x = _logits(ties=ties)
  s = Sampler(temperature=t)
  _same(s.process(jnp.asarray(x), s.params(4)), lp.TemperatureLogitsWarper(t)(None, torch.tensor(x)))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 5, 50, V - 1, V, V + 10])
def test_top_k(k, ties):
  x = _logits(ties=ties)
  s = Sampler(top_k=k)
  _same(s.process(jnp.asarray(x), s.params(4)), lp.TopKLogitsWarper(k)(None, torch.tensor(x)))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p(p):
  x = _logits()
  s = Sampler(top_p=p)
  _same(s.process(jnp.asarray(x), s.params(4)), lp.TopPLogitsWarper(p)(None, torch.tensor(x)))


@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_large_vocab(p, scale):
  """SmolLM2's 49152-token vocabulary: a flat row (small `scale`, a nucleus of tens of thousands
  of tokens) and a peaked one in the same batch each equal HF."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(2, 49152)).astype(np.float32) * np.array([[scale], [3 * scale]], np.float32)
  s = Sampler(top_p=p)
  _same(s.process(jnp.asarray(x), s.params(2)), lp.TopPLogitsWarper(p)(None, torch.tensor(x)))


def _stable_top_p(x, p):
  """HF's top-p formula with a stable sort: ties at the boundary dropped lowest index first."""
  t = torch.tensor(x)
  sorted_logits, idx = torch.sort(t, descending=False, stable=True)
  remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p
  remove[..., -1:] = False
  return t.masked_fill(remove.scatter(1, idx, remove), -float("inf"))


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_top_p_large_vocab_with_ties(p):
  """Logits rounded to a coarse grid (as bf16 logits are): thousands of tokens tie at the
  nucleus boundary and are dropped in the stable order."""
  x = np.round(np.random.default_rng(8).normal(size=(3, 49152)) * 4).astype(np.float32) / 2
  s = Sampler(top_p=p)
  _same(s.process(jnp.asarray(x), s.params(3)), _stable_top_p(x, p))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_with_ties(p):
  """HF sorts with torch's unstable sort, so which tied token it drops at the boundary is
  unspecified. Ours breaks ties by index (stable sort): it must equal HF's formula run with a
  stable sort, and keep as many tokens and the same probability mass as HF's own warper."""
  x = _logits(ties=True)
  ours = np.asarray(Sampler(top_p=p).process(jnp.asarray(x), Sampler(top_p=p).params(4)))
  _same(ours, _stable_top_p(x, p))
  hf = lp.TopPLogitsWarper(p)(None, torch.tensor(x)).numpy()
  np.testing.assert_array_equal(np.isfinite(ours).sum(-1), np.isfinite(hf).sum(-1))
  probs = jax.nn.softmax(jnp.asarray(x), -1)
  np.testing.assert_allclose(np.where(np.isfinite(ours), probs, 0).sum(-1),
                             np.where(np.isfinite(hf), probs, 0).sum(-1), rtol=1e-6)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m", [0.01, 0.1, 0.5, 1.0])
def test_min_p(m, ties):
  x = _logits(ties=ties)
  s = Sampler(min_p=m)
  _same(s.process(jnp.asarray(x), s.params(4)), lp.MinPLogitsWarper(m)(None, torch.tensor(x)))


@pytest.mark.parametrize("k,p,t", [(10, 0.8, 0.7), (50, 0.9, 1.2), (3, 0.5, 1.0)])
def test_combined_in_hf_order(k, p, t):
  x = _logits(seed=3)
  ref = torch.tensor(x)
  for w in (lp.TemperatureLogitsWarper(t), lp.TopKLogitsWarper(k), lp.TopPLogitsWarper(p)):
    ref = w(None, ref)
  s = Sampler(temperature=t, top_k=k, top_p=p)
  _same(s.process(jnp.asarray(x), s.params(4)), ref)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty(penalty):
  x = _logits(seed=1)
  ids = np.random.default_rng(2).integers(0, V, size=(4, 12))
  seen = np.zeros((4, V), bool)
  seen[np.arange(4)[:, None], ids] = True
  s = Sampler(repetition_penalty=penalty)
  ours = s.process(jnp.asarray(x), s.params(4), seen_bv=jnp.asarray(seen))
  ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor(ids), torch.tensor(x))
  _same(ours, ref)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram(n):
  rng = np.random.default_rng(n)
  ids = rng.integers(0, 6, size=(4, 20))  # a small alphabet so n-grams repeat
  x = _logits(seed=4)
  cur = 20
  hist = np.zeros((4, 32), np.int64)
  hist[:, :cur] = ids
  valid = np.zeros((4, 32), bool)
  valid[:, :cur] = True
  s = Sampler(no_repeat_ngram_size=n)
  ours = s.process(jnp.asarray(x), s.params(4), history_bt=jnp.asarray(hist, jnp.int32),
                   history_valid_bt=jnp.asarray(valid), cur_len=cur)
  ref = lp.NoRepeatNGramLogitsProcessor(n)(torch.tensor(ids), torch.tensor(x))
  _same(ours, ref)


def test_per_row_parameters_equal_separate_rows():
  x = _logits(seed=5)
  rows = {"temperature": [0.5, 1.0, 1.5, 0.8], "top_k": [0, 5, 20, 64], "top_p": [1.0, 0.9, 0.5, 0.7]}
  s = Sampler().with_overrides(rows)
  mixed = np.asarray(s.process(jnp.asarray(x), s.params(4, rows)))
  for i in range(4):
    one = Sampler(temperature=rows["temperature"][i], top_k=rows["top_k"][i], top_p=rows["top_p"][i])
    row = np.asarray(one.process(jnp.asarray(x[i:i + 1]), one.params(1)))[0]
    np.testing.assert_array_equal(np.isinf(mixed[i]), np.isinf(row))
    np.testing.assert_allclose(mixed[i][~np.isinf(row)], row[~np.isinf(row)], rtol=1e-6)


def test_bad_sampler_values_name_the_field():
  with pytest.raises(ValueError, match="top_p must be in"):
    Sampler(top_p=0.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    Sampler(temperature=0.0)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_top_p_min_tokens_to_keep(p):
  x = _logits(seed=9)
  s = Sampler(top_p=p, min_tokens_to_keep=3)
  ref = lp.TopPLogitsWarper(p, min_tokens_to_keep=3)(None, torch.tensor(x))
  _same(s.process(jnp.asarray(x), s.params(4)), ref)
