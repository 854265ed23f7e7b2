"""Orbax checkpoints of model state (+ optimizer state, step, data-iterator state), atomic, last N kept.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. Restores take an abstract target so arrays come
back with the target's dtypes and shardings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _abstract(tree):
  """ShapeDtypeStructs (keeping shardings) for a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree,
  )


class Checkpointer:
  """Save/restore `model` (+ `opt_state`, `extra` JSON such as data-iterator state) by step."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = False):
    self.directory = Path(directory).absolute()
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            create=True,
            enable_async_checkpointing=async_save,
        ),
    )

  @property
  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def save(self, step: int, model: nnx.Module | nnx.State, *, opt_state: Any = None,
           extra: dict | None = None, force: bool = False) -> bool:
    """Save at `step`; returns False where the save interval skips it."""
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    items = {"model": ocp.args.StandardSave(nnx.to_pure_dict(state))}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    items["extra"] = ocp.args.JsonSave(dict(extra or {}, step=int(step)))
    saved = self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)
    self._mgr.wait_until_finished()
    return saved

  def restore(self, model: nnx.Module | nnx.State, *, step: int | None = None,
              opt_state: Any = None) -> tuple[Any, dict]:
    """Restore into `model` (a module, or an `nnx.State` such as the trainable part) in place,
    and an opt_state like the one given; returns `(opt_state, extra)`.

    `opt_state` may be a concrete or abstract (ShapeDtypeStruct) pytree used as the target.
    """
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; train first or drop --resume.")
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    items = {
        "model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(state))),
        "extra": ocp.args.JsonRestore(),
    }
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(**items))
    nnx.replace_by_pure_dict(state, restored["model"])
    if not isinstance(model, nnx.State):
      nnx.update(model, state)
    return (restored["opt_state"] if opt_state is not None else None), dict(restored["extra"])

  def save_tree(self, step: int, tree: Any, *, extra: dict | None = None,
                force: bool = False) -> bool:
    """Save a plain pytree of arrays (e.g. the SAE trainers' state dicts) at `step`."""
    items = {"tree": ocp.args.StandardSave(tree),
             "extra": ocp.args.JsonSave(dict(extra or {}, step=int(step)))}
    saved = self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)
    self._mgr.wait_until_finished()
    return saved

  def restore_tree(self, target: Any, *, step: int | None = None) -> tuple[Any, dict]:
    """`(tree, extra)` saved by `save_tree`, with `target`'s structure, dtypes and shardings."""
    step = self.latest_step if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; train first or drop --resume.")
    restored = self._mgr.restore(int(step), args=ocp.args.Composite(
        tree=ocp.args.StandardRestore(_abstract(target)), extra=ocp.args.JsonRestore()))
    return restored["tree"], dict(restored["extra"])

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
