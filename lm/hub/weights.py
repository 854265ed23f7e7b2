"""Weight import/export: HF Llama-family safetensors directories (regex key map) and GGUF files.

Our layout keeps heads as their own axis: q `[D, N, H]`, k/v `[D, K, H]`, o `[N, H, D]`, MLP
kernels `[in, out]`. HF stores linear weights as `[out, in]`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import ModelConfig, RopeScaling
from lm.model import Transformer

HF_MODEL_TYPES = ("llama", "mistral")
GGUF_ARCHITECTURES = ("llama",)
# The `config.json` fields `config_from_hf` reads that a file may leave out, at the value taken
# then (transformers'; None: derived from other fields, or none).
_HF_DEFAULTS = {
    "model_type": None, "rope_theta": None, "rope_parameters": None, "rope_scaling": None,
    "layer_types": None, "num_key_value_heads": None, "head_dim": None,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "sliding_window": None}
# The same for `rope_parameters` (v5) and the legacy `rope_scaling` over it; rope_theta: unless
# config.json has one; type: unless rope_type is set; beta_fast and beta_slow also when null, as
# transformers' YaRN.
_HF_ROPE_DEFAULTS = {
    "rope_theta": 10000.0, "rope_type": None, "type": "default", "factor": None,
    "original_max_position_embeddings": None, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None,
    "mscale_all_dim": None, "truncate": True}

Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _linear_in(out_shape_fn):
  """HF `[out, in]` -> ours `[in, *out]`."""
  return lambda w, c: w.T.reshape((w.shape[1],) + out_shape_fn(c))


def _o_in(w, c):
  return w.T.reshape(c.n_heads, c.head_dim, c.d_model)


def _o_out(w, c):
  return w.reshape(c.n_heads * c.head_dim, c.d_model).T


def _linear_out(w, c):
  return w.reshape(w.shape[0], -1).T


def _same(w, c):
  return w


def _flat(w, c):
  return w.reshape(-1)


# (HF key regex, our path template, HF->ours, ours->HF)
_HF_RULES: list[tuple[str, str, Transform, Transform]] = [
    (r"model\.embed_tokens\.weight", "embed.embedding", _same, _same),
    (r"model\.norm\.weight", "final_norm.scale", _same, _same),
    (r"lm_head\.weight", "lm_head.kernel", lambda w, c: w.T, lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.input_norm.scale", _same, _same),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.post_attn_norm.scale",
     _same, _same),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{0}.attn.q_proj.kernel",
     _linear_in(lambda c: (c.n_heads, c.head_dim)), _linear_out),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{0}.attn.k_proj.kernel",
     _linear_in(lambda c: (c.n_kv_heads, c.head_dim)), _linear_out),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{0}.attn.v_proj.kernel",
     _linear_in(lambda c: (c.n_kv_heads, c.head_dim)), _linear_out),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attn.o_proj.kernel", _o_in,
     _o_out),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.{0}.attn.q_proj.bias",
     lambda w, c: w.reshape(c.n_heads, c.head_dim), _flat),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.{0}.attn.k_proj.bias",
     lambda w, c: w.reshape(c.n_kv_heads, c.head_dim), _flat),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.{0}.attn.v_proj.bias",
     lambda w, c: w.reshape(c.n_kv_heads, c.head_dim), _flat),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", "layers.{0}.attn.o_proj.bias", _same, _same),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", "layers.{0}.attn.sinks", _same, _same),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.mlp.gate_proj.kernel",
     lambda w, c: w.T, lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.mlp.up_proj.kernel",
     lambda w, c: w.T, lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.mlp.down_proj.kernel",
     lambda w, c: w.T, lambda w, c: w.T),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.bias", "layers.{0}.mlp.{1}_proj.bias",
     _same, _same),
]

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


class WeightsError(ValueError):
  """A weights file or directory that cannot be loaded, with the reason and the fix."""


def _path_str(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def build_from_arrays(cfg: ModelConfig, arrays: dict[str, np.ndarray], source: str) -> Transformer:
  """A Transformer whose parameters are `arrays` (our dotted paths); no random init is run."""
  return build_module(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), arrays, source,
                      hint="Check that the file is a complete Llama-family checkpoint.")


def build_module(make, arrays: dict[str, np.ndarray], source: str, hint: str = ""):
  """The NNX module `make()` builds, with every variable (params and batch statistics) set from
  `arrays` by dotted path; `make` only runs abstractly (no random init). Names or shapes that do
  not match raise `WeightsError` naming them."""
  abstract = nnx.eval_shape(make)
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  wanted = {_path_str(p) for p, _ in flat}
  missing = sorted(wanted - set(arrays))
  unexpected = sorted(set(arrays) - wanted)
  if missing or unexpected:
    raise WeightsError(
        f"{source}: weights do not match the model. missing={missing[:6]} "
        f"unexpected={unexpected[:6]}. {hint}".rstrip()
    )
  for path, var in flat:
    key = _path_str(path)
    want = var.get_value()
    arr = arrays[key]
    if tuple(arr.shape) != tuple(want.shape):
      raise WeightsError(f"{source}: {key} has shape {arr.shape}, the model expects {want.shape}.")
    var.set_value(jnp.asarray(arr, dtype=want.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def hf_to_ours(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], source: str):
  """Map HF tensor names/layouts onto our dotted parameter paths."""
  out: dict[str, np.ndarray] = {}
  for name, w in tensors:
    if name.endswith("rotary_emb.inv_freq"):
      continue
    for pattern, template, to_ours, _ in _HF_RULES:
      m = re.fullmatch(pattern, name)
      if m:
        out[template.format(*m.groups())] = to_ours(np.asarray(w, np.float32), cfg)
        break
    else:
      raise WeightsError(f"{source}: tensor {name!r} has no mapping; is this a Llama-family model?")
  if cfg.tie_embeddings:
    out.pop("lm_head.kernel", None)
  return out


def ours_to_hf(model: Transformer) -> dict[str, np.ndarray]:
  """HF-named float32 arrays of the base weights; LoRA adapters must be merged first."""
  cfg = model.cfg
  if nnx.state(model, nnx.LoRAParam) and not all(
      getattr(m, "lora_merged", True) for _, m in nnx.iter_graph(model)
      if getattr(m, "lora_rank", 0)):
    raise WeightsError("the model has unmerged LoRA adapters: call lm.lora.merge(model) to "
                       "export merged weights, or lm.lora.export_peft for the adapter alone.")
  flat = nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  out = {}
  for path, var in flat:
    key = _path_str(path)
    for pattern, template, _, to_hf in _HF_RULES:
      hf_name = _template_to_hf(pattern, template, key)
      if hf_name is not None:
        out[hf_name] = np.ascontiguousarray(to_hf(np.asarray(var.get_value(), np.float32), cfg))
        break
    else:
      raise WeightsError(f"parameter {key} has no HF name; it cannot be exported.")
  return out


def _template_to_hf(pattern: str, template: str, key: str) -> str | None:
  regex = "^" + re.escape(template).replace(r"\{0\}", r"(\d+)").replace(r"\{1\}", r"(\w+)") + "$"
  m = re.match(regex, key)
  if not m:
    return None
  name = pattern.replace("\\.", ".")
  for g in m.groups():
    name = re.sub(r"\([^)]*\)", g, name, count=1)
  return name


def config_from_hf(hf: dict, *, dtype: str = "float32", name: str = "hf") -> ModelConfig:
  """ModelConfig from an HF `config.json` dict (legacy `rope_scaling` or v5 `rope_parameters`)."""
  hf = {**_HF_DEFAULTS, **hf}
  model_type = hf["model_type"]
  if model_type not in HF_MODEL_TYPES:
    raise WeightsError(
        f"config.json has model_type={model_type!r}; postlab loads {HF_MODEL_TYPES} decoders."
    )
  rope_params = {**_HF_ROPE_DEFAULTS, **dict(hf["rope_parameters"] or {})}
  scaling = {**rope_params, **dict(hf["rope_scaling"] or {})}
  theta = hf["rope_theta"] if hf["rope_theta"] is not None else rope_params["rope_theta"]
  kind = scaling["rope_type"] or scaling["type"]
  rope = RopeScaling(
      kind=kind,
      factor=float(scaling["factor"] or (
          hf["max_position_embeddings"] / scaling["original_max_position_embeddings"]
          if kind == "yarn" and scaling["original_max_position_embeddings"] else 1.0)),
      original_max_position=scaling["original_max_position_embeddings"],
      low_freq_factor=float(scaling["low_freq_factor"]),
      high_freq_factor=float(scaling["high_freq_factor"]),
      beta_fast=float(scaling["beta_fast"] or _HF_ROPE_DEFAULTS["beta_fast"]),
      beta_slow=float(scaling["beta_slow"] or _HF_ROPE_DEFAULTS["beta_slow"]),
      attention_factor=scaling["attention_factor"],
      mscale=scaling["mscale"],
      mscale_all_dim=scaling["mscale_all_dim"],
      truncate=bool(scaling["truncate"]),
  )
  n_heads = hf["num_attention_heads"]
  layer_types = hf["layer_types"]
  if layer_types is not None:
    layer_types = tuple("sliding" if "sliding" in t else "full" for t in layer_types)
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=n_heads,
      n_kv_heads=hf["num_key_value_heads"] or n_heads,
      d_ff=hf["intermediate_size"],
      head_dim=hf["head_dim"] or hf["hidden_size"] // n_heads,
      max_seq_len=hf["max_position_embeddings"],
      rope_theta=float(theta),
      rope_scaling=rope,
      rms_eps=hf["rms_norm_eps"],
      tie_embeddings=bool(hf["tie_word_embeddings"]),
      attention_bias=bool(hf["attention_bias"]),
      mlp_bias=bool(hf["mlp_bias"]),
      sliding_window=hf["sliding_window"],
      layer_types=layer_types,
      dtype=dtype,
      param_dtype=dtype,
      name=name,
  )


def config_to_hf(cfg: ModelConfig) -> dict:
  if cfg.attention_sinks or "sliding" in cfg.layer_types:
    raise WeightsError(
        "attention sinks / sliding windows have no transformers Llama equivalent; export only plain "
        "Llama configs."
    )
  s = cfg.rope_scaling
  rope_scaling = None
  if s.kind != "default":
    rope_scaling = {"rope_type": s.kind, "factor": s.factor}
    if s.original_max_position is not None:
      rope_scaling["original_max_position_embeddings"] = s.original_max_position
    if s.kind == "llama3":
      rope_scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    if s.kind == "yarn":
      rope_scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
      for k in ("attention_factor", "mscale", "mscale_all_dim"):
        if getattr(s, k) is not None:
          rope_scaling[k] = getattr(s, k)
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": cfg.attention_bias,
      "mlp_bias": cfg.mlp_bias,
      "hidden_act": "silu",
      "torch_dtype": "float32",
  }


def config_from_hf_dir(path: str | os.PathLike, *, dtype: str = "float32") -> ModelConfig:
  """The architecture in an HF directory's `config.json`."""
  path = Path(path)
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise WeightsError(f"{path}: no config.json; pass an HF model directory or a .gguf file.")
  return config_from_hf(json.loads(cfg_file.read_text()), dtype=dtype, name=path.name)


