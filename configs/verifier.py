"""A GSM8K verifier: a reward model on (correct, incorrect) solution pairs, then best-of-4.

  python launch.py --config=configs/verifier.py:cpu --workdir=runs/verifier

Trains the `reward` algorithm (Bradley–Terry head on SmolLM2-135M-Instruct with LoRA) on pairs of
labelled solutions of GSM8K test problems 0–999 (`gsm8k/example_model_solutions`), then reranks
the four solutions of each held-out problem (1000–1318) and compares exact match with random
pick, majority vote, the best single source and the oracle, with bootstrap intervals. Code:
`align/verifier.py`.
"""

import ml_collections

from configs import train_base
from configs.train_base import base

VARIANTS = train_base.VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = base("align.verifier", arg)
  c.data.update(source="gsm8k-verifier", max_length=256, max_prompt_length=160, n_eval=64,
                pad_multiple=32, on_error="fail")
  c.loss.update(margin=0.0, center_coef=0.0)  # the reward model's loss (configs/reward.py)
  c.verifier = ml_collections.ConfigDict({"n_eval_problems": 0})  # 0: all 319 held-out problems
  # 8 pairs as 2 micro-batches of 4: 16 rows x 320 tokens at once took 24 GB and was killed
  c.train.update(steps=30, batch_size=8, grad_accum=2, lr=5e-4, warmup_steps=3, eval_every=0,
                 eval_batch_size=16, checkpoint_every=15)
  if c.variant == "smoke":
    c.data.update(n=64, n_eval=8, max_length=128, max_prompt_length=64)  # tiny: 128 positions
    c.verifier.n_eval_problems = 8
    c.train.update(steps=2, batch_size=4, grad_accum=1, eval_every=2, eval_batch_size=4,
                   checkpoint_every=2)
  elif c.variant == "gpu_full":
    c.data.update(n_eval=128)
    c.train.update(steps=1000, batch_size=16, grad_accum=1, lr=1e-4, warmup_steps=50,
                   eval_every=200, eval_batch_size=32, checkpoint_every=200)
  return c
