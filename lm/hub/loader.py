"""The one loader: `load(spec) -> (model, tokenizer)` for every kind of model postlab reads.

A spec is a hub repo id, an HF directory, a `.gguf` file or an offline alias (`lm.hub.names`), a
`pretrain` run directory (its last checkpoint, `lm.hub.runs`), `tiny:SEED` (a random tiny model
with a byte vocabulary), or a random `preset` with a named tokenizer; a PEFT adapter and a reward
head go on top.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flax import nnx

from lm import config as lm_config
from lm import heads, lora
from lm.hub import runs, vocab, weights
from lm.hub import tokenizer as _tokenizer
from lm.hub.names import resolve
from lm.model import Transformer

log = logging.getLogger(__name__)


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer (with chat template) of an HF directory or a GGUF file; never imports torch.

  A GGUF's tokenizer is built from the file's own metadata (`lm.hub.tokenizer.from_gguf`).
  """
  path = Path(path)
  if path.suffix == ".gguf":
    return _tokenizer.from_gguf(path)
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(str(path))


def load_model(path: str | os.PathLike, *, dtype: str = "float32") -> Transformer:
  path = Path(path)
  if path.suffix == ".gguf":
    return weights.load_gguf(path, dtype=dtype)
  return weights.load_hf_dir(path, dtype=dtype)


def load_pretrained(name_or_path: str, *, dtype: str = "float32", tokenizer: bool = True):
  """`(model, tokenizer)` for a hub repo id, HF directory, `.gguf` file or offline alias."""
  path = resolve(name_or_path)
  log.info("loading %s from %s", name_or_path, path)
  if path.suffix == ".gguf":  # one parse of the file's metadata serves both
    reader = weights.open_gguf(path)
    model = weights.load_gguf(path, dtype=dtype, reader=reader)
    return model, (_tokenizer.from_gguf(reader, source=str(path)) if tokenizer else None)
  model = load_model(path, dtype=dtype)
  return model, (load_tokenizer(path) if tokenizer else None)


def load(name_or_path: str | None = None, *, preset: str | None = None,
         tokenizer: str | None = None, adapter: str | os.PathLike | None = None,
         reward_head: str | os.PathLike | None = None, dtype: str = "float32", seed: int = 0):
  """`(model, tokenizer)` for any model spec: the one loader of postlab.

  name_or_path: hub id, HF directory, `.gguf` file or offline alias (`load_pretrained`); a
    `pretrain` run directory (its last checkpoint; a run trained with a sink token gives a
    tokenizer whose `prefix_ids` every input must start with); `tiny:SEED` (random `tiny` preset
    with `max_seq_len` 512 and a UTF-8 byte vocabulary); or
  preset: a random `lm.config` preset (seeded by `seed`) with the vocabulary of `tokenizer`
    (a name or path as above), for smoke runs;
  adapter: a PEFT LoRA directory put on the model (`lm.lora.load_peft`);
  reward_head: a `reward_head.safetensors` (or the directory holding it): the model comes back
    as an `lm.heads.RewardModel` with that head.
  """
  if (name_or_path is None) == (preset is None):
    raise ValueError("give a model name_or_path or a preset (with tokenizer), not both or neither.")
  if preset is not None:
    if not tokenizer:
      raise ValueError(f"preset {preset!r} needs tokenizer=<name or path> for its vocabulary.")
    tok = load_tokenizer(resolve(tokenizer))
    model = Transformer(lm_config.preset(preset, vocab_size=len(tok), dtype=dtype),
                        rngs=nnx.Rngs(seed))
  elif str(name_or_path).startswith("tiny:"):
    cfg = lm_config.preset("tiny", max_seq_len=512, dtype=dtype, param_dtype=dtype)
    model = Transformer(cfg, rngs=nnx.Rngs(int(str(name_or_path).split(":")[1])))
    tok = vocab.ByteTokenizer()
  elif runs.is_pretrain_run(name_or_path):
    model, tok, _ = runs.load_run(name_or_path)
  else:
    model, tok = load_pretrained(name_or_path, dtype=dtype)
    if tokenizer:
      tok = load_tokenizer(resolve(tokenizer))
  if adapter:
    lora.load_peft(model, adapter)
  if reward_head:
    model = heads.load_head(heads.RewardModel(model, rngs=nnx.Rngs(seed)), reward_head)
  return model, tok
