"""The one scorer protocol: `score` checks every scorer's output; a reward model scores a
(prompt, completion) as the very token ids it was trained on; a reward run loads back as a scorer."""

import numpy as np
import pytest

from align import encoding
from decode import scorers


def _length_scorer(prompts, completions):
  return np.array([float(len(t)) for t in completions])


def test_score_batches_keeps_order_and_pairs_each_completion_with_its_prompt():
  calls = []

  def scorer(prompts, completions):
    calls.append((list(prompts), list(completions)))
    return np.array([float(len(p) * 10 + len(c)) for p, c in zip(prompts, completions)])

  prompts, texts = ["p", "pp", "ppp", "pppp", "ppppp"], ["a", "bb", "ccc", "dddd", "eeeee"]
  out = scorers.score(scorer, prompts, texts, batch_size=2)
  assert [c[0] for c in calls] == [["p", "pp"], ["ppp", "pppp"], ["ppppp"]]
  assert out.dtype == np.float64
  np.testing.assert_array_equal(out, [11, 22, 33, 44, 55])


def test_score_nan_passes_and_ints_accepted():
  out = scorers.score(lambda prompts, completions: np.array([np.nan] * len(completions)),
                      ["q", "q"], ["x", "y"])
  assert np.isnan(out).all()
  out = scorers.score(lambda prompts, completions: [3] * len(completions), ["q", "q"], ["x", "y"])
  np.testing.assert_array_equal(out, [3.0, 3.0])


def test_score_empty_never_calls_scorer():
  def scorer(prompts, completions):
    raise AssertionError("called")

  assert scorers.score(scorer, [], []).shape == (0,)


def test_score_count_mismatch_names_scorer():
  def short_scorer(prompts, completions):
    return np.zeros(len(completions) - 1)

  with pytest.raises(ValueError, match=r"short_scorer.*shape \(2,\) for 3 completions"):
    scorers.score(short_scorer, ["q"] * 3, ["a", "b", "c"])
  with pytest.raises(ValueError, match="2 prompts but 3 completions"):
    scorers.score(_length_scorer, ["q"] * 2, ["a", "b", "c"])


def test_score_rejects_wrong_shapes_and_types():
  with pytest.raises(ValueError, match="shape"):
    scorers.score(lambda prompts, completions: np.float64(1.0), ["q"], ["a"])  # scalar, not [1]
  with pytest.raises(ValueError, match="shape"):
    scorers.score(lambda prompts, completions: np.zeros((len(completions), 1)), ["q", "q"],
                  ["a", "b"])
  with pytest.raises(ValueError, match="dtype"):
    scorers.score(lambda prompts, completions: np.array(["good"] * len(completions)), ["q"], ["a"])
  with pytest.raises(ValueError, match="dtype"):
    scorers.score(lambda prompts, completions: np.ones(len(completions), bool), ["q"], ["a"])


def test_a_function_written_for_trl_runs_as_trl_calls_it():
  """TRL's GRPOTrainer calls a reward function by keyword (prompts=, completions=,
  completion_ids=, the dataset's columns) and reads None as "no score": a function in TRL's
  documented shape runs here unchanged, and receives what TRL would give it."""
  seen = {}

  def correctness(completions, answer, **kwargs):
    seen.update(kwargs)
    return [None if a is None else float(c.strip() == a) for c, a in zip(completions, answer)]

  ids = [[5], [6, 7], [8]]
  out = scorers.score(correctness, ["p1", "p2", "p3"], ["4", " 5", "x"],
                      columns={"answer": ["4", "4", None]}, completion_ids=ids, batch_size=2)
  np.testing.assert_array_equal(out[:2], [1.0, 0.0])
  assert np.isnan(out[2])
  assert seen == {"prompts": ["p3"], "completion_ids": [[8]]}  # the last batch's


def test_a_scorer_that_takes_positional_arguments_is_refused_naming_the_convention():
  with pytest.raises(ValueError, match=r"<lambda>'.*called by keyword.*\*\*kwargs"):
    scorers.score(lambda a, b: [0.0] * len(b), ["q"], ["a"])


