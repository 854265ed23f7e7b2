"""Bradley–Terry reward-model loss: -log σ(r_chosen - r_rejected - margin)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from align.algorithm import Algorithm, refuse_shared_prompt
from align.losses import register
from lm import heads
from lm.heads import RewardModel


def bradley_terry(r_chosen_b, r_rejected_b, margin_b=0.0, center_coef: float = 0.0):
  """Per-pair loss `[B]`; `center_coef` adds TRL's (r_c + r_r)² centring penalty."""
  loss_b = -jax.nn.log_sigmoid(r_chosen_b - r_rejected_b - margin_b)
  if center_coef:
    loss_b = loss_b + center_coef * (r_chosen_b + r_rejected_b) ** 2
  return loss_b


@register("reward")
def reward_loss(model, batch: dict, cfg):
  """`model` is an `lm.heads.RewardModel`; batch tokens/attn_mask are `[B, 2, S]`
  (0 = chosen, 1 = rejected), scored in one forward; an optional `margin` `[B]` per pair.
  cfg: margin (added to every pair's), center_coef."""
  tokens = batch["tokens"]
  b, two, s = tokens.shape
  rewards = model(tokens.reshape(b * two, s), batch["attn_mask"].reshape(b * two, s)).reshape(b, two)
  r_c, r_r = rewards[:, 0], rewards[:, 1]
  margin = batch.get("margin", 0.0) + cfg.margin
  loss = bradley_terry(r_c, r_r, margin, cfg.center_coef).mean()
  return loss, {
      "loss": loss,
      "accuracy": (r_c > r_r).astype(jnp.float32).mean(),
      "rewards/chosen": r_c.mean(),
      "rewards/rejected": r_r.mean(),
      "rewards/margin": (r_c - r_r).mean(),
  }


def _finish(config, model: RewardModel, tokenizer, eval_examples: list[dict], run_dir) -> dict:
  """The trained head's scores of the first held-out pairs, with their texts, in
  `reward_samples.json`: what `lm.hub.load(..., reward_head=...)` must reproduce."""
  rows = []
  for ex in eval_examples[:config.train.report_pairs]:
    for branch, name in ((0, "chosen"), (1, "rejected")):
      ids = ex["tokens"][branch][ex["attn_mask"][branch] > 0].tolist()
      rows.append({"pair": len(rows) // 2, "branch": name, "ids": ids,
                   "text": tokenizer.decode(ids, skip_special_tokens=False)})
  if rows:
    scores = heads.score_ids(model, [r["ids"] for r in rows])
    for r, s in zip(rows, scores):
      r["score"] = float(s)
  run_dir.write_json("reward_samples.json", rows)
  return {"reward_samples": len(rows)}


ALGORITHM = Algorithm(
    name="reward", loss=reward_loss, data_kind="preference",
    plotted=("loss", "accuracy", "rewards/margin"),
    check=lambda config: refuse_shared_prompt(config, "the reward model"),
    wrap=lambda model, config: RewardModel(model, rngs=nnx.Rngs(config.train.seed)),
    trainable=lambda filt: nnx.Any(filt, nnx.All(nnx.Param, nnx.PathContains("score"))),
    export=lambda model, path: heads.save_head(model, path), finish=_finish)
