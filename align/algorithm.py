"""One record per training algorithm: what the `train` task needs beyond the generic trainer.

Each algorithm module (`align/losses/sft.py`, `reward.py`, `dpo.py`, ...) defines `ALGORITHM`, and
a config names that module in `config.algorithm`; `align.train` runs whatever it names, with no
per-algorithm branches. Adding GRPO means one new module with its loss, batch builder and record,
and one config.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An algorithm as the `train` task runs it.

  name: short name for reports and plots.
  loss: `loss_fn(model, batch, loss_cfg) -> (loss, metrics)`.
  data_kind: the record kind `align.data.build` makes ("sft" | "preference"), or "rollouts".
  plotted: metrics plotted per step (train and eval) and reported start vs end.
  check: `check(config)` raises a clear error for settings the algorithm cannot run.
  wrap: `wrap(model, config) -> model`, e.g. a reward head on the decoder.
  trainable: `trainable(filter) -> filter`, e.g. adding the reward head to what trains.
  transform_train: `transform_train(config, model) -> (examples -> examples) | None`, applied to
    the padded training examples before batching (e.g. reference log-probs scored once).
  prepare_eval: `prepare_eval(config, model, examples) -> examples` for held-out examples.
  arrange: `arrange(config, train_ds, eval_batches, mesh) -> (train_ds, eval_batches, stats)`,
    a batch layout planned over the run (e.g. DPO's shared prompts).
  export: `export(model, path)` writes what the algorithm adds beyond the decoder's weights.
  finish: `finish(config, model, tokenizer, eval_examples, run_dir) -> dict` after training
    (eval mode): extra outputs of the run, returned into its summary.
  make_batch_for: online RL: the trainer's batches come from rollouts of the policy it trains
    (`align.online.setup`), not from `align.data`; `make_batch_for(config, trainer)(width,
    pad_id)` is the algorithm's `make_batch(rollout, total, each, rollout_index)` (advantages and
    training rows of a rollout) at the run's static row width.
  """

  name: str
  loss: Callable[..., tuple]
  data_kind: str
  plotted: tuple[str, ...]
  check: Callable[[Any], None] | None = None
  wrap: Callable[..., Any] | None = None
  trainable: Callable[[Any], Any] | None = None
  transform_train: Callable[..., Any] | None = None
  prepare_eval: Callable[..., list] | None = None
  arrange: Callable[..., tuple] | None = None
  export: Callable[..., None] | None = None
  finish: Callable[..., dict] | None = None
  make_batch_for: Callable[..., Callable] | None = None


def load(module: str) -> Algorithm:
  """The `ALGORITHM` record of a module named by a config (`config.algorithm`)."""
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ValueError(f"config.algorithm={module!r} is not an importable module ({e}); name one "
                     "such as 'align.losses.dpo'.") from e
  algo = getattr(mod, "ALGORITHM", None)
  if not isinstance(algo, Algorithm):
    raise ValueError(f"config.algorithm={module!r} defines no ALGORITHM record "
                     "(align.algorithm.Algorithm); name the module that holds the algorithm.")
  return algo


def refuse_shared_prompt(config, name: str) -> None:
  """`check` for algorithms whose batches have no shared-prompt layout."""
  if config.data.share_prompt:
    raise ValueError(f"data.share_prompt is DPO's pair layout; {name} does not use it. Set "
                     "--config.data.share_prompt=false.")
