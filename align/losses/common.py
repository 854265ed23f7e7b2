"""Per-token and per-sequence log-probs of batches, over the one scoring primitive."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.scoring import selected_token_logprobs, token_logprobs


def attention_inputs(batch: dict) -> tuple[jax.Array, jax.Array | None]:
  """(attn_mask, positions) for the model: a `[B, S, S]` segment mask when packed, else padding."""
  if "segment_ids" in batch:
    seg_bs = batch["segment_ids"]
    mask_bss = (seg_bs[:, :, None] == seg_bs[:, None, :]) & (seg_bs[:, None, :] > 0)
    return mask_bss, batch["positions"]
  return batch["attn_mask"], batch.get("positions")


def target_logprobs(model, tokens_bs: jax.Array, attn_mask, positions_bs=None,
                    loss_mask_bs: jax.Array | None = None) -> jax.Array:
  """log p(tokens[:, t+1] | tokens[:, :t+1]): `[B, S-1]` float32, one forward.

  With `loss_mask_bs` only its target positions are scored (0 elsewhere): the output head runs
  on the chunks of positions that hold them (`lm.scoring.selected_token_logprobs`).
  """
  h_bsd, _ = model.hidden_states(tokens_bs, positions_bs, attn_mask)
  if loss_mask_bs is None:
    return token_logprobs(model.logits(h_bsd[:, :-1]), tokens_bs[:, 1:])
  return selected_token_logprobs(model, h_bsd[:, :-1], tokens_bs[:, 1:], loss_mask_bs[:, 1:] > 0)


def sequence_logprobs(model, tokens_bs, attn_mask_bs, loss_mask_bs) -> tuple[jax.Array, jax.Array]:
  """(Σ log p over masked target tokens `[B]`, their count `[B]`) for right-padded rows."""
  lp_bs = target_logprobs(model, tokens_bs, attn_mask_bs, loss_mask_bs=loss_mask_bs)
  w_bs = loss_mask_bs[:, 1:].astype(jnp.float32)
  return (lp_bs * w_bs).sum(axis=-1), w_bs.sum(axis=-1)
