"""GRPO's pieces on hand-computed cases, and its loss and gradients against TRL's GRPOTrainer."""

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align.losses import grpo, rollout_batches


def test_grpo_advantages_golden():
  """[1, 0, 0, 1]: mean 0.5, Bessel std sqrt(1/3) = 0.577350, so ±0.5 / (0.577350 + 1e-6)."""
  adv = np.asarray(grpo.advantages(jnp.array([1.0, 0, 0, 1]), 4, "grpo", eps=1e-6, ddof=1))
  np.testing.assert_allclose(adv, [0.866024, -0.866024, -0.866024, 0.866024], atol=2e-6)
  pop = np.asarray(grpo.advantages(jnp.array([1.0, 0, 0, 1]), 4, "grpo", eps=0.0, ddof=0))
  np.testing.assert_allclose(pop, [1, -1, -1, 1], atol=1e-6)


@pytest.mark.parametrize("estimator", grpo.ESTIMATORS)
def test_constant_group_gets_exact_zero(estimator):
  r = jnp.array([0.3, 0.3, 0.3, 0.3, 1.0, 0.0, 0.5, 0.5])
  adv = np.asarray(grpo.advantages(r, 4, estimator))
  assert np.all(adv[:4] == 0.0) and np.all(np.isfinite(adv))
  assert np.abs(adv[4:]).sum() > 0


def test_other_estimators_golden():
  r = jnp.array([3.0, 1.0, 2.0, 6.0])  # one group: mean 3
  np.testing.assert_allclose(grpo.advantages(r, 4, "dr_grpo"), [0, -2, -1, 3], atol=1e-6)
  # RLOO: r_i minus the mean of the other three: 3 - 3, 1 - 11/3, 2 - 10/3, 6 - 2.
  np.testing.assert_allclose(grpo.advantages(r, 4, "rloo"), [0, -8 / 3, -4 / 3, 4], atol=1e-6)
  two = jnp.array([1.0, 3.0, 10.0, 10.0])  # groups of 2: centred [-1, 1, 0, 0]
  std = np.std([1.0, 3.0, 10.0, 10.0], ddof=1)
  np.testing.assert_allclose(grpo.advantages(two, 2, "batch_std", eps=0.0),
                             [-1 / std, 1 / std, 0, 0], atol=1e-6)


def test_bad_groups_are_refused():
  with pytest.raises(ValueError, match="groups of 3"):
    grpo.advantages(jnp.zeros(8), 3)
  with pytest.raises(ValueError, match="unknown"):
    grpo.advantages(jnp.zeros(8), 4, "ppo")


