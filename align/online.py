"""Online RL on the one trainer: task prompts, the rollout stream that feeds the trainer, and the
held-out evaluation by rollouts.

A step of GRPO (or PPO) is: the step's prompts -> `decode.rollout.rollout` with the current policy
(eval mode, so no LoRA dropout while sampling) -> rewards (`decode.rewards.combine`, each logged
apart) -> the algorithm's `make_batch` (advantages and the training rows) -> `Trainer.train_step`.
`RolloutStream` is the trainer's data iterator, so `Trainer.fit` runs online RL as it runs SFT:
same checkpoints, metrics, evals and `--resume`.

Determinism: the prompts of rollout g and its sampling seed are functions of (seed, g), so a run
resumed from a checkpoint at step k (which holds the policy that sampled rollout k) repeats the
uninterrupted run. With μ > 1 inner iterations a rollout is reused for μ steps; checkpoints then
fall on rollout boundaries (`check_config`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from decode import metrics
from decode import rewards as reward_fns
from decode.rollout import Rollout, pad_id_of, rollout
from decode.sampling import GREEDY, Sampler
from lm import data, heads, hub
from lm.data import read_rows, shared_file

log = logging.getLogger(__name__)

TASKS = ("arith", "gsm8k", "instructions")
_GSM8K = {"train": "gsm8k/train.jsonl.gz", "test": "gsm8k/test.jsonl.gz"}


@dataclasses.dataclass
class Prompts:
  """A task's prompts: the user turns, their chat-template ids, and dataset columns (e.g. the gold
  `answer`) that reward functions receive, one entry per prompt."""

  texts: list[str]
  ids: list[list[int]]
  columns: dict[str, list]

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, index) -> "Prompts":
    index = [int(i) for i in index]
    return Prompts([self.texts[i] for i in index], [self.ids[i] for i in index],
                   {k: [v[i] for i in index] for k, v in self.columns.items()})


def _gsm8k_rows(split: str) -> list[dict]:
  path = shared_file(_GSM8K[split])
  if path is not None:
    return read_rows(path)
  import datasets

  return datasets.load_dataset("openai/gsm8k", "main", split=split).to_list()


def load_prompts(prompts_cfg, tokenizer) -> tuple[Prompts, Prompts, dict]:
  """(train prompts, held-out prompts, stats) of `prompts_cfg.name`:

  arith  `decode.rewards.arith_task` problems (seeded by prompts.seed, operands up to
         prompts.max_operand), de-duplicated; the last n_eval are held out, so no held-out prompt
         is trained on.
  gsm8k  the GSM8K train split for training (first n_train), the test split held out (first
         n_eval); `../shared/data/gsm8k` offline, `openai/gsm8k` by name otherwise.
  instructions  open-ended instructions of `lm.data.load_instructions(prompts.source)` (no gold
         answer: for a reward model); the first prompts.skip_first are left out (align_eval's
         prompts), the last n_eval are held out, n_train are taken from what lies between.
  Prompts longer than prompts.max_prompt_tokens are left out and counted.
  """
  name = prompts_cfg.name
  n_train, n_eval = int(prompts_cfg.n_train), int(prompts_cfg.n_eval)
  if name == "arith":
    problems = reward_fns.arith_task(8 * (n_train + n_eval), prompts_cfg.seed,
                                     max_operand=prompts_cfg.max_operand)
    unique = list({p["prompt"]: p for p in problems}.values())
    if len(unique) < n_train + n_eval:
      raise ValueError(f"prompts.max_operand={prompts_cfg.max_operand} gives only {len(unique)} "
                       f"distinct problems for n_train + n_eval = {n_train + n_eval}; raise it.")
    train_rows, eval_rows = unique[:n_train], unique[len(unique) - n_eval:]
  elif name == "gsm8k":
    as_rows = lambda rows: [{"prompt": r["question"], "answer": r["answer"]} for r in rows]
    train_rows = as_rows(_gsm8k_rows("train")[:n_train])
    eval_rows = as_rows(_gsm8k_rows("test")[:n_eval])
  elif name == "instructions":
    texts = data.load_instructions(prompts_cfg.source)
    skip = int(prompts_cfg.skip_first)
    if skip + n_train + n_eval > len(texts):
      raise ValueError(f"prompts: skip_first={skip} + n_train={n_train} + n_eval={n_eval} exceeds "
                       f"the {len(texts)} instructions of {prompts_cfg.source!r}; lower n_train.")
    rows = [{"prompt": t, "answer": None} for t in texts]
    train_rows, eval_rows = rows[skip:skip + n_train], rows[len(rows) - n_eval:]
  else:
    raise ValueError(f"prompts.name={name!r} is unknown; choose one of {TASKS}.")
  limit = int(prompts_cfg.max_prompt_tokens) or None
  system = prompts_cfg.system or None
  suffix = prompts_cfg.prompt_suffix
  stats = {"task": name, "max_prompt_tokens": limit}

  def encode(rows, split):
    texts, ids, answers = [], [], []
    for r in rows:
      text = r["prompt"] + suffix
      x = hub.encode_chat(tokenizer, text, system=system)
      if limit and len(x) > limit:
        continue
      texts.append(text)
      ids.append(x)
      answers.append(r["answer"])
    stats[f"n_{split}"] = len(texts)
    stats[f"dropped_{split}"] = len(rows) - len(texts)
    if not texts:
      raise ValueError(f"task {name!r} left no {split} prompts (prompts.n_{split}={len(rows)}, "
                       f"prompts.max_prompt_tokens={limit}); raise the limit or the count.")
    return Prompts(texts, ids, {"answer": answers})

  train, held_out = encode(train_rows, "train"), encode(eval_rows, "eval")
  stats["longest_prompt"] = max(len(x) for x in train.ids + held_out.ids)
  return train, held_out, stats


def sampler_of(rollout_cfg) -> Sampler:
  """The rollout's sampler: temperature, top-k, top-p from `config.rollout`."""
  return Sampler(temperature=rollout_cfg.temperature, top_k=rollout_cfg.top_k,
                 top_p=rollout_cfg.top_p)


