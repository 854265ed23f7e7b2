"""Static-shape batches of token examples through grain, for every trainer user (SFT, DPO, reward
models, pretraining, SAEs): right-padding to one length S, seeded shuffling, repetition, optional
first-fit packing with segment ids and restarting positions, checkpointable iterator state, and
fixed-shape evaluation batches.

Packed rows add segment_ids int32 [S] (1, 2, ...; 0 = pad) and positions int32 [S]; the first
token of every packed segment is never a target.
"""

from __future__ import annotations

from typing import Iterator

import grain
import numpy as np

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


def eval_batches(examples: list[dict], batch_size: int) -> Iterator[dict]:
  """Every example once, in order, in batches of static shape; the last batch is filled with
  all-zero rows (attn_mask and loss_mask 0), so weight per-row metrics by `attn_mask.any(-1)`."""
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    chunk = chunk + [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch_size - len(chunk))
    yield {k: np.stack([ex[k] for ex in chunk]) for k in chunk[0]}
