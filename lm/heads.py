"""Scalar heads on the decoder's trunk: a Bradley–Terry reward model, and scoring texts with it.

A head reads the final hidden state of each row's last real token (the LM head is never
computed). Its weight is saved as `reward_head.safetensors` (`score.weight` `[1, D]`, HF's
`AutoModelForSequenceClassification` layout) beside the decoder's weights or adapter;
`lm.hub.load(..., reward_head=...)` puts it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import inputs
from lm.layers import Linear
from lm.model import Transformer

HEAD_FILE = "reward_head.safetensors"


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


def save_head(rm: RewardModel, directory: str | Path) -> Path:
  """`directory/reward_head.safetensors` with the head's weight `score.weight` `[1, D]`."""
  from safetensors.numpy import save_file

  path = Path(directory) / HEAD_FILE
  save_file({"score.weight": np.asarray(rm.score.kernel[...]).T.copy()}, str(path))
  return path


def load_head(rm: RewardModel, path: str | Path) -> RewardModel:
  """Put a saved head (`save_head`; a directory or the file) into `rm`, in place."""
  from safetensors.numpy import load_file

  path = Path(path)
  path = path / HEAD_FILE if path.is_dir() else path
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no reward head; a reward run writes {HEAD_FILE} beside its "
                            "adapter or model directory.")
  weight = load_file(str(path)).get("score.weight")
  want = (1, rm.cfg.d_model)
  if weight is None or weight.shape != want:
    raise ValueError(f"{path}: expected 'score.weight' of shape {want} for this model; got "
                     f"{None if weight is None else weight.shape}.")
  rm.score.kernel.set_value(jnp.asarray(weight.T, rm.score.kernel[...].dtype))
  return rm


@jax.jit
def _rewards(graphdef, state, tokens_bs, mask_bs):
  rm = nnx.merge(graphdef, state)
  rm.eval()  # LoRA dropout off; the caller's model keeps its mode
  return rm(tokens_bs, mask_bs)


def score_ids(rm: RewardModel, rows: Sequence[Sequence[int]], *, batch_size: int = 8,
              multiple: int = 32) -> np.ndarray:
  """Reward of each token-id row, `[N]` float32 (eval mode; rows right-padded to a multiple)."""
  rows = inputs.token_rows(rows, vocab_size=rm.cfg.vocab_size, max_len=rm.cfg.max_seq_len,
                           what="rows")
  width = -(-max(map(len, rows)) // multiple) * multiple
  graphdef, state = nnx.split(rm)
  out = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    for j, r in enumerate(chunk):
      tokens[j, :len(r)], mask[j, :len(r)] = r, 1
    out.append(np.asarray(_rewards(graphdef, state, tokens, mask))[:len(chunk)])
  return np.concatenate(out)


def score_texts(rm: RewardModel, tokenizer, texts: Sequence[str], **kw) -> np.ndarray:
  """Reward of each text (tokenized as is: chat-formatted texts keep their special tokens)."""
  return score_ids(rm, [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], **kw)


class PolicyWithValue(nnx.Module):
  """A decoder with a value head on its trunk (PPO's critic sharing the policy's trunk and its
  LoRA adapters): `values(h_bsd) -> [B, S]` reads every position's final hidden state. The head
  starts at zero (V = 0, a neutral baseline) and the critic warm-up fits it."""

  def __init__(self, backbone: Transformer, *, rngs: nnx.Rngs):
    self.backbone = backbone
    cfg = backbone.cfg
    self.value = Linear((cfg.d_model,), (1,), axes=("embed", None), dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, rngs=rngs)
    self.value.kernel.set_value(jnp.zeros_like(self.value.kernel[...]))

  @property
  def cfg(self):
    return self.backbone.cfg

  def values(self, h_bsd) -> jax.Array:
    return self.value(h_bsd)[..., 0].astype(jnp.float32)


def backbone(model):
  """The decoder inside a head wrapper (`RewardModel`, `PolicyWithValue`), else `model` itself:
  what samples, scores log-probs and is exported as the language model."""
  return model.backbone if isinstance(model, (RewardModel, PolicyWithValue)) else model