def test_zero_std_share():
  r = jnp.array([1.0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
  assert float(grpo.zero_std_share(r, 4)) == pytest.approx(2 / 3)


def test_kl_estimators_golden():
  """log π = -1, log π_ref = -2: log r = -1, so k1 = 1, k2 = 0.5, k3 = e^-1 - 1 + 1."""
  lp, ref = jnp.array([[-1.0]]), jnp.array([[-2.0]])
  assert float(grpo.kl_per_token(lp, ref, "k1")[0, 0]) == pytest.approx(1.0)
  assert float(grpo.kl_per_token(lp, ref, "k2")[0, 0]) == pytest.approx(0.5)
  assert float(grpo.kl_per_token(lp, ref, "k3")[0, 0]) == pytest.approx(math.exp(-1), rel=1e-6)
  # A token the reference finds far likelier: k3 = e^100 overflows unless log r is clamped.
  far = grpo.kl_per_token(jnp.array([[-101.0]]), jnp.array([[-1.0]]), "k3", clamp=10.0)
  assert float(far[0, 0]) == pytest.approx(math.exp(10) - 1 - 10, rel=1e-5)
  assert not np.isfinite(float(grpo.kl_per_token(jnp.array([[-101.0]]), jnp.array([[-1.0]]),
                                                 "k3")[0, 0]))


def test_clipped_surrogate_golden():
  """ε 0.2: A=+1, ρ=1.5 -> -min(1.5, 1.2) = -1.2 (high-clipped); A=-1, ρ=0.5 -> -min(-0.5,
  -0.8) = 0.8 (low-clipped); A=+1, ρ=0.5 -> -0.5 (not clipped: the gradient flows); A=-1,
  ρ=5 -> 5, and 3 under a dual clip c=3."""
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  ratio = jnp.array([1.5, 0.5, 0.5, 5.0])[:, None]
  lp, old = jnp.log(ratio), jnp.zeros_like(ratio)
  loss, _, low, high = grpo.clipped_surrogate(lp, old, adv, eps_low=0.2)
  np.testing.assert_allclose(loss[:, 0], [-1.2, 0.8, -0.5, 5.0], rtol=1e-6)
  assert low[:, 0].tolist() == [False, True, False, False]
  assert high[:, 0].tolist() == [True, False, False, False]
  dual, *_ = grpo.clipped_surrogate(lp, old, adv, eps_low=0.2, dual_clip=3.0)
  np.testing.assert_allclose(dual[:, 0], [-1.2, 0.8, -0.5, 3.0], rtol=1e-6)
  asym, *_ = grpo.clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28)
  np.testing.assert_allclose(asym[0, 0], -1.28, rtol=1e-6)


def test_aggregations_golden():
  loss = jnp.array([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  assert float(grpo.aggregate(loss, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
  assert float(grpo.aggregate(loss, mask, "token_mean")) == pytest.approx(10 / 4)
  assert float(grpo.aggregate(loss, mask, "seq_mean_token_sum_norm",
                              max_completion_length=5)) == pytest.approx(10 / (2 * 5))


def test_first_inner_iteration_has_ratio_one_and_no_clipping():
  rng = np.random.default_rng(0)
  lp = jnp.asarray(rng.normal(size=(6, 5)) - 2, jnp.float32)
  adv = jnp.asarray(rng.normal(size=6), jnp.float32)
  _, m = grpo.policy_loss(lp, jax.lax.stop_gradient(lp), adv, jnp.ones((6, 5)))
  assert float(m["ratio_mean"]) == 1.0 and float(m["clip_region"]) == 0.0


# --- TRL parity -------------------------------------------------------------------------------

def _trl_loss(loss_type, logp, old, ref, adv, mask, *, beta, eps_low, eps_high, max_len):
  """TRL's `GRPOTrainer._compute_loss` on given per-token log-probs (its model call replaced)."""
  torch = pytest.importorskip("torch")
  trl = pytest.importorskip("trl")
  logp_t = torch.tensor(logp, requires_grad=True)
  acc = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda x: x,
                              gather_for_metrics=lambda x: x, reduce=lambda x, reduction: x)
  fake = types.SimpleNamespace(
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
      beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
      model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
      max_completion_length=max_len, accelerator=acc, _entropy_bonus_enabled=False,
      aux_loss_enabled=False, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      _get_per_token_logps_and_entropies=lambda *a, **k: (logp_t, torch.zeros_like(logp_t), None))
  b, t = logp.shape
  inputs = {"prompt_ids": torch.zeros((b, 1), dtype=torch.long),
            "prompt_mask": torch.ones((b, 1), dtype=torch.long),
            "completion_ids": torch.zeros((b, t), dtype=torch.long),
            "completion_mask": torch.tensor(mask), "advantages": torch.tensor(adv),
            "old_per_token_logps": torch.tensor(old), "ref_per_token_logps": torch.tensor(ref),
            "num_items_in_batch": torch.tensor(float(mask.sum()))}
  loss = trl.GRPOTrainer._compute_loss(fake, None, inputs)
  loss.backward()
  return float(loss.detach()), logp_t.grad.numpy(), fake._metrics["train"]


OURS = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean",
        "dr_grpo": "seq_mean_token_sum_norm"}


@pytest.mark.parity
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", sorted(OURS))
def test_loss_and_gradients_equal_trl(loss_type, beta):
  rng = np.random.default_rng(1)
  b, t, max_len = 6, 7, 9
  logp = (rng.normal(size=(b, t)) * 0.5 - 2).astype(np.float32)
  old = (logp + rng.normal(size=(b, t)) * 0.3).astype(np.float32)  # ratios well past 1 ± ε
  ref = (logp + rng.normal(size=(b, t)) * 0.2).astype(np.float32)
  adv = rng.normal(size=b).astype(np.float32)
  mask = (np.arange(t)[None] < rng.integers(1, t + 1, size=b)[:, None]).astype(np.int64)
  ref_loss, ref_grad, ref_metrics = _trl_loss(loss_type, logp, old, ref, adv, mask, beta=beta,
                                              eps_low=0.2, eps_high=0.28, max_len=max_len)

  def ours(lp):
    return grpo.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                            eps_low=0.2, eps_high=0.28, aggregation=OURS[loss_type],
                            max_completion_length=max_len, ref_logp_bt=jnp.asarray(ref),
                            beta=beta, kl_estimator="k3")

  (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logp))
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-5, atol=1e-7)
  assert float(metrics["clip_low"]) == pytest.approx(ref_metrics["clip_ratio/low_mean"][0])
  assert float(metrics["clip_high"]) == pytest.approx(ref_metrics["clip_ratio/high_mean"][0])
  assert float(metrics["clip_high"]) > 0 and float(metrics["clip_low"]) > 0
  if beta:
    assert float(metrics["kl"]) == pytest.approx(ref_metrics["kl"][0], rel=1e-5)


