"""Beam search in one compiled program, with the semantics of transformers' `_beam_search`.

Each prompt is prefilled once on a static KV cache and its rows repeated to W beams (prompt i's
beams are rows i*W ... i*W+W-1). Every step scores the W*V continuations of a prompt, keeps the top
K = max(2, 1 + n_eos) * W, moves those of the top W that end (EOS or max length) into a pool of W
finished hypotheses scored `sum log p / n_generated ** length_penalty`, continues the best W that
did not end, and reorders the cache rows by parent beam. The loop stops when no prompt can improve
its pool (HF's early-stopping heuristic) or at max_new_tokens.

`length_penalty` and `early_stopping` enter the program as values, so sweeping them reuses one
compilation; only (shapes, num_beams, max_new_tokens, pad_id, n_eos) compile anew.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decode.engine import check_decode_inputs, left_pad, prefill

_NEG = -1.0e9  # HF's finite "never pick" score; its float32 rounding decides ties as HF's does


@dataclasses.dataclass(frozen=True)
class BeamSearch:
  """HF beam-search settings.

  early_stopping: True stops a prompt once W hypotheses finished; False stops it once the best
  running beam, scored at the current length, cannot beat the worst finished one; "never" makes
  that test at the longest possible length (for length_penalty > 0), so it rarely stops early.
  """

  num_beams: int = 4
  length_penalty: float = 1.0
  early_stopping: bool | str = False

  def __post_init__(self):
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1; got {self.num_beams}.")
    if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
      raise ValueError(f'early_stopping must be True, False or "never"; got '
                       f'{self.early_stopping!r}.')


@dataclasses.dataclass
class BeamOutput:
  """Finished hypotheses per prompt, best first; generated ids only, pad_id after each end.

  tokens_bnt / lengths_bn / scores_bn: the best `num_return_sequences`; scores_bn is HF's
  `sequences_scores` (sum of token log-probs / n_generated ** length_penalty).
  beam_*_bw: all W hypotheses of the final pool; beam_logprob_sums_bw is the un-penalised sum of
  log p (nats), beam_scores_bw the penalised score.
  num_steps: decode steps the loop ran (it stops early once no prompt can improve).
  """

  tokens_bnt: np.ndarray
  lengths_bn: np.ndarray
  scores_bn: np.ndarray
  beam_tokens_bwt: np.ndarray
  beam_lengths_bw: np.ndarray
  beam_logprob_sums_bw: np.ndarray
  beam_scores_bw: np.ndarray
  num_steps: int

  def sequences(self) -> list[list[list[int]]]:
    """Per prompt, the returned hypotheses as id lists (EOS included when they ended on one)."""
    return [[row[:n].tolist() for row, n in zip(rows, lens)]
            for rows, lens in zip(self.tokens_bnt, self.lengths_bn)]


def _vocab_logprobs(logits_nv: jax.Array) -> jax.Array:
  """log softmax over the vocabulary: `token_logprobs`' formula for every token at once."""
  logits_nv = logits_nv.astype(jnp.float32)
  return logits_nv - jax.nn.logsumexp(logits_nv, axis=-1, keepdims=True)


def _gather_beams(x_bk, idx_bw):
  """x_bk[b, idx_bw[b, w], ...] for every b, w: `[B, W, ...]`."""
  return jax.vmap(lambda x, i: x[i])(x_bk, idx_bw)


class _Pool(NamedTuple):
  """Finished hypotheses per prompt, best first (HF's `sequences`, `beam_scores`, ...)."""

  tok_bwt: jax.Array
  score_bw: jax.Array  # penalised; _NEG marks an empty slot
  sum_bw: jax.Array
  len_bw: jax.Array
  fin_bw: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "num_beams", "max_new_tokens", "pad_id"))
