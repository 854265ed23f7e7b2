"""Alignment data sources: raw rows by local path, HF hub name or offline alias, normalised to one
record schema per kind (malformed rows raise `MalformedRowError` or are counted), and a seeded
held-out split.

Record schemas after normalisation:
  preference: {"prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str}
  sft:        {"prompt": [{"role", "content"}, ...], "response": str}
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from lm.data import read_rows, shared_file
from lm.data.sources import DataFileError, UnreadableLine

log = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("hh_rlhf", "orca", "ultrafeedback", "triple")
SFT_FORMATS = ("alpaca", "prompt_response", "messages") + PREFERENCE_FORMATS
TRUNCATION_MODES = ("keep_response", "drop")
_HH_OFFLINE = "hh-rlhf/harmless-base-test.jsonl.gz"
# lower-cased source name -> shared-data file with the same (or a subset of the same) data
_OFFLINE = {"hh-rlhf": _HH_OFFLINE, "anthropic/hh-rlhf": _HH_OFFLINE}
# source name -> "module:function(split) -> rows": data sets built from shared-data files
_DERIVED = {"gsm8k-verifier": "align.verifier:training_pairs"}
_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = ("system", "user", "assistant")
MAX_LISTED = 10  # row indices a log line or stats entry lists


class MalformedRowError(ValueError):
  """A source row that cannot be normalised; names the row index, the field and the problem (and
  the source, where the caller gives it)."""

  def __init__(self, index: int, field: str, problem: str, source: str | None = None):
    super().__init__(f"{source + ': ' if source else ''}row {index}: field {field!r}: {problem}")
    self.index, self.field, self.problem = index, field, problem


class DatasetUnavailableError(RuntimeError):
  """A dataset name with neither hub access nor an offline copy; the message says the fix."""


def _hub_worth_trying(timeout_s: float = 3.0) -> bool:
  """Whether to call `datasets` at all: offline it retries for ~30 s before failing, so a quick
  TCP probe decides, except in HF offline mode (a fast cache read) or behind a proxy."""
  if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
    return True
  if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
    return True  # only the proxy can tell; let `datasets` try
  host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _offline_rows(source: str, split: str) -> list | None:
  rel = _OFFLINE.get(source.lower())
  path = shared_file(rel) if rel else None
  if path is None:
    return None
  log.warning("%s: using the offline copy %s (hh-rlhf harmless-base test split, 2312 pairs)%s",
              source, path, "" if split == "test" else f"; split={split!r} is not applied")
  return read_rows(path)


def load_records(source: str, *, split: str = "train", n: int | None = None,
                 on_error: str = "fail") -> list[dict]:
  """The first `n` raw rows of a local `.json`/`.jsonl`(`.gz`) file, an HF dataset or an alias.

  A local file's line that is not JSON raises DataFileError naming the file, the line and the fix,
  or with `on_error="skip"` stays in its row's place as an `UnreadableLine`, which
  `normalize_rows` leaves out and counts.

  HF names ("Anthropic/hh-rlhf", "Intel/orca_dpo_pairs", "HuggingFaceH4/ultrafeedback_binarized"
  with split "train_prefs", "yahma/alpaca-cleaned", ...) load through `datasets.load_dataset`.
  "hh-rlhf" (and "Anthropic/hh-rlhf" where the hub is unreachable) is the offline shared-data
  file `hh-rlhf/harmless-base-test.jsonl.gz` whatever `split` says; "gsm8k-verifier" is the
  verifier's (correct, incorrect) solution pairs (`align.verifier.training_pairs`).
  """
  path = Path(os.path.expanduser(source))
  if path.exists():
    try:
      rows = read_rows(path, on_error=on_error)
    except DataFileError as e:
      if not e.skippable:
        raise
      raise DataFileError(e.path, e.problem, f"{e.fix}, or set data.on_error=skip to leave "
                          "such lines out (counted in the data stats)", e.line) from None
  elif source.endswith((".json", ".jsonl", ".gz")):
    raise FileNotFoundError(f"data file {source!r} does not exist.")
  elif source.lower() in _DERIVED:
    import importlib

    module, fn = _DERIVED[source.lower()].split(":")
    rows = getattr(importlib.import_module(module), fn)(split)
  elif source.lower() == "hh-rlhf":
    rows = _offline_rows(source, split)
    if rows is None:
      raise DatasetUnavailableError(
          f"'hh-rlhf' is the offline file {_HH_OFFLINE} under the shared data directory, which "
          "was not found. Fix: set $POSTLAB_DATA to the shared data directory, or use the hub "
          "name 'Anthropic/hh-rlhf' with hub access.")
  else:
    rows, error = None, "the hub is unreachable"
    if _hub_worth_trying():
      import datasets

      try:
        ds = datasets.load_dataset(source, split=split)
        rows = ds.select(range(min(n, len(ds)))).to_list() if n is not None else ds.to_list()
      except Exception as e:  # gated, unknown or offline: an offline copy may still serve
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if rows is None:
      rows = _offline_rows(source, split)
    if rows is None:
      raise DatasetUnavailableError(
          f"dataset {source!r} (split {split!r}) could not be loaded ({error}) and has no "
          f"offline copy (offline names: {sorted(_OFFLINE)}). Fix: run with hub access (or with "
          "HF_HUB_OFFLINE=1 and a warm HF datasets cache), or pass a local .json/.jsonl(.gz) file of the same rows.")
  return list(rows[:n] if n is not None else rows)


def _text(row: dict, index: int, field: str, *, optional: bool = False, strip: bool = True) -> str:
  """`row[field]` (stripped); a missing, non-string or blank value is malformed unless optional."""
  value = row.get(field)
  if value is None and optional:
    return ""
  if field not in row:
    raise MalformedRowError(index, field, "missing")
  if not isinstance(value, str):
    raise MalformedRowError(index, field, f"expected a string, got {type(value).__name__}")
  if not value.strip() and not optional:
    raise MalformedRowError(index, field, "empty")
  return value.strip() if strip else value


def _messages(value, index: int, field: str) -> list[dict]:
  """A validated copy of a chat message list (roles system/user/assistant, non-empty text)."""
  if not isinstance(value, list) or not value:
    raise MalformedRowError(index, field, "expected a non-empty list of messages")
  out = []
  for m in value:
    if not isinstance(m, dict) or m.get("role") not in _ROLES:
      raise MalformedRowError(index, field, f"message without a role in {_ROLES}")
    if not isinstance(m.get("content"), str) or not m["content"].strip():
      raise MalformedRowError(index, field, "message with missing or empty content")
    out.append({"role": m["role"], "content": m["content"].strip()})
  return out


def _prompt(value, index: int, field: str = "prompt") -> list[dict]:
  """A prompt given as a string (one user turn) or as a message list ending with a user turn."""
  if isinstance(value, str):
    return [{"role": "user", "content": _text({field: value}, index, field)}]
  messages = _messages(value, index, field)
  if messages[-1]["role"] != "user":
    raise MalformedRowError(index, field, "prompt does not end with a user message")
  return messages


def _hh_split(dialogue: str, index: int, field: str) -> tuple[str, str]:
  """(dialogue before the last Assistant turn, that turn's reply stripped)."""
  cut = dialogue.rfind(_ASSISTANT)
  if cut < 0:
    raise MalformedRowError(index, field, "no '\\n\\nAssistant:' turn")
  reply = dialogue[cut + len(_ASSISTANT):].strip()
  if not reply:
    raise MalformedRowError(index, field, "empty final Assistant reply")
  return dialogue[:cut], reply


def _hh_messages(prefix: str, index: int) -> list[dict]:
  """Human/Assistant turns as alternating user/assistant messages ending with a user turn."""
  parts = _HH_TURN.split(prefix)
  if parts[0].strip():
    raise MalformedRowError(index, "chosen", "text before the first '\\n\\nHuman:' turn")
  messages = []
  for speaker, content in zip(parts[1::2], parts[2::2]):
    role, content = ("user" if speaker == "Human" else "assistant"), content.strip()
    if not content:
      raise MalformedRowError(index, "chosen", f"empty {speaker} turn in the prompt")
    if messages and messages[-1]["role"] == role:  # a speaker's two turns in a row: one message
      messages[-1]["content"] += "\n\n" + content
    else:
      messages.append({"role": role, "content": content})
  if not messages or messages[-1]["role"] != "user":
    raise MalformedRowError(index, "chosen", "prompt does not end with a Human turn")
  return messages


def _detect_preference(row: dict, index: int) -> str:
  if "chosen" not in row or "rejected" not in row:
    raise MalformedRowError(index, "chosen/rejected", f"missing; row keys {sorted(row)}")
  if "question" in row:
    return "orca"
  if isinstance(row["chosen"], list):
    return "ultrafeedback"
  return "triple" if "prompt" in row else "hh_rlhf"


def normalize_preference(row: dict, index: int, fmt: str = "auto") -> dict:
  """`{"prompt": [messages], "chosen": str, "rejected": str}` of one raw preference row.

  fmt: "auto" (by keys), "hh_rlhf" ({chosen, rejected} whole dialogues, split at the last
  Assistant turn; both must share the dialogue before it), "orca" ({system, question, chosen,
  rejected}; empty system -> no system message), "ultrafeedback" ({chosen, rejected} message lists
  whose last message is the reply) or "triple" ({prompt: str | messages, chosen, rejected}).
  Raises MalformedRowError naming `index`.
  """
  if not isinstance(row, dict):
    raise MalformedRowError(index, "<row>", f"expected an object, got {type(row).__name__}")
  fmt = _detect_preference(row, index) if fmt == "auto" else fmt
  if fmt == "hh_rlhf":
    prefix_c, chosen = _hh_split(_text(row, index, "chosen", strip=False), index, "chosen")
    prefix_r, rejected = _hh_split(_text(row, index, "rejected", strip=False), index,
                                   "rejected")
    if prefix_c.strip() != prefix_r.strip():
      raise MalformedRowError(index, "chosen/rejected",
                              "dialogues differ before the last Assistant turn")
    return {"prompt": _hh_messages(prefix_c, index), "chosen": chosen, "rejected": rejected}
  if fmt == "orca":
    system = _text(row, index, "system", optional=True)
    prompt = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": _text(row, index, "question")}]
    return {"prompt": prompt, "chosen": _text(row, index, "chosen"),
            "rejected": _text(row, index, "rejected")}
  if fmt == "ultrafeedback":
    chosen, rejected = (_messages(row.get(k), index, k) for k in ("chosen", "rejected"))
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
      if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user":
        raise MalformedRowError(index, field, "expected [..., user, assistant] messages")
    if chosen[:-1] != rejected[:-1]:
      raise MalformedRowError(index, "chosen/rejected", "prompt messages differ")
    return {"prompt": chosen[:-1], "chosen": chosen[-1]["content"],
            "rejected": rejected[-1]["content"]}
  if fmt == "triple":
    if "prompt" not in row:
      raise MalformedRowError(index, "prompt", "missing")
    return {"prompt": _prompt(row["prompt"], index), "chosen": _text(row, index, "chosen"),
            "rejected": _text(row, index, "rejected")}
  raise ValueError(f"unknown preference format {fmt!r}; expected 'auto' or {PREFERENCE_FORMATS}")


def normalize_sft(row: dict, index: int, fmt: str = "auto") -> dict:
  """`{"prompt": [messages], "response": str}` of one raw SFT row.

  fmt: "auto" (by keys), "alpaca" ({instruction, input, output}; a non-empty input follows the
  instruction after a blank line), "prompt_response" ({prompt, response} or {prompt,
  completion}), "messages" ({messages}; the last, assistant, message is the response) or any
  preference format (the chosen reply is the response). Raises MalformedRowError naming `index`.
  """
  if not isinstance(row, dict):
    raise MalformedRowError(index, "<row>", f"expected an object, got {type(row).__name__}")
  if fmt == "auto":
    fmt = ("messages" if "messages" in row else "alpaca" if "instruction" in row else
           "prompt_response" if "prompt" in row and ("response" in row or "completion" in row)
           else None)
    if fmt is None and not ("chosen" in row and "rejected" in row):
      raise MalformedRowError(index, "<row>", f"no SFT schema matches keys {sorted(row)} (expected "
                              "messages, instruction/output, prompt/response|completion or "
                              "chosen/rejected)")
    fmt = fmt or _detect_preference(row, index)
  if fmt == "alpaca":
    user, extra = _text(row, index, "instruction"), _text(row, index, "input", optional=True)
    return {"prompt": [{"role": "user", "content": f"{user}\n\n{extra}" if extra else user}],
            "response": _text(row, index, "output")}
  if fmt == "prompt_response":
    if "prompt" not in row:
      raise MalformedRowError(index, "prompt", "missing")
    field = "response" if "response" in row else "completion"
    return {"prompt": _prompt(row["prompt"], index), "response": _text(row, index, field)}
  if fmt == "messages":
    messages = _messages(row.get("messages"), index, "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
      raise MalformedRowError(index, "messages", "expected prompt messages then an assistant reply")
    return {"prompt": _prompt(messages[:-1], index, "messages"),
            "response": messages[-1]["content"]}
  if fmt in PREFERENCE_FORMATS:
    pair = normalize_preference(row, index, fmt)
    return {"prompt": pair["prompt"], "response": pair["chosen"]}
  raise ValueError(f"unknown SFT format {fmt!r}; expected 'auto' or {SFT_FORMATS}")


def normalize_rows(rows: list, *, kind: str, fmt: str = "auto",
                   on_error: str = "fail", source: str | None = None) -> tuple[list[dict], dict]:
  """Normalised records and stats of raw rows; kind "sft" | "preference".

  on_error="fail" raises the first MalformedRowError (naming `source` when given); "skip" leaves
  malformed rows out, counts them in the stats (`n_malformed`, first indices, problems by field)
  and logs a warning. A file's line that was not JSON (`UnreadableLine`) is a malformed row.
  """
  if on_error not in ("fail", "skip"):
    raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
  normalize = {"sft": normalize_sft, "preference": normalize_preference}[kind]
  records, bad, lines, problems = [], [], [], collections.Counter()
  for i, row in enumerate(rows):
    try:
      if isinstance(row, UnreadableLine):
        lines.append(row.line)
        raise MalformedRowError(i, "<line>", "not valid JSON")
      records.append(normalize(row, i, fmt))
    except MalformedRowError as e:
      if on_error == "fail":
        raise MalformedRowError(e.index, e.field, e.problem + " (on_error='skip' skips and "
                                "counts malformed rows)", source) from None
      bad.append(i)
      problems[f"{e.field}: {e.problem}"] += 1
  if bad:
    log.warning("skipped %d malformed of %d rows (indices %s%s): %s", len(bad), len(rows),
                bad[:MAX_LISTED], " ..." if len(bad) > MAX_LISTED else "", dict(problems))
  stats = {"n_rows": len(rows), "n_records": len(records), "n_malformed": len(bad),
           "malformed_indices": bad[:MAX_LISTED], "malformed_problems": dict(problems)}
  if lines:  # the file's lines (1-based) that were not JSON
    stats["unreadable_lines"] = lines[:MAX_LISTED]
  return records, stats


def split_holdout(records: list, n_eval: int, seed: int) -> tuple[list, list]:
  """(train, eval): `n_eval` records drawn by `seed`, both in source order; deterministic."""
  if not 0 <= n_eval < len(records):
    raise ValueError(f"data.n_eval={n_eval} must be in [0, {len(records)}) for {len(records)} "
                     "records (it leaves at least one to train on); lower data.n_eval")
  held = set(np.random.default_rng(seed).permutation(len(records))[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])
