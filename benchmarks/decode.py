"""Decoding throughput of ours vs HF `generate`, SmolLM2-135M-Instruct float32 on this CPU.

Cases (128 new tokens, EOS ignored so every row decodes the full length): greedy batch 1,
greedy batch 8, beam 4 batch 1, top-p 0.9 batch 8. Real chat-template prompts (AlpacaEval
instructions where ../shared/data has them). Compile time (first call) is reported apart from
the steady state (median of timed calls after it).

  python -m benchmarks.decode [--new_tokens 128 --iters 2 --cases greedy_b1,greedy_b8,beam4_b1,top_p_b8]
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags, logging

flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
flags.DEFINE_integer("iters", 2, "Timed calls per case after the first (compile) call.")
flags.DEFINE_list("cases", ["greedy_b1", "greedy_b8", "beam4_b1", "top_p_b8"], "Cases to run.")
FLAGS = flags.FLAGS

CASES = {
    "greedy_b1": dict(batch=1, kind="greedy"),
    "greedy_b8": dict(batch=8, kind="greedy"),
    "beam4_b1": dict(batch=1, kind="beam", beams=4),
    "top_p_b8": dict(batch=8, kind="top_p", top_p=0.9),
}


def _timed(fn, iters):
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, statistics.median(times)


def main(argv):
  del argv
  import torch
  from transformers import AutoModelForCausalLM

  from decode.beam import BeamSearch, beam_search
  from decode.engine import generate
  from decode.sampling import Sampler
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
  pad = tok.pad_token_id
  n = FLAGS.new_tokens
  results = {}
  for name in FLAGS.cases:
    case = CASES[name]
    batch = prompts[:case["batch"]]
    tok.padding_side = "left"
    enc = tok.pad({"input_ids": batch}, return_tensors="pt")
    hf_kw = dict(max_new_tokens=n, pad_token_id=pad)
    if case["kind"] == "greedy":
      ours_fn = lambda: generate(model, batch, max_new_tokens=n, eos_ids=[], pad_id=pad)
      hf_kw.update(do_sample=False)
    elif case["kind"] == "top_p":
      ours_fn = lambda: generate(model, batch, max_new_tokens=n, eos_ids=[], pad_id=pad,
                                 sampler=Sampler(top_p=case["top_p"]), seed=0)
      hf_kw.update(do_sample=True, top_p=case["top_p"], top_k=0, temperature=1.0)
    else:
      cfg = BeamSearch(num_beams=case["beams"], length_penalty=1.0)
      ours_fn = lambda: beam_search(model, batch, max_new_tokens=n, eos_ids=[], pad_id=pad,
                                    config=cfg)
      hf_kw.update(do_sample=False, num_beams=case["beams"])

    def hf_fn():
      with torch.inference_mode():
        return hf.generate(**enc, **hf_kw)

    ours_first, ours_step = _timed(ours_fn, FLAGS.iters)
    hf_first, hf_step = _timed(hf_fn, FLAGS.iters)
    tokens = case["batch"] * n
    r = {
        "ours_tokens_per_s": tokens / ours_step, "hf_tokens_per_s": tokens / hf_step,
        "ratio": hf_step / ours_step, "ours_compile_s": ours_first - ours_step,
        "ours_s": ours_step, "hf_s": hf_step, "hf_first_call_s": hf_first,
        "ours_ms_per_step": 1000 * ours_step / n,
    }
    results[name] = r
    logging.info("%s: %s", name, {k: round(v, 3) for k, v in r.items()})
  import jax

  print(json.dumps({
      "benchmark": "decode", "model": "SmolLM2-135M-Instruct (GGUF Q4_1 -> float32)",
      "dtype": "float32", "new_tokens": n, "device": "cpu", "cases": results,
      "ratio": {k: v["ratio"] for k, v in results.items()},
      "jax_version": jax.__version__, "torch_version": torch.__version__,
  }))


if __name__ == "__main__":
  app.run(main)
