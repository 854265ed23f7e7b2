"""Beam search equals transformers' `generate(num_beams=...)`; cached sums equal a rescoring."""

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.parity  # the reference runs on torch (the parity extra)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from decode import beam  # noqa: E402
from decode.beam import BeamSearch, beam_search  # noqa: E402
from decode.engine import left_pad  # noqa: E402
from lm.hub import weights  # noqa: E402
from lm.scoring import token_logprobs  # noqa: E402

W = 4
PAD = 1  # non-zero: HF fills unused positions with eos_ids[0] when pad is 0
EOS = (7, 41)
MAX_NEW = 16
PROMPTS = [[5, 17, 33, 2, 9, 100, 7, 8, 9], [41, 8], [3, 3, 90, 12, 250], [60, 61, 62, 200]]
SETTINGS = [(lp, es) for lp in (1.0, 0.6, 2.0) for es in (False, True, "never")]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  """(our model, HF model) with the same random weights, peaky enough that beams beat greedy."""
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      tie_word_embeddings=False, initializer_range=0.2, attn_implementation="eager")
  torch.manual_seed(1)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    # Louder EOS rows: hypotheses end at many lengths, so every stopping rule decides something.
    hf.lm_head.weight[list(EOS)] *= 3.0
  path = tmp_path_factory.mktemp("tiny_beam") / "hf"
  hf.save_pretrained(path)
  return weights.load_hf_dir(path), hf


def _hf_beam(hf, prompts, *, pad_id, eos_ids, max_new_tokens, length_penalty, early_stopping,
             num_return_sequences, num_beams=W):
  """HF's generated ids `[B, n, L]` (padded prompt removed), lengths `[B, n]`,
  `sequences_scores` `[B, n]` and the number of decode steps it ran."""
  b, p = len(prompts), max(len(x) for x in prompts)
  ids = torch.full((b, p), pad_id, dtype=torch.long)
  mask = torch.zeros((b, p), dtype=torch.long)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = torch.tensor(x)
    mask[i, p - len(x):] = 1
  gc = transformers.GenerationConfig(
      num_beams=num_beams, do_sample=False, length_penalty=length_penalty,
      early_stopping=early_stopping, max_new_tokens=max_new_tokens,
      num_return_sequences=num_return_sequences, pad_token_id=pad_id, eos_token_id=list(eos_ids),
      return_dict_in_generate=True, output_scores=True)
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
  n = num_return_sequences
  gen = out.sequences[:, p:].numpy().reshape(b, n, -1)
  lengths = (out.beam_indices >= 0).sum(dim=1).numpy().reshape(b, n)
  return gen, lengths, out.sequences_scores.numpy().reshape(b, n), len(out.scores)


def _assert_matches_hf(out, ref, pad_id, tol=1e-4):
  gen, lengths, scores, steps = ref
  width = gen.shape[-1]
  np.testing.assert_array_equal(out.lengths_bn, lengths)
  np.testing.assert_array_equal(out.tokens_bnt[..., :width], gen)
  assert (out.tokens_bnt[..., width:] == pad_id).all()
  np.testing.assert_allclose(out.scores_bn, scores, rtol=0, atol=tol)
  assert out.num_steps == steps


def _rescored_sums(model, prompts, out):
  """sum log p of every final hypothesis from one cache-free forward over prompt + hypothesis."""
  b, w, _ = out.beam_tokens_bwt.shape
  rows = [list(prompts[i]) + out.beam_tokens_bwt[i, j, :out.beam_lengths_bw[i, j]].tolist()
          for i in range(b) for j in range(w)]
  tokens, mask = left_pad(rows, pad_id=0)
  logits, _ = model(jnp.asarray(tokens), attn_mask=jnp.asarray(mask))
  lp = np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(tokens[:, 1:])))
  s = tokens.shape[1]
  gen_len = out.beam_lengths_bw.reshape(-1, 1)
  is_gen = np.arange(1, s)[None, :] >= s - gen_len
  return (lp * is_gen).sum(axis=1).reshape(b, w)


@pytest.mark.parametrize("length_penalty,early_stopping", SETTINGS)
def test_matches_hf_generate_tiny(tiny_pair, length_penalty, early_stopping):
  ours, hf = tiny_pair
  cfg = BeamSearch(num_beams=W, length_penalty=length_penalty, early_stopping=early_stopping)
  out = beam_search(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=EOS, pad_id=PAD, config=cfg,
                    num_return_sequences=W)
  ref = _hf_beam(hf, PROMPTS, pad_id=PAD, eos_ids=EOS, max_new_tokens=MAX_NEW,
                 length_penalty=length_penalty, early_stopping=early_stopping,
                 num_return_sequences=W)
  _assert_matches_hf(out, ref, PAD)
  np.testing.assert_array_equal(out.beam_tokens_bwt, out.tokens_bnt)


