"""PPO's pieces on hand-computed cases: GAE (and against a plain loop over time with masks), the
per-token KL penalty with the score at the last real token, whitening, the clipped value loss,
and the clipped surrogate with per-token advantages."""

import numpy as np
import pytest

from align.losses import grpo, ppo


def test_gae_by_hand():
  adv, ret = ppo.gae(np.array([[0.0, 0.0, 1.0]]), np.array([[0.5, 0.6, 0.7]]),
                     np.ones((1, 3)), gamma=1.0, lam=0.95)
  # δ = [.1, .1, .3]; A2 = .3, A1 = .1 + .95 * .3 = .385, A0 = .1 + .95 * .385 = .46575
  np.testing.assert_allclose(adv, [[0.46575, 0.385, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[0.96575, 0.985, 1.0]], rtol=1e-6)
  # λ = 1, values 0: A is the discounted return-to-go
  adv, _ = ppo.gae(np.array([[1.0, 2.0]]), np.zeros((1, 2)), np.ones((1, 2)), gamma=0.9, lam=1.0)
  np.testing.assert_allclose(adv, [[2.8, 2.0]], rtol=1e-6)
  # a masked last position: its reward and value are ignored and the episode ends before it
  adv, ret = ppo.gae(np.array([[0.0, 1.0, 9.0]]), np.array([[0.5, 0.6, 5.0]]),
                     np.array([[1, 1, 0]]), gamma=1.0, lam=0.95)
  np.testing.assert_allclose(adv, [[0.48, 0.4, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[0.98, 1.0, 0.0]], rtol=1e-6)


def _gae_loop(r, v, m, gamma, lam):
  """TRL's loop: next value 0 after the last step; masked entries zeroed first."""
  r, v = r * m, v * m
  b, t = r.shape
  adv = np.zeros((b, t))
  last = np.zeros(b)
  for i in reversed(range(t)):
    nxt = v[:, i + 1] if i + 1 < t else 0.0
    delta = r[:, i] + gamma * nxt - v[:, i]
    last = delta + gamma * lam * last
    adv[:, i] = last
  return adv * m, (adv + v) * m


def test_gae_equals_the_loop_with_ragged_masks():
  rng = np.random.default_rng(0)
  r, v = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
  m = (np.arange(9)[None] < np.array([[9], [5], [1], [0]])).astype(np.float64)
  for gamma, lam in ((1.0, 0.95), (0.99, 0.9), (0.5, 0.0)):
    want = _gae_loop(r, v, m, gamma, lam)
    got = ppo.gae(r, v, m, gamma=gamma, lam=lam)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_token_rewards_put_the_score_on_the_last_real_token():
  r, kl = ppo.token_rewards(np.array([2.0, 5.0]), np.array([[-1.0, -2.0, -3.0]] * 2),
                            np.array([[-1.5, -2.0, -2.0]] * 2), np.array([[1, 1, 0], [0, 0, 0]]),
                            kl_coef=0.1)
  np.testing.assert_allclose(kl, [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(r, [[-0.05, 2.0, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)
  # k3 at a log-ratio log π_ref - log π = -0.5: e^-0.5 - 1 + 0.5 = 0.1065307
  _, kl3 = ppo.token_rewards(np.zeros(1), np.array([[-1.0]]), np.array([[-1.5]]),
                             np.ones((1, 1)), kl_coef=0.1, estimator="k3")
  np.testing.assert_allclose(kl3, [[0.1065307]], rtol=1e-5)


def test_whiten_uses_the_unbiased_masked_variance():
  x = np.array([[1.0, 2.0, 3.0, 4.0, 100.0]])
  m = np.array([[1, 1, 1, 1, 0]])
  # mean 2.5, unbiased variance 5/3
  np.testing.assert_allclose(ppo.whiten(x, m), [[-1.161895, -0.387298, 0.387298, 1.161895, 0.0]],
                             rtol=1e-5)
  np.testing.assert_allclose(ppo.whiten(x, m, shift_mean=False)[0, :4],
                             np.array([-1.161895, -0.387298, 0.387298, 1.161895]) + 2.5, rtol=1e-5)


def test_clipped_value_loss_by_hand():
  # token 0: (1 - 2)² = 1 vs clipped V 0.7: 1.69 (larger, counted); token 1: 4 vs V 0.3: 2.89
  loss, frac = ppo.value_loss(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]),
                              np.array([[2.0, 2.0]]), np.ones((1, 2)), clip=0.2)
  np.testing.assert_allclose([loss, frac], [0.5 * (1.69 + 4.0) / 2, 0.5], rtol=1e-6)
  loss, _ = ppo.value_loss(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]),
                           np.array([[2.0, 2.0]]), np.ones((1, 2)), clip=None)
  np.testing.assert_allclose(loss, 0.5 * (1.0 + 4.0) / 2, rtol=1e-6)


def test_explained_variance_by_hand():
  r = np.array([[1.0, 2.0, 3.0, 4.0, 99.0]])
  m = np.array([[1, 1, 1, 1, 0]])
  assert ppo.explained_variance(r, r, m) == 1.0
  assert ppo.explained_variance(np.full_like(r, 2.5), r, m) == 0.0
  # residuals [-1, 1, -1, 1]: variance 1 of the returns' 1.25
  np.testing.assert_allclose(ppo.explained_variance(r + [[1, -1, 1, -1, 0]], r, m), 1 - 1 / 1.25)


@pytest.mark.parametrize("adv_shape", ["sequence", "token"])
def test_clipped_surrogate_takes_per_token_advantages(adv_shape):
  logp = np.log(np.array([[1.5, 0.5]]))
  old = np.zeros((1, 2))
  adv = np.array([1.0]) if adv_shape == "sequence" else np.array([[1.0, -1.0]])
  loss, _, low, high = grpo.clipped_surrogate(logp, old, adv, eps_low=0.2)
  # ρ = [1.5, 0.5]: A = +1 clips at 1.2; A = -1 at ρ 0.5 clips at 0.8 (loss 0.8)
  want = [[-1.2, -0.5]] if adv_shape == "sequence" else [[-1.2, 0.8]]
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert high[0, 0] and (low[0, 1] == (adv_shape == "token"))


@pytest.mark.real_weights
def test_ppo_stream_and_critic_warmup_move_only_the_value_head(smollm2_gguf):
  """One PPO rollout step end to end on the tiny model: the batch's returns are advantages +
  values before whitening, and a critic warm-up step moves the value head but no LoRA factor."""
  from flax import nnx

  from align import online
  from align.train import load_model
  from configs import ppo as ppo_config
  from lm import heads, lora
  from lm.train.trainer import Trainer

  config = ppo_config.get_config("smoke")
  config.rollout.critic_warmup = 1
  config.train.warmup_steps = 0  # the first step moves (lr > 0)
  model, tok = load_model(config.model)
  lora.apply_lora(model, lora.LoraConfig.from_config(config.lora), rngs=nnx.Rngs(0))
  model = heads.PolicyWithValue(model, rngs=nnx.Rngs(0))
  trainer = Trainer(model, ppo.ppo_loss, config.loss, config.train,
                    trainable=ppo.ALGORITHM.trainable(lora.trainable_filter("lora")))
  stream, _, _ = online.setup(config, trainer, tok, ppo.make_batch_for(config, trainer))
  batch = next(stream)
  mask = batch["loss_mask"][:, 1:] > 0
  assert batch["policy_weight"].max() == 0 and np.all(batch["old_values"][mask] == 0)
  flat = lambda: {"/".join(map(str, k)): np.asarray(v.get_value())
                  for k, v in trainer.params.flat_state()}
  before = flat()
  m = trainer.train_step(batch)
  after = flat()
  moved = {k for k in before if not np.array_equal(before[k], after[k])}
  assert moved and all("value" in k for k in moved), moved
  assert m["policy_weight"] == 0 and m["value_loss"] > 0
  assert next(stream)["policy_weight"].min() == 1
