"""Verbosity bias: response lengths per prompt category, and a length-instruction compliance test.

Lengths are whitespace-separated words (`str.split()`), so they compare across tokenizers.

Prompt categories, a keyword rule on the lower-cased instruction, first match wins:
  1. explanation: contains a word or phrase of `EXPLANATION_CUES` ("explain", "why",
     "describe", "how does", "how did", "how come", "what causes", "tell me about"), as whole words;
  2. factual: starts with a short-answer question word (`FACTUAL_STARTS`: who, what, when, where,
     which, whose, how many, how much, how old, how long, how far, how big, how tall) and has at
     most `FACTUAL_MAX_WORDS` (15) words;
  3. other: everything else (requests, how-to "how do I ...", advice, creative writing, ...).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from decode.metrics import length_stats
from lm.train.rundir import pyplot, save_figure

plt = pyplot()

CATEGORIES = ("factual", "explanation", "other")
EXPLANATION_CUES = ("explain", "explanation", "why", "describe", "how does", "how did", "how come",
                    "what causes", "tell me about")
FACTUAL_STARTS = ("who", "what", "when", "where", "which", "whose", "how many", "how much",
                  "how old", "how long", "how far", "how big", "how tall")
FACTUAL_MAX_WORDS = 15
_EXPLANATION_RE = re.compile(r"\b(" + "|".join(re.escape(c) for c in EXPLANATION_CUES) + r")\b")
_FACTUAL_RE = re.compile(r"^\W*(" + "|".join(re.escape(s) for s in FACTUAL_STARTS) + r")\b")


def classify_prompt(instruction: str) -> str:
  """`factual`, `explanation` or `other` by the module's documented keyword rule."""
  text = " ".join(instruction.lower().split())
  if _EXPLANATION_RE.search(text):
    return "explanation"
  if _FACTUAL_RE.search(text) and len(text.split()) <= FACTUAL_MAX_WORDS:
    return "factual"
  return "other"


def count_words(text: str) -> int:
  return len(text.split())


def stats_by_category(categories: Sequence[str], lengths: Sequence[float]
                      ) -> dict[str, dict[str, float]]:
  """`decode.metrics.length_stats` per category present, plus `all`."""
  if len(categories) != len(lengths):
    raise ValueError(f"{len(categories)} categories for {len(lengths)} lengths.")
  out = {}
  for cat in CATEGORIES:
    xs = [x for c, x in zip(categories, lengths) if c == cat]
    if xs:
      out[cat] = length_stats(xs)
  if len(lengths):
    out["all"] = length_stats(lengths)
  return out


def length_compliance(word_counts: Sequence[int], limit: int = 50) -> dict[str, float]:
  """Compliance with "at most `limit` words".

  Returns compliance_rate (fraction with words <= limit), n, n_noncompliant;
  overrun_mean / overrun_std: words over the limit among NON-compliant responses only
  (population std; nan when every response complies); overrun_mean_all: mean of
  max(0, words - limit) over ALL responses.
  """
  w = np.asarray(word_counts, np.float64)
  if w.size == 0:
    raise ValueError("length_compliance needs at least one response.")
  over = w[w > limit] - limit
  return {"compliance_rate": float(np.mean(w <= limit)), "n": int(w.size),
          "n_noncompliant": int(over.size),
          "overrun_mean": float(over.mean()) if over.size else float("nan"),
          "overrun_std": float(over.std()) if over.size else float("nan"),
          "overrun_mean_all": float(np.maximum(w - limit, 0).mean()), "limit": limit}


def box_plot(lengths: Mapping[str, Mapping[str, Sequence[float]]], path, *, title: str,
             ylabel: str = "response length (words)", limit: int | None = None) -> None:
  """Grouped box plot: one group per category, one box per model inside it.

  `lengths[model][category]` is a list of lengths; empty groups are left blank.
  """
  models = list(lengths)
  cats = [c for c in CATEGORIES + ("all",) if any(lengths[m].get(c) for m in models)]
  width = 0.8 / max(len(models), 1)
  fig, ax = plt.subplots(figsize=(1.6 + 1.6 * len(cats), 4))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for k, m in enumerate(models):
    pos = [i + (k - (len(models) - 1) / 2) * width for i in range(len(cats))]
    data = [list(lengths[m].get(c, [])) or [np.nan] for c in cats]
    bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                    manage_ticks=False)
    for patch in bp["boxes"]:
      patch.set_facecolor(colors[k % len(colors)])
      patch.set_alpha(0.6)
    ax.plot([], [], "s", color=colors[k % len(colors)], label=m)
  if limit is not None:
    ax.axhline(limit, ls="--", lw=1, color="gray", label=f"limit ({limit})")
  ax.set_xticks(range(len(cats)), cats)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=7)
  save_figure(fig, path, dpi=120)
