"""Sharded = unsharded: the forward on 8 fake CPU devices equals the 1-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm
from lm import sharding


def _model(**kw):
  return lm.Transformer(lm.preset("tiny", **kw), rngs=nnx.Rngs(0))


def test_eight_fake_devices():
  assert len(jax.devices()) == 8, "tests/conftest.py sets jax_num_cpu_devices=8"


@pytest.mark.parametrize("data,fsdp,tensor", [(1, 4, 2), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_forward_equals_unsharded(data, fsdp, tensor):
  model = _model(n_heads=8, n_kv_heads=4, head_dim=8, sliding_window=4,
                 layer_types=("sliding", "full"))
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, model.cfg.vocab_size)
  mask = jnp.ones((8, 16), jnp.int32).at[3, :5].set(0)
  ref, _ = model(tokens, attn_mask=mask)

  mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor)
  sharding.shard_model(model, mesh)
  kernel = model.layers[0].mlp.up_proj.kernel[...]
  assert len(kernel.sharding.device_set) == 8

  @nnx.jit
  def forward(model, tokens, mask):
    return model(tokens, attn_mask=mask)[0]

  with jax.set_mesh(mesh):
    out = forward(model, jax.device_put(tokens, sharding.batch_sharding(mesh, 2)),
                  jax.device_put(mask, sharding.batch_sharding(mesh, 2)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


def test_logical_spec_drops_axes_that_do_not_divide():
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  # SmolLM2 has 3 kv heads: tensor=2 cannot split them, so that axis stays replicated.
  spec = sharding.logical_spec(("embed", "kv_heads", "head_dim"), (576, 3, 64), mesh)
  assert spec == jax.sharding.PartitionSpec("fsdp", None, None)
  spec = sharding.logical_spec(("vocab", "embed"), (49152, 576), mesh)
  assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_every_parameter_has_logical_axes():
  model = _model(attention_sinks=True, tie_embeddings=False, attention_bias=True)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == var.get_value().ndim, path


def test_mesh_size_errors_name_the_fix():
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh(data=3, fsdp=2, tensor=1)
