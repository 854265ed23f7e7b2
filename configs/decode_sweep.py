"""Decoding dynamics: greedy, beam 4, top-k (k=50) and top-p (p=0.9) at temperatures 0.2..1.2.

Variants: `cpu` (default; 8 AlpacaEval instructions, 4 samples each, finishes in minutes here),
`smoke` (2 instructions, 16 tokens, for tests), `gpu_full` (400 prompts from alpaca-cleaned by
name when the hub is reachable, the seeds' settings).

Code: `decode/sweep.py` (task `decode_sweep`), over `decode/engine.py` and `decode/beam.py`.
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "gpu_full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("decode_sweep", arg, VARIANTS)
  variant = c.variant
  c.seed = 0
  c.reward_run = ""  # a reward run's --workdir: its reward model scores the generations
  c.model = ml_collections.ConfigDict({"name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                       "dtype": "float32"})
  c.prompts = ml_collections.ConfigDict({"source": "alpaca_eval", "n": 8})
  c.sweep = ml_collections.ConfigDict({
      "temperatures": [0.2, 0.5, 0.8, 1.0, 1.2],
      "top_k": 50,
      "top_p": 0.9,
      "num_samples": 4,
      "max_new_tokens": 128,
      "beam": {"num_beams": 4, "length_penalty": 1.0, "early_stopping": False},
      "stop_strings": ["### Instruction"],
      "repeat_ngram_block": 4,
      "repeat_threshold": 3,
      "batch_rows": 32,
      "score_batch": 16,
  })
  if variant == "smoke":
    c.prompts.n = 2
    c.sweep.update(max_new_tokens=16, num_samples=2, temperatures=[0.5, 1.0], batch_rows=8)
  elif variant == "gpu_full":
    c.prompts.update(source="alpaca_cleaned", n=400)
    c.sweep.update(num_samples=10, batch_rows=256, score_batch=64)
  return c