def reward_functions(config) -> tuple[dict[str, Callable], dict[str, float]]:
  """(name -> reward function, name -> weight) from `config.rewards` (name: weight),
  `config.reward_functions` (name: import path `module:attr`, for functions not registered in
  `decode.rewards`, e.g. written for TRL) and `config.reward_args` (name: keyword arguments,
  e.g. length_penalty's limit, or a factory's)."""
  if not config.rewards:
    raise ValueError("config.rewards is empty; name at least one reward with its weight, e.g. "
                     "--config.rewards.arith_correct=1.0.")
  paths, fns = config.reward_functions, {}
  for name in config.rewards:
    kw = dict(config.reward_args.get(name, {}))
    fns[name] = reward_fns.load(paths[name], **kw) if name in paths else reward_fns.get(name, **kw)
  return fns, {name: float(w) for name, w in config.rewards.items()}


def rollout_stats(ro: Rollout, texts: list[str], total, each: dict) -> dict[str, float]:
  """Per-rollout diagnostics: reward mean/std (total and per function), response length (tokens,
  the end-of-turn counted) mean/median, share empty (no text besides the end-of-turn), share
  truncated (hit max_new_tokens), and the policy's entropy per token estimated from its own samples
  (mean of -log π_T(y_t) over sampled tokens: unbiased when temperature is the only filter)."""
  lengths = np.asarray(ro.lengths_b, np.float64)
  mask = np.arange(ro.policy_logprobs_bt.shape[1])[None] < lengths[:, None]
  st = metrics.response_stats(lengths, texts, list(ro.finish))
  out = {"reward": float(np.mean(total)), "reward_std": float(np.std(total)),
         "length_mean": st["mean"], "length_median": st["median"],
         "empty_share": st["empty_share"], "truncated_share": st["truncated_share"],
         "entropy": float(-(ro.policy_logprobs_bt * mask).sum() / max(mask.sum(), 1))}
  for name, s in each.items():
    out[f"reward/{name}"] = float(np.nanmean(s)) if np.isfinite(s).any() else float("nan")
    out[f"reward_std/{name}"] = float(np.nanstd(s)) if np.isfinite(s).any() else float("nan")
  return out


