"""Alignment data: SFT, reward-model and DPO examples as static-shape numpy batches through grain.

Pipeline: `load_records` (local file, HF hub name, offline alias) -> `normalize_rows` (one schema
per kind, malformed rows raise or are counted) -> `split_holdout` -> `encode_sft` /
`encode_preference` (chat template, truncation) -> `pad_examples` (static length S) ->
`make_dataset` (grain: shuffle, repeat, optional packing, batch; checkpointable iterator).
`build(data_cfg, tokenizer, kind)` runs all of it from a `default_config()` ConfigDict.

Record schemas after normalisation:
  preference: {"prompt": [{"role", "content"}, ...], "chosen": str, "rejected": str}
  sft:        {"prompt": [{"role", "content"}, ...], "response": str}
Example arrays (right-padded, pad id 0, `attn_mask` 1 = real token):
  sft:        tokens int32 [S], attn_mask int32 [S], loss_mask float32 [S]
  packed sft: the same plus segment_ids int32 [S] (1, 2, ...; 0 = pad), positions int32 [S]
  preference: tokens int32 [2, S] (0 = chosen, 1 = rejected), attn_mask [2, S], loss_mask [2, S]
  shared-prompt preference batch (`share_prompts`, rows R x width W, B pairs): each pair is one
              segment [prompt | chosen reply | rejected reply] packed into rows: tokens, positions,
              pair_ids (1.. per pair; 0 = pad), branch (0 prompt, 1 chosen, 2 rejected), prev (the
              row index whose hidden state predicts this token), loss_mask, attn_mask [R, W];
              pair_mask float32 [B]
`loss_mask[t] = 1` marks token t as a prediction target (a response token): the loss weights
`logits[:, :-1]` against `tokens[:, 1:]` by `loss_mask[:, 1:]`. Position 0 (and the first token of
every packed segment) is never a target.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import grain
import ml_collections
import numpy as np

from lm.data import read_rows, shared_file

log = logging.getLogger(__name__)

PREFERENCE_FORMATS = ("hh_rlhf", "orca", "ultrafeedback", "triple")
SFT_FORMATS = ("alpaca", "prompt_response", "messages") + PREFERENCE_FORMATS
TRUNCATION_MODES = ("keep_response", "drop")
_HH_OFFLINE = "hh-rlhf/harmless-base-test.jsonl.gz"
# lower-cased source name -> shared-data file with the same (or a subset of the same) data
_OFFLINE = {"hh-rlhf": _HH_OFFLINE, "anthropic/hh-rlhf": _HH_OFFLINE}
_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = ("system", "user", "assistant")
_MAX_LISTED = 10


class MalformedRowError(ValueError):
  """A source row that cannot be normalised; names the row index, the field and the problem."""

  def __init__(self, index: int, field: str, problem: str):
    super().__init__(f"row {index}: field {field!r}: {problem}")
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


def load_records(source: str, *, split: str = "train", n: int | None = None) -> list[dict]:
  """The first `n` raw rows of a local `.json`/`.jsonl`(`.gz`) file, an HF dataset or an alias.

  HF names ("Anthropic/hh-rlhf", "Intel/orca_dpo_pairs", "HuggingFaceH4/ultrafeedback_binarized"
  with split "train_prefs", "yahma/alpaca-cleaned", ...) load through `datasets.load_dataset`.
  "hh-rlhf" (and "Anthropic/hh-rlhf" where the hub is unreachable) is the offline shared-data
  file `hh-rlhf/harmless-base-test.jsonl.gz` whatever `split` says.
  """
  path = Path(os.path.expanduser(source))
  if path.exists():
    rows = read_rows(path)
  elif source.endswith((".json", ".jsonl", ".gz")):
    raise FileNotFoundError(f"data file {source!r} does not exist.")
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
                   on_error: str = "fail") -> tuple[list[dict], dict]:
  """Normalised records and stats of raw rows; kind "sft" | "preference".

  on_error="fail" raises the first MalformedRowError; "skip" leaves malformed rows out, counts them
  in the stats (`n_malformed`, first indices, problems by field) and logs a warning.
  """
  if on_error not in ("fail", "skip"):
    raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
  normalize = {"sft": normalize_sft, "preference": normalize_preference}[kind]
  records, bad, problems = [], [], collections.Counter()
  for i, row in enumerate(rows):
    try:
      records.append(normalize(row, i, fmt))
    except MalformedRowError as e:
      if on_error == "fail":
        raise MalformedRowError(e.index, e.field, e.problem + " (on_error='skip' skips and "
                                "counts malformed rows)") from None
      bad.append(i)
      problems[f"{e.field}: {e.problem}"] += 1
  if bad:
    log.warning("skipped %d malformed of %d rows (indices %s%s): %s", len(bad), len(rows),
                bad[:_MAX_LISTED], " ..." if len(bad) > _MAX_LISTED else "", dict(problems))
  stats = {"n_rows": len(rows), "n_records": len(records), "n_malformed": len(bad),
           "malformed_indices": bad[:_MAX_LISTED], "malformed_problems": dict(problems)}
  return records, stats


def split_holdout(records: list, n_eval: int, seed: int) -> tuple[list, list]:
  """(train, eval): `n_eval` records drawn by `seed`, both in source order; deterministic."""
  if not 0 <= n_eval < len(records):
    raise ValueError(f"n_eval={n_eval} must be in [0, {len(records)}) for {len(records)} records")
  held = set(np.random.default_rng(seed).permutation(len(records))[:n_eval].tolist())
  return ([r for i, r in enumerate(records) if i not in held],
          [r for i, r in enumerate(records) if i in held])


def _plain_prompt(messages: list[dict]) -> str:
  names = {"system": "System", "user": "User", "assistant": "Assistant"}
  return "".join(f"{names[m['role']]}: {m['content']}\n" for m in messages) + "Assistant: "


def _render(tokenizer, prompt: list[dict], replies: list[str]) -> list[str]:
  """[prompt text, response text per reply]. A response is the template's rendering of the reply
  through its end-of-turn token (`Hello!<|im_end|>` for SmolLM2).

  Without a chat template: "System: ...\\nUser: ...\\nAssistant: " and reply + EOS token.
  """
  if not getattr(tokenizer, "chat_template", None):
    return [_plain_prompt(prompt)] + [r + (tokenizer.eos_token or "\n") for r in replies]
  head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  out = [head]
  for reply in replies:
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}],
                                         tokenize=False)
    if not full.startswith(head):
      raise ValueError("the chat template renders the prompt differently once the reply is added; "
                       "prompt/response tokens cannot be separated for this tokenizer.")
    out.append(full[len(head):].rstrip())  # whitespace after the end-of-turn is never generated
  return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
  return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _fit(prompt: list[int], responses: list[list[int]], max_length: int,
         max_prompt_length: int | None, truncation: str) -> tuple | None:
  """(prompt, responses, prompt_cut, response_cut) within the limits, or None to drop the row.

  keep_response: the prompt keeps its END (cut from the left) to `max_prompt_length` and then to
  what the longest response leaves of `max_length`; only a response longer than `max_length - 1`
  is itself cut at its end (one prompt token always stays as the first response token's context).
  """
  longest = max(len(r) for r in responses)
  too_long = len(prompt) + longest > max_length or (
      max_prompt_length is not None and len(prompt) > max_prompt_length)
  if truncation == "drop":
    return None if too_long else (prompt, responses, False, False)
  keep = len(prompt) if max_prompt_length is None else min(len(prompt), max_prompt_length)
  keep = min(keep, max(max_length - longest, 1))
  cut_prompt, prompt = keep < len(prompt), prompt[len(prompt) - keep:]
  room = max_length - len(prompt)
  return prompt, [r[:room] for r in responses], cut_prompt, longest > room


def _encode_records(records, tokenizer, replies_of, *, max_length, max_prompt_length,
                    truncation) -> tuple[list[tuple], dict]:
  """[(prompt ids, [response ids])] after truncation, and the truncation/drop stats."""
  if truncation not in TRUNCATION_MODES:
    raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
  from lm.hub import stop_ids

  if not records:
    return [], {"n_examples": 0, "n_dropped_too_long": 0, "dropped_indices": [],
                "n_prompt_truncated": 0, "n_response_truncated": 0}
  texts = [_render(tokenizer, r["prompt"], replies_of(r)) for r in records]
  width = len(texts[0])
  ids = _encode(tokenizer, [t for group in texts for t in group])
  stops, eos = set(stop_ids(tokenizer)), tokenizer.eos_token_id
  out, dropped, n_cut_prompt, n_cut_response = [], [], 0, 0
  for i in range(len(records)):
    prompt, responses = ids[i * width], ids[i * width + 1:(i + 1) * width]
    if eos is not None:  # every response ends its turn, whatever the template renders
      responses = [r if r and r[-1] in stops else r + [eos] for r in responses]
    fitted = _fit(prompt, responses, max_length, max_prompt_length, truncation)
    if fitted is None:
      dropped.append(i)
      continue
    prompt, responses, cut_prompt, cut_response = fitted
    n_cut_prompt, n_cut_response = n_cut_prompt + cut_prompt, n_cut_response + cut_response
    out.append((prompt, responses))
  if dropped:
    log.warning("dropped %d of %d records longer than max_length=%d / max_prompt_length=%s "
                "(indices %s)", len(dropped), len(records), max_length, max_prompt_length,
                dropped[:_MAX_LISTED])
  stats = {"n_examples": len(out), "n_dropped_too_long": len(dropped),
           "dropped_indices": dropped[:_MAX_LISTED], "n_prompt_truncated": n_cut_prompt,
           "n_response_truncated": n_cut_response}
  return out, stats


def _row(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
  loss_t = np.array([0.0] * len(prompt) + [1.0] * len(response), np.float32)
  loss_t[0] = 0.0  # token 0 has no context: never a target
  return np.array(prompt + response, np.int32), loss_t


def encode_sft(records: list[dict], tokenizer, *, max_length: int,
               max_prompt_length: int | None = None,
               truncation: str = "keep_response") -> tuple[list[dict], dict]:
  """Unpadded SFT examples {tokens int32 [L], attn_mask int32 [L], loss_mask float32 [L]}, stats.

  L <= max_length. truncation "keep_response" (default): the prompt is cut from the left (its end
  is kept) and the response's end is cut only when the response alone exceeds max_length - 1;
  "drop": rows over either limit are left out and counted (`n_dropped_too_long`).
  """
  pairs, stats = _encode_records(records, tokenizer, lambda r: [r["response"]],
                                 max_length=max_length, max_prompt_length=max_prompt_length,
                                 truncation=truncation)
  out = []
  for prompt, (response,) in pairs:
    tokens_l, loss_l = _row(prompt, response)
    out.append({"tokens": tokens_l, "attn_mask": np.ones_like(tokens_l), "loss_mask": loss_l})
  return out, stats


def encode_preference(records: list[dict], tokenizer, *, max_length: int,
                      max_prompt_length: int | None = None,
                      truncation: str = "keep_response") -> tuple[list[dict], dict]:
  """Unpadded pairs {tokens int32 [2, L], attn_mask int32 [2, L], loss_mask float32 [2, L]}, stats.

  Row 0 is chosen, row 1 rejected; both start with the same (identically truncated) prompt
  tokens and are right-padded to the longer of the two. Truncation as in `encode_sft`, with the
  longer reply deciding how much prompt fits.
  """
  pairs, stats = _encode_records(records, tokenizer, lambda r: [r["chosen"], r["rejected"]],
                                 max_length=max_length, max_prompt_length=max_prompt_length,
                                 truncation=truncation)
  out = []
  for prompt, responses in pairs:
    rows = [_row(prompt, r) for r in responses]
    length = max(len(t) for t, _ in rows)
    ex = {"tokens": np.zeros((2, length), np.int32), "attn_mask": np.zeros((2, length), np.int32),
          "loss_mask": np.zeros((2, length), np.float32)}
    for j, (tokens_l, loss_l) in enumerate(rows):
      ex["tokens"][j, :len(tokens_l)], ex["loss_mask"][j, :len(loss_l)] = tokens_l, loss_l
      ex["attn_mask"][j, :len(tokens_l)] = 1
    out.append(ex)
  return out, stats


def sequence_length(examples: list[dict], max_length: int, multiple: int = 0) -> int:
  """Static S: `max_length`, or (multiple > 0) the longest example rounded up to `multiple`,
  at most `max_length`."""
  if multiple <= 0:
    return max_length
  longest = max((ex["tokens"].shape[-1] for ex in examples), default=1)
  return min(max_length, -(-longest // multiple) * multiple)


def pad_examples(examples: list[dict], seq_len: int) -> list[dict]:
  """Every array right-padded with zeros on its last axis to `seq_len` (pad token id 0)."""
  out = []
  for ex in examples:
    length = ex["tokens"].shape[-1]
    if length > seq_len:
      raise ValueError(f"example of length {length} exceeds seq_len={seq_len}")
    out.append({k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, seq_len - length)])
                for k, v in ex.items()})
  return out


def _unpad(ex: dict) -> dict:
  length = int(ex["attn_mask"].sum())
  return {"tokens": ex["tokens"][:length], "loss_mask": ex["loss_mask"][:length]}


def _packed_fields(ex: dict) -> dict:
  seg_s = ex["tokens_segment_ids"].astype(np.int32)
  return {"tokens": ex["tokens"], "attn_mask": (seg_s > 0).astype(np.int32),
          "loss_mask": ex["loss_mask"], "segment_ids": seg_s,
          "positions": ex["tokens_positions"].astype(np.int32)}


def make_dataset(examples: list[dict], *, batch_size: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, pack: bool = False,
                 num_packing_bins: int | None = None) -> grain.IterDataset:
  """A grain dataset of batches: dicts of numpy arrays with a leading batch axis B.

  `examples` are padded (`pad_examples`), all the same length S. Order: a seeded shuffle per
  epoch (`grain.MapDataset.shuffle`, reseeded each epoch by `repeat`); num_epochs=None repeats
  forever; a last partial batch is dropped (static shapes). `iter(ds).get_state()` is a small dict
  of ints that survives `json.dumps`/`loads`; `set_state` on a new iterator resumes exactly.

  pack=True (SFT only): examples are unpadded and packed into rows of S by grain's
  `grain.experimental.FirstFitPackIterDataset` (first fit over `num_packing_bins`, default
  `batch_size`, bins shuffled by `seed`); rows add segment_ids (1, 2, ...; 0 = pad) and positions
  restarting at 0 per segment.
  """
  if not examples:
    raise ValueError("make_dataset needs at least one example")
  ds = grain.MapDataset.source(examples)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  # the examples are in memory: reading threads would only contend for the GIL
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  if not pack:
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(read)
  if examples[0]["tokens"].ndim != 1:
    raise ValueError("packing is for SFT examples (tokens [S]); preference pairs are not packed")
  seq_len = examples[0]["tokens"].shape[-1]
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.map(_unpad).to_iter_dataset(read), length_struct={"tokens": seq_len, "loss_mask": seq_len},
      num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=shuffle)
  return packed.map(_packed_fields).batch(batch_size, drop_remainder=True)


class LayoutOverflowError(ValueError):
  """A batch's shared-prompt segments do not fit the planned rows x width."""


def _shared_segment(tokens_2s: np.ndarray, attn_2s: np.ndarray, loss_2s: np.ndarray) -> dict:
  """One pair as [prompt | chosen reply | rejected reply]: the prompt is the common prefix of
  both rows before either's first loss token, stored once."""
  lc, lr = (int(n) for n in attn_2s.sum(-1))
  first = [int(np.argmax(loss_2s[j, :n] > 0)) if (loss_2s[j, :n] > 0).any() else n
           for j, n in ((0, lc), (1, lr))]
  p = min(first)
  differ = np.flatnonzero(tokens_2s[0, :p] != tokens_2s[1, :p])
  p = int(differ[0]) if differ.size else p
  idx_c, idx_r = np.arange(lc), np.arange(p, lr)
  # hidden state predicting each token: the one before it in its own branch; the rejected reply's
  # first token is predicted from the prompt's last (p - 1); without a prompt it is no target.
  prev_r = lc + np.arange(lr - p) - 1
  if lr > p:
    prev_r[0] = p - 1 if p else lc
  return {
      "tokens": np.concatenate([tokens_2s[0, :lc], tokens_2s[1, p:lr]]),
      "positions": np.concatenate([idx_c, idx_r]),
      "branch": np.concatenate([np.zeros(p), np.ones(lc - p), np.full(lr - p, 2)]),
      "prev": np.concatenate([np.maximum(idx_c - 1, 0), prev_r]),
      "loss_mask": np.concatenate([loss_2s[0, :lc], loss_2s[1, p:lr]]),
  }


def _first_fit_decreasing(lengths: list[int], rows: int, width: int) -> list[tuple[int, int]]:
  """(row, offset) per length; LayoutOverflowError when they do not fit `rows` x `width`."""
  free = [width] * rows
  place = [(0, 0)] * len(lengths)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    row = next((r for r in range(rows) if free[r] >= lengths[i]), None)
    if row is None:
      raise LayoutOverflowError(
          f"shared-prompt segments of lengths {sorted(lengths, reverse=True)} do not fit "
          f"{rows} rows x {width} tokens; plan the layout with plan_shared_layout over these "
          "batches (or raise data.share_prompt_width)")
    place[i] = (row, width - free[row])
    free[row] -= lengths[i]
  return place


def _segments_by_group(batch: dict, groups: int) -> list[list[dict]]:
  """`_shared_segment` of every pair, split into `groups` consecutive groups of B / groups."""
  b = batch["tokens"].shape[0]
  if b % groups:
    raise ValueError(f"{b} pairs must split into grad_accum={groups} groups")
  per = b // groups
  return [[_shared_segment(batch["tokens"][i], batch["attn_mask"][i], batch["loss_mask"][i])
           for i in range(g * per, (g + 1) * per)] for g in range(groups)]


def share_prompts(batch: dict, *, rows: int, width: int, groups: int = 1) -> dict:
  """A preference batch (`[B, 2, S]` arrays) in the shared-prompt layout (module docstring).

  Chosen and rejected share their prompt's tokens, so the forward runs P + C + R positions per
  pair instead of 2 (P + max(C, R)); log-probs are identical (same visible context and RoPE
  positions). `groups` (the gradient-accumulation count) packs each consecutive B / groups
  pairs into their own R / groups rows, with pair ids local to the group, so splitting every
  array along its first axis gives self-contained micro-batches. `ref_logps` passes through.
  """
  b = batch["tokens"].shape[0]
  if rows % groups:
    raise ValueError(f"{rows} rows must split into grad_accum={groups} groups")
  out = {k: np.zeros((rows, width), np.int32) for k in ("tokens", "positions", "pair_ids",
                                                       "branch", "prev")}
  out["loss_mask"] = np.zeros((rows, width), np.float32)
  rows_per = rows // groups
  for g, segs in enumerate(_segments_by_group(batch, groups)):
    place = _first_fit_decreasing([len(s["tokens"]) for s in segs], rows_per, width)
    for j, (seg, (row, off)) in enumerate(zip(segs, place)):
      r, sl = g * rows_per + row, slice(off, off + len(seg["tokens"]))
      for k in ("tokens", "positions", "branch", "loss_mask"):
        out[k][r, sl] = seg[k]
      out["prev"][r, sl] = seg["prev"] + off
      out["pair_ids"][r, sl] = j + 1
  out["attn_mask"] = (out["pair_ids"] > 0).astype(np.int32)
  out["pair_mask"] = np.ones((b,), np.float32)
  if "ref_logps" in batch:
    out["ref_logps"] = batch["ref_logps"]
  return out


def plan_shared_layout(batches, *, groups: int = 1, multiple: int = 1, width: int = 0,
                       width_multiple: int = 64) -> tuple[int, int]:
  """(rows, width) that every batch in `batches` fits in the shared-prompt layout: width (0 =
  the longest segment rounded up to `width_multiple`) and the most rows first-fit-decreasing
  needs for any group, times `groups`, rounded up to `multiple` (the data-parallel size)."""
  lengths = [[len(seg["tokens"]) for seg in segs]
             for batch in batches for segs in _segments_by_group(batch, groups)]
  if not lengths:
    raise ValueError("plan_shared_layout needs at least one batch")
  longest = max(max(ls) for ls in lengths)
  width = width or -(-longest // width_multiple) * width_multiple
  if longest > width:
    raise ValueError(f"data.share_prompt_width={width} is shorter than the longest pair "
                     f"({longest} tokens as prompt + chosen + rejected); raise it or set 0")
  rows_per = 1
  for ls in lengths:
    while True:
      try:
        _first_fit_decreasing(ls, rows_per, width)
        break
      except LayoutOverflowError:
        rows_per += 1
  rows_per = -(-rows_per // multiple) * multiple
  return rows_per * groups, width


def eval_batches(examples: list[dict], batch_size: int) -> Iterator[dict]:
  """Every example once, in order, in batches of static shape; the last batch is filled with
  all-zero rows (attn_mask and loss_mask 0), so weight per-row metrics by `attn_mask.any(-1)`."""
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    chunk = chunk + [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - len(chunk))
    yield {k: np.stack([ex[k] for ex in chunk]) for k in chunk[0]}


def default_config() -> ml_collections.ConfigDict:
  """Data settings read by `build`; configs/*.py start from this and override fields."""
  c = ml_collections.ConfigDict()
  c.source = "hh-rlhf"  # local .json/.jsonl(.gz) path, HF dataset name, or offline "hh-rlhf"
  c.split = "train"  # HF split (ultrafeedback_binarized: "train_prefs"); ignored by files
  c.n = ml_collections.config_dict.placeholder(int)  # first n raw rows; None = all
  c.format = "auto"  # see normalize_sft / normalize_preference
  c.on_error = "fail"  # "skip": malformed rows are left out, counted in stats and logged
  c.max_length = 512  # tokens per sequence, prompt + response
  c.max_prompt_length = ml_collections.config_dict.placeholder(int)  # None = only max_length
  c.truncation = "keep_response"  # or "drop" (rows over a limit are counted and left out)
  c.pad_multiple = 0  # 0: S = max_length; k > 0: S = longest example rounded up to k (<= max)
  c.pack = False  # SFT only: first-fit pack examples into rows of S
  # DPO only: each pair as one [prompt | chosen | rejected] segment packed into rows (the prompt
  # is scored once); rows x width planned over the run's batches (`plan_shared_layout`)
  c.share_prompt = False
  c.share_prompt_width = 0  # 0: the longest pair segment rounded up to 64 tokens
  c.n_eval = 64  # held-out records (drawn by seed) for eval
  c.seed = 0  # holdout draw, shuffle order, packing bins
  c.shuffle = True
  c.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
  c.batch_size = 8
  return c


def build(data_cfg: ml_collections.ConfigDict, tokenizer, kind: str, *,
          transform_train=None) -> tuple:
  """(train grain dataset, padded eval examples, stats) for kind "sft" | "preference".

  Eval examples are never packed; batch them with `eval_batches`. Stats (JSON-ready) hold the
  normalisation counts (malformed rows), truncation/drop counts per split and S.
  `transform_train(padded examples) -> examples` runs before batching (e.g. to attach DPO
  reference log-probs scored once).
  """
  if kind not in ("sft", "preference"):
    raise ValueError(f"kind must be 'sft' or 'preference', got {kind!r}")
  if data_cfg.pack and kind != "sft":
    raise ValueError("pack=True is for SFT only")
  rows = load_records(data_cfg.source, split=data_cfg.split, n=data_cfg.n)
  records, norm_stats = normalize_rows(rows, kind=kind, fmt=data_cfg.format,
                                       on_error=data_cfg.on_error)
  train_records, eval_records = split_holdout(records, data_cfg.n_eval, data_cfg.seed)
  encode = encode_sft if kind == "sft" else encode_preference
  limits = dict(max_length=data_cfg.max_length, max_prompt_length=data_cfg.max_prompt_length,
                truncation=data_cfg.truncation)
  train, train_stats = encode(train_records, tokenizer, **limits)
  evals, eval_stats = encode(eval_records, tokenizer, **limits)
  if not train:
    raise ValueError(f"no training examples left of {len(rows)} rows from {data_cfg.source!r}")
  seq_len = data_cfg.max_length if data_cfg.pack else sequence_length(
      train + evals, data_cfg.max_length, data_cfg.pad_multiple)
  train_padded = pad_examples(train, seq_len)
  if transform_train is not None:
    train_padded = transform_train(train_padded)
  train_ds = make_dataset(train_padded, batch_size=data_cfg.batch_size,
                          seed=data_cfg.seed, shuffle=data_cfg.shuffle,
                          num_epochs=data_cfg.num_epochs, pack=data_cfg.pack)
  stats = {"kind": kind, "source": data_cfg.source, "seq_len": seq_len,
           "n_train": len(train), "n_eval": len(evals), "normalize": norm_stats,
           "train": train_stats, "eval": eval_stats}
  log.info("data %s", stats)
  return train_ds, pad_examples(evals, seq_len), stats
