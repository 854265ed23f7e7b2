"""Perplexity on text (sliding window, `lm.scoring.perplexity`) and on prompt-response pairs.

Response perplexity = exp(total NLL of the response tokens / their count), pooled over pairs
(each token weighs the same); the prompt is context only. Responses end with the tokenizer's
end-of-turn token when it has one, so ending the answer is part of what is scored.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from lm import scoring
from lm.data import shared_data_dir


def text_perplexity(model, tokenizer, text: str, *, max_tokens: int, window: int, stride: int,
                    batch_size: int = 4) -> dict[str, float]:
  """Sliding-window perplexity of the first `max_tokens` tokens of `text`."""
  ids = tokenizer(text)["input_ids"][:max_tokens]
  res = scoring.perplexity(model, ids, window=window, stride=stride, batch_size=batch_size)
  return {"perplexity": res.perplexity, "mean_nll": res.mean_nll, "n_tokens": res.n_tokens,
          "n_windows": res.n_windows, "window": window, "stride": stride}


def response_perplexity(model, prompts: Sequence[Sequence[int]],
                        responses: Sequence[Sequence[int]], *, batch_size: int = 8,
                        multiple: int = 32) -> dict[str, float]:
  """Perplexity of the response tokens given their prompts, pooled over all pairs.

  Also `seq_nll_mean`: the mean over pairs of each response's mean NLL (nats/token).
  """
  lps = scoring.response_logprobs(model, prompts, responses, batch_size=batch_size,
                                  multiple=multiple)
  nll_sum = -float(sum(np.sum(lp, dtype=np.float64) for lp in lps))
  n_tok = int(sum(len(lp) for lp in lps))
  seq = [-float(np.mean(lp)) for lp in lps if len(lp)]
  return {"perplexity": math.exp(nll_sum / max(n_tok, 1)), "mean_nll": nll_sum / max(n_tok, 1),
          "n_tokens": n_tok, "n_pairs": len(lps),
          "seq_nll_mean": float(np.mean(seq)) if seq else float("nan")}


def load_pairs(source: str = "alpaca_eval", n: int | None = None) -> list[tuple[str, str]]:
  """(instruction, response) pairs: `alpaca_eval` (its reference outputs) or a .json/.jsonl(.gz).

  Local files hold objects with `instruction`/`prompt` and `output`/`response`/`chosen` fields.
  """
  if source == "alpaca_eval":
    root = shared_data_dir()
    path = root / "alpaca-eval" / "outputs.json.gz" if root else None
    if path is not None and path.exists():
      rows = json.loads(gzip.open(path, "rt", encoding="utf-8").read())
    else:
      import datasets

      rows = datasets.load_dataset("tatsu-lab/alpaca_eval", "alpaca_eval", split="eval")
  else:
    path = Path(source)
    if not path.exists():
      raise FileNotFoundError(f"pair source {source!r} is neither 'alpaca_eval' nor a file.")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
      text = fh.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [
        json.loads(line) for line in text.splitlines() if line.strip()]
  out = []
  for i, r in enumerate(rows):
    prompt = next((r[k] for k in ("instruction", "prompt") if k in r), None)
    response = next((r[k] for k in ("output", "response", "chosen") if k in r), None)
    if not isinstance(prompt, str) or not isinstance(response, str):
      raise ValueError(f"{source}: row {i} needs string 'instruction' and 'output' fields.")
    out.append((prompt, response))
    if n is not None and len(out) >= n:
      break
  return out