def _beam_search(graphdef, state, tokens_bp, mask_bp, eos_e, penalty_t, never_b, stop_full_b, *,
                 num_beams: int, max_new_tokens: int, pad_id: int):
  """penalty_t[t] = (t+1) ** length_penalty (float32, as HF divides by a python float);
  never_b: early_stopping == "never" and length_penalty > 0; stop_full_b: early_stopping is True."""
  model = nnx.merge(graphdef, state)
  b, p = tokens_bp.shape
  w, t_max = num_beams, max_new_tokens
  k = max(2, 1 + eos_e.shape[0]) * w
  f32 = jnp.float32

  logits_nv, cache = prefill(model, tokens_bp, mask_bp, p + t_max, w)
  v = logits_nv.shape[-1]
  top_w_k = jnp.arange(k) < w

  def body(c):
    step, logits_nv, cache, run_tok_bwt, run_sum_bw, pool, open_b1, _ = c
    lp_bwv = _vocab_logprobs(logits_nv).reshape(b, w, v)
    acc_bx = (lp_bwv + run_sum_bw[:, :, None]).reshape(b, w * v)
    sum_bk, idx_bk = jax.lax.top_k(acc_bx, k)
    parent_bk, tok_bk = idx_bk // v, idx_bk % v
    cand_tok_bkt = _gather_beams(run_tok_bwt, parent_bk).at[:, :, step].set(tok_bk)
    ends_bk = jnp.any(tok_bk[..., None] == eos_e, axis=-1) | (step + 1 >= t_max)

    # Continue the best W candidates that did not end.
    run_lp_bk = sum_bk + ends_bk.astype(f32) * _NEG
    keep_bw = jax.lax.top_k(run_lp_bk, w)[1]
    run_tok_bwt = _gather_beams(cand_tok_bkt, keep_bw)
    run_sum_bw = _gather_beams(run_lp_bk, keep_bw)
    parent_bw = _gather_beams(parent_bk, keep_bw)

    # Candidates among the top W that ended may enter the pool (added in HF's order and float32).
    just_done_bk = ends_bk & top_w_k[None]
    score_bk = sum_bk / penalty_t[step]
    full_b1 = jnp.all(pool.fin_bw, axis=-1, keepdims=True) & stop_full_b
    score_bk = score_bk + full_b1.astype(f32) * _NEG
    score_bk = score_bk + (~open_b1).astype(f32) * _NEG
    score_bk = score_bk + (~just_done_bk).astype(f32) * _NEG
    cand = _Pool(cand_tok_bkt, score_bk, sum_bk, jnp.full((b, k), step + 1), just_done_bk)
    merged = jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), pool, cand)
    pick_bw = jax.lax.top_k(merged.score_bw, w)[1]
    pool = jax.tree.map(lambda x: _gather_beams(x, pick_bw), merged)

    rows_n = (jnp.arange(b)[:, None] * w + parent_bw).reshape(b * w)
    cache = cache.take_rows(rows_n)
    tok_n1 = run_tok_bwt[:, :, step].reshape(b * w, 1)
    logits, cache = model(tok_n1, attn_mask=jnp.ones((b * w, 1), bool), cache=cache)

    # HF's heuristic: can the best running beam still beat the worst finished hypothesis?
    best_b1 = run_sum_bw[:, :1] / jnp.where(never_b, penalty_t[t_max - 1], penalty_t[step])
    worst_bw = jnp.where(pool.fin_bw, jnp.min(pool.score_bw, axis=1, keepdims=True), _NEG)
    open_b1 = open_b1 & jnp.any(best_b1 > worst_bw, axis=-1, keepdims=True)
    going = jnp.any(open_b1) & ~(jnp.all(pool.fin_bw) & stop_full_b) & ~jnp.all(ends_bk)
    return step + 1, logits[:, -1], cache, run_tok_bwt, run_sum_bw, pool, open_b1, going

  def cond(c):
    return c[-1] & (c[0] < t_max)

  pad_bwt = jnp.full((b, w, t_max), pad_id, jnp.int32)
  neg_bw = jnp.full((b, w), _NEG, f32)
  pool = _Pool(pad_bwt, neg_bw, neg_bw, jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w), bool))
  init = (jnp.zeros((), jnp.int32), logits_nv, cache, pad_bwt,
          neg_bw.at[:, 0].set(0.0),  # only beam 0 expands at step 0, as in HF
          pool, jnp.ones((b, 1), bool), jnp.array(True))
  step, *_, pool, _, _ = jax.lax.while_loop(cond, body, init)
  return pool.tok_bwt, pool.len_bw, pool.sum_bw, pool.score_bw, step


def compile_count() -> int:
  """How many beam-search programs have been compiled in this process."""
  return _beam_search._cache_size()


def beam_search(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                eos_ids: Sequence[int], pad_id: int, config: BeamSearch = BeamSearch(),
                num_return_sequences: int = 1) -> BeamOutput:
  """Beam-search token-id prompts in one compiled program (prefill + `while_loop`).

  Matches `transformers` `generate(num_beams=W, do_sample=False, length_penalty=...,
  early_stopping=..., num_return_sequences=...)` (sequences and `sequences_scores`), except that
  unused positions hold pad_id (HF fills them with eos_ids[0] when pad_id is 0).
  """
  w = config.num_beams
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  if not 1 <= num_return_sequences <= w:
    raise ValueError(f"num_return_sequences must be in [1, num_beams={w}]; got "
                     f"{num_return_sequences}.")
  prompts = check_decode_inputs(model.cfg, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                pad_id=pad_id)
  tokens, mask = left_pad(prompts, pad_id, max_new_tokens=max_new_tokens,
                         max_seq_len=model.cfg.max_seq_len)
  if max(2, 1 + len(eos_ids)) > model.cfg.vocab_size:
    raise ValueError(f"{len(eos_ids)} EOS ids leave too few candidates in a vocabulary of "
                     f"{model.cfg.vocab_size}.")
  lp = float(config.length_penalty)
  # HF divides float32 scores by the python float `n ** length_penalty`, rounded to float32.
  penalty_t = np.asarray(np.arange(1, max_new_tokens + 1, dtype=np.float64) ** lp, np.float32)
  graphdef, state = nnx.split(model)
  out = _beam_search(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(mask),
      jnp.asarray(np.asarray(list(eos_ids), np.int32).reshape(-1)), jnp.asarray(penalty_t),
      jnp.asarray(config.early_stopping == "never" and lp > 0.0),
      jnp.asarray(config.early_stopping is True),
      num_beams=w, max_new_tokens=max_new_tokens, pad_id=pad_id)
  toks, lens, sums, scores, steps = (np.asarray(x) for x in out)
  n = num_return_sequences
  return BeamOutput(tokens_bnt=toks[:, :n], lengths_bn=lens[:, :n], scores_bn=scores[:, :n],
                    beam_tokens_bwt=toks, beam_lengths_bw=lens, beam_logprob_sums_bw=sums,
                    beam_scores_bw=scores, num_steps=int(steps))
