"""Online RL plumbing: the rollout stream is a function of the step (so resume repeats a run), μ
reuses a rollout, prompts split without overlap and cycle by epoch, bad settings name the field,
the reward trend's arithmetic, and the GRPO step sharded over 8 fake devices = one device."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from align import online
from align.losses import grpo, rollout_batches
from configs import grpo as grpo_config
from lm import data, lora, sharding
from lm.train.trainer import Trainer


def _config(**rollout):
  c = grpo_config.get_config("smoke")
  c.rollout.update(**rollout)
  return c


def _trainer_and_tok(config, mesh=None):
  from align.train import load_model

  model, tok = load_model(config.model)
  lora.apply_lora(model, lora.LoraConfig.from_config(config.lora), rngs=nnx.Rngs(0))
  trainer = Trainer(model, grpo.grpo_loss, config.loss, config.train,
                    trainable=lora.trainable_filter("lora"), mesh=mesh)
  return trainer, tok


@pytest.fixture(scope="module")
def smoke(smollm2_gguf):
  config = _config()
  trainer, tok = _trainer_and_tok(config)
  return config, trainer, tok


def _stream(config, trainer, tok):
  return online.setup(config, trainer, tok, grpo.make_batch_for(config, trainer))


@pytest.mark.real_weights
def test_stream_batches_are_a_function_of_the_step(smoke):
  config, trainer, tok = smoke
  stream, _, stats = _stream(config, trainer, tok)
  batches = [next(stream) for _ in range(3)]
  metrics = stream.pop_metrics()
  for key in ("reward", "reward/arith_correct", "zero_std_share", "length_median", "empty_share",
              "truncated_share", "entropy", "time/rollout_s", "time/scoring_s"):
    assert key in metrics, key
  # the shared-prompt layout: one row per group, prompt + G x max_new_tokens wide
  r = config.rollout
  width = -(-(stats["seq_len"] + (r.num_generations - 1) * r.max_new_tokens) // 8) * 8
  assert batches[0]["tokens"].shape == (r.prompts_per_step, width)
  assert stream.get_state() == {"step": 3}
  again, _, _ = _stream(config, trainer, tok)
  again.set_state({"step": 2})
  for k, v in next(again).items():
    np.testing.assert_array_equal(v, batches[2][k], err_msg=k)
  assert not np.array_equal(batches[0]["tokens"], batches[1]["tokens"])


@pytest.mark.real_weights
def test_inner_iterations_reuse_the_rollout(smoke):
  config, trainer, tok = smoke
  stream, _, _ = _stream(_config(num_iterations=2), trainer, tok)
  a, b, c = next(stream), next(stream), next(stream)
  assert a is b and c is not a
  assert stream.pop_metrics()["inner_iteration"] == 0


@pytest.mark.real_weights
def test_prompts_cycle_by_epoch_and_held_out_prompts_are_never_trained_on(smoke):
  config, trainer, tok = smoke
  stream, _, _ = _stream(config, trainer, tok)
  n, k = len(stream.prompts), stream.per_step
  seen = np.concatenate([stream.prompt_index(g) for g in range(-(-2 * n // k))])
  np.testing.assert_array_equal(np.sort(seen[:n]), np.arange(n))
  np.testing.assert_array_equal(np.sort(seen[n:2 * n]), np.arange(n))
  train, held_out, _ = online.load_prompts(config.prompts, tok)
  assert not set(train.texts) & set(held_out.texts)
  assert len(held_out) == config.prompts.n_eval


@pytest.mark.real_weights
def test_instruction_prompts_leave_out_align_evals_and_hold_out_the_last(smoke, shared_data):
  _, _, tok = smoke
  config = grpo_config.get_config("rm_cpu")
  config.prompts.update(n_train=40)
  train, held_out, stats = online.load_prompts(config.prompts, tok)
  texts = data.load_instructions("alpaca_eval")
  assert train.texts[0] == texts[config.prompts.skip_first]
  assert held_out.texts == texts[-config.prompts.n_eval:]
  evaluated = set(texts[:config.prompts.skip_first])  # align_eval's prompts
  assert not (set(train.texts) | set(held_out.texts)) & evaluated
  assert not set(train.texts) & set(held_out.texts)
  assert stats["n_train"] + stats["dropped_train"] == 40
  config.prompts.update(n_train=900)
  with pytest.raises(ValueError, match="prompts: skip_first"):
    online.load_prompts(config.prompts, tok)


@pytest.mark.real_weights
def test_kl_in_the_reward_subtracts_beta_times_the_sequence_kl(smoke):
  """loss.kl_in='reward': each completion's reward loses β Σ_t k3_t (rollout log-probs vs the
  adapters-off reference, scored independently here) before the group advantages; the loss then
  has no KL term."""
  from decode.rollout import rollout
  from lm.scoring import next_token_logprobs

  from align.losses import get

  _, _, tok = smoke
  config = _config(share_prompt=False)
  config.loss.update(beta=0.5, kl_in="reward")
  trainer, _ = _trainer_and_tok(config)
  for path, v in trainer.params.flat_state():  # LoRA B != 0: the policy differs from the reference
    if path[-1] == "lora_b":
      v.set_value(0.05 * np.ones(v.get_value().shape, np.float32))
  model = trainer.host_model()
  model.eval()
  ro = rollout(model, [[5, 17, 33], [41, 8]], max_new_tokens=6, tokenizer=tok,
               sampler=online.sampler_of(config.rollout), num_samples=4, seed=3)
  total = np.array([1.0, 0.0, 0.5, 0.2, 0.0, 0.0, 1.0, 1.0])
  batch, metrics = grpo.make_batch_for(config, trainer)(32, online.pad_id_of(tok))(ro, total, {})
  rows = rollout_batches.rollout_batch(ro, np.zeros(8, np.float32), width=32,
                                       pad_id=online.pad_id_of(tok))
  with lora.disabled(model):
    ref = np.asarray(next_token_logprobs(model, rows["tokens"], rows["attn_mask"],
                                         select_bs=rows["loss_mask"], temperature=0.8))
  mask = rows["loss_mask"][:, 1:] > 0
  log_r = np.where(mask, ref - rows["old_logps"], 0.0)
  kl_seq = (np.expm1(log_r) - log_r).sum(-1)
  assert kl_seq.min() > 0
  np.testing.assert_allclose(metrics["kl_seq"], kl_seq.mean(), rtol=1e-4)
  want = grpo.advantages(jnp.asarray(total - 0.5 * kl_seq, jnp.float32), 4)
  np.testing.assert_allclose(batch["advantages"], want, rtol=1e-3, atol=1e-5)
  _, loss_metrics = get("grpo")(model, {k: jnp.asarray(v) for k, v in batch.items()}, config.loss)
  assert "clip_low" in loss_metrics and "kl" not in loss_metrics  # no KL term in the loss


@pytest.mark.parametrize("change,match", [
    (lambda c: c.train.update(batch_size=3), "prompts_per_step x"),
    (lambda c: c.loss.update(temperature=0.5), "loss.temperature"),
    (lambda c: c.rollout.update(num_iterations=3), "multiple of rollout.num_iterations"),
    (lambda c: c.prompts.update(name="riddles"), "prompts.name"),
])
def test_bad_rollout_settings_name_the_field(change, match):
  config = ml_collections.ConfigDict(_config().to_dict())  # plain values: no shared references
  change(config)
  with pytest.raises(ValueError, match=match):
    grpo.ALGORITHM.check(config)


def test_reward_trend_by_hand():
  t = online.trend([0, 1, 0, 1, 5, 2, 1, 2, 1], window=4)
  # first [0, 1, 0, 1]: mean .5, sd .57735, se .288675; last [2, 1, 2, 1]: mean 1.5, se .288675
  assert t["first_mean"] == 0.5 and t["last_mean"] == 1.5
  np.testing.assert_allclose([t["first_se"], t["z"]], [0.288675, 1 / np.hypot(0.288675, 0.288675)],
                             rtol=1e-5)
  # slope over x = 0..8: Sxx 60, Σ(x - 4)·y = 10 → 1/6; SST 37 - 9·(13/9)² = 18.2222, explained
  # 60/36 = 1.6667, residual 16.5556 over 7 degrees of freedom → se sqrt(2.36508 / 60) = .198540
  np.testing.assert_allclose([t["slope"], t["slope_se"], t["slope_t"]],
                             [1 / 6, 0.198540, (1 / 6) / 0.198540], rtol=1e-5)
  assert online.trend([1.0, 2.0]) == {"window": 1}


@pytest.mark.real_weights
@pytest.mark.parametrize("share_prompt", [False, True], ids=["row_per_completion", "shared_prompt"])
def test_grpo_step_sharded_equals_single_device(smoke, share_prompt):
  _, _, tok = smoke
  config = _config(share_prompt=share_prompt)
  config.loss.beta = 0.04  # the reference pass (adapters off) runs sharded too
  mesh8 = sharding.make_mesh(data=2, fsdp=4)
  trainers = {name: _trainer_and_tok(config, mesh)[0] for name, mesh in (("1", None), ("8", mesh8))}
  stream, _, _ = _stream(config, trainers["8"], tok)  # rows padded to split over 8 shards
  batch = next(stream)
  if share_prompt:  # empty rows pad the 2 groups to the 8 batch shards
    assert batch["tokens"].shape[0] == 8 and batch["seq_count"].tolist() == [4, 4] + [0] * 6
    batch["advantages"] = (batch["loss_mask"] * np.linspace(-1, 1, batch["tokens"].shape[1])
                           ).astype(np.float32)
  else:
    batch["advantages"] = np.linspace(-1, 1, len(batch["advantages"])).astype(np.float32)
  results = []
  for name in ("1", "8"):
    trainer = trainers[name]
    m = [trainer.train_step(batch) for _ in range(2)]
    flat = {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in trainer.params.flat_state()}
    results.append(([x["loss"] for x in m], [x["grad_norm"] for x in m], flat))
  (l1, g1, p1), (l8, g8, p8) = results
  assert abs(g1[0]) > 0
  np.testing.assert_allclose(l1, l8, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(g1, g8, rtol=2e-5)
  for k in p1:
    np.testing.assert_allclose(p1[k], p8[k], rtol=1e-4, atol=2e-5, err_msg=k)
