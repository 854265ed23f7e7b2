"""One compiled decoding loop: left-padded prompts, a static KV cache, `lax.while_loop` over steps.

Prefill runs the model's one forward over the padded prompt batch with a cache; each step feeds
the chosen token back, with per-row `done` flags and per-token log-probs of the chosen tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.model import KVCache
from lm.scoring import token_logprobs


@dataclasses.dataclass(frozen=True)
class Greedy:
  """argmax decoding."""

  def sample(self, logits_bv: jax.Array, key: jax.Array) -> jax.Array:
    del key
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerateOutput:
  """tokens_bt / logprobs_bt: generated ids and their log-probs (pad/0 after a row finishes)."""

  tokens_bt: np.ndarray
  logprobs_bt: np.ndarray
  lengths_b: np.ndarray  # generated tokens per row, EOS included

  def sequences(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens_bt, self.lengths_b)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 8
             ) -> tuple[np.ndarray, np.ndarray]:
  """`[B, P]` tokens and mask, left-padded; P rounded up to `multiple` to reuse compilations."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token.")
  p = max(len(x) for x in prompts)
  p = -(-p // multiple) * multiple
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  mask = np.zeros((len(prompts), p), np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x):] = x
    mask[i, p - len(x):] = 1
  return tokens, mask


@nnx.jit(static_argnames=("max_new_tokens", "sampler", "pad_id"))
def _generate(model, tokens_bp, mask_bp, eos_ids, key, *, max_new_tokens, sampler, pad_id):
  b, p = tokens_bp.shape
  cache = KVCache.init(model.cfg, b, p + max_new_tokens)
  logits, cache = model(tokens_bp, attn_mask=mask_bp, cache=cache)
  last_bv = logits[:, -1]

  def is_eos(tok_b):
    return jnp.any(tok_b[:, None] == eos_ids[None, :], axis=-1)

  def body(carry):
    step, last_bv, cache, done_b, out_bt, lp_bt, key = carry
    key, sub = jax.random.split(key)
    tok_b = sampler.sample(last_bv, sub)
    lp_b = token_logprobs(last_bv[:, None], tok_b[:, None])[:, 0]
    tok_b = jnp.where(done_b, pad_id, tok_b)
    out_bt = out_bt.at[:, step].set(tok_b)
    lp_bt = lp_bt.at[:, step].set(jnp.where(done_b, 0.0, lp_b))
    new_done = done_b | is_eos(tok_b)
    logits, cache = model(tok_b[:, None], attn_mask=(~done_b)[:, None], cache=cache)
    return step + 1, logits[:, -1], cache, new_done, out_bt, lp_bt, key

  def cond(carry):
    step, _, _, done_b, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done_b)

  init = (
      jnp.zeros((), jnp.int32), last_bv, cache, jnp.zeros((b,), bool),
      jnp.full((b, max_new_tokens), pad_id, jnp.int32),
      jnp.zeros((b, max_new_tokens), jnp.float32), key,
  )
  _, _, _, done_b, out_bt, lp_bt, _ = jax.lax.while_loop(cond, body, init)
  return out_bt, lp_bt


def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, sampler=Greedy(), seed: int = 0
             ) -> GenerateOutput:
  """Decode a batch of token-id prompts in one compiled loop."""
  tokens, mask = left_pad(prompts, pad_id)
  eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
  out, lp = _generate(model, jnp.asarray(tokens), jnp.asarray(mask), eos, jax.random.key(seed),
                      max_new_tokens=max_new_tokens, sampler=sampler, pad_id=pad_id)
  out, lp = np.asarray(out), np.asarray(lp)
  eos_set = set(int(e) for e in eos_ids)
  lengths = np.full((len(prompts),), max_new_tokens, np.int32)
  for i, row in enumerate(out):
    hits = [j for j, t in enumerate(row) if int(t) in eos_set]
    if hits:
      lengths[i] = hits[0] + 1
  return GenerateOutput(out, lp, lengths)
