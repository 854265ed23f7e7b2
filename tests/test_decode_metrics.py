"""Golden cases, computed by hand in the comments, for decode.metrics."""

import math

import numpy as np
import pytest

from decode import metrics


# distinct_n


def test_distinct_1_golden():
  # unigrams 1,2,2,3: unique {1,2,3} = 3 of 4
  assert metrics.distinct_n([[1, 2, 2, 3]], 1) == pytest.approx(3 / 4)


def test_distinct_2_golden():
  # bigrams (1,2),(2,1),(1,2): unique 2 of 3
  assert metrics.distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)


def test_distinct_pools_but_does_not_cross_sequence_boundaries():
  # bigrams (1,2) and (1,2): 1 of 2. Joining the sequences would add (2,1) and give 2/3.
  assert metrics.distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(1 / 2)


def test_distinct_on_words():
  # bigrams (the,cat),(cat,the),(the,cat),(the,dog): unique 3 of 4
  seqs = [["the", "cat", "the", "cat"], ["the", "dog"]]
  assert metrics.distinct_n(seqs, 2) == pytest.approx(3 / 4)


def test_distinct_no_ngrams_is_zero():
  assert metrics.distinct_n([], 1) == 0.0
  assert metrics.distinct_n([[], [1, 2]], 3) == 0.0


def test_distinct_short_sequences_contribute_nothing():
  # [7] has no bigram; [1,2,3] has (1,2),(2,3): 2 of 2
  assert metrics.distinct_n([[7], [1, 2, 3]], 2) == 1.0


def test_distinct_rejects_bad_n():
  with pytest.raises(ValueError, match="n=0"):
    metrics.distinct_n([[1, 2]], 0)


# across vs within prompts

# prompt A: [1,2,3], [1,2,4]    prompt B: [1,2,3], [5,6,7]
TWO_PROMPTS = [[[1, 2, 3], [1, 2, 4]], [[1, 2, 3], [5, 6, 7]]]


def test_across_prompts_golden():
  # first samples [1,2,3] and [1,2,3]
  # n=1: 6 unigrams, unique {1,2,3} -> 3/6
  # n=2: (1,2),(2,3),(1,2),(2,3) -> 2/4
  assert metrics.distinct_across_prompts(TWO_PROMPTS, 1) == pytest.approx(1 / 2)
  assert metrics.distinct_across_prompts(TWO_PROMPTS, 2) == pytest.approx(1 / 2)


def test_within_prompt_golden():
  # n=1: A pooled 1,2,3,1,2,4 -> 4/6; B pooled 1,2,3,5,6,7 -> 6/6; mean (2/3 + 1)/2 = 5/6
  # n=2: A (1,2),(2,3),(1,2),(2,4) -> 3/4; B four distinct -> 1; mean 7/8
  assert metrics.distinct_within_prompt(TWO_PROMPTS, 1) == pytest.approx(5 / 6)
  assert metrics.distinct_within_prompt(TWO_PROMPTS, 2) == pytest.approx(7 / 8)


def test_within_prompt_skips_single_sample_prompts():
  # only the second prompt qualifies: 1,2,3,4 -> 4/4. The first alone would give 1/2.
  samples = [[[1, 1]], [[1, 2], [3, 4]]]
  assert metrics.distinct_within_prompt(samples, 1) == 1.0


def test_within_prompt_nan_when_no_prompt_qualifies():
  assert math.isnan(metrics.distinct_within_prompt([[[1, 2]], [[3]]], 1))
  assert math.isnan(metrics.distinct_within_prompt([], 1))


def test_across_prompts_skips_empty_prompts():
  # first samples [1,2] and [1,3]: unigrams 1,2,1,3 -> 3/4
  assert metrics.distinct_across_prompts([[[1, 2], [9]], [], [[1, 3]]], 1) == pytest.approx(3 / 4)


# avg_token_logprob


def test_avg_token_logprob_golden_ignores_padding():
  logprobs_bt = np.array([
      [-1.0, -3.0, np.nan],      # length 2: (-1 - 3)/2 = -2
      [-2.0, -np.inf, -np.inf],  # length 1: -2
      [-0.5, -1.5, -4.0],        # length 3: -6/3 = -2
      [-9.0, -9.0, -9.0],        # length 0: nan
  ])
  out = metrics.avg_token_logprob(logprobs_bt, [2, 1, 3, 0])
  assert out.shape == (4,)
  np.testing.assert_allclose(out[:3], [-2.0, -2.0, -2.0])
  assert np.isnan(out[3])


def test_avg_token_logprob_rejects_bad_lengths():
  lp = np.zeros((2, 3))
  with pytest.raises(ValueError, match="lie in"):
    metrics.avg_token_logprob(lp, [1, 4])
  with pytest.raises(ValueError, match="lie in"):
    metrics.avg_token_logprob(lp, [-1, 2])
  with pytest.raises(ValueError, match="shape"):
    metrics.avg_token_logprob(lp, [1, 2, 3])
  with pytest.raises(ValueError, match="integers"):
    metrics.avg_token_logprob(lp, [1.5, 2.0])


