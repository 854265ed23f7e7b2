"""Activation capture and the on-disk activation store the SAE trainers stream from.

A store is one directory per (model, tap, dataset):

  acts.npy       float32 `[N, d]`, row i from input item i (`pool="tokens"`: one row per token or
                 patch, `item.npy` names each row's item)
  labels.npy     int `[N]` where the inputs had labels
  mean.npy, std.npy   per-dimension mean and std `[d]` of this store's rows
  manifest.json  model, tap, pooling, dataset, N, d, weights file, preprocessing, and the scalar
                 statistics (mean of all entries, std of all entries about it)

Stores are written to a temporary directory and renamed when complete, so a killed capture leaves
nothing half-written; an existing store is reused only when its manifest asks for the same model,
tap, pooling, dataset, N and preprocessing (anything else is refused, naming the difference).

Standardisation (`Standardise`): `scalar` subtracts one mean and divides by one std per model (the
official USAE code), `per_dim` does so per dimension, `none` leaves rows raw. The statistics come
from the training store and are applied unchanged to held-out stores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.progress import Progress

log = logging.getLogger(__name__)

POOLS = ("mean", "tokens")
STANDARDISE = ("scalar", "per_dim", "none")
_IDENTITY_KEYS = ("model", "tap", "pool", "dataset", "n_items", "preprocessing")


def pool_rows(acts, pool: str):
  """A tap's output as rows: `[B, d]` stays; `[B, ..., d]` is averaged over the middle axes
  (`mean`: spatial or token mean per item) or flattened to one row per position (`tokens`)."""
  if pool not in POOLS:
    raise ValueError(f"pool={pool!r}: use one of {POOLS}.")
  if acts.ndim == 2:
    return acts
  if pool == "mean":
    return jnp.mean(acts, axis=tuple(range(1, acts.ndim - 1)))
  return acts.reshape(-1, acts.shape[-1])


def capture(fn: Callable[[Any, Any], jax.Array], model, inputs: np.ndarray, *, batch: int,
            label: str = "") -> np.ndarray:
  """Rows `fn(model, inputs[i:i + batch])` for every batch, concatenated (host float32). `fn` is
  jitted once with the model's arrays as arguments (closed over, they would be compiled into the
  program as constants: a slow compile and an executable the size of the weights): the last batch
  is padded to full size and its padding rows dropped. `fn` must return the same number of rows
  per input item, in item order."""
  jitted, state = _program(fn, model)
  step = lambda x: jitted(state, x)
  n = len(inputs)
  out = []
  progress = Progress(n, label, "item", logger=log)
  for start in range(0, n, batch):
    chunk = inputs[start:start + batch]
    real = len(chunk)
    if real < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - real,) + chunk.shape[1:], chunk.dtype)])
    rows = np.asarray(step(chunk), np.float32)
    out.append(rows[: len(rows) * real // batch])
    progress.update(real)
  progress.close()
  return np.concatenate(out)


def _program(fn, model):
  """`fn(model, x)` jitted as `(state, x) -> rows`, and the model's state to call it with."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda state, x: fn(nnx.merge(graphdef, state), x)), state


@dataclasses.dataclass
class Store:
  """An activation store opened read-only (`acts` memory-mapped)."""
  path: Path
  manifest: dict
  acts: np.ndarray
  labels: np.ndarray | None
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def open(cls, path) -> "Store":
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
      raise FileNotFoundError(f"{path} is not an activation store (no manifest.json).")
    manifest = json.loads(manifest_file.read_text())
    labels = np.load(path / "labels.npy") if (path / "labels.npy").exists() else None
    return cls(path, manifest, np.load(path / "acts.npy", mmap_mode="r"), labels,
               np.load(path / "mean.npy"), np.load(path / "std.npy"))

  def __len__(self) -> int:
    return self.acts.shape[0]

  @property
  def d(self) -> int:
    return self.acts.shape[1]


