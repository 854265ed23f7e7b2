"""A GSM8K verifier (outcome reward model) and best-of-n reranking (Cobbe et al. 2021).

Data: `gsm8k/example_model_solutions` (shared data; OpenAI's grade-school-math release): for each
of the 1319 test problems, four labelled solutions (GPT-3 6B and 175B, fine-tuned samples and
verifier-selected ones). Split by problem: problems [0, TRAIN_PROBLEMS) train the verifier,
[TRAIN_PROBLEMS, 1319) are held out, so no held-out question is seen in training.

Training is the `reward` algorithm (Bradley–Terry, `align.losses.reward`) on every (correct,
incorrect) pair of solutions of one training problem: a ranking objective, which is what
reranking needs (Cobbe et al. fit correctness itself with a per-token loss). The data source name
is "gsm8k-verifier" (`align.records.load_records`).

Held-out evaluation (`evaluate_best_of_n`): per problem, choose one of its n solutions and count
it correct by the dataset's label:
  verifier   the highest verifier score
  random     a uniform pick (its expectation: the problem's share of correct solutions)
  majority   the most common final answer (`decode.rewards.final_number`); ties shared uniformly,
             solutions without a number do not vote
  oracle     1 if any solution is correct
  best_source always the solution from the source with the best training-split accuracy
95% intervals: percentile bootstrap over problems (2000 resamples, seeded); the verifier minus
majority difference is bootstrapped paired, problem by problem.

Error taxonomy of a wrong pick (`error_kind`), first rule that applies:
  extraction  no final number, or the gold answer appears as a computed result (after "=" or
              in a <<...=v>> annotation) but is not the final answer
  arithmetic  some written calculation is false ("a op b = c" or <<expr=v>> with expr != v)
  reasoning   otherwise (every written step computes correctly, yet the answer is wrong)
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from decode.rewards import final_number, normalise_number
from lm.data import read_rows, shared_file

SOURCE_FILE = "gsm8k/example_model_solutions.jsonl.gz"
SOURCES = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
TRAIN_PROBLEMS = 1000
METHODS = ("verifier", "random", "majority", "oracle", "best_source")


def load_problems() -> list[dict]:
  """[{question, gold, solutions: [str] (SOURCES order), correct: [bool]}] for all 1319 problems."""
  path = shared_file(SOURCE_FILE)
  if path is None:
    raise FileNotFoundError(
        f"{SOURCE_FILE} not found under the shared data directory; set $POSTLAB_DATA to it (the "
        "file is grade_school_math/data/example_model_solutions.jsonl from openai/grade-school-math).")
  out = []
  for r in read_rows(path):
    out.append({"question": r["question"],
                "gold": final_number(r["ground_truth"]),
                "solutions": [r[s]["solution"] for s in SOURCES],
                "correct": [bool(r[s]["is_correct"]) for s in SOURCES]})
  return out


def training_pairs(split: str = "train") -> list[dict]:
  """Preference rows {prompt, chosen, rejected} ("triple" format): every (correct, incorrect)
  pair of solutions of each training problem. `split` is accepted for the loader's signature."""
  del split
  rows = []
  for p in load_problems()[:TRAIN_PROBLEMS]:
    good = [s for s, c in zip(p["solutions"], p["correct"]) if c]
    bad = [s for s, c in zip(p["solutions"], p["correct"]) if not c]
    rows.extend({"prompt": p["question"], "chosen": g, "rejected": b} for g in good for b in bad)
  return rows


def majority_correct(solutions: Sequence[str], correct: Sequence[bool]) -> float:
  """Expected correctness of majority voting over final answers (ties shared uniformly)."""
  answers = [final_number(s) for s in solutions]
  votes: dict[str, list[bool]] = {}
  for a, c in zip(answers, correct):
    if a is not None:
      votes.setdefault(a, []).append(c)
  if not votes:
    return float(np.mean(correct))
  top = max(len(v) for v in votes.values())
  winners = [v for v in votes.values() if len(v) == top]
  # solutions with the same final answer share one label up to the dataset's own grading
  return float(np.mean([np.mean(v) for v in winners]))


