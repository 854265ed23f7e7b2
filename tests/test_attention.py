"""The fused attention path (`lm.attention`) against the unfused reference.

On a CPU the fused path runs XLA's `dot_product_attention`; the sink logits' hand-written backward
is checked against autodiff of an explicit softmax with a sink column. On a GPU (run these with
`JAX_PLATFORMS=cuda`) cuDNN's flash kernel in bf16 is checked against float32 references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.attention import fused_attention
from lm.config import preset
from lm.model import Transformer

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu",
                            reason="needs a GPU (cuDNN); run with JAX_PLATFORMS=cuda")


def _reference(q, k, v, sinks_n, mask_bst):
  """Softmax attention in float32 with an optional sink column of zero value; `[B, S, N, H]`."""
  n, kh = q.shape[2], k.shape[2]
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
  s_len = q.shape[1]
  scores = jnp.einsum("bsnh,btnh->bnst", q, k, precision="highest") * q.shape[-1] ** -0.5
  visible = jnp.tril(jnp.ones((s_len, s_len), bool))[None, None]
  if mask_bst is not None:
    visible = visible & mask_bst[:, None]
  scores = jnp.where(visible, scores, -1e30)
  if sinks_n is not None:
    sink = jnp.broadcast_to(sinks_n.astype(jnp.float32)[None, :, None, None],
                            scores.shape[:-1] + (1,))
    probs = jax.nn.softmax(jnp.concatenate([scores, sink], -1), -1)[..., :-1]
  else:
    probs = jax.nn.softmax(scores, -1)
  return jnp.einsum("bnst,btnh->bsnh", probs, v, precision="highest")


def _inputs(dtype, b=2, s=64, n=4, kh=2, h=32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(ks[0], (b, s, n, h), dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), dtype)
  v = jax.random.normal(ks[2], (b, s, kh, h), dtype)
  sinks = 2.0 * jax.random.normal(ks[3], (n,), jnp.float32)
  cot = jax.random.normal(ks[4], (b, s, n, h), jnp.float32)
  seg = (jnp.arange(s) >= s // 3).astype(jnp.int32) + (jnp.arange(s) >= 2 * s // 3)
  packed = jnp.broadcast_to(seg[:, None] == seg[None, :], (b, s, s))
  return q, k, v, sinks, cot, packed


def _grads(fn, q, k, v, sinks, cot, mask):
  """(loss, (dq, dk, dv[, d_sinks])) of sum(fn(...) * cot)."""
  def loss(q, k, v, sinks):
    return jnp.sum(fn(q, k, v, sinks, mask).astype(jnp.float32) * cot)
  argnums = (0, 1, 2) if sinks is None else (0, 1, 2, 3)
  return jax.value_and_grad(loss, argnums=argnums)(q, k, v, sinks)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _fused(kernel):
  return lambda q, k, v, sinks, mask: fused_attention(q, k, v, mask, sinks, kernel)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_fused_xla_equals_reference(with_sinks, packed):
  q, k, v, sinks, cot, mask = _inputs(jnp.float32)
  sinks = sinks if with_sinks else None
  mask = mask if packed else None
  out = fused_attention(q, k, v, mask, sinks, "xla")
  np.testing.assert_allclose(out, _reference(q, k, v, sinks, mask), atol=2e-6)
  if not with_sinks:
    return
  (_, got), (_, want) = (_grads(f, q, k, v, sinks, cot, mask)
                         for f in (_fused("xla"), _reference))
  for name, a, b in zip("qkvs", got, want):
    assert _rel(a, b) < 1e-5, name


@pytest.mark.parametrize("overrides", [
    {},
    {"n_kv_heads": 1, "attention_sinks": True},
    {"attention_sinks": True, "sliding_window": 6, "sink_tokens": 2},
    {"sliding_window": 6, "scan_layers": True, "remat": "full"},
])
def test_model_fused_equals_unfused(overrides):
  """Logits and gradients of the whole model, plain causal and with a packed-document mask."""
  cfg = preset("tiny", **overrides)
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  seg = jnp.repeat(jnp.array([1, 2]), jnp.array([10, 14]), total_repeat_length=24)
  packed = jnp.broadcast_to(seg[:, None] == seg[None, :], (2, 24, 24))
  positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(10), jnp.arange(14)]), (2, 24))
  results = {}
  for impl in ("unfused", "fused"):
    model = Transformer(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(params=0))
    for layer in model.layers:
      if layer.attn.sinks is not None:
        layer.attn.sinks[...] = jax.random.normal(jax.random.key(3), layer.attn.sinks.shape)
    graphdef, state = nnx.split(model)

    def loss(state, pos, mask):
      logits = nnx.merge(graphdef, state)(tokens, pos, mask)[0]
      return jnp.sum(jnp.sin(logits)), logits

    results[impl] = [jax.value_and_grad(loss, has_aux=True)(state, p, m)
                     for p, m in ((None, None), (positions, packed))]
  for (got, want) in zip(results["fused"], results["unfused"]):
    np.testing.assert_allclose(got[0][1], want[0][1], atol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      assert _rel(a, b) < 1e-5


def test_attention_impl_is_checked():
  with pytest.raises(ValueError, match="attention_impl"):
    preset("tiny", attention_impl="flash")


@on_gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_cudnn_bf16_matches_float32(with_sinks, packed):
  """cuDNN flash attention in bf16 vs the float32 reference on the same (bf16-rounded) inputs:
  relative errors of the output and of every gradient below 2e-2 (bf16 operands land 1e-3-1e-2),
  and no further from the reference than XLA's unfused bf16 attention is."""
  q, k, v, sinks, cot, mask = _inputs(jnp.bfloat16, b=4, s=1024, n=16, kh=16, h=64)
  sinks = sinks if with_sinks else None
  mask = mask if packed else None
  q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
  want = _grads(_reference, q32, k32, v32, sinks, cot, mask)
  got = _grads(_fused("cudnn"), q, k, v, sinks, cot, mask)
  xla = _grads(_fused("xla"), q, k, v, sinks, cot, mask)
  out = fused_attention(q, k, v, mask, sinks, "cudnn")
  assert _rel(out, _reference(q32, k32, v32, sinks, mask)) < 2e-2
  for name, a, b, c in zip("qkvs", got[1], want[1], xla[1]):
    err, err_xla = _rel(a, b), _rel(c, b)
    print(f"sinks={with_sinks} packed={packed} d{name}: cudnn {err:.2e} xla-bf16 {err_xla:.2e}")
    assert err < 2e-2 and err < 2 * err_xla + 1e-3, name


@on_gpu
def test_cudnn_model_step_matches_unfused():
  """modern-253m's shape at 2 layers in bf16: fused (cuDNN, sinks on) vs unfused logits and
  gradients, both against each other within bf16 tolerance."""
  cfg = preset("modern-253m", n_layers=2, dtype="bfloat16", attention_sinks=True)
  tokens = jax.random.randint(jax.random.key(1), (2, 1024), 0, cfg.vocab_size)
  out = {}
  for impl in ("unfused", "fused"):
    model = Transformer(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)

    def loss(state):
      logits = nnx.merge(graphdef, state)(tokens)[0]
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

    out[impl] = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
  (lf, logits_f), g_f = out["fused"]
  (lu, logits_u), g_u = out["unfused"]
  assert _rel(logits_f, logits_u) < 2e-2
  assert abs(float(lf) - float(lu)) < 1e-2
  for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_u)):
    assert _rel(a, b) < 5e-2
