"""The verifier's evaluation on hand-made cases: majority vote with ties and answerless
solutions, the error taxonomy's rules, best-of-n against its bounds, and the training pairs."""

import numpy as np

from align import verifier


def test_majority_vote_shares_ties_and_ignores_answerless_solutions():
  assert verifier.majority_correct(["A: 3", "A: 3", "A: 4", "no idea"],
                                   [True, True, False, False]) == 1.0
  # 3 and 4 tie with two votes each: half the time right
  assert verifier.majority_correct(["A: 3", "A: 4", "A: 3", "A: 4"],
                                   [True, False, True, False]) == 0.5
  assert verifier.majority_correct(["none", "nothing"], [False, True]) == 0.5


def test_error_kinds_follow_the_stated_rules():
  assert verifier.error_kind("I cannot tell.", "7") == "extraction"
  # the gold 12 was computed, then a different number was given as the answer
  assert verifier.error_kind("3*4=<<3*4=12>>12 apples\nA: 15", "12") == "extraction"
  assert verifier.error_kind("2*3=<<2*3=7>>7\nA: 7", "6") == "arithmetic"
  assert verifier.error_kind("She has 5 + 4 = 10 pens.\nA: 10", "9") == "arithmetic"
  assert verifier.error_kind("2*3=<<2*3=6>>6 then 6+1=<<6+1=7>>7\nA: 7", "5") == "reasoning"
  assert verifier.false_calculations("1/4=<<1/4=0.25>>0.25, 10 x 3 = 30, 7-2=<<7-2=4>>4") == 1


def _problems():
  return [{"question": "q", "gold": "1", "solutions": ["A: 1", "A: 2", "A: 2", "A: 3"],
           "correct": [True, False, False, False]},
          {"question": "q", "gold": "5", "solutions": ["A: 4", "A: 4", "A: 9", "A: 8"],
           "correct": [False, False, False, False]},
          {"question": "q", "gold": "6", "solutions": ["A: 6", "A: 6", "A: 7", "A: 6"],
           "correct": [True, True, False, True]}]


def test_best_of_n_perfect_scores_reach_the_oracle():
  probs = _problems()
  perfect = np.array([[float(c) for c in p["correct"]] for p in probs])
  out = verifier.evaluate_best_of_n(probs, perfect, best_source=3)
  m = {k: v["exact_match"] for k, v in out["methods"].items()}
  assert m["verifier"] == m["oracle"] == 2 / 3
  np.testing.assert_allclose(m["random"], (0.25 + 0 + 0.75) / 3)
  assert m["majority"] == (0 + 0 + 1) / 3 and m["best_source"] == 1 / 3
  assert out["verifier_minus_majority"]["diff"] == 1 / 3
  worst = verifier.evaluate_best_of_n(probs, -perfect, best_source=3)
  assert worst["methods"]["verifier"]["exact_match"] == 0
  assert sum(worst["verifier_errors"].values()) == 3
  lo, hi = out["methods"]["random"]["ci95"]
  assert lo <= m["random"] <= hi


def test_training_pairs_come_from_training_problems_only(shared_data):
  problems = verifier.load_problems()
  assert len(problems) == 1319
  pairs = verifier.training_pairs()
  train_q = {p["question"] for p in problems[:verifier.TRAIN_PROBLEMS]}
  assert {r["prompt"] for r in pairs} <= train_q
  good = {(p["question"], s) for p in problems for s, c in zip(p["solutions"], p["correct"]) if c}
  assert all((r["prompt"], r["chosen"]) in good and (r["prompt"], r["rejected"]) not in good
             for r in pairs)
  # the labels agree with the final "A: n" against the ground truth on every solution
  assert all((verifier.final_number(s) == p["gold"]) == c
             for p in problems for s, c in zip(p["solutions"], p["correct"]))
