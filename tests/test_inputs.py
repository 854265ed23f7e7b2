"""Every public entry that takes token ids refuses bad ones on the host with the same message:
out-of-vocabulary ids, empty prompts and over-long prompts never reach a traced program."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from align import losses
from configs import train_base
from lm.train.trainer import Trainer
from decode.beam import BeamSearch, beam_search
from decode.engine import generate
from lm import inputs, scoring

VOCAB, MAX_LEN = 256, 128  # the tiny preset
OOV = r"holds id {bad}, outside the vocabulary \[0, 256\)"
EMPTY = r"is empty"
TOO_LONG = r"more than the model's max_seq_len 128"


@pytest.fixture(scope="module")
def model():
  return lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0))


def _trainer(model):
  cfg = train_base.base("align.losses.sft", "smoke").train
  cfg.update(steps=1, batch_size=2, grad_accum=1, lr=1e-3, warmup_steps=0, schedule="constant",
             min_lr_ratio=0.0, grad_clip=1.0, weight_decay=0.0, seed=0, eval_every=0,
             checkpoint_every=0)
  return Trainer(model, losses.get("sft"), None, cfg)


def _sft_batch(rows):
  tokens = np.asarray(rows, np.int32)
  return {"tokens": tokens, "attn_mask": np.ones_like(tokens), "loss_mask":
          np.ones(tokens.shape, np.float32)}


def _entries(model):
  """name -> call(prompt rows): every public entry point that takes token ids."""
  trainer = _trainer(model)
  dec = dict(max_new_tokens=4, eos_ids=[2], pad_id=0)
  return {
      "model": lambda rows: model(jnp.asarray(rows, jnp.int32)),
      "generate": lambda rows: generate(model, rows, **dec),
      "beam_search": lambda rows: beam_search(model, rows, config=BeamSearch(num_beams=2), **dec),
      "response_logprobs": lambda rows: scoring.response_logprobs(model, rows, [[5, 6]] * len(rows)),
      "perplexity": lambda rows: scoring.perplexity(model, [t for r in rows for t in r], window=8,
                                                    stride=4),
      "residual_stream": lambda rows: model.residual_stream(jnp.asarray(rows, jnp.int32), [0]),
      "trainer.train_step": lambda rows: trainer.train_step(_sft_batch(rows)),
      "trainer.evaluate": lambda rows: trainer.evaluate([_sft_batch(rows)]),
  }


ALL = ["model", "generate", "beam_search", "response_logprobs", "perplexity", "residual_stream",
       "trainer.train_step", "trainer.evaluate"]
PROMPT_LISTS = ["generate", "beam_search", "response_logprobs"]  # ragged rows: empty/long checks


@pytest.mark.parametrize("entry", ALL)
@pytest.mark.parametrize("bad", [VOCAB, 60000, -1])
def test_out_of_vocabulary_ids_get_one_clear_error(model, entry, bad):
  rows = [[1, 2, 3, 4], [5, bad, 7, 8]]
  with pytest.raises(inputs.InputError, match=OOV.format(bad=bad)):
    _entries(model)[entry](rows)


@pytest.mark.parametrize("entry", PROMPT_LISTS)
@pytest.mark.parametrize("rows,where", [([], "prompts is empty"), ([[3, 4], []], r"prompts\[1\] is empty")])
def test_empty_prompts_get_one_clear_error(model, entry, rows, where):
  with pytest.raises(inputs.InputError, match=where):
    _entries(model)[entry](rows)


@pytest.mark.parametrize("entry", PROMPT_LISTS + ["trainer.train_step"])
def test_over_long_prompts_get_one_clear_error(model, entry):
  rows = [list(range(1, MAX_LEN + 2))] * 2  # max_seq_len + 1 tokens each
  with pytest.raises(inputs.InputError, match=TOO_LONG):
    _entries(model)[entry](rows)


def test_the_message_names_row_and_position():
  with pytest.raises(inputs.InputError, match=r"prompts\[1\] \(position 2\) holds id 300"):
    inputs.token_rows([[1], [1, 2, 300]], vocab_size=VOCAB)
  with pytest.raises(inputs.InputError, match=r"prompts\[0\] is str"):
    inputs.token_rows(["hello"], vocab_size=VOCAB)
  with pytest.raises(inputs.InputError, match=r"eos_ids holds id 999"):
    generate(lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0)), [[1, 2]], max_new_tokens=2,
             eos_ids=[999], pad_id=0)
