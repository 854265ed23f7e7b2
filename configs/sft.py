"""Supervised fine-tuning on the chosen replies (prompt tokens masked from the loss).

Code: `align/losses/sft.py` (loss and record), run by `align/train.py`.

  python launch.py --config=configs/sft.py:cpu --workdir=runs/sft
  python launch.py --config=configs/sft.py:gpu_full --workdir=runs/sft-full \\
      --config.data.source=yahma/alpaca-cleaned
"""

import ml_collections

from configs import train_base
from configs.train_base import base

VARIANTS = train_base.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base("align.losses.sft", arg)
  c.data.pack = c.variant != "smoke"
  return c
