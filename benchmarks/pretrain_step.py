"""Pretraining step, ours vs transformers' Llama in torch, same architecture and size: tokens/s.

Ours: `lm.train.trainer.Trainer` on `lm.pretrain.lm_loss`, the model of configs/pretrain.py:cpu (preset
`tiny` with its overrides: d 256, 4 layers, 4 heads / 2 kv, ffn 688, GPT-2's 50,257 ids padded to
50,304, tied embeddings, RoPE 10000, RMSNorm 1e-5, no biases) through `lm.hub.runs.model_config`,
context `--seq` (256), batch `--batch` (8), that config's optimizer (clip 1.0, AdamW lr 1e-3,
betas 0.9 / 0.95, wd 0.1 on matrices) at a constant learning rate, no accumulation, float32.
Torch: `transformers.LlamaForCausalLM` from the same shapes (`lm.hub.weights.config_to_hf`),
attn_implementation "sdpa" (what a torch user gets by default), `use_cache` off, float32,
`torch.optim.AdamW` (the same two weight-decay groups; fused and foreach left at their defaults,
which on CPU is the single-tensor for-loop: the JSON says which ran; --torch_adamw fused picks
torch's fused CPU kernel), `clip_grad_norm_`, loss =
`model(input_ids=tokens, labels=targets, shift_labels=targets).loss`: HF shifts `labels` inside
unless `shift_labels` is given, so both sides run `seq` positions and train `batch * seq` targets.
Torch runs with as many intra-op threads as the machine has cores, as XLA uses.

Batches: uniform random ids in [0, 50257), `seq + 1` per row, laid out as `lm.pretrain.corpus.Windows` rows
of one document (segment_ids ones, positions arange, loss_mask ones, global_keys zeros); both sides
get the same arrays. Tokens/s = batch * seq / median step time; achieved GFLOP/s uses
`lm.train.flops.flops_per_token(cfg, seq)` (causal convention) for both sides.

Each side runs in its own live subprocess (its own peak memory and runtime settings: ours as
launch.py runs a training job, with `lm.train.runtime`'s XLA:CPU training flags and glibc allocator
settings; torch in its default environment, or with the same allocator settings with
--torch_same_allocator), then `--warmup` untimed steps per side (ours: the compile) and `--rounds`
timed steps alternating A B, B A, ... (`benchmarks.harness.race`), the machine probed before and
after. Steps are quoted as min / median / max; `ratio` is ours / torch tokens/s (target 1.2, not
asserted). What else differs between the sides is the JSON's `differs`.

On a GPU (when JAX sees one; JAX_PLATFORMS=cpu keeps ours on the CPU) ours runs there, e.g.
`--preset modern-253m --dtype bfloat16 --seq 1024 --no_torch`, and the JSON adds its MFU against
`lm.train.flops.peak_flops()`. `--torch_device cuda --dtype bfloat16` races torch on the same GPU
(bf16 autocast over float32 weights, sdpa, eager); `--attention_impl fused`, `--sink logit`,
`--scan_layers`, `--remat` and `--nodocument_mask` pick ours' variant (benchmarks/gpu_pretrain.sh
runs the set).

  python -m benchmarks.pretrain_step [--rounds 5 --warmup 1] [--quick] [--strict]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging

from benchmarks import harness
from lm.train import runtime

flags.DEFINE_integer("rounds", 5, "Timed steps per side, alternating the sides.")
flags.DEFINE_integer("warmup", 1, "Untimed steps per side before the rounds (ours: the compile).")
flags.DEFINE_bool("quick", False, "Iteration mode: 2 rounds of batch 2 x 64 tokens (never quote).")
flags.DEFINE_bool("strict", False, "Exit 1 when the machine was not quiet during the run.")
flags.DEFINE_integer("batch", 8, "Rows per step.")
flags.DEFINE_integer("seq", 256, "Tokens per row (context).")
flags.DEFINE_string("preset", "tiny", "Model preset; configs/pretrain.py:cpu's overrides apply "
                    "only to its own preset ('tiny'), another preset runs as it is.")
flags.DEFINE_string("dtype", "float32", "ours: compute dtype (bfloat16 needs --no_torch).")
flags.DEFINE_enum("attention_impl", "unfused", ["unfused", "fused"],
                  "ours: lm.model's materialised softmax, or lm.attention (cuDNN on a GPU)")
flags.DEFINE_enum("sink", "none", ["none", "logit"], "ours: 'logit' adds a learned sink logit per "
                  "head (the torch side has none: --no_torch)")
flags.DEFINE_bool("document_mask", True, "ours: lm_loss's per-document mask (False: plain "
                  "causal, as torch's side runs)")
flags.DEFINE_bool("scan_layers", False, "ours: the layer stack as one lax.scan")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"], "ours: remat policy")
flags.DEFINE_bool("no_torch", False, "Run ours alone (e.g. on a GPU, for MFU).")
flags.DEFINE_enum("torch_device", "cpu", ["cpu", "cuda"],
                  "torch side's device; on cuda it runs --dtype bfloat16 as torch.autocast over "
                  "float32 weights (ours: bf16 compute over float32 masters)")
flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: os.cpu_count()).")
flags.DEFINE_enum("torch_adamw", "default", ["default", "foreach", "fused"],
                  "torch AdamW kernel: 'default' leaves fused and foreach unset (on CPU torch then "
                  "runs the single-tensor for-loop)")
flags.DEFINE_bool("torch_same_allocator", False,
                  "also give torch's process postlab's glibc allocator settings (lm.train.runtime)")
flags.DEFINE_string("side", "", "internal: run one side ('ours' or 'torch')")
flags.DEFINE_string("hf_config", "", "internal: torch's transformers Llama config (JSON)")
FLAGS = flags.FLAGS

GPT2_VOCAB = 50257
SEED = 0
TARGET_RATIO = 1.2
FORWARD = ("rounds", "warmup", "batch", "seq", "preset", "dtype", "torch_threads", "torch_adamw",
           "torch_device",
           "attention_impl", "sink", "scan_layers", "remat", "document_mask")


def _config():
  """configs/pretrain.py:cpu with this run's preset, dtype and context."""
  from configs import pretrain as pretrain_config

  c = pretrain_config.get_config("cpu")
  if FLAGS.preset != c.model.preset:
    c.model.preset = FLAGS.preset
    c.model.overrides = {}  # assigned, not update()d: ConfigDict.update merges nested dicts
  c.model.update(dtype=FLAGS.dtype, attention_impl=FLAGS.attention_impl, sink=FLAGS.sink,
                 scan_layers=FLAGS.scan_layers, remat=FLAGS.remat)
  c.data.seq_len = FLAGS.seq
  return c


