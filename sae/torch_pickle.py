"""Reads PyTorch `.pth` state dicts into numpy without importing torch.

Both formats `torch.save` writes: the zip archive (torch ≥ 1.6: `archive/data.pkl` plus one file per
storage under `archive/data/`) and the legacy stream (three header pickles — magic number, protocol,
system info — then the pickled object, a pickled list of storage keys, and per storage an int64
element count followed by its raw little-endian bytes). Tensors are rebuilt from (storage, offset,
size, stride) as numpy views; only plain tensors and containers are accepted (the unpickler refuses
any other global, so a checkpoint cannot run code).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _Storage:
  def __init__(self, key: str, dtype):
    self.key, self.dtype, self.data = key, np.dtype(dtype), None


class _Tensor:
  """A tensor whose storage bytes are read after the pickle (the legacy format's order)."""

  def __init__(self, storage: _Storage, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def numpy(self) -> np.ndarray:
    flat = self.storage.data
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.size,
                                           [s * item for s in self.stride])
    return np.array(view)  # a copy: the result owns contiguous memory


def _rebuild_tensor(storage, offset, size, stride, *_):
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *_):
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, fh, storages: dict):
    super().__init__(fh)
    self.storages = storages

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return name
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    raise pickle.UnpicklingError(
        f"{module}.{name} is not a tensor or container; this reader loads state dicts only.")

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel[, view_metadata]); newer torch passes
    # storage_type as a class name, older as the *Storage name string; both resolve above.
    _, storage_type, key, *_ = pid
    name = storage_type if isinstance(storage_type, str) else getattr(storage_type, "__name__", "")
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"storage type {storage_type!r} is not supported.")
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _Storage(key, _STORAGE_DTYPES[name])
    return self.storages[key]


def _materialise(obj):
  if isinstance(obj, _Tensor):
    return obj.numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_legacy(fh) -> object:
  if pickle.load(fh) != _LEGACY_MAGIC:
    raise ValueError("not a torch legacy checkpoint (bad magic number).")
  pickle.load(fh)  # protocol version
  pickle.load(fh)  # system info (endianness, type sizes)
  storages: dict[str, _Storage] = {}
  obj = _Unpickler(fh, storages).load()
  for key in pickle.load(fh):
    numel = int(np.frombuffer(fh.read(8), "<i8")[0])
    st = storages[str(key)]
    st.data = np.frombuffer(fh.read(numel * st.dtype.itemsize), st.dtype.newbyteorder("<"))
  return obj


def _load_zip(path: Path) -> object:
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = next(n for n in names if n.endswith("data.pkl"))
    root = pkl[: -len("data.pkl")]
    storages: dict[str, _Storage] = {}
    obj = _Unpickler(io.BytesIO(zf.read(pkl)), storages).load()
    for key, st in storages.items():
      st.data = np.frombuffer(zf.read(f"{root}data/{key}"), st.dtype.newbyteorder("<"))
  return obj


def load(path) -> dict[str, np.ndarray]:
  """The state dict at `path` as `{name: np.ndarray}` (either torch.save format)."""
  path = Path(path)
  if zipfile.is_zipfile(path):
    obj = _load_zip(path)
  else:
    with open(path, "rb") as fh:
      obj = _load_legacy(fh)
  return _materialise(obj)
