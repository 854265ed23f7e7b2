"""PPO for language models: per-token KL penalty in the reward with the sequence's score at its
last real token, GAE(γ, λ), whitened advantages, the clipped policy loss and the clipped value loss.

The formulas follow Ouyang et al. (2022) as TRL's `PPOTrainer` and Huang et al.'s "N+
implementation details of RLHF with PPO" (2024) write them. Time runs over completion tokens:
position t of a `[B, T]` array is the action y_t, scored by `next_token_logprobs` at index t, and
the value V_t is read from the hidden state that predicts y_t (the state before the action).
Masks mark completion tokens, the end-of-turn included; everything is zero outside them.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align import online
from align.algorithm import Algorithm
from align.losses import register
from align.losses.common import trainer_reference_logprobs
from align.losses.grpo import (KL_ESTIMATORS, kl_per_token, masked_max_abs_diff, masked_mean,
                               policy_loss)
from align.losses.rollout_batches import rollout_batch
from lm.heads import PolicyWithValue
from lm.scoring import selected_token_logprobs


def _last_index(mask_bt: jax.Array) -> jax.Array:
  """Index of each row's last marked position (-1 for a row with none)."""
  t = jnp.arange(mask_bt.shape[1])
  return jnp.max(jnp.where(mask_bt > 0, t, -1), axis=1)


def token_rewards(score_b, logp_bt, ref_logp_bt, mask_bt, *, kl_coef: float,
                  estimator: str = "k1", clamp: float | None = None):
  """(rewards `[B, T]`, kl `[B, T]`): r_t = -kl_coef · KL_t on every completion token, plus the
  sequence score at its last token (the end-of-turn when one was emitted). KL_t estimates
  KL(π || π_ref) at the sampled token (k1 = log π - log π_ref, TRL's default; k2, k3)."""
  m = mask_bt.astype(jnp.float32)
  kl = kl_per_token(logp_bt, ref_logp_bt, estimator, clamp) * m
  last = _last_index(mask_bt)
  at_last = (jnp.arange(mask_bt.shape[1])[None] == last[:, None]).astype(jnp.float32)
  return -kl_coef * kl + at_last * jnp.asarray(score_b, jnp.float32)[:, None], kl


def gae(rewards_bt, values_bt, mask_bt, *, gamma: float = 1.0, lam: float = 0.95):
  """(advantages `[B, T]`, returns `[B, T]`) by generalised advantage estimation:

    δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γ λ A_{t+1},   R_t = A_t + V_t

  with V and r zero outside the mask, so the value after a row's last token is 0 (the episode
  ends there) and padding contributes nothing."""
  m = mask_bt.astype(jnp.float32)
  r, v = rewards_bt.astype(jnp.float32) * m, values_bt.astype(jnp.float32) * m
  v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta = r + gamma * v_next - v

  def back(carry, d_b):
    a = d_b + gamma * lam * carry
    return a, a

  _, adv_tb = jax.lax.scan(back, jnp.zeros(delta.shape[0]), delta.T, reverse=True)
  adv = adv_tb.T * m
  return adv, (adv + v) * m


