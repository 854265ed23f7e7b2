"""Where a decode step goes: XLA:CPU's own per-op times inside the compiled decoding loop.

SmolLM2-135M-Instruct float32, greedy (and top-p 0.9 at batch 32), 64 new tokens after real
chat prompts. Each batch's loop is compiled, then run under `jax.profiler` (best of --repeats
traces); every op event of the trace is an instruction of the optimised HLO, and the
instruction's operand shapes say what it does:

  q/k/v/o projections, MLP gate/up/down, LM head   GEMMs against a weight of that shape
  attention over the cache                          ops on the [B, kv, T, hd] cache or scores
  cache writes                                      dynamic-update-slice
  layout copies                                     copy / transpose
  sampling                                          ops on [B, V] logits (filters, log-probs)
  other                                             norms, RoPE, residual adds, loop control

Per-step milliseconds are each group's time inside the decoding loop (the prefill is left out)
over the generated tokens. The limits beside them:
weights-bound = bytes of float32 weights read per step / the memory-read probe; FLOP-bound =
2 x weights x rows / the GEMM probe (`benchmarks.harness.probe`, this machine, this run).

  python -m benchmarks.decode_profile [--batches 1,8,32 --new_tokens 64]
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile

from absl import app, flags, logging

from benchmarks import harness

flags.DEFINE_list("batches", ["1", "8", "32"], "Rows per decode (32 = 8 prompts x 4 samples).")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
flags.DEFINE_integer("repeats", 3, "Traced runs per batch; the fastest is reported.")
FLAGS = flags.FLAGS

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(, .*)?$")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def _shapes(text: str) -> list[tuple[int, ...]]:
  return [tuple(int(d) for d in m.split(",") if d) for m in _SHAPE.findall(text)]


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{$")
_CALLED = re.compile(r"(?:calls|body|condition|to_apply|branch_computations)=\{?([^}\s]+)\}?")


def _instructions(hlo: str) -> dict[str, dict]:
  """name -> {op, out shapes, operand shapes, in_loop} of every instruction in the optimised HLO.
  Operands are printed by name: their shapes are their own instructions' outputs. `in_loop`: the
  instruction runs once per decode step (inside the entry's `while`, or what it calls)."""
  parsed, called, where, comp, entry = {}, collections.defaultdict(set), {}, None, None
  for line in hlo.splitlines():
    c = _COMPUTATION.match(line)
    if c:
      comp = c.group(2)
      entry = comp if c.group(1) else entry
      continue
    m = _INSTR.match(line)
    if m:
      name, out_type, op, operands, rest = m.groups()
      rest = rest or ""
      parsed[name] = (op, _shapes(out_type), re.findall(r"%([\w.\-]+)", operands))
      where[name] = comp
      for group in _CALLED.findall(rest):
        called[(comp, op)].update(x.lstrip("%") for x in group.split(",") if x)
  loop, todo = set(), [x for (c, op), xs in called.items() if c == entry and op == "while"
                       for x in xs]
  while todo:
    comp = todo.pop()
    if comp not in loop:
      loop.add(comp)
      todo += [x for (c, _), xs in called.items() if c == comp for x in xs]
  return {name: {"op": op, "out": out, "in": [s for o in ins if o in parsed for s in parsed[o][1]],
                 "in_loop": where[name] in loop}
          for name, (op, out, ins) in parsed.items()}


def _weight_groups(cfg) -> dict[tuple[int, ...], str]:
  d, f, n, k, h, v = (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                      cfg.vocab_size)
  out = {(d, k, h): "k/v projections", (d, k * h): "k/v projections", (k * h, d): "k/v projections",
         (d, n, h): "q/o projections", (n, h, d): "q/o projections", (d, n * h): "q/o projections",
         (n * h, d): "q/o projections", (d, f): "MLP gate/up", (f, d): "MLP down",
         (v, d): "LM head", (d, v): "LM head"}
  return out


def _group(ins: dict | None, weights: dict, vocab: int, cache_len: int) -> str:
  if ins is None:
    return "other"
  shapes = ins["in"] + ins["out"]
  for s in ins["in"]:
    if s in weights:
      return weights[s]
  if ins["op"] == "dynamic-update-slice":
    return "cache writes"
  if ins["op"] in ("copy", "transpose"):
    return "layout copies"
  if any(vocab in s for s in shapes):
    return "sampling"
  if any(cache_len in s for s in shapes):
    return "attention over the cache"
  return "other"


def _trace_ops(trace_dir: str) -> dict[str, float]:
  """Total microseconds per op name in the trace (the XLA:CPU op events)."""
  path = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]
  with gzip.open(path) as fh:
    events = json.load(fh)
  events = events["traceEvents"] if isinstance(events, dict) else events
  out: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("end: "):
      out[e["name"]] += float(e["dur"])
  return out


