"""Bradley–Terry reward model: a scalar head on SmolLM2's last hidden state, LoRA on the trunk.

  python launch.py --config=configs/reward.py:cpu --workdir=runs/rm
"""

import ml_collections

from configs.train_base import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base("reward", arg)
  c.loss.update(margin=0.0, center_coef=0.0)
  if c.variant == "cpu":
    c.train.lr = 1e-3
  return c