def load_hf_dir(path: str | os.PathLike, *, dtype: str = "float32") -> Transformer:
  """A Transformer from an HF directory with `config.json` and `*.safetensors`."""
  from safetensors import safe_open
  from safetensors import SafetensorError

  path = Path(path)
  cfg = config_from_hf_dir(path, dtype=dtype)
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise WeightsError(
        f"{path}: no *.safetensors weights (PyTorch .bin is not read); re-save the model with "
        "save_pretrained(safe_serialization=True)."
    )

  def tensors():
    for f in files:
      try:
        with safe_open(f, framework="numpy") as fh:
          for key in fh.keys():
            yield key, fh.get_tensor(key)
      except (SafetensorError, OSError) as e:
        raise WeightsError(f"{f}: unreadable safetensors file ({e}); re-download or re-export it.")

  return build_from_arrays(cfg, hf_to_ours(cfg, tensors(), str(path)), str(path))


def save_hf_dir(model: Transformer, path: str | os.PathLike, tokenizer=None) -> Path:
  """Write `config.json` + `model.safetensors` (+ tokenizer files) that transformers loads."""
  from safetensors.numpy import save_file

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  hf_cfg = config_to_hf(model.cfg)
  if tokenizer is not None:
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
      value = getattr(tokenizer, field, None)
      if value is not None:
        hf_cfg[field] = value
    tokenizer.save_pretrained(path)
  tmp = path / "model.safetensors.tmp"
  save_file(ours_to_hf(model), str(tmp), metadata={"format": "pt"})
  os.replace(tmp, path / "model.safetensors")
  (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  return path


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  return value


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF rotate-half halves)."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(reader, *, dtype: str = "float32", name: str = "gguf") -> ModelConfig:
  arch = _gguf_field(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise WeightsError(
        f"GGUF architecture {arch!r} is not supported; postlab reads {GGUF_ARCHITECTURES} GGUF files."
    )
  f = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)
  d = int(f("embedding_length"))
  n_heads = int(f("attention.head_count"))
  vocab = f("vocab_size")
  if vocab is None:
    vocab = len(_gguf_field(reader, "tokenizer.ggml.tokens"))
  kind = f("rope.scaling.type", "none")
  rope = RopeScaling()
  if kind in ("linear", "yarn"):
    rope = RopeScaling(kind=kind, factor=float(f("rope.scaling.factor", 1.0)),
                       original_max_position=f("rope.scaling.original_context_length"))
  elif kind != "none":
    raise WeightsError(f"GGUF rope.scaling.type={kind!r} is not supported (linear, yarn are).")
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  return ModelConfig(
      vocab_size=int(vocab),
      d_model=d,
      n_layers=int(f("block_count")),
      n_heads=n_heads,
      n_kv_heads=int(f("attention.head_count_kv", n_heads)),
      d_ff=int(f("feed_forward_length")),
      head_dim=int(f("attention.key_length", d // n_heads)),
      max_seq_len=int(f("context_length", 2048)),
      rope_theta=float(f("rope.freq_base", 10000.0)),
      rope_scaling=rope,
      rms_eps=float(f("attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings=not has_output,
      dtype=dtype,
      param_dtype=dtype,
      name=name,
  )


def open_gguf(path: str | os.PathLike):
  """The file's `gguf.GGUFReader` (read-only memory map). Parsing the metadata of a 49k-token
  vocabulary takes seconds, so a process keeps the readers of the last files it opened, keyed by
  path, size and modification time: loading the same model again (pipeline stages, evaluations
  of several runs on one base) parses it once."""
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"{path}: GGUF file not found.")
  stat = path.stat()
  return _gguf_reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: str, size: int, mtime_ns: int):
  del size, mtime_ns  # the cache key: a rewritten file is parsed again
  import gguf

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises bare ValueError/struct errors on bad files
    raise WeightsError(
        f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is corrupt or "
        "truncated: download it again."
    ) from e


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32") -> Transformer:
  """A Transformer from a llama-architecture GGUF file (any quantization `gguf` dequantizes); its
  metadata is parsed once per process (`open_gguf`)."""
  import gguf

  reader = open_gguf(path)
  cfg = config_from_gguf(reader, dtype=dtype, name=Path(path).stem)

  def tensors():
    for t in reader.tensors:
      try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
      except Exception as e:
        raise WeightsError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be dequantized: {e}")
      name = t.name
      if name in _GGUF_NAMES:
        yield _GGUF_NAMES[name], w
        continue
      m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
      if not m or m.group(2) not in _GGUF_LAYER_NAMES:
        raise WeightsError(f"{path}: GGUF tensor {name!r} has no mapping.")
      if m.group(2) == "attn_q.weight":
        w = _unpermute_qk(w, cfg.n_heads)
      elif m.group(2) == "attn_k.weight":
        w = _unpermute_qk(w, cfg.n_kv_heads)
      yield f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}", w

  return build_from_arrays(cfg, hf_to_ours(cfg, tensors(), str(path)), str(path))
