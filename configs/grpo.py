"""GRPO: online RL from rollouts of the policy, group-relative advantages, the clipped surrogate.

  python launch.py --config=configs/grpo.py:cpu --workdir=runs/grpo
  python launch.py --config=configs/grpo.py:gpu_full --workdir=runs/grpo-gsm8k

Each step samples `rollout.num_generations` completions for each of `rollout.prompts_per_step`
prompts with the current policy (`decode/`, eval mode), scores them with `config.rewards`
(`decode/rewards.py`, weighted sum, each logged), turns the rewards into advantages and trains on
the rows (`align/losses/grpo.py`; the stream in `align/online.py`). `:cpu` is the seeded
arithmetic task (operands up to 20) on SmolLM2-135M-Instruct with LoRA; `:gpu_full` is GSM8K at the from-scratch
trainer's settings (G 8, T 0.9, top-k 50, top-p 0.9, β 0.04 with k3, ε 0.2, lr 5e-5 linear, clip 1).
`:rm_cpu` / `:rm_cpu_10x` and `:rm_gpu_full` / `:rm_gpu_full_10x` are the stability study's GRPO
runs on a reward model (`make stability`, `make stability STUDY=gpu_full`).
"""

import ml_collections

from configs import common
from configs import train_base
from configs.train_base import base


# The stability study's GRPO runs (docs/studies/stability.md): reward-model reward on open
# instructions, LoRA as dpo.py's; the _10x variant is the same at ten times the learning rate.
# variant -> (scale, learning rate): dpo.py's lr at that scale, and ten times it.
STUDY = {"rm_cpu": ("cpu", 5e-4), "rm_cpu_10x": ("cpu", 5e-3),
         "rm_gpu_full": ("gpu_full", 2e-5), "rm_gpu_full_10x": ("gpu_full", 2e-4)}
