"""LoRA as a parameter mask: adapters inside `lm.layers.Linear`, one filter deciding what trains.

`apply_lora` adds `nnx.LoRAParam` factors (A `[*in, r]` random, B `[r, *out]` zero) to the chosen
projections of every block, so the adapted model is the base model until B moves. The trainable
set is an nnx filter (`trainable_filter`): split the model with it, build the optimizer `wrt` it,
save adapter-only checkpoints with it (`adapter_state`).

Dropout randomness: each adapted Linear owns an `nnx.Dropout` on the rng stream
`lm.layers.LORA_DROPOUT_STREAM`. A pure train step calls `set_dropout_key(model, key)` on the model
it merged, right before the forward; every layer then gets a fresh stream keyed
`fold_in(key, layer number)`, so masks are a deterministic function of the step key (a resumed run
reproduces an uninterrupted one). Fresh stream objects (not writes into the old key variables) keep
this legal inside `jax.grad` when the non-trainable state was closed over from the outer `jit`.
`model.eval()` (or dropout=0) uses no randomness; `model.train()` switches it back on (the default).
The key/count variables are `nnx.RngState`: checkpoints exclude them with `nnx.Not(nnx.RngState)`,
which loses nothing since the trainer sets the key every step.

PEFT interop: `export_peft` writes `adapter_model.safetensors` + `adapter_config.json` that
`peft.PeftModel.from_pretrained(LlamaForCausalLM, path)` loads; `load_peft` reads them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.layers import Linear

# short name -> (block attribute, projection attribute, HF parent module)
_TARGETS: dict[str, tuple[str, str, str]] = {
    "q": ("attn", "q_proj", "self_attn"),
    "k": ("attn", "k_proj", "self_attn"),
    "v": ("attn", "v_proj", "self_attn"),
    "o": ("attn", "o_proj", "self_attn"),
    "gate": ("mlp", "gate_proj", "mlp"),
    "up": ("mlp", "up_proj", "mlp"),
    "down": ("mlp", "down_proj", "mlp"),
}
ALL_LINEAR = "all-linear"
MODES = ("lora", "full", "regex")
_HF_TO_SHORT = {proj: short for short, (_, proj, _) in _TARGETS.items()}
_PEFT_PREFIX = "base_model.model.model.layers"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# The PEFT features postlab's LoRA has not, at the value that means "not used": an adapter that
# uses one is refused.
_PEFT_UNSUPPORTED = {
    "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
    "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
}
# `adapter_config.json` fields a file may leave out, at PEFT's value then.
_PEFT_DEFAULTS = {"peft_type": "LORA", "target_modules": None, "lora_dropout": 0.0,
                  **_PEFT_UNSUPPORTED}


def _parse_targets(targets: Any) -> tuple[str, ...]:
  """Short target names from a tuple/list, "all-linear", or a comma-separated string."""
  if isinstance(targets, str):
    if targets.strip() == ALL_LINEAR:
      return tuple(_TARGETS)
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  targets = tuple(targets)
  if ALL_LINEAR in targets:
    return tuple(_TARGETS)
  bad = [t for t in targets if t not in _TARGETS]
  if bad or not targets:
    raise ValueError(
        f"lora.targets={targets!r}: unknown names {bad}; allowed values are {list(_TARGETS)} "
        f"or {ALL_LINEAR!r} (the LM head / tied embedding is never a target)."
    )
  return tuple(t for t in _TARGETS if t in targets)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank, alpha (scaling = alpha / rank, as PEFT), dropout on the LoRA input, target names."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

  def __post_init__(self):
    object.__setattr__(self, "targets", _parse_targets(self.targets))
    if int(self.rank) != self.rank or self.rank < 1:
      raise ValueError(f"lora.rank={self.rank!r} must be a positive integer.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1).")
    object.__setattr__(self, "rank", int(self.rank))
    object.__setattr__(self, "alpha", float(self.alpha))
    object.__setattr__(self, "dropout", float(self.dropout))

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, cd) -> "LoraConfig":
    """From an ml_collections ConfigDict (or dict) with any of the dataclass fields."""
    d = cd.to_dict() if hasattr(cd, "to_dict") else dict(cd)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ValueError(f"lora config has unknown fields {unknown}; allowed fields are {fields}.")
    return cls(**d)


def _lora_linears(model: nnx.Module) -> Iterator[tuple[tuple, Linear]]:
  for path, module in nnx.iter_modules(model):
    if isinstance(module, Linear) and module.lora_rank:
      yield path, module


def _targets_of(model: nnx.Module, targets: tuple[str, ...]) -> Iterator[tuple[int, str, Linear]]:
  """(layer index, short name, Linear) for each target projection of each block."""
  for i, block in enumerate(model.layers):
    for t in targets:
      sub, proj, _ = _TARGETS[t]
      yield i, t, getattr(getattr(block, sub), proj)


def apply_lora(model: nnx.Module, cfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
  """Add LoRA adapters to `cfg.targets` of every block, in place; returns the model."""
  if any(True for _ in _lora_linears(model)):
    raise ValueError("the model already has LoRA adapters; apply_lora runs once per model.")
  for _, _, lin in _targets_of(model, cfg.targets):
    lin.add_lora(cfg.rank, cfg.alpha, cfg.dropout, rngs=rngs)
  return model


def set_dropout_key(model: nnx.Module, key: jax.Array | int) -> None:
  """Give every LoRA dropout a fresh stream keyed `fold_in(key, n)`, n = the layer's graph order."""
  key = jax.random.key(key) if isinstance(key, int) else key
  for n, (_, lin) in enumerate(_lora_linears(model)):
    lin.reseed_lora_dropout(jax.random.fold_in(key, n))


