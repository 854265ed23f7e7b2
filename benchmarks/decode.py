"""Decoding throughput of ours vs HF `generate`, SmolLM2-135M-Instruct float32 on this CPU.

Cases (128 new tokens, EOS ignored so every row decodes the full length): greedy batch 1,
greedy batch 8, beam 4 batch 1, top-p 0.9 batch 8, and top-p 0.9 over 8 prompts x 4 samples
(batch 32: an RL rollout's shape). Real chat-template prompts (AlpacaEval instructions where
../shared/data has them). Each side's first call (ours: the compile) is untimed and reported
apart; then the two sides alternate over `--rounds` (A B, B A, ...), and each case reports
min / median / max seconds per side and the ratio of medians. The machine is probed before and
after (`benchmarks.harness.Monitor`); `--strict` refuses a run where it was not quiet.

  python -m benchmarks.decode [--rounds 5 --new_tokens 128 --cases greedy_b1,...] [--quick]
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from benchmarks import harness

flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
flags.DEFINE_integer("rounds", 5, "Timed calls per side and case, alternating the sides.")
flags.DEFINE_list("cases", ["greedy_b1", "greedy_b8", "beam4_b1", "top_p_b8", "top_p_b32"],
                  "Cases to run.")
flags.DEFINE_bool("quick", False, "Iteration mode: 32 new tokens, 2 rounds (never quote it).")
flags.DEFINE_bool("strict", False, "Exit 1 when the machine was not quiet during the run.")
FLAGS = flags.FLAGS

CASES = {
    "greedy_b1": dict(batch=1, kind="greedy"),
    "greedy_b8": dict(batch=8, kind="greedy"),
    "beam4_b1": dict(batch=1, kind="beam", beams=4),
    "top_p_b8": dict(batch=8, kind="top_p", top_p=0.9),
    "top_p_b32": dict(batch=8, samples=4, kind="top_p", top_p=0.9),
}


def main(argv):
  del argv
  import torch
  from transformers import AutoModelForCausalLM

  from lm import data, hub

  path = hub.resolve_alias("smollm2-135m-instruct")
  model, tok = hub.load_model(path), hub.load_tokenizer(path)
  hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                            dtype=torch.float32).eval()
  hf.generation_config.eos_token_id = None  # decode the full length, as ours does below
  try:
    questions = data.load_instructions("alpaca_eval", 8)
  except Exception:  # no shared data and no hub: fixed instructions
    questions = [f"Give me {i + 2} tips for learning to cook." for i in range(8)]
  prompts = [hub.encode_chat(tok, q) for q in questions]
  n, rounds = (32, 2) if FLAGS.quick else (FLAGS.new_tokens, FLAGS.rounds)
  results = {}
  with harness.Monitor() as monitor:
    for name in FLAGS.cases:
      results[name] = _case(CASES[name], model, hf, tok, prompts, n, rounds)
      logging.info("%s: ratio %.2f (ours %.1f tok/s, HF %.1f tok/s)", name,
                   results[name]["ratio"], results[name]["ours_tokens_per_s"],
                   results[name]["hf_tokens_per_s"])
  machine = monitor.report()
  import jax

  print(json.dumps({
      "benchmark": "decode", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)",
      "dtype": "float32", "new_tokens": n, "rounds": rounds, "quick": FLAGS.quick,
      "device": "cpu", "cases": results, "machine": machine,
      "ratio": {k: v["ratio"] for k, v in results.items()},
      "jax_version": jax.__version__, "torch_version": torch.__version__,
  }))
  if FLAGS.strict and machine["verdict"] != "quiet":
    sys.exit(f"not quiet: {machine['verdict']}")


def _case(case, model, hf, tok, prompts, n, rounds) -> dict:
  import torch

  from decode.beam import BeamSearch, beam_search
  from decode.engine import generate
  from decode.sampling import Sampler

  batch = prompts[:case["batch"]]
  samples = case.get("samples", 1)
  pad = tok.pad_token_id
  tok.padding_side = "left"
  enc = tok.pad({"input_ids": batch}, return_tensors="pt")
  hf_kw = dict(max_new_tokens=n, pad_token_id=pad)
  if case["kind"] == "greedy":
    ours_fn = lambda: generate(model, batch, max_new_tokens=n, eos_ids=[], pad_id=pad)
    hf_kw.update(do_sample=False)
  elif case["kind"] == "top_p":
    ours_fn = lambda: generate(model, batch, max_new_tokens=n, eos_ids=[], pad_id=pad,
                               sampler=Sampler(top_p=case["top_p"]), seed=0, num_samples=samples)
    hf_kw.update(do_sample=True, top_p=case["top_p"], top_k=0, temperature=1.0,
                 num_return_sequences=samples)
  else:
    cfg = BeamSearch(num_beams=case["beams"], length_penalty=1.0)
    ours_fn = lambda: beam_search(model, batch, max_new_tokens=n, eos_ids=[], pad_id=pad,
                                  config=cfg)
    hf_kw.update(do_sample=False, num_beams=case["beams"])

  def hf_fn():
    with torch.inference_mode():
      return hf.generate(**enc, **hf_kw)

  first = {"ours": harness.timed(ours_fn)(), "hf": harness.timed(hf_fn)()}
  times = harness.alternate({"ours": harness.timed(ours_fn), "hf": harness.timed(hf_fn)}, rounds)
  ours, theirs = harness.spread(times["ours"]), harness.spread(times["hf"])
  tokens = len(batch) * samples * n
  return {
      "rows": len(batch) * samples, "ours_s": ours, "hf_s": theirs,
      "ours_tokens_per_s": tokens / ours["median"], "hf_tokens_per_s": tokens / theirs["median"],
      "ratio": theirs["median"] / ours["median"],
      "ours_compile_s": first["ours"] - ours["median"], "hf_first_call_s": first["hf"],
      "ours_ms_per_step": 1000 * ours["median"] / n, "hf_ms_per_step": 1000 * theirs["median"] / n,
  }


if __name__ == "__main__":
  app.run(main)
