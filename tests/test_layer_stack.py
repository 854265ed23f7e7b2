"""The layer stack's execution options change no number: scanned = unrolled, every remat policy =
none (logits and gradients), and captured residual streams = the forward truncated there."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from lm import lora
from tests_helpers import scrambled

SEQ = 12
LENGTHS = (12, 8, 3)


def _batch(seed=0, vocab=256):
  rng = np.random.default_rng(seed)
  mask = np.zeros((len(LENGTHS), SEQ), np.int32)
  for i, n in enumerate(LENGTHS):
    mask[i, SEQ - n:] = 1
  return jnp.asarray(rng.integers(1, vocab, mask.shape) * mask, jnp.int32), jnp.asarray(mask)


# Mixed sliding/full layers with sink logits and a sink token: the scan selects each layer's mask by
# its type.
MIXED = lm.preset("tiny").replace(n_layers=4, sliding_window=3, attention_sinks=True, sink_tokens=1,
                                  layer_types=("full", "sliding", "sliding", "full"))


def _model(cfg, seed=0, **execution):
  model = scrambled(lm.Transformer(cfg, rngs=nnx.Rngs(0)), seed)
  model.cfg = model.cfg.replace(**execution)
  return model


def _copy(model, **execution):
  """`model`'s weights in a model of other execution settings (built from shapes alone: eagerly
  initialising SmolLM2's 135M parameters to overwrite them costs seconds)."""
  other = nnx.eval_shape(lambda: lm.Transformer(model.cfg.replace(**execution), rngs=nnx.Rngs(1)))
  nnx.update(other, nnx.state(model))
  return other


def _loss_and_grads(model, tokens, mask):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def f(params, rest):
    def loss(p):
      logits, _ = nnx.merge(graphdef, p, rest)(tokens, attn_mask=mask)
      return (jnp.where(mask[..., None] > 0, logits, 0.0) ** 2).mean(), logits
    return jax.value_and_grad(loss, has_aux=True)(params)

  (value, logits), grads = f(params, rest)
  return np.asarray(logits), float(value), jax.tree.map(np.asarray, grads)


def _assert_close(actual, desired, tol=1e-5):
  """max|actual - desired| <= tol x the scale of `desired` (at least 1): XLA fuses a scanned or
  rematerialised stack differently, so float32 sums differ in their last bits, never by more."""
  scale = max(1.0, float(np.abs(desired).max()))
  assert float(np.abs(np.asarray(actual) - desired).max()) <= tol * scale


def _assert_trees_close(a, b, tol):
  scale = max(1.0, max(float(np.abs(y).max()) for y in jax.tree.leaves(b)))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert float(np.abs(x - y).max()) <= tol * scale


@pytest.mark.parametrize("cfg", [lm.preset("tiny"), MIXED], ids=["tiny", "sliding+sinks"])
def test_scanned_and_rematerialised_stacks_equal_the_plain_one(cfg):
  tokens, mask = _batch()
  plain = _model(cfg)
  logits, value, grads = _loss_and_grads(plain, tokens, mask)
  for remat in ("none", "full", "dots", "dots_no_batch"):
    for scan in (False, True):
      if not scan and remat == "none":
        continue
      other = _copy(plain, scan_layers=scan, remat=remat)
      o_logits, o_value, o_grads = _loss_and_grads(other, tokens, mask)
      _assert_close(o_logits, logits)
      assert abs(o_value - value) <= 1e-5 * abs(value), (remat, scan)
      _assert_trees_close(o_grads, grads, 1e-5)


def test_scan_compiles_one_block():
  """The scanned program holds one block's matmuls, the unrolled one every layer's."""
  tokens, mask = _batch()
  counts = {}
  for scan in (False, True):
    model = _model(MIXED, scan_layers=scan)
    graphdef, state = nnx.split(model)
    hlo = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, attn_mask=mask)[0]).lower(
        state).as_text()
    counts[scan] = hlo.count("dot_general")
  assert counts[True] < counts[False] - 2 * 6  # 7 matmuls per block, 4 blocks


