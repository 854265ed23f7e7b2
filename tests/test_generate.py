"""The compiled decoding loop: HF generate parity (greedy), stop rules, seeds, sampling statistics."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import engine
from decode.engine import StopRules, generate
from decode.sampling import Sampler
from tests_helpers import random_hf_llama

pytestmark = pytest.mark.parity  # the reference runs on torch (the parity extra)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lm.hub import weights  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 9, 100, 7], [41, 8], [3, 3, 90, 12, 250]]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
  """(our model, HF model) with the same random weights; larger-than-init weights."""
  path = tmp_path_factory.mktemp("tiny") / "hf"
  hf = random_hf_llama(path)
  return weights.load_hf_dir(path), hf


def _hf_generate(hf, prompts, pad_id, eos, **kw):
  p = max(len(x) for x in prompts)
  ids = torch.full((len(prompts), p), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), p), dtype=torch.long)
  for i, x in enumerate(prompts):
    ids[i, p - len(x):] = torch.tensor(x)
    mask[i, p - len(x):] = 1
  out = hf.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_id, eos_token_id=eos,
                    **kw)
  return out[:, p:].numpy()


def _trim(row, eos):
  out = []
  for t in row:
    out.append(int(t))
    if int(t) in eos:
      break
  return out


@pytest.mark.parametrize("eos", [[7], [7, 41, 90]])
def test_greedy_equals_hf_generate_tiny(tiny_pair, eos):
  ours, hf = tiny_pair
  out = generate(ours, PROMPTS, max_new_tokens=20, eos_ids=eos, pad_id=0)
  ref = _hf_generate(hf, PROMPTS, 0, eos, max_new_tokens=20, do_sample=False)
  for i in range(len(PROMPTS)):
    assert out.sequences()[i] == _trim(ref[i], eos)[:20]


def test_greedy_with_processors_equals_hf_generate(tiny_pair):
  ours, hf = tiny_pair
  prompts = [[5, 17, 33, 2, 9, 100, 7]]  # one row: HF penalises pad ids in padded batches, we don't
  sampler = Sampler(greedy=True, repetition_penalty=1.3, no_repeat_ngram_size=2)
  out = generate(ours, prompts, max_new_tokens=24, eos_ids=[], pad_id=0, sampler=sampler)
  ref = _hf_generate(hf, prompts, 0, None, max_new_tokens=24, do_sample=False,
                     repetition_penalty=1.3, no_repeat_ngram_size=2)
  assert out.sequences()[0] == ref[0].tolist()


def test_logprobs_equal_rescoring_with_full_forward(tiny_pair):
  ours, _ = tiny_pair
  out = generate(ours, PROMPTS[:1], max_new_tokens=10, eos_ids=[], pad_id=0)
  full = jnp.asarray([PROMPTS[0] + out.sequences()[0]])
  from lm.scoring import next_token_logprobs

  lp = np.asarray(next_token_logprobs(ours, full))[0, len(PROMPTS[0]) - 1:]
  np.testing.assert_allclose(out.logprobs_bt[0], lp, atol=1e-5)


def test_stop_sequences_and_repeat_rule(tiny_pair):
  ours, _ = tiny_pair
  free = generate(ours, PROMPTS, max_new_tokens=24, eos_ids=[], pad_id=0)
  seq = tuple(free.sequences()[0][3:5])
  stopped = generate(ours, PROMPTS, max_new_tokens=24, eos_ids=[], pad_id=0,
                     stop=StopRules(stop_sequences=(seq,)))
  row = free.sequences()[0]
  first_end = next(j + 2 for j in range(len(row) - 1) if tuple(row[j:j + 2]) == seq)
  assert stopped.sequences()[0] == row[:first_end]
  assert stopped.finish_reasons()[0] == "stop"
  # Seeds' rule: stop when the last n-gram has occurred more than `threshold` times.
  from decode.metrics import repeated_ngram_count

  rep = generate(ours, PROMPTS, max_new_tokens=24, eos_ids=[], pad_id=0,
                 stop=StopRules(repeat_ngram_block=1, repeat_threshold=2))
  for s, r in zip(rep.sequences(), rep.finish_reasons()):
    if r == "repeat":
      assert repeated_ngram_count(s, 1) == 3 and repeated_ngram_count(s[:-1], 1) <= 2
    else:
      assert repeated_ngram_count(s, 1) <= 2


def test_sampling_is_reproducible_from_seed(tiny_pair):
  ours, _ = tiny_pair
  s = Sampler(temperature=1.0, top_k=20)
  a = generate(ours, PROMPTS, max_new_tokens=12, eos_ids=[], pad_id=0, sampler=s, seed=3)
  b = generate(ours, PROMPTS, max_new_tokens=12, eos_ids=[], pad_id=0, sampler=s, seed=3)
  c = generate(ours, PROMPTS, max_new_tokens=12, eos_ids=[], pad_id=0, sampler=s, seed=4)
  np.testing.assert_array_equal(a.tokens_bt, b.tokens_bt)
  assert not np.array_equal(a.tokens_bt, c.tokens_bt)


def test_num_samples_rows_are_prompt_major(tiny_pair):
  ours, _ = tiny_pair
  out = generate(ours, PROMPTS, max_new_tokens=6, eos_ids=[], pad_id=0,
                 sampler=Sampler(temperature=1.5), num_samples=4, seed=0)
  assert out.tokens_bt.shape == (12, 6)
  greedy = generate(ours, PROMPTS, max_new_tokens=6, eos_ids=[], pad_id=0, num_samples=2)
  assert greedy.sequences()[0] == greedy.sequences()[1]
  # Samples share their prompt's one prefill: the same rows as the prompts listed 4 times each.
  listed = generate(ours, [x for x in PROMPTS for _ in range(4)], max_new_tokens=6, eos_ids=[],
                    pad_id=0, sampler=Sampler(temperature=1.5), seed=0)
  np.testing.assert_array_equal(out.tokens_bt, listed.tokens_bt)
  np.testing.assert_allclose(out.policy_logprobs_bt, listed.policy_logprobs_bt, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("sampler", [
    Sampler(temperature=0.7), Sampler(top_k=5), Sampler(top_p=0.8),
    Sampler(min_p=0.1, temperature=1.3), Sampler(top_k=10, top_p=0.9, temperature=0.8)],
    ids=["temp", "topk", "topp", "minp", "topk+topp"])
def test_empirical_frequencies_match_filtered_distribution(sampler):
  """20000 draws per case; every token's frequency is within 5 binomial std of its probability
  (all-token family-wise false-alarm rate < 1e-4), and filtered tokens are never drawn."""
  n, v = 20000, 32
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, v)) * 2, jnp.float32)
  processed = sampler.process(logits, sampler.params(1))
  probs = np.asarray(jax.nn.softmax(processed, -1))[0]
  rows = jnp.broadcast_to(processed, (n, v))
  draws = np.asarray(sampler.choose(rows, jax.random.key(0)))
  freq = np.bincount(draws, minlength=v) / n
  assert freq[probs == 0].sum() == 0
  tol = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12
  assert np.all(np.abs(freq - probs) <= tol), np.max(np.abs(freq - probs) / tol)


def test_whole_loop_is_one_compiled_program(tiny_pair, monkeypatch):
  """Repeated calls with the same shapes compile once, and each call runs one compiled program
  whose steps are a `while` loop inside it (no per-token dispatch from Python)."""
  ours, _ = tiny_pair
  kw = dict(eos_ids=[], pad_id=0)
  generate(ours, PROMPTS, max_new_tokens=16, **kw)
  before = engine.compile_count()
  for _ in range(3):
    generate(ours, PROMPTS, max_new_tokens=16, **kw)
  assert engine.compile_count() == before
  generate(ours, PROMPTS, max_new_tokens=64, **kw)
  assert engine.compile_count() == before + 1
  # filter values are traced: a sweep over temperatures and top-p compiles once, and each value
  # samples as a fresh call of its own would
  outs = {}
  for t, p in [(0.7, 0.9), (1.0, 0.5), (0.2, 0.95)]:
    outs[t, p] = generate(ours, PROMPTS, max_new_tokens=16, sampler=Sampler(temperature=t, top_p=p),
                          seed=3, **kw).tokens_bt
  assert engine.compile_count() == before + 2
  engine._generate.clear_cache()
  for (t, p), tokens in outs.items():
    np.testing.assert_array_equal(generate(ours, PROMPTS, max_new_tokens=16, seed=3, **kw,
                                           sampler=Sampler(temperature=t, top_p=p)).tokens_bt,
                                  tokens)
  assert len({o.tobytes() for o in outs.values()}) == 3

  programs = []
  compiled = engine._generate
  def counted(*args, **kwargs):
    programs.append(compiled.lower(*args, **kwargs).as_text())
    return compiled(*args, **kwargs)
  monkeypatch.setattr(engine, "_generate", counted)
  for n in (16, 64):
    generate(ours, PROMPTS, max_new_tokens=n, **kw)
  assert len(programs) == 2  # one program per call, however many tokens
  for hlo in programs:
    assert hlo.count("stablehlo.while") >= 1


def test_bad_generate_inputs(tiny_pair):
  ours, _ = tiny_pair
  with pytest.raises(ValueError, match="at least one token"):
    generate(ours, [[]], max_new_tokens=4, eos_ids=[], pad_id=0)
  with pytest.raises(ValueError, match="max_seq_len"):
    generate(ours, PROMPTS, max_new_tokens=1000, eos_ids=[], pad_id=0)
  with pytest.raises(ValueError, match="per-row top_p"):
    generate(ours, PROMPTS, max_new_tokens=4, eos_ids=[], pad_id=0, row_params={"top_p": [0.9]})


@pytest.mark.real_weights
def test_greedy_equals_hf_generate_smollm2(smollm2, smollm2_hf):
  model, tok = smollm2
  hf = smollm2_hf
  from lm import hub

  qs = ["What is the capital of France?", "Write a haiku about autumn leaves.",
        "Explain in two sentences why the sky is blue, and name the physical effect involved."]
  prompts = [hub.encode_chat(tok, q) for q in qs]
  eos = hub.stop_ids(tok)
  out = generate(model, prompts, max_new_tokens=40, eos_ids=eos, pad_id=tok.pad_token_id)
  ref = _hf_generate(hf, prompts, tok.pad_token_id, eos, max_new_tokens=40, do_sample=False)
  for i in range(len(prompts)):
    assert out.sequences()[i] == _trim(ref[i], eos)[:40]
