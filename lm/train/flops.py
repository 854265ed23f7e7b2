"""Training FLOPs per token, TFLOP/s and MFU, with the formula written out.

Model FLOPs count matrix multiplies only (2 FLOPs per multiply-add), forward + backward = 3x the
forward (the backward computes two products per forward product), as PaLM (App. B), nanoGPT and
MaxText do; rematerialisation is not counted (hardware FLOPs are not model FLOPs).

    train FLOPs / token = 6 * N_matmul  +  3 * n_layers * 4 * n_heads * head_dim * K

- N_matmul: parameters that multiply activations: q/k/v/o and the three SwiGLU matrices of every
  layer, plus the output head (V x d, counted once whether or not it is tied to the embedding: the
  embedding lookup costs no FLOPs). Norm scales and biases are left out (they are not matmuls).
- Attention: per layer and query, QK^T and AV over K keys, 2 FLOPs x head_dim each, per head.
  K depends on the convention:
  * "causal" (MaxText since PR #1988): the mean number of keys a causal query sees,
    (T + 1) / 2 for a full layer of T tokens, and mean_t min(t + 1, W) for a sliding layer of
    window W (so windows below T cost less).
  * "nanogpt" (`estimate_mfu`, PaLM): K = T for every layer (no causal halving, no windows), and
    N = every parameter except position embeddings; this reproduces nanoGPT's figure.

MFU = achieved model FLOP/s / the device's peak dense bf16 FLOP/s (`CHIPS`; None on CPU,
where MFU is not reported).
"""

from __future__ import annotations

import dataclasses

from lm.config import ModelConfig

@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bytes_per_s: float


# Per chip, by the start of `device_kind` (lower case; the longest prefix wins), from the vendors'
# spec sheets. TPU v5p reports its kind as "TPU v5", v5e as "TPU v5 lite", v6e as "TPU v6 lite".
CHIPS = {
    "nvidia h100 pcie": Chip(756e12, 80e9, 2.0e12),
    "nvidia h100": Chip(989e12, 80e9, 3.35e12),
    "nvidia h200": Chip(989e12, 141e9, 4.8e12),
    "nvidia a100": Chip(312e12, 80e9, 2.039e12),
    "tpu v4": Chip(275e12, 32 * 2**30, 1.2e12),
    "tpu v5 lite": Chip(197e12, 16 * 2**30, 819e9),
    "tpu v5e": Chip(197e12, 16 * 2**30, 819e9),
    "tpu v5": Chip(459e12, 95 * 2**30, 2.765e12),
    "tpu v6 lite": Chip(918e12, 32 * 2**30, 1.64e12),
}


def chip(device_kind: str) -> Chip | None:
  """The `CHIPS` entry of a device kind; None if unknown (CPUs)."""
  kind = device_kind.lower()
  for prefix in sorted(CHIPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return CHIPS[prefix]
  return None


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
  learnable: float  # 6 * N_matmul
  attention: float  # 3 * L * 4 * H * Q * K

  @property
  def total(self) -> float:
    return self.learnable + self.attention


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that multiply activations: every layer's projections and the output head."""
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f
  return cfg.n_layers * per_layer + cfg.vocab_size * d


def keys_per_query(seq_len: int, window: int | None, convention: str) -> float:
  """Mean keys a query attends to (see the module docstring)."""
  t = seq_len
  if convention == "nanogpt":
    return float(t)
  if convention != "causal":
    raise ValueError(f"convention={convention!r} is unknown; use 'causal' or 'nanogpt'.")
  if window is None or window >= t:
    return (t + 1) / 2
  # positions 0..W-1 see t+1 keys, the remaining T-W see W
  return (window * (window + 1) / 2 + (t - window) * window) / t


def attention_flops(n_layers_by_window: dict[int | None, int], n_heads: int, head_dim: int,
                    seq_len: int, convention: str) -> float:
  return sum(3 * n * 4 * n_heads * head_dim * keys_per_query(seq_len, w, convention)
             for w, n in n_layers_by_window.items())


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "causal") -> FlopsPerToken:
  """Training FLOPs per token of `cfg` on sequences of `seq_len` (module docstring)."""
  by_window: dict[int | None, int] = {}
  for kind in cfg.layer_types:
    w = cfg.sliding_window if kind == "sliding" else None
    by_window[w] = by_window.get(w, 0) + 1
  n = matmul_params(cfg) if convention == "causal" else cfg.n_params
  return FlopsPerToken(6.0 * n, attention_flops(by_window, cfg.n_heads, cfg.head_dim, seq_len,
                                                convention))


def nanogpt_flops_per_token(n_params: int, n_layers: int, n_heads: int, head_dim: int,
                            seq_len: int) -> float:
  """nanoGPT's `estimate_mfu` numerator per token: 6N + 12 L H Q T (N without position
  embeddings)."""
  return 6.0 * n_params + attention_flops({None: n_layers}, n_heads, head_dim, seq_len, "nanogpt")


def peak_flops(device=None) -> float | None:
  """The peak dense bf16 FLOP/s of `device` (default: the first JAX device); None if unknown."""
  import jax

  spec = chip((device or jax.devices()[0]).device_kind)
  return spec.peak_flops if spec else None
