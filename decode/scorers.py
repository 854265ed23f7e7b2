"""One protocol for whatever scores a response: reward models, rule-based rewards, verifiers,
likelihood proxies.

A `Scorer` is called as TRL's `GRPOTrainer` calls a reward function, by keyword:
`scorer(prompts=..., completions=..., **columns)` (+ `completion_ids=` where the caller has the
token ids, as online RL does) -> one real number per completion, `nan` or `None` = "no score".
The prompts are plain instruction text, the completions as the model wrote them, the columns the
dataset's (e.g. `answer`), so a function written for TRL (`def f(completions, answer, **kwargs)`)
serves the decoding sweep, the reward-hacking probes and online RL's rewards unchanged. `score` is
the one place scores are checked.

  completions_only(fn)         a `texts -> scores` function as a Scorer;
  reward_model(rm, tokenizer)  an `lm.heads.RewardModel` scoring each (prompt, completion) as
                               one chat exchange, the layout it was trained on;
  load_reward_model(path)      the same, loaded from a reward run's directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from lm import heads, hub

Scorer = Callable[..., np.ndarray]
"""(*, prompts, completions, [completion_ids,] **columns) -> scores: K prompts and K completions
in, K real numbers out (a list with None for "no score" too); rule-based rewards read dataset
columns (`decode.rewards`)."""


def _name(scorer) -> str:
  return getattr(scorer, "__qualname__", None) or getattr(scorer, "__name__", None) or repr(scorer)


def score(scorer: Scorer, prompts: Sequence[str], completions: Sequence[str], *,
          batch_size: int = 32, columns: Mapping[str, Sequence] | None = None,
          completion_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
  """Scores of `completions` (each answering the prompt at its index), at most `batch_size` per
  call, the scorer called by keyword as TRL calls reward functions. `columns` (e.g. {"answer":
  [...]}, one entry per completion) and `completion_ids` (the completions' token ids) reach it
  as keyword arguments, sliced with each batch.

  Returns:
    [K] float64 scores in input order; nan and None scores come back nan (a scorer's "no score").

  Raises:
    ValueError, naming the scorer, if a call returns anything but one real score per completion,
    or returns +-inf; if prompts and completions differ in number; or if the scorer does not take
    its inputs by keyword.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  prompts, completions = list(prompts), list(completions)
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions; pass the prompt "
                     "of every completion (repeat a prompt for its several samples).")
  name = _name(scorer)
  columns = dict(columns or {})
  if completion_ids is not None:
    columns["completion_ids"] = [list(ids) for ids in completion_ids]
  for key, col in columns.items():
    if len(col) != len(completions):
      raise ValueError(f"column {key!r} has {len(col)} entries for {len(completions)} completions; "
                       "give one per completion.")
  out = []
  for start in range(0, len(completions), batch_size):
    batch = completions[start:start + batch_size]
    kw = {key: list(col[start:start + batch_size]) for key, col in columns.items()}
    where = f"scorer {name!r} on completions [{start}:{start + len(batch)}]"
    try:
      raw = scorer(prompts=prompts[start:start + batch_size], completions=batch, **kw)
    except TypeError as e:
      if "argument" not in str(e):
        raise
      raise ValueError(f"{where}: {e}. A scorer is called by keyword, as TRL calls reward "
                       f"functions: prompts=, completions=, the columns {sorted(kw)}; name its "
                       "parameters so and end them with **kwargs.") from e
    if isinstance(raw, (list, tuple)):  # TRL's list of floats, None = no score
      raw = [np.nan if v is None else v for v in raw]
    raw = np.asarray(raw)
    if raw.dtype == np.bool_ or not (np.issubdtype(raw.dtype, np.integer)
                                      or np.issubdtype(raw.dtype, np.floating)):
      raise ValueError(f"{where} returned dtype {raw.dtype}; expected real float scores")
    if raw.shape != (len(batch),):
      raise ValueError(f"{where} returned shape {raw.shape} for {len(batch)} completions; "
                       f"expected one score per completion, shape ({len(batch)},)")
    scores = raw.astype(np.float64)
    if np.isinf(scores).any():
      bad = np.flatnonzero(np.isinf(scores)) + start
      raise ValueError(f"{where} returned infinite scores at completion indices {bad.tolist()}; "
                       "expected finite or nan")
    out.append(scores)
  return np.concatenate(out) if out else np.zeros((0,), np.float64)


def completions_only(fn: Callable[[Sequence[str]], np.ndarray]) -> Scorer:
  """A `texts -> scores` function as a Scorer that reads the completions alone."""

  def scorer(prompts, completions, **kwargs):
    del prompts, kwargs
    return fn(completions)

  scorer.__qualname__ = _name(fn)
  return scorer


def reward_model(rm: heads.RewardModel, tokenizer, *, batch_size: int = 8,
                 max_response_tokens: int = 512) -> Scorer:
  """A reward model as a Scorer: each prompt as one user turn in the chat template and its
  completion as the assistant's reply through end-of-turn (`lm.hub.encode_pairs`, the layout of
  the preference pairs it was trained on), scored by `lm.heads.score_ids` in eval mode. A row
  longer than the model's `max_seq_len` loses the start of its prompt, as the preference data
  pipeline cuts them; the reply is kept."""

  def scorer(prompts, completions, **columns):
    del columns  # dataset columns (an online-RL task's answers) are not the model's inputs
    p_ids, r_ids = hub.encode_pairs(tokenizer, list(zip(prompts, completions)),
                                    max_response_tokens=max_response_tokens,
                                    max_length=int(rm.cfg.max_seq_len))
    return heads.score_ids(rm, [p + r for p, r in zip(p_ids, r_ids)], batch_size=batch_size)

  scorer.__qualname__ = "reward_model"
  return scorer


def load_reward_model(run_dir: str | Path, *, dtype: str = "float32", **kw) -> Scorer:
  """The reward model a `reward` run wrote to `run_dir` (its `adapter/` or `model/` with the head
  beside it), rebuilt by the one loader from the run's `config.json`, as a Scorer. `kw` go to
  `reward_model`."""
  run_dir = Path(run_dir)
  export = next((run_dir / sub for sub in ("adapter", "model")
                 if (run_dir / sub / heads.HEAD_FILE).is_file()), None)
  cfg_file = run_dir / "config.json"
  if export is None or not cfg_file.is_file():
    raise FileNotFoundError(f"{run_dir}: not a reward run's directory (config.json and adapter/ "
                            f"or model/ holding {heads.HEAD_FILE}); name the --workdir of a reward "
                            "run.")
  model_cfg = json.loads(cfg_file.read_text())["model"]
  if export.name == "model":
    rm, tok = hub.load(str(export), reward_head=export, dtype=dtype)
  elif model_cfg["preset"]:  # a random base (smoke runs): rebuilt from the run's seed
    rm, tok = hub.load(preset=model_cfg["preset"], tokenizer=model_cfg["tokenizer"], dtype=dtype,
                       seed=model_cfg["seed"], adapter=export, reward_head=export)
  else:
    rm, tok = hub.load(model_cfg["name"], adapter=export, reward_head=export, dtype=dtype)
  return reward_model(rm, tok, **kw)