_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_INLINE = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*([+\-*/x×])\s*(\d[\d,]*(?:\.\d+)?)\s*=\s*\$?"
                     r"(-?\d[\d,]*(?:\.\d+)?)")
_SAFE = re.compile(r"^[\d.\s+\-*/()]+$")
# "3*4=<<3*4=12>>": the written expression before an annotation, which the annotation checks
_ANNOTATED = re.compile(r"[\d.\s+\-*/x×()$]*=\s*<<[^<>]*>>")


def _inline(solution: str) -> list[tuple[str, str, str, str]]:
  """Inline "a op b = c" calculations outside the annotated ones (each is checked once)."""
  return _INLINE.findall(_ANNOTATED.sub(" ", solution))


def _close(a: float, b: float) -> bool:
  return abs(a - b) <= 1e-6 * max(1.0, abs(b)) or abs(a - b) < 0.01


def _value(text: str) -> float | None:
  v = normalise_number(text.strip().rstrip("."))
  return None if v is None else float(v)


def false_calculations(solution: str) -> int:
  """How many written calculations are false: <<expr=v>> annotations and inline "a op b = c"."""
  bad = 0
  for expr, val in _ANNOTATION.findall(solution):
    v = _value(val)
    if v is None or not _SAFE.match(expr.replace(",", "")):
      continue
    try:
      got = eval(expr.replace(",", ""), {"__builtins__": {}}, {})  # digits and + - * / ( ) only
    except (SyntaxError, ZeroDivisionError, TypeError):
      continue
    bad += not _close(float(got), v)
  for a, op, b, c in _inline(solution):
    x, y, z = _value(a), _value(b), _value(c)
    if None in (x, y, z) or (op == "/" and y == 0):
      continue
    got = {"+": x + y, "-": x - y, "*": x * y, "x": x * y, "×": x * y, "/": x / y if y else 0}[op]
    bad += not _close(got, z)
  return bad


def error_kind(solution: str, gold: str) -> str:
  """"extraction", "arithmetic" or "reasoning" for a wrong solution; see the module docstring."""
  final = final_number(solution)
  if final is None:
    return "extraction"
  results = [normalise_number(v.strip().rstrip(".")) for _, v in _ANNOTATION.findall(solution)]
  results += [normalise_number(m[3]) for m in _inline(solution)]
  if gold in results and final != gold:
    return "extraction"
  if false_calculations(solution):
    return "arithmetic"
  return "reasoning"


def _bootstrap(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(values), size=(n, len(values)))
  means = values[idx].mean(axis=1)
  return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def evaluate_best_of_n(problems: Sequence[dict], scores: np.ndarray, best_source: int) -> dict:
  """Exact match per method with 95% bootstrap intervals, the paired verifier - majority
  difference, and the error taxonomy of the verifier's wrong picks. scores: `[P, n]`."""
  scores = np.asarray(scores, np.float64)
  pick = scores.argmax(axis=1)
  per = {
      "verifier": np.array([p["correct"][k] for p, k in zip(problems, pick)], np.float64),
      "random": np.array([np.mean(p["correct"]) for p in problems]),
      "majority": np.array([majority_correct(p["solutions"], p["correct"]) for p in problems]),
      "oracle": np.array([float(any(p["correct"])) for p in problems]),
      "best_source": np.array([float(p["correct"][best_source]) for p in problems]),
  }
  out = {"n_problems": len(problems), "n_candidates": int(scores.shape[1]),
         "best_source": SOURCES[best_source], "methods": {}}
  for name, v in per.items():
    lo, hi = _bootstrap(v)
    out["methods"][name] = {"exact_match": float(v.mean()), "ci95": [lo, hi]}
  diff = per["verifier"] - per["majority"]
  lo, hi = _bootstrap(diff, seed=1)
  out["verifier_minus_majority"] = {"diff": float(diff.mean()), "ci95": [lo, hi],
                                    "beats_majority": bool(lo > 0)}
  kinds = [error_kind(p["solutions"][k], p["gold"]) for p, k, ok in
           zip(problems, pick, per["verifier"]) if not ok]
  out["verifier_errors"] = {k: kinds.count(k) for k in ("extraction", "arithmetic", "reasoning")}
  out["picked_source_share"] = {s: float(np.mean(pick == i)) for i, s in enumerate(SOURCES)}
  return out