def _model_config():
  """The model `lm.pretrain.run` would build: GPT-2's vocabulary padded to the config's multiple."""
  from lm.hub import runs

  return runs.model_config(_config(), GPT2_VOCAB)


def _optimizer() -> dict:
  t = _config().train
  return {k: t[k] for k in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip")}


def _steps() -> int:
  return FLAGS.warmup + FLAGS.rounds


def _batches() -> list[dict]:
  """One batch per step: uniform random windows of seq + 1 ids, as `lm.pretrain.corpus.Windows` rows of a
  single document (every position attends causally and is trained)."""
  import numpy as np

  rng = np.random.default_rng(SEED)
  b, s = FLAGS.batch, FLAGS.seq
  ones_bs = np.ones((b, s), np.int32)
  out = []
  for _ in range(_steps()):
    w_bt = rng.integers(0, GPT2_VOCAB, (b, s + 1), dtype=np.int32)
    out.append({"tokens": np.ascontiguousarray(w_bt[:, :-1]),
                "targets": np.ascontiguousarray(w_bt[:, 1:]), "segment_ids": ones_bs,
                "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)), "loss_mask": ones_bs,
                "global_keys": np.zeros_like(ones_bs)})
  return out


def _ours_side() -> None:
  runtime.use_cpu_training_flags()  # as launch.py does for training runs
  import jax
  from flax import nnx

  from lm.train import flops

  from lm.pretrain import task as pretrain
  from lm.model import Transformer
  from lm.train.trainer import Trainer

  cfg = _model_config()
  batches = _batches()
  config = _config()
  train_cfg = config.train  # its optimizer (_optimizer) at a constant lr, no evals or checkpoints
  train_cfg.update(steps=_steps(), batch_size=FLAGS.batch, grad_accum=1, warmup_steps=0,
                   schedule="constant", min_lr_ratio=0.0, spike_factor=0.0, seed=0, eval_every=0,
                   checkpoint_every=0)
  loss_cfg = config.loss
  loss_cfg.update(z_loss=0.0, document_mask=FLAGS.document_mask)
  trainer = Trainer(Transformer(cfg, rngs=nnx.Rngs(params=SEED)), pretrain.lm_loss, loss_cfg,
                    train_cfg, trainable=nnx.Param,
                    flops_per_token=flops.flops_per_token(cfg, FLAGS.seq).total)
  harness.say(event="ready")
  for batch in batches:
    harness.wait_go()
    t0 = time.perf_counter()
    m = trainer.train_step(batch)  # returns host metrics: the step has finished
    harness.say(event="step", s=time.perf_counter() - t0, loss=m["loss"])
  device = jax.devices()[0]
  harness.say(event="done", peak_rss_mb=harness.max_rss_mb(), backend=jax.default_backend(),
              device_kind=device.device_kind, peak_flops=flops.peak_flops(device),
              jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))