def test_settings_exercise_every_rule_and_share_one_compilation(tiny_pair):
  ours, hf = tiny_pair
  outs = {}
  for lp, es in SETTINGS:
    outs[lp, es] = beam_search(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=EOS, pad_id=PAD,
                               config=BeamSearch(W, lp, es), num_return_sequences=2)
    if len(outs) == 1:
      compiled = beam.compile_count()
  assert beam.compile_count() == compiled  # length_penalty / early_stopping are traced values
  lengths = np.concatenate([o.beam_lengths_bw.ravel() for o in outs.values()])
  assert (lengths < MAX_NEW).any() and (lengths == MAX_NEW).any()
  assert len({o.num_steps for o in outs.values()}) >= 3  # the stopping rules stop at other steps
  assert any(not np.array_equal(outs[1.0, False].tokens_bnt, outs[1.0, es].tokens_bnt)
             for es in (True, "never"))
  # Beam search is not greedy search here: some best hypothesis differs from HF's greedy output.
  p = max(len(x) for x in PROMPTS)
  ids = torch.tensor([[PAD] * (p - len(x)) + x for x in PROMPTS])
  with torch.no_grad():
    greedy = hf.generate(input_ids=ids, attention_mask=(ids != PAD).long(), do_sample=False,
                         num_beams=1, max_new_tokens=MAX_NEW, pad_token_id=PAD,
                         eos_token_id=list(EOS))[:, p:].numpy()
  best = outs[1.0, False].tokens_bnt[:, 0, :greedy.shape[1]]
  assert (best != greedy).any()
  # num_return_sequences keeps the best hypotheses of the pool, in order.
  o = outs[0.6, False]
  np.testing.assert_array_equal(o.tokens_bnt, o.beam_tokens_bwt[:, :2])
  assert (np.diff(o.beam_scores_bw, axis=1) <= 0).all()


def test_cached_beam_sums_equal_full_rescoring_tiny(tiny_pair):
  ours, _ = tiny_pair
  lp = 0.6
  out = beam_search(ours, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=EOS, pad_id=PAD,
                    config=BeamSearch(W, lp, False), num_return_sequences=W)
  np.testing.assert_allclose(out.beam_logprob_sums_bw, _rescored_sums(ours, PROMPTS, out),
                             rtol=0, atol=1e-4)
  penalty_bw = out.beam_lengths_bw.astype(np.float64) ** lp
  np.testing.assert_allclose(out.beam_scores_bw, out.beam_logprob_sums_bw / penalty_bw, rtol=1e-6)


def test_rejects_bad_settings(tiny_pair):
  ours, _ = tiny_pair
  with pytest.raises(ValueError, match="early_stopping"):
    BeamSearch(early_stopping="sometimes")
  with pytest.raises(ValueError, match="num_return_sequences"):
    beam_search(ours, PROMPTS, max_new_tokens=4, eos_ids=EOS, pad_id=PAD,
                num_return_sequences=W + 1)
  with pytest.raises(ValueError, match="max_seq_len"):
    beam_search(ours, PROMPTS, max_new_tokens=500, eos_ids=EOS, pad_id=PAD)


@pytest.mark.real_weights
def test_smollm2_matches_hf_generate(smollm2, smollm2_hf):
  model, tokenizer = smollm2
  questions = ["What is the capital of France?", "Write a haiku about the sea.", "Hi"]
  prompts = [
      list(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                         add_generation_prompt=True)["input_ids"])
      for q in questions
  ]
  assert len({len(x) for x in prompts}) == len(prompts)
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  kw = dict(max_new_tokens=24, eos_ids=[eos], pad_id=pad)
  out = beam_search(model, prompts, config=BeamSearch(W, 0.8, False), num_return_sequences=2, **kw)
  ref = _hf_beam(smollm2_hf, prompts, length_penalty=0.8, early_stopping=False,
                 num_return_sequences=2, pad_id=pad, eos_ids=[eos], max_new_tokens=24)
  _assert_matches_hf(out, ref, pad)
  assert (out.lengths_bn < 24).any()  # some hypotheses end on <|im_end|>
  np.testing.assert_allclose(out.beam_logprob_sums_bw, _rescored_sums(model, prompts, out),
                             rtol=0, atol=1e-4)
