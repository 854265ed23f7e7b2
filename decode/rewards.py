"""Rule-based rewards for online RL and evaluation, as Scorers with dataset columns.

Each reward is `fn(prompts, completions, **columns) -> [K]`, called by keyword as TRL calls reward
functions (the columns are the dataset's, e.g. `answer`, plus `completion_ids` in online RL),
checked by `decode.scorers.score`. `combine` sums
several with weights and keeps each one's scores for logging.

  gsm8k_correct   1 if the final number of the completion equals the `answer` column, else 0
                  (`final_number`: "#### n", then "answer is n" / "A: n", then the last number;
                  commas and signs handled). A completion with no number earns 0: the empty
                  answer is never correct (a substring match would reward it).
  arith_correct   the same rule, registered under the `arith` task's name: the final number
                  counts, so "51 - 47 = 4" is right and "85 or 86" is judged by 86.
  number_only     1 if the completion is one integer and nothing else.
  length_penalty  -max(0, tokens over `limit`) / limit, on whitespace-split words.
  reward_model    a trained reward model (`get("reward_model", run_dir=...)`: the `reward` run's
                  adapter and score head, loaded back by `decode.scorers.load_reward_model`).
`arith_task(n, seed)` makes the seeded synthetic task: "What is 37 + 48? Reply with the number
only." with operands of 1-2 digits and + or -.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Mapping, Sequence

import numpy as np

from decode import scorers

_NUMBER = r"[-+−]?\d[\d,]*(?:\.\d+)?"
_MARKED = (re.compile(r"####\s*(" + _NUMBER + ")"),
           re.compile(r"(?:answer is|A:)\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE))


def normalise_number(text: str) -> str | None:
  """'1,234' -> '1234', '−5' -> '-5', '+3' -> '3', '12.0' -> '12', '12.50' -> '12.5'."""
  t = text.replace(",", "").replace("−", "-").lstrip("+").rstrip(".")
  try:
    value = float(t)
  except ValueError:
    return None
  return str(int(value)) if value == int(value) else repr(value)


def final_number(completion: str) -> str | None:
  """The completion's answer: after "####", else after "answer is" / "A:" (the last such mark),
  else its last number; None when it holds no number."""
  for pattern in _MARKED:
    found = pattern.findall(completion)
    if found:
      return normalise_number(found[-1])
  found = re.findall(_NUMBER, completion)
  return normalise_number(found[-1]) if found else None


def _answers(answer, k: int) -> list[str | None]:
  if answer is None or len(answer) != k:
    raise ValueError(f"this reward needs the dataset's `answer` column, one per completion ({k}); "
                     "pass columns={'answer': [...]} to decode.scorers.score.")
  return [normalise_number(str(a).split("####")[-1].strip()) for a in answer]


def gsm8k_correct(prompts, completions, answer=None, **columns) -> np.ndarray:
  del prompts, columns
  gold = _answers(answer, len(completions))
  return np.array([float(g is not None and final_number(c) == g)
                   for c, g in zip(completions, gold)])


def number_only(prompts, completions, **columns) -> np.ndarray:
  del prompts, columns
  return np.array([float(re.fullmatch(r"\s*[-−]?\d+\s*\.?\s*", c) is not None)
                   for c in completions])


def length_penalty(limit: int) -> Callable:
  def length_penalty(prompts, completions, **columns) -> np.ndarray:
    del prompts, columns
    return np.array([-max(0, len(c.split()) - limit) / limit for c in completions])

  return length_penalty


REWARDS: dict[str, Callable] = {
    "gsm8k_correct": gsm8k_correct, "arith_correct": gsm8k_correct, "number_only": number_only}


def get(name: str, **kw) -> Callable:
  """A registered reward by name; `length_penalty` takes `limit=`; `reward_model` takes
  `run_dir=` (a `reward` run's --workdir, loaded by `decode.scorers.load_reward_model`)."""
  if name == "length_penalty":
    return length_penalty(**kw)
  if name == "reward_model":
    if "run_dir" not in kw:
      raise ValueError("the reward_model reward needs run_dir= (config.reward_args.reward_model"
                       ".run_dir: the --workdir of a reward run).")
    return scorers.load_reward_model(**kw)
  if name not in REWARDS:
    raise ValueError(f"reward {name!r} is unknown; registered: "
                     f"{sorted(REWARDS) + ['length_penalty', 'reward_model']}")
  return REWARDS[name]


def load(path: str, **kw) -> Callable:
  """A reward function named by import path, `module:attr` (or `module.attr`), such as one written
  for TRL (`def f(completions, answer, **kwargs)`) or one of `trl.rewards`. With keyword
  arguments, `attr` is a factory called with them (TRL's `get_soft_overlong_punishment(
  max_completion_len=..., soft_punish_cache=...)`); without, it is the reward function itself."""
  import importlib

  module, sep, attr = path.partition(":")
  if not sep:
    module, _, attr = path.rpartition(".")
  if not module or not attr:
    raise ValueError(f"reward function {path!r}: name it as module:attribute, e.g. "
                     "my_rewards:correctness or trl.rewards:think_format_reward.")
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.append(os.getcwd())  # a module beside the user's config, as `python -m` would find
  try:
    obj = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"reward function {path!r} cannot be imported ({type(e).__name__}: {e}); the "
                     "module must be importable from the working directory or the environment."
                     ) from None
  fn = obj(**kw) if kw else obj
  if not callable(fn):
    raise ValueError(f"reward function {path!r} is a {type(fn).__name__}, not a callable.")
  return fn


def combine(rewards: Mapping[str, Callable], weights: Mapping[str, float], prompts: Sequence[str],
            completions: Sequence[str], columns: Mapping[str, Sequence] | None = None,
            completion_ids: Sequence[Sequence[int]] | None = None
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(Σ_name weight · scores `[K]`, each reward's own scores by name), each reward called by
  keyword (`decode.scorers.score`: prompts, completions, completion_ids, the columns). A nan score
  (a reward's "no score") counts as 0 in the sum and stays nan in its own scores."""
  missing = set(rewards) - set(weights)
  if missing:
    raise ValueError(f"no weight for rewards {sorted(missing)}; give every reward a weight.")
  each = {name: scorers.score(fn, prompts, completions, columns=columns,
                              completion_ids=completion_ids)
          for name, fn in rewards.items()}
  total = sum(weights[n] * np.nan_to_num(s, nan=0.0) for n, s in each.items())
  return np.asarray(total, np.float64), each


def arith_task(n: int, seed: int, *, max_operand: int = 99) -> list[dict]:
  """`n` seeded problems {prompt, answer}: "What is a + b? Reply with the number only." (a, b in
  1..max_operand; '-' keeps the result >= 0)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    a, b = (int(x) for x in rng.integers(1, max_operand + 1, size=2))
    if rng.random() < 0.5:
      out.append({"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)})
    else:
      a, b = max(a, b), min(a, b)
      out.append({"prompt": f"What is {a} - {b}? Reply with the number only.", "answer": str(a - b)})
  return out