def _torch_side() -> None:
  import torch
  import transformers

  torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
  torch.manual_seed(SEED)
  config = transformers.LlamaConfig(**json.loads(FLAGS.hf_config), attn_implementation="sdpa",
                                    use_cache=False)
  device = torch.device(FLAGS.torch_device)
  model = transformers.LlamaForCausalLM(config).float().to(device).train()
  autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if FLAGS.dtype == "bfloat16"
              else contextlib.nullcontext())
  opt_cfg = _optimizer()
  params = list(model.parameters())  # the tied embedding once
  groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": opt_cfg["weight_decay"]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
  kernel = {} if FLAGS.torch_adamw == "default" else {FLAGS.torch_adamw: True}
  opt = torch.optim.AdamW(groups, lr=opt_cfg["lr"], betas=(opt_cfg["b1"], opt_cfg["b2"]),
                          eps=opt_cfg["eps"], **kernel)
  batches = [(torch.from_numpy(b["tokens"]).long().to(device),
              torch.from_numpy(b["targets"]).long().to(device)) for b in _batches()]
  harness.say(event="ready")
  for tokens_bs, targets_bs in batches:
    harness.wait_go()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with autocast:
      loss = model(input_ids=tokens_bs, labels=targets_bs, shift_labels=targets_bs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, opt_cfg["grad_clip"])
    opt.step()
    value = loss.item()  # waits for the step (on cuda too: the optimizer step is queued before)
    harness.say(event="step", s=time.perf_counter() - t0, loss=value)
  harness.say(event="done", peak_rss_mb=harness.max_rss_mb(), threads=torch.get_num_threads(),
              attn_implementation=model.config._attn_implementation,
              adamw=_adamw_implementation(opt), torch=torch.__version__,
              transformers=transformers.__version__)


def _adamw_implementation(opt) -> str:
  """Which AdamW kernel torch chose: 'fused', 'foreach' or 'for-loop' (single tensor)."""
  fused, foreach = opt.defaults.get("fused"), opt.defaults.get("foreach")
  if fused is None and foreach is None:
    from torch.optim.optimizer import _default_to_fused_or_foreach

    params = [p for g in opt.param_groups for p in g["params"]]
    fused, foreach = _default_to_fused_or_foreach(params, False, False)
  return "fused" if fused else "foreach" if foreach else "for-loop"


def _side(name: str) -> harness.LiveSide:
  cmd = [sys.executable, "-m", "benchmarks.pretrain_step", f"--side={name}"]
  cmd += [FLAGS[f].serialize() for f in FORWARD]
  if name == "torch":
    cmd.append(f"--hf_config={FLAGS.hf_config}")
  env = dict(os.environ)
  if name == "ours" or FLAGS.torch_same_allocator:  # ours as launch.py runs it
    env = runtime.cpu_allocator_env(env)
  return harness.LiveSide(name, cmd, env)


def _summary(side: harness.LiveSide, done: dict, flops_per_token: float) -> dict:
  timed = side.steps[FLAGS.warmup:]
  step = harness.spread([s["s"] for s in timed])
  tokens = FLAGS.batch * FLAGS.seq
  tokens_per_s = tokens / step["median"]
  out = dict(first_step_s=side.steps[0]["s"], step_s=step, tokens_per_step=tokens,
             tokens_per_s=tokens_per_s, gflops_per_s=tokens_per_s * flops_per_token / 1e9,
             losses=[s["loss"] for s in side.steps],
             **{k: v for k, v in done.items() if k != "event"})
  if done.get("peak_flops"):
    out["mfu"] = tokens_per_s * flops_per_token / done["peak_flops"]
  return out


