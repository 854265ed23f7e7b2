"""Real text sources, offline first: `../shared/data` files, else the same data by its hub name."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
  """`$POSTLAB_DATA`, or `../shared/data` beside the repository; None where absent."""
  env = os.environ.get("POSTLAB_DATA")
  for candidate in ([Path(env)] if env else []) + [REPO_ROOT.parent / "shared" / "data",
                                                   Path.cwd().parent / "shared" / "data"]:
    if candidate.is_dir():
      return candidate
  return None


def shared_file(rel: str) -> Path | None:
  """`shared_data_dir()/rel` where that file exists, else None."""
  root = shared_data_dir()
  path = root / rel if root else None
  return path if path is not None and path.exists() else None


def open_text(path: Path) -> str:
  """The text of a file, gunzipped when its name ends in .gz."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt", encoding="utf-8") as fh:
    return fh.read()


def read_rows(path: Path) -> list:
  """Rows of a local `.json` (one list) or `.jsonl` file, either optionally gzipped."""
  text = open_text(Path(path))
  if text.lstrip().startswith("["):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_instructions(source: str = "alpaca_eval", n: int | None = None) -> list[str]:
  """Instruction strings: `alpaca_eval`, `alpaca_cleaned`, or a local .json/.jsonl(.gz) path.

  Local files are lists/lines of objects with an `instruction` (or `prompt`/`question`) field.
  """
  if source == "alpaca_eval":
    path = shared_file("alpaca-eval/outputs.json.gz")
    if path is not None:
      rows = json.loads(open_text(path))
    else:
      import datasets

      rows = datasets.load_dataset("tatsu-lab/alpaca_eval", "alpaca_eval", split="eval")
  elif source == "alpaca_cleaned":
    import datasets

    try:
      rows = datasets.load_dataset("yahma/alpaca-cleaned", split="train")
      rows = [r for r in rows if not r["input"]]  # instruction-only rows need no context
    except Exception as e:  # offline: the AlpacaEval instructions are the closest real set
      if shared_file("alpaca-eval/outputs.json.gz") is None:
        raise
      log.warning("yahma/alpaca-cleaned unavailable (%s); using AlpacaEval instructions", e)
      return load_instructions("alpaca_eval", n)
  else:
    path = Path(source)
    if not path.exists():
      raise FileNotFoundError(
          f"prompt source {source!r} is neither 'alpaca_eval', 'alpaca_cleaned' nor an existing file.")
    rows = read_rows(path)
  out = []
  for i, r in enumerate(rows):
    value = next((r[k] for k in ("instruction", "prompt", "question") if k in r), None)
    if not isinstance(value, str):
      raise ValueError(f"{source}: row {i} has no string 'instruction'/'prompt'/'question' field.")
    out.append(value)
    if n is not None and len(out) >= n:
      break
  return out


def load_wikitext(split: str = "test") -> str:
  """WikiText-2 (tokenized release, as in ../shared/data) joined into one string."""
  path = shared_file(f"wikitext-2/wiki.{split}.tokens.gz")
  if path is not None:
    return open_text(path)
  import datasets

  ds = datasets.load_dataset("wikitext", "wikitext-2-v1", split=split)
  return "".join(ds["text"])
