"""Host-side checks of token-id inputs, run by every public entry before anything is traced.

Inside jit an out-of-vocabulary id is silently clamped by the embedding gather, so decoding
`[[60000]]` would return zeros instead of failing. Every entry that takes token ids (decode,
beam search, scoring, perplexity, trainer batches) calls `token_rows` or `token_array` first, so
the same input gets the same message everywhere: what is wrong, where, and the fix.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class InputError(ValueError):
  """A token-id input an entry point cannot run; the message names the argument and the fix."""


def _vocab_message(what: str, where: str, bad: int, vocab_size: int) -> str:
  return (f"{what}{where} holds id {bad}, outside the vocabulary [0, {vocab_size}). Use the "
          "tokenizer that belongs to this model (or a config with a larger vocab_size).")


def token_rows(rows: Sequence[Sequence[int]], *, vocab_size: int, max_len: int | None = None,
               reserve: int = 0, what: str = "prompts") -> list[list[int]]:
  """`rows` as lists of ints, refused with `InputError` when empty, when a row is empty, when an
  id is outside `[0, vocab_size)`, or when a row plus `reserve` positions (new tokens) exceeds
  `max_len`."""
  if isinstance(rows, (str, bytes)) or not hasattr(rows, "__len__"):
    raise InputError(f"{what} must be a list of token-id lists; got {type(rows).__name__}. "
                     "Tokenize text first (tokenizer(text)['input_ids']).")
  out = []
  for i, row in enumerate(rows):
    if isinstance(row, (str, bytes)) or (not hasattr(row, "__len__")):
      raise InputError(f"{what}[{i}] is {type(row).__name__}, not a list of token ids; wrap a "
                       "single prompt as [ids].")
    ids = np.asarray(row)
    if ids.size == 0:
      raise InputError(f"{what}[{i}] is empty: every row needs at least one token (a chat "
                       "prompt has its template's tokens; a bare BOS id works for free text).")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise InputError(f"{what}[{i}] must be a flat list of integer token ids; got shape "
                       f"{ids.shape} dtype {ids.dtype}.")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
      bad = lo if lo < 0 else hi
      j = int(np.flatnonzero(ids == bad)[0])
      raise InputError(_vocab_message(what, f"[{i}] (position {j})", bad, vocab_size))
    if max_len is not None and len(ids) + reserve > max_len:
      extra = f" plus {reserve} new tokens" if reserve else ""
      raise InputError(f"{what}[{i}] has {len(ids)} tokens{extra}, more than the model's "
                       f"max_seq_len {max_len}. Shorten it (keep its last tokens) or ask for fewer "
                       "new tokens.")
    out.append(ids.tolist())
  if not out:
    raise InputError(f"{what} is empty: pass at least one token-id row.")
  return out


def token_array(tokens, *, vocab_size: int, what: str = "tokens") -> None:
  """Refuse an integer array holding an id outside `[0, vocab_size)` (`InputError`)."""
  ids = np.asarray(tokens)
  if not np.issubdtype(ids.dtype, np.integer):
    raise InputError(f"{what} must hold integer token ids; got dtype {ids.dtype}.")
  if ids.size == 0:
    return
  lo, hi = int(ids.min()), int(ids.max())
  if lo < 0 or hi >= vocab_size:
    bad = lo if lo < 0 else hi
    where = "[" + ", ".join(str(int(k)) for k in np.argwhere(ids == bad)[0]) + "]"
    raise InputError(_vocab_message(what, where, bad, vocab_size))


def token_ids(ids: Sequence[int], *, vocab_size: int, what: str) -> list[int]:
  """Special ids (EOS, pad) checked against the vocabulary, as a list of ints."""
  out = [int(i) for i in ids]
  for i in out:
    if not 0 <= i < vocab_size:
      raise InputError(_vocab_message(what, "", i, vocab_size))
  return out
