"""Metrics for comparing decoding strategies: diversity, likelihood, length, repetition.

Pure numpy/python. Token sequences may hold token ids or words (any hashable items); n-grams are
contiguous and overlapping, e.g. [1, 2, 1] has the bigrams (1, 2) and (2, 1).
"""

from __future__ import annotations

import collections
import math
from typing import Hashable, Sequence

import numpy as np

Seq = Sequence[Hashable]



def _ngrams(seq: Seq, n: int) -> list[tuple]:
  return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def _check_n(n: int) -> None:
  if n < 1:
    raise ValueError(f"n-gram size must be >= 1, got n={n}")


def distinct_n(token_seqs: Sequence[Seq], n: int) -> float:
  """Distinct-n (Li et al. 2016): unique n-grams / total n-grams, pooled over all sequences.

  Args:
    token_seqs: sequences of hashable items (token ids or words); a sequence shorter than `n`
      contributes no n-grams.
    n: n-gram size, >= 1.

  Returns:
    A ratio in (0, 1]; 0.0 when there are no n-grams at all. The ratio falls as the pool grows, so
    compare values only between pools of similar total length.
  """
  _check_n(n)
  grams = [g for seq in token_seqs for g in _ngrams(seq, n)]
  if not grams:
    return 0.0
  return len(set(grams)) / len(grams)


def distinct_across_prompts(samples_by_prompt: Sequence[Sequence[Seq]], n: int) -> float:
  """Distinct-n of the first sample of every prompt, pooled: diversity between prompts.

  Args:
    samples_by_prompt: [P][N_p] samples, each a sequence of tokens; prompts with no samples are
      skipped.
    n: n-gram size.
  """
  return distinct_n([samples[0] for samples in samples_by_prompt if len(samples)], n)


def distinct_within_prompt(samples_by_prompt: Sequence[Sequence[Seq]], n: int) -> float:
  """Mean over prompts of distinct-n of that prompt's pooled samples: diversity per prompt.

  Each prompt counts equally (a macro average). Prompts with fewer than 2 samples are skipped, since
  one sample says nothing about sample-to-sample diversity.

  Args:
    samples_by_prompt: [P][N_p] samples, each a sequence of tokens.
    n: n-gram size.

  Returns:
    The mean ratio, or nan when no prompt has 2 or more samples.
  """
  _check_n(n)
  per_prompt = [distinct_n(samples, n) for samples in samples_by_prompt if len(samples) >= 2]
  return float(np.mean(per_prompt)) if per_prompt else math.nan


def avg_token_logprob(logprobs_bt: np.ndarray, lengths_b: Sequence[int] | np.ndarray) -> np.ndarray:
  """Mean log-prob (nats/token) over each row's first `lengths_b[i]` tokens.

  Args:
    logprobs_bt: [B, T] per-token log-probs; entries past a row's length are ignored, even when
      they are nan or -inf padding.
    lengths_b: [B] integer lengths, 0 <= length <= T.

  Returns:
    [B] float64 means; nan where the length is 0.
  """
  lp_bt = np.asarray(logprobs_bt, dtype=np.float64)
  lengths = np.asarray(lengths_b)
  if lp_bt.ndim != 2:
    raise ValueError(f"logprobs_bt must be [B, T], got shape {lp_bt.shape}")
  b, t = lp_bt.shape
  if lengths.shape != (b,):
    raise ValueError(f"lengths_b must have shape ({b},), got {lengths.shape}")
  if not np.issubdtype(lengths.dtype, np.integer):
    raise ValueError(f"lengths_b must be integers, got dtype {lengths.dtype}")
  if lengths.size and (lengths.min() < 0 or lengths.max() > t):
    raise ValueError(f"lengths_b must lie in [0, {t}], got min {lengths.min()} max {lengths.max()}")
  mask_bt = np.arange(t)[None, :] < lengths[:, None]
  # where, not multiply: -inf or nan padding times 0 would be nan.
  total_b = np.where(mask_bt, lp_bt, 0.0).sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(lengths > 0, total_b / np.maximum(lengths, 1), np.nan)


