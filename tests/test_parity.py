"""Our float32 logits equal `transformers`' on the same weights (import, export, real SmolLM2)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.parity  # the reference runs on torch (the parity extra)
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm  # noqa: E402
from lm.hub import weights  # noqa: E402
from tests_helpers import scrambled  # noqa: E402

TOL = 1e-4
SEQ = 24
LENGTHS = (24, 17, 9)  # left-padded rows; the longest passes max_position_embeddings=16 (dynamic)

ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
}  # yarn gets max_position_embeddings=32 = factor * original, as HF expects


def _hf_llama(tmp_path, *, rope="default", tie=True, attention_bias=False, head_dim=None,
              seed=0):
  """A random tiny HF Llama saved as safetensors under tmp_path; returns (hf_model, dir)."""
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
      max_position_embeddings=32 if rope == "yarn" else 16, rms_norm_eps=1e-5, tie_word_embeddings=tie,
      attention_bias=attention_bias, rope_parameters={"rope_theta": 10000.0, **ROPES[rope]},
      attn_implementation="eager",
  )
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(cfg).eval()
  # Larger-than-init weights make attention peaky, so RoPE/mask mistakes move the logits.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  path = tmp_path / f"hf-{rope}-{tie}"
  model.save_pretrained(path)
  return model, path


def _padded_batch(seed=0, vocab=256, seq=SEQ, lengths=LENGTHS):
  """tokens_bs, mask_bs (left padding, pad id 0) as numpy int64."""
  rng = np.random.default_rng(seed)
  mask_bs = np.zeros((len(lengths), seq), np.int64)
  for i, n in enumerate(lengths):
    mask_bs[i, seq - n:] = 1
  tokens_bs = rng.integers(1, vocab, (len(lengths), seq)) * mask_bs
  return tokens_bs, mask_bs


def _hf_logits(hf_model, tokens_bs, mask_bs):
  # HF's forward does not derive positions from the mask; left padding needs them explicitly.
  positions_bs = np.maximum(np.cumsum(mask_bs, axis=1) - 1, 0)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens_bs), attention_mask=torch.tensor(mask_bs),
                   position_ids=torch.tensor(positions_bs))
  return out.logits.float().numpy()


def _our_logits(model, tokens_bs, mask_bs):
  logits_bsv, _ = model(jnp.asarray(tokens_bs), attn_mask=jnp.asarray(mask_bs))
  return np.asarray(logits_bsv)


def _max_diff_real(a_bsv, b_bsv, mask_bs):
  return float(np.abs(a_bsv - b_bsv)[mask_bs.astype(bool)].max())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_hf_import_matches_transformers(tmp_path, rope, tie):
  hf_model, path = _hf_llama(tmp_path, rope=rope, tie=tie)
  ours = weights.load_hf_dir(path)
  assert ours.cfg.rope_scaling.kind == rope
  assert ours.cfg.tie_embeddings == tie
  tokens_bs, mask_bs = _padded_batch()
  ref_bsv = _hf_logits(hf_model, tokens_bs, mask_bs)
  assert _max_diff_real(_our_logits(ours, tokens_bs, mask_bs), ref_bsv, mask_bs) <= TOL
  if rope != "default":
    # The comparison is sensitive: ignoring the scaling would have failed it by far.
    plain = lm.Transformer(ours.cfg.replace(rope_scaling=lm.RopeScaling()), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(ours))
    assert _max_diff_real(_our_logits(plain, tokens_bs, mask_bs), ref_bsv, mask_bs) > 100 * TOL


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_import_bias_and_wide_heads(tmp_path, tie):
  hf_model, path = _hf_llama(tmp_path, tie=tie, attention_bias=True, head_dim=24, rope="llama3")
  ours = weights.load_hf_dir(path)
  assert ours.cfg.head_dim == 24 and ours.cfg.attention_bias
  assert ours.layers[0].attn.q_proj.kernel[...].shape == (64, 4, 24)
  tokens_bs, mask_bs = _padded_batch(seed=1)
  ref_bsv = _hf_logits(hf_model, tokens_bs, mask_bs)
  assert _max_diff_real(_our_logits(ours, tokens_bs, mask_bs), ref_bsv, mask_bs) <= TOL


def _export_and_compare(model, path):
  weights.save_hf_dir(model, path)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=torch.float32, attn_implementation="eager").eval()
  tokens_bs, mask_bs = _padded_batch(seed=2, vocab=model.cfg.vocab_size)
  diff = _max_diff_real(_our_logits(model, tokens_bs, mask_bs),
                        _hf_logits(hf_model, tokens_bs, mask_bs), mask_bs)
  assert diff <= TOL
  # And our own loader reads the export back to an identical model.
  again = weights.load_hf_dir(path)
  assert dataclasses.replace(again.cfg, name="x") == dataclasses.replace(model.cfg, name="x")
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_random_preset_loads_in_transformers(tmp_path, tie):
  model = scrambled(lm.Transformer(lm.preset("tiny", tie_embeddings=tie), rngs=nnx.Rngs(0)))
  _export_and_compare(model, tmp_path / "export")


@pytest.mark.parametrize("rope", ["llama3", "yarn"])
def test_export_hf_loaded_model_round_trips(tmp_path, rope):
  _, path = _hf_llama(tmp_path, rope=rope, tie=False, attention_bias=True, head_dim=24, seed=3)
  _export_and_compare(weights.load_hf_dir(path), tmp_path / "export")


@pytest.mark.real_weights
def test_smollm2_matches_transformers(smollm2, smollm2_hf):
  model, tokenizer = smollm2
  questions = ["What is the capital of France?", "Name three colours.", "Hi"]
  rows = [
      tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                    add_generation_prompt=True)
      for q in questions
  ]
  ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in rows]
  lengths = [len(x) for x in ids]
  assert len(set(lengths)) == len(lengths), lengths
  seq = max(lengths)
  tokens_bs = np.zeros((len(ids), seq), np.int64)
  mask_bs = np.zeros((len(ids), seq), np.int64)
  for i, x in enumerate(ids):
    tokens_bs[i, seq - len(x):] = x
    mask_bs[i, seq - len(x):] = 1
  ref_bsv = _hf_logits(smollm2_hf, tokens_bs, mask_bs)
  assert _max_diff_real(_our_logits(model, tokens_bs, mask_bs), ref_bsv, mask_bs) <= 1e-3