def adapter_state(model: nnx.Module) -> nnx.State:
  """The LoRA factors only, for adapter-only checkpoints."""
  return nnx.state(model, nnx.LoRAParam)


def trainable_filter(mode: str = "lora", pattern: str | None = None, *,
                     model: nnx.Module | None = None):
  """An nnx filter for the trainable parameters.

  "lora": `nnx.LoRAParam` only; "full": every `nnx.Param` (LoRA factors included, since LoRAParam
  subclasses Param); "regex": `nnx.Param`s whose '/'-joined path matches `pattern` (re.search).
  With `model`, raises if the filter selects nothing.
  """
  if mode not in MODES:
    raise ValueError(f"trainable mode {mode!r} is unknown; use one of {MODES}.")
  if mode == "regex":
    if not pattern:
      raise ValueError('trainable mode "regex" needs a pattern, e.g. "attn/(q|v)_proj/kernel".')
    regex = re.compile(pattern)
    path_filter = lambda path, _: bool(regex.search("/".join(str(p) for p in path)))
    filt = nnx.All(nnx.Param, path_filter)
  elif pattern is not None:
    raise ValueError(f"a pattern is only used with mode='regex'; got mode={mode!r}.")
  else:
    filt = nnx.LoRAParam if mode == "lora" else nnx.Param
  if model is not None and count_params(model, filt) == 0:
    hint = " Call apply_lora first." if mode == "lora" else ""
    raise ValueError(
        f"trainable filter mode={mode!r} pattern={pattern!r} selects no parameters.{hint}")
  return filt