def whiten(x_bt, mask_bt, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / sqrt(var + eps) over the marked entries, zero elsewhere; var is the unbiased
  masked variance (n / (n - 1) times the mean square deviation), as TRL's `masked_whiten`.
  `shift_mean=False` adds the mean back (TRL's reward whitening)."""
  m = mask_bt.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  mean = (x_bt * m).sum() / n
  var = (jnp.square(x_bt - mean) * m).sum() / n * (n / jnp.maximum(n - 1.0, 1.0))
  out = (x_bt - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * m


def explained_variance(values_bt, returns_bt, mask_bt) -> float:
  """1 - Var(R - V) / Var(R) over the marked tokens (CleanRL's and SB3's critic diagnostic): 1 for
  a perfect critic, 0 for one no better than a constant, negative when worse. The value loss
  alone can rise while the critic improves, when the returns' own variance grows."""
  m = np.asarray(mask_bt, bool)
  r, v = np.asarray(returns_bt, np.float64)[m], np.asarray(values_bt, np.float64)[m]
  var = r.var() if r.size else 0.0
  return float(1.0 - (r - v).var() / var) if var > 0 else float("nan")


def value_loss(values_bt, old_values_bt, returns_bt, mask_bt, *, clip: float | None = 0.2):
  """(loss, clip fraction): ½ · masked mean of max((V - R)², (clip(V, V_old ± c) - R)²); without
  `clip`, ½ · masked mean of (V - R)². The fraction counts tokens where the clipped term is the
  larger (TRL's vf_clipfrac)."""
  m = mask_bt.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  plain = jnp.square(values_bt - returns_bt)
  if clip is None:
    return 0.5 * (plain * m).sum() / n, jnp.zeros(())
  clipped_v = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip, clip)
  clipped = jnp.square(clipped_v - returns_bt)
  loss = 0.5 * (jnp.maximum(plain, clipped) * m).sum() / n
  return loss, ((clipped > plain) * m).sum() / n


@register("ppo")
def ppo_loss(model: PolicyWithValue, batch: dict, cfg):
  """batch: tokens / attn_mask / loss_mask `[B, S]` as GRPO's rows; advantages, returns,
  old_values, old_logps `[B, S-1]` aligned with `next_token_logprobs`; policy_weight `[B]` (0
  during the critic warm-up). One trunk pass gives the log-probs (at cfg.temperature) and the
  values. loss = policy_weight · clipped surrogate (token mean) + vf_coef · clipped value loss;
  at policy_weight 0 (critic warm-up) only the value head trains."""
  tokens, attn = batch["tokens"], batch["attn_mask"]
  sel = batch["loss_mask"][:, 1:] > 0
  h_bsd, _ = model.backbone.hidden_states(tokens, attn_mask=attn)
  lp = selected_token_logprobs(model.backbone, h_bsd[:, :-1], tokens[:, 1:], sel,
                               temperature=cfg.temperature)
  weight = batch["policy_weight"].mean()
  # During the critic warm-up (weight 0) the value loss reaches the head only, not the shared
  # trunk: the policy does not move until its own loss is on.
  h_value = weight * h_bsd + (1.0 - weight) * jax.lax.stop_gradient(h_bsd)
  values = model.values(h_value[:, :-1])  # V of the state before each action
  pg, metrics = policy_loss(lp, batch["old_logps"], batch["advantages"], sel,
                            eps_low=cfg.cliprange, aggregation="token_mean")
  vf, vf_clipfrac = value_loss(values, batch["old_values"], batch["returns"], sel,
                               clip=cfg.cliprange_value)
  loss = weight * pg + cfg.vf_coef * vf
  metrics.update(loss=loss, policy_loss=pg, value_loss=vf, vf_clipfrac=vf_clipfrac,
                 value_mean=masked_mean(values, sel), policy_weight=weight,
                 logp_diff_max=masked_max_abs_diff(lp, batch["old_logps"], sel))
  return loss, metrics


@functools.partial(jax.jit, static_argnums=0)
def _values(graphdef, params, rest, tokens_bs, attn_mask_bs) -> jax.Array:
  """V `[B, S-1]` of training rows under the model in eval mode (the state before each action)."""
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  h_bsd, _ = model.backbone.hidden_states(tokens_bs, attn_mask=attn_mask_bs)
  return model.values(h_bsd[:, :-1])


def _rollout_scores(trainer, rows: dict, temperature: float, with_ref: bool):
  """(values `[B, S-1]`, reference log-probs `[B, S-1]` or zeros) of training rows under the
  trainer's current model; the reference is `trainer_reference_logprobs` (adapters off). An
  abstract trainer (`launch.py --compile_only`) gives zeros of their shapes."""
  if trainer.abstract:
    b, s = np.shape(rows["tokens"])
    return jnp.zeros((b, s - 1), jnp.float32), jnp.zeros((b, s - 1), jnp.float32)
  with jax.set_mesh(trainer.mesh):
    values = _values(trainer.graphdef, trainer.params, trainer.rest, jnp.asarray(rows["tokens"]),
                     jnp.asarray(rows["attn_mask"]))
  if not with_ref:
    return values, jnp.zeros_like(values)
  return values, trainer_reference_logprobs(trainer, rows, temperature)


def make_batch_for(config, trainer) -> Callable:
  """`make_batch_for(width, pad_id)` for `align.online.setup`: PPO's batch of a rollout. The
  sequence reward is the weighted sum of `config.rewards`; values and the reference are scored
  once on the rollout's rows; per-token rewards, GAE and whitening (`loss.whiten_advantages`)
  follow; rollouts before `rollout.critic_warmup` train the value head only."""
  r, lc = config.rollout, config.loss
  if r.share_prompt:
    raise ValueError("rollout.share_prompt is GRPO's layout; PPO scores one row per completion "
                     "(values per token): set rollout.share_prompt=False.")
  kl_coef = float(lc.kl_coef)

  def make_batch(ro, total, each, rollout_index: int = 0, *, width: int, pad_id: int):
    del each
    rows = rollout_batch(ro, np.zeros(len(ro.lengths_b), np.float32), width=width,
                         pad_id=pad_id, mask_truncated=r.mask_truncated)
    values, ref = _rollout_scores(trainer, rows, float(lc.temperature),
                                  with_ref=kl_coef > 0)
    mask = rows["loss_mask"][:, 1:] > 0
    rewards_bt, kl = token_rewards(jnp.asarray(total, jnp.float32), jnp.asarray(rows["old_logps"]),
                                   ref, mask, kl_coef=kl_coef,
                                   estimator=lc.kl_estimator, clamp=lc.kl_clamp)
    adv, returns = gae(rewards_bt, values, mask, gamma=lc.gamma, lam=lc.lam)
    if lc.whiten_advantages:
      adv = whiten(adv, mask)
    warm = rollout_index < int(r.critic_warmup)
    batch = dict(rows, advantages=np.asarray(adv, np.float32),
                 returns=np.asarray(returns, np.float32),
                 old_values=np.asarray(values * mask, np.float32),
                 policy_weight=np.full(len(ro.lengths_b), 0.0 if warm else 1.0, np.float32))
    kl_seq = float(kl.sum()) / max(len(ro.lengths_b), 1)  # kl is 0 outside the mask
    metrics = {"kl": float(masked_mean(kl, mask)), "kl_seq": kl_seq,
               "non_score_reward": -kl_coef * kl_seq,
               "returns_mean": float(masked_mean(returns, mask)),
               "explained_variance": explained_variance(values, returns, mask),
               "returns_var": float(np.asarray(returns)[mask].var()) if mask.any() else 0.0,
               "critic_warmup": float(warm)}
    return batch, metrics

  return online.batch_builder(make_batch)


def _check(config) -> None:
  online.check_config(config)
  lc = config.loss
  if not 0 < lc.lam <= 1 or not 0 < lc.gamma <= 1:
    raise ValueError(f"loss.gamma={lc.gamma} and loss.lam={lc.lam} must be in (0, 1].")
  if lc.kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"loss.kl_estimator={lc.kl_estimator!r} is unknown; choose one of "
                     f"{KL_ESTIMATORS}.")


ALGORITHM = Algorithm(
    name="ppo", loss=ppo_loss, data_kind="rollouts",
    plotted=("reward", "reward/*", "value_loss", "explained_variance", "returns_var",
             "policy_loss", "vf_clipfrac", "value_mean",
             "returns_mean", "kl", "length_mean", "length_median", "empty_share",
             "truncated_share", "entropy", "clip_low", "clip_high", "logp_diff_max", "time/*",
             "step_s"),
    check=_check,
    wrap=lambda model, config: PolicyWithValue(model, rngs=nnx.Rngs(config.train.seed)),
    trainable=lambda filt: nnx.Any(filt, nnx.All(nnx.Param, nnx.PathContains("value"))),
    make_batch_for=make_batch_for,
    finish=online.finish)
