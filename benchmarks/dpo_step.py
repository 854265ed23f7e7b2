"""LoRA-DPO training step, ours vs TRL `DPOTrainer` + PEFT, SmolLM2-135M-Instruct float32, this CPU.

Batch 4 pairs x 256 tokens (hh-rlhf pairs whose longer reply fills 256, prompt <= 192 tokens),
LoRA r=8 alpha=16 on all linear layers, beta 0.1, AdamW. Each side runs in its own subprocess so
its peak memory (max RSS) is its own: TRL first, which also writes the exact batches its
collator built; ours then trains on those same token arrays (by default in the shared-prompt
layout of configs/dpo.py: each pair's prompt scored once, same loss). Tokens/s counts real
(unpadded) tokens of the chosen + rejected rows per step, the same count for both sides, steady
state (median step after `warmup` steps); the first step (ours: compile) is reported apart. Ours
runs with postlab's glibc allocator settings (`lm.runtime`, as launch.py starts); TRL in its
default environment, or with the same settings with --trl_same_allocator. TRL runs in float32
without gradient checkpointing (its DPOConfig defaults are bf16 autocast and checkpointing; both
make its step slower here, --trl_gradient_checkpointing restores the latter).

  python -m benchmarks.dpo_step [--steps 4 --warmup 1]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

from lm import runtime

flags.DEFINE_integer("steps", 4, "Steps per side (the first `warmup` are not timed).")
flags.DEFINE_integer("warmup", 1, "Untimed steps (ours: compile is the first).")
flags.DEFINE_integer("batch", 4, "Preference pairs per step.")
flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
flags.DEFINE_bool("trl_same_allocator", False,
                  "also give TRL's process postlab's glibc allocator settings (lm.runtime)")
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


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def _trl_side(batches_path: str) -> dict:
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
  n = FLAGS.batch * FLAGS.steps
  ds = Dataset.from_list(_pairs(tok, n, FLAGS.seq))
  step_times, batches = [], []

  class Timer(transformers.TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
      self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
      step_times.append(time.perf_counter() - self.t0)

  with tempfile.TemporaryDirectory() as out:
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=FLAGS.batch, max_steps=FLAGS.steps,
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
                         peft_config=lcfg, callbacks=[Timer()])
    collate = trainer.data_collator

    def recording(examples):
      batch = collate(examples)
      batches.append({k: v.numpy() for k, v in batch.items() if hasattr(v, "numpy")})
      return batch

    trainer.data_collator = recording
    trainer.train()
  np.savez(batches_path, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
  tokens = [int(b["attention_mask"].sum()) for b in batches]
  steady = step_times[FLAGS.warmup:]
  return dict(first_step_s=step_times[0], step_s=statistics.median(steady),
              tokens_per_step=tokens[0], tokens_per_s=statistics.median(tokens) /
              statistics.median(steady), peak_rss_mb=_max_rss_mb(),
              threads=torch.get_num_threads(), bf16=cfg.bf16,
              gradient_checkpointing=cfg.gradient_checkpointing)


def _ours_side(batches_path: str) -> dict:
  import ml_collections
  import numpy as np
  from flax import nnx

  from align import losses
  from align.losses import shared_prompt
  from lm import hub, lora
  from lm.runtime import use_cpu_training_flags
  from lm.trainer import Trainer

  use_cpu_training_flags()  # as launch.py does for training runs

  z = np.load(batches_path)
  batches = []
  for i in range(FLAGS.steps):
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
  train_cfg = ml_collections.ConfigDict(dict(steps=FLAGS.steps, batch_size=FLAGS.batch, lr=LR,
                                             warmup_steps=0, schedule="linear", grad_clip=1.0,
                                             weight_decay=0.0, seed=0))
  loss_cfg = ml_collections.ConfigDict(dict(beta=BETA, variant="sigmoid", label_smoothing=0.0))
  trainer = Trainer(model, losses.get("dpo"), loss_cfg, train_cfg,
                    trainable=lora.trainable_filter("lora"))
  times = [trainer.train_step(b)["step_s"] for b in batches]
  steady = times[FLAGS.warmup:]
  return dict(first_step_s=times[0], step_s=statistics.median(steady), tokens_per_step=tokens[0],
              tokens_per_s=statistics.median(tokens) / statistics.median(steady),
              peak_rss_mb=_max_rss_mb(), shared_prompt_layout=layout)


def _run_side(side: str, batches: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.dpo_step", f"--side={side}", f"--batches={batches}",
         f"--weights={FLAGS.weights}",
         f"--steps={FLAGS.steps}", f"--warmup={FLAGS.warmup}", f"--batch={FLAGS.batch}",
         f"--seq={FLAGS.seq}", f"--share_prompt={FLAGS.share_prompt}",
         f"--trl_gradient_checkpointing={FLAGS.trl_gradient_checkpointing}"]
  logging.info("running %s side", side)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if side == "ours" or FLAGS.trl_same_allocator:  # ours as launch.py runs it
    env = runtime.cpu_allocator_env(env)
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(f"{side} side failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.side:
    res = _trl_side(FLAGS.batches) if FLAGS.side == "trl" else _ours_side(FLAGS.batches)
    print(json.dumps(res))
    return
  from lm import hub, weights

  with tempfile.TemporaryDirectory() as tmp:
    model, tok = hub.load_pretrained(MODEL)
    FLAGS.weights = str(weights.save_hf_dir(model, Path(tmp) / "hf", tok))
    del model
    batches = str(Path(tmp) / "batches.npz")
    trl = _run_side("trl", batches)
    ours = _run_side("ours", batches)
  logging.info("TRL %s", trl)
  logging.info("ours %s", ours)
  print(json.dumps({
      "benchmark": "dpo_step", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)",
      "dtype": "float32", "device": "cpu", "batch_pairs": FLAGS.batch, "seq": FLAGS.seq,
      "lora": LORA, "ours": ours, "trl": trl, "share_prompt": FLAGS.share_prompt,
      "trl_same_allocator": FLAGS.trl_same_allocator,
      "trl_gradient_checkpointing": FLAGS.trl_gradient_checkpointing,
      "ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
      "target_ratio": 1.5,
  }))


if __name__ == "__main__":
  app.run(main)