def count_params(model: nnx.Module, filt=nnx.Param) -> int:
  """Number of scalars in the variables `filt` selects."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, filt))))


@contextlib.contextmanager
def disabled(model: nnx.Module):
  """Adapters off inside the block (the base model, e.g. DPO's reference); restored on exit."""
  layers = [lin for _, lin in _lora_linears(model)]
  if any(lin.lora_merged for lin in layers):
    raise ValueError("disabled() cannot remove adapters folded into the kernels; unmerge first.")
  before = [lin.lora_enabled for lin in layers]
  try:
    for lin in layers:
      lin.lora_enabled = False
    yield model
  finally:
    for lin, enabled in zip(layers, before):
      lin.lora_enabled = enabled


def merge(model: nnx.Module) -> nnx.Module:
  """Fold `A·B·scaling` into each adapted kernel (forward then skips the LoRA path), in place."""
  for _, lin in _lora_linears(model):
    if not lin.lora_merged:
      k = lin.kernel[...]
      lin.kernel.set_value((k.astype(jnp.float32) + lin.lora_delta()).astype(k.dtype))
      lin.lora_merged = True
  return model


def unmerge(model: nnx.Module) -> nnx.Module:
  """Subtract the folded adapters back out of the kernels, in place."""
  for _, lin in _lora_linears(model):
    if lin.lora_merged:
      k = lin.kernel[...]
      lin.kernel.set_value((k.astype(jnp.float32) - lin.lora_delta()).astype(k.dtype))
      lin.lora_merged = False
  return model


def _peft_key(i: int, t: str, factor: str) -> str:
  _, proj, parent = _TARGETS[t]
  return f"{_PEFT_PREFIX}.{i}.{parent}.{proj}.lora_{factor}.weight"


def export_peft(model: nnx.Module, path: str | os.PathLike, *, cfg: LoraConfig,
                base_model_name_or_path: str) -> Path:
  """Write a PEFT LoRA adapter directory (A as `[r, in_features]`, B as `[out_features, r]`)."""
  from safetensors.numpy import save_file

  layers = list(_targets_of(model, cfg.targets))
  if sum(1 for _ in _lora_linears(model)) != len(layers):
    raise ValueError(f"the model has adapters outside cfg.targets={cfg.targets}; export with the "
                     "LoraConfig passed to apply_lora.")
  for i, t, lin in layers:
    if lin.lora_rank != cfg.rank:
      raise ValueError(f"layers.{i} {t}: adapter rank {lin.lora_rank} does not match cfg.rank "
                       f"{cfg.rank}; export with the LoraConfig passed to apply_lora.")
    if lin.lora_merged:
      raise ValueError("the adapters are merged into the kernels; unmerge(model) before export.")
  tensors = {}
  for i, t, lin in layers:
    r = lin.lora_rank
    # Our kernels flatten (C order) to HF's [in, out] layout, so A/B flatten the same way.
    a = np.asarray(lin.lora_a[...], np.float32).reshape(-1, r).T
    b = np.asarray(lin.lora_b[...], np.float32).reshape(r, -1).T
    tensors[_peft_key(i, t, "A")] = np.ascontiguousarray(a)
    tensors[_peft_key(i, t, "B")] = np.ascontiguousarray(b)
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  config = {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": cfg.rank,
      "lora_alpha": cfg.alpha,
      "lora_dropout": cfg.dropout,
      "target_modules": [_TARGETS[t][1] for t in cfg.targets],
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "use_rslora": False,
      "use_dora": False,
      "modules_to_save": None,
      "layers_to_transform": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }
  (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
  return path


def _config_from_peft(hf: dict, source: str) -> LoraConfig:
  hf = {**_PEFT_DEFAULTS, **hf}
  if hf["peft_type"] != "LORA":
    raise ValueError(f"{source}: peft_type={hf['peft_type']!r}; only LORA adapters load.")
  for field, plain in _PEFT_UNSUPPORTED.items():
    value = hf[field]
    if value != plain and not (plain is None and value == []):
      raise ValueError(f"{source}: {field}={value!r} is not supported (only {plain!r}).")
  modules = hf["target_modules"]
  if isinstance(modules, str):
    if modules != ALL_LINEAR:
      raise ValueError(f"{source}: target_modules={modules!r}; only lists of names or "
                       f"{ALL_LINEAR!r} are supported.")
    targets = ALL_LINEAR
  else:
    bad = [m for m in modules or () if m not in _HF_TO_SHORT]
    if bad or not modules:
      raise ValueError(f"{source}: target_modules {bad or modules} are unknown; allowed are "
                       f"{list(_HF_TO_SHORT)}.")
    targets = tuple(_HF_TO_SHORT[m] for m in modules)
  return LoraConfig(rank=hf["r"], alpha=hf["lora_alpha"], dropout=hf["lora_dropout"],
                    targets=targets)


def load_peft(model: nnx.Module, path: str | os.PathLike, *,
              rngs: nnx.Rngs | None = None) -> LoraConfig:
  """Apply and fill the PEFT LoRA adapter at `path` (as `export_peft` writes it); its config."""
  from safetensors.numpy import load_file

  path = Path(path)
  for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
    if not (path / name).is_file():
      raise FileNotFoundError(f"{path}: no {name}; pass a PEFT adapter directory.")
  cfg = _config_from_peft(json.loads((path / ADAPTER_CONFIG).read_text()), str(path))
  tensors = load_file(str(path / ADAPTER_WEIGHTS))
  layers = list(_targets_of(model, cfg.targets))
  expected = {_peft_key(i, t, f) for i, t, _ in layers for f in "AB"}
  missing = sorted(expected - set(tensors))
  unexpected = sorted(set(tensors) - expected)
  if missing or unexpected:
    raise ValueError(f"{path}: adapter keys do not match this model and config: "
                     f"missing={missing[:4]} unexpected={unexpected[:4]}.")
  r = cfg.rank
  for i, t, lin in layers:
    want = {"A": (r, int(np.prod(lin.in_shape))), "B": (int(np.prod(lin.out_shape)), r)}
    for f, shape in want.items():
      got = tensors[_peft_key(i, t, f)].shape
      if tuple(got) != shape:
        raise ValueError(f"{path}: {_peft_key(i, t, f)} has shape {tuple(got)}; this model "
                         f"needs {shape}.")
  apply_lora(model, cfg, rngs=rngs or nnx.Rngs(0))
  for i, t, lin in layers:
    a = tensors[_peft_key(i, t, "A")].T.reshape(lin.in_shape + (r,))
    b = tensors[_peft_key(i, t, "B")].T.reshape((r,) + lin.out_shape)
    lin.lora_a.set_value(jnp.asarray(a, lin.lora_a[...].dtype))
    lin.lora_b.set_value(jnp.asarray(b, lin.lora_b[...].dtype))
  return cfg
