"""Losses registered by name: each is `loss_fn(model, batch, cfg) -> (loss, metrics)`.

The trainer looks a loss up here and knows nothing else about the algorithm. A batch is a dict of
arrays from `align.data`; `cfg` is the loss's own ConfigDict section (β, variant, margin, ...).
"""

from __future__ import annotations

from typing import Callable

LossFn = Callable[..., tuple]
_LOSSES: dict[str, LossFn] = {}


def register(name: str):
  def wrap(fn: LossFn) -> LossFn:
    if name in _LOSSES:
      raise ValueError(f"loss {name!r} is registered twice")
    _LOSSES[name] = fn
    return fn

  return wrap


def get(name: str) -> LossFn:
  from align.losses import dpo, grpo, ppo, reward, sft  # noqa: F401  (registers)

  if name not in _LOSSES:
    raise ValueError(f"loss {name!r} is unknown; registered: {sorted(_LOSSES)}")
  return _LOSSES[name]