def write_store(path, acts: np.ndarray, manifest: dict, labels: np.ndarray | None = None) -> Store:
  """Writes `acts` `[N, d]` with its statistics and manifest atomically (temp dir, then rename)."""
  path = Path(path)
  acts = np.asarray(acts, np.float32)
  tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  np.save(tmp / "acts.npy", acts)
  if labels is not None:
    np.save(tmp / "labels.npy", np.asarray(labels))
  mean = acts.mean(0, dtype=np.float64)
  np.save(tmp / "mean.npy", mean.astype(np.float32))
  np.save(tmp / "std.npy", acts.std(0, dtype=np.float64).astype(np.float32))
  full = {**manifest, "n_rows": int(acts.shape[0]), "d": int(acts.shape[1]),
          "scalar_mean": float(acts.mean(dtype=np.float64)),
          "scalar_std": float(acts.std(dtype=np.float64)),
          "zero_fraction": float(np.mean(acts == 0)), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
  (tmp / "manifest.json").write_text(json.dumps(full, indent=2))
  if path.exists():
    shutil.rmtree(path)
  os.replace(tmp, path)
  return Store.open(path)


def _check_reusable(store: Store, want: dict) -> None:
  want = json.loads(json.dumps(want))  # as the manifest holds it (tuples become lists)
  diff = {k: (store.manifest.get(k), want[k]) for k in _IDENTITY_KEYS
          if store.manifest.get(k) != want[k]}
  if diff:
    said = ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
    raise ValueError(f"{store.path} holds other activations ({said}). Delete it, or point "
                     "store_dir elsewhere.")


def image_rows(spec, tap: str, pool: str) -> Callable[[Any, Any], jax.Array]:
  """`fn(model, images [B, H, W, 3]) -> rows [R, d]`: what an image store holds of a model's
  `tap`."""
  def fn(model, images):
    return pool_rows(model.features(spec.preprocess(images), (tap,))[tap], pool)

  return fn


def image_width(model_name: str, image_shape: tuple[int, int, int], *, tap: str | None = None,
                pool: str = "mean") -> int:
  """d of `image_store`'s rows for images of `image_shape` (H, W, C): the capture traced on a
  randomly initialised model of shapes alone (`jax.eval_shape`), no weights read."""
  from sae import vision

  src = vision.source(model_name)
  tap = tap or src.pooled_tap
  images = jax.ShapeDtypeStruct((1, *image_shape), jnp.uint8)
  return int(jax.eval_shape(lambda x: image_rows(src.spec, tap, pool)(src.make(), x),
                            images).shape[-1])


def lm_width(model_name: str) -> int:
  """d of `lm_store`'s rows (the residual stream: the model's d_model), from the model's config
  (a GGUF's metadata or an HF `config.json`), no weights read."""
  from lm.hub.loader import model_config
  from lm.hub.names import resolve

  return int(model_config(resolve(model_name)).d_model)


def image_store(root, model_name: str, data, dataset: str, *, tap: str | None = None,
                pool: str = "mean", batch: int = 128) -> Store:
  """The store of `model_name`'s `tap` (default: its pooled vector) over `data` (`sae.images.Images`),
  captured once under `root/<model>.<tap>.<dataset>` and reused afterwards."""
  from sae import vision

  src = vision.source(model_name)
  tap = tap or src.pooled_tap
  path = Path(root) / f"{model_name}.{tap}.{dataset}"
  want = {"model": model_name, "tap": tap, "pool": pool, "dataset": dataset,
          "n_items": len(data), "preprocessing": dataclasses.asdict(src.spec)}
  if path.exists():
    store = Store.open(path)
    _check_reusable(store, want)
    log.info("reusing %s (%d rows)", path, len(store))
    return store
  model, spec = vision.load(model_name)
  acts = capture(image_rows(spec, tap, pool), model, data.images, batch=batch,
                 label=f"{model_name}.{tap} on {dataset}")
  labels = data.labels if pool == "mean" else None
  manifest = {**want, "weights": str(vision.weights_path(model_name)), "inputs": data.source,
              "classes": list(data.classes)}
  return write_store(path, acts, manifest, labels)


def lm_store(root, model_name: str, layer: int, text: str, dataset: str, *, seq_len: int,
             n_seqs: int, batch: int = 8, skip_first: int = 1) -> Store:
  """The store of a language model's residual stream after block `layer` (`lm.Transformer.
  residual_stream`) on `text`, tokenised once (no special tokens) and cut into `n_seqs` windows of
  `seq_len` tokens. The first `skip_first` positions of every window are left out: they carry the
  attention sink's outsized norms (in SmolLM2 at layer 15, 6 of 12,700 rows with position 1 kept
  hold 90% of the sum of squares), as SAELens users exclude BOS; `item.npy` `[N, 2]` holds each
  row's (window, position) and `tokens.npy` `[n_seqs, seq_len]` the windows, for contexts."""
  from lm.hub import load_pretrained

  tag = model_name.replace("/", "_")
  path = Path(root) / f"{tag}.resid{layer}.{dataset}"
  want = {"model": model_name, "tap": f"resid.{layer}", "pool": "tokens", "dataset": dataset,
          "n_items": int(n_seqs),
          "preprocessing": {"seq_len": int(seq_len), "skip_first": int(skip_first)}}
  if path.exists():
    store = Store.open(path)
    _check_reusable(store, want)
    return store
  model, tokenizer = load_pretrained(model_name)
  ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
  if len(ids) < n_seqs * seq_len:
    raise ValueError(f"{dataset}: {len(ids)} tokens, fewer than n_seqs × seq_len = "
                     f"{n_seqs * seq_len}; lower n_seqs or seq_len.")
  windows = ids[: n_seqs * seq_len].reshape(n_seqs, seq_len)

  def fn(model, tokens_bs):
    return pool_rows(model.residual_stream(tokens_bs, (layer,))[layer][:, skip_first:], "tokens")

  acts = capture(fn, model, windows, batch=batch, label=f"{model_name} resid.{layer} on {dataset}")
  store = write_store(path.with_name(path.name + ".rows"), acts, {**want, "layer": int(layer)})
  np.save(store.path / "tokens.npy", windows)
  seq, pos = np.meshgrid(np.arange(n_seqs), np.arange(skip_first, seq_len), indexing="ij")
  np.save(store.path / "item.npy", np.stack([seq.ravel(), pos.ravel()], 1).astype(np.int32))
  os.replace(store.path, path)
  return Store.open(path)


@dataclasses.dataclass(frozen=True)
class Standardise:
  """x ↦ (x − mean) / std with a model's training-store statistics (`kind` in STANDARDISE)."""
  mean: np.ndarray
  std: np.ndarray
  kind: str

  @classmethod
  def of(cls, store: Store, kind: str) -> "Standardise":
    if kind not in STANDARDISE:
      raise ValueError(f"standardise={kind!r}: use one of {STANDARDISE}.")
    if kind == "scalar":
      mean = np.float32(store.manifest["scalar_mean"])
      std = np.float32(store.manifest["scalar_std"])
    elif kind == "per_dim":
      mean, std = store.mean, np.maximum(store.std, 1e-6)
    else:
      mean, std = np.float32(0.0), np.float32(1.0)
    return cls(np.asarray(mean, np.float32), np.asarray(std, np.float32), kind)

  def __call__(self, x):
    return (np.asarray(x, np.float32) - self.mean) / self.std

  def to_json(self) -> dict:
    return {"kind": self.kind, "mean": np.ravel(self.mean)[:4].tolist(),
            "std": np.ravel(self.std)[:4].tolist()}


class _AlignedRows:
  """Random access to item i in every store (standardised): `{"x0": row, "x1": row, ...}`."""

  def __init__(self, stores: Sequence[Store], standardise: Sequence[Standardise]):
    self.stores, self.standardise = list(stores), list(standardise)

  def __len__(self) -> int:
    return len(self.stores[0])

  def __getitem__(self, i):
    return {f"x{j}": f(s.acts[i]) for j, (s, f) in enumerate(zip(self.stores, self.standardise))}


def check_aligned(stores: Sequence[Store]) -> None:
  """Row i must be the same input item in every store: same dataset, items and row count."""
  first = stores[0].manifest
  for s in stores[1:]:
    for key in ("dataset", "n_items", "n_rows"):
      if s.manifest[key] != first[key]:
        raise ValueError(f"stores are not row-aligned: {s.path} has {key}={s.manifest[key]!r}, "
                         f"{stores[0].path} {first[key]!r}. Capture every model on the same inputs.")


def aligned_batches(stores: Sequence[Store], standardise: Sequence[Standardise], *, batch: int,
                    seed: int, num_epochs: int | None = None) -> grain.IterDataset:
  """Batches `{"x<j>": [B, d_j]}` of the same items from every store, in a seeded shuffle per
  epoch (grain; `iter(ds).get_state()` / `set_state` resume exactly); the last partial batch of
  an epoch is dropped."""
  check_aligned(stores)
  ds = grain.MapDataset.source(_AlignedRows(stores, standardise)).shuffle(seed=seed)
  ds = ds.repeat(num_epochs).batch(batch, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def standardised(store: Store, standardise: Standardise) -> np.ndarray:
  """Every row of a store, standardised, in memory `[N, d]` (evaluation sets)."""
  return standardise(store.acts)
