"""Sampling strategies as static configs and pure `logits -> logits` filters equal to HF's.

`Sampler` is frozen and hashable: it decides which filters are compiled in. Their values live in
`SamplingParams`, arrays of shape `[B]`, so one batch can mix temperatures, k, p and penalties
(per-row sampling parameters). Order follows HF `generate`: repetition penalty, no-repeat-ngram,
then temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

FILTERED = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
  """Per-row filter values, each `[B]`. Neutral values (1, 0, 1.0, 0.0, 1.0) switch a filter off."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A decoding strategy. `greedy=True` takes the argmax after the logits processors.

  top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0 mean "off".
  """

  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  no_repeat_ngram_size: int = 0
  min_tokens_to_keep: int = 1
  max_top_k: int = 0  # static bound on per-row top_k values; 0 = use top_k

  def __post_init__(self):
    checks = [
        (self.temperature > 0, "temperature must be > 0 (use greedy=True for argmax)"),
        (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
        (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
        (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
        (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0 = off)"),
        (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0 (0 = off)"),
        (self.min_tokens_to_keep >= 1, "min_tokens_to_keep must be >= 1"),
    ]
    for ok, msg in checks:
      if not ok:
        raise ValueError(f"Sampler: {msg}; got {self}.")

  def params(self, batch: int, overrides: Mapping[str, Sequence[float]] | None = None
             ) -> SamplingParams:
    """`[B]` parameter arrays: this sampler's values, with optional per-row overrides."""
    values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}
    out = {}
    for name, default in values.items():
      row = (overrides or {}).get(name)
      arr = np.full((batch,), default) if row is None else np.asarray(row)
      if arr.shape != (batch,):
        raise ValueError(f"per-row {name} has shape {arr.shape}; expected ({batch},), one per row.")
      out[name] = jnp.asarray(arr, jnp.int32 if name == "top_k" else jnp.float32)
    return SamplingParams(**out)

  def with_overrides(self, overrides: Mapping[str, Sequence[float]] | None) -> "Sampler":
    """The static flags needed to honour per-row overrides (filters switched on where used)."""
    if not overrides:
      return self
    kw = {}
    if "top_k" in overrides:
      kw["max_top_k"] = max(int(max(overrides["top_k"])), self.top_k)
    for name, neutral in (("top_p", 1.0), ("min_p", 0.0), ("repetition_penalty", 1.0),
                          ("temperature", 1.0)):
      if name in overrides and getattr(self, name) == neutral:
        # Any non-neutral value turns the filter on; rows at the neutral value are unaffected.
        row = [v for v in overrides[name] if v != neutral]
        if row:
          kw[name] = row[0]
    return dataclasses.replace(self, **kw)

  def structure(self) -> "Sampler":
    """What the compiled program depends on: which filters are on, and the static top-k bound.
    The values travel as `params` arrays, so strategies that differ only in values (a sweep over
    temperatures or top-p) share one compilation. Sampling always divides by its temperature
    (dividing by 1.0 is exact), so temperature 1 needs no program of its own."""
    on = lambda value, off, mark: off if value == off else mark
    return dataclasses.replace(
        self, temperature=1.0 if self.greedy else 0.5, top_p=on(self.top_p, 1.0, 0.5),
        min_p=on(self.min_p, 0.0, 0.5),
        repetition_penalty=on(self.repetition_penalty, 1.0, 2.0))

  @property
  def temperature_only(self) -> bool:
    """Sampling divides by the temperature and nothing else touches the logits, so the sampled
    distribution is softmax(logits / T) itself."""
    return (not self.greedy and not self._k_bound and self.top_p == 1.0 and self.min_p == 0.0
            and self.repetition_penalty == 1.0 and not self.no_repeat_ngram_size)

  @property
  def _k_bound(self) -> int:
    return max(self.top_k, self.max_top_k)

  def process(self, logits_bv: jax.Array, p: SamplingParams, seen_bv: jax.Array | None = None,
              history_bt: jax.Array | None = None, history_valid_bt: jax.Array | None = None,
              cur_len: jax.Array | int | None = None) -> jax.Array:
    """All enabled processors and warpers, in HF order. Filtered entries become -inf."""
    x = logits_bv.astype(jnp.float32)
    if self.repetition_penalty != 1.0:
      x = repetition_penalty(x, seen_bv, p.repetition_penalty)
    if self.no_repeat_ngram_size:
      x = no_repeat_ngram(x, history_bt, history_valid_bt, cur_len, self.no_repeat_ngram_size)
    if self.greedy:
      return x
    if self.temperature != 1.0:
      x = x / p.temperature[:, None]
    if self._k_bound:
      x = top_k(x, p.top_k, self._k_bound, self.min_tokens_to_keep)
    if self.top_p < 1.0:
      x = top_p(x, p.top_p, self.min_tokens_to_keep)
    if self.min_p > 0.0:
      x = min_p(x, p.min_p, self.min_tokens_to_keep)
    return x

  def choose(self, processed_bv: jax.Array, key: jax.Array) -> jax.Array:
    if self.greedy:
      return jnp.argmax(processed_bv, axis=-1).astype(jnp.int32)
    return sample_inverse_cdf(processed_bv, key)