def test_lora_dropout_streams_match_in_the_scan():
  """Train-mode LoRA dropout draws the same masks scanned or unrolled, and advances the same."""
  tokens, mask = _batch()
  models = []
  for scan in (False, True):
    m = _model(lm.preset("tiny"), scan_layers=scan)
    lora.apply_lora(m, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3), rngs=nnx.Rngs(3))
    models.append(m)
  for n, (_, v) in enumerate(nnx.state(models[1], nnx.LoRAParam).flat_state()):
    v.set_value(0.3 * jax.random.normal(jax.random.key(n), v.shape))
  nnx.update(models[0], nnx.state(models[1], nnx.LoRAParam))
  for m in models:
    lora.set_dropout_key(m, 7)
  for _ in range(2):  # the second call uses advanced counters: both stacks must advance them
    a = np.asarray(models[0](tokens, attn_mask=mask)[0])
    b = np.asarray(models[1](tokens, attn_mask=mask)[0])
    _assert_close(b, a)  # one differing dropout mask would move logits by ~0.1
  models[0].eval()
  assert np.abs(np.asarray(models[0](tokens, attn_mask=mask)[0]) - a).max() > 1e-3  # dropout acted


def test_scan_refuses_layers_of_different_structure():
  model = _model(lm.preset("tiny"), scan_layers=True)
  model.layers[1].attn.q_proj.add_lora(2, 4.0, 0.0, rngs=nnx.Rngs(0))
  tokens, mask = _batch()
  with pytest.raises(ValueError, match="layer 1 differs"):
    model(tokens, attn_mask=mask)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_captured_residual_equals_the_forward_truncated_there(scan):
  """Layer L's residual, captured in a full pass, = the output of a model cut after layer L."""
  tokens, mask = _batch()
  model = _model(MIXED, scan_layers=scan)
  full = model.trunk(tokens, attn_mask=mask, capture=(0, 2))
  np.testing.assert_allclose(model(tokens, attn_mask=mask)[0],
                             model.logits(full.hidden_bsd), atol=1e-6)  # capturing changes nothing
  for layer in (0, 2):
    cut = lm.Transformer(MIXED.replace(n_layers=layer + 1, layer_types=MIXED.layer_types[:layer + 1]),
                         rngs=nnx.Rngs(1))
    state = nnx.state(model)
    state["layers"] = {i: state["layers"][i] for i in range(layer + 1)}
    nnx.update(cut, state)
    cut.final_norm.scale[...] = jnp.ones_like(cut.final_norm.scale[...])
    rms = lambda x: x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + MIXED.rms_eps)
    want = np.asarray(cut.hidden_states(tokens, attn_mask=mask)[0])  # norm(residual after layer)
    _assert_close(rms(full.residual[layer]), want)
    early = model.residual_stream(tokens, [layer], attn_mask=mask)
    _assert_close(early[layer], np.asarray(full.residual[layer]), tol=1e-6)


def test_capture_errors_name_the_layer():
  model = _model(lm.preset("tiny"))
  tokens, mask = _batch()
  with pytest.raises(ValueError, match=r"layer index 2 is outside the model's layers \[0, 2\)"):
    model.residual_stream(tokens, [2])
  with pytest.raises(ValueError, match="layers is empty"):
    model.residual_stream(tokens, [])
  with pytest.raises(ValueError, match="remat='some' is not a policy"):
    lm.preset("tiny").replace(remat="some")


@pytest.mark.real_weights
def test_smollm2_scanned_equals_unrolled(smollm2):
  """Real SmolLM2-135M, float32: logits and every parameter's gradient agree to 1e-5 of their
  scale (XLA fuses a scanned body differently from 30 unrolled blocks: the observed gap, ~1.4e-6
  of max|logit| = 30, is the size remat alone makes in the unrolled stack)."""
  base, tok = smollm2
  ids = [tok(t)["input_ids"] for t in ("The capital of France is Paris.", "Rivers: the Nile")]
  width = max(map(len, ids))
  tokens = jnp.asarray([[0] * (width - len(r)) + r for r in ids], jnp.int32)
  mask = jnp.asarray([[0] * (width - len(r)) + [1] * len(r) for r in ids], jnp.int32)
  logits, value, grads = _loss_and_grads(_copy(base), tokens, mask)
  # remat on real weights: test_scanned_and_rematerialised_stacks_equal_the_plain_one (tiny)
  for remat in ("none",):
    o_logits, o_value, o_grads = _loss_and_grads(_copy(base, scan_layers=True, remat=remat),
                                                 tokens, mask)
    assert float(np.abs(o_logits - logits).max()) <= 1e-5 * float(np.abs(logits).max())
    assert abs(o_value - value) <= 1e-5 * abs(value)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
    for g, o in zip(jax.tree.leaves(grads), jax.tree.leaves(o_grads), strict=True):
      assert float(np.abs(g - o).max()) <= 1e-5 * max(scale, 1.0)
