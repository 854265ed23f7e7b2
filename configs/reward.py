"""Bradley–Terry reward model: a scalar head on SmolLM2's last hidden state, LoRA on the trunk.

Code: `align/losses/reward.py` (loss, head, record), run by `align/train.py`.

  python launch.py --config=configs/reward.py:cpu --workdir=runs/rm
"""

import ml_collections

from configs import train_base
from configs.train_base import base

VARIANTS = train_base.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base("align.losses.reward", arg)
  c.loss.update(margin=0.0, center_coef=0.0)
  c.train.report_pairs = 4  # held-out pairs whose texts and scores the report lists
  if c.variant == "cpu":
    c.train.lr = 1e-3
  return c
