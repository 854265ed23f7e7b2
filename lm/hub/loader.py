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


def model_config(path: str | os.PathLike, *, dtype: str = "float32") -> lm_config.ModelConfig:
  """The architecture of an HF directory (`config.json`) or a `.gguf` file (its metadata), no
  weights read."""
  path = Path(path)
  if path.suffix == ".gguf":
    return weights.config_from_gguf(weights.open_gguf(path), dtype=dtype, name=path.stem)
  return weights.config_from_hf_dir(path, dtype=dtype)


def shapes_of(cfg: lm_config.ModelConfig, seed: int = 0) -> Transformer:
  """A Transformer of `cfg` whose arrays are `jax.ShapeDtypeStruct`s (`nnx.eval_shape`): the
  shapes and dtypes a loaded model has, for ahead-of-time compilation (`lm.train.aot`)."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))


def load_pretrained(name_or_path: str, *, dtype: str = "float32", tokenizer: bool = True,
                    shapes_only: bool = False):
  """`(model, tokenizer)` for a hub repo id, HF directory, `.gguf` file or offline alias;
  `shapes_only`: the model's shapes alone (`shapes_of`), no weights read."""
  path = resolve(name_or_path)
  log.info("loading %s from %s%s", name_or_path, path, " (shapes only)" if shapes_only else "")
  # a GGUF's metadata is parsed once for model and tokenizer (`weights.open_gguf` keeps it)
  model = (shapes_of(model_config(path, dtype=dtype)) if shapes_only
           else load_model(path, dtype=dtype))
  return model, (load_tokenizer(path) if tokenizer else None)


def load(name_or_path: str | None = None, *, preset: str | None = None,
         tokenizer: str | None = None, adapter: str | os.PathLike | None = None,
         reward_head: str | os.PathLike | None = None, dtype: str = "float32", seed: int = 0,
         shapes_only: bool = False):
  """`(model, tokenizer)` for any model spec: the one loader of postlab.

  name_or_path: hub id, HF directory, `.gguf` file or offline alias (`load_pretrained`); a
    `pretrain` run directory (its last checkpoint; a run trained with a sink token gives a
    tokenizer whose `prefix_ids` every input must start with); `tiny:SEED` (random `tiny` preset
    with `max_seq_len` 512 and a UTF-8 byte vocabulary); or
  preset: a random `lm.config` preset (seeded by `seed`) with the vocabulary of `tokenizer`
    (a name or path as above), for smoke runs;
  adapter: a PEFT LoRA directory put on the model (`lm.lora.load_peft`);
  reward_head: a `reward_head.safetensors` (or the directory holding it): the model comes back
    as an `lm.heads.RewardModel` with that head;
  shapes_only: the model's arrays are `jax.ShapeDtypeStruct`s of the shapes and dtypes the
    loaded model would have (`shapes_of`): no weights read, for `launch.py --compile_only`.
  """
  if (name_or_path is None) == (preset is None):
    raise ValueError("give a model name_or_path or a preset (with tokenizer), not both or neither.")
  if shapes_only and (adapter or reward_head):
    raise ValueError("shapes_only loads the base model's shapes; put an adapter or a reward head "
                     "on it under nnx.eval_shape yourself.")
  build = lambda cfg, s: shapes_of(cfg, s) if shapes_only else Transformer(cfg, rngs=nnx.Rngs(s))
  if preset is not None:
    if not tokenizer:
      raise ValueError(f"preset {preset!r} needs tokenizer=<name or path> for its vocabulary.")
    tok = load_tokenizer(resolve(tokenizer))
    model = build(lm_config.preset(preset, vocab_size=len(tok), dtype=dtype), seed)
  elif str(name_or_path).startswith("tiny:"):
    cfg = lm_config.preset("tiny", max_seq_len=512, dtype=dtype, param_dtype=dtype)
    model = build(cfg, int(str(name_or_path).split(":")[1]))
    tok = vocab.ByteTokenizer()
  elif runs.is_pretrain_run(name_or_path):
    model, tok, _ = runs.load_run(name_or_path, shapes_only=shapes_only)
  else:
    model, tok = load_pretrained(name_or_path, dtype=dtype, shapes_only=shapes_only)
    if tokenizer:
      tok = load_tokenizer(resolve(tokenizer))
  if adapter:
    lora.load_peft(model, adapter)
  if reward_head:
    model = heads.load_head(heads.RewardModel(model, rngs=nnx.Rngs(seed)), reward_head)
  return model, tok
