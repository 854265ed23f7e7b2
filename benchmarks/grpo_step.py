"""A whole GRPO step (rollout + rewards + update), ours vs TRL `GRPOTrainer` + PEFT, on
SmolLM2-135M-Instruct float32, this CPU.

Both sides: the same float32 weights (exported from the GGUF), the same prompts (the seeded
arithmetic task of configs/grpo.py:cpu, operands up to 20, in the chat template), G = 8
completions for each of 4 prompts per step (32 rows), at most 16 new tokens, temperature 0.8 with
no top-k / top-p, rewards arith_correct + 0.1 number_only, β 0.04 (reference = adapters off, as
TRL does for PEFT models), ε 0.2, per-sequence token-mean aggregation (TRL loss_type "grpo"),
μ = 1, LoRA r 8 α 16 dropout 0 on all linear layers, AdamW lr 1e-4. Each side runs in its own
live subprocess; the driver alternates their steps (A B, B A, ...) over `--rounds` after
`--warmup` untimed steps (ours: the compiles), probing the machine before and after
(`benchmarks.harness.Monitor`).

What differs, as each side's users run it: TRL generates with transformers' `generate` (eager
PyTorch, dynamic KV cache) and recomputes the old log-probs with a forward; ours decodes with the
compiled `decode/` loop, takes the sampler's log-probs as the old ones, and trains on one row
per group with the prompt stored once (`--share_prompt`, as `configs/grpo.py`; `--noshare_prompt`:
one row per completion, as TRL), at one static width. Steps/s compares whole steps; the rollout's tokens/s is reported apart (TRL's:
the time inside `GRPOTrainer._generate`).

  python -m benchmarks.grpo_step [--rounds 4 --warmup 1] [--quick] [--strict]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

from benchmarks import harness
from lm.train import runtime

flags.DEFINE_integer("rounds", 4, "Timed steps per side, alternating the sides.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per side before the rounds (ours: the compile).")
flags.DEFINE_bool("quick", False, "Iteration mode: 2 rounds of 2 prompts (never quote).")
flags.DEFINE_bool("strict", False, "Exit 1 when the machine was not quiet during the run.")
flags.DEFINE_integer("prompts", 4, "Prompts per step.")
flags.DEFINE_integer("group", 8, "Completions per prompt (G).")
flags.DEFINE_integer("new_tokens", 16, "Maximum new tokens per completion.")
flags.DEFINE_bool("share_prompt", True, "Ours: score each group after one shared prompt.")
flags.DEFINE_string("side", "", "internal: run one side ('trl' or 'ours') and print its JSON")
flags.DEFINE_string("weights", "", "internal: HF directory both sides load")
FLAGS = flags.FLAGS

MODEL = "smollm2-135m-instruct"
LORA = dict(rank=8, alpha=16.0, dropout=0.0)
BETA, LR, TEMPERATURE, EPS = 0.04, 1e-4, 0.8, 0.2
REWARD_WEIGHTS = {"arith_correct": 1.0, "number_only": 0.1}




def _steps() -> int:
  return FLAGS.warmup + FLAGS.rounds


def _problems() -> list[dict]:
  from decode import rewards

  return rewards.arith_task(FLAGS.prompts * _steps(), seed=0, max_operand=20)


def _trl_side() -> None:
  import peft
  import torch
  import transformers
  from datasets import Dataset
  from trl import GRPOConfig, GRPOTrainer

  from decode import rewards

  tok = transformers.AutoTokenizer.from_pretrained(FLAGS.weights)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      FLAGS.weights, dtype=torch.float32, attn_implementation="sdpa")
  rows = [{"prompt": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"]}
          for p in _problems()]

  def reward(name):
    fn = rewards.get(name)

    def call(prompts, completions, answer=None, **kw):
      texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
      return [float(x) for x in fn(prompts, texts, answer=answer)]

    call.__name__ = name
    return call

  timing = {"generate_s": 0.0, "tokens": 0}

  class Gate(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      harness.wait_go()
      timing.update(generate_s=0.0, tokens=0)
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      harness.say(event="step", s=time.perf_counter() - self.t0, rollout_s=timing["generate_s"],
           rollout_tokens=timing["tokens"])

  with tempfile.TemporaryDirectory() as out:
    cfg = GRPOConfig(
        output_dir=out, per_device_train_batch_size=FLAGS.prompts * FLAGS.group,
        num_generations=FLAGS.group, max_completion_length=FLAGS.new_tokens,
        temperature=TEMPERATURE, top_p=1.0, top_k=0, beta=BETA, epsilon=EPS, loss_type="grpo",
        scale_rewards="group", num_iterations=1, learning_rate=LR, max_steps=_steps(),
        reward_weights=list(REWARD_WEIGHTS.values()), use_cpu=True, bf16=False, fp16=False,
        report_to=[], save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0,
        disable_tqdm=True, gradient_checkpointing=False, log_completions=False)
    lcfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                           lora_dropout=LORA["dropout"], target_modules="all-linear",
                           task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=lcfg, callbacks=[Gate()],
                          reward_funcs=[reward(n) for n in REWARD_WEIGHTS])
    generate = trainer._generate

    def timed_generate(prompts):
      t0 = time.perf_counter()
      out = generate(prompts)
      timing["generate_s"] += time.perf_counter() - t0
      timing["tokens"] += sum(len(c) for c in out[1])
      return out

    trainer._generate = timed_generate
    harness.say(event="ready")
    trainer.train()
  harness.say(event="done", peak_rss_mb=harness.max_rss_mb(), threads=torch.get_num_threads())


def _ours_side() -> None:
  import ml_collections
  import numpy as np
  from flax import nnx

  from align import online
  from align.losses import grpo
  from configs import grpo as grpo_config
  from lm import hub, lora
  from lm.train.runtime import use_cpu_training_flags
  from lm.train.trainer import Trainer

  use_cpu_training_flags()  # as launch.py does for training runs
  config = grpo_config.get_config("cpu")
  config.rollout.update(prompts_per_step=FLAGS.prompts, num_generations=FLAGS.group,
                        max_new_tokens=FLAGS.new_tokens, temperature=TEMPERATURE,
                        share_prompt=FLAGS.share_prompt)
  config.rewards = ml_collections.ConfigDict(REWARD_WEIGHTS)
  config.loss.update(beta=BETA, eps_low=EPS, eps_high=EPS, aggregation="seq_mean_token_mean")
  config.train.update(steps=_steps(), lr=LR, warmup_steps=0, schedule="constant")
  model, tok = hub.load_pretrained(FLAGS.weights)
  lora.apply_lora(model, lora.LoraConfig(**LORA), rngs=nnx.Rngs(params=0, lora_dropout=0))
  trainer = Trainer(model, grpo.grpo_loss, config.loss, config.train,
                    trainable=lora.trainable_filter("lora"))
  problems = _problems()
  ids = [hub.encode_chat(tok, p["prompt"]) for p in problems]
  prompts = online.Prompts([p["prompt"] for p in problems], ids,
                           {"answer": [p["answer"] for p in problems]})
  width = online.batch_width({"longest_prompt": max(map(len, ids))}, FLAGS.new_tokens)
  stream = online.RolloutStream(trainer, tok, prompts, config,
                                grpo.make_batch_for(config)(width, online.pad_id_of(tok)),
                                online.reward_functions(config))
  # prompts in order, as TRL's sequential sampler below would not: both see the same set
  stream.prompt_index = lambda g: np.arange(g * FLAGS.prompts, (g + 1) * FLAGS.prompts)
  harness.say(event="ready")
  for _ in range(_steps()):
    harness.wait_go()
    t0 = time.perf_counter()
    batch = next(stream)
    m = trainer.train_step(batch)
    m.update(stream.pop_metrics())
    harness.say(event="step", s=time.perf_counter() - t0, rollout_s=m["time/rollout_s"],
         rollout_tokens=int(round(m["length_mean"] * FLAGS.prompts * FLAGS.group)),
         update_s=m["step_s"], scoring_s=m["time/scoring_s"])
  harness.say(event="done", peak_rss_mb=harness.max_rss_mb())


def _side(side: str) -> harness.LiveSide:
  cmd = [sys.executable, "-m", "benchmarks.grpo_step", f"--side={side}",
         f"--weights={FLAGS.weights}", f"--rounds={FLAGS.rounds}", f"--warmup={FLAGS.warmup}",
         f"--prompts={FLAGS.prompts}", f"--group={FLAGS.group}",
         f"--new_tokens={FLAGS.new_tokens}", f"--share_prompt={FLAGS.share_prompt}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if side == "ours":  # as launch.py runs it
    env = runtime.cpu_allocator_env(env)
  return harness.LiveSide(side, cmd, env)


def _summary(side: harness.LiveSide, done: dict) -> dict:
  timed = side.steps[FLAGS.warmup:]
  step = harness.spread([s["s"] for s in timed])
  rollout = harness.spread([s["rollout_s"] for s in timed])
  tokens = statistics.median(s["rollout_tokens"] for s in timed)
  out = dict(first_step_s=side.steps[0]["s"], step_s=step, steps_per_s=1.0 / step["median"],
             rollout_s=rollout, rollout_tokens_per_step=tokens,
             rollout_tokens_per_s=sum(s["rollout_tokens"] for s in timed)
             / sum(s["rollout_s"] for s in timed),
             **{k: v for k, v in done.items() if k != "event"})
  if "update_s" in timed[0]:
    out["update_s"] = harness.spread([s["update_s"] for s in timed])
    out["scoring_s"] = harness.spread([s["scoring_s"] for s in timed])
  return out


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.rounds, FLAGS.prompts = 2, 2
  if FLAGS.side:
    _trl_side() if FLAGS.side == "trl" else _ours_side()
    return
  from lm import hub
  from lm.hub import weights

  with tempfile.TemporaryDirectory() as tmp:
    model, tok = hub.load_pretrained(MODEL)
    FLAGS.weights = str(weights.save_hf_dir(model, Path(tmp) / "hf", tok))
    del model
    done, machine = harness.race({"trl": lambda: _side("trl"), "ours": lambda: _side("ours")},
                                 warmup=FLAGS.warmup, rounds=FLAGS.rounds)
  results = {name: _summary(side, event) for name, (side, event) in done.items()}
  logging.info("TRL %s", results["trl"])
  logging.info("ours %s", results["ours"])
  print(json.dumps({
      "benchmark": "grpo_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)",
      "dtype": "float32", "device": "cpu", "prompts_per_step": FLAGS.prompts, "group": FLAGS.group,
      "max_new_tokens": FLAGS.new_tokens, "share_prompt": FLAGS.share_prompt,
      "rounds": FLAGS.rounds, "quick": FLAGS.quick,
      "lora": LORA, **results, "machine": machine,
      "ratio": results["ours"]["steps_per_s"] / results["trl"]["steps_per_s"],
      "rollout_ratio": results["ours"]["rollout_tokens_per_s"]
      / results["trl"]["rollout_tokens_per_s"],
      "target_ratio": 1.5,
  }))
  if FLAGS.strict and machine["verdict"] != "quiet":
    sys.exit(f"not quiet: {machine['verdict']}")


if __name__ == "__main__":
  app.run(main)
