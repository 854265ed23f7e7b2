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
