"""The quickstart: load a model, answer real instructions greedily, measure WikiText-2 perplexity."""

from __future__ import annotations

import logging
import time

import numpy as np

from decode.rollout import rollout
from lm import data, hub, scoring
from lm.train.rundir import RunDir, markdown_table, pyplot, save_figure

plt = pyplot()

log = logging.getLogger(__name__)


def run(config, run_dir: RunDir, mesh=None) -> dict:
  del mesh  # one model replica is enough for the quickstart
  t0 = time.time()
  model, tok = hub.load_pretrained(config.model.name, dtype=config.model.dtype)
  load_s = time.time() - t0
  log.info("loaded %s (%d params) in %.1fs", config.model.name, model.cfg.n_params, load_s)

  instructions = list(config.prompts.extra) or []
  if config.prompts.n:
    instructions = data.load_instructions(config.prompts.source, config.prompts.n) + instructions
  prompts = [hub.encode_chat(tok, q) for q in instructions]
  t0 = time.time()
  out = rollout(model, prompts, max_new_tokens=config.decode.max_new_tokens, tokenizer=tok,
                batch_size=config.decode.batch_size)
  gen_s = time.time() - t0
  answers = out.texts(tok, strip=True)
  token_lps = [lp[:n] for lp, n in zip(out.logprobs_bt, out.lengths_b)]
  n_new = int(out.lengths_b.sum())
  gen_rows = []
  for q, a, lp in zip(instructions, answers, token_lps):
    gen_rows.append({"instruction": q, "answer": a, "new_tokens": len(lp),
                     "mean_logprob": float(np.mean(lp)) if len(lp) else 0.0})
    log.info("Q: %s\nA: %s", q, a)

  text = data.load_wikitext("test")[: config.perplexity.max_chars]
  ids = tok(text)["input_ids"][: config.perplexity.max_tokens]
  t0 = time.time()
  ppl = scoring.perplexity(model, ids, window=config.perplexity.window,
                           stride=config.perplexity.stride, batch_size=config.perplexity.batch_size)
  ppl_s = time.time() - t0

  metrics = {
      "load_s": load_s, "generate_s": gen_s, "generated_tokens": n_new,
      "generate_tokens_per_s_incl_compile": n_new / gen_s,
      "wikitext2_perplexity": ppl.perplexity, "wikitext2_tokens": ppl.n_tokens,
      "perplexity_s": ppl_s,
  }
  run_dir.metrics.write(0, metrics)
  run_dir.write_json("generations.json", gen_rows)

  fig, ax = plt.subplots(figsize=(6, 3.5))
  for row, lp in zip(gen_rows, token_lps):
    ax.plot(np.arange(len(lp)), lp, alpha=0.7, label=row["instruction"][:30])
  ax.set_xlabel("generated token")
  ax.set_ylabel("log p(token)")
  ax.set_title("Greedy answers: per-token log-prob")
  ax.legend(fontsize=6)
  save_figure(fig, run_dir.plots / "answer_logprobs.png", dpi=120)

  report = [
      f"# Quickstart: {config.model.name}\n",
      f"{model.cfg.n_params / 1e6:.1f}M parameters, {model.cfg.n_layers} layers, "
      f"dtype {config.model.dtype}. Loaded in {load_s:.1f}s.\n",
      f"## Greedy answers (max {config.decode.max_new_tokens} new tokens)\n",
  ]
  for row in gen_rows:
    report.append(f"**Q:** {row['instruction']}\n\n**A:** {row['answer']}\n")
  report.append("## Numbers\n")
  report.append(markdown_table([{
      "WikiText-2 test perplexity": ppl.perplexity,
      "scored tokens": ppl.n_tokens,
      "window / stride": f"{ppl.window} / {ppl.stride}",
      "generated tokens": n_new,
      "generation s (incl. compile)": gen_s,
  }]))
  report.append("\n![per-token log-probs](plots/answer_logprobs.png)\n")
  run_dir.write_report("\n".join(report))
  return metrics
