"""Per-token and per-sequence log-probs of batches, over the one scoring primitive."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.scoring import token_logprobs


def attention_inputs(batch: dict) -> tuple[jax.Array, jax.Array | None]:
  """(attn_mask, positions) for the model: a `[B, S, S]` segment mask when packed, else padding."""
  if "segment_ids" in batch:
    seg_bs = batch["segment_ids"]
    mask_bss = (seg_bs[:, :, None] == seg_bs[:, None, :]) & (seg_bs[:, None, :] > 0)
    return mask_bss, batch["positions"]
  return batch["attn_mask"], batch.get("positions")


def target_logprobs(model, tokens_bs: jax.Array, attn_mask, positions_bs=None) -> jax.Array:
  """log p(tokens[:, t+1] | tokens[:, :t+1]): `[B, S-1]` float32, one forward."""
  logits_bsv, _ = model(tokens_bs, positions_bs=positions_bs, attn_mask=attn_mask)
  return token_logprobs(logits_bsv[:, :-1], tokens_bs[:, 1:])


def sequence_logprobs(model, tokens_bs, attn_mask_bs, loss_mask_bs) -> tuple[jax.Array, jax.Array]:
  """(Σ log p over masked target tokens `[B]`, their count `[B]`) for right-padded rows."""
  lp_bs = target_logprobs(model, tokens_bs, attn_mask_bs)
  w_bs = loss_mask_bs[:, 1:].astype(jnp.float32)
  return (lp_bs * w_bs).sum(axis=-1), w_bs.sum(axis=-1)
