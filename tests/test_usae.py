"""USAE: one source is the plain SAE bit for bit; the official rule leaves other sources untouched;
shared sparse codes give cross-R² near 1 and universal latents, independent codes near 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sae import metrics, sae, train, usae


def _data(seed, n, d_ins, n_atoms=32, active=3, shared=True):
  rng = np.random.default_rng(seed)

  def codes():
    z = np.zeros((n, n_atoms), np.float32)
    for row in z:
      row[rng.choice(n_atoms, active, replace=False)] = rng.uniform(0.5, 1.5, active)
    return z

  z = codes()
  out = []
  for j, d in enumerate(d_ins):
    atoms = rng.normal(size=(n_atoms, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=-1, keepdims=True)
    out.append((z if shared or j == 0 else codes()) @ atoms)
  return out


def test_one_source_usae_is_the_plain_sae_bit_for_bit():
  cfg = usae.USAEConfig(d_ins=(16,), n_latents=32, k=3)
  scfg = cfg.source(0)
  key = jax.random.key(0)
  state = usae.init_state(key, cfg, lr=1e-3, max_grad_norm=1.0)
  step = usae.make_step(cfg, max_grad_norm=1.0)
  opt = train.optimizer(1e-3, 1.0)
  params = sae.init(jax.random.fold_in(key, 0), scfg)
  opt_state = opt.init(params)

  @jax.jit
  def plain(params, opt_state, x):
    grads = jax.grad(lambda p: sae.loss_fn(p, x, scfg)[0])(params)
    grads = sae.remove_parallel_grads(params, grads, scfg)
    updates, opt_state = opt.update(grads, opt_state, params)
    return sae.renormalise(jax.tree.map(jnp.add, params, updates), scfg), opt_state

  (x,) = _data(0, 1024, (16,))
  for t in range(5):
    batch = jnp.asarray(x[t * 128:(t + 1) * 128])
    state, _ = step(state, 0, [batch])
    params, opt_state = plain(params, opt_state, batch)
  for k in params:
    np.testing.assert_array_equal(state["params"][0][k], params[k], err_msg=k)


@pytest.mark.parametrize("loss", ["mse", "l1", "frobenius"])
def test_official_rule_leaves_the_other_sources_untouched(loss):
  cfg = usae.USAEConfig(d_ins=(16, 24), n_latents=32, k=3, loss=loss, rule="official")
  state = usae.init_state(jax.random.key(0), cfg, lr=1e-2)
  before = jax.tree.map(np.asarray, state)
  xs = [jnp.asarray(a[:64]) for a in _data(0, 64, (16, 24))]
  state, _ = usae.make_step(cfg)(state, 0, xs)
  jax.tree.map(np.testing.assert_array_equal, before["params"][1], state["params"][1])
  jax.tree.map(np.testing.assert_array_equal, before["opt_state"][1], state["opt_state"][1])
  assert not np.array_equal(before["params"][0]["W_dec"], state["params"][0]["W_dec"])
  assert not np.array_equal(before["params"][0]["W_enc"], state["params"][0]["W_enc"])


def test_joint_rule_moves_the_other_decoders():
  cfg = usae.USAEConfig(d_ins=(16, 24), n_latents=32, k=3, rule="joint")
  state = usae.init_state(jax.random.key(0), cfg, lr=1e-2)
  before = np.asarray(state["params"][1]["W_dec"])
  xs = [jnp.asarray(a[:64]) for a in _data(0, 64, (16, 24))]
  state, _ = usae.make_step(cfg)(state, 0, xs)
  assert not np.array_equal(before, state["params"][1]["W_dec"])


def _train(shared: bool, steps=4000):
  d_ins = (48, 64)  # wide enough that 32 atoms are nearly orthogonal in each model
  data = _data(1, 8192, d_ins, shared=shared)
  # room for both dictionaries when the codes are independent
  cfg = usae.USAEConfig(d_ins=d_ins, n_latents=32 if shared else 64, k=3, rule="official")
  state = usae.init_state(jax.random.key(0), cfg, lr=3e-3)
  step = usae.make_step(cfg)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, 6144, 256)
    state, _ = step(state, int(rng.integers(2)), [jnp.asarray(a[idx]) for a in data])
  held = [jnp.asarray(a[6144:]) for a in data]
  r2 = np.asarray(usae.r2_matrix(state["params"], held, cfg))
  counts = metrics.firing_counts(usae.codes(state["params"], held, cfg), threshold=1e-6)
  return r2, np.asarray(metrics.firing_entropy(counts))


def test_shared_codes_give_cross_r2_near_one_and_universal_latents():
  r2, entropy = _train(shared=True)
  assert r2.min() > 0.95, r2
  live = entropy[~np.isnan(entropy)]
  assert np.median(live) > 0.95, np.sort(live)


def test_independent_codes_give_cross_r2_near_zero():
  """No transfer: the other model's reconstruction is no better than its mean (R² about −0.1:
  the decoder emits what the code means for its own model). Self R² pays for the cross terms
  the official rule still trains the encoder on."""
  r2, entropy = _train(shared=False)
  assert np.diag(r2).min() > 0.6, r2
  assert float(metrics.cross_r2(r2)) < 0.05, r2
  # both models still fire most latents: entropy alone does not reveal the missing transfer
  assert np.nanmedian(entropy) > 0.8, np.sort(entropy)


@pytest.mark.parametrize("rule", ["official", "joint"])
def test_vmapped_usae_instances_equal_each_alone(rule):
  cfg = usae.USAEConfig(d_ins=(16, 24), n_latents=32, k=3, rule=rule)
  seeds, lrs, clips = [0, 1, 2], [1e-3, 3e-3, 1e-2], [1.0, 0.5, 1.0]
  states = usae.init_instances(cfg, seeds, lrs, clips)
  step = usae.make_instances_step(cfg, clips)
  data = _data(0, 512, (16, 24))
  sources = [0, 1, 1, 0, 1]
  for t, src in enumerate(sources):
    states, m = step(states, src, [jnp.asarray(a[t * 64:(t + 1) * 64]) for a in data])
  assert m["loss"].shape == (3,)
  for i in range(3):
    state = usae.init_state(jax.random.key(seeds[i]), cfg, lrs[i], clips[i])
    one = usae.make_step(cfg, max_grad_norm=clips[i])
    for t, src in enumerate(sources):
      state, _ = one(state, src, [jnp.asarray(a[t * 64:(t + 1) * 64]) for a in data])
    for j in range(2):
      for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
        np.testing.assert_allclose(states["params"][j][k][i], state["params"][j][k], rtol=2e-5,
                                   atol=2e-6, err_msg=f"instance {i} source {j} {k}")


def test_usae_instances_sharded_over_the_mesh_equal_unsharded():
  from lm import sharding
  from sae import train as sae_train

  cfg = usae.USAEConfig(d_ins=(16, 24), n_latents=32, k=3, rule="official")
  seeds, lrs, clips = list(range(8)), [1e-3] * 4 + [3e-3] * 4, [1.0] * 8
  step = usae.make_instances_step(cfg, clips)
  mesh = sharding.make_mesh(data=2, fsdp=4)
  plain = usae.init_instances(cfg, seeds, lrs, clips)
  sharded = sae_train.shard_instances(usae.init_instances(cfg, seeds, lrs, clips), mesh)
  data = _data(0, 256, (16, 24))
  for t, src in enumerate([0, 1, 1, 0]):
    xs = [jnp.asarray(a[t * 64:(t + 1) * 64]) for a in data]
    plain, _ = step(plain, src, xs)
    sharded, _ = step(sharded, src, xs)
  assert len(sharded["params"][0]["W_enc"].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, sharded)


def test_one_source_usae_with_auxk_equals_the_plain_sae_trainer_with_auxk():
  """AuxK on the drawn source: a one-source USAE with auxk_coef c and the vectorised SAE trainer
  with aux_coef c (same dead_after, seed, lr, batches) take the same steps while latents die and
  AuxK acts, and both count the same dead latents."""
  cfg = usae.USAEConfig(d_ins=(16,), n_latents=48, k=2, auxk_coef=0.5, dead_after=2)
  scfg = sae.SAEConfig(d_in=16, n_latents=48, activation="topk", k=2, aux_coef=0.5, dead_after=2)
  inst = train.Instances.grid(scfg, seeds=(0,), lrs=(3e-3,))
  ours = usae.init_state(jax.random.key(0), cfg, lr=3e-3, max_grad_norm=1.0)
  # the trainer seeds instance i from key(seed); the USAE folds the source index into its key
  ours["params"][0] = sae.init(jax.random.key(0), cfg.source(0))
  ours["opt_state"][0] = train.optimizer(3e-3, 1.0).init(ours["params"][0])
  ref = train.init_state(scfg, inst)
  step, ref_step = usae.make_step(cfg), train.make_step(scfg, inst)
  (x,) = _data(0, 1024, (16,), n_atoms=4, active=1)  # few atoms: most latents die fast
  auxk = []
  for t in range(8):
    batch = jnp.asarray(x[t * 64:(t + 1) * 64])
    ours, m = step(ours, 0, [batch])
    ref, rm = ref_step(ref, batch[None])
    auxk.append(float(m["auxk"]))
    np.testing.assert_allclose(float(m["auxk"]), float(rm["aux"][0]), rtol=1e-4, atol=1e-6)
    assert int(m["dead"]) == int(rm["dead"][0])
  assert max(auxk) > 0
  for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
    np.testing.assert_allclose(ours["params"][0][k], ref["params"][k][0], rtol=1e-4, atol=1e-6,
                               err_msg=k)