# --- the registered loss on a model -------------------------------------------------------------

def _lora_model(b_scale):
  import lm
  from flax import nnx
  from lm import lora
  from tests_helpers import scrambled

  m = scrambled(lm.Transformer(lm.preset("tiny"), rngs=nnx.Rngs(0)), seed=2)
  lora.apply_lora(m, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(1))
  for _, lin in nnx.iter_modules(m):
    if isinstance(lin, lm.layers.Linear) and lin.lora_rank:
      lin.lora_b.set_value(b_scale * np.ones(lin.lora_b[...].shape, np.float32))
  return m


def _rl_batch():
  """Two prompts x G 2, each row [prompt | completion | pad]; the completion's last token is the
  EOS, which is also the pad id (0 here), and stays in the loss mask."""
  prompts = [[5, 17, 33], [41, 8, 9, 12]]
  completions = [[7, 9, 0], [100, 0], [3, 3, 3, 0], [250, 0]]
  rows, loss, attn = [], [], []
  for i, c in enumerate(completions):
    p = prompts[i // 2]
    pad = 10 - len(p) - len(c)
    rows.append(p + c + [0] * pad)
    attn.append([1] * (len(p) + len(c)) + [0] * pad)
    loss.append([0] * len(p) + [1] * len(c) + [0] * pad)
  rewards = jnp.array([1.0, 0.0, 0.5, 0.5])
  return {"tokens": jnp.asarray(rows, jnp.int32), "attn_mask": jnp.asarray(attn, jnp.int32),
          "loss_mask": jnp.asarray(loss, jnp.int32),
          "advantages": grpo.advantages(rewards, 2)}


def _cfg(**kw):
  """configs/grpo.py's loss section at these tests' settings: no upper clip, dual clip, length
  normaliser or KL clamp unless a test sets one."""
  from configs import grpo as grpo_config

  cfg = grpo_config.get_config("smoke").loss
  cfg.update(temperature=0.7, eps_low=0.2, eps_high=None, dual_clip=None, beta=0.04,
             kl_estimator="k3", aggregation="seq_mean_token_mean", max_completion_length=None,
             kl_clamp=None, kl_in="loss")
  cfg.update(kw)
  return cfg


def test_registered_loss_at_mu_1_is_zero_with_a_gradient():
  """At the first inner iteration ρ = 1, so each sequence's loss is -A_i and their mean is
  -mean(A) = 0 for group-centred advantages, but the gradient -Σ A_i ∇ log π is not zero (why a
  GRPO loss of 0 is normal). With LoRA B = 0 the reference equals the policy: KL 0."""
  from flax import nnx

  from align.losses import get
  from lm import lora

  model, batch = _lora_model(0.0), _rl_batch()
  graphdef, params, rest = nnx.split(model, lora.trainable_filter("lora"), ...)

  def loss_of(p):
    return get("grpo")(nnx.merge(graphdef, p, rest), batch, _cfg())

  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_of, has_aux=True))(params)
  assert abs(float(loss)) < 1e-6
  assert abs(float(metrics["kl"])) < 1e-9 and float(metrics["ratio_mean"]) == pytest.approx(1.0)
  assert float(metrics["clip_region"]) == 0.0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-4
  # The mask holds every completion token, the EOS (= pad id 0) included.
  assert float(metrics["completion_tokens"]) == pytest.approx((3 + 2 + 4 + 2) / 4)


