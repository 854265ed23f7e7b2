"""Group Relative Policy Optimisation: advantages, the clipped surrogate, KL and aggregation.

For completion i of a prompt's group of G, with per-token ratio ρ_t = π(y_t) / π_old(y_t) and
advantage A_i, the per-token loss is

  ℓ_t = -min(ρ_t A_i, clip(ρ_t, 1 - ε_low, 1 + ε_high) A_i)   (+ β KL_t when the KL is in the loss)

with, for A_i < 0 and a dual clip c > 1, ℓ_t = min(ℓ_t, -c A_i) (Ye et al. 2020). The
advantage estimators (`advantages`) and the aggregations over tokens (`aggregate`) are the ones
TRL and tunix name; the functions here are pure and take log-probs, so the same code scores a
whole model batch (`grpo_loss`) and the hand-computed golden cases in the tests.

The training rows of a rollout are built in `align.losses.rollout_batches`; the end of this module
hooks GRPO to the online driver (`make_batch_for`: rewards -> advantages -> rows; `ALGORITHM`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from align import online
from align.algorithm import Algorithm
from align.losses import register, shared_prompt
from align.losses.common import trainer_reference_logprobs
from align.losses.rollout_batches import (kept_completions, rollout_batch, shared_layout,
                                          shared_rollout_batch)
from lm import lora
from lm.scoring import next_token_logprobs, sample_kl_estimators

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "batch_std")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
# β·KL to the reference: a term of the loss (GRPO paper, TRL), or subtracted from each
# sequence's reward before the advantages (β Σ_t KL_t, scored once per rollout; no reference pass
# in the loss)
KL_PLACES = ("loss", "reward")


def advantages(rewards_n: jax.Array, group_size: int, estimator: str = "grpo", *,
               eps: float = 1e-6, ddof: int = 1) -> jax.Array:
  """Per-completion advantages `[N]` from rewards `[N]` in prompt-major groups of `group_size`.

  grpo       (r - mean_g) / (std_g + eps), std with `ddof` (1 = Bessel, as tunix/TRL/OpenRLHF)
  dr_grpo    r - mean_g (Dr. GRPO: no std, which up-weights easy and hard groups)
  rloo       r - mean of the other G - 1 rewards = G/(G-1) (r - mean_g)
  batch_std  (r - mean_g) / (std over the whole batch + eps) (TRL's scale_rewards="batch")
  A group whose rewards are all equal gets exactly 0 under every estimator.
  """
  if estimator not in ESTIMATORS:
    raise ValueError(f"advantage estimator {estimator!r} is unknown; choose one of {ESTIMATORS}.")
  n = rewards_n.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"{n} rewards do not split into groups of {group_size}.")
  if estimator == "rloo" and group_size < 2:
    raise ValueError("rloo needs a group of at least 2 completions per prompt.")
  r_gk = rewards_n.astype(jnp.float32).reshape(-1, group_size)
  centred = r_gk - r_gk.mean(axis=1, keepdims=True)
  if estimator == "dr_grpo":
    out = centred
  elif estimator == "rloo":
    out = centred * (group_size / (group_size - 1))
  elif estimator == "grpo":
    std = jnp.std(r_gk, axis=1, keepdims=True, ddof=ddof) if group_size > ddof else 0.0
    out = centred / (std + eps)
  else:
    out = centred / (jnp.std(rewards_n.astype(jnp.float32), ddof=ddof) + eps)
  # Exact zeros for constant groups: their centred rewards can round to ±1 ulp, not 0.
  constant = jnp.all(r_gk == r_gk[:, :1], axis=1, keepdims=True)
  return jnp.where(constant, 0.0, out).reshape(n)


def zero_std_share(rewards_n: jax.Array, group_size: int) -> jax.Array:
  """Share of groups whose rewards are all equal (they carry no policy gradient)."""
  r_gk = rewards_n.reshape(-1, group_size)
  return jnp.mean(jnp.all(r_gk == r_gk[:, :1], axis=1).astype(jnp.float32))


def kl_per_token(logp_bt: jax.Array, ref_logp_bt: jax.Array, estimator: str = "k3",
                 clamp: float | None = None) -> jax.Array:
  """KL(π || π_ref) estimated at the sampled tokens, `[B, T]` (`lm.scoring.sample_kl_estimators`).
  `clamp` bounds log r = log π_ref - log π to [-clamp, clamp] first: with it every estimator and
  its gradient are finite for any finite log-probs (k3 = e^{log r} - log r - 1 overflows float32
  past log r ~ 88 without it); the configs set 20."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl estimator {estimator!r} is unknown; choose one of {KL_ESTIMATORS}.")
  return sample_kl_estimators(logp_bt, ref_logp_bt, clamp)[estimator]


