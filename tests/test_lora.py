"""LoRA as a parameter mask: B=0 is the base model, only adapters train, PEFT loads our export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lm
from lm import lora
from lm import scoring
from lm.hub import weights

TOKENS_BS = np.array([[5, 17, 99, 3, 42, 7, 250, 11], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
# tiny preset: D=64, F=128, N=4, K=2, H=16, 2 layers, tied 256-token embedding
TINY_PARAMS = 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128 + 2 * 64) + 256 * 64 + 64
# rank 8, per layer: q,o 8*(64+64); k,v 8*(64+32); gate,up,down 8*(64+128)
TINY_LORA_R8 = 2 * 8 * (2 * 128 + 2 * 96 + 3 * 192)


@pytest.fixture(scope="module")
def tiny():
  """Tiny preset with large random weights, so layout or masking mistakes move the logits.

  Built from numpy arrays (no random-init kernels to compile), norms near 1.
  """
  cfg = lm.preset("tiny")
  abstract = nnx.eval_shape(lambda: lm.Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  arrays = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract)):
    key, shape = ".".join(map(str, path)), var.get_value().shape
    arrays[key] = (1.0 + 0.2 * rng.standard_normal(shape) if key.endswith("scale")
                   else 0.15 * rng.standard_normal(shape)).astype(np.float32)
  return weights.build_from_arrays(cfg, arrays, "test")


def _set_b(model, seed, std=0.3):
  """Random nonzero B factors, so the adapters change the logits."""
  rng = np.random.default_rng(seed)
  for _, lin in lora._lora_linears(model):
    b = std * rng.standard_normal(lin.lora_b[...].shape)
    lin.lora_b.set_value(jnp.asarray(b, jnp.float32))


def _logits(model, tokens_bs=TOKENS_BS):
  return np.asarray(model(jnp.asarray(tokens_bs))[0])


def _flat(state):
  return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_zero_b_is_exactly_the_base_model(tiny):
  m = nnx.clone(tiny)
  base = _logits(m)
  lora.apply_lora(m, lora.LoraConfig(targets="all-linear"), rngs=nnx.Rngs(1))
  assert lora.count_params(m, nnx.LoRAParam) == TINY_LORA_R8
  q = m.layers[0].attn.q_proj
  assert q.lora_a[...].shape == (64, 8) and q.lora_b[...].shape == (8, 4, 16)
  assert q.lora_a.get_metadata()["logical_axes"] == ("embed", "lora_rank")
  assert q.lora_b.get_metadata()["logical_axes"] == ("lora_rank", "heads", "head_dim")
  assert np.abs(np.asarray(q.lora_a[...])).max() <= 1 / 8  # PEFT init bound 1/sqrt(fan_in=64)
  # Train mode with dropout on: B = 0 still adds exact zeros.
  np.testing.assert_array_equal(_logits(m), base)


def test_one_step_changes_only_lora_params(tiny):
  m = nnx.clone(tiny)
  lora.apply_lora(m, lora.LoraConfig(), rngs=nnx.Rngs(1))
  filt = lora.trainable_filter("lora", model=m)
  graphdef, trainable, rest = nnx.split(m, filt, ...)
  before = _flat(nnx.state(m, nnx.Param))
  tx = optax.adamw(1e-2)
  opt_state = tx.init(trainable)
  tokens = jnp.asarray(TOKENS_BS)

  @jax.jit
  def step(trainable, rest, opt_state, key):
    def loss_fn(trainable):
      model = nnx.merge(graphdef, trainable, rest)
      lora.set_dropout_key(model, key)
      logits_bsv, _ = model(tokens[:, :-1])
      return -scoring.token_logprobs(logits_bsv, tokens[:, 1:]).mean()

    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  trainable, opt_state = step(trainable, rest, opt_state, jax.random.key(0))
  nnx.update(m, trainable)
  after = _flat(nnx.state(m, nnx.Param))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  lora_b = {k for k in before if k.endswith("lora_b")}
  assert lora_b and lora_b <= changed  # B got a real gradient
  assert all(k.endswith(("lora_a", "lora_b")) for k in changed), sorted(changed)


def test_filters_select_exactly(tiny):
  m = nnx.clone(tiny)
  assert lora.count_params(m, lora.trainable_filter("full", model=m)) == TINY_PARAMS
  lora.apply_lora(m, lora.LoraConfig(), rngs=nnx.Rngs(1))
  assert lora.count_params(m, lora.trainable_filter("full")) == TINY_PARAMS + TINY_LORA_R8
  assert lora.count_params(m, lora.trainable_filter("lora")) == TINY_LORA_R8
  filt = lora.trainable_filter("regex", r"attn/(q|v)_proj/kernel$", model=m)
  assert set(_flat(nnx.state(m, filt))) == {
      f"layers/{i}/attn/{p}_proj/kernel" for i in range(2) for p in "qv"}
  assert lora.count_params(m, filt) == 2 * (64 * 64 + 64 * 32)
  with pytest.raises(ValueError, match="selects no parameters"):
    lora.trainable_filter("regex", "nothing_is_called_this", model=m)


def test_disabled_merge_unmerge(tiny):
  m = nnx.clone(tiny)
  base = _logits(m)
  lora.apply_lora(m, lora.LoraConfig(rank=4, dropout=0.0, targets=("q", "o", "down")),
                  rngs=nnx.Rngs(1))
  _set_b(m, seed=2)
  adapted = _logits(m)
  assert np.abs(adapted - base).max() > 1e-2
  with lora.disabled(m):
    np.testing.assert_array_equal(_logits(m), base)
  np.testing.assert_array_equal(_logits(m), adapted)
  with pytest.raises(RuntimeError):
    with lora.disabled(m):
      raise RuntimeError("restored on exceptions too")
  assert all(lin.lora_enabled for _, lin in lora._lora_linears(m))

  kernels = _flat(nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  lora.merge(m)
  np.testing.assert_allclose(_logits(m), adapted, atol=1e-5)
  with pytest.raises(ValueError, match="unmerge first"):
    with lora.disabled(m):
      pass
  lora.unmerge(m)
  for k, v in _flat(nnx.state(m, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))).items():
    np.testing.assert_allclose(v, kernels[k], atol=1e-6, err_msg=k)
  np.testing.assert_allclose(_logits(m), adapted, atol=1e-5)


def test_dropout_is_a_function_of_the_key(tiny):
  m = nnx.clone(tiny)
  lora.apply_lora(m, lora.LoraConfig(dropout=0.3), rngs=nnx.Rngs(1))
  _set_b(m, seed=2)
  graphdef, lora_state, rest = nnx.split(m, nnx.LoRAParam, ...)

  @jax.jit
  def forward(lora_state, rest, key, tokens_bs):
    model = nnx.merge(graphdef, lora_state, rest)
    lora.set_dropout_key(model, key)
    return model(tokens_bs)[0]

  tokens = jnp.asarray(TOKENS_BS)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  out0 = np.asarray(forward(lora_state, rest, k0, tokens))
  np.testing.assert_array_equal(np.asarray(forward(lora_state, rest, k0, tokens)), out0)
  assert np.abs(np.asarray(forward(lora_state, rest, k1, tokens)) - out0).max() > 1e-3
  # Eager: the same key replays the same masks after other calls advanced the streams.
  lora.set_dropout_key(m, 7)
  first = _logits(m)
  assert np.abs(_logits(m) - first).max() > 1e-3
  lora.set_dropout_key(m, 7)
  np.testing.assert_array_equal(_logits(m), first)

  m.eval()
  evaluated = _logits(m)
  np.testing.assert_array_equal(_logits(m), evaluated)
  no_dropout = nnx.clone(tiny)
  lora.apply_lora(no_dropout, lora.LoraConfig(dropout=0.0), rngs=nnx.Rngs(1))
  nnx.update(no_dropout, nnx.state(m, nnx.LoRAParam))
  np.testing.assert_array_equal(_logits(no_dropout), evaluated)
  m.train()
  assert np.abs(_logits(m) - evaluated).max() > 1e-3


def _hf_llama(tmp_path):
  """A random tiny untied HF Llama saved under tmp_path; (hf_model, dir)."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from tests_helpers import random_hf_llama

  return random_hf_llama(tmp_path / "hf", tie=False, max_position_embeddings=16), tmp_path / "hf"


