"""KL(policy || reference) per token and per sequence: exact, and Schulman's sample estimators.

At position t with context x_<t, p the policy's and q the reference's next-token distribution:

  exact = sum_v p(v) (log p(v) - log q(v))   full vocabulary, `lm.scoring.token_kl`
  k1    = log p(x_t) - log q(x_t)            unbiased, high variance, can be negative
  k2    = (log r)^2 / 2,  r = q(x_t) / p(x_t) biased, low variance (shown for completeness)
  k3    = (r - 1) - log r                    unbiased, never negative, low variance
  exact_rev = sum_v q(v) (log q(v) - log p(v))  the other direction, KL(reference || policy),
                                             per context (full vocabulary)

("Approximating KL divergence", J. Schulman, 2020.) k1 and k3 are unbiased for KL only where
x_t ~ p, i.e. on the policy's own samples at temperature 1; there, summed over a sequence, k1, k3
and the exact per-token KLs are all unbiased for the sequence-level KL(p || q) (chain rule). On
greedy outputs or fixed text the exact column is the per-context KL; k1/k2/k3 are shown only to
compare. For KL(reference || policy) over sequences, call `kl_rows(reference, policy, ...)` on the
reference's own samples (the roles swap). Log-probs come from `lm.scoring.token_logprobs`, the one scoring primitive.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from lm import scoring
from lm.scoring import sample_kl_estimators, sliding_windows, token_kl, token_logprobs

ESTIMATORS = ("exact", "exact_rev", "k1", "k2", "k3")


@functools.partial(jax.jit, static_argnames=("gp", "gq"))
def _per_token(gp, sp, gq, sq, tokens_bs, mask_bs):
  """Every estimator at positions 0..S-2 (predicting tokens 1..S-1): `[B, S-1]` each.

  Top level with static graphdefs, so calls with the same models and shapes share one compile.
  """
  logits_p, _ = nnx.merge(gp, sp)(tokens_bs, attn_mask=mask_bs)
  logits_q, _ = nnx.merge(gq, sq)(tokens_bs, attn_mask=mask_bs)
  targets = tokens_bs[:, 1:]
  logp = token_logprobs(logits_p[:, :-1], targets)
  logq = token_logprobs(logits_q[:, :-1], targets)
  return {"exact": token_kl(logits_p[:, :-1], logits_q[:, :-1]),
          "exact_rev": token_kl(logits_q[:, :-1], logits_p[:, :-1]), "logp": logp, "logq": logq,
          **sample_kl_estimators(logp, logq)}


def kl_rows(policy, reference, contexts: Sequence[Sequence[int]],
            continuations: Sequence[Sequence[int]], *, batch_size: int = 4,
            multiple: int = 32) -> list[dict[str, np.ndarray]]:
  """Per-token KL estimates of each continuation given its context, one forward per model.

  Args:
    policy, reference: models with the `model(tokens_bs, attn_mask=...)` forward (any two; for a
      LoRA policy the reference is the same weights with adapters off, see `compare`).
    contexts: token ids before each continuation (at least one token each).
    continuations: token ids scored; each row's KL is at the positions predicting them.
    batch_size, multiple: rows per forward; widths rounded up to `multiple` to share compiles.

  Returns:
    One dict per row: each estimator, and `logp`/`logq` (the tokens' log-probs under policy and
    reference), -> `[len(continuation)]` float32 arrays (nats).
  """
  if any(len(c) == 0 for c in contexts):
    raise ValueError("every KL row needs at least one context token.")
  gp, sp = nnx.split(policy)
  gq, sq = nnx.split(reference)
  return scoring.score_rows(lambda t, m, _: _per_token(gp, sp, gq, sq, t, m), contexts,
                            continuations, batch_size=batch_size, multiple=multiple, desc="KL")


def text_windows(token_ids: Sequence[int], *, window: int, stride: int
                 ) -> tuple[list[list[int]], list[list[int]]]:
  """(contexts, continuations) covering a token stream as `scoring.perplexity` does.

  Every token but the first is scored once, with up to `window - stride` tokens of context.
  """
  ids = list(token_ids)
  contexts, conts = [], []
  for b, e, n in sliding_windows(len(ids), window, stride):
    first = max(e - n, b + 1)
    contexts.append(ids[b:first])
    conts.append(ids[first:e])
  return contexts, conts


def summarize_kl(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
  """Flat numbers for a set of KL rows (nats).

  `{est}_per_token`: mean over all scored tokens pooled; `{est}_per_seq` / `{est}_per_seq_std`:
  mean / population std over rows of the row's sum; `n_tokens`, `n_sequences`.
  """
  out: dict[str, float] = {"n_sequences": len(rows),
                           "n_tokens": int(sum(len(r["exact"]) for r in rows))}
  for est in ESTIMATORS:
    pooled = np.concatenate([r[est] for r in rows]).astype(np.float64) if rows else np.zeros(0)
    sums = np.array([float(np.sum(r[est], dtype=np.float64)) for r in rows])
    out[f"{est}_per_token"] = float(pooled.mean()) if pooled.size else float("nan")
    out[f"{est}_per_seq"] = float(sums.mean()) if sums.size else float("nan")
    out[f"{est}_per_seq_std"] = float(sums.std()) if sums.size else float("nan")
  return out
