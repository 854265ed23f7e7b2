"""Losses equal hand-computed values: DPO (every variant), Bradley–Terry and SFT; DPO sigmoid equals
TRL's formula on the same log-probs; model-level losses equal their definitions."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align import losses
from configs import dpo as dpo_config
from configs import reward as reward_config
from lm import lora
from align.losses.dpo import dpo_losses
from align.losses.reward import bradley_terry
from lm.heads import RewardModel
from lm import config as lm_config
from lm.model import Transformer

# policy chosen, policy rejected, reference chosen, reference rejected (summed log-probs)
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.5
H = (PC - PR) - (RC - RR)  # 1.5
BETA = 0.1


def _dpo_cfg(**kw):
  cfg = dpo_config.get_config("smoke").loss
  cfg.update(kw)
  return cfg


def _reward_cfg(**kw):
  cfg = reward_config.get_config("smoke").loss
  cfg.update(kw)
  return cfg


def _logsig(x):
  return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("variant,eps,expected", [
    ("sigmoid", 0.0, -_logsig(BETA * H)),
    ("sigmoid", 0.1, -0.9 * _logsig(BETA * H) - 0.1 * _logsig(-BETA * H)),
    ("robust", 0.1, (-0.9 * _logsig(BETA * H) + 0.1 * _logsig(-BETA * H)) / 0.8),
    ("hinge", 0.0, max(0.0, 1 - BETA * H)),
    ("ipo", 0.0, (H - 1 / (2 * BETA)) ** 2),
])
def test_dpo_variants_hand_computed(variant, eps, expected):
  got = dpo_losses(jnp.array([PC]), jnp.array([PR]), jnp.array([RC]), jnp.array([RR]), beta=BETA,
                   variant=variant, label_smoothing=eps)
  assert float(got[0]) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parity
def test_dpo_sigmoid_equals_trl_formula():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  lp = rng.normal(-50, 10, size=(4, 16)).astype(np.float32)
  pc, pr, rc, rr = lp
  for beta in (0.05, 0.1, 0.5):
    ours = np.asarray(dpo_losses(pc, pr, rc, rr, beta=beta, variant="sigmoid"))
    # trl/trainer/dpo_trainer.py (1.16) _compute_loss, f_divergence "reverse_kl", loss "sigmoid":
    t = [torch.tensor(x) for x in (pc, pr, rc, rr)]
    delta = (t[0] - t[2]) - (t[1] - t[3])
    trl = (-F.logsigmoid(beta * delta)).numpy()
    np.testing.assert_allclose(ours, trl, rtol=1e-5, atol=1e-6)


def test_bradley_terry_hand_computed():
  got = bradley_terry(jnp.array([1.0, -0.5]), jnp.array([0.5, 0.5]), 0.2)
  np.testing.assert_allclose(np.asarray(got), [-_logsig(0.3), -_logsig(-1.2)], rtol=1e-6)
  centred = bradley_terry(jnp.array([1.0]), jnp.array([0.5]), 0.0, center_coef=0.01)
  assert float(centred[0]) == pytest.approx(-_logsig(0.5) + 0.01 * 1.5**2, rel=1e-6)


def _tiny(seed=0):
  return Transformer(lm_config.preset("tiny"), rngs=nnx.Rngs(seed))


def _np_logprobs(model, tokens_bs, mask_bs):
  """Per-token log p(tokens[t+1] | ..) by numpy log-softmax of the model's logits."""
  logits = np.asarray(model(jnp.asarray(tokens_bs), attn_mask=jnp.asarray(mask_bs))[0], np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits[:, :-1], tokens_bs[:, 1:, None], -1)[..., 0]
  return picked - logz[:, :-1]


def _pair_batch(rng, b=3, s=12):
  tokens = rng.integers(1, 256, (b, 2, s)).astype(np.int32)
  attn = np.ones((b, 2, s), np.int32)
  attn[0, 1, 9:] = 0  # a right-padded rejected reply
  loss_mask = attn.astype(np.float32)
  loss_mask[:, :, :5] = 0  # 5 prompt tokens
  tokens[:, 1, :5] = tokens[:, 0, :5]  # chosen and rejected share the prompt
  return {"tokens": tokens, "attn_mask": attn, "loss_mask": loss_mask}


def test_sft_loss_is_masked_token_nll():
  model = _tiny()
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 256, (2, 10)).astype(np.int32)
  attn = np.ones((2, 10), np.int32)
  attn[1, 7:] = 0
  loss_mask = attn.astype(np.float32)
  loss_mask[:, :4] = 0
  loss, metrics = losses.get("sft")(model, {"tokens": tokens, "attn_mask": attn,
                                            "loss_mask": loss_mask})
  lp = _np_logprobs(model, tokens, attn)
  w = loss_mask[:, 1:]
  assert float(loss) == pytest.approx(-(lp * w).sum() / w.sum(), rel=1e-5)
  assert float(metrics["target_tokens"]) == w.sum()