@pytest.mark.parity
def test_peft_loads_our_export(tmp_path):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  from safetensors.numpy import load_file, save_file


  hf_model, hf_dir = _hf_llama(tmp_path)
  ours = weights.load_hf_dir(hf_dir)
  base = _logits(ours)
  cfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets="all-linear")
  lora.apply_lora(ours, cfg, rngs=nnx.Rngs(3))
  _set_b(ours, seed=4, std=0.2)
  ours.eval()
  adapted = _logits(ours)
  assert np.abs(adapted - base).max() > 1e-1  # the adapter matters, so the comparison bites
  out = lora.export_peft(ours, tmp_path / "adapter", cfg=cfg, base_model_name_or_path=str(hf_dir))

  peft_model = peft.PeftModel.from_pretrained(hf_model, str(out)).eval()
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(TOKENS_BS, dtype=torch.long)).logits.numpy()
  assert np.abs(ref - adapted).max() <= 1e-4

  fresh = weights.load_hf_dir(hf_dir)
  assert lora.load_peft(fresh, out) == cfg
  want, got = _flat(lora.adapter_state(ours)), _flat(lora.adapter_state(fresh))
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  tensors = load_file(str(out / lora.ADAPTER_WEIGHTS))
  gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
  del tensors[gone]
  save_file(tensors, str(out / lora.ADAPTER_WEIGHTS))
  with pytest.raises(ValueError, match=gone.replace(".", r"\.")):
    lora.load_peft(weights.load_hf_dir(hf_dir), out)
  assert json.loads((out / lora.ADAPTER_CONFIG).read_text())["target_modules"] == [
      "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_errors(tiny):
  with pytest.raises(ValueError, match=r"lora\.targets.*'qq'.*allowed"):
    lora.LoraConfig(targets=("q", "qq"))
  with pytest.raises(ValueError, match="unknown fields"):
    lora.LoraConfig.from_config({"rank": 4, "alhpa": 1.0})
  assert lora.LoraConfig.from_config({"rank": 4, "targets": "q,v"}).targets == ("q", "v")
  with pytest.raises(ValueError, match="trainable mode 'qlora' is unknown"):
    lora.trainable_filter("qlora")
  with pytest.raises(ValueError, match="needs a pattern"):
    lora.trainable_filter("regex")
  m = nnx.clone(tiny)
  with pytest.raises(ValueError, match="apply_lora first"):
    lora.trainable_filter("lora", model=m)
  lora.apply_lora(m, lora.LoraConfig(targets=("q",)), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already has LoRA"):
    lora.apply_lora(m, lora.LoraConfig(), rngs=nnx.Rngs(0))


def test_lora_product_backward_equals_autodiff():
  """The hand-written LoRA backward gives autodiff's gradients for x, A and B."""
  from lm.layers import lora_product

  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (12, 6))
  a = jax.random.normal(k[1], (6, 3))
  b = jax.random.normal(k[2], (3, 5))
  w = jax.random.normal(k[3], (12, 5))

  def f(fn):
    return lambda x, a, b: (jnp.tanh(fn(x, a, b)) * w).sum()

  ours = jax.grad(f(lambda x, a, b: lora_product(x, a, b, 2.5)), argnums=(0, 1, 2))(x, a, b)
  ref = jax.grad(f(lambda x, a, b: (x @ a) @ b * 2.5), argnums=(0, 1, 2))(x, a, b)
  for g, r in zip(ours, ref):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
