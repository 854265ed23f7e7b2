"""The decoding-dynamics experiment: greedy, beam, top-k and top-p across temperatures.

Writes `generations.jsonl` (one row per generation), `summary.json` + a markdown table, and the
plots: avg-log-prob box plots (greedy, beam), beam cumulative-score histogram, avg log-prob vs
temperature (top-k vs top-p), Distinct-N vs temperature, within- vs across-prompt Distinct-N,
and quality (score) vs diversity (Distinct-1). The score is any `decode.scorers.Scorer`: a reward
run named by `config.reward_run`, one passed to `run`, or by default the mean token log-prob under
the model itself.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from decode import metrics, scorers
from decode.beam import BeamSearch, beam_search
from decode.engine import StopRules, stop_token_sequences
from decode.rollout import pad_id_of, rollout
from decode.sampling import GREEDY, Sampler
from lm import data, hub, scoring
from lm.progress import Progress
from lm.train.rundir import RunDir, markdown_table, pyplot, save_figure

plt = pyplot()

log = logging.getLogger(__name__)


def _strategies(cfg):
  """(name, family, temperature, kind, Sampler|BeamSearch, samples per prompt)."""
  out = [("greedy", "greedy", None, "sample", GREEDY, 1),
         (f"beam{cfg.beam.num_beams}", "beam", None, "beam",
          BeamSearch(num_beams=cfg.beam.num_beams, length_penalty=cfg.beam.length_penalty,
                     early_stopping=cfg.beam.early_stopping), 1)]
  for t in cfg.temperatures:
    out.append((f"top_k{cfg.top_k}_t{t}", "top_k", t, "sample",
                Sampler(temperature=t, top_k=cfg.top_k), cfg.num_samples))
    out.append((f"top_p{cfg.top_p}_t{t}", "top_p", t, "sample",
                Sampler(temperature=t, top_p=cfg.top_p), cfg.num_samples))
  return out


def run(config, run_dir: RunDir, mesh=None, scorer: scorers.Scorer | None = None) -> dict:
  del mesh
  cfg = config.sweep
  model, tok = hub.load_pretrained(config.model.name, dtype=config.model.dtype)
  questions = data.load_instructions(config.prompts.source, config.prompts.n)
  prompts = [hub.encode_chat(tok, q) for q in questions]
  eos, pad = hub.stop_ids(tok), pad_id_of(tok)
  stop = StopRules(stop_sequences=stop_token_sequences(tok, list(cfg.stop_strings)),
                   repeat_ngram_block=cfg.repeat_ngram_block,
                   repeat_threshold=cfg.repeat_threshold)
  rows, beam_scores = [], {}
  bs = cfg.batch_rows
  strategies = _strategies(cfg)
  bar = Progress(len(strategies), "decode_sweep", "strategy", logger=log)
  for name, family, temp, kind, strategy, n_samples in strategies:
    t0, n_tok = time.time(), 0
    per_prompt = max(1, bs // n_samples)
    for i in range(0, len(prompts), per_prompt):
      chunk = prompts[i:i + per_prompt]
      if kind == "beam":
        out = beam_search(model, chunk, max_new_tokens=cfg.max_new_tokens, eos_ids=eos,
                          pad_id=pad, config=strategy)
        seqs = [row[0][:n[0]].tolist() for row, n in zip(out.tokens_bnt, out.lengths_bn)]
        beam_scores.setdefault(name, []).extend(np.asarray(out.beam_logprob_sums_bw).ravel())
        finish = ["beam"] * len(seqs)
      else:
        out = rollout(model, chunk, max_new_tokens=cfg.max_new_tokens, eos_ids=eos, pad_id=pad,
                      sampler=strategy, num_samples=n_samples, seed=config.seed + i, stop=stop)
        seqs, finish = out.sequences(), out.finish
      texts = [tok.decode(s, skip_special_tokens=True) for s in seqs]
      for r, (seq, text, fin) in enumerate(zip(seqs, texts, finish)):
        p = i + r // n_samples
        rows.append({"strategy": name, "family": family, "temperature": temp,
                     "prompt_idx": p, "sample_idx": r % n_samples, "instruction": questions[p],
                     "text": text, "tokens": seq, "length": len(seq), "finish": fin})
        n_tok += len(seq)
    bar.update(1, strategy=name, tok_per_s=f"{n_tok / (time.time() - t0):.1f}")

  # One scoring pass for every strategy: mean token log-prob under the model (raw, T=1).
  lps = scoring.response_logprobs(model, [prompts[r["prompt_idx"]] for r in rows],
                                  [r["tokens"] for r in rows], batch_size=cfg.score_batch)
  for r, lp in zip(rows, lps):
    r["avg_logprob"] = float(lp.mean()) if len(lp) else float("nan")
    r["sum_logprob"] = float(lp.sum())
  if scorer is None and config.reward_run:
    scorer = scorers.load_reward_model(config.reward_run)
  if scorer is not None:
    for r, s in zip(rows, scorers.score(scorer, [r["instruction"] for r in rows],
                                        [r["text"] for r in rows])):
      r["score"] = float(s)
  else:
    for r in rows:
      r["score"] = r["avg_logprob"]

  with open(run_dir.path / "generations.jsonl", "w") as fh:
    for r in rows:
      fh.write(json.dumps(r) + "\n")
  summary = _summary(rows, strategies)
  run_dir.write_json("summary.json", {"strategies": summary,
                                      "beam_logprob_sums": {k: [float(x) for x in v]
                                                            for k, v in beam_scores.items()}})
  for step, s in enumerate(summary):
    run_dir.metrics.write(step, {k: v for k, v in s.items() if isinstance(v, float)},
                          strategy=s["strategy"])
  _plots(rows, summary, beam_scores, cfg, run_dir)
  _report(config, summary, run_dir)
  return {"n_generations": len(rows)}


def _summary(rows, strategies):
  out = []
  for name, family, temp, _, _, n_samples in strategies:
    rs = [r for r in rows if r["strategy"] == name]
    by_prompt: dict[int, list] = {}
    for r in rs:
      by_prompt.setdefault(r["prompt_idx"], []).append(r["tokens"])
    samples = [by_prompt[k] for k in sorted(by_prompt)]
    s = {"strategy": name, "family": family, "temperature": temp, "n": len(rs),
         "avg_logprob": float(np.nanmean([r["avg_logprob"] for r in rs])),
         "score": float(np.nanmean([r["score"] for r in rs])),
         "length": float(np.mean([r["length"] for r in rs]))}
    for n in (1, 2, 3):
      s[f"distinct{n}_across"] = metrics.distinct_across_prompts(samples, n)
      s[f"distinct{n}_within"] = (metrics.distinct_within_prompt(samples, n)
                                  if n_samples > 1 else float("nan"))
    out.append(s)
  return out


def _save(fig, run_dir, name):
  save_figure(fig, run_dir.plots / name, dpi=120)


def _plots(rows, summary, beam_scores, cfg, run_dir):
  det = [s["strategy"] for s in summary if s["family"] in ("greedy", "beam")]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.boxplot([[r["avg_logprob"] for r in rows if r["strategy"] == n] for n in det],
             tick_labels=det)
  ax.set_ylabel("avg token log-prob")
  ax.set_title("Deterministic decoding: avg log-prob per answer")
  _save(fig, run_dir, "avg_logprob_box_greedy_beam.png")

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, scores in beam_scores.items():
    ax.hist(scores, bins=20, alpha=0.8, label=name)
  ax.set_xlabel("beam cumulative log-prob (all final beams)")
  ax.set_ylabel("count")
  ax.legend()
  ax.set_title("Beam search: cumulative scores")
  _save(fig, run_dir, "beam_cumulative_scores.png")

  temps = list(cfg.temperatures)
  fams = [("top_k", f"top-k (k={cfg.top_k})"), ("top_p", f"top-p (p={cfg.top_p})")]
  fig, ax = plt.subplots(figsize=(5, 4))
  for fam, label in fams:
    ax.plot(temps, [s["avg_logprob"] for s in summary if s["family"] == fam], "o-", label=label)
  for s in summary:
    if s["family"] in ("greedy", "beam"):
      ax.axhline(s["avg_logprob"], ls="--", lw=1, color="gray")
      ax.text(temps[0], s["avg_logprob"], s["strategy"], fontsize=7, va="bottom")
  ax.set_xlabel("temperature")
  ax.set_ylabel("avg token log-prob")
  ax.legend()
  ax.set_title("Avg log-prob vs temperature")
  _save(fig, run_dir, "avg_logprob_vs_temperature.png")

  fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), sharey=True)
  for n, ax in zip((1, 2, 3), axes):
    for fam, label in fams:
      fs = [s for s in summary if s["family"] == fam]
      ax.plot(temps, [s[f"distinct{n}_across"] for s in fs], "o-", label=f"{label} across")
      ax.plot(temps, [s[f"distinct{n}_within"] for s in fs], "s--", label=f"{label} within")
    ax.set_title(f"Distinct-{n}")
    ax.set_xlabel("temperature")
  axes[0].set_ylabel("distinct n-grams / total")
  axes[0].legend(fontsize=7)
  _save(fig, run_dir, "distinct_vs_temperature.png")

  sampled = [s for s in summary if s["family"] in ("top_k", "top_p")]
  x = np.arange(len(sampled))
  fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
  for n, ax in zip((1, 2, 3), axes):
    ax.bar(x - 0.2, [s[f"distinct{n}_within"] for s in sampled], 0.4, label="within prompt")
    ax.bar(x + 0.2, [s[f"distinct{n}_across"] for s in sampled], 0.4, label="across prompts")
    ax.set_ylabel(f"Distinct-{n}")
  axes[0].legend()
  axes[-1].set_xticks(x, [s["strategy"] for s in sampled], rotation=45, ha="right", fontsize=7)
  axes[0].set_title(f"Within-prompt ({cfg.num_samples} samples) vs across-prompt Distinct-N")
  _save(fig, run_dir, "distinct_within_vs_across.png")

  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  markers = {"greedy": "*", "beam": "D", "top_k": "o", "top_p": "s"}
  for s in summary:
    ax.scatter(s["distinct1_across"], s["score"], marker=markers[s["family"]], s=60)
    ax.annotate(s["strategy"], (s["distinct1_across"], s["score"]), fontsize=6)
  ax.set_xlabel("Distinct-1 (across prompts)")
  ax.set_ylabel("score (mean token log-prob under the model)")
  ax.set_title("Quality vs diversity")
  _save(fig, run_dir, "quality_vs_diversity.png")


def _report(config, summary, run_dir):
  cols = ["strategy", "temperature", "n", "length", "avg_logprob", "score", "distinct1_across",
          "distinct2_across", "distinct3_across", "distinct1_within", "distinct2_within"]
  plots = ["avg_logprob_box_greedy_beam.png", "beam_cumulative_scores.png",
           "avg_logprob_vs_temperature.png", "distinct_vs_temperature.png",
           "distinct_within_vs_across.png", "quality_vs_diversity.png"]
  text = [f"# Decoding sweep: {config.model.name}\n",
          f"{config.prompts.n} instructions from `{config.prompts.source}`, chat template, "
          f"max {config.sweep.max_new_tokens} new tokens, {config.sweep.num_samples} samples per "
          "prompt for sampled strategies. Score = mean token log-prob under the model.\n",
          markdown_table(summary, cols)]
  text += [f"![{p}](plots/{p})\n" for p in plots]
  run_dir.write_report("\n".join(text))
