"""DPO (sigmoid; IPO, hinge and robust by `loss.variant`) on preference pairs.

  python launch.py --config=configs/dpo.py:cpu --workdir=runs/dpo
  python launch.py --config=configs/dpo.py:gpu_full --workdir=runs/dpo-full \\
      --config.data.source=Intel/orca_dpo_pairs

The reference is the same weights with the LoRA adapters switched off (no second copy).
Code: `align/losses/dpo.py` (losses, reference, record; layout in `align/losses/shared_prompt.py`),
run by `align/train.py`.
"""

import ml_collections

from configs.train_base import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base("align.losses.dpo", arg)
  # reference: "adapters_off" (LoRA off in the same weights, scored each step) or "precomputed"
  # (scored once over the training pairs before step 1; needed for full fine-tuning)
  c.loss.update(beta=0.1, variant="sigmoid", label_smoothing=0.0, reference="adapters_off")
  # chosen and rejected share their prompt's positions (same log-probs, fewer tokens per step)
  c.data.share_prompt = True
  return c