def test_registered_loss_scores_at_the_temperature_and_uses_old_logps():
  """Given old log-probs = the policy's own at T (scored separately), the ratio is 1 again; at
  the wrong temperature it is not."""
  from align.losses import get
  from lm.scoring import next_token_logprobs

  model, batch = _lora_model(0.3), _rl_batch()
  at = lambda t: next_token_logprobs(model, batch["tokens"], batch["attn_mask"],
                                     select_bs=batch["loss_mask"], temperature=t)
  _, same = get("grpo")(model, dict(batch, old_logps=at(0.7)), _cfg())
  np.testing.assert_allclose(float(same["ratio_mean"]), 1.0, atol=1e-5)
  assert float(same["kl"]) > 0  # LoRA B != 0: the policy differs from the adapters-off reference
  _, off = get("grpo")(model, dict(batch, old_logps=at(1.5)), _cfg())
  assert abs(float(off["ratio_mean"]) - 1.0) > 1e-2


def test_overlong_penalty_golden():
  """max 20, buffer 5: 0 through 15 tokens, then -1/5 per token, -1 from 20 on."""
  got = grpo.overlong_penalty([10, 15, 16, 18, 20, 25], max_len=20, buffer=5)
  np.testing.assert_allclose(got, [0, 0, -0.2, -0.6, -1.0, -1.0])
  np.testing.assert_allclose(grpo.overlong_penalty([18], 20, 5, factor=0.5), [-0.3])


def test_rollout_batch_reproduces_the_rollouts_logprobs():
  """The batch built from a rollout (T 0.8, EOS = pad id) scores to the rollout's own log-probs:
  at the first inner iteration the ratio is 1 (max |rollout - trainer| <= 1e-5), the EOS stays in
  the mask, and truncated / zero-variance rows leave the loss when asked."""
  from flax import nnx

  from align.losses import get
  from decode.rollout import rollout
  from decode.sampling import Sampler

  model = _lora_model(0.2)
  prompts = [[5, 17, 33], [41, 8, 9, 12]]
  kw = dict(max_new_tokens=5, sampler=Sampler(temperature=0.8), num_samples=3, seed=1)
  first = rollout(model, prompts, eos_ids=[], pad_id=0, **kw)
  eos = int(first.tokens_bt[0, 2])
  out = rollout(model, prompts, eos_ids=[eos], pad_id=eos, **kw)
  rewards = np.array([1.0, 0.0, 1.0, 0.5, 0.5, 0.5])
  adv = grpo.advantages(jnp.asarray(rewards), 3)
  batch = rollout_batches.rollout_batch(out, adv, pad_id=eos)
  assert (out.finish_b == 1).any() and (out.finish_b == 0).any()
  assert batch["loss_mask"].sum() == out.lengths_b.sum()
  from lm.scoring import next_token_logprobs
  j = {k: jnp.asarray(v) for k, v in batch.items()}
  lp = np.asarray(next_token_logprobs(model, j["tokens"], j["attn_mask"], select_bs=j["loss_mask"],
                                      temperature=0.8))
  m = batch["loss_mask"][:, 1:] > 0
  assert np.abs(lp - batch["old_logps"])[m].max() <= 1e-5
  graphdef, state = nnx.split(model)
  loss_fn = jax.jit(lambda st, b: get("grpo")(nnx.merge(graphdef, st), b,
                                               _cfg(temperature=0.8, beta=0.0))[1])
  metrics = loss_fn(state, j)
  assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-5 and float(metrics["clip_region"]) == 0
  masked = rollout_batches.rollout_batch(out, adv, pad_id=eos, mask_truncated=True,
                                         mask_zero_std=True, rewards_n=rewards, group_size=3)
  rows_in = masked["loss_mask"].sum(-1) > 0
  np.testing.assert_array_equal(rows_in, (out.finish_b != 0) & (np.arange(6) < 3))


