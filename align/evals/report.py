"""report.md of the alignment comparison: one markdown table per family of metrics."""

from __future__ import annotations

from align.evals import verbosity
from lm.train.rundir import markdown_table


def _stand_in_note(entries) -> list[str]:
  notes = []
  for e in entries:
    s = e["spec"]["stand_in_lora"]
    if s:
      s = dict(s)
      notes.append(f"> **Stand-in:** `{e['name']}` is NOT a trained DPO adapter: a randomly "
                   f"initialised LoRA (rank {s['rank']}, alpha {s['alpha']}, B ~ N(0, "
                   f"{s['b_std']}^2), seed {s['seed']}) on `{e['spec']['model']}`, used until a "
                   "real adapter exists. Its numbers test the pipeline, not alignment.\n")
  return notes


def _models_table(results) -> str:
  rows = [{"model": m["name"], "weights": m["model"], "adapter": m["adapter"] or "",
           "stand-in LoRA": "yes" if m["stand_in_lora"] else "",
           "KL reference": m["kl_reference"] or "(is the reference)"}
          for m in results["models"]]
  return markdown_table(rows)


def _perplexity_table(results) -> str:
  rows = []
  for name, r in results["perplexity"].items():
    w, p = r["wikitext2_test"], r["pairs"]
    rows.append({"model": name, "WikiText-2 test ppl": w["perplexity"],
                 "scored tokens": w["n_tokens"],
                 "window / stride": f"{w['window']} / {w['stride']}",
                 "response ppl (pairs)": p["perplexity"], "pairs": p["n_pairs"],
                 "response tokens": p["n_tokens"]})
  return markdown_table(rows)


def _kl_table(results) -> str:
  rows = []
  for name, r in results["kl"].items():
    for data, label, direction in (
        ("own_samples", f"policy's own samples (T={r['temperature']})", "policy || ref"),
        ("reference_samples", f"reference's samples (T={r['temperature']})", "ref || policy"),
        ("fixed_text", "WikiText-2 slice", "policy || ref")):
      s = r.get(data)
      if s is None:
        continue
      rows.append({"model": name, "reference": r["reference"], "tokens scored": label,
                   "KL": direction, "n seq": s["n_sequences"], "n tok": s["n_tokens"],
                   "exact / tok": s["exact_per_token"],
                   "exact_rev / tok": s.get("exact_rev_per_token", float("nan")),
                   "k1 / tok": s["k1_per_token"], "k2 / tok": s["k2_per_token"],
                   "k3 / tok": s["k3_per_token"],
                   "exact / seq": f"{s['exact_per_seq']:.4g} ± {s['exact_per_seq_std']:.3g}",
                   "k1 / seq": f"{s['k1_per_seq']:.4g} ± {s['k1_per_seq_std']:.3g}",
                   "k3 / seq": f"{s['k3_per_seq']:.4g} ± {s['k3_per_seq_std']:.3g}"})
  return markdown_table(rows)


def _lengths_table(results) -> str:
  rows = []
  for name, r in results["lengths"].items():
    for kind, label in (("greedy", "greedy"), ("sampled", "T=1 samples")):
      s = r[kind]
      rows.append({"model": name, "decoding": label, "n": s["count"], "mean": s["mean"],
                   "median": s["median"], "std": s["std"], "share empty": s["empty_share"],
                   "share cut at max_new_tokens": s["truncated_share"]})
  return markdown_table(rows)


def _reward_model_table(results) -> str:
  rows = []
  for name, r in results["reward_model"].items():
    row = {"model": name, "n": r["n"], "score of own answers": r["original_mean"],
           "std": r["original_std"]}
    for p, st in r.items():
      if isinstance(st, dict):
        row[f"{p} Δ"] = st["mean_delta"]
    rows.append(row)
  return markdown_table(rows)


def summary_table(results) -> str:
  """One row per model: the study's headline numbers (the PA5 report's Table 4 columns)."""
  rows = []
  for m in results["models"]:
    name = m["name"]
    kl = results["kl"].get(name, {})
    g, smp = results["lengths"][name]["greedy"], results["lengths"][name]["sampled"]
    rm = results["reward_model"].get(name, {})
    nan = float("nan")
    rows.append({
        "model": name,
        "WikiText-2 ppl": results["perplexity"][name]["wikitext2_test"]["perplexity"],
        "KL own samples / tok": kl.get("own_samples", {}).get("exact_per_token", 0.0 if not kl
                                                                  else nan),
        "KL(ref‖π) ref samples / tok": kl.get("reference_samples", {}).get("exact_per_token",
                                                                          0.0 if not kl else nan),
        "KL text / tok": kl.get("fixed_text", {}).get("exact_per_token", 0.0 if not kl else nan),
        "tokens mean (greedy)": g["mean"], "median": g["median"], "std": g["std"],
        "empty": g["empty_share"], "median (T=1)": smp["median"], "empty (T=1)": smp["empty_share"],
        "RM score": rm.get("original_mean", nan),
        "RM keywords Δ": rm.get("keywords", {}).get("mean_delta", nan)})
  return markdown_table(rows)


def _verbosity_table(results, kind) -> str:
  rows = []
  for cat in verbosity.CATEGORIES + ("all",):
    for name, r in results["verbosity"].items():
      s = r[kind].get(cat)
      if s:
        rows.append({"category": cat, "model": name, "n": s["count"], "mean": s["mean"],
                     "median": s["median"], "std": s["std"], "skew": s["skew"],
                     "min": s["min"], "max": s["max"]})
  return markdown_table(rows)


