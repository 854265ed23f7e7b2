"""load_pretrained resolution and clear errors for bad names, files and architectures."""

import json

import numpy as np
import pytest

import lm
from lm import hub
from lm.hub import names, weights


def test_unknown_name_lists_what_was_tried():
  with pytest.raises(hub.ModelNotFoundError) as e:
    hub.load_pretrained("no-such-model-anywhere")
  msg = str(e.value)
  assert "no-such-model-anywhere" in msg and "smollm2-135m-instruct" in msg


def test_unknown_hub_repo_without_fallback(monkeypatch):
  def offline(repo_id):
    raise ConnectionError("offline")

  monkeypatch.setattr(names, "_hub_download", offline)
  with pytest.raises(hub.ModelNotFoundError, match="hub someone/unknown-model: ConnectionError"):
    hub.resolve("someone/unknown-model")


@pytest.mark.real_weights
def test_hub_id_falls_back_to_offline_copy(monkeypatch, smollm2_gguf):
  monkeypatch.setattr(names, "_hub_download", lambda repo: (_ for _ in ()).throw(OSError("offline")))
  assert hub.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm2_gguf


def test_corrupt_gguf(tmp_path):
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(256))
  with pytest.raises(weights.WeightsError, match="corrupt or truncated"):
    hub.load_model(bad)


def test_missing_gguf_file(tmp_path):
  with pytest.raises(weights.WeightsError, match="not found"):
    weights.load_gguf(tmp_path / "absent.gguf")


def test_gguf_of_unsupported_architecture(tmp_path):
  gguf = pytest.importorskip("gguf")
  path = tmp_path / "gpt2.gguf"
  writer = gguf.GGUFWriter(str(path), "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(weights.WeightsError, match="architecture 'gpt2' is not supported"):
    hub.load_model(path)


def test_hf_dir_without_weights(tmp_path):
  cfg = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 32}
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(weights.WeightsError, match="no \\*.safetensors"):
    hub.load_model(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
  with pytest.raises(weights.WeightsError, match="unreadable safetensors"):
    hub.load_model(tmp_path)


def test_hf_dir_of_other_model_type(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(weights.WeightsError, match="model_type='gpt2'"):
    hub.load_model(tmp_path)


def test_directory_without_config_or_gguf(tmp_path):
  with pytest.raises(hub.ModelNotFoundError, match="no config.json"):
    hub.resolve(tmp_path)


@pytest.mark.real_weights
def test_smollm2_gguf_config_and_tokenizer(smollm2):
  model, tok = smollm2
  cfg = model.cfg
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
      30, 576, 9, 3, 49152)
  assert cfg.rope_theta == 1e5 and cfg.tie_embeddings
  ids = hub.encode_chat(tok, "Hi")
  assert tok.decode(ids).startswith("<|im_start|>system")
  assert tok.convert_tokens_to_ids("<|im_end|>") in hub.stop_ids(tok)


@pytest.mark.real_weights
def test_one_loader_refuses_unclear_specs(tmp_path, smollm2_gguf):
  with pytest.raises(ValueError, match="not both or neither"):
    hub.load()
  with pytest.raises(ValueError, match="not both or neither"):
    hub.load("smollm2-135m-instruct", preset="tiny")
  with pytest.raises(ValueError, match="needs tokenizer="):
    hub.load(preset="tiny")
  with pytest.raises(FileNotFoundError, match="no reward head"):
    hub.load(preset="tiny", tokenizer="smollm2-135m-instruct", reward_head=tmp_path)


@pytest.mark.real_weights
def test_reward_head_round_trips(tmp_path, smollm2_gguf):
  import numpy as np
  from flax import nnx

  from lm import heads

  model, tok = hub.load(preset="tiny", tokenizer="smollm2-135m-instruct")
  rm = heads.RewardModel(model, rngs=nnx.Rngs(5))
  heads.save_head(rm, tmp_path)
  back, _ = hub.load(preset="tiny", tokenizer="smollm2-135m-instruct", reward_head=tmp_path)
  texts = ["Hello there.", "A longer text, with more tokens in it."]
  np.testing.assert_allclose(heads.score_texts(back, tok, texts), heads.score_texts(rm, tok, texts),
                             rtol=1e-6)
  other = heads.RewardModel(lm.Transformer(lm.preset("tiny", d_model=32), rngs=nnx.Rngs(0)),
                            rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expected 'score.weight' of shape \(1, 32\)"):
    heads.load_head(other, tmp_path)


def test_one_loader_reads_tiny_seed_specs():
  """`tiny:SEED` is the tiny preset (context 512) seeded by SEED, with the UTF-8 byte vocabulary."""
  import jax
  from flax import nnx

  from lm.hub import vocab

  a, tok = hub.load("tiny:3")
  b, _ = hub.load("tiny:3")
  c, _ = hub.load("tiny:4")
  assert isinstance(tok, vocab.ByteTokenizer) and a.cfg.max_seq_len == 512
  assert a.cfg == lm.preset("tiny", max_seq_len=512, dtype="float32", param_dtype="float32")
  want = lm.Transformer(a.cfg, rngs=nnx.Rngs(3))
  for x, y, z in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (a, want, c)), strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(
      jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(c, nnx.Param))))
  assert tok.encode("hé") == list("hé".encode("utf-8")) and tok.decode(tok.encode("hé")) == "hé"
