"""The one rollout: eval-mode policy, batches of one shape, lengths that count the EOS, prompt order."""

import numpy as np
import pytest
from flax import nnx

import lm
from decode.engine import generate
from decode.rollout import pad_id_of, rollout
from decode.sampling import Sampler
from lm import lora
from tests_helpers import scrambled

PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [41, 8], [3, 3, 90, 12, 250]]


@pytest.fixture(scope="module")
def model():
  return scrambled(lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0)), seed=2)


def test_policy_samples_without_dropout_and_keeps_the_callers_mode(model):
  m = nnx.clone(model)
  lora.apply_lora(m, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5), rngs=nnx.Rngs(1))
  for lin in [x for _, x in nnx.iter_modules(m) if isinstance(x, lm.layers.Linear) and x.lora_rank]:
    lin.lora_b.set_value(0.5 * np.ones(lin.lora_b[...].shape, np.float32))
  m.train()
  out = rollout(m, PROMPTS, max_new_tokens=6, eos_ids=[], pad_id=0)
  ev = nnx.clone(m)
  ev.eval()
  want = generate(ev, PROMPTS, max_new_tokens=6, eos_ids=[], pad_id=0)
  np.testing.assert_array_equal(out.tokens_bt, want.tokens_bt)
  np.testing.assert_allclose(out.logprobs_bt, want.logprobs_bt, rtol=1e-6)
  tokens = np.asarray([PROMPTS[0]], np.int32)
  train_logits = np.asarray(m(tokens)[0])  # the caller's model, still in train mode: dropout acts
  assert not np.allclose(train_logits, np.asarray(ev(tokens)[0]), atol=1e-4)
  assert all(not lin.lora_dropout.deterministic for _, lin in nnx.iter_modules(m)
             if isinstance(lin, lm.layers.Linear) and lin.lora_rank)


def test_batches_of_one_shape_equal_one_batch(model):
  sampler = Sampler(temperature=0.9, top_k=20)
  whole = rollout(model, PROMPTS, max_new_tokens=5, eos_ids=[], pad_id=0)
  parts = rollout(model, PROMPTS, max_new_tokens=5, eos_ids=[], pad_id=0, batch_size=2)
  np.testing.assert_array_equal(parts.tokens_bt, whole.tokens_bt)  # greedy: batching is invisible
  np.testing.assert_allclose(parts.logprobs_bt, whole.logprobs_bt, rtol=1e-5, atol=1e-6)
  s = rollout(model, PROMPTS, max_new_tokens=5, eos_ids=[], pad_id=0, sampler=sampler,
              num_samples=2, seed=3, batch_size=2)
  assert s.tokens_bt.shape == (6, 5)
  np.testing.assert_array_equal(s.prompt_index_b, [0, 0, 1, 1, 2, 2])
  first = generate(model, PROMPTS[:2], max_new_tokens=5, eos_ids=[], pad_id=0, sampler=sampler,
                   num_samples=2, seed=3)
  np.testing.assert_array_equal(s.tokens_bt[:4], first.tokens_bt)  # batch 0 uses seed + 0


def test_lengths_count_the_eos_even_when_it_is_the_pad_id(model):
  """SmolLM2's pad id is its EOS (2): a mask built from token values would drop every EOS."""
  greedy = rollout(model, PROMPTS, max_new_tokens=4, eos_ids=[], pad_id=0)
  eos = int(greedy.tokens_bt[1, 2])  # row 1 emits this at its third step
  out = rollout(model, PROMPTS, max_new_tokens=4, eos_ids=[eos], pad_id=eos)
  row = out.sequences()[1]
  assert out.finish[1] == "eos" and row[-1] == eos and out.lengths_b[1] == len(row) <= 3
  assert out.logprobs_bt[1, len(row) - 1] < 0  # the EOS token's log-prob is in the row
  np.testing.assert_allclose(out.logprobs_bt[1, :len(row)], greedy.logprobs_bt[1, :len(row)],
                             rtol=1e-5)


def test_pad_and_eos_come_from_the_tokenizer():
  class Tok:
    pad_token_id, eos_token_id, unk_token_id = None, 7, None

    def convert_tokens_to_ids(self, token):
      return None

  assert pad_id_of(Tok()) == 7
  with pytest.raises(ValueError, match="pass a tokenizer, or eos_ids and pad_id"):
    rollout(lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0)), PROMPTS, max_new_tokens=2)


@pytest.mark.parametrize("sampler", [Sampler(temperature=0.7), Sampler(temperature=1.3, top_p=0.8)],
                         ids=["T0.7", "T1.3+top_p"])
def test_policy_logprobs_equal_the_trainers_scoring_at_the_temperature(model, sampler):
  """What RL scores: log softmax(logits / T) over the full vocabulary at each sampled token, the
  EOS included, equal to `lm.scoring.next_token_logprobs(..., temperature=T)` on the same rows."""
  import jax.numpy as jnp

  from lm.scoring import next_token_logprobs

  kw = dict(max_new_tokens=6, sampler=sampler, num_samples=3, seed=4)
  first = rollout(model, PROMPTS, eos_ids=[], pad_id=0, **kw)
  eos = int(first.tokens_bt[0, 3])  # same seed: row 0 now stops at its 4th token
  out = rollout(model, PROMPTS, eos_ids=[eos], pad_id=eos, **kw)
  rows, select = [], []
  width = max(len(PROMPTS[i]) for i in out.prompt_index_b) + 6
  for seq, i in zip(out.sequences(), out.prompt_index_b):
    p = PROMPTS[i]
    rows.append(p + seq + [0] * (width - len(p) - len(seq)))
    select.append([0] * len(p) + [1] * len(seq) + [0] * (width - len(p) - len(seq)))
  tokens, select = jnp.asarray(rows, jnp.int32), jnp.asarray(select, jnp.int32)
  attn = jnp.asarray([[1] * (len(PROMPTS[i]) + n) + [0] * (width - len(PROMPTS[i]) - n)
                      for i, n in zip(out.prompt_index_b, out.lengths_b)], jnp.int32)
  scored = np.asarray(next_token_logprobs(model, tokens, attn, select_bs=select,
                                          temperature=sampler.temperature))
  assert (out.finish_b == 1).any(), "some row should end on the EOS (which is also the pad id)"
  for r, (i, n) in enumerate(zip(out.prompt_index_b, out.lengths_b)):
    p = len(PROMPTS[i])
    np.testing.assert_allclose(out.policy_logprobs_bt[r, :n], scored[r, p - 1:p - 1 + n],
                               rtol=1e-5, atol=1e-5)
    assert np.all(out.policy_logprobs_bt[r, n:] == 0)
  if sampler.top_p < 1:  # the filtered distribution is a different one
    assert not np.allclose(out.policy_logprobs_bt, out.sample_logprobs_bt, atol=1e-4)