class RolloutStream:
  """The trainer's data iterator for online RL; see the module docstring.

  make_batch(rollout, total_rewards [N], each_reward {name: [N]}, rollout_index=g) ->
  (batch, metrics): the algorithm's advantages and training rows (`align.losses.grpo` and
  `align.losses.ppo` `make_batch_for`). rewards: `reward_functions(config)`.
  State: {"step": k}, saved in every checkpoint by `Trainer.fit`.
  """

  def __init__(self, trainer, tokenizer, prompts: Prompts, config,
               make_batch: Callable[..., tuple[dict, dict]], rewards: tuple[dict, dict]):
    self.trainer, self.tokenizer, self.prompts = trainer, tokenizer, prompts
    self.cfg = config.rollout
    self.fns, self.weights = rewards
    self.make_batch = make_batch
    self.sampler = sampler_of(self.cfg)
    self.per_step = int(self.cfg.prompts_per_step)
    self.group = int(self.cfg.num_generations)
    self.mu = int(self.cfg.num_iterations)
    self.seed = int(self.cfg.seed)
    self.step = 0
    self._cache: tuple[int, dict, dict] | None = None
    self._metrics: dict = {}

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])
    self._cache = None

  def __iter__(self):
    return self

  def prompt_index(self, g: int) -> np.ndarray:
    """The prompts of rollout g: consecutive slices of a per-epoch seeded permutation."""
    n = len(self.prompts)
    start = g * self.per_step
    out = []
    while len(out) < self.per_step:
      epoch, offset = divmod(start + len(out), n)
      perm = np.random.default_rng([self.seed, epoch]).permutation(n)
      out.extend(perm[offset:offset + self.per_step - len(out)].tolist())
    return np.asarray(out)

  def _rollout(self, g: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    chosen = self.prompts.take(self.prompt_index(g))
    seed = int(np.random.SeedSequence([self.seed, g]).generate_state(1)[0] >> 1)
    ro = rollout(heads.backbone(self.trainer.host_model()), chosen.ids,
                 max_new_tokens=self.cfg.max_new_tokens,
                 tokenizer=self.tokenizer, sampler=self.sampler, num_samples=self.group, seed=seed)
    t1 = time.perf_counter()
    texts = ro.texts(self.tokenizer)
    rows = ro.prompt_index_b
    columns = {k: [v[i] for i in rows] for k, v in chosen.columns.items()}
    total, each = reward_fns.combine(self.fns, self.weights, [chosen.texts[i] for i in rows],
                                     texts, columns, completion_ids=ro.sequences())
    batch, metrics = self.make_batch(ro, total, each, rollout_index=g)
    t2 = time.perf_counter()
    metrics.update(rollout_stats(ro, texts, total, each))
    metrics.update({"time/rollout_s": t1 - t0, "time/scoring_s": t2 - t1,
                    "rollout_tokens_per_s": float(np.sum(ro.lengths_b)) / (t1 - t0)})
    return batch, metrics

  def __next__(self) -> dict:
    g, inner = divmod(self.step, self.mu)
    if inner == 0 or self._cache is None or self._cache[0] != g:
      batch, metrics = self._rollout(g)
      self._cache = (g, batch, metrics)
      self._metrics = dict(metrics)
    else:  # an inner iteration on the same rollout: no new samples, nothing re-timed
      self._metrics = {k: v for k, v in self._cache[2].items() if not k.startswith("time/")}
    self._metrics["inner_iteration"] = inner
    self.step += 1
    return self._cache[1]

  def pop_metrics(self) -> dict:
    out, self._metrics = self._metrics, {}
    return out


def held_out_eval(trainer, tokenizer, prompts: Prompts, config, rewards: tuple[dict, dict]
                  ) -> Callable[[], dict]:
  """`evaluate()` for `Trainer.fit`: one completion per held-out prompt (greedy unless
  config.eval.sample, then the rollout's sampler at a fixed seed), scored by the training rewards
  (`reward_functions(config)`); reward per function, success share, and length statistics."""
  fns, weights = rewards
  eval_cfg = config.eval
  sampler = sampler_of(config.rollout) if eval_cfg.sample else GREEDY
  batch_size = int(eval_cfg.batch_size) or None

  def evaluate() -> dict:
    ro = rollout(heads.backbone(trainer.host_model()), prompts.ids,
                 max_new_tokens=config.rollout.max_new_tokens,
                 tokenizer=tokenizer, sampler=sampler, seed=int(eval_cfg.seed),
                 batch_size=batch_size)
    texts = ro.texts(tokenizer)
    total, each = reward_fns.combine(fns, weights, prompts.texts, texts, prompts.columns,
                                     completion_ids=ro.sequences())
    stats = rollout_stats(ro, texts, total, each)
    if sampler is GREEDY:  # argmax tokens say nothing about the policy's entropy
      del stats["entropy"]
    return stats

  return evaluate


def check_config(config) -> None:
  """Clear errors for rollout settings that cannot run, before the model loads."""
  r, t = config.rollout, config.train
  rows = int(r.prompts_per_step) * int(r.num_generations)
  if int(t.batch_size) != rows:
    raise ValueError(f"train.batch_size={t.batch_size} must equal rollout.prompts_per_step x "
                     f"rollout.num_generations = {rows} (one training row per completion).")
  mu = int(r.num_iterations)
  if mu < 1:
    raise ValueError(f"rollout.num_iterations={mu} must be >= 1.")
  for field in ("checkpoint_every", "steps"):
    value = int(t[field])
    if mu > 1 and value % mu:
      raise ValueError(f"train.{field}={value} must be a multiple of rollout.num_iterations={mu}: "
                       "a checkpoint inside a rollout's inner iterations could not resume it.")
  if float(config.loss.temperature) != float(r.temperature):
    raise ValueError(f"loss.temperature={config.loss.temperature} differs from "
                     f"rollout.temperature={r.temperature}: the trainer scores at the sampling "
                     "temperature. Set both to the same value.")
  if config.prompts.name not in TASKS:
    raise ValueError(f"prompts.name={config.prompts.name!r} is unknown; choose one of {TASKS}.")


def batch_width(stats: dict, max_new_tokens: int, multiple: int = 8) -> int:
  """The static row width of every training batch: longest prompt + max_new_tokens, rounded up."""
  need = int(stats["longest_prompt"]) + int(max_new_tokens)
  return -(-need // multiple) * multiple


def batch_builder(make_batch: Callable[..., tuple[dict, dict]]) -> Callable[[int, int], Callable]:
  """`make_batch_for(width, pad_id)` for `setup` from an algorithm's
  `make_batch(rollout, total, each, rollout_index=0, *, width, pad_id) -> (batch, metrics)`: the
  row width and pad id are the run's, known once the prompts and tokenizer are loaded."""
  return lambda width, pad_id: functools.partial(make_batch, width=width, pad_id=pad_id)


def setup(config, trainer, tokenizer, make_batch_for: Callable[[int, int], Callable]
          ) -> tuple[RolloutStream, Callable[[], dict], dict[str, Any]]:
  """(stream, evaluate, data stats) for `align.train`: `make_batch_for(width, pad_id)` gives the
  algorithm's batch builder at the run's static width."""
  train, held_out, stats = load_prompts(config.prompts, tokenizer)
  width = batch_width(stats, config.rollout.max_new_tokens)
  stats.update(source=config.prompts.name, seq_len=width, n_train=len(train), n_eval=len(held_out))
  rewards = reward_functions(config)  # once: a reward model loads its weights
  stream = RolloutStream(trainer, tokenizer, train, config,
                         make_batch_for(width, pad_id_of(tokenizer)), rewards)
  return stream, held_out_eval(trainer, tokenizer, held_out, config, rewards), stats


def compile_only(config, trainer, tokenizer, make_batch_for: Callable[[int, int], Callable],
                 topology: str) -> tuple[dict, dict]:
  """(a training batch of the largest shape a step can meet, the `lm.train.aot.report` of the
  rollout's decoding program) for `launch.py --compile_only`, no data read and no weights:
  rollout.prompts_per_step prompts of prompts.max_prompt_tokens tokens (at most what the model's
  context leaves beside the completions), each with
  rollout.num_generations completions of rollout.max_new_tokens, through the algorithm's own
  `make_batch` (an abstract trainer scores zeros) and `decode.engine.compile_generate` on the
  trainer's abstract policy."""
  from decode.engine import PROMPT_MULTIPLE, compile_generate
  from lm.train import aot, flops

  r = config.rollout
  n, group, new = int(r.prompts_per_step), int(r.num_generations), int(r.max_new_tokens)
  policy = heads.backbone(trainer.model)
  policy.eval()
  room = (policy.cfg.max_seq_len - new) // PROMPT_MULTIPLE * PROMPT_MULTIPLE
  longest = min(int(config.prompts.max_prompt_tokens) or room, room)
  pad = pad_id_of(tokenizer)
  zeros = np.zeros((n * group, new), np.float32)
  ro = Rollout(tokens_bt=np.full((n * group, new), pad, np.int32), logprobs_bt=zeros,
               sample_logprobs_bt=zeros, policy_logprobs_bt=zeros,
               lengths_b=np.full(n * group, new, np.int32), finish_b=np.zeros(n * group, np.int32),
               prompts=[[pad] * longest] * n, prompt_index_b=np.repeat(np.arange(n), group))
  width = batch_width({"longest_prompt": longest}, new)
  batch, _ = make_batch_for(width, pad)(ro, np.zeros(n * group), {}, rollout_index=0)
  compiled = compile_generate(policy, n, longest, max_new_tokens=new,
                              eos_ids=hub.stop_ids(tokenizer), pad_id=pad, mesh=trainer.mesh,
                              sampler=sampler_of(r), num_samples=group)
  # forward FLOPs (a third of training's) of the prompts once and every sampled token; every
  # weight read once per decoded token
  per_token = flops.flops_per_token(policy.cfg, longest + new).total / 3
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(policy)))
  program = aot.report(compiled, topology=topology, mesh=trainer.mesh,
                       model_flops=per_token * (n * longest + n * group * new),
                       model_bytes=weight_bytes * (new + 1))
  program.update(prompts=n, samples_per_prompt=group, prompt_tokens=longest, max_new_tokens=new)
  return batch, program


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
  return [(r["step"], float(r[key])) for r in records
          if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]