def _differs(res: dict) -> str:
  ours = res["ours"]
  if "torch" not in res:
    return "no torch side (--no_torch): ours alone"
  parts = [
      "attention: ours applies the [B, S, S] packing mask lm.pretrain.attention_mask builds from "
      "segment_ids / global_keys (all ones / zeros here: plain causal) in its own attention; "
      "torch gets no attention_mask, so HF's sdpa takes its is_causal path",
      "loss: ours lm_loss (logsumexp - target logit over loss_mask, plus its nll_sum / log_z "
      "metrics, and the trainer's grad_norm); torch HF's ForCausalLMLoss (cross_entropy, mean) "
      "with shift_labels = the targets: the same seq inputs and batch x seq targets on both",
      "optimizer: optax clip_by_global_norm + adamw (decay on embeddings and kernels) inside the "
      "one jitted step; torch clip_grad_norm_ + AdamW (decay on tensors of 2+ dims: the same set) "
      "eagerly, its kernel " + res["torch"]["adamw"],
      "execution: ours one XLA program (jit, donated params and optimizer state) with lm.train.runtime's "
      "training XLA flags and glibc allocator settings; torch eager with "
      + str(res["torch"]["threads"]) + " threads, "
      + ("the same allocator settings" if FLAGS.torch_same_allocator else "default allocator"),
      "timing: ours Trainer.train_step (batch checks, host-to-device batch, step, metrics to "
      "host); torch zero_grad, forward, backward, clip, step, loss.item()",
      "initialisation: both N(0, 0.02) matrices and unit norms from different RNGs (the speed "
      "does not depend on the values)",
  ]
  if ours["backend"] != "cpu" or FLAGS.torch_device != "cpu":
    parts.append(f"device: ours on {ours['backend']} ({ours['device_kind']}), torch on "
                 f"{FLAGS.torch_device}" + (" with bf16 autocast (eager, no torch.compile)"
                                            if FLAGS.dtype == "bfloat16" else ""))
  return "; ".join(parts)


def main(argv):
  del argv
  if FLAGS.quick:
    FLAGS.rounds, FLAGS.batch, FLAGS.seq = 2, 2, 64
  if FLAGS.side:
    {"ours": _ours_side, "torch": _torch_side}[FLAGS.side]()
    return
  if FLAGS.sink != "none" and not FLAGS.no_torch:
    raise app.UsageError("the torch side has no sink logits; add --no_torch for --sink")
  torch_dtypes = ("float32", "bfloat16") if FLAGS.torch_device == "cuda" else ("float32",)
  if FLAGS.dtype not in torch_dtypes and not FLAGS.no_torch:
    raise app.UsageError(f"the torch side runs float32 (bfloat16 autocast with --torch_device "
                         f"cuda); add --no_torch for --dtype {FLAGS.dtype}")
  from lm.train import flops
  from lm.hub import weights

  cfg = _model_config()
  if not FLAGS.no_torch:
    FLAGS.hf_config = json.dumps(weights.config_to_hf(cfg))
  fpt = flops.flops_per_token(cfg, FLAGS.seq)
  start = {} if FLAGS.no_torch else {"torch": lambda: _side("torch")}
  start["ours"] = lambda: _side("ours")
  logging.info("model %s: %s parameters, %.3g train FLOPs/token; starting %s", cfg.name,
               f"{cfg.n_params:,}", fpt.total, " then ".join(start))
  done, machine = harness.race(start, warmup=FLAGS.warmup, rounds=FLAGS.rounds)
  res = {name: _summary(side, event, fpt.total) for name, (side, event) in done.items()}
  for name, r in res.items():
    logging.info("%s %s", name, r)
  ratio = (res["ours"]["tokens_per_s"] / res["torch"]["tokens_per_s"]) if "torch" in res else None
  print(json.dumps({
      "benchmark": "pretrain_step", "model": cfg.name, "n_params": cfg.n_params,
      "config": dataclasses.asdict(cfg), "dtype": FLAGS.dtype, "batch": FLAGS.batch,
      "seq": FLAGS.seq, "rounds": FLAGS.rounds, "warmup": FLAGS.warmup, "quick": FLAGS.quick,
      "optimizer": {**_optimizer(), "schedule": "constant", "grad_accum": 1},
      "data": f"uniform random ids in [0, {GPT2_VOCAB}), one document a row, every target trained",
      "flops_per_token": {"learnable": fpt.learnable, "attention": fpt.attention,
                          "total": fpt.total, "convention": "causal"},
      **res, "ratio": ratio, "target": TARGET_RATIO,
      "target_met": None if ratio is None else ratio >= TARGET_RATIO,
      "torch_adamw": FLAGS.torch_adamw, "torch_same_allocator": FLAGS.torch_same_allocator,
      "machine": machine,
      "differs": _differs(res),
  }))
  if FLAGS.strict and machine["verdict"] != "quiet":
    sys.exit(f"not quiet: {machine['verdict']}")


if __name__ == "__main__":
  app.run(main)
