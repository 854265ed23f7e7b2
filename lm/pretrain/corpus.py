"""Pretraining corpora: documents -> a tokenised, memory-mapped token store with a manifest ->
packed fixed-length batches through grain.

The store (`build_store`, `TokenStore`) is written once: `tokens.bin` (uint16 when the vocabulary
fits, else uint32) holds every document's tokens followed by the end-of-document id, and
`manifest.json` names the tokenizer, the sources, each document's (source, split, start, length,
hash) and the split's statistics. Documents go to train or validation whole: by a hash of their
text (`split="hash"`, so an exact duplicate always lands beside its twin) or, for one long text,
its last `val_fraction` of characters (`split="tail"`, nanoGPT's shakespeare split). The overlap
check counts documents whose text appears in both splits and refuses the store when any does.

Batches (`packed_dataset`) are windows of the split's token stream, `seq_len + 1` tokens every
`seq_len`: `tokens` = window[:-1], `targets` = window[1:]. A window that spans documents keeps
them apart: `segment_ids` (1, 2, ... per document in the row) restrict attention to the own
document, `positions` restart at 0 with every document, and `loss_mask` is 1 only where the target
is in the query's document (a document's first token is never a target; its end-of-document id
is). With `sink_token` set, every row starts with that id (a dedicated sink, StreamingLLM's
"learnable sink token"): every query in the row may attend to it (`global_keys`), its position is
0 and the documents' positions start at 1.

Order: the windows are shuffled globally (grain `MapDataset.shuffle`, reseeded every epoch), so
resuming from the iterator's state (a small JSON-able dict, saved in every checkpoint) gives the
same batches. Every process builds the global batch from the memory-map (a few hundred KB a step)
and the trainer places each process's rows on its devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grain
import numpy as np

from lm import data as lm_data
from lm.hub.vocab import CharTokenizer, gpt2_tokenizer

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class Document:
  source: str
  text: str
  split: str | None = None  # None: assigned by the store's split rule


def _jsonl(rel: str) -> list[dict]:
  path = lm_data.shared_file(rel)
  if path is None:
    raise FileNotFoundError(f"{rel} is not in the shared data directory ($POSTLAB_DATA or "
                            "../shared/data); put the file there or choose other corpus.sources.")
  return lm_data.read_rows(path)


def _shakespeare() -> list[Document]:
  path = lm_data.shared_file("tinyshakespeare/input.txt.gz")
  if path is not None:
    return [Document("tinyshakespeare", lm_data.open_text(path))]
  import datasets

  ds = datasets.load_dataset("karpathy/tiny_shakespeare", split="train")
  return [Document("tinyshakespeare", "".join(ds["text"]))]


def _gsm8k() -> list[Document]:
  return [Document("gsm8k", f"Question: {r['question']}\nAnswer: {r['answer']}")
          for r in _jsonl("gsm8k/train.jsonl.gz")]


def _hh_rlhf() -> list[Document]:
  out = []
  for name in ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"):
    out += [Document("hh-rlhf", r["chosen"].strip()) for r in _jsonl(f"hh-rlhf/{name}-test.jsonl.gz")]
  return out


def _alpaca_eval() -> list[Document]:
  rows = lm_data.read_rows(lm_data.shared_file("alpaca-eval/outputs.json.gz"))
  return [Document("alpaca-eval", f"{r['instruction']}\n\n{r['output']}") for r in rows]


def _wikitext(split: str) -> list[Document]:
  """WikiText-2 articles (split at the ` = Title = ` headings), all in `split`."""
  text = lm_data.load_wikitext(split)
  articles, current = [], []
  for line in text.splitlines(keepends=True):
    if line.startswith(" = ") and not line.startswith(" = = ") and current:
      articles.append("".join(current))
      current = []
    current.append(line)
  if current:
    articles.append("".join(current))
  return [Document(f"wikitext-2-{split}", a, split="val") for a in articles if a.strip()]


SOURCES: dict[str, Callable[[], list[Document]]] = {
    "tinyshakespeare": _shakespeare,
    "gsm8k": _gsm8k,
    "hh-rlhf": _hh_rlhf,
    "alpaca-eval": _alpaca_eval,
    "wikitext-2-valid": lambda: _wikitext("valid"),
    "wikitext-2-test": lambda: _wikitext("test"),
}


def load_documents(names: Sequence[str]) -> list[Document]:
  unknown = [n for n in names if n not in SOURCES]
  if unknown:
    raise ValueError(f"corpus.sources has unknown names {unknown}; known: {sorted(SOURCES)}.")
  return [d for n in names for d in SOURCES[n]()]


# ---------------------------------------------------------------------------------------------
# The token store


def _doc_hash(text: str) -> str:
  return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()[:16]


def _assign_splits(docs: list[Document], rule: str, val_fraction: float, seed: int
                   ) -> list[Document]:
  """Documents with `split` set: "hash" sends a document to val when its text's hash falls in the
  lowest `val_fraction` of hash space (seeded); "tail" cuts each single-document source at its
  last `val_fraction` of characters (on a line boundary)."""
  out = []
  for d in docs:
    if d.split is not None:
      out.append(d)
    elif rule == "hash":
      h = int(hashlib.sha256(f"{seed}:{_doc_hash(d.text)}".encode()).hexdigest()[:8], 16)
      out.append(dataclasses.replace(d, split="val" if h < val_fraction * 2**32 else "train"))
    elif rule == "tail":
      cut = int(len(d.text) * (1 - val_fraction))
      out += [dataclasses.replace(d, text=d.text[:cut], split="train"),
              dataclasses.replace(d, text=d.text[cut:], split="val")]
    else:
      raise ValueError(f"corpus.split={rule!r} is unknown; use 'hash' or 'tail'.")
  return out


def overlap(docs: list[Document]) -> int:
  """Documents (by whitespace-normalised text hash) present in both train and val."""
  seen = {"train": set(), "val": set()}
  for d in docs:
    seen[d.split].add(_doc_hash(d.text))
  return len(seen["train"] & seen["val"])


def build_store(directory: str | os.PathLike, docs: list[Document], tokenizer, *,
                split: str = "hash", val_fraction: float = 0.05, seed: int = 0,
                append_eos: bool = True) -> "TokenStore":
  """Tokenise `docs` once into `directory` (see the module docstring); refuses a split overlap."""
  directory = Path(directory)
  if (directory / "manifest.json").exists():
    raise FileExistsError(f"{directory} already holds a token store; open it with TokenStore "
                          "or choose another directory.")
  docs = [d for d in _assign_splits(docs, split, val_fraction, seed) if d.text]
  shared = overlap(docs)
  if shared:
    raise ValueError(f"{shared} documents appear in both train and val; deduplicate the sources "
                     "or use corpus.split='hash' (duplicates then share a split).")
  eos = tokenizer.eos_id if append_eos else None
  if append_eos and eos is None:
    raise ValueError(f"the {tokenizer.kind} tokenizer has no end-of-document id; set "
                     "corpus.append_eos=False.")
  texts = [d.text for d in docs]
  encode_batch = getattr(tokenizer, "encode_batch", None)
  ids = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / "tokens.bin.tmp"
  rows, start = [], 0
  with open(tmp, "wb") as fh:
    for d, t in zip(docs, ids):
      arr = np.asarray(t + ([eos] if eos is not None else []), dtype)
      fh.write(arr.tobytes())
      rows.append({"source": d.source, "split": d.split, "start": start, "length": len(arr),
                   "hash": _doc_hash(d.text)})
      start += len(arr)
  os.replace(tmp, directory / "tokens.bin")
  stats = {}
  for s in ("train", "val"):
    sel = [r for r in rows if r["split"] == s]
    by_source = {}
    for r in sel:
      by_source[r["source"]] = by_source.get(r["source"], 0) + r["length"]
    stats[s] = {"documents": len(sel), "tokens": sum(r["length"] for r in sel),
                "tokens_by_source": by_source}
  manifest = {"tokenizer": tokenizer.to_json(), "dtype": np.dtype(dtype).name,
              "n_tokens": start, "eos_id": eos, "split_rule": split,
              "val_fraction": val_fraction, "seed": seed, "overlap_documents": shared,
              "sources": sorted({d.source for d in docs}), "splits": stats, "documents": rows}
  tmp = directory / "manifest.json.tmp"
  tmp.write_text(json.dumps(manifest))
  os.replace(tmp, directory / "manifest.json")
  log.info("token store %s: %s train / %s val tokens", directory,
           f"{stats['train']['tokens']:,}", f"{stats['val']['tokens']:,}")
  return TokenStore(directory)


class TokenStore:
  """A built store, memory-mapped: `split_stream(split)` gives (tokens, document index per token)."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    path = self.directory / "manifest.json"
    if not path.exists():
      raise FileNotFoundError(f"{self.directory} holds no token store (no manifest.json); build "
                              "one with lm.corpus.build_store.")
    self.manifest = json.loads(path.read_text())
    self.tokens = np.memmap(self.directory / "tokens.bin", dtype=self.manifest["dtype"], mode="r")
    self.tokenizer_meta = self.manifest["tokenizer"]
    self.vocab_size = int(self.tokenizer_meta["vocab_size"])

  def documents(self, split: str) -> list[dict]:
    return [d for d in self.manifest["documents"] if d["split"] == split]

  def split_stream(self, split: str, sources: Sequence[str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The split's documents concatenated (int32 tokens) and each token's document number."""
    docs = [d for d in self.documents(split) if sources is None or d["source"] in sources]
    if not docs:
      raise ValueError(f"the store in {self.directory} has no {split!r} documents"
                       + (f" from {list(sources)}" if sources else "") + ".")
    toks = np.concatenate([self.tokens[d["start"]:d["start"] + d["length"]] for d in docs])
    doc_id = np.repeat(np.arange(len(docs), dtype=np.int32), [d["length"] for d in docs])
    return toks.astype(np.int32), doc_id


def open_or_build(directory: str | os.PathLike, corpus_cfg) -> TokenStore:
  """The store in `directory` when its manifest matches `corpus_cfg`, else build it there."""
  directory = Path(directory)
  if (directory / "manifest.json").exists():
    store = TokenStore(directory)
    m = store.manifest
    if (m["tokenizer"]["kind"] == corpus_cfg.tokenizer and m["split_rule"] == corpus_cfg.split
        and set(m["sources"]) <= set(corpus_cfg.sources)):
      return store
    raise ValueError(f"the token store in {directory} was built from other settings "
                     f"({m['tokenizer']['kind']}, {m['sources']}, split {m['split_rule']}); "
                     "remove it or point corpus.store elsewhere.")
  docs = load_documents(list(corpus_cfg.sources))
  if corpus_cfg.tokenizer == "char":
    tok = CharTokenizer.fit("".join(d.text for d in docs))
  elif corpus_cfg.tokenizer == "gpt2":
    tok = gpt2_tokenizer()
  else:
    raise ValueError(f"corpus.tokenizer={corpus_cfg.tokenizer!r} is unknown; use 'char' or 'gpt2'.")
  return build_store(directory, docs, tok, split=corpus_cfg.split,
                     val_fraction=corpus_cfg.val_fraction, seed=corpus_cfg.seed,
                     append_eos=corpus_cfg.append_eos)


# ---------------------------------------------------------------------------------------------
# Packed windows


class Windows:
  """Random access to the packed rows of one token stream (see the module docstring)."""

  def __init__(self, tokens: np.ndarray, doc_id: np.ndarray, seq_len: int,
               sink_token: int | None = None):
    self.tokens, self.doc_id = tokens, doc_id
    self.seq_len = seq_len
    self.sink_token = sink_token
    self.span = seq_len - (sink_token is not None)  # stream tokens per row
    self.n = (len(tokens) - 1) // self.span
    if self.n < 1:
      raise ValueError(f"a stream of {len(tokens)} tokens holds no window of {self.span + 1}; "
                       "lower data.seq_len or add text.")

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    a = int(i) * self.span
    w = self.tokens[a:a + self.span + 1]
    d = self.doc_id[a:a + self.span + 1]
    same = d[:-1] == d[1:]
    seg = np.concatenate([[1], 1 + np.cumsum(d[1:-1] != d[:-2])]).astype(np.int32)
    starts = np.concatenate([[True], d[1:-1] != d[:-2]])
    idx = np.arange(self.span)
    pos = (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)
    row = {"tokens": w[:-1], "targets": w[1:], "segment_ids": seg, "positions": pos,
           "loss_mask": same.astype(np.int32)}
    if self.sink_token is None:
      row["global_keys"] = np.zeros(self.span, np.int32)
      return row
    head = {"tokens": self.sink_token, "targets": w[0], "segment_ids": 0, "positions": 0,
            "loss_mask": 0, "global_keys": 1}
    row["positions"] = row["positions"] + 1
    row["global_keys"] = np.zeros(self.span, np.int32)
    return {k: np.concatenate([[head[k]], v]).astype(np.int32) for k, v in row.items()}


def packed_dataset(windows: Windows, *, batch_size: int, seed: int,
                   num_epochs: int | None = None) -> grain.IterDataset:
  """Shuffled batches of `windows` (reshuffled every epoch), as a checkpointable grain dataset."""
  if len(windows) < batch_size:
    raise ValueError(f"{len(windows)} windows do not fill one batch of {batch_size}; lower "
                     "train.batch_size or data.seq_len.")
  ds = grain.MapDataset.source(windows).shuffle(seed=seed).repeat(num_epochs)
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(read)


def eval_batches(windows: Windows, batch_size: int, max_batches: int | None = None
                 ) -> Iterator[dict]:
  """Every window once in order (or the first `max_batches` batches); the last batch is filled
  with rows whose loss_mask is 0."""
  n = len(windows) if max_batches is None else min(len(windows), max_batches * batch_size)
  for start in range(0, n, batch_size):
    rows = [windows[i] for i in range(start, min(start + batch_size, n))]
    rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_size - len(rows))
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------------
# n-gram baselines


def bigram_nll(train: np.ndarray, val: np.ndarray, vocab_size: int,
               alphas: Sequence[float] = (1.0, 0.1, 0.01)) -> dict:
  """Mean next-token NLL (nats) on `val` of add-alpha bigram and unigram models counted on
  `train`, each at the best alpha of `alphas` (the strongest baseline of the grid)."""
  train, val = np.asarray(train, np.int64), np.asarray(val, np.int64)
  uni = np.bincount(train, minlength=vocab_size).astype(np.float64)
  pair = train[:-1] * vocab_size + train[1:]
  keys, counts = np.unique(pair, return_counts=True)
  q = val[:-1] * vocab_size + val[1:]
  at = np.clip(np.searchsorted(keys, q), 0, len(keys) - 1)
  c_pair = np.where(keys[at] == q, counts[at], 0).astype(np.float64)
  prev = np.bincount(train[:-1], minlength=vocab_size).astype(np.float64)[val[:-1]]
  best_bi, best_uni = {}, {}
  for a in alphas:
    nll = float(-np.mean(np.log((c_pair + a) / (prev + a * vocab_size))))
    if not best_bi or nll < best_bi["nll"]:
      best_bi = {"nll": nll, "alpha": a}
    p_uni = (uni[val[1:]] + a) / (uni.sum() + a * vocab_size)
    nll_u = float(-np.mean(np.log(p_uni)))
    if not best_uni or nll_u < best_uni["nll"]:
      best_uni = {"nll": nll_u, "alpha": a}
  return {"bigram": best_bi, "unigram": best_uni}