# The reward model each scale reads: `launch.py --config=configs/reward.py:SCALE --workdir=RUN`.
RM_RUNS = {"cpu": "runs/rm-cpu", "gpu_full": "runs/rm-gpu"}
VARIANTS = train_base.VARIANTS + tuple(STUDY)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  study = arg in STUDY
  common.variant_of(arg, VARIANTS, "grpo")
  c = base("align.losses.grpo", STUDY[arg][0] if study else arg)
  # name: arith | gsm8k | instructions (of `source`, after its first skip_first); prompts over
  # max_prompt_tokens are left out (0 = no limit); system: a system message ("" = none)
  c.prompts = ml_collections.ConfigDict({
      "name": "arith", "n_train": 400, "n_eval": 64, "seed": 0, "max_operand": 20,
      "source": "alpaca_eval", "skip_first": 0,
      "max_prompt_tokens": 256, "system": "", "prompt_suffix": ""})
  c.rollout = ml_collections.ConfigDict({
      "prompts_per_step": 4, "num_generations": 8, "max_new_tokens": 16, "temperature": 0.8,
      "top_k": 0, "top_p": 1.0, "seed": 0,
      "num_iterations": 1,  # μ: optimizer steps on each rollout (old log-probs after the first)
      # one row per group, [prompt | completion 1 | ... | completion G]: each prompt scored once
      # (align.losses.rollout_batches.shared_rollout_batch); False: one [prompt | completion]
      # row each
      "share_prompt": True,
      # advantages: grpo (group std, ddof adv_ddof, + adv_eps) | dr_grpo | rloo | batch_std
      "advantage": "grpo", "adv_eps": 1e-6, "adv_ddof": 1,
      "mask_truncated": False, "mask_zero_std": False,
      "overlong_buffer": 0, "overlong_factor": 1.0})  # DAPO's soft overlong penalty (0 = off)
  # reward name (decode.rewards.REWARDS, length_penalty, or a name in reward_functions) -> weight;
  # reward_functions: name -> import path module:attr (a function written for TRL, trl.rewards');
  # reward_args: name -> kwargs (for a reward_functions entry: its factory's arguments)
  # a small format bonus: at 0.5 the policy learned to answer with any number (format 1.0,
  # correctness 0) within 13 steps at lr 3e-4
  c.rewards = ml_collections.ConfigDict({"arith_correct": 1.0, "number_only": 0.1})
  c.reward_functions = ml_collections.ConfigDict()
  c.reward_args = ml_collections.ConfigDict()
  c.eval = ml_collections.ConfigDict({"sample": False, "seed": 1234, "batch_size": 0})
  # kl_clamp: log r = log π_ref - log π is clipped to [-kl_clamp, kl_clamp] before the estimator,
  # so k3 = e^{log r} - log r - 1 stays finite (<= e^20, not e^88+ = inf in float32); 20 is verl's
  # clamp of the log-ratio in its k3 ("low_var_kl"), which also caps the estimate at 10 (not here)
  c.loss.update(temperature=c.rollout.get_ref("temperature"), eps_low=0.2, eps_high=0.2,
                dual_clip=ml_collections.config_dict.placeholder(float),
                aggregation="seq_mean_token_mean",
                max_completion_length=c.rollout.get_ref("max_new_tokens"),
                beta=0.04, kl_estimator="k3", kl_clamp=20.0,
                kl_in="loss")  # or "reward": β Σ_t KL_t off each sequence's reward
  c.train.update(steps=50, lr=1e-4, warmup_steps=3, schedule="cosine", min_lr_ratio=0.1,
                 grad_clip=1.0, eval_every=25, checkpoint_every=25)
  c.train.batch_size = c.rollout.get_ref("prompts_per_step") * c.rollout.get_ref("num_generations")
  c.lora.update(rank=16, alpha=32.0, dropout=0.0)
  if c.variant == "smoke":
    c.prompts.update(n_train=32, n_eval=4)
    c.rollout.update(prompts_per_step=2, num_generations=4, max_new_tokens=8)
    c.train.update(steps=4, eval_every=2, checkpoint_every=2, lr=1e-3, warmup_steps=1)
    # a random model never answers: the length penalty gives its groups reward variance to train on
    c.rewards.length_penalty = 0.5
    c.reward_args.length_penalty = {"limit": 3}
  elif study:
    scale, lr = STUDY[arg]
    c.variant = arg
    # AlpacaEval instructions: align_eval's prompts (its first 24, or 400 at gpu_full) are
    # skipped, the last 16 held out
    c.prompts.update(name="instructions", source="alpaca_eval", skip_first=24, n_train=400,
                     n_eval=16)
    # G 4 as the PA5 report; T 1: the policy's own distribution, as align_eval's KL samples
    c.rollout.update(prompts_per_step=4, num_generations=4, max_new_tokens=64, temperature=1.0)
    c.rewards = ml_collections.ConfigDict({"reward_model": 1.0})
    c.reward_args = ml_collections.ConfigDict({"reward_model": {"run_dir": RM_RUNS[scale]}})
    c.lora.update(rank=8, alpha=16.0)  # dpo.py's adapter shape (dropout 0 in rollouts)
    c.train.update(steps=30, lr=lr, eval_every=15, checkpoint_every=15)
    if scale == "gpu_full":
      # PA5's settings: 128 new tokens (room for EOS: the :cpu runs were cut at 64), the 389
      # instructions align_eval.py:stability_gpu's 400 leave besides the 16 held out, ~4 epochs
      c.prompts.update(skip_first=400, n_train=389)
      c.rollout.max_new_tokens = 128
      c.train.update(steps=400, warmup_steps=20, grad_accum=1, eval_every=100,
                     checkpoint_every=100)
      c.eval.batch_size = 16
  elif c.variant == "gpu_full":
    c.prompts.update(name="gsm8k", n_train=7473, n_eval=256, max_prompt_tokens=384,
                     prompt_suffix="\nGive the final answer after '####'.")
    c.rollout.update(prompts_per_step=8, num_generations=8, max_new_tokens=256, temperature=0.9,
                     top_k=50, top_p=0.9)
    c.rewards = ml_collections.ConfigDict({"gsm8k_correct": 1.0})
    c.train.update(steps=500, lr=5e-5, warmup_steps=0, schedule="linear", min_lr_ratio=0.0,
                   eval_every=100, checkpoint_every=100, grad_accum=4)
    c.eval.batch_size = 64
  return c