def score_problems(rm, tokenizer, problems: Sequence[dict], *, max_length: int,
                   batch_size: int = 16) -> np.ndarray:
  """Verifier scores `[P, n]` of each problem's solutions, encoded as the training pairs are (the
  question as a user turn, the solution as the reply, `align.encoding.encode_sft`)."""
  from align.encoding import encode_sft
  from lm import heads

  records = [{"prompt": [{"role": "user", "content": p["question"].strip()}],
              "response": s.strip()} for p in problems for s in p["solutions"]]
  examples, _ = encode_sft(records, tokenizer, max_length=max_length)
  rows = [ex["tokens"].tolist() for ex in examples]
  scores = heads.score_ids(rm, rows, batch_size=batch_size)
  return scores.reshape(len(problems), -1)


def _plot(result: dict, path) -> None:
  from lm.train.rundir import pyplot, save_figure

  plt = pyplot()
  names = list(result["methods"])
  em = [result["methods"][n]["exact_match"] for n in names]
  lo = [e - result["methods"][n]["ci95"][0] for n, e in zip(names, em)]
  hi = [result["methods"][n]["ci95"][1] - e for n, e in zip(names, em)]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.bar(names, em, yerr=[lo, hi], capsize=4,
         color=["C3" if n == "verifier" else "C0" for n in names])
  ax.set_ylabel("exact match (95% CI)")
  ax.set_title(f"best-of-{result['n_candidates']} on {result['n_problems']} held-out problems")
  ax.grid(axis="y", alpha=0.3)
  save_figure(fig, path, dpi=110)


def finish(config, model, tokenizer, eval_examples, run_dir) -> dict:
  """After training: best-of-n on the held-out problems (`verifier.n_eval_problems`, 0 = all
  319) into `verifier_eval.json`, a bar plot and a report section."""
  del eval_examples
  problems = load_problems()
  train = problems[:TRAIN_PROBLEMS]
  held_out = problems[TRAIN_PROBLEMS:]
  n_eval = int(config.verifier.n_eval_problems)
  held_out = held_out[:n_eval] if n_eval else held_out
  best_source = int(np.argmax([np.mean([p["correct"][i] for p in train])
                               for i in range(len(SOURCES))]))
  scores = score_problems(model, tokenizer, held_out, max_length=config.data.max_length,
                          batch_size=int(config.train.eval_batch_size))
  result = evaluate_best_of_n(held_out, scores, best_source)
  run_dir.write_json("verifier_eval.json", result)
  _plot(result, run_dir.plots / "best_of_n.png")
  rows = "\n".join(f"| {n} | {m['exact_match']:.4f} | [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}] |"
                   for n, m in result["methods"].items())
  d = result["verifier_minus_majority"]
  errors = ", ".join(f"{k} {v}" for k, v in result["verifier_errors"].items())
  md = (f"## Best-of-{result['n_candidates']} on held-out problems\n\n"
        f"{result['n_problems']} problems (from #{TRAIN_PROBLEMS}); exact match by the dataset's "
        "labels; 95% percentile bootstrap over problems.\n\n"
        "| method | exact match | 95% CI |\n|---|---|---|\n" + rows + "\n\n"
        f"Verifier − majority vote: {d['diff']:+.4f}, 95% CI [{d['ci95'][0]:+.4f}, "
        f"{d['ci95'][1]:+.4f}]: the verifier {'beats' if d['beats_majority'] else 'does not beat'}"
        f" majority vote. Best single source: `{result['best_source']}`.\n\n"
        f"Verifier's wrong picks by kind (rule in `align/verifier.py`): {errors}.\n\n"
        "![best_of_n](plots/best_of_n.png)\n")
  return {"best_of_n": result, "report_md": md}


def _algorithm():
  import dataclasses

  from align.losses import reward

  return dataclasses.replace(reward.ALGORITHM, name="verifier", finish=finish)


ALGORITHM = _algorithm()