def length_stats(lengths: Sequence[float] | np.ndarray) -> dict[str, float]:
  """Summary statistics of a set of lengths (tokens, words, ... whatever the caller counts).

  Returns a dict with:
    count, mean, median, min, max;
    std: population standard deviation, sqrt(m2) (ddof=0);
    skew: sample skewness, the Fisher-Pearson coefficient g1 = m3 / m2**1.5 with central moments
      m_k = mean((x - mean(x))**k) (biased, no small-sample correction, matches
      scipy.stats.skew(bias=True)); 0.0 for constant input.
  Raises ValueError on empty input.
  """
  x = np.asarray(lengths, dtype=np.float64).ravel()
  if x.size == 0:
    raise ValueError("length_stats needs at least one length")
  d = x - x.mean()
  m2 = float(np.mean(d**2))
  m3 = float(np.mean(d**3))
  # Compare values, not m2 == 0: rounding in the mean can leave a tiny nonzero m2 for constants.
  skew = 0.0 if np.all(x == x[0]) else m3 / m2**1.5
  return {
      "count": int(x.size),
      "mean": float(x.mean()),
      "median": float(np.median(x)),
      "std": math.sqrt(m2),
      "min": float(x.min()),
      "max": float(x.max()),
      "skew": float(skew),
  }


def response_stats(lengths: Sequence[float], texts: Sequence[str], finish: Sequence[str]
                   ) -> dict[str, float]:
  """`length_stats` of `lengths` (whatever unit the caller counts), plus `empty_share` (share of
  texts with nothing but whitespace: the policy answered with its end token alone) and
  `truncated_share` (share whose finish is "length": cut at the token budget)."""
  if not len(lengths) == len(texts) == len(finish):
    raise ValueError(f"response_stats: {len(lengths)} lengths, {len(texts)} texts and "
                     f"{len(finish)} finish reasons; give one of each per response.")
  return {**length_stats(lengths),
          "empty_share": float(np.mean([not t.strip() for t in texts])),
          "truncated_share": float(np.mean([f == "length" for f in finish]))}


def repeated_ngram_count(tokens: Seq, n: int) -> int:
  """Occurrences of the most frequent n-gram in `tokens` (overlapping), 0 if len(tokens) < n.

  A sample "repeats an n-gram more than `threshold` times" when this exceeds `threshold`;
  e.g. [1, 2, 1, 2, 1, 2] with n=2 gives 3, for the bigram (1, 2).
  """
  _check_n(n)
  counts = collections.Counter(_ngrams(tokens, n))
  return max(counts.values(), default=0)


def _is_missing(v) -> bool:
  return v is None or (isinstance(v, (float, np.floating)) and bool(np.isnan(v)))


def summarize(rows: Sequence[dict], group_keys: Sequence[str],
              value_keys: Sequence[str]) -> list[dict]:
  """Groups `rows` by their `group_keys` values and reports each value key's mean, std, count.

  Args:
    rows: dicts holding every group key and value key (a missing key raises KeyError, so a typo
      fails loudly); a value of None or nan is missing and left out of that key's statistics.
    group_keys: keys whose value tuple defines a group.
    value_keys: numeric keys to summarise.

  Returns:
    One dict per group, in order of first appearance, holding the group keys' values, "n" (rows in
    the group) and, for each value key k, "k_mean", "k_std" (population, ddof=0) and "k_count"
    (non-missing values used). Mean and std are nan when k_count is 0.
  """
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
  table = []
  for key, members in groups.items():
    entry = dict(zip(group_keys, key))
    entry["n"] = len(members)
    for k in value_keys:
      vals = np.array([float(r[k]) for r in members if not _is_missing(r[k])], np.float64)
      entry[f"{k}_mean"] = float(vals.mean()) if vals.size else math.nan
      entry[f"{k}_std"] = float(vals.std()) if vals.size else math.nan
      entry[f"{k}_count"] = int(vals.size)
    table.append(entry)
  return table