GREEDY = Sampler(greedy=True)


def sample_inverse_cdf(logits_bv, key):
  """One draw per row from softmax(logits): the first token whose cumulative probability exceeds
  a uniform fraction of the row's mass. One uniform per row instead of Gumbel noise over the
  vocabulary; XLA's blocked cumsum keeps the CDF within ~2e-7 of float64. Filtered (-inf)
  tokens add no mass, so they are never drawn."""
  probs = jax.nn.softmax(logits_bv, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, (logits_bv.shape[0], 1), jnp.float32)
  idx = jnp.sum(cdf <= u * cdf[:, -1:], axis=-1)
  # u * mass can round up to the mass itself; then the draw is the last token with mass.
  last = logits_bv.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
  return jnp.minimum(idx, last).astype(jnp.int32)


def repetition_penalty(logits_bv, seen_bv, penalty_b):
  """CTRL penalty (HF): seen tokens' logits divided by the penalty if > 0, multiplied if < 0."""
  pen = penalty_b[:, None]
  penalised = jnp.where(logits_bv < 0, logits_bv * pen, logits_bv / pen)
  return jnp.where(seen_bv, penalised, logits_bv)


def no_repeat_ngram(logits_bv, history_bt, valid_bt, cur_len, n: int):
  """Ban tokens that would complete an n-gram already in the first `cur_len` history tokens."""
  b, t = history_bt.shape
  cur_len = jnp.asarray(cur_len)
  # The last n-1 tokens (positions cur_len-n+1 .. cur_len-1) form the prefix to look up.
  prefix_idx = cur_len - (n - 1) + jnp.arange(n - 1)
  prefix_bk = jnp.take(history_bt, jnp.clip(prefix_idx, 0, t - 1), axis=1)
  starts = jnp.arange(t)
  match_bt = jnp.ones((b, t), bool)
  for k in range(n - 1):
    pos = starts + k
    tok = jnp.take(history_bt, jnp.clip(pos, 0, t - 1), axis=1)
    ok = jnp.take(valid_bt, jnp.clip(pos, 0, t - 1), axis=1) & (pos < t)
    match_bt &= ok & (tok == prefix_bk[:, k:k + 1])
  end = starts + n - 1
  match_bt &= (end < cur_len) & jnp.take(valid_bt, jnp.clip(end, 0, t - 1), axis=1)
  match_bt &= cur_len + 1 >= n
  banned_tok = jnp.take(history_bt, jnp.clip(end, 0, t - 1), axis=1)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  ban_bv = jnp.zeros_like(logits_bv, dtype=bool).at[rows, banned_tok].max(match_bt)
  return jnp.where(ban_bv, FILTERED, logits_bv)


