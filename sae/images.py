"""Image datasets for activation sources, offline first: CIFAR-10 from `../shared/data/cifar10-jpeg`
(JPEGs, quality about 75: fine for activations, not for accuracy claims against the original
pixels), else `tfds.load("cifar10")` by name."""

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
  idx = np.concatenate([np.flatnonzero(data.labels == c)[:n] for c in range(len(data.classes))])
  return data.take(np.sort(idx))


def load_cifar10(split: str = "test") -> Images:
  """CIFAR-10 `split` ("train" 50,000 or "test" 10,000), ordered by class then file name."""
  if split not in ("train", "test"):
    raise ValueError(f"split={split!r}: CIFAR-10 has 'train' and 'test'.")
  path = shared_file(f"cifar10-jpeg/{split}.tar.gz")
  if path is None:
    return _cifar10_tfds(split)
  from PIL import Image  # matplotlib's dependency; only image loading needs it

  images, labels = [], []
  with tarfile.open(path, "r:gz") as tar:
    members = sorted((m for m in tar.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
    for m in members:
      cls = m.name.split("/")[-2]
      with Image.open(io.BytesIO(tar.extractfile(m).read())) as im:
        images.append(np.asarray(im.convert("RGB")))
      labels.append(CIFAR10_CLASSES.index(cls))
  log.info("CIFAR-10 %s: %d JPEGs from %s", split, len(labels), path)
  return Images(np.stack(images), np.asarray(labels, np.int32), CIFAR10_CLASSES, str(path))


def _cifar10_tfds(split: str) -> Images:
  try:
    import tensorflow_datasets as tfds

    ds = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1, as_supervised=True))
  except Exception as e:
    raise FileNotFoundError(
        f"CIFAR-10 {split}: ../shared/data/cifar10-jpeg/{split}.tar.gz is absent (set "
        f"POSTLAB_DATA to the shared data folder) and tfds could not load 'cifar10' ({e}).") from e
  images, labels = ds
  return Images(np.asarray(images), np.asarray(labels, np.int32), CIFAR10_CLASSES, "tfds:cifar10")
