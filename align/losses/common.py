"""Per-token and per-sequence log-probs of batches, over the one scoring primitive."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lm.scoring import next_token_logprobs, reference_token_logprobs


def attention_inputs(batch: dict) -> tuple[jax.Array, jax.Array | None]:
  """(attn_mask, positions) for the model: a `[B, S, S]` segment mask when packed, else padding."""
  if "segment_ids" in batch:
    seg_bs = batch["segment_ids"]
    mask_bss = (seg_bs[:, :, None] == seg_bs[:, None, :]) & (seg_bs[:, None, :] > 0)
    return mask_bss, batch["positions"]
  return batch["attn_mask"], batch.get("positions")


def sequence_logprobs(model, tokens_bs, attn_mask_bs, loss_mask_bs) -> tuple[jax.Array, jax.Array]:
  """(Σ log p over masked target tokens `[B]`, their count `[B]`) for right-padded rows."""
  lp_bs = next_token_logprobs(model, tokens_bs, attn_mask_bs, select_bs=loss_mask_bs)
  w_bs = loss_mask_bs[:, 1:].astype(jnp.float32)
  return (lp_bs * w_bs).sum(axis=-1), w_bs.sum(axis=-1)


def trainer_reference_logprobs(trainer, rows: dict, temperature: float) -> jax.Array:
  """`lm.scoring.reference_token_logprobs` `[B, S-1]` of training rows (tokens / attn_mask /
  loss_mask `[B, S]`, the loss mask selecting the targets) under a `Trainer`'s current model, on
  its mesh: the reference of GRPO's KL in the reward and of PPO's KL penalty. An abstract
  trainer (`launch.py --compile_only`) gives zeros of that shape."""
  if trainer.abstract:
    b, s = np.shape(rows["tokens"])
    return jnp.zeros((b, s - 1), jnp.float32)
  with jax.set_mesh(trainer.mesh):
    return reference_token_logprobs(
        trainer.graphdef, (trainer.params, trainer.rest), jnp.asarray(rows["tokens"]),
        jnp.asarray(rows["attn_mask"]), jnp.asarray(rows["loss_mask"]), temperature=temperature)