# length_stats


def test_length_stats_golden():
  # x = 1,2,3,10: mean 4, median (2+3)/2 = 2.5
  # deviations -3,-2,-1,6
  # m2 = (9+4+1+36)/4 = 12.5           -> std = sqrt(12.5) = 3.5355339...
  # m3 = (-27-8-1+216)/4 = 45
  # g1 = 45 / 12.5**1.5 = 45 / 44.1941738... = 1.0182337...
  s = metrics.length_stats([1, 2, 3, 10])
  assert s["count"] == 4
  assert s["mean"] == 4.0
  assert s["median"] == 2.5
  assert s["std"] == pytest.approx(math.sqrt(12.5))
  assert s["min"] == 1.0
  assert s["max"] == 10.0
  assert s["skew"] == pytest.approx(1.0182337, abs=1e-6)


def test_length_stats_skew_matches_scipy_biased():
  stats = pytest.importorskip("scipy.stats")
  x = np.random.default_rng(0).exponential(size=50)
  assert metrics.length_stats(x)["skew"] == pytest.approx(stats.skew(x, bias=True))


def test_length_stats_constant_and_symmetric():
  # 0.1 three times: the float mean is not exactly 0.1, but skew must still be 0
  s = metrics.length_stats([0.1, 0.1, 0.1])
  assert s["std"] == pytest.approx(0.0, abs=1e-15)
  assert s["skew"] == 0.0
  # 1,2,3: deviations -1,0,1, m3 = 0
  assert metrics.length_stats([1, 2, 3])["skew"] == 0.0
  assert metrics.length_stats([5])["skew"] == 0.0


def test_length_stats_empty_raises():
  with pytest.raises(ValueError):
    metrics.length_stats([])


# repeated_ngram_count


def test_repeated_ngram_count_golden():
  # bigrams (1,2)x3, (2,1)x2 -> 3
  assert metrics.repeated_ngram_count([1, 2, 1, 2, 1, 2], 2) == 3
  # unigram 1 occurs 3 times
  assert metrics.repeated_ngram_count([1, 2, 1, 2, 1, 2], 1) == 3
  # overlapping: (7,7) at positions 0,1,2 -> 3
  assert metrics.repeated_ngram_count([7, 7, 7, 7], 2) == 3
  # all distinct -> 1
  assert metrics.repeated_ngram_count(["a", "b", "c"], 2) == 1


def test_repeated_ngram_count_too_short_is_zero():
  assert metrics.repeated_ngram_count([1, 2], 3) == 0
  assert metrics.repeated_ngram_count([], 1) == 0


# summarize


def test_summarize_golden():
  rows = [
      {"strategy": "greedy", "temp": 0.0, "reward": 1.0, "len": 10},
      {"strategy": "sample", "temp": 1.0, "reward": 0.0, "len": 4},
      {"strategy": "greedy", "temp": 0.0, "reward": 3.0, "len": 10},
      {"strategy": "sample", "temp": 1.0, "reward": 4.0, "len": 6},
      {"strategy": "sample", "temp": 1.0, "reward": 8.0, "len": 8},
      {"strategy": "sample", "temp": 1.0, "reward": None, "len": 2},
      {"strategy": "sample", "temp": 0.7, "reward": float("nan"), "len": 5},
  ]
  table = metrics.summarize(rows, ["strategy", "temp"], ["reward", "len"])
  assert [(r["strategy"], r["temp"]) for r in table] == [
      ("greedy", 0.0), ("sample", 1.0), ("sample", 0.7)]  # first-appearance order
  greedy, sample, warm = table
  # greedy reward 1,3: mean 2, deviations -1,1 -> std 1; len 10,10 -> std 0
  assert greedy["n"] == 2
  assert (greedy["reward_mean"], greedy["reward_std"], greedy["reward_count"]) == (2.0, 1.0, 2)
  assert (greedy["len_mean"], greedy["len_std"], greedy["len_count"]) == (10.0, 0.0, 2)
  # sample reward 0,4,8 (None left out): mean 4, std sqrt((16+0+16)/3) = sqrt(32/3)
  assert sample["n"] == 4
  assert sample["reward_mean"] == 4.0
  assert sample["reward_std"] == pytest.approx(math.sqrt(32 / 3))
  assert sample["reward_count"] == 3
  # sample len 4,6,8,2: mean 5, deviations -1,1,3,-3 -> std sqrt(20/4) = sqrt(5)
  assert sample["len_mean"] == 5.0
  assert sample["len_std"] == pytest.approx(math.sqrt(5))
  assert sample["len_count"] == 4
  # only value is nan -> no statistics
  assert warm["n"] == 1 and warm["reward_count"] == 0
  assert math.isnan(warm["reward_mean"]) and math.isnan(warm["reward_std"])
  assert warm["len_mean"] == 5.0


def test_summarize_missing_key_raises():
  with pytest.raises(KeyError):
    metrics.summarize([{"s": "a"}], ["s"], ["reward"])
  assert metrics.summarize([], ["s"], ["reward"]) == []