def masked_mean(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """Mean of `x_bt` over the tokens `mask_bt` marks (0 when it marks none)."""
  m = mask_bt.astype(jnp.float32)
  return (x_bt.astype(jnp.float32) * m).sum() / jnp.maximum(m.sum(), 1.0)


def masked_max_abs_diff(x_bt: jax.Array, y_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
  """max |x - y| over the tokens `mask_bt` marks (0 when it marks none): e.g. rollout vs trainer
  log-probs at a rollout's first iteration."""
  return jnp.max(jnp.where(mask_bt, jnp.abs(x_bt - y_bt), 0.0), initial=0.0)


def aggregate(loss_bt: jax.Array, mask_bt: jax.Array, how: str, *,
              max_completion_length: int | None = None, seq_weight=None, n_seqs=None
              ) -> jax.Array:
  """One scalar from per-token losses over the `mask_bt` tokens.

  Rows are sequences, unless `seq_weight` (mask / the token count of the token's sequence) and
  `n_seqs` say where sequences are (the shared-prompt layout packs a group's G completions in one
  row).

  seq_mean_token_mean      mean over sequences of each sequence's token mean (GRPO paper; TRL
                           "grpo"; tunix default)
  token_mean               sum over all tokens / their count (DAPO; TRL "bnpo", and "dapo" when
                           the batch is the whole generation batch)
  seq_mean_token_sum_norm  sum over all tokens / (B x max_completion_length) (Dr. GRPO's
                           constant normaliser; TRL "dr_grpo")
  """
  m = mask_bt.astype(jnp.float32)
  n = loss_bt.shape[0] if n_seqs is None else jnp.maximum(n_seqs, 1)
  if how == "seq_mean_token_mean":
    if seq_weight is not None:
      return (loss_bt * seq_weight * m).sum() / n
    return ((loss_bt * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)).mean()
  if how == "token_mean":
    return masked_mean(loss_bt, m)
  if how == "seq_mean_token_sum_norm":
    if not max_completion_length:
      raise ValueError("seq_mean_token_sum_norm needs max_completion_length (the constant "
                       "normaliser).")
    return (loss_bt * m).sum() / (n * max_completion_length)
  raise ValueError(f"loss aggregation {how!r} is unknown; choose one of {AGGREGATIONS}.")


def clipped_surrogate(logp_bt, old_logp_bt, adv_b, *, eps_low: float = 0.2,
                      eps_high: float | None = None, dual_clip: float | None = None):
  """(per-token loss `[B, T]`, ratio `[B, T]`, low-clipped `[B, T]`, high-clipped `[B, T]`).

  Low-clipped: ρ < 1 - ε_low with A < 0; high-clipped: ρ > 1 + ε_high with A > 0 (where the clip
  removes the gradient; TRL's clip_ratio/low and /high)."""
  eps_high = eps_low if eps_high is None else eps_high
  adv = adv_b[:, None] if adv_b.ndim == 1 else adv_b  # per sequence [B] or per token [B, T] (PPO)
  ratio = jnp.exp(logp_bt - old_logp_bt)
  clipped = jnp.clip(ratio, 1 - eps_low, 1 + eps_high)
  loss = -jnp.minimum(ratio * adv, clipped * adv)
  if dual_clip is not None:
    if not dual_clip > 1:
      raise ValueError(f"dual_clip={dual_clip} must be > 1 (Ye et al. use 3).")
    loss = jnp.where(adv < 0, jnp.minimum(loss, -dual_clip * adv), loss)
  low = (ratio < 1 - eps_low) & (adv < 0)
  high = (ratio > 1 + eps_high) & (adv > 0)
  return loss, ratio, low, high


def policy_loss(logp_bt, old_logp_bt, adv_b, mask_bt, *, eps_low: float = 0.2,
                eps_high: float | None = None, dual_clip: float | None = None,
                aggregation: str = "seq_mean_token_mean", max_completion_length: int | None = None,
                ref_logp_bt=None, beta: float = 0.0, kl_estimator: str = "k3",
                kl_clamp: float | None = None, seq_weight=None, n_seqs=None):
  """(loss, metrics) of the clipped surrogate plus β·KL in the loss, aggregated over `mask_bt`.

  `ref_logp_bt` is needed when β > 0 (and only then read). Metrics are masked token means:
  clip fractions low / high / region, the KL estimate, and the ratio's mean and max.
  """
  m = mask_bt.astype(jnp.float32)
  per_token, ratio, low, high = clipped_surrogate(
      logp_bt, old_logp_bt, adv_b, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)
  mean = lambda x: masked_mean(x, m)
  metrics = {"clip_low": mean(low), "clip_high": mean(high), "clip_region": mean(low | high),
             "ratio_mean": mean(ratio),
             "ratio_max": jnp.max(jnp.where(m > 0, ratio, -jnp.inf), initial=0.0)}
  if beta:
    kl = kl_per_token(logp_bt, ref_logp_bt, kl_estimator, kl_clamp)
    per_token = per_token + beta * kl
    metrics["kl"] = mean(kl)
  loss = aggregate(per_token, m, aggregation, max_completion_length=max_completion_length,
                   seq_weight=seq_weight, n_seqs=n_seqs)
  metrics["loss"] = loss
  return loss, metrics


def check_config(cfg) -> None:
  """Clear errors for bad GRPO settings before anything compiles."""
  if cfg.aggregation not in AGGREGATIONS:
    raise ValueError(f"loss.aggregation={cfg.aggregation!r} is unknown; choose one of "
                     f"{AGGREGATIONS}.")
  if cfg.kl_estimator not in KL_ESTIMATORS:
    raise ValueError(f"loss.kl_estimator={cfg.kl_estimator!r} is unknown; choose one of "
                     f"{KL_ESTIMATORS}.")
  if not cfg.temperature > 0:
    raise ValueError(f"loss.temperature={cfg.temperature} must be > 0: the rollout's sampling "
                     "temperature, at which the policy's log-probs are scored.")
  if cfg.beta < 0:
    raise ValueError(f"loss.beta={cfg.beta} must be >= 0 (0 skips the reference pass).")
  if cfg.kl_in not in KL_PLACES:
    raise ValueError(f"loss.kl_in={cfg.kl_in!r} is unknown; choose one of {KL_PLACES}.")
  if not 0 < cfg.eps_low < 1:
    raise ValueError(f"loss.eps_low={cfg.eps_low} must be in (0, 1) (0.2 is usual).")


@register("grpo")
def grpo_loss(model, batch: dict, cfg):
  """batch: tokens / attn_mask / loss_mask `[B, S]` (prompt then completion, right-padded; the
  loss mask marks completion tokens, the EOS included), advantages `[B]`; optional old_logps and
  ref_logps `[B, S-1]` aligned with `next_token_logprobs` (target t+1 at index t). Without
  old_logps the ratio is taken against the current log-probs with the gradient stopped (μ = 1).
  Or the shared-prompt layout of `rollout_batches.shared_rollout_batch` (one row per group; every
  per-token array `[R, W]` aligned with the tokens; seq_weight and seq_count give the sequences).
  With β > 0 and no ref_logps, the reference is this model with its adapters off.
  cfg: temperature, eps_low, eps_high, dual_clip, aggregation, max_completion_length, beta,
  kl_estimator, kl_clamp, kl_in ("reward": β was applied to the rewards, none here)."""
  temperature = cfg.temperature
  shared = "segment_ids" in batch
  if shared:  # one row per group: [prompt | completion 1 | ... | completion G]
    mask = batch["loss_mask"] > 0
    score = lambda: shared_prompt.layout_token_logprobs(
        model, batch["tokens"], batch["positions"], batch["segment_ids"], batch["branch"],
        batch["prev"], mask, temperature=temperature)
    seqs = {"seq_weight": batch["seq_weight"], "n_seqs": batch["seq_count"].sum()}
  else:
    mask = batch["loss_mask"][:, 1:] > 0
    score = lambda: next_token_logprobs(model, batch["tokens"], batch["attn_mask"],
                                        select_bs=batch["loss_mask"], temperature=temperature)
    seqs = {}
  lp = score()
  old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(lp)
  beta = cfg.beta if cfg.kl_in == "loss" else 0.0
  ref = None
  if beta:
    ref = batch.get("ref_logps")
    if ref is None:
      if not lora.count_params(model, nnx.LoRAParam):
        raise ValueError("GRPO with loss.beta > 0 needs a reference: this model has no LoRA "
                         "adapters to switch off; pass ref_logps in the batch or set beta=0.")
      with lora.disabled(model):
        ref = jax.lax.stop_gradient(score())
  loss, metrics = policy_loss(
      lp, old, batch["advantages"], mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
      dual_clip=cfg.dual_clip, aggregation=cfg.aggregation,
      max_completion_length=cfg.max_completion_length, ref_logp_bt=ref, beta=beta,
      kl_estimator=cfg.kl_estimator, kl_clamp=cfg.kl_clamp, **seqs)
  m = mask.astype(jnp.float32)
  if "old_logps" in batch:  # at a rollout's first iteration: rollout vs trainer log-prob
    metrics["logp_diff_max"] = masked_max_abs_diff(lp, old, mask)
  metrics["logps"] = masked_mean(lp, m)
  metrics["completion_tokens"] = (m.sum() / jnp.maximum(seqs["n_seqs"], 1) if shared
                                  else m.sum(-1).mean())
  return loss, metrics


def overlong_penalty(lengths_n, max_len: int, buffer: int, factor: float = 1.0) -> np.ndarray:
  """DAPO's soft overlong punishment `[N]`: 0 up to max_len - buffer tokens, then falling
  linearly to -factor at max_len (and -factor beyond)."""
  if not 0 < buffer <= max_len:
    raise ValueError(f"overlong buffer {buffer} must be in (0, max_len={max_len}].")
  over = np.asarray(lengths_n, np.float64) - (max_len - buffer)
  return -factor * np.clip(over / buffer, 0.0, 1.0)


def make_batch_for(config, trainer=None) -> callable:
  """`make_batch_for(width, pad_id)` for `align.online.setup`: GRPO's batch of a rollout. The
  overlong penalty (rollout.overlong_buffer > 0) joins the reward before the advantages
  (rollout.advantage, adv_eps, adv_ddof); rows of truncated completions or zero-variance groups
  leave the loss when rollout.mask_truncated / mask_zero_std. rollout.share_prompt: the
  shared-prompt layout (`shared_rollout_batch`; `trainer` gives the batch shards)."""
  r = config.rollout
  group = int(r.num_generations)
  share = bool(r.share_prompt)
  accum = int(config.train.grad_accum)
  shards = trainer.n_batch_shards if trainer is not None else 1
  if share:  # fail before the model loads
    shared_layout(int(r.prompts_per_step), group, 1, int(r.max_new_tokens), groups=accum)
  lc = config.loss
  beta_in_reward = float(lc.beta) if lc.kl_in == "reward" else 0.0
  if beta_in_reward and trainer is None:
    raise ValueError("loss.kl_in='reward' scores the reference per rollout: pass the trainer.")
  if beta_in_reward and not lora.count_params(trainer.model, nnx.LoRAParam):
    raise ValueError("loss.kl_in='reward' needs a reference: this model has no LoRA adapters "
                     "to switch off; set loss.beta=0 or train with LoRA.")

  def make_batch(ro, total, each, rollout_index: int = 0, *, width: int, pad_id: int):
    del each, rollout_index
    rewards_n = np.asarray(total, np.float64)
    metrics = {}
    if beta_in_reward:  # β Σ_t KL_t per sequence, off the rewards, before the advantages
      scored = rollout_batch(ro, np.zeros(len(rewards_n), np.float32), width=width, pad_id=pad_id)
      ref = trainer_reference_logprobs(trainer, scored, float(lc.temperature))
      mask = scored["loss_mask"][:, 1:] > 0
      kl = np.asarray(kl_per_token(jnp.asarray(scored["old_logps"]), ref,
                                   lc.kl_estimator, lc.kl_clamp)) * mask
      kl_seq = kl.sum(-1)
      rewards_n = rewards_n - beta_in_reward * kl_seq
      metrics.update(kl=float(kl.sum() / max(mask.sum(), 1)), kl_seq=float(kl_seq.mean()),
                     **{"reward/kl_penalty": float(-beta_in_reward * kl_seq.mean())})
    if r.overlong_buffer:
      pen = overlong_penalty(ro.lengths_b, r.max_new_tokens, r.overlong_buffer,
                             r.overlong_factor)
      rewards_n = rewards_n + pen
      metrics["reward/overlong"] = float(pen.mean())
    adv = np.asarray(advantages(jnp.asarray(rewards_n, jnp.float32), group,
                                r.advantage, eps=r.adv_eps, ddof=r.adv_ddof))
    masks = dict(mask_truncated=r.mask_truncated, mask_zero_std=r.mask_zero_std,
                 rewards_n=rewards_n)
    if share:  # width = longest prompt + max_new_tokens, rounded up: the prompt bound it keeps
      rows, shared_width = shared_layout(int(r.prompts_per_step), group,
                                         width - int(r.max_new_tokens), int(r.max_new_tokens),
                                         groups=accum, multiple=shards)
      batch = shared_rollout_batch(ro, adv, rows=rows, width=shared_width, group_size=group,
                                   groups=accum, pad_id=pad_id, **masks)
    else:
      batch = rollout_batch(ro, adv, width=width, pad_id=pad_id, group_size=group, **masks)
    metrics.update(zero_std_share=float(zero_std_share(jnp.asarray(rewards_n), group)),
                   adv_abs_mean=float(np.abs(adv).mean()),
                   rows_in_loss=float(np.mean(kept_completions(ro, group_size=group, **masks))))
    return batch, metrics

  return online.batch_builder(make_batch)


def _check(config) -> None:
  check_config(config.loss)
  online.check_config(config)


ALGORITHM = Algorithm(
    name="grpo", loss=grpo_loss, data_kind="rollouts",
    plotted=("reward", "reward/*", "zero_std_share", "length_mean", "length_median", "empty_share",
             "truncated_share", "entropy", "clip_low", "clip_high", "kl", "logp_diff_max",
             "time/*", "step_s"),
    check=_check,
    make_batch_for=make_batch_for,
    finish=online.finish)