def test_dpo_loss_on_model_matches_definition_and_precomputed_reference():
  model = _tiny()
  lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0), rngs=nnx.Rngs(1))
  # nonzero B so policy != reference
  for path, v in nnx.state(model, nnx.LoRAParam).flat_state():
    if path[-1] == "lora_b":
      v.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), v.get_value().shape))
  batch = _pair_batch(np.random.default_rng(2))
  cfg = _dpo_cfg(beta=BETA, variant="sigmoid", label_smoothing=0.0)
  loss, metrics = losses.get("dpo")(model, batch, cfg)

  def seq_lp(m):
    b, two, s = batch["tokens"].shape
    lp = _np_logprobs(m, batch["tokens"].reshape(-1, s), batch["attn_mask"].reshape(-1, s))
    return (lp * batch["loss_mask"].reshape(-1, s)[:, 1:]).sum(-1).reshape(b, two)

  pol = seq_lp(model)
  with lora.disabled(model):
    ref = seq_lp(model)
  h = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])
  expected = np.mean([-_logsig(BETA * x) for x in h])
  assert float(loss) == pytest.approx(expected, rel=1e-4)
  assert float(metrics["rewards/margin"]) == pytest.approx(BETA * h.mean(), rel=1e-3, abs=1e-6)
  pre, _ = losses.get("dpo")(model, dict(batch, ref_logps=ref.astype(np.float32)), cfg)
  assert float(pre) == pytest.approx(float(loss), rel=1e-5)


def test_precomputed_reference_equals_the_reference_the_loss_computes():
  """`precompute_reference` (the host scoring loop, left-padded rows, eval mode) gives the sums the
  DPO loss computes with adapters off on right-padded pairs, also with dropout on in the model,
  uneven lengths, a weighted loss mask and a last batch that is not full."""
  from align.losses.dpo import pair_logprobs, precompute_reference

  model = _tiny()
  lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5), rngs=nnx.Rngs(1))
  for path, v in nnx.state(model, nnx.LoRAParam).flat_state():
    if path[-1] == "lora_b":
      v.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), v.get_value().shape))
  batch = _pair_batch(np.random.default_rng(3), b=5)
  batch["attn_mask"][2, :, 10:] = 0  # a shorter pair
  batch["loss_mask"][2, :, 10:] = 0
  batch["loss_mask"][3, 0, 7] = 0.5  # a weighted target
  examples = [{k: v[i] for k, v in batch.items()} for i in range(5)]
  got = np.stack([ex["ref_logps"] for ex in precompute_reference(model, examples, batch_size=4)])
  model.eval()
  with lora.disabled(model):
    want = np.asarray(pair_logprobs(model, batch)[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  with lora.disabled(model):
    policy_free = precompute_reference(_tiny(), examples[:2], batch_size=2)  # a model without LoRA
  assert all(ex["ref_logps"].shape == (2,) for ex in policy_free)


def test_dpo_without_adapters_or_reference_says_how_to_fix():
  cfg = _dpo_cfg(beta=BETA, variant="sigmoid", label_smoothing=0.0)
  with pytest.raises(ValueError, match="precomputed"):
    losses.get("dpo")(_tiny(), _pair_batch(np.random.default_rng(0)), cfg)


def test_reward_loss_reads_last_real_token():
  rm = RewardModel(_tiny(), rngs=nnx.Rngs(3))
  batch = _pair_batch(np.random.default_rng(4))
  loss, metrics = losses.get("reward")(rm, batch, _reward_cfg(margin=0.0))
  b, two, s = batch["tokens"].shape
  h, _ = rm.backbone.hidden_states(jnp.asarray(batch["tokens"].reshape(-1, s)),
                                   attn_mask=jnp.asarray(batch["attn_mask"].reshape(-1, s)))
  last = batch["attn_mask"].reshape(-1, s).sum(-1) - 1
  r = (np.asarray(h)[np.arange(b * two), last] @ np.asarray(rm.score.kernel[...]))[:, 0]
  r = r.reshape(b, two)
  assert float(loss) == pytest.approx(np.mean([-_logsig(x) for x in r[:, 0] - r[:, 1]]), rel=1e-4)
  assert float(metrics["accuracy"]) == pytest.approx(np.mean(r[:, 0] > r[:, 1]))


def test_unknown_loss_and_variant_are_named():
  with pytest.raises(ValueError, match="registered"):
    losses.get("nope")
  from align.losses.dpo import check_config

  with pytest.raises(ValueError, match="loss.variant"):
    check_config(_dpo_cfg(beta=0.1, variant="sigmod"))
