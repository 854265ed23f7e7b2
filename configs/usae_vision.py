"""A universal SAE over vision models (the PA5 report's Task 3, with the weights reachable offline).

  python launch.py --config=configs/usae_vision.py:cpu --workdir=runs/usae-cpu

PA5 trained on ResNet-18 (512) + ViT-B/16 (768); neither is reachable offline, so `:cpu` pairs
MobileNetV2 (ImageNet, pooled 1280) with the CIFAR-10 CNN (`dense`, 1024) and adds EfficientNet-Lite0
(ImageNet, pooled 1280) as a near-twin of MobileNetV2. Images: a class-balanced subset of the
CIFAR-10 training JPEGs for training, the held-out test JPEGs for every metric. USAE at PA5's
settings (m 2048, TopK k 32, lr 1e-3, batch 256, MSE, one random source per step) with the official
update rule, an independent TopK SAE per model in the same run (alignment tax).

Variants: `:smoke` (seconds: two taps of the CIFAR CNN, tiny subsets, m 64, a few steps; the CI
test), `:cpu` (minutes on two
cores), `:gpu_full` (every training image, both rules, three seeds, PA5's 30 epochs).

Code: `sae/experiment.py` (task `usae`), `sae/usae.py`, `sae/activations.py`, `sae/vision.py`.
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "gpu_full")


def _source(model: str, tap: str = "", pool: str = "mean"):
  return ml_collections.ConfigDict({"model": model, "tap": tap, "pool": pool})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("usae", arg, VARIANTS)
  variant = c.variant
  c.seed = 0
  c.store_dir = "runs/activations"  # captured once, reused while the manifests match
  c.data = ml_collections.ConfigDict({"dataset": "cifar10", "train_per_class": 2000,
                                      "test_per_class": 1000, "capture_batch": 100})
  c.sources = [_source("mobilenet_v2", "pooled"), _source("cifar_cnn", "dense"),
               _source("efficientnet_lite0", "pooled")]
  c.standardise = "scalar"  # one mean and std per model (the official code); per_dim, none
  c.usae = ml_collections.ConfigDict({"n_latents": 2048, "k": 32, "loss": "mse",
                                      "rules": ["official"], "aux_coef": 0.1,
                                      "decoder_norm": "project", "auxk_coef": 0.0,
                                      "dead_after": 1000})
  c.independent = True
  c.train = ml_collections.ConfigDict({"epochs": 30, "batch": 256, "lrs": [1e-3], "seeds": [0],
                                       "max_grad_norm": 1.0, "log_every": 50,
                                       "checkpoint_every": 500})
  # tau: a latent fires when its code is above it (TopK codes are 0 or the kept value)
  c.eval = ml_collections.ConfigDict({"tau": 0.0, "universal": 0.9, "specific": 0.1})
  c.viz = ml_collections.ConfigDict({"concepts": 4, "top_images": 8, "steps": 128, "size": 48,
                                     "lr": 4.0, "jitter": 2, "blur_every": 4, "blur_sigma": 0.7})
  if variant == "smoke":
    c.data.update(train_per_class=20, test_per_class=10, capture_batch=50)
    # two taps of the small CNN: the whole pipeline in seconds (the ports have their own tests)
    c.sources = [_source("cifar_cnn", "dense"), _source("cifar_cnn", "dense_1")]
    c.usae.update(n_latents=64, k=4, rules=["official", "joint"])
    c.train.update(epochs=3, batch=32, lrs=[1e-3, 3e-3], log_every=5, checkpoint_every=6)
    c.viz.update(concepts=2, top_images=4, steps=4, size=32)
  elif variant == "gpu_full":
    c.data.update(train_per_class=5000, test_per_class=1000, capture_batch=500)
    c.usae.update(rules=["official", "joint"])
    c.train.update(seeds=[0, 1, 2], log_every=100, checkpoint_every=2000)
    c.viz.update(steps=512, size=112, concepts=8)
  return c