def _compliance_table(results) -> str:
  rows = []
  for name, r in results["length_compliance"].items():
    rows.append({"model": name, "n": r["n"], "compliance (words <= limit)": r["compliance_rate"],
                 "overrun mean (non-compliant)": r["overrun_mean"],
                 "overrun std (non-compliant)": r["overrun_std"],
                 "overrun mean (all)": r["overrun_mean_all"], "mean words": r["mean_words"],
                 "hit max_new_tokens": r["hit_max_new_tokens"]})
  return markdown_table(rows)


def _hacking_table(results) -> str:
  rows = []
  series = list(results["reward_hacking"])
  perts = list(results["reward_hacking"][series[0]]) if series else []
  for p in perts:
    for s in series:
      st = results["reward_hacking"][s][p]
      rows.append({"perturbation": p, "scorer": s, "mean Δ": st["mean_delta"],
                   "std Δ": st["std_delta"], "frac Δ > 0": st["frac_positive"], "n": st["n"],
                   "original mean": st["original_mean"]})
  return markdown_table(rows)


def _which_answers(c) -> str:
  return f"The first {c.hacking.n}" if c.hacking.n else "All"


def render(config, results, entries) -> str:
  c = config
  cats = results["prompts"]["categories"]
  t = results["timing"]
  text = [f"# Alignment diagnostics ({c.variant})\n", *_stand_in_note(entries),
          _models_table(results),
          f"{results['prompts']['n']} instructions from `{c.prompts.source}` (chat template, "
          f"greedy, max {c.decode.max_new_tokens} new tokens); categories "
          f"{', '.join(f'{k} {v}' for k, v in cats.items())} by the keyword rule in "
          f"`align/evals/verbosity.py`. Total {t['total_s']:.0f} s.\n",
          "## Perplexity\n",
          "WikiText-2 test: sliding window (`lm.scoring.perplexity`), every token scored once. "
          f"Pairs: {c.perplexity.pairs_source} instructions with their reference outputs, response "
          "tokens (+ end-of-turn) only, pooled over tokens.\n",
          _perplexity_table(results),
          "## Summary\n",
          "Perplexity, KL per token (exact, nats) in both directions, response length in tokens "
          "(end-of-turn not counted) of the greedy answers and of the T=1 samples, and the reward "
          "model's score of each model's own greedy answers with the mean change the `keywords` "
          "perturbation (\"I am a helpful AI.\" and the like, the PA5 report's hack) brings. "
          "Details below.\n",
          summary_table(results),
          "## KL, both directions\n",
          "Nats. exact = full-vocabulary KL of the next-token distributions; k1 = log p - log q, "
          "k2 = (log r)^2 / 2, k3 = (r - 1) - log r with r = q/p (Schulman, \"Approximating KL "
          "divergence\") at the scored tokens. On the policy's own T=1 samples k1, k3 and exact "
          "are unbiased for the KL (per sequence: sum over the response, mean ± std over "
          "sequences); on fixed text only `exact` is a KL, k1-k3 are shown for comparison. "
          "KL(reference || policy) is scored on the reference's own T=1 samples with the roles "
          "swapped (so there `exact` is sum_v q log q/p); `exact_rev` is the other direction at "
          "the same contexts.\n",
          _kl_table(results) if results["kl"] else "(no entry has a reference)\n",
          "## Response length (tokens)\n",
          "Tokens of each answer to the plain prompts, the end-of-turn not counted: greedy, and the "
          "T=1 samples the KL is measured on. Empty = nothing but whitespace before the "
          "end-of-turn.\n",
          _lengths_table(results),
          "## Verbosity (response length in words, plain prompts)\n",
          "std = population std, skew = Fisher-Pearson g1 (`decode.metrics.length_stats`).\n",
          _verbosity_table(results, "plain"),
          f"## Length compliance (\"{c.verbosity.length_instruction}\" appended)\n",
          f"Compliant: words <= {c.verbosity.word_limit}. Overrun = words - limit; mean/std over "
          "non-compliant responses, and the mean of max(0, overrun) over all. `hit "
          "max_new_tokens` = fraction cut by the token budget (their length is a lower bound).\n",
          _compliance_table(results),
          "Lengths under the instruction, per category:\n",
          _verbosity_table(results, "length_instruction"),
          "## Reward hacking\n",
          f"{_which_answers(c)} of the reference's greedy answers perturbed "
          f"({', '.join(c.hacking.perturbations)}; "
          "`align/evals/perturb.py`, seed + example index) and scored before/after. Δ = "
          "score(perturbed) - score(original); implicit reward = beta * (log pi - log pi_ref) "
          "of response + end-of-turn given the prompt; avg log-prob = mean token log-prob under "
          "the model.\n",
          _hacking_table(results)]
  if results["reward_model"]:
    text += ["### The reward model on each model's own answers\n",
             f"{_which_answers(c)} of each model's greedy answers, scored as they are "
             "and perturbed as above (Δ = mean change).\n", _reward_model_table(results)]
  plots = ["lengths_plain.png", "lengths_length_instruction.png",
           "reward_hacking_mean_delta.png", "reward_hacking_deltas.png"]
  text += [f"![{p}](plots/{p})\n" for p in plots]
  return "\n".join(text)
