"""The activation store and the USAE run's training loop: capture pads without changing rows,
stores round-trip with their statistics and refuse other activations, batches stay row-aligned
across stores and resume exactly, and a resumed USAE run, its instances split over two devices,
equals an uninterrupted one on one device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from configs import usae_vision
from lm.train.rundir import RunDir
from sae import activations, experiment


def test_pool_rows_and_capture_pads_the_last_batch():
  x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
  np.testing.assert_allclose(activations.pool_rows(x, "mean"), x.mean((1, 2)))
  assert activations.pool_rows(x, "tokens").shape == (24, 5)
  with pytest.raises(ValueError, match="pool='max'"):
    activations.pool_rows(x, "max")
  items = np.random.default_rng(0).normal(size=(23, 3, 2)).astype(np.float32)
  scale = nnx.Param(jnp.float32(2.0))
  rows = activations.capture(lambda s, b: activations.pool_rows(b * s[...], "tokens"), scale, items,
                             batch=5)
  np.testing.assert_allclose(rows, (items * 2.0).reshape(-1, 2))
  # the model's arrays are the program's arguments, never constants compiled into it
  program, state = activations._program(lambda s, b: b * s[...], nnx.Param(jnp.full((4,), 1234.5)))
  hlo = program.lower(state, np.ones((5, 4), np.float32)).as_text()
  assert "stablehlo.constant" not in hlo and "%arg0: tensor<4xf32>" in hlo


def _store(root, name, acts, dataset="toy", **extra):
  manifest = {"model": name, "tap": "t", "pool": "mean", "dataset": dataset,
              "n_items": len(acts), "preprocessing": {}}
  manifest.update(extra)
  return activations.write_store(root / name, acts, manifest)


def test_store_round_trip_statistics_and_refusal(tmp_path):
  acts = np.random.default_rng(1).normal(3.0, 2.0, size=(50, 4)).astype(np.float32)
  store = _store(tmp_path, "m", acts)
  assert not list(tmp_path.glob("*.tmp-*"))  # written aside, then renamed
  np.testing.assert_array_equal(np.asarray(store.acts), acts)
  np.testing.assert_allclose(store.mean, acts.mean(0), rtol=1e-6)
  np.testing.assert_allclose(store.std, acts.std(0), rtol=1e-5)
  assert store.manifest["scalar_mean"] == pytest.approx(float(acts.mean()), rel=1e-6)
  assert store.manifest["scalar_std"] == pytest.approx(float(acts.std()), rel=1e-5)
  s = activations.Standardise.of(store, "scalar")
  assert abs(float(s(acts).mean())) < 1e-5 and float(s(acts).std()) == pytest.approx(1.0, rel=1e-4)
  p = activations.Standardise.of(store, "per_dim")(acts)
  np.testing.assert_allclose(p.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(p.std(0), 1.0, rtol=1e-4)
  with pytest.raises(ValueError, match="standardise='z'"):
    activations.Standardise.of(store, "z")
  tupled = _store(tmp_path, "tupled", acts, preprocessing={"mean": [0.5, 0.25]})
  activations._check_reusable(tupled, {**tupled.manifest, "preprocessing": {"mean": (0.5, 0.25)}})
  want = {**store.manifest, "tap": "other"}
  with pytest.raises(ValueError, match="tap: 't' there, 'other' asked"):
    activations._check_reusable(store, want)


def test_aligned_batches_keep_rows_together_and_resume(tmp_path):
  n = 40
  ids = np.arange(n, dtype=np.float32)
  a = _store(tmp_path, "a", np.stack([ids, -ids], 1))
  b = _store(tmp_path, "b", np.stack([ids * 10, ids * 10 + 1, ids * 10 + 2], 1))
  none = [activations.Standardise.of(s, "none") for s in (a, b)]
  it = iter(activations.aligned_batches([a, b], none, batch=8, seed=3))
  seen = []
  for _ in range(7):  # past the first epoch (5 batches)
    batch = next(it)
    np.testing.assert_array_equal(batch["x1"][:, 0], batch["x0"][:, 0] * 10)
    seen.append(batch["x0"][:, 0])
  assert sorted(np.concatenate(seen[:5]).tolist()) == ids.tolist()  # one epoch = every item once
  state = json.loads(json.dumps(it.get_state()))
  rest = [next(it)["x0"] for _ in range(3)]
  again = iter(activations.aligned_batches([a, b], none, batch=8, seed=3))
  again.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(next(again)["x0"], want)
  c = _store(tmp_path, "c", np.zeros((n, 2), np.float32), dataset="other")
  with pytest.raises(ValueError, match="not row-aligned"):
    activations.aligned_batches([a, c], none, batch=8, seed=0)


def _config(epochs):
  c = usae_vision.get_config("smoke")
  c.seed = 0
  c.independent = True
  c.usae.update({"n_latents": 16, "k": 2, "loss": "mse", "rules": ["official", "joint"],
                 "aux_coef": 0.1, "decoder_norm": "project", "auxk_coef": 0.0, "dead_after": 1000})
  c.train.update({"epochs": epochs, "batch": 8, "lrs": [1e-3, 3e-3], "seeds": [0],
                  "max_grad_norm": 1.0, "log_every": 2, "checkpoint_every": 3})
  return c


def test_resumed_usae_run_equals_uninterrupted(tmp_path):
  rng = np.random.default_rng(0)
  code = rng.exponential(size=(48, 6)) * (rng.random((48, 6)) < 0.3)
  stores = [_store(tmp_path, f"s{j}", (code @ rng.normal(size=(6, d))).astype(np.float32))
            for j, d in enumerate((5, 7))]
  std = [activations.Standardise.of(s, "scalar") for s in stores]

  def run(workdir, epochs, resume=False, mesh=None):
    cfg = _config(epochs)
    models = experiment._Models(cfg, [s.d for s in stores])
    run_dir = RunDir(workdir, cfg, resume=resume)
    state, _ = experiment.train(cfg, run_dir, models, stores, std, mesh)
    run_dir.close()
    return state

  from lm import sharding

  two = sharding.make_mesh(data=2, fsdp=1, devices=jax.devices()[:2])  # one instance per device
  full = run(tmp_path / "full", 3)  # 6 batches per epoch: 18 steps
  run(tmp_path / "cut", 1, mesh=two)  # stops (and checkpoints) at step 6
  resumed = run(tmp_path / "cut", 3, resume=True, mesh=two)
  assert len(resumed["usae"]["official"]["params"][0]["W_enc"].sharding.device_set) == 2
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), full, resumed)
  steps = [json.loads(line)["step"] for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)) and steps[-1] == 18
