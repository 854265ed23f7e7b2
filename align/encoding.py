"""Normalised records -> token-id examples: the tokenizer's chat template, prompt masking and
truncation (keep the response, cut the prompt from the left; or drop).

Example arrays (unpadded here; `lm.data.batching.pad_examples` right-pads with id 0):
  sft:        tokens int32 [S], attn_mask int32 [S], loss_mask float32 [S]
  preference: tokens int32 [2, S] (0 = chosen, 1 = rejected), attn_mask [2, S], loss_mask [2, S]
`loss_mask[t] = 1` marks token t as a prediction target (a response token): the loss weights
`logits[:, :-1]` against `tokens[:, 1:]` by `loss_mask[:, 1:]`. Position 0 is never a target.
"""

from __future__ import annotations

import logging

import numpy as np

from align.records import MAX_LISTED, TRUNCATION_MODES

log = logging.getLogger(__name__)

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
                dropped[:MAX_LISTED])
  stats = {"n_examples": len(out), "n_dropped_too_long": len(dropped),
           "dropped_indices": dropped[:MAX_LISTED], "n_prompt_truncated": n_cut_prompt,
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


def longest_examples(n: int, kind: str, *, max_length: int,
                     max_prompt_length: int | None = None) -> list[dict]:
  """`n` examples of the longest shape the limits admit, no data read: a prompt of
  `max_prompt_length` tokens (half of `max_length` when unset) and replies that fill `max_length`,
  laid out as `encode_sft` / `encode_preference` lay them out (token ids are 1). The shapes of
  `launch.py --compile_only`: a packed or shared-prompt layout built from them is the largest a
  run can meet."""
  prompt_len = min(int(max_prompt_length or max_length // 2), int(max_length) - 1)
  tokens_l, loss_l = _row([1] * prompt_len, [1] * (int(max_length) - prompt_len))
  if kind == "sft":
    one = {"tokens": tokens_l, "attn_mask": np.ones_like(tokens_l), "loss_mask": loss_l}
  else:
    pair = lambda x: np.stack([x, x])
    one = {"tokens": pair(tokens_l), "attn_mask": pair(np.ones_like(tokens_l)),
           "loss_mask": pair(loss_l)}
  return [{k: v.copy() for k, v in one.items()} for _ in range(n)]
