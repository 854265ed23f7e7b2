"""Training-step compile time, step time and peak memory: scanned layer stack vs unrolled.

Real SmolLM2-135M-Instruct (offline GGUF, float32; `--preset smollm2-135m` for random weights of
the same shape), full fine-tuning gradient of a next-token loss on B x S random tokens. Each
variant runs in its own process, so its peak RSS is its own; compile is `lower` + `compile`.
The reference is the unrolled stack without rematerialisation (the default); "ours" is
`--scan_remat` (scanned, `full` remat by default).

  python -m benchmarks.layer_stack [--batch 8 --seq 256 --iters 3]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags, logging

flags.DEFINE_integer("batch", 8, "Batch size B.")
flags.DEFINE_integer("seq", 256, "Sequence length S.")
flags.DEFINE_integer("iters", 3, "Timed steps per variant after the first; the median is quoted.")
flags.DEFINE_string("preset", "", "Random weights of this lm preset instead of real SmolLM2.")
flags.DEFINE_string("scan_remat", "full", "Remat policy of the scanned variant quoted as ours.")
flags.DEFINE_string("variant", "", "Internal: run one variant 'scan:remat' and print its JSON.")
FLAGS = flags.FLAGS

VARIANTS = ("unrolled:none", "scan:none", "scan:full", "unrolled:full")


def _one(variant: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import lm
  from lm import hub, scoring

  scan, remat = variant.split(":")
  if FLAGS.preset:
    model = lm.Transformer(lm.preset(FLAGS.preset), rngs=nnx.Rngs(0))
  else:
    model = hub.load_model(hub.resolve("smollm2-135m-instruct"))
  model.cfg = model.cfg.replace(scan_layers=scan == "scan", remat=remat)
  tokens = jnp.asarray(np.random.default_rng(0).integers(
      0, model.cfg.vocab_size, (FLAGS.batch, FLAGS.seq)), jnp.int32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    m = nnx.merge(graphdef, p, rest)
    h, _ = m.hidden_states(tokens)
    return -scoring.selected_token_logprobs(m, h[:, :-1], tokens[:, 1:],
                                            jnp.ones(tokens[:, 1:].shape, bool)).mean()

  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = step.lower(params).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.iters + 1):
    t0 = time.perf_counter()
    value, grads = compiled(params)
    jax.block_until_ready(grads)
    times.append(time.perf_counter() - t0)
  return {"variant": variant, "compile_s": compile_s, "first_step_s": times[0],
          "step_s_median": statistics.median(times[1:]), "step_s": times[1:],
          "loss": float(value),
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv):
  del argv
  if FLAGS.variant:
    print(json.dumps(_one(FLAGS.variant)))
    return
  results = {}
  for variant in VARIANTS:
    cmd = [sys.executable, "-m", "benchmarks.layer_stack", f"--variant={variant}",
           f"--batch={FLAGS.batch}", f"--seq={FLAGS.seq}", f"--iters={FLAGS.iters}",
           f"--preset={FLAGS.preset}"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    results[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    logging.info("%s", results[variant])
  ref, ours = results["unrolled:none"], results[f"scan:{FLAGS.scan_remat}"]
  print(json.dumps({
      "benchmark": "layer_stack", "batch": FLAGS.batch, "seq": FLAGS.seq,
      "model": FLAGS.preset or "smollm2-135m-instruct (GGUF, float32)",
      "ours": ours, "reference": ref, "variants": results,
      "ratio": ref["step_s_median"] / ours["step_s_median"],
      "compile_ratio": ref["compile_s"] / ours["compile_s"],
      "peak_rss_ratio": ref["peak_rss_gb"] / ours["peak_rss_gb"],
  }))


if __name__ == "__main__":
  app.run(main)
