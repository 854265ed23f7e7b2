"""Real text sources, offline first: `../shared/data` files, else the same data by its hub name."""

from __future__ import annotations

import dataclasses
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


class DataFileError(ValueError):
  """A local data file that cannot be read as rows: names the file, the line (1-based, in the
  file) where there is one, what is wrong and the fix. `skippable`: a JSONL line that is not
  JSON, which `read_rows(..., on_error="skip")` would have left out."""

  def __init__(self, path, problem: str, fix: str, line: int | None = None, *,
               skippable: bool = False):
    where = f"{path}, line {line}" if line is not None else f"{path}"
    super().__init__(f"{where}: {problem}.\nFix: {fix}.")
    self.path, self.problem, self.fix, self.line = path, problem, fix, line
    self.skippable = skippable


@dataclasses.dataclass(frozen=True)
class UnreadableLine:
  """A JSONL line that is not valid JSON, in place of its row when `read_rows` skips such lines:
  the caller counts it where it counts malformed rows."""

  path: str
  line: int
  problem: str


def open_text(path: Path) -> str:
  """The text of a file, gunzipped when its name ends in .gz (a leading UTF-8 byte-order mark is
  dropped). A file that is not UTF-8, or not gzip though named so, raises DataFileError naming
  the line of the first bad byte."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rt", encoding="utf-8-sig") as fh:
      return fh.read()
  except UnicodeDecodeError:
    with opener(path, "rb") as fh:  # text mode decodes in chunks: find the byte in the file
      data = fh.read()
    try:
      data.decode("utf-8")
      start = 0
    except UnicodeDecodeError as e:
      start = e.start
    raise DataFileError(path, f"not UTF-8 text (byte 0x{data[start]:02x})",
                        "save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > NEW`",
                        data.count(b"\n", 0, start) + 1) from None
  except (gzip.BadGzipFile, EOFError) as e:
    raise DataFileError(path, f"not a whole gzip file ({e})",
                        "recreate it with gzip, or drop the .gz suffix if it is plain text"
                        ) from None


def read_rows(path: Path, *, on_error: str = "fail") -> list:
  """Rows of a local `.json` (one list) or `.jsonl` file, either optionally gzipped.

  A JSONL line that is not JSON raises DataFileError naming the file and the line, or with
  `on_error="skip"` comes back as an `UnreadableLine` in its row's place (the caller leaves it
  out and counts it). A file without rows raises DataFileError.
  """
  path = Path(path)
  text = open_text(path)
  if text.lstrip().startswith("["):
    try:
      rows = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataFileError(path, f"not valid JSON ({e.msg}, column {e.colno})",
                          "correct the file: a .json file is one JSON list of rows", e.lineno
                          ) from None
  else:
    rows = []
    # "\n" alone ends a line, as in the file (str.splitlines also splits at U+2028 and others,
    # which JSON strings may hold)
    for number, line in enumerate(text.split("\n"), 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg}, column {e.colno})"
        if on_error != "skip":
          raise DataFileError(path, problem, "correct or delete the line", number,
                              skippable=True) from None
        rows.append(UnreadableLine(str(path), number, problem))
  if not rows:
    raise DataFileError(path, "holds no records (" + ("an empty list)" if text.strip() else
                                                      "the file is empty)"),
                        "fill it with one JSON object per line (.jsonl) or one JSON list of "
                        "objects (.json), or point the config at another file")
  return rows


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
