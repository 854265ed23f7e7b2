"""Prefill throughput (one full forward to logits `[B, S, V]`) of ours vs transformers, on CPU.

Real SmolLM2-135M-Instruct (the offline GGUF, dequantized to float32 by both loaders), the same
random tokens for both, no padding. Timed calls alternate ours/transformers so that noise from a
shared host hits both alike; the step time is the median, with min / max beside it, and the
machine's state (`benchmarks.harness.Monitor`) is in the JSON.

  python -m benchmarks.forward [--batch 4 --seq 256 --iters 5 --warmup 2] [--breakdown]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging

from benchmarks import harness

flags.DEFINE_integer("batch", 4, "Batch size B.")
flags.DEFINE_integer("seq", 256, "Sequence length S (no padding).")
flags.DEFINE_integer("iters", 5, "Timed calls of each model; the step time is their median.")
flags.DEFINE_integer("warmup", 2, "Untimed calls of each model after the first one.")
flags.DEFINE_integer("seed", 0, "Seed of the random token ids.")
flags.DEFINE_bool("breakdown", False,
                  "Also time the trunk (final-norm hidden states) and the LM head alone.")
FLAGS = flags.FLAGS

_ALIAS = "smollm2-135m-instruct"


def _interleaved(fns: dict, iters: int, warmup: int) -> dict[str, dict]:
  """Per name: min / median / max wall seconds over alternating calls, after `warmup` each."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = harness.alternate({k: harness.timed(fn) for k, fn in fns.items()}, iters)
  return {k: harness.spread(v) | {"all_s": [round(t, 4) for t in v]} for k, v in times.items()}


def _ours(path, tokens_bs):
  """Jitted `tokens -> logits` (and trunk/head pieces) of our model; all return blocked arrays."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from lm import hub

  t0 = time.perf_counter()
  model = hub.load_model(path, dtype="float32")
  logging.info("ours: loaded in %.1fs", time.perf_counter() - t0)
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens_bs):
    logits_bsv, _ = nnx.merge(graphdef, state)(tokens_bs)
    return logits_bsv

  @jax.jit
  def trunk(state, tokens_bs):
    h_bsd, _ = nnx.merge(graphdef, state).hidden_states(tokens_bs)
    return h_bsd

  @jax.jit
  def head(state, h_bsd):
    return nnx.merge(graphdef, state).logits(h_bsd)

  tokens = jnp.asarray(tokens_bs)
  h = {}

  def head_call():
    if "bsd" not in h:
      h["bsd"] = trunk(state, tokens).block_until_ready()
    return head(state, h["bsd"]).block_until_ready()

  return dict(
      forward=lambda: forward(state, tokens).block_until_ready(),
      trunk=lambda: trunk(state, tokens).block_until_ready(),
      head=head_call,
  )


def _hf(path, tokens_bs):
  """Eval-mode transformers model calls under `torch.inference_mode()` (default sdpa, threads)."""
  import torch
  from transformers import AutoModelForCausalLM

  t0 = time.perf_counter()
  model = AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32)
  model.eval()
  logging.info("hf: loaded in %.1fs (attn=%s, torch threads=%d)", time.perf_counter() - t0,
               model.config._attn_implementation, torch.get_num_threads())
  tokens = torch.from_numpy(tokens_bs.astype("int64"))
  h = {}

  @torch.inference_mode()
  def forward():
    return model(input_ids=tokens).logits

  @torch.inference_mode()
  def trunk():
    return model.model(input_ids=tokens).last_hidden_state

  @torch.inference_mode()
  def head():
    if "bsd" not in h:
      h["bsd"] = trunk()
    return model.lm_head(h["bsd"])

  return dict(forward=forward, trunk=trunk, head=head), torch.__version__


def main(argv):
  del argv
  import jax
  import numpy as np

  from lm import hub

  b, s = FLAGS.batch, FLAGS.seq
  path = hub.resolve_alias(_ALIAS)
  vocab = 49152  # SmolLM2's; both logits shapes are checked against it
  tokens_bs = np.random.default_rng(FLAGS.seed).integers(0, vocab, (b, s), dtype=np.int32)
  logging.info("B=%d S=%d iters=%d warmup=%d cpus=%s jax devices=%s", b, s, FLAGS.iters,
               FLAGS.warmup, os.cpu_count(), jax.devices())

  ours = _ours(path, tokens_bs)
  hf, torch_version = _hf(path, tokens_bs)

  t0 = time.perf_counter()
  ours_bsv = ours["forward"]()
  ours_compile_s = time.perf_counter() - t0
  logging.info("ours: first call (trace + compile + run) %.2fs", ours_compile_s)
  t0 = time.perf_counter()
  hf_bsv = hf["forward"]()
  hf_first_s = time.perf_counter() - t0
  logging.info("hf: first call %.2fs", hf_first_s)
  ours_bsv, hf_bsv = np.asarray(ours_bsv), hf_bsv.float().numpy()
  if ours_bsv.shape != hf_bsv.shape or ours_bsv.shape != (b, s, vocab):
    raise ValueError(f"logits shapes differ: ours {ours_bsv.shape}, hf {hf_bsv.shape}")
  max_diff = float(np.max(np.abs(ours_bsv - hf_bsv)))
  del ours_bsv, hf_bsv
  logging.info("max |logit diff| %.3g", max_diff)

  monitor = harness.Monitor().start()
  timed = _interleaved({"ours": ours["forward"], "hf": hf["forward"]}, FLAGS.iters, FLAGS.warmup)
  for name, r in timed.items():
    logging.info("%s: step %.4fs all %s", name, r["median"], r["all_s"])
  extra = {}
  if FLAGS.breakdown:
    parts = _interleaved({f"{who}_{part}": fns[part] for part in ("trunk", "head")
                          for who, fns in (("ours", ours), ("hf", hf))}, FLAGS.iters, FLAGS.warmup)
    for name, r in parts.items():
      logging.info("%s: %.4fs", name, r["median"])
      extra[f"{name}_step_s"] = round(r["median"], 4)
  monitor.stop()

  n_tokens = b * s
  ours_step_s, hf_step_s = timed["ours"]["median"], timed["hf"]["median"]
  result = {
      "benchmark": "forward",
      "model": "SmolLM2-135M-Instruct",
      "weights": path.name,
      "dtype": "float32",
      "batch": b,
      "seq": s,
      "iters": FLAGS.iters,
      "warmup": FLAGS.warmup,
      "ours_tokens_per_s": round(n_tokens / ours_step_s, 1),
      "hf_tokens_per_s": round(n_tokens / hf_step_s, 1),
      "ratio": round(hf_step_s / ours_step_s, 3),
      "ours_compile_s": round(ours_compile_s, 3),
      "ours_step_s": round(ours_step_s, 4),
      "hf_step_s": round(hf_step_s, 4),
      "hf_first_call_s": round(hf_first_s, 3),
      "ours_min_step_s": round(timed["ours"]["min"], 4),
      "hf_min_step_s": round(timed["hf"]["min"], 4),
      "ours_all_step_s": timed["ours"]["all_s"],
      "hf_all_step_s": timed["hf"]["all_s"],
      "machine": monitor.report(),
      "max_abs_logit_diff": max_diff,
      **extra,
      "device": jax.devices()[0].platform,
      "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__,
      "torch_version": torch_version,
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
