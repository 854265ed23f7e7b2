"""Run directories as models: a `pretrain` run's last checkpoint back as (model, tokenizer, prefix).

A pretraining run directory holds `config.json`, `corpus_manifest.json` (the store's tokenizer) and
`checkpoints/`. How a pretraining config becomes a model (`model_config`) and which of its
parameters train and are checkpointed (`trainable`) is written here once, for the task that
trains the run (`lm.pretrain.task`) and for the loader that reads it back (`lm.hub.load`).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
from flax import nnx

from lm import config as lm_config
from lm.hub import vocab
from lm.model import Transformer
from lm.train.checkpoint import Checkpointer

MANIFEST = "corpus_manifest.json"


def is_pretrain_run(path) -> bool:
  """Whether `path` is a `pretrain` run directory (it holds the store's manifest)."""
  return (Path(path) / MANIFEST).is_file()


SINK_VARIANTS = ("none", "logit", "zero", "token")


def model_config(config, vocab_size: int) -> lm_config.ModelConfig:
  """The preset with the config's overrides, the store's vocabulary (+ 1 for a sink token, padded
  to `model.vocab_multiple`) and a context that fits `data.seq_len`."""
  m = config.model
  overrides = dict(m.overrides)
  multiple = int(m.vocab_multiple)
  sink = m.sink
  if sink not in SINK_VARIANTS:
    raise ValueError(f"model.sink={sink!r} is unknown; use one of {SINK_VARIANTS}.")
  if sink in ("logit", "zero"):
    overrides["attention_sinks"] = True
  vocab_size += sink == "token"
  overrides["vocab_size"] = -(-vocab_size // multiple) * multiple
  overrides.setdefault("max_seq_len", max(int(config.data.seq_len),
                                          lm_config.PRESETS[m.preset].max_seq_len))
  cfg = lm_config.preset(m.preset, **overrides)
  return cfg.replace(dtype=m.dtype, scan_layers=bool(m.scan_layers), remat=m.remat,
                     attention_impl=m.attention_impl)


def trainable(config):
  """Every parameter, except the sink logits of the "zero" variant (they stay at 0)."""
  if config.model.sink == "zero":
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("sinks")))
  return nnx.Param


def load_run(workdir, *, shapes_only: bool = False) -> tuple[Transformer, object, list[int]]:
  """(model at the run's last checkpoint, its tokenizer, the prefix every input starts with: its
  sink token, or none; also the tokenizer's `prefix_ids`) from a `pretrain` run directory.
  `shapes_only`: the model's arrays are ShapeDtypeStructs (`nnx.eval_shape`), no checkpoint read."""
  workdir = Path(workdir)
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  manifest = json.loads((workdir / MANIFEST).read_text())
  make = lambda: Transformer(model_config(config, int(manifest["tokenizer"]["vocab_size"])),
                             rngs=nnx.Rngs(0))
  tokenizer = vocab.tokenizer_from_json(manifest["tokenizer"])
  sink_token = int(manifest["tokenizer"]["vocab_size"])  # one id past the corpus vocabulary
  tokenizer.prefix_ids = [sink_token] if config.model.sink == "token" else []
  if shapes_only:
    return nnx.eval_shape(make), tokenizer, list(tokenizer.prefix_ids)
  model = make()
  with Checkpointer(workdir / "checkpoints") as ckpt:
    if ckpt.latest_step is None:
      raise FileNotFoundError(f"{workdir} has no checkpoint; train it first.")
    state = nnx.state(model, trainable(config))
    ckpt.restore(state)  # the newest intact checkpoint
    nnx.update(model, state)
  return model, tokenizer, list(tokenizer.prefix_ids)
