"""Chat-template encoding and end-of-turn ids, for any `transformers`-style tokenizer."""

from __future__ import annotations

from typing import Sequence


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
