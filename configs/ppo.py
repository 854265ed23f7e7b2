"""PPO: online RL with a value head on the policy's trunk, per-token KL penalty, GAE.

  python launch.py --config=configs/ppo.py:cpu --workdir=runs/ppo

Each step samples completions with the current policy (as `grpo.py`), scores them with
`config.rewards`, scores the rollout's rows once for values and the reference log-probs (adapters
off), builds per-token rewards (-kl_coef · KL_t, the score at the last token), advantages by
GAE(γ, λ) whitened over the batch, and trains the clipped surrogate plus vf_coef times the clipped
value loss. The first `rollout.critic_warmup` rollouts train the value head only. Code:
`align/losses/ppo.py`; the stream in `align/online.py`. Defaults follow TRL's PPOConfig (γ 1,
λ 0.95, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, kl_coef 0.05, k1, num_ppo_epochs 4 on
`:cpu` / `:gpu_full`); the value head's learning rate is 10x the adapters' (`train.lr_multipliers`).
"""

import ml_collections

from configs import common, grpo, train_base

VARIANTS = train_base.VARIANTS  # not grpo's study variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = grpo.get_config(common.variant_of(arg, VARIANTS, "ppo"))
  c.algorithm = "align.losses.ppo"
  # G = 1 (one completion per prompt): no prompt to share, one row per completion
  c.rollout.update(num_generations=1, critic_warmup=0, share_prompt=False)
  c.loss = ml_collections.ConfigDict({
      "temperature": c.rollout.get_ref("temperature"), "cliprange": 0.2, "cliprange_value": 0.2,
      "vf_coef": 0.1, "kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0, "lam": 0.95,
      "whiten_advantages": True,
      # |log r| bound before the estimator, as grpo.py's (verl's): k3 stays finite too
      "kl_clamp": 20.0})
  # the value head learns 10x faster than the adapters: it starts at zero, and at the policy's
  # lr (Adam moves it by ~lr a step whatever vf_coef is) it explained 4% of the returns' variance
  # after 50 rollouts
  c.train.lr_multipliers = {"value": 10.0}
  if c.variant == "smoke":
    c.rollout.update(prompts_per_step=4, critic_warmup=1)
  elif c.variant == "cpu":
    # TRL's num_ppo_epochs 4: four optimizer steps on each rollout of 16, 100 rollouts
    c.rollout.update(prompts_per_step=16, critic_warmup=3, num_iterations=4)
    c.train.update(steps=400, warmup_steps=12, eval_every=100, checkpoint_every=100)
  else:
    c.rollout.update(prompts_per_step=64, critic_warmup=10, num_iterations=4)
    c.train.update(steps=4 * c.train.steps, warmup_steps=4 * c.train.warmup_steps,
                   eval_every=4 * c.train.eval_every, checkpoint_every=4 * c.train.checkpoint_every)
  return c
