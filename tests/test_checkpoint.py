"""Checkpoint save -> restore gives the same logits; the last N are kept; restores are sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lm
from lm import sharding
from lm.train.checkpoint import Checkpointer


def test_save_restore_same_logits_and_opt_state(tmp_path):
  cfg = lm.preset("tiny")
  model = lm.Transformer(cfg, rngs=nnx.Rngs(0))
  tokens = jnp.arange(12)[None] % cfg.vocab_size
  ref, _ = model(tokens)
  opt_state = optax.adamw(1e-3).init(nnx.state(model, nnx.Param))
  with Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ck:
    for step in (10, 20, 30):
      ck.save(step, model, opt_state=opt_state, extra={"data_iter": {"index": step}})
    assert ck.all_steps() == [20, 30]

  other = lm.Transformer(cfg, rngs=nnx.Rngs(7))
  assert not np.allclose(other(tokens)[0], ref)
  with Checkpointer(tmp_path / "ckpt") as ck:
    restored_opt, extra = ck.restore(other, opt_state=jax.eval_shape(lambda: opt_state))
  np.testing.assert_array_equal(np.asarray(other(tokens)[0]), np.asarray(ref))
  assert extra == {"data_iter": {"index": 30}, "step": 30}
  chex_leaves = zip(jax.tree.leaves(restored_opt), jax.tree.leaves(opt_state))
  for a, b in chex_leaves:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_into_sharded_model(tmp_path):
  cfg = lm.preset("tiny")
  model = lm.Transformer(cfg, rngs=nnx.Rngs(0))
  with Checkpointer(tmp_path) as ck:
    ck.save(1, model)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  target = sharding.shard_model(lm.Transformer(cfg, rngs=nnx.Rngs(3)), mesh)
  with Checkpointer(tmp_path) as ck:
    ck.restore(target)
  kernel = target.layers[0].mlp.up_proj.kernel[...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.layers[0].mlp.up_proj.kernel[...]))


def test_restore_without_checkpoint_is_a_clear_error(tmp_path):
  with Checkpointer(tmp_path / "empty") as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ck.restore(lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0)))
