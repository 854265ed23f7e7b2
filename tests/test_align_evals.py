"""Alignment diagnostics: every metric on a hand-computed case, KL invariants, the smoke run, and
WikiText-2 perplexity equal to transformers' (HF's sliding-window recipe) on real SmolLM2."""

import json
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from align.evals import compare, kl, perplexity, perturb, verbosity
from configs import align_eval as align_eval_config
from decode import scorers
from lm import scoring
from lm.hub import vocab
from tests_helpers import run_task

LN2 = math.log(2.0)


# --- KL --------------------------------------------------------------------------------------

def test_kl_of_known_distributions_closed_form():
  p, q = np.array([0.5, 0.25, 0.25]), np.array([0.25, 0.25, 0.5])
  # Logits are log-probs plus any per-row constant.
  logits_p = jnp.asarray(np.log(p) + 3.0)[None, None]
  logits_q = jnp.asarray(np.log(q) - 1.0)[None, None]
  # KL(p||q) = 0.5 ln 2 + 0.25 ln 1 + 0.25 ln 0.5 = 0.25 ln 2.
  assert float(scoring.token_kl(logits_p, logits_q)[0, 0]) == pytest.approx(0.25 * LN2, rel=1e-6)
  assert float(scoring.token_kl(logits_p, logits_p)[0, 0]) == pytest.approx(0.0, abs=1e-7)
  # Expectations over x ~ p of the sample estimators at every token x.
  targets = jnp.arange(3)[None]
  lp = scoring.token_logprobs(jnp.broadcast_to(logits_p, (1, 3, 3)), targets)
  lq = scoring.token_logprobs(jnp.broadcast_to(logits_q, (1, 3, 3)), targets)
  est = {k: np.asarray(v)[0] for k, v in scoring.sample_kl_estimators(lp, lq).items()}
  np.testing.assert_allclose(est["k1"], [LN2, 0.0, -LN2], atol=1e-6)
  # k3 at x=0: r = 1/2 -> -1/2 + ln 2; x=2: r = 2 -> 1 - ln 2.
  np.testing.assert_allclose(est["k3"], [LN2 - 0.5, 0.0, 1 - LN2], atol=1e-6)
  assert p @ est["k1"] == pytest.approx(0.25 * LN2, rel=1e-5)  # unbiased
  assert p @ est["k3"] == pytest.approx(0.25 * LN2, rel=1e-5)  # unbiased
  assert p @ est["k2"] == pytest.approx(0.5 * 0.75 * LN2**2, rel=1e-5)  # E[(log r)^2]/2
  assert (est["k3"] >= 0).all()


def test_summarize_kl_per_token_and_per_sequence():
  rows = [{e: np.array([0.1, 0.3]) for e in kl.ESTIMATORS},
          {e: np.array([0.2]) for e in kl.ESTIMATORS}]
  s = kl.summarize_kl(rows)
  assert s["n_tokens"] == 3 and s["n_sequences"] == 2
  assert s["exact_per_token"] == pytest.approx(0.2)  # (0.1 + 0.3 + 0.2) / 3
  assert s["exact_rev_per_token"] == pytest.approx(0.2)
  assert s["k3_per_seq"] == pytest.approx(0.3)  # mean of sums 0.4, 0.2
  assert s["k1_per_seq_std"] == pytest.approx(0.1)


def test_text_windows_score_every_token_but_the_first_once():
  ctx, cont = kl.text_windows(list(range(10)), window=4, stride=2)
  assert ctx == [[0], [2, 3], [4, 5], [6, 7]]
  assert cont == [[1, 2, 3], [4, 5], [6, 7], [8, 9]]


def _tiny(seed=0):
  return lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(seed))


class _Dist(nnx.Module):
  """Every next-token distribution is `probs`, whatever the context."""

  def __init__(self, probs):
    self.logp = nnx.Variable(jnp.log(jnp.asarray(probs, jnp.float32)))

  def __call__(self, tokens_bs, attn_mask=None, **kw):
    return jnp.broadcast_to(self.logp[...], tokens_bs.shape + self.logp.shape), None