def top_k(logits_bv, k_b, k_bound: int, min_keep: int = 1):
  """Keep logits >= the k-th largest (ties kept, as HF); k=0 means off; k >= vocab keeps all."""
  v = logits_bv.shape[-1]
  bound = min(k_bound, v)
  top_vals, _ = jax.lax.top_k(logits_bv, bound)
  k = jnp.where(k_b <= 0, v, jnp.maximum(k_b, min_keep))
  k = jnp.minimum(k, bound)
  kth = jnp.take_along_axis(top_vals, (k - 1)[:, None], axis=-1)
  keep = (logits_bv >= kth) | (k_b <= 0)[:, None] | (k_b >= v)[:, None]
  return jnp.where(keep, logits_bv, FILTERED)


def top_p(logits_bv, p_b, min_keep: int = 1):
  """Nucleus (HF): drop the ascending-sorted tokens whose cumulative prob is <= 1 - p.

  Without a sort: every token below one probability per row is dropped and every token above it
  kept. That probability is found by bisection on the float bits of the probabilities (31 masked
  sums of the tail mass over the vocabulary; exact, each row on its own). Tokens tied at it are
  dropped in HF's stable ascending order, lowest index first, while the tail mass stays <= 1 - p.
  `min_keep > 1` takes the sorted path.
  """
  if min_keep > 1:
    return _top_p_sorted(logits_bv, p_b, min_keep)
  probs = jax.nn.softmax(logits_bv, axis=-1)
  bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # monotone in probs >= 0
  tail = 1.0 - p_b

  def mass_upto(b_b):  # reads the bits alone: one [B, V] array per step
    return jnp.sum(jnp.where(bits <= b_b[:, None], jax.lax.bitcast_convert_type(bits, jnp.float32),
                             0.0), axis=-1)

  def halve(_, bounds):  # invariant: mass up to lo <= 1 - p < mass up to hi
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    dropped = mass_upto(mid) <= tail
    return jnp.where(dropped, mid, lo), jnp.where(dropped, hi, mid)

  hi = bits.max(axis=-1)
  lo, hi = jax.lax.fori_loop(0, 31, halve, (jnp.full_like(hi, -1), hi))
  below = mass_upto(lo)[:, None]
  tied = bits == hi[:, None]
  value = jax.lax.bitcast_convert_type(hi, jnp.float32)[:, None]
  # Position among the ties, by index (1-based); the cumsum runs only when some row has ties.
  rank = jax.lax.cond(jnp.any(tied.sum(axis=-1) > 1), lambda: jnp.cumsum(tied, axis=-1),
                      lambda: tied.astype(jnp.int32))
  drop = (bits < hi[:, None]) | (tied & (below + rank * value <= tail[:, None]))
  return jnp.where(drop, FILTERED, logits_bv)


def _top_p_sorted(logits_bv, p_b, min_keep: int):
  order = jnp.argsort(logits_bv, axis=-1)  # ascending, as HF
  sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove_sorted = cum <= (1.0 - p_b[:, None])
  remove_sorted = remove_sorted.at[:, -min_keep:].set(False)
  b = logits_bv.shape[0]
  remove = jnp.zeros_like(remove_sorted).at[jnp.arange(b)[:, None], order].set(remove_sorted)
  return jnp.where(remove, FILTERED, logits_bv)


def min_p(logits_bv, min_p_b, min_keep: int = 1):
  """Drop tokens with prob < min_p * max prob (HF), keeping the `min_keep` most likely."""
  probs = jax.nn.softmax(logits_bv, axis=-1)
  remove = probs < min_p_b[:, None] * probs.max(axis=-1, keepdims=True)
  _, keep_idx = jax.lax.top_k(probs, min_keep)
  b = logits_bv.shape[0]
  remove = remove.at[jnp.arange(b)[:, None], keep_idx].set(False)
  return jnp.where(remove, FILTERED, logits_bv)
