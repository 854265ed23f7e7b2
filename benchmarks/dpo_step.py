"""LoRA-DPO training step, ours vs TRL `DPOTrainer` + PEFT, SmolLM2-135M-Instruct float32, this CPU.

Batch 4 pairs x 256 tokens (hh-rlhf pairs whose longer reply fills 256, prompt <= 192 tokens),
LoRA r=8 alpha=16 on all linear layers, beta 0.1, AdamW. Each side runs in its own live
subprocess, so its peak memory (max RSS) is its own. TRL's process first writes the exact batches
its collator builds (sequential order); ours trains on those same token arrays (by default in the
shared-prompt layout of configs/dpo.py: each pair's prompt scored once, same loss). Both then
wait at each step for the driver's go, so the sides' steps alternate (A B, B A, ...) over
`--rounds` after `--warmup` untimed steps (ours: the compile), and drift hits both alike.
Tokens/s counts real (unpadded) tokens of the chosen + rejected rows, the same for both sides:
median tokens per step / median step time; steps are reported as min / median / max. The
machine is probed before and after (`benchmarks.harness.Monitor`). Ours
runs with postlab's glibc allocator settings (`lm.train.runtime`, as launch.py starts); TRL in its
default environment, or with the same settings with --trl_same_allocator. TRL runs in float32
without gradient checkpointing (its DPOConfig defaults are bf16 autocast and checkpointing; both
make its step slower here, --trl_gradient_checkpointing restores the latter).

  python -m benchmarks.dpo_step [--rounds 5 --warmup 1] [--quick] [--strict]
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

flags.DEFINE_integer("rounds", 5, "Timed steps per side, alternating the sides.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per side before the rounds (ours: the compile).")
flags.DEFINE_bool("quick", False, "Iteration mode: 2 rounds of 2 pairs x 128 tokens (never quote).")
flags.DEFINE_bool("strict", False, "Exit 1 when the machine was not quiet during the run.")
flags.DEFINE_integer("batch", 4, "Preference pairs per step.")
flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
flags.DEFINE_bool("trl_same_allocator", False,
                  "also give TRL's process postlab's glibc allocator settings (lm.train.runtime)")
flags.DEFINE_bool("trl_gradient_checkpointing", False,
                  "TRL: recompute activations in the backward (DPOConfig's default; ours keeps them)")
flags.DEFINE_bool("share_prompt", True,
                  "ours: score each pair as one [prompt | chosen | rejected] segment, as "
                  "configs/dpo.py does (data.share_prompt)")
flags.DEFINE_string("side", "", "internal: run one side ('trl' or 'ours') and print its JSON")
flags.DEFINE_string("batches", "", "internal: npz of the batches TRL's collator built")
flags.DEFINE_string("weights", "", "internal: HF directory both sides load")
FLAGS = flags.FLAGS

MODEL = "smollm2-135m-instruct"
# dropout 0: TRL's DPOTrainer zeroes every dropout by default (disable_dropout=True), PEFT's
# lora_dropout included, so both sides do the same work.
LORA = dict(rank=8, alpha=16.0, dropout=0.0)
BETA, LR = 0.1, 5e-4


def _pairs(tokenizer, n: int, seq: int) -> list[dict]:
  """hh-rlhf pairs whose longer row reaches `seq` tokens (every batch pads to `seq`) and whose
  prompt leaves at least a quarter of the row to the reply (TRL drops pairs whose prompt fills
  `max_length`; rows of nearly all prompt would measure the trunk alone)."""
  from align import records

  rows = records.load_records("hh-rlhf")
  out = []
  for i, row in enumerate(rows):
    try:
      rec = records.normalize_preference(row, i)
    except records.MalformedRowError:
      continue
    prompt = tokenizer.apply_chat_template(rec["prompt"], tokenize=False,
                                           add_generation_prompt=True)
    longest = max(len(tokenizer(prompt + r)["input_ids"]) for r in (rec["chosen"],
                                                                     rec["rejected"]))
    if longest >= seq + 8 and len(tokenizer(prompt)["input_ids"]) <= seq * 3 // 4:
      out.append({"prompt": prompt, "chosen": rec["chosen"], "rejected": rec["rejected"]})
    if len(out) == n:
      return out
  raise RuntimeError(f"only {len(out)} hh-rlhf pairs reach {seq} tokens; lower --seq")






def _steps() -> int:
  return FLAGS.warmup + FLAGS.rounds


def _trl_side(batches_path: str) -> None:
  import numpy as np
  import peft
  import torch
  import transformers
  from datasets import Dataset
  from trl import DPOConfig, DPOTrainer

  # transformers marks GGUF-loaded models quantized (untrainable): both sides load the same
  # float32 weights from an HF directory exported from the GGUF.
  tok = transformers.AutoTokenizer.from_pretrained(FLAGS.weights)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      FLAGS.weights, dtype=torch.float32, attn_implementation="sdpa")
  ds = Dataset.from_list(_pairs(tok, FLAGS.batch * _steps(), FLAGS.seq))
  tokens: list[int] = []

  class Gate(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      harness.wait_go()
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      harness.say(event="step", s=time.perf_counter() - self.t0, tokens=tokens[state.global_step - 1])

  with tempfile.TemporaryDirectory() as out:
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=FLAGS.batch, max_steps=_steps(),
                    max_length=FLAGS.seq, learning_rate=LR, beta=BETA, use_cpu=True,
                    report_to=[], save_strategy="no", logging_steps=1, seed=0,
                    dataloader_num_workers=0, disable_tqdm=True,
                    # float32 like ours: DPOConfig defaults to bf16 autocast (slow on this CPU) and
                    # gradient checkpointing (activations recomputed; ours keeps them)
                    bf16=False, fp16=False,
                    gradient_checkpointing=FLAGS.trl_gradient_checkpointing)
    lcfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                           lora_dropout=LORA["dropout"], target_modules="all-linear",
                           task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=lcfg, callbacks=[Gate()])
    # pairs in order, so the batches written here are the ones training sees
    trainer._get_train_sampler = lambda dataset=None: torch.utils.data.SequentialSampler(
        trainer.train_dataset if dataset is None else dataset)
    batches = [{k: v.numpy() for k, v in b.items() if hasattr(v, "numpy")}
               for b in trainer.get_train_dataloader()][:_steps()]
    tokens.extend(int(b["attention_mask"].sum()) for b in batches)
    np.savez(batches_path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    harness.say(event="ready")
    trainer.train()
  harness.say(event="done", peak_rss_mb=harness.max_rss_mb(), threads=torch.get_num_threads(), bf16=cfg.bf16,
       gradient_checkpointing=cfg.gradient_checkpointing)


def _ours_side(batches_path: str) -> None:
  import numpy as np
  from flax import nnx

  from align import losses
  from configs import dpo as dpo_config
  from align.losses import shared_prompt
  from lm import hub, lora
  from lm.train.runtime import use_cpu_training_flags
  from lm.train.trainer import Trainer

  use_cpu_training_flags()  # as launch.py does for training runs

  z = np.load(batches_path)
  batches = []
  for i in range(_steps()):
    ids, mask = z[f"{i}/input_ids"], z[f"{i}/attention_mask"]
    comp = z[f"{i}/completion_mask"]
    b = ids.shape[0] // 2  # TRL stacks [chosen..., rejected...]
    pair = lambda x: np.stack([x[:b], x[b:]], axis=1)
    batches.append({"tokens": pair(ids).astype(np.int32), "attn_mask": pair(mask).astype(np.int32),
                    "loss_mask": pair(comp).astype(np.float32)})
  # tokens/s counts the same real tokens as TRL's (chosen + rejected rows), whatever the layout
  tokens = [int(b["attn_mask"].sum()) for b in batches]
  layout = None
  if FLAGS.share_prompt:
    rows, width = shared_prompt.plan_shared_layout(batches)
    batches = [shared_prompt.share_prompts(b, rows=rows, width=width) for b in batches]
    layout = {"rows": rows, "width": width, "positions": rows * width,
              "unshared_positions": int(ids.size)}
  model, _ = hub.load_pretrained(FLAGS.weights, tokenizer=False)
  lora.apply_lora(model, lora.LoraConfig(**LORA), rngs=nnx.Rngs(params=0, lora_dropout=0))
  config = dpo_config.get_config("cpu")
  train_cfg = config.train  # no accumulation, evals or checkpoints; linear decay to 0
  train_cfg.update(steps=_steps(), batch_size=FLAGS.batch, grad_accum=1, lr=LR, warmup_steps=0,
                   schedule="linear", min_lr_ratio=0.0, grad_clip=1.0, weight_decay=0.0, seed=0,
                   eval_every=0, checkpoint_every=0)
  loss_cfg = config.loss
  loss_cfg.update(beta=BETA, variant="sigmoid", label_smoothing=0.0)
  trainer = Trainer(model, losses.get("dpo"), loss_cfg, train_cfg,
                    trainable=lora.trainable_filter("lora"))
  harness.say(event="ready")
  for batch, n in zip(batches, tokens):
    harness.wait_go()
    harness.say(event="step", s=trainer.train_step(batch)["step_s"], tokens=n)
  harness.say(event="done", peak_rss_mb=harness.max_rss_mb(), shared_prompt_layout=layout)


def _side(side: str, batches: str) -> harness.LiveSide:
  cmd = [sys.executable, "-m", "benchmarks.dpo_step", f"--side={side}", f"--batches={batches}",
         f"--weights={FLAGS.weights}", f"--rounds={FLAGS.rounds}", f"--warmup={FLAGS.warmup}",
         f"--batch={FLAGS.batch}", f"--seq={FLAGS.seq}", f"--share_prompt={FLAGS.share_prompt}",
         f"--trl_gradient_checkpointing={FLAGS.trl_gradient_checkpointing}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if side == "ours" or FLAGS.trl_same_allocator:  # ours as launch.py runs it
    env = runtime.cpu_allocator_env(env)
  return harness.LiveSide(side, cmd, env)


def _summary(side: harness.LiveSide, done: dict) -> dict:
  timed = side.steps[FLAGS.warmup:]
  step = harness.spread([s["s"] for s in timed])
  tokens = statistics.median(s["tokens"] for s in timed)
  return dict(first_step_s=side.steps[0]["s"], step_s=step, tokens_per_step=tokens,
              tokens_per_s=tokens / step["median"],
              **{k: v for k, v in done.items() if k != "event"})


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.rounds, FLAGS.batch, FLAGS.seq = 2, 2, 128
  if FLAGS.side:
    _trl_side(FLAGS.batches) if FLAGS.side == "trl" else _ours_side(FLAGS.batches)
    return
  from lm import hub
  from lm.hub import weights

  with tempfile.TemporaryDirectory() as tmp:
    model, tok = hub.load_pretrained(MODEL)
    FLAGS.weights = str(weights.save_hf_dir(model, Path(tmp) / "hf", tok))
    del model
    batches = str(Path(tmp) / "batches.npz")
    logging.info("starting TRL's side (it writes the batches), then ours")
    done, machine = harness.race({"trl": lambda: _side("trl", batches),
                                  "ours": lambda: _side("ours", batches)},
                                 warmup=FLAGS.warmup, rounds=FLAGS.rounds)
  results = {name: _summary(side, event) for name, (side, event) in done.items()}
  logging.info("TRL %s", results["trl"])
  logging.info("ours %s", results["ours"])
  print(json.dumps({
      "benchmark": "dpo_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)",
      "dtype": "float32", "device": "cpu", "batch_pairs": FLAGS.batch, "seq": FLAGS.seq,
      "rounds": FLAGS.rounds, "quick": FLAGS.quick, "lora": LORA, **results,
      "share_prompt": FLAGS.share_prompt, "trl_same_allocator": FLAGS.trl_same_allocator,
      "trl_gradient_checkpointing": FLAGS.trl_gradient_checkpointing, "machine": machine,
      "ratio": results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"],
      "target_ratio": 1.5,
  }))
  if FLAGS.strict and machine["verdict"] != "quiet":
    sys.exit(f"not quiet: {machine['verdict']}")


if __name__ == "__main__":
  app.run(main)
