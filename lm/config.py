"""Model configuration: one frozen dataclass for every Llama-family decoder, plus presets."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn")
# "none": keep every activation; "full": keep only each block's input, recompute the rest;
# "dots": keep matmul outputs; "dots_no_batch": keep matmul outputs without batch dimensions.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("unfused", "fused")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, with the fields HF Llama configs use (`rope_scaling`/`rope_parameters`)."""

  kind: str = "default"
  factor: float = 1.0
  original_max_position: int | None = None
  low_freq_factor: float = 1.0  # llama3
  high_freq_factor: float = 4.0  # llama3
  beta_fast: float = 32.0  # yarn
  beta_slow: float = 1.0  # yarn
  attention_factor: float | None = None  # yarn; None derives it from factor/mscale
  mscale: float | None = None  # yarn
  mscale_all_dim: float | None = None  # yarn
  truncate: bool = True  # yarn

  def __post_init__(self):
    if self.kind not in ROPE_KINDS:
      raise ValueError(
          f"rope_scaling.kind={self.kind!r} is not supported; use one of {ROPE_KINDS}."
      )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and options of a Llama-family decoder.

  `layer_types[i]` is "full" or "sliding"; sliding layers attend to the last `sliding_window`
  positions (the query itself included), as HF does. `attention_sinks` adds one learned logit per
  head as an extra softmax column (GPT-OSS style).
  """

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int | None = None
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling = RopeScaling()
  rms_eps: float = 1e-5
  tie_embeddings: bool = True
  attention_bias: bool = False
  mlp_bias: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  attention_sinks: bool = False
  sink_tokens: int = 0
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  name: str = "custom"
  # Execution, not architecture (same logits either way): run the layer stack as one `lax.scan`
  # over stacked layer weights (one block compiled, not n_layers; without a KV cache only), and
  # what each block keeps for the backward pass (REMAT_POLICIES), and the attention used without
  # a KV cache: "unfused" (the probabilities materialised; the parity reference, fastest on a CPU)
  # or "fused" (`lm.attention`: cuDNN flash attention on a GPU in bf16/fp16, XLA's elsewhere).
  scan_layers: bool = False
  remat: str = "none"
  attention_impl: str = "unfused"

  def __post_init__(self):
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
    if self.layer_types is None:
      kind = "sliding" if self.sliding_window else "full"
      object.__setattr__(self, "layer_types", (kind,) * self.n_layers)
    else:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    if len(self.layer_types) != self.n_layers:
      raise ValueError(
          f"layer_types has {len(self.layer_types)} entries but n_layers={self.n_layers}; "
          "give one 'full'/'sliding' per layer."
      )
    bad = set(self.layer_types) - {"full", "sliding"}
    if bad:
      raise ValueError(f"layer_types contains {sorted(bad)}; each entry must be 'full' or 'sliding'.")
    if "sliding" in self.layer_types and not self.sliding_window:
      raise ValueError("layer_types has 'sliding' layers but sliding_window is not set; set it.")
    if self.sink_tokens < 0:
      raise ValueError(f"sink_tokens={self.sink_tokens} must be >= 0 (always-visible first positions).")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query)."
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r} is not a policy; use one of {REMAT_POLICIES}.")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r} is unknown; use one of "
                       f"{ATTENTION_IMPLS}.")

  @property
  def n_params(self) -> int:
    d, f, h = self.d_model, self.d_ff, self.head_dim
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.n_layers * per_layer + emb + d

  def replace(self, **kw: Any) -> "ModelConfig":
    """A copy with fields changed; fields derived by default (head_dim, layer_types) re-derive."""
    if "head_dim" not in kw and self.head_dim == self.d_model // self.n_heads:
      kw["head_dim"] = None
    default_types = ("sliding" if self.sliding_window else "full",) * self.n_layers
    if "layer_types" not in kw and self.layer_types == default_types:
      kw["layer_types"] = None
    return dataclasses.replace(self, **kw)


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Static inverse frequencies `[head_dim // 2]` and the cos/sin scale, as HF computes them.

  "dynamic" (NTK) depends on the sequence length and is finished in `layers.rope_tables`.
  """
  s = cfg.rope_scaling
  dim = cfg.head_dim
  base = cfg.rope_theta
  exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
  inv_freq = 1.0 / (base**exponents)
  if s.kind in ("default", "dynamic"):
    return inv_freq.astype(np.float32), 1.0
  if s.kind == "linear":
    return (inv_freq / s.factor).astype(np.float32), 1.0
  if s.kind == "llama3":
    old_len = s.original_max_position or cfg.max_seq_len
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
  # yarn
  old_len = s.original_max_position or cfg.max_seq_len

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = s.attention_factor
  if attention_factor is None:
    if s.mscale and s.mscale_all_dim:
      attention_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    else:
      attention_factor = mscale(s.factor)

  def correction_dim(rotations):
    return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  pos_freqs = base**exponents
  inv = (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
  return inv.astype(np.float32), float(attention_factor)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
        max_seq_len=128, name="tiny",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
        max_seq_len=8192, rope_theta=100000.0, rms_eps=1e-5, tie_embeddings=True,
        name="smollm2-135m",
    ),
    "modern-253m": ModelConfig(
        vocab_size=50257, d_model=1024, n_layers=12, n_heads=16, n_kv_heads=16, d_ff=4096,
        max_seq_len=1024, rope_theta=10000.0, tie_embeddings=True, name="modern-253m",
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
  """A named preset (`tiny`, `smollm2-135m`, `modern-253m`), with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides)
