"""Supervised fine-tuning: token cross-entropy on response tokens (prompt tokens masked)."""

from __future__ import annotations

import jax.numpy as jnp

from align.algorithm import Algorithm, refuse_shared_prompt
from align.losses import register
from align.losses.common import attention_inputs
from lm.scoring import next_token_logprobs


@register("sft")
def sft_loss(model, batch: dict, cfg=None):
  """Mean negative log-likelihood per response token of the batch.

  batch: tokens `[B, S]`, attn_mask `[B, S]`, loss_mask `[B, S]` (1 on target tokens), and
  segment_ids/positions when packed.
  """
  del cfg
  attn_mask, positions = attention_inputs(batch)
  lp_bs = next_token_logprobs(model, batch["tokens"], attn_mask, positions, batch["loss_mask"])
  w_bs = batch["loss_mask"][:, 1:].astype(jnp.float32)
  n_tokens = jnp.maximum(w_bs.sum(), 1.0)
  nll = -(lp_bs * w_bs).sum() / n_tokens
  return nll, {"loss": nll, "nll": nll, "perplexity": jnp.exp(nll), "target_tokens": w_bs.sum()}


ALGORITHM = Algorithm(name="sft", loss=sft_loss, data_kind="sft", plotted=("loss", "perplexity"),
                      check=lambda config: refuse_shared_prompt(config, "SFT"))
