"""Shared constants for tests."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def random_hf_llama(path: Path, *, tie: bool = True, max_position_embeddings: int = 128):
  """A random tiny HF LlamaForCausalLM (weights larger than init, so errors show), saved to path."""
  import torch
  import transformers

  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
              else 0.15 * torch.randn_like(p))
  hf.save_pretrained(path)
  return hf
