"""Quickstart: SmolLM2-135M-Instruct answers real instructions; WikiText-2 perplexity; a report.

Variants: `cpu` (default; 4 AlpacaEval instructions, 128 new tokens, 4k WikiText tokens),
`smoke` (2 instructions, 16 new tokens, 512 tokens), `gpu_full` (16 instructions, 256 tokens,
the whole WikiText-2 test split).

Code: `decode/quickstart.py` (task `quickstart`).
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "gpu_full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("quickstart", arg, VARIANTS)
  variant = c.variant
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                       "dtype": "float32"})
  c.prompts = ml_collections.ConfigDict({
      "source": "alpaca_eval", "n": 4,
      "extra": ["What is the capital of France?"],
  })
  c.decode = ml_collections.ConfigDict({"max_new_tokens": 128, "batch_size": 8})
  c.perplexity = ml_collections.ConfigDict({
      "max_chars": 40_000, "max_tokens": 4096, "window": 512, "stride": 256, "batch_size": 4})
  if variant == "smoke":
    c.prompts.n = 2
    c.decode.max_new_tokens = 16
    c.perplexity.update(max_chars=4000, max_tokens=512, window=128, stride=64)
  elif variant == "gpu_full":
    c.prompts.n = 16
    c.decode.update(max_new_tokens=256, batch_size=16)
    c.perplexity.update(max_chars=10**8, max_tokens=10**8, window=1024, stride=512, batch_size=16)
  return c
