"""Attention sinks (task `sinks`, code in `lm/pretrain/sinks.py`): per layer and head, where attention
goes (first token, self, local window, entropy, Gu et al.'s sink rate, the most-attended key's
kind), heatmaps, and a StreamingLLM-style perplexity table (dense / window only / 1-8 sink tokens +
window / dense first layers + window) for each model in `models`: hub names or aliases, or
`pretrain` run directories (their last checkpoint).

  python launch.py --config=configs/sinks.py:cpu --workdir=runs/sinks
  python launch.py --config=configs/sinks.py:ours --workdir=runs/sinks-ours

Variants: `smoke` (SmolLM2, 4 sequences, one window, 256 tokens), `cpu` (SmolLM2-135M-Instruct:
Gu et al.'s setting of 100 sequences x 64 tokens; windows 64 and 256 in contexts of 1024 over
the first 4,096 tokens of WikiText-2 test and tiny Shakespeare's validation tail; 2,048 tokens of
WikiText-2 test decoded through a rolling cache of 0/1/4 sinks + 256), `ours` (the four
`pretrain.py:cpu_char256` sink variants, trained first with `--config.model.sink=none|logit|zero|
token --workdir=runs/char256-<sink>`: tiny Shakespeare's validation tail, windows 32 and 64 in
contexts of 256, 2,048 characters = 8 contexts through 0/1/4 sinks + 60, and each run's sink rate
over its training steps), `gpu_full` (windows 256 and 1024 in contexts of 2048 over 32,768 tokens
of each; 16,384 tokens through 4 + 1020).
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "ours", "gpu_full")
# pretrain.py:cpu_char256 with each model.sink variant (see the module docstring)
OURS = tuple(f"runs/char256-{v}" for v in ("none", "logit", "zero", "token"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("sinks", arg, VARIANTS)
  variant = c.variant
  c.models = ("smollm2-135m-instruct",)
  c.analysis = ml_collections.ConfigDict({"source": "wikitext-2-test", "n_sequences": 100,
                                          "seq_len": 64, "local": 4})
  c.streaming = ml_collections.ConfigDict({
      "streams": ["wikitext-2-test", "tinyshakespeare"], "windows": [64, 256],
      "sinks": [1, 2, 4, 8], "dense_first": 2, "context": 1024, "n_tokens": 4096,
      "batch_size": 4})
  # one long stream decoded through the rolling sink + window cache (lm/pretrain/streaming.py)
  c.stream_decode = ml_collections.ConfigDict({"stream": "wikitext-2-test", "window": 256,
                                               "sinks": [0, 1, 4], "n_tokens": 2048})
  if variant == "smoke":
    c.analysis.n_sequences = 4
    c.streaming.update(streams=["wikitext-2-test"], windows=[32], sinks=[1, 4], context=128,
                       n_tokens=256)
    c.stream_decode.update(window=32, sinks=[0, 4], n_tokens=160)
  elif variant == "ours":  # character models of tiny Shakespeare, context 256
    c.models = OURS
    c.analysis.source = "tinyshakespeare"
    c.streaming.update(streams=["tinyshakespeare"], windows=[32, 64], context=256,
                       n_tokens=8192, batch_size=8)
    c.stream_decode.update(stream="tinyshakespeare", window=60, sinks=[0, 1, 4], n_tokens=2048)
  elif variant == "gpu_full":
    c.streaming.update(windows=[256, 1024], context=2048, n_tokens=32768, batch_size=8)
    c.stream_decode.update(window=1020, sinks=[0, 1, 4], n_tokens=16384)
  return c
