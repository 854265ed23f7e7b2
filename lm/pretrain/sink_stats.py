"""Where each query's attention goes, per layer and head, on any decoder (the sink statistics).

Per (layer, head), averaged over queries t >= 1 of `n` sequences of `seq_len` tokens
(`head_stats`):
- `first`: attention on the sequence's first token, A[t, 0];
- `gu_alpha`: Gu et al.'s importance of the first token, alpha_1 = (1/T) sum_{t>=0} A[t, 0]
  (their metric counts query 0 too, whose weight on itself is 1);
- `sink_column`: the mass on the learned sink logit (gpt-oss `attention_sinks`), 1 - sum_k A[t, k];
- `self`: A[t, t]; `local`: sum of A[t, k] over the `local` previous keys t-local <= k < t, k > 0;
- `entropy`: -sum_k A[t, k] ln A[t, k] (nats; the sink column excluded).
`sink_rate(eps)` is Gu et al.'s Sink_1^eps: the share of (layer, head) pairs with alpha_1 > eps.
`argmax_histogram`: per layer, the share of (query, head) whose most-attended key is the first
token, punctuation, a newline, the query itself, or another token (llm_exploration's census).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig

EPSILONS = (0.1, 0.3, 0.5, 0.8)
ARGMAX_KINDS = ("first", "punctuation", "newline", "self", "other")


@dataclasses.dataclass
class HeadStats:
  """`[layers, heads]` arrays of the module docstring's measures, plus the argmax census."""

  first: np.ndarray
  gu_alpha: np.ndarray
  sink_column: np.ndarray
  self_: np.ndarray
  local: np.ndarray
  entropy: np.ndarray
  argmax: np.ndarray  # [layers, len(ARGMAX_KINDS)] shares
  local_window: int

  def sink_rate(self, eps: float) -> float:
    return float((self.gu_alpha > eps).mean())

  def rows(self) -> list[dict]:
    """One row per (layer, head), for `mass.csv`."""
    n_layers, n_heads = self.first.shape
    return [{"layer": i, "head": h, "first": self.first[i, h], "gu_alpha": self.gu_alpha[i, h],
             "sink_column": self.sink_column[i, h], "self": self.self_[i, h],
             f"local{self.local_window}": self.local[i, h], "entropy": self.entropy[i, h]}
            for i in range(n_layers) for h in range(n_heads)]


@nnx.jit
def _maps(model, tokens_bs):
  """`[L, B, N, S, S]` attention weights of every layer."""
  maps = model.attention_maps(tokens_bs)
  return jnp.stack([maps[i] for i in sorted(maps)])


def token_kinds(tokenizer_decode, tokens_bs: np.ndarray) -> np.ndarray:
  """`[B, S]` codes into ARGMAX_KINDS[1:3] (punctuation 1, newline 2) or other (4)."""
  punct = set(string.punctuation) | {"“", "”", "‘", "’", "—", "–", "…"}
  cache: dict[int, int] = {}
  out = np.full(tokens_bs.shape, 4, np.int32)
  for idx, tok in np.ndenumerate(tokens_bs):
    t = int(tok)
    if t not in cache:
      text = tokenizer_decode([t])
      if "\n" in text:
        cache[t] = 2
      elif text.strip() and all(c in punct for c in text.strip()):
        cache[t] = 1
      else:
        cache[t] = 4
    out[idx] = cache[t]
  return out


def head_stats(model, sequences: np.ndarray, tokenizer_decode=None, *, local: int = 4,
               batch_size: int = 4) -> HeadStats:
  """Attention statistics of `sequences` `[n, T]` (unpadded, all real tokens)."""
  sequences = np.asarray(sequences, np.int32)
  n, t = sequences.shape
  cfg: ModelConfig = model.cfg
  sums = {k: np.zeros((cfg.n_layers, cfg.n_heads)) for k in
          ("first", "gu", "col", "self", "local", "entropy")}
  census = np.zeros((cfg.n_layers, len(ARGMAX_KINDS)))
  kinds = (token_kinds(tokenizer_decode, sequences) if tokenizer_decode is not None
           else np.full(sequences.shape, 4, np.int32))
  q = np.arange(t)
  local_mask = ((q[:, None] - q[None, :]) >= 1) & ((q[:, None] - q[None, :]) <= local) & (
      q[None, :] > 0)
  for start in range(0, n, batch_size):
    chunk = sequences[start:start + batch_size]
    pad = batch_size - len(chunk)
    batch = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)]) if pad else chunk
    a = np.asarray(_maps(model, jnp.asarray(batch)), np.float64)[:, :len(chunk)]  # [L,b,N,T,T]
    rest = a[..., 1:, :]  # queries t >= 1
    sums["first"] += rest[..., 0].mean(axis=-1).sum(axis=1)
    sums["gu"] += a[..., 0].mean(axis=-1).sum(axis=1)
    sums["col"] += (1.0 - rest.sum(axis=-1)).mean(axis=-1).sum(axis=1)
    sums["self"] += np.diagonal(a, axis1=-2, axis2=-1)[..., 1:].mean(axis=-1).sum(axis=1)
    sums["local"] += (a * local_mask).sum(axis=-1)[..., 1:].mean(axis=-1).sum(axis=1)
    ent = -(np.where(a > 0, a * np.log(np.where(a > 0, a, 1.0)), 0.0)).sum(axis=-1)
    sums["entropy"] += ent[..., 1:].mean(axis=-1).sum(axis=1)
    top = rest.argmax(axis=-1)  # [L, b, N, T-1] key index per query
    k_chunk = kinds[start:start + len(chunk)]
    kind = np.take_along_axis(np.broadcast_to(k_chunk[None, :, None, :], top.shape[:3] + (t,)),
                              top, axis=-1)
    kind = np.where(top == 0, 0, np.where(top == q[None, None, None, 1:], 3, kind))
    for code in range(len(ARGMAX_KINDS)):
      census[:, code] += (kind == code).sum(axis=(1, 2, 3))
  census /= census.sum(axis=1, keepdims=True)
  return HeadStats(first=sums["first"] / n, gu_alpha=sums["gu"] / n, sink_column=sums["col"] / n,
                   self_=sums["self"] / n, local=sums["local"] / n, entropy=sums["entropy"] / n,
                   argmax=census, local_window=local)


def example_map(model, tokens: Sequence[int], layers: Sequence[int]) -> np.ndarray:
  """`[len(layers), heads, T, T]` attention weights of one sequence, for heatmaps."""
  maps = model.attention_maps(jnp.asarray([list(tokens)], jnp.int32), layers=layers)
  return np.stack([np.asarray(maps[i][0]) for i in layers])