def test_kl_rows_equal_hand_computed_estimators():
  """Fixed p and q: the exact KL is sum_v p log(p/q) at every position, and k1, k2, k3 at each
  continuation token v are log(p/q), (log(q/p))^2 / 2 and q/p - 1 - log(q/p) there."""
  p, q = np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.25, 0.25, 0.25, 0.25])
  ctx, cont = [[1], [2, 3, 0]], [[0, 1, 2, 3], [3, 3]]
  rows = kl.kl_rows(_Dist(p), _Dist(q), ctx, cont, batch_size=2, multiple=4)
  exact = float(np.sum(p * np.log(p / q)))
  reverse = float(np.sum(q * np.log(q / p)))
  for r, row in zip(cont, rows):
    log_r = np.log(q[r] / p[r])
    np.testing.assert_allclose(row["exact"], np.full(len(r), exact), rtol=1e-6)
    np.testing.assert_allclose(row["exact_rev"], np.full(len(r), reverse), rtol=1e-6)
    np.testing.assert_allclose(row["k1"], -log_r, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(row["k2"], 0.5 * log_r**2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(row["k3"], np.expm1(log_r) - log_r, rtol=1e-5, atol=1e-7)
  assert exact == pytest.approx(0.7 * math.log(2.8) + 0.3 * math.log(0.4))  # 0.4458
  assert reverse == pytest.approx(0.25 * math.log(0.25 / 0.7) + 0.75 * math.log(2.5))  # 0.4298


def test_kl_rows_equal_unpadded_forward_per_row():
  p, q = _tiny(0), _tiny(1)
  ctx, cont = [[5, 6, 7], [9]], [[1, 2], [3, 4, 5, 6, 7]]
  rows = kl.kl_rows(p, q, ctx, cont, batch_size=2, multiple=16)
  for c, r, row in zip(ctx, cont, rows):
    tokens = jnp.asarray([c + r])
    lp_logits, _ = p(tokens)
    lq_logits, _ = q(tokens)
    n = len(r)
    want = scoring.token_kl(lp_logits[:, -n - 1:-1], lq_logits[:, -n - 1:-1])[0]
    np.testing.assert_allclose(row["exact"], want, rtol=1e-4, atol=1e-6)
    lp = scoring.token_logprobs(lp_logits[:, -n - 1:-1], tokens[:, -n:])[0]
    lq = scoring.token_logprobs(lq_logits[:, -n - 1:-1], tokens[:, -n:])[0]
    np.testing.assert_allclose(row["k1"], lp - lq, rtol=1e-4, atol=1e-6)
    assert (row["exact"] > 0).all()


def _entry(**fields) -> dict:
  """A `config.models` entry of align_eval.py:smoke (tiny:0, no adapter) with `fields` changed."""
  return {**align_eval_config.get_config("smoke").models[0], **fields}


def test_stand_in_and_loaded_adapter_share_reference_with_adapters_off(tmp_path):
  from lm import lora

  stand_in = {"rank": 2, "alpha": 4.0, "b_std": 0.5, "seed": 3}
  a = compare.load_entry(_entry(name="a", stand_in_lora=stand_in))
  base = compare.load_entry(_entry(name="base"))
  assert base["reference"] is None
  tokens = jnp.asarray([[60, 61, 62, 63, 64]])
  base_logits = base["model"](tokens)[0]
  np.testing.assert_allclose(a["reference"](tokens)[0], base_logits, atol=1e-6)
  assert float(jnp.abs(a["model"](tokens)[0] - base_logits).max()) > 1e-3
  # Export the stand-in as a PEFT adapter; loading it back through load_peft gives the same model.
  lora.export_peft(a["model"], tmp_path / "ad", base_model_name_or_path="tiny",
                   cfg=lora.LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets="all-linear"))
  b = compare.load_entry(_entry(name="b", adapter=str(tmp_path / "ad")))
  np.testing.assert_allclose(b["model"](tokens)[0], a["model"](tokens)[0], atol=1e-5)
  np.testing.assert_allclose(b["reference"](tokens)[0], base_logits, atol=1e-6)


# --- perplexity -------------------------------------------------------------------------------

class _Fixed(nnx.Module):
  """Every next-token distribution is p = (1/2, 1/4, 1/8, 1/8)."""

  def __init__(self):
    self.cfg = lm.preset("tiny").replace(vocab_size=4)  # the limits scoring checks inputs by

  def __call__(self, tokens_bs, attn_mask=None, **kw):
    logp = jnp.log(jnp.array([0.5, 0.25, 0.125, 0.125]))
    return jnp.broadcast_to(logp, tokens_bs.shape + (4,)), None


class _Chars:
  """'abcd' -> 0..3."""

  def __call__(self, text):
    return {"input_ids": ["abcd".index(ch) for ch in text]}


def test_response_perplexity_of_known_distribution():
  # NLL: ln2 + 2 ln4 for [0, 1, 1] and ln8 for [2]: 8 ln2 over 4 tokens -> perplexity 2^2 = 4.
  res = perplexity.response_perplexity(_Fixed(), [[3, 3], [0]], [[0, 1, 1], [2]], batch_size=2)
  assert res["n_tokens"] == 4 and res["n_pairs"] == 2
  assert res["perplexity"] == pytest.approx(4.0, rel=1e-6)
  assert res["seq_nll_mean"] == pytest.approx((5 * LN2 / 3 + 3 * LN2) / 2, rel=1e-6)


def test_text_perplexity_of_known_distribution():
  # 'abcd': the first token is context; b, c, d cost ln4 + ln8 + ln8 = 8 ln2 -> 2^(8/3).
  res = perplexity.text_perplexity(_Fixed(), _Chars(), "abcdabcd", max_tokens=4, window=4,
                                   stride=4, batch_size=1)
  assert res["n_tokens"] == 3
  assert res["perplexity"] == pytest.approx(2 ** (8 / 3), rel=1e-6)


@pytest.mark.parity
@pytest.mark.real_weights
def test_wikitext_perplexity_equals_transformers(smollm2, smollm2_hf, shared_data):
  """HF's "perplexity of fixed-length models" recipe (labels -100 on the context), computed here
  with transformers independently: 1024 WikiText-2 test tokens, window 256, stride 128."""
  torch = pytest.importorskip("torch")
  model, tok = smollm2
  ids = tok(lm.data.load_wikitext("test")[:20_000])["input_ids"][:1024]
  ours = perplexity.text_perplexity(model, tok, lm.data.load_wikitext("test")[:20_000],
                                    max_tokens=1024, window=256, stride=128, batch_size=4)
  enc = torch.tensor([ids])
  nll_sum, n_tok, prev_end = 0.0, 0, 0
  with torch.no_grad():
    for begin in range(0, enc.size(1), 128):
      end = min(begin + 256, enc.size(1))
      trg_len = end - prev_end
      input_ids = enc[:, begin:end]
      target_ids = input_ids.clone()
      target_ids[:, :-trg_len] = -100
      loss = smollm2_hf(input_ids, labels=target_ids).loss
      # HF shifts labels inside the loss: the count is the valid labels after position 0.
      n_valid = int((target_ids[:, 1:] != -100).sum())
      nll_sum += float(loss) * n_valid
      n_tok += n_valid
      prev_end = end
      if end == enc.size(1):
        break
  assert ours["n_tokens"] == n_tok == 1023
  assert ours["perplexity"] == pytest.approx(math.exp(nll_sum / n_tok), rel=5e-3)


# --- verbosity --------------------------------------------------------------------------------

@pytest.mark.parametrize("instruction, category", [
    ("Who is Larry Page?", "factual"),
    ("What year was the Yamato Battleship built?", "factual"),
    ("how many legs does a spider have", "factual"),
    ("What causes the northern lights?", "explanation"),  # a cue beats the wh-start
    ("Why is kobe beef so damn expensive?", "explanation"),
    ("Can you explain how the game is played?", "explanation"),
    ("Describe a sunset.", "explanation"),
    ("How does a transistor work?", "explanation"),
    ("How do I wrap a present neatly?", "other"),
    ("Write a poem about the sea.", "other"),
    ("What are some things I should consider before buying a used car from a private seller "
     "in my town?", "other"),  # wh-start but 18 words: not a short-answer question
    ("Whatever you do, be kind.", "other"),  # 'what' counts only as a whole word
])
def test_classify_prompt_rule(instruction, category):
  assert verbosity.classify_prompt(instruction) == category


def test_length_compliance_golden():
  c = verbosity.length_compliance([10, 50, 51, 70], limit=50)
  assert c["compliance_rate"] == 0.5 and c["n_noncompliant"] == 2
  assert c["overrun_mean"] == pytest.approx(10.5)  # overruns 1 and 20
  assert c["overrun_std"] == pytest.approx(9.5)
  assert c["overrun_mean_all"] == pytest.approx(21 / 4)
  ok = verbosity.length_compliance([3, 50], limit=50)
  assert ok["compliance_rate"] == 1.0 and math.isnan(ok["overrun_mean"])


def test_stats_by_category_skew_golden():
  s = verbosity.stats_by_category(["factual", "other", "factual", "factual"], [1, 9, 2, 6])
  assert set(s) == {"factual", "other", "all"}
  f = s["factual"]  # 1, 2, 6: mean 3, deviations -2, -1, 3: m2 = 14/3, m3 = 18/3
  assert (f["count"], f["mean"], f["median"]) == (3, 3.0, 2.0)
  assert f["std"] == pytest.approx(math.sqrt(14 / 3))
  assert f["skew"] == pytest.approx(6 / (14 / 3) ** 1.5)
  assert s["other"]["skew"] == 0.0 and s["all"]["count"] == 4
  assert verbosity.count_words("  two\nwords ") == 2


# --- perturbations ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 7, 123])
def test_perturbations_hand_written(seed):
  assert perturb.add_filler("It rains. We stay in.", seed, fillers=("Great question.",)) == \
      "It rains. Great question. We stay in."
  assert perturb.add_filler("A b.\nC d.", seed, fillers=("F.",)) == "A b. F.\nC d."
  assert perturb.add_filler("Hello there", seed, fillers=("F.",)) == "Hello there F."
  assert perturb.inject_keywords(" Paris is the capital.", seed,
                                 keywords=("I am a helpful AI.",)) == \
      "I am a helpful AI. Paris is the capital."
  assert perturb.reorder_sentences("First one. Second one!", seed) == "Second one! First one."
  assert perturb.reorder_sentences("A.\n\nB?", seed) == "B?\n\nA."
  assert perturb.reorder_sentences("No boundary here", seed) == "No boundary here"
  # ceil(0.5 * 4) = 2 extra words -> one 2-word sentence; ceil(0.5 * 6) = 3 -> two.
  assert perturb.pad_length("One two three four.", seed, padding=("Pad pad.",)) == \
      "One two three four. Pad pad."
  assert perturb.pad_length("One two three four five six.", seed, padding=("Pad pad.",)) == \
      "One two three four five six. Pad pad. Pad pad."


def test_perturbations_deterministic_and_seed_dependent():
  text = "The sky is blue. Grass is green. Snow is white! Is coal black? Yes."
  for name, fn in perturb.PERTURBATIONS.items():
    outs = [fn(text, s) for s in range(12)]
    assert outs == [fn(text, s) for s in range(12)], name
    assert len(set(outs)) > 1, name
    assert all(o != text for o in outs), name
  split = lambda t: sorted(re.split(r"(?<=[.!?])\s+", t))
  for s in range(12):
    assert split(perturb.reorder_sentences(text, s)) == split(text)
  assert perturb.add_filler(text, 5).startswith("The sky is blue.")
  assert perturb.inject_keywords(text, 2).endswith(text)
  assert len(perturb.pad_length(text, 3).split()) >= 1.5 * len(text.split())


def test_delta_stats_and_text_scorer():
  s = perturb.delta_stats(np.zeros(4), np.array([1.0, -1.0, 2.0, 0.0]))
  assert s == {"mean_delta": 0.5, "std_delta": pytest.approx(math.sqrt(1.25)),
               "frac_positive": 0.5, "n": 4}
  scorer = scorers.completions_only(lambda texts: np.array([len(t) for t in texts], float))
  scores, texts = perturb.perturbation_scores(
      ["q1", "q2"], ["A. B.", "C."], scorer, {"kw": perturb.inject_keywords}, seed=10)
  np.testing.assert_array_equal(scores["original"], [5, 2])
  assert texts["kw"] == [perturb.inject_keywords("A. B.", 10), perturb.inject_keywords("C.", 11)]
  np.testing.assert_array_equal(scores["kw"] - scores["original"],
                                [len(t) - len(o) for t, o in zip(texts["kw"], ["A. B.", "C."])])


def test_implicit_reward_of_policy_equal_to_reference_is_zero():
  model, tok = _tiny(), vocab.ByteTokenizer()
  fn = perturb.implicit_reward_scorer(model, model, tok, beta=0.1, batch_size=2)
  np.testing.assert_allclose(fn(["Hi?", "Name a river."], ["Hello.", "The Nile."]), 0.0,
                             atol=1e-6)
  avg = perturb.avg_logprob_scorer(model, tok, batch_size=2)(["Hi?"], ["Hello."])
  assert avg.shape == (1,) and -math.log(256) - 2 < avg[0] < 0


def test_reference_log_probs_from_the_policy_pass_equal_the_reference_alone():
  stand_in = {"rank": 2, "alpha": 4.0, "b_std": 0.5, "seed": 1}
  policy = compare.load_entry(_entry(name="p", stand_in_lora=stand_in))
  base = compare.load_entry(_entry(name="r"))
  tok = vocab.ByteTokenizer()
  prompts, responses = ["Hi?", "Name a river."], ["Hello.", "The Nile."]
  implicit, avg_p, avg_q = perturb.log_ratio_scorers(policy["model"], policy["reference"], tok,
                                                     beta=0.5, batch_size=2)
  want_q = perturb.avg_logprob_scorer(base["model"], tok, batch_size=2)(prompts, responses)
  want_p = perturb.avg_logprob_scorer(policy["model"], tok, batch_size=2)(prompts, responses)
  np.testing.assert_allclose(avg_q(prompts, responses), want_q, rtol=1e-5)
  np.testing.assert_allclose(avg_p(prompts, responses), want_p, rtol=1e-5)
  # y = response bytes + end token: the implicit reward is beta * length * (avg_p - avg_q).
  n = np.array([len("Hello.") + 1, len("The Nile.") + 1])
  np.testing.assert_allclose(implicit(prompts, responses), 0.5 * n * (want_p - want_q), rtol=1e-4)


# --- the task ---------------------------------------------------------------------------------

def test_align_eval_smoke_writes_every_output(tmp_path, shared_data):
  work = tmp_path / "ae"
  run_task("align_eval:smoke", work)
  plots = ["lengths_plain.png", "lengths_length_instruction.png",
           "reward_hacking_mean_delta.png", "reward_hacking_deltas.png"]
  for name in ["results.json", "report.md", "generations.jsonl", "metrics.jsonl"] + [
      f"plots/{p}" for p in plots]:
    assert (work / name).exists(), name
  res = json.loads((work / "results.json").read_text())
  assert set(res["perplexity"]) == {"reference", "lora (stand-in)"}
  assert list(res["kl"]) == ["lora (stand-in)"]
  own = res["kl"]["lora (stand-in)"]["own_samples"]
  assert own["n_sequences"] == 4 and own["exact_per_token"] > 0
  reverse = res["kl"]["lora (stand-in)"]["reference_samples"]
  assert reverse["n_sequences"] == 4 and reverse["exact_per_token"] > 0
  assert reverse["exact_per_token"] != own["exact_per_token"]  # other samples, other direction
  for name in ("reference", "lora (stand-in)"):
    for kind in ("greedy", "sampled"):
      st = res["lengths"][name][kind]
      assert st["count"] == 4 and 0 <= st["empty_share"] <= 1 and st["median"] <= 16
  assert set(res["reward_hacking"]) == {"reference: avg log-prob", "lora (stand-in): avg log-prob",
                                        "lora (stand-in): implicit reward (beta=0.1)"}
  assert set(res["length_compliance"]["reference"]) >= {"compliance_rate", "overrun_mean"}
  report = (work / "report.md").read_text()
  for heading in ("## Perplexity", "## Summary", "## KL", "## Response length", "## Verbosity",
                  "## Length compliance",
                  "## Reward hacking", "Stand-in"):
    assert heading in report
