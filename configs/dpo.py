"""DPO (sigmoid; IPO, hinge and robust by `loss.variant`) on preference pairs.

  python launch.py --config=configs/dpo.py:cpu --workdir=runs/dpo
  python launch.py --config=configs/dpo.py:gpu_full --workdir=runs/dpo-full \\
      --config.data.source=Intel/orca_dpo_pairs

`tpu_pod`: `gpu_full` on a TPU slice of two hosts or more (v5p:2x2x2: 8 chips, 2 hosts) at pod
scale: 64 pairs a step (8 per chip) of up to 1024 tokens, the data axis (2) across the hosts and
FSDP over the chips of each. Check it from any host with
`launch.py --config=configs/dpo.py:tpu_pod --compile_only --topology=v5p:2x2x2`.

The reference is the same weights with the LoRA adapters switched off (no second copy).
Code: `align/losses/dpo.py` (losses, reference, record; layout in `align/losses/shared_prompt.py`),
run by `align/train.py`.
"""

import ml_collections

from configs import common
from configs import train_base
from configs.train_base import base

VARIANTS = train_base.VARIANTS + ("tpu_pod",)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  pod = common.variant_of(arg, VARIANTS, "dpo") == "tpu_pod"
  c = base("align.losses.dpo", "gpu_full" if pod else arg)
  # reference: "adapters_off" (LoRA off in the same weights, scored each step) or "precomputed"
  # (scored once over the training pairs before step 1; needed for full fine-tuning)
  c.loss.update(beta=0.1, variant="sigmoid", label_smoothing=0.0, reference="adapters_off")
  # chosen and rejected share their prompt's positions (same log-probs, fewer tokens per step)
  c.data.share_prompt = True
  if pod:
    c.variant = "tpu_pod"
    c.train.update(batch_size=64, eval_batch_size=64)
    c.data.update(max_length=1024, max_prompt_length=768)
    c.mesh.update(data=2, fsdp=-1, tensor=1)
  return c
