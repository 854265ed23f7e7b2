"""A GGUF's tokenizer without torch: its vocabulary, merges, special tokens and chat template.

transformers builds the same tokenizer from a GGUF only through its GGUF integration, which imports
torch. This builds it with the `tokenizers` library from the file's metadata (llama.cpp key names)
and wraps it in `transformers.PreTrainedTokenizerFast`, so callers keep the usual API
(`tok(text)`, `decode`, `apply_chat_template`). Byte-level BPE files (`tokenizer.ggml.model` =
`gpt2`: GPT-2, SmolLM, Llama 3, Qwen 2) are covered; tests compare ids and decodes with
transformers' GGUF tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lm.train.runtime import cache_dir

log = logging.getLogger(__name__)

# llama.cpp token types (`tokenizer.ggml.token_type`)
_CONTROL, _USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` -> the split regex its merges were learned with. Types not listed keep the
# GPT-2 regex of `ByteLevel(use_regex=True)`, as transformers' GGUF loader does (SmolLM's `smollm`
# among them).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}

_METADATA = {  # our name -> GGUF key
    "model": "tokenizer.ggml.model",
    "pre": "tokenizer.ggml.pre",
    "tokens": "tokenizer.ggml.tokens",
    "token_type": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_id": "tokenizer.ggml.eos_token_id",
    "unk_id": "tokenizer.ggml.unknown_token_id",
    "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "chat_template": "tokenizer.chat_template",
}
# The fields a GGUF may leave out, at the value taken then (`tokens` and `merges` it must have).
_DEFAULTS = {"model": None, "pre": None, "token_type": (), "bos_id": None, "eos_id": None,
             "unk_id": None, "pad_id": None, "add_bos": False, "add_eos": False,
             "chat_template": None}


class TokenizerError(ValueError):
  """A GGUF whose tokenizer cannot be built here; the message names the field and the fix."""


@functools.cache
def byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map, the spelling of every byte-level BPE token."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  spelling, extra = {}, 0
  for b in range(256):
    if b in printable:
      spelling[b] = chr(b)
    else:
      spelling[b] = chr(256 + extra)
      extra += 1
  return spelling


def _spelled(token: str, alphabet: set[str], spelling: dict[int, str]) -> str:
  """A token in the byte alphabet; a file that stores one as raw text gets it respelled."""
  if set(token) <= alphabet:
    return token
  return "".join(spelling[b] for b in token.encode("utf-8"))


def gguf_metadata(reader) -> dict:
  """The tokenizer fields of an open `gguf.GGUFReader`, under the names `from_gguf` uses."""
  out = {}
  for name, key in _METADATA.items():
    field = reader.fields.get(key)
    if field is not None:
      out[name] = field.contents()
  return out


def byte_level_bpe(meta: dict) -> Tokenizer:
  """The `tokenizers.Tokenizer` of a byte-level BPE GGUF (ids, merges, split regex, specials)."""
  meta = {**_DEFAULTS, **meta}
  for name in ("tokens", "merges"):
    if name not in meta:
      raise TokenizerError(
          f"GGUF field {_METADATA[name]!r} is missing: a byte-level BPE tokenizer needs its "
          "vocabulary and merges. Use an HF model directory with tokenizer.json instead.")
  spelling = byte_alphabet()
  alphabet = set(spelling.values())
  tokens = meta["tokens"]
  vocab = {_spelled(t, alphabet, spelling): i for i, t in enumerate(tokens)}
  merges = [tuple(m.split(" ")) for m in meta["merges"]]
  for i, pair in enumerate(merges):  # the Rust builder panics on these instead of raising
    if len(pair) != 2 or not {*pair, "".join(pair)} <= vocab.keys():
      raise TokenizerError(
          f"tokenizer.ggml.merges[{i}]={meta['merges'][i]!r} is not two vocabulary tokens whose "
          "join is a token; the file is corrupt: download it again.")
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                             end_of_word_suffix="", fuse_unk=False))
  split = PRE_TOKENIZER_SPLITS.get(meta["pre"])
  if split is None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  types = list(meta["token_type"])
  # A control token outside the byte alphabet is a converter's mislabel; adding it would grow the
  # vocabulary past the model's embedding table.
  control = [t for t, kind in zip(tokens, types) if kind == _CONTROL and set(t) <= alphabet]
  tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
  user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED and t in vocab]
  tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
  return tok


def _post_processor(tok: Tokenizer, bos: str | None, eos: str | None, add_bos: bool,
                    add_eos: bool) -> processors.TemplateProcessing:
  """BOS/EOS around each sequence as the file's `add_bos_token`/`add_eos_token` ask."""
  def around(seq: str, type_id: int) -> list[str]:
    return ([f"{bos}:{type_id}"] if add_bos and bos else []) + [f"{seq}:{type_id}"] + (
        [f"{eos}:{type_id}"] if add_eos and eos else [])

  used = {t for t, on in ((bos, add_bos), (eos, add_eos)) if t and on}
  return processors.TemplateProcessing(single=around("$A", 0), pair=around("$A", 0) + around("$B", 1),
                                       special_tokens=[(t, tok.token_to_id(t)) for t in used])