def _profile(model, prompts, rows: int, n: int):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from decode import engine
  from decode.sampling import GREEDY, Sampler

  samples = rows // len(prompts) if rows > len(prompts) else 1
  batch = prompts[:rows] if samples == 1 else prompts
  sampler = Sampler(top_p=0.9) if samples > 1 else GREEDY
  kw = dict(max_new_tokens=n, eos_ids=[], pad_id=2, sampler=sampler, num_samples=samples)
  engine.generate(model, batch, **kw)  # compile
  tokens, mask = engine.left_pad(batch, 2)
  graphdef, state = nnx.split(model)
  hlo = engine._generate.lower(
      graphdef, state, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray([-1], jnp.int32),
      sampler.params(len(batch) * samples), jax.random.key(0), max_new_tokens=n,
      sampler=sampler.structure(), stop=engine.StopRules(), pad_id=2,
      num_samples=samples).compile().as_text()
  best = None
  for _ in range(FLAGS.repeats):
    with tempfile.TemporaryDirectory() as tmp:
      jax.profiler.start_trace(tmp)
      t = harness.timed(lambda: engine.generate(model, batch, **kw))()
      jax.profiler.stop_trace()
      ops = _trace_ops(tmp)
    if best is None or t < best[0]:
      best = (t, ops)
  return best[0], best[1], _instructions(hlo), tokens.shape[1] + n


def main(argv):
  del argv
  import jax
  from flax import nnx

  from lm import data, hub

  path = hub.resolve_alias("smollm2-135m-instruct")
  model, tok = hub.load_model(path), hub.load_tokenizer(path)
  prompts = [hub.encode_chat(tok, q) for q in data.load_instructions("alpaca_eval", 8)]
  cfg, n = model.cfg, FLAGS.new_tokens
  weights = _weight_groups(cfg)
  n_weights = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  probe = harness.probe()
  results = {}
  for rows in map(int, FLAGS.batches):
    wall, ops, instrs, cache_len = _profile(model, prompts, rows, n)
    groups: dict[str, float] = collections.defaultdict(float)
    for name, us in ops.items():
      ins = instrs.get(name)
      if ins is None or not ins["in_loop"] or ins["op"] in ("while", "conditional", "call"):
        continue  # runtime events, the prefill, or control flow spanning the ops inside it
      groups[_group(ins, weights, cfg.vocab_size, cache_len)] += us
    per_step = {k: round(v / 1000 / n, 2) for k, v in sorted(groups.items(), key=lambda x: -x[1])}
    results[rows] = {
        "wall_ms_per_step": round(1000 * wall / n, 2), "op_ms_per_step": per_step,
        "ops_total_ms_per_step": round(sum(groups.values()) / 1000 / n, 2),
        "weights_bound_ms": round(4 * n_weights / probe["mem_read_gbs"] / 1e6, 2),
        "flop_bound_ms": round(2 * n_weights * rows / probe["gemm_gflops"] / 1e6, 2),
    }
    logging.info("batch %d: %s", rows, results[rows])
  print(json.dumps({"benchmark": "decode_profile", "model": "SmolLM2-135M-Instruct",
                    "dtype": "float32", "new_tokens": n, "probe": probe, "batches": results}))


if __name__ == "__main__":
  app.run(main)
