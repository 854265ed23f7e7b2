"""The alignment data pipeline: `build(data_cfg, tokenizer, kind)` from a config's `data` section
(its fields and defaults: `configs.train_base.data_config`).

`align.records.load_records` (local file, HF hub name, offline alias) -> `normalize_rows` ->
`split_holdout` -> `align.encoding.encode_sft` / `encode_preference` (chat template, truncation)
-> `lm.data.batching.pad_examples` (static length S) -> `lm.data.batching.make_dataset` (grain: shuffle,
repeat, optional packing, batch; checkpointable iterator). DPO's shared-prompt layout lives in
`align.losses.shared_prompt`.
"""

from __future__ import annotations

import logging

import ml_collections

from align.encoding import encode_preference, encode_sft, longest_examples
from align.records import load_records, normalize_rows, split_holdout
from lm.data.batching import make_dataset, pad_examples, sequence_length

log = logging.getLogger(__name__)


def build(data_cfg: ml_collections.ConfigDict, tokenizer, kind: str, *,
          transform_train=None, shapes_only: bool = False) -> tuple:
  """(train grain dataset, padded eval examples, stats) for kind "sft" | "preference".

  Eval examples are never packed; batch them with `eval_batches`. Stats (JSON-ready) hold the
  normalisation counts (malformed rows), truncation/drop counts per split and S.
  `transform_train(padded examples) -> examples` runs before batching (e.g. to attach DPO
  reference log-probs scored once). `shapes_only`: no data read; the training examples are
  `align.encoding.longest_examples` (the largest batches the limits admit), no eval examples.
  """
  if kind not in ("sft", "preference"):
    raise ValueError(f"kind must be 'sft' or 'preference', got {kind!r}")
  if data_cfg.pack and kind != "sft":
    raise ValueError("pack=True is for SFT only")
  if shapes_only:
    train = longest_examples(int(data_cfg.batch_size), kind, max_length=data_cfg.max_length,
                             max_prompt_length=data_cfg.max_prompt_length)
    stats = {"kind": kind, "source": "shapes only", "seq_len": int(data_cfg.max_length),
             "n_train": len(train), "n_eval": 0}
    return _dataset(train, data_cfg, transform_train), [], stats
  rows = load_records(data_cfg.source, split=data_cfg.split, n=data_cfg.n,
                      on_error=data_cfg.on_error)
  records, norm_stats = normalize_rows(rows, kind=kind, fmt=data_cfg.format,
                                       on_error=data_cfg.on_error, source=data_cfg.source)
  if not records:
    raise ValueError(f"{data_cfg.source}: none of its {len(rows)} rows is a usable {kind} record "
                     f"({norm_stats['malformed_problems']}); fix the rows or point data.source "
                     "at another file")
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
  train_ds = _dataset(pad_examples(train, seq_len), data_cfg, transform_train)
  stats = {"kind": kind, "source": data_cfg.source, "seq_len": seq_len,
           "n_train": len(train), "n_eval": len(evals), "normalize": norm_stats,
           "train": train_stats, "eval": eval_stats}
  log.info("data %s", stats)
  return train_ds, pad_examples(evals, seq_len), stats


def _dataset(train_padded: list[dict], data_cfg, transform_train):
  if transform_train is not None:
    train_padded = transform_train(train_padded)
  return make_dataset(train_padded, batch_size=data_cfg.batch_size, seed=data_cfg.seed,
                      shuffle=data_cfg.shuffle, num_epochs=data_cfg.num_epochs, pack=data_cfg.pack)
