"""Image datasets for activation sources, offline first: CIFAR-10 from `../shared/data/cifar10-jpeg`
(JPEGs, quality about 75: fine for activations, not for accuracy claims against the original
pixels), else `tfds.load("cifar10")` by name where TensorFlow is installed (tfds needs it to build
the dataset; postlab does not install it)."""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile

import numpy as np

from lm.data import shared_file

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
CIFAR10_SHAPE = (32, 32, 3)  # H, W, C of every image, both splits


@dataclasses.dataclass(frozen=True)
class Images:
  """uint8 images `[N, H, W, 3]`, int labels `[N]`, the class names and where they came from; row i
  is item i everywhere downstream (activation stores keep this order)."""
  images: np.ndarray
  labels: np.ndarray
  classes: tuple[str, ...]
  source: str

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, idx) -> "Images":
    return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])


def per_class(data: Images, n: int) -> Images:
  """The first n items of every class (a class-balanced subset in the stored order)."""
  return data.take(_first_per_class(data.labels, len(data.classes), n))


def _first_per_class(labels: np.ndarray, n_classes: int, n: int) -> np.ndarray:
  """Sorted indices of the first n items of every class in `labels`."""
  return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(n_classes)]))


def load_cifar10(split: str = "test", n_per_class: int | None = None) -> Images:
  """CIFAR-10 `split` ("train" 50,000 or "test" 10,000), ordered by class then file name;
  `n_per_class`: only the first n of every class in that order (`per_class` of the whole split,
  decoding only those JPEGs)."""
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}: CIFAR-10 has 'train' and 'test'.")
  path = shared_file(f"cifar10-jpeg/{split}.tar.gz")
  if path is None:
    data = _cifar10_tfds(split)
    return data if n_per_class is None else per_class(data, n_per_class)
  from PIL import Image  # matplotlib's dependency; only image loading needs it

  with tarfile.open(path, "r:gz") as tar:
    members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
    labels = np.asarray([CIFAR10_CLASSES.index(m.name.split("/")[-2]) for m in members], np.int32)
    idx = (np.arange(len(members)) if n_per_class is None
           else _first_per_class(labels, len(CIFAR10_CLASSES), n_per_class))
    images = [None] * len(idx)
    for j in sorted(range(len(idx)), key=lambda j: members[idx[j]].offset):  # one pass of the gzip
      with Image.open(io.BytesIO(tar.extractfile(members[idx[j]]).read())) as im:
        images[j] = np.asarray(im.convert("RGB"))
  log.info("CIFAR-10 %s: %d of %d JPEGs from %s", split, len(idx), len(members), path)
  return Images(np.stack(images), labels[idx], CIFAR10_CLASSES, str(path))


def _cifar10_tfds(split: str) -> Images:
  """CIFAR-10 by name through `tfds.load`, for hosts with TensorFlow and network access (tfds builds
  its datasets with TensorFlow, which postlab does not install)."""
  import importlib.util

  absent = (f"CIFAR-10 {split}: ../shared/data/cifar10-jpeg/{split}.tar.gz is absent; set "
            "POSTLAB_DATA to the shared data folder that holds it")
  if importlib.util.find_spec("tensorflow") is None:
    raise FileNotFoundError(f"{absent}, or `pip install tensorflow` so that tfds can download and "
                            "build 'cifar10' by name.")
  try:
    import tensorflow_datasets as tfds

    ds = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1, as_supervised=True))
  except Exception as e:
    raise FileNotFoundError(f"{absent} (tfds could not load 'cifar10': {e}).") from e
  images, labels = ds
  return Images(np.asarray(images), np.asarray(labels, np.int32), CIFAR10_CLASSES, "tfds:cifar10")
