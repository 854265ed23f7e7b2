"""A Bradley–Terry reward model: the decoder's trunk plus a scalar head on the last real token."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from lm.layers import Linear
from lm.model import Transformer


class RewardModel(nnx.Module):
  """`rm(tokens_bs, attn_mask_bs) -> rewards_b`: the head reads the final hidden state of the
  last real token of each right-padded row (the LM head is never computed)."""

  def __init__(self, backbone: Transformer, *, rngs: nnx.Rngs):
    self.backbone = backbone
    cfg = backbone.cfg
    self.score = Linear((cfg.d_model,), (1,), axes=("embed", None), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, rngs=rngs)

  @property
  def cfg(self):
    return self.backbone.cfg

  def __call__(self, tokens_bs, attn_mask_bs):
    h_bsd, _ = self.backbone.hidden_states(tokens_bs, attn_mask=attn_mask_bs)
    last_b = jnp.maximum(attn_mask_bs.astype(jnp.int32).sum(axis=-1) - 1, 0)
    h_bd = jnp.take_along_axis(h_bsd, last_b[:, None, None], axis=1)[:, 0]
    return self.score(h_bd)[:, 0].astype(jnp.float32)