@pytest.mark.parametrize("aggregation", grpo.AGGREGATIONS)
def test_shared_prompt_layout_equals_one_row_per_completion(aggregation):
  """The G completions of a prompt scored as branches after one shared prompt give the loss,
  every metric and the gradients of one [prompt | completion] row each: ratios away from 1
  (the policy moved since the rollout), β > 0, a truncated completion masked, two micro-batches'
  worth of groups with an empty padding row in each."""
  from flax import nnx

  from align.losses import get
  from decode.rollout import rollout
  from decode.sampling import Sampler
  from lm import lora

  sampler_model, model = _lora_model(0.2), _lora_model(0.35)
  prompts = [[5, 17, 33], [41, 8, 9, 12], [7], [60, 61]]
  kw = dict(max_new_tokens=5, sampler=Sampler(temperature=0.8), num_samples=3, seed=1)
  eos = int(rollout(sampler_model, prompts, eos_ids=[], pad_id=0, **kw).tokens_bt[0, 2])
  out = rollout(sampler_model, prompts, eos_ids=[eos], pad_id=eos, **kw)
  assert (out.finish_b == 1).any() and (out.finish_b == 0).any()  # EOS and truncated rows
  rewards = np.array([1.0, 0.0, 1.0, 0.5, 0.2, 0.5, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1])
  adv = np.asarray(grpo.advantages(jnp.asarray(rewards), 3))
  masks = dict(mask_truncated=True, rewards_n=rewards)
  plain = rollout_batches.rollout_batch(out, adv, pad_id=eos, group_size=3, **masks)
  rows, width = rollout_batches.shared_layout(4, 3, max(map(len, prompts)), 5, groups=2, multiple=3)
  assert (rows, width) == (6, 24)  # 2 groups + an empty row in each of 2 micro-batches
  shared = rollout_batches.shared_rollout_batch(out, adv, rows=rows, width=width, group_size=3,
                                                groups=2, pad_id=eos, **masks)
  assert shared["seq_count"].tolist() == [3, 3, 0, 3, 3, 0]
  assert shared["loss_mask"].sum() == plain["loss_mask"].sum() < out.lengths_b.sum()
  assert (shared["segment_ids"] > 0).sum() < plain["attn_mask"].sum()  # each prompt once
  graphdef, params, rest = nnx.split(model, lora.trainable_filter("lora"), ...)
  cfg = _cfg(temperature=0.8, aggregation=aggregation, max_completion_length=5)

  def run(batch):
    fn = lambda p: get("grpo")(nnx.merge(graphdef, p, rest), batch, cfg)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    return loss, metrics, grads

  j = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  loss_a, met_a, grads_a = run(j(plain))
  loss_b, met_b, grads_b = run(j(shared))
  assert float(met_a["clip_region"]) > 0 and float(met_a["kl"]) > 0
  np.testing.assert_allclose(float(loss_b), float(loss_a), rtol=1e-5, atol=1e-7)
  for k in met_a:
    np.testing.assert_allclose(float(met_b[k]), float(met_a[k]), rtol=1e-4, atol=1e-6, err_msg=k)
  for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-6)