def test_score_rejects_inf_with_index():
  def inf_scorer(prompts, completions):
    return np.array([0.0 if t != "bad" else np.inf for t in completions])

  with pytest.raises(ValueError, match=r"inf_scorer.*infinite.*\[3\]"):
    scorers.score(inf_scorer, ["q"] * 4, ["a", "b", "c", "bad"], batch_size=2)


def test_score_rejects_bad_batch_size():
  with pytest.raises(ValueError, match="batch_size"):
    scorers.score(_length_scorer, ["q"], ["a"], batch_size=0)


def test_completions_only_ignores_prompts_and_keeps_the_name():
  def n_words(texts):
    return np.array([len(t.split()) for t in texts], float)

  s = scorers.completions_only(n_words)
  np.testing.assert_array_equal(scorers.score(s, ["x y z", ""], ["a b", "c"]), [2, 1])
  def none_back(texts):
    return n_words(texts)[:0]

  with pytest.raises(ValueError, match="none_back.*shape"):  # errors name the wrapped function
    scorers.score(scorers.completions_only(none_back), ["q"], ["a"])


@pytest.mark.real_weights
def test_reward_model_scores_the_ids_preference_training_encodes(smollm2):
  """The scorer's (prompt, completion) layout is the chosen row of the same pair as
  `align.encoding.encode_preference` builds it for training; its score is the head on those ids."""
  from flax import nnx

  from lm import heads

  model, tok = smollm2
  rm = heads.RewardModel(model, rngs=nnx.Rngs(0))
  pairs = [("What is 2 + 2?", "4."), ("Name a colour.", "Blue, like the sky.\nOr red.")]
  records = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": "No."}
             for q, a in pairs]
  encoded, _ = encoding.encode_preference(records, tok, max_length=256)
  trained_on = [ex["tokens"][0][ex["attn_mask"][0] > 0].tolist() for ex in encoded]
  scorer = scorers.reward_model(rm, tok)
  out = scorers.score(scorer, [q for q, _ in pairs], [a for _, a in pairs])
  np.testing.assert_allclose(out, heads.score_ids(rm, trained_on), rtol=1e-6, atol=1e-6)
  assert out[0] != out[1]


@pytest.mark.real_weights
def test_reward_model_cuts_a_long_prompt_from_the_left_as_training_does(smollm2_tokenizer):
  """A (prompt, completion) longer than the reward model's max_seq_len is scored as the chosen
  row `encode_preference` builds at max_length = max_seq_len: the prompt's start is cut, the
  reply kept; a reply longer than the context keeps one prompt token."""
  from flax import nnx

  import lm
  from lm import heads

  tok = smollm2_tokenizer
  backbone = lm.Transformer(lm.preset("tiny", vocab_size=len(tok), max_seq_len=48),
                            rngs=nnx.Rngs(0))
  rm = heads.RewardModel(backbone, rngs=nnx.Rngs(1))
  long_q = "Tell me about rivers. " * 12
  pairs = [(long_q, "Rivers flow to the sea."), ("Hi?", "word " * 80), ("Short?", "Yes.")]
  records = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": "No."}
             for q, a in pairs]
  encoded, stats = encoding.encode_preference(records, tok, max_length=48)
  assert stats["n_prompt_truncated"] == 2 and stats["n_examples"] == 3
  trained_on = [ex["tokens"][0][ex["attn_mask"][0] > 0].tolist() for ex in encoded]
  assert all(len(r) <= 48 for r in trained_on) and len(trained_on[0]) == 48
  out = scorers.score(scorers.reward_model(rm, tok), [q for q, _ in pairs], [a for _, a in pairs])
  np.testing.assert_allclose(out, heads.score_ids(rm, trained_on), rtol=1e-6, atol=1e-6)


def test_load_reward_model_names_what_is_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a reward run's directory"):
    scorers.load_reward_model(tmp_path)
