"""Rule-based rewards on hand-made cases: answer extraction, the empty answer, columns, weights."""

import numpy as np
import pytest

from decode import rewards, scorers


@pytest.mark.parametrize("text,want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"), ("#### 1,234", "1234"), ("#### −5", "-5"),
    ("so the answer is $12.", "12"), ("Work: 2*3=6\nA: 6", "6"), ("A: 12.50", "12.5"),
    ("first 3 then 10 then 42", "42"), ("no number here", None), ("", None),
    ("#### 8 but A: 9 and 10", "8"), ("The answer is +3.0", "3")])
def test_final_number(text, want):
  assert rewards.final_number(text) == want


def test_gsm8k_correct_and_the_empty_answer():
  comps = ["#### 72", "A: 72", "I think 71", "", "72 apples... no, 70", "<answer></answer>"]
  gold = ["Natalia sold ... #### 72"] * len(comps)
  got = scorers.score(rewards.gsm8k_correct, [""] * len(comps), comps, columns={"answer": gold})
  np.testing.assert_array_equal(got, [1, 1, 0, 0, 0, 0])


def test_arith_rewards():
  comps = ["85", " 85.", "The answer is 85", "58", "-3", "85 or 86", "51 - 47 = 4", ""]
  answers = ["85", "85", "85", "85", "-3", "85", "4", "0"]
  correct = scorers.score(rewards.get("arith_correct"), [""] * 8, comps,
                          columns={"answer": answers})
  np.testing.assert_array_equal(correct, [1, 1, 1, 0, 1, 0, 1, 0])
  np.testing.assert_array_equal(rewards.number_only([""] * 8, comps), [1, 1, 0, 1, 1, 0, 0, 0])


def test_combine_weights_each_reward_and_keeps_them_apart():
  fns = {"correct": rewards.get("arith_correct"), "format": rewards.get("number_only"),
         "length": rewards.get("length_penalty", limit=2)}
  comps = ["85", "it is 85 ok then", "12"]
  total, each = rewards.combine(fns, {"correct": 1.0, "format": 0.2, "length": 0.5},
                                ["p"] * 3, comps, columns={"answer": ["85"] * 3})
  np.testing.assert_allclose(each["length"], [0, -1.5, 0])
  np.testing.assert_allclose(total, [1.2, 1 - 0.75, 0.2])
  with pytest.raises(ValueError, match="no weight"):
    rewards.combine(fns, {"correct": 1.0}, ["p"], ["1"], columns={"answer": ["1"]})


def test_missing_or_short_columns_are_named():
  with pytest.raises(ValueError, match="answer"):
    scorers.score(rewards.gsm8k_correct, ["p"], ["#### 1"])
  with pytest.raises(ValueError, match="column 'answer' has 2 entries for 1"):
    scorers.score(rewards.gsm8k_correct, ["p"], ["#### 1"], columns={"answer": ["1", "2"]})
  with pytest.raises(ValueError, match="unknown"):
    rewards.get("bleu")


def test_arith_task_is_seeded_and_correct():
  a, b = rewards.arith_task(50, seed=3), rewards.arith_task(50, seed=3)
  assert a == b and a != rewards.arith_task(50, seed=4)
  for ex in a:
    x, op, y = ex["prompt"].split("What is ")[1].split("?")[0].split()
    assert int(ex["answer"]) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
    assert ex["prompt"].endswith("Reply with the number only.")


@pytest.mark.parity
def test_functions_written_for_trl_score_through_grpos_reward_path_as_trl_calls_them():
  """TRL's own reward functions (`trl.rewards`, built by their factories with the config's
  reward_args) and one written in TRL's documented shape, named by import path in the config, give
  through GRPO's reward path what TRL's GRPOTrainer gets calling them: by keyword, with
  completion_ids and the dataset's columns, extra keywords (trainer_state) swallowed, None read
  as no score (nan)."""
  trl_rewards = pytest.importorskip("trl.rewards")
  import ml_collections

  from align import online

  config = ml_collections.ConfigDict({
      "rewards": {"overlong": 1.0, "repetition": 0.5, "trl_style": 2.0},
      "reward_functions": {"overlong": "trl.rewards:get_soft_overlong_punishment",
                           "repetition": "trl.rewards.get_repetition_penalty_reward",
                           "trl_style": "tests_helpers:trl_style_correctness"},
      "reward_args": {"overlong": {"max_completion_len": 6, "soft_punish_cache": 3},
                      "repetition": {"ngram_size": 2, "max_penalty": -1.0}}})
  fns, weights = online.reward_functions(config)
  prompts = ["What is 2 + 2?", "What is 3 + 4?", "Say hi.", "What is 1 + 1?"]
  completions = ["It is 4", "7 7 7 7 7 7 7", "hi", "2"]
  ids = [[11, 12, 13], [7, 7, 7, 7, 7, 7, 7], [5], [9, 9, 9, 9, 9]]
  columns = {"answer": ["4", "7", None, "3"]}
  total, each = rewards.combine(fns, weights, prompts, completions, columns=columns,
                                completion_ids=ids)

  built = {"overlong": trl_rewards.get_soft_overlong_punishment(6, 3),
           "repetition": trl_rewards.get_repetition_penalty_reward(2, -1.0)}
  import tests_helpers

  built["trl_style"] = tests_helpers.trl_style_correctness
  want_total = np.zeros(len(prompts))
  for name, fn in built.items():  # as GRPOTrainer._calculate_rewards calls a reward function
    got = fn(prompts=prompts, completions=completions, completion_ids=ids,
             trainer_state=object(), **columns)
    want = np.array([np.nan if r is None else r for r in got], np.float64)
    np.testing.assert_array_equal(each[name], want, err_msg=name)
    want_total += weights[name] * np.nan_to_num(want, nan=0.0)
  np.testing.assert_allclose(total, want_total, rtol=1e-12)
  assert np.isnan(each["trl_style"][2]) and each["overlong"][1] == -1.0  # the cases are live
  with pytest.raises(ValueError, match="module:attribute"):
    rewards.load("no_colon_or_dot")
  with pytest.raises(ValueError, match="cannot be imported"):
    rewards.load("trl.rewards:no_such_reward")