def trend(values, window: int = 10) -> dict[str, float]:
  """First `window` vs last `window` values: means, standard errors (ddof 1) and
  z = (last - first) / sqrt(se_first² + se_last²); and the least-squares slope over all values
  (per index), its standard error (residual variance with n - 2 degrees of freedom) and
  t = slope / se. The windows compare ends; the slope uses every rollout, so a series that rises
  before it falls (PPO's value loss follows the returns' variance) is judged on its whole course."""
  v = np.asarray(values, np.float64)
  w = min(window, len(v) // 2)
  if w < 2:
    return {"window": w}
  a, b = v[:w], v[-w:]
  se_a, se_b = a.std(ddof=1) / np.sqrt(w), b.std(ddof=1) / np.sqrt(w)
  spread = np.hypot(se_a, se_b)
  x = np.arange(len(v)) - (len(v) - 1) / 2
  slope = float(x @ (v - v.mean()) / (x @ x))
  resid = v - v.mean() - slope * x
  slope_se = float(np.sqrt(resid @ resid / (len(v) - 2) / (x @ x)))
  return {"window": w, "first_mean": float(a.mean()), "first_se": float(se_a),
          "last_mean": float(b.mean()), "last_se": float(se_b),
          "diff": float(b.mean() - a.mean()),
          "z": float((b.mean() - a.mean()) / spread) if spread > 0 else float("nan"),
          "slope": slope, "slope_se": slope_se,
          "slope_t": slope / slope_se if slope_se > 0 else float("nan")}


def finish(config, model, tokenizer, eval_examples, run_dir) -> dict:
  """After an online run: trends of the training reward (and PPO's value loss and explained
  variance) over the first vs last 10 rollouts (the first inner iteration of each: the critic on
  fresh samples), from the whole `metrics.jsonl` (a resumed run counts every step), held-out start vs end, and the median step time split; into `rl_summary.json`
  and a report section."""
  del model, tokenizer, eval_examples
  import json

  records = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
  # one value per rollout: its first inner iteration (μ > 1 refits the same rollout after it)
  records = [r for r in records if not r.get("train/inner_iteration")]
  series = {name: [v for _, v in _series(records, f"train/{name}")]
            for name in ("reward", "value_loss", "explained_variance")}
  trends = {name: trend(values) for name, values in series.items() if values}
  evals = _series(records, "eval/reward")
  times = {name: float(np.median([v for _, v in _series(records, key)] or [np.nan]))
           for name, key in (("rollout_s", "train/time/rollout_s"),
                             ("scoring_s", "train/time/scoring_s"),
                             ("update_s", "train/step_s"))}
  out = {"trends": trends, "eval_reward_start": evals[0][1] if evals else float("nan"),
         "eval_reward_end": evals[-1][1] if evals else float("nan"), "median_step_time": times}
  run_dir.write_json("rl_summary.json", out)
  lines = ["## Trends (one value per rollout: first vs last rollouts ± standard error, and the "
           "least-squares slope over all of them)\n"]
  for name, t in trends.items():
    if "z" in t:
      lines.append(
          f"Training {name}, first {t['window']} rollouts {t['first_mean']:.4f} ± "
          f"{t['first_se']:.4f}, last {t['window']} rollouts {t['last_mean']:.4f} ± "
          f"{t['last_se']:.4f}: difference {t['diff']:+.4f}, z = {t['z']:.2f}; slope "
          f"{t['slope']:+.3g} ± {t['slope_se']:.2g} per rollout, t = {t['slope_t']:.2f}.\n")
  lines.append(f"Held-out reward (greedy unless eval.sample) {out['eval_reward_start']:.3f} at "
               f"step 0 → {out['eval_reward_end']:.3f} at the end.\n")
  lines.append("Median step time: rollout {rollout_s:.2f} s, rewards and batch {scoring_s:.3f} s, "
               "update {update_s:.2f} s.\n".format(**times))
  out["report_md"] = "\n".join(lines)
  return out
