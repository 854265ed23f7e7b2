"""The vectorised SAE trainer: instances trained together equal the same instances trained one
at a time; per-instance coefficients act per instance; dead-latent counters."""

import dataclasses

import numpy as np

from sae import sae, train


def _batches(d=8, b=64, seed=0):
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(12, d)).astype(np.float32)
  while True:
    codes = rng.exponential(size=(b, 12)).astype(np.float32) * (rng.random((b, 12)) < 0.25)
    yield codes @ basis


def test_vectorised_instances_equal_one_at_a_time():
  cfg = sae.SAEConfig(d_in=8, n_latents=24, activation="topk", k=3, dead_after=5)
  inst = train.Instances.grid(cfg, seeds=(0, 1), lrs=(1e-3, 3e-3), max_grad_norm=0.5)
  state, hist = train.fit(cfg, inst, _batches(), steps=20, log_every=10)
  assert len(hist) == 2 and hist[-1]["mse"].shape == (4,)
  for i in range(len(inst)):
    one = train.Instances(**{f.name: getattr(inst, f.name)[i:i + 1]
                             for f in dataclasses.fields(inst)})
    alone, _ = train.fit(cfg, one, _batches(), steps=20, log_every=10)
    for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
      np.testing.assert_allclose(state["params"][k][i], alone["params"][k][0], rtol=2e-5,
                                 atol=2e-6, err_msg=f"instance {i} {k}")


def test_per_instance_l1_coefficient_sets_each_instance_sparsity():
  cfg = sae.SAEConfig(d_in=8, n_latents=24, activation="relu")
  inst = train.Instances.grid(cfg, seeds=(0,), lrs=(3e-3,), l1_coefs=(0.0, 0.1, 1.0))
  _, hist = train.fit(cfg, inst, _batches(), steps=200, log_every=200)
  l0 = hist[-1]["l0"]
  assert l0[0] > l0[1] > l0[2], l0


def test_dead_counter_counts_steps_since_a_latent_fired():
  cfg = sae.SAEConfig(d_in=8, n_latents=24, activation="topk", k=2, dead_after=3)
  inst = train.Instances.grid(cfg, seeds=(0,))
  state = train.init_state(cfg, inst)
  step = train.make_step(cfg, inst)
  x = np.broadcast_to(next(_batches(b=1)), (1, 1, 8))  # one row: exactly 2 latents fire
  for _ in range(4):
    state, metrics = step(state, x)
  since = np.asarray(state["since_fired"][0])
  assert (since == 0).sum() >= 2 and since.max() <= 4
  assert int(metrics["dead"][0]) == int((since >= 3).sum())
  assert float(metrics["aux"][0]) >= 0.0


def test_auxk_is_skipped_only_while_nothing_is_dead():
  """The step branches AuxK away while no latent is dead: there its loss is exactly 0, so the
  update equals the one with AuxK computed; once a latent is dead AuxK acts."""
  import jax

  cfg = sae.SAEConfig(d_in=8, n_latents=24, activation="topk", k=3, dead_after=2)
  inst = train.Instances.grid(cfg, seeds=(0,))
  state = train.init_state(cfg, inst)
  x = next(_batches())
  one = jax.tree.map(lambda a: a[0], {k: v for k, v in state.items() if k != "step"})
  args = (x, inst.max_grad_norm[0], inst.l1_coef[0], inst.l0_coef[0])
  with_aux, m1 = train._instance_step(cfg, one, *args, aux=True)
  without, m0 = train._instance_step(cfg, one, *args, aux=False)
  assert float(m1["aux"]) == 0.0 == float(m0["aux"])
  jax.tree.map(np.testing.assert_array_equal, with_aux["params"], without["params"])
  dead = {**one, "since_fired": one["since_fired"].at[:12].set(5)}
  _, m2 = train._instance_step(cfg, dead, *args, aux=True)
  assert float(m2["aux"]) > 0.0
  step = train.make_step(cfg, inst)
  _, m3 = step(jax.tree.map(lambda a: a[None], dead) | {"step": state["step"]}, x[None])
  np.testing.assert_allclose(float(m3["aux"][0]), float(m2["aux"]), rtol=1e-6)


def test_instances_sharded_over_the_mesh_equal_unsharded():
  """8 instances split over 8 fake CPU devices (data 2 × fsdp 4) train to the same parameters as
  on one device, and each device holds its own instances."""
  import jax

  from lm import sharding

  cfg = sae.SAEConfig(d_in=8, n_latents=24, activation="topk", k=3, dead_after=5)
  inst = train.Instances.grid(cfg, seeds=(0, 1), lrs=(1e-3, 2e-3, 3e-3, 5e-3))
  data = [next(_batches(seed=s)) for s in range(6)]
  step = train.make_step(cfg, inst)
  plain = train.init_state(cfg, inst)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  sharded = train.shard_instances(train.init_state(cfg, inst), mesh)
  for x in data:
    xi = np.broadcast_to(x, (len(inst),) + x.shape)
    plain, _ = step(plain, xi)
    sharded, _ = step(sharded, train.shard_instances(xi, mesh))
  w = sharded["params"]["W_dec"]
  assert len(w.sharding.device_set) == 8 and w.addressable_shards[0].data.shape[0] == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, sharded)
