"""SAE forward, sparsity rules, decoder-norm handling and AuxK against hand cases, and a TopK SAE
recovering a known sparse dictionary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sae import sae


def _cfg(**kw):
  return sae.SAEConfig(**{"d_in": 8, "n_latents": 16, "k": 3, **kw})


def test_init_ties_encoder_to_decoder_with_unit_rows():
  cfg = _cfg()
  p = sae.init(jax.random.key(0), cfg, data_mean=np.arange(8.0))
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  np.testing.assert_array_equal(p["b_dec"], np.arange(8.0))


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_topk_rules_keep_k_per_row_or_k_times_batch(activation):
  cfg = _cfg(activation=activation)
  p = sae.init(jax.random.key(0), cfg)
  x = jax.random.normal(jax.random.key(1), (5, 8))
  pre, z = sae.encode(p, x, cfg)
  acts = np.maximum(np.asarray(pre), 0)
  z = np.asarray(z)
  if activation == "topk":
    assert ((z > 0).sum(-1) == 3).all()
    for row, a in zip(z, acts):
      np.testing.assert_array_equal(np.sort(row[row > 0]), np.sort(a)[-3:])
  else:
    assert (z > 0).sum() == 3 * 5
    np.testing.assert_array_equal(np.sort(z[z > 0]), np.sort(acts.ravel())[-15:])
    assert float(sae.batch_threshold(pre, cfg)) == np.sort(acts.ravel())[-15]


def test_jumprelu_value_and_straight_through_threshold_gradient():
  cfg = _cfg(activation="jumprelu", n_latents=2, d_in=2, bandwidth=0.1)
  theta = np.array([0.5, 0.5])
  pre = jnp.array([[0.52, 0.2], [0.9, 0.47]])  # in the kernel window: 0.52 and 0.47 (|·−θ| ≤ ε/2)
  out = sae._jumprelu(pre, jnp.asarray(theta), cfg.bandwidth)
  np.testing.assert_allclose(out, [[0.52, 0.0], [0.9, 0.0]])
  g_theta = jax.grad(lambda t: sae._jumprelu(pre, t, cfg.bandwidth).sum())(jnp.asarray(theta))
  # −(θ/ε) per entry in the window: latent 0 has 0.52, latent 1 has 0.47
  np.testing.assert_allclose(g_theta, [-0.5 / 0.1, -0.5 / 0.1], rtol=1e-6)
  g_pre = jax.grad(lambda q: sae._jumprelu(q, jnp.asarray(theta), cfg.bandwidth).sum())(pre)
  np.testing.assert_array_equal(g_pre, [[1, 0], [1, 0]])
  g_l0 = jax.grad(lambda t: sae._jump(pre, t, cfg.bandwidth).sum())(jnp.asarray(theta))
  np.testing.assert_allclose(g_l0, [-1 / 0.1, -1 / 0.1], rtol=1e-6)


def test_relu_l1_weights_codes_by_decoder_row_norm():
  cfg = _cfg(activation="relu", l1_coef=0.5, decoder_norm="forward", n_latents=2, d_in=2)
  p = {"W_enc": jnp.eye(2), "b_enc": jnp.zeros(2), "W_dec": jnp.array([[2.0, 0.0], [0.0, 3.0]]),
       "b_dec": jnp.zeros(2)}
  x = jnp.array([[1.0, -2.0]])
  loss, (m, z) = sae.loss_fn(p, x, cfg)
  np.testing.assert_array_equal(z, [[1.0, 0.0]])
  # forward norm: the dictionary rows are unit, so x̂ = (1, 0), mse = 4, l1 = 1 × 1
  np.testing.assert_allclose([m["mse"], m["l1"], loss], [4.0, 1.0, 4.5])


def test_project_removes_parallel_gradient_and_renormalises():
  cfg = _cfg()
  p = sae.init(jax.random.key(0), cfg)
  g = jax.tree.map(lambda a: jnp.ones_like(a), p)
  g2 = sae.remove_parallel_grads(p, g, cfg)
  np.testing.assert_allclose(np.sum(g2["W_dec"] * p["W_dec"], -1), 0.0, atol=1e-6)
  moved = sae.renormalise({**p, "W_dec": p["W_dec"] - 0.1 * g2["W_dec"]}, cfg)
  np.testing.assert_allclose(np.linalg.norm(moved["W_dec"], axis=-1), 1.0, rtol=1e-6)
  assert sae.remove_parallel_grads(p, g, _cfg(decoder_norm="forward")) is g


def test_aux_loss_by_hand():
  cfg = _cfg(activation="topk", k=1, n_latents=2, d_in=2, aux_k=1, aux_coef=1.0)
  p = {"W_enc": jnp.eye(2), "b_enc": jnp.zeros(2), "W_dec": jnp.eye(2), "b_dec": jnp.zeros(2)}
  x = jnp.array([[2.0, 1.0], [0.0, 3.0]])
  # top-1: row 0 keeps latent 0 (e = (0, 1)), row 1 keeps latent 1 (e = (0, 0))
  e = np.array([[0.0, 1.0], [0.0, 0.0]])
  dead = jnp.array([False, True])
  # latent 1 dead: ê = (0, pre_1) = (0, 1) on row 0 and (0, 3) on row 1
  want = (0 + 9) / np.sum((e - e.mean(0)) ** 2)
  _, (m, _) = sae.loss_fn(p, x, cfg, dead=dead)
  np.testing.assert_allclose(m["aux"], want, rtol=1e-6)
  _, (m0, _) = sae.loss_fn(p, x, cfg, dead=jnp.array([False, False]))
  assert float(m0["aux"]) == 0.0


@pytest.mark.usefixtures("xla_default_level")
def test_topk_sae_recovers_a_known_sparse_dictionary():
  d, n_atoms, active = 32, 64, 3
  key = jax.random.key(0)
  atoms = np.array(jax.random.normal(key, (n_atoms, d)))
  atoms /= np.linalg.norm(atoms, axis=-1, keepdims=True)

  def data(k, b=512):
    k1, k2 = jax.random.split(k)
    idx = jax.vmap(lambda kk: jax.random.choice(kk, n_atoms, (active,), replace=False))(
        jax.random.split(k1, b))
    coef = jax.random.uniform(k2, (b, active), minval=0.5, maxval=1.5)
    return jnp.einsum("bk,bkd->bd", coef, jnp.asarray(atoms)[idx])

  cfg = sae.SAEConfig(d_in=d, n_latents=n_atoms, activation="topk", k=active)
  params = sae.init(jax.random.key(1), cfg)
  opt = optax.adam(3e-3)

  @jax.jit
  def step(carry, k):
    params, state = carry
    grads = jax.grad(lambda p: sae.loss_fn(p, data(k), cfg)[0])(params)
    grads = sae.remove_parallel_grads(params, grads, cfg)
    updates, state = opt.update(grads, state, params)
    return (sae.renormalise(optax.apply_updates(params, updates), cfg), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                jax.random.split(jax.random.key(2), 3000))
  cos = np.abs(atoms @ np.asarray(params["W_dec"]).T).max(-1)  # best latent for each atom
  assert cos.mean() > 0.9, np.sort(cos)[:10]