def from_gguf_metadata(meta: dict, *, source: str = "GGUF"):
  """`PreTrainedTokenizerFast` from `gguf_metadata(...)` (no torch)."""
  from transformers import PreTrainedTokenizerFast

  meta = {**_DEFAULTS, **meta}
  kind = meta["model"]
  if kind != "gpt2":
    raise TokenizerError(
        f"{source}: tokenizer.ggml.model={kind!r}; postlab builds byte-level BPE ('gpt2') GGUF "
        "tokenizers without torch. Fix: load the model from an HF directory with tokenizer.json, "
        "or pass tokenizer=<HF tokenizer directory>.")
  tok = byte_level_bpe(meta)
  tokens = meta["tokens"]

  def special(name):
    i = meta[f"{name}_id"]
    if i is None:
      return None
    if not 0 <= int(i) < len(tokens):
      raise TokenizerError(f"{source}: {_METADATA[name + '_id']}={i} is outside the "
                           f"{len(tokens)}-token vocabulary; the file is corrupt.")
    return tokens[int(i)]

  names = {n: special(n) for n in ("bos", "eos", "unk", "pad")}
  add_bos, add_eos = bool(meta["add_bos"]), bool(meta["add_eos"])
  tok.post_processor = _post_processor(tok, names["bos"], names["eos"], add_bos, add_eos)
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=names["bos"], eos_token=names["eos"],
      unk_token=names["unk"], pad_token=names["pad"], chat_template=meta["chat_template"],
      add_bos_token=add_bos, add_eos_token=add_eos, clean_up_tokenization_spaces=False)


def from_gguf(reader_or_path, *, source: str | None = None):
  """The tokenizer of a GGUF file (path or open `gguf.GGUFReader`), built without torch.

  Parsing a 49k-token vocabulary out of a GGUF takes seconds, so the tokenizer built from a file
  is kept in `cache_dir("tokenizers")` (HF's `save_pretrained` layout, keyed by the file's path,
  size and modification time, this module's source and the tokenizers/transformers versions) and
  later processes load it from there."""
  if not (isinstance(reader_or_path, (str, bytes)) or hasattr(reader_or_path, "__fspath__")):
    return from_gguf_metadata(gguf_metadata(reader_or_path), source=source or "GGUF")
  from lm.hub.weights import open_gguf

  path = Path(os.fsdecode(reader_or_path))
  entry = _cache_entry(path)
  if entry is not None and entry.is_dir():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(entry))
  tok = from_gguf_metadata(gguf_metadata(open_gguf(path)), source=source or str(path))
  if entry is not None:
    _keep(tok, entry)
  return tok


@functools.cache
def _builder_digest() -> str:
  import tokenizers
  import transformers

  source = Path(__file__).read_bytes()
  return hashlib.sha256(source + f"|{tokenizers.__version__}|{transformers.__version__}".encode()
                        ).hexdigest()


def _cache_entry(path: Path) -> Path | None:
  """Where the tokenizer of the GGUF at `path` is kept (None: caching is off, or no such file)."""
  root = cache_dir("tokenizers")
  if root is None or not path.is_file():
    return None
  stat = path.stat()
  key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_builder_digest()}"
                       .encode()).hexdigest()[:20]
  return root / f"{path.stem}-{key}"


def _keep(tok, entry: Path) -> None:
  """Save `tok` into `entry` atomically (written beside it, renamed into place): a process that
  reads the entry sees a whole tokenizer or none. A failure to write only costs the next build."""
  try:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-")
  except OSError as e:
    log.warning("tokenizer cache not written (%s): set POSTLAB_CACHE to a writable directory", e)
    return
  try:
    tok.save_pretrained(tmp)
    os.rename(tmp, entry)
  except OSError as e:
    if not entry.is_dir():  # else another process kept it first
      log.warning("tokenizer cache not written (%s): set POSTLAB_CACHE to a writable directory", e)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
