"""Orbax checkpoints of model state (+ optimizer state, step, data-iterator state), atomic, last N
kept, each verified before it is trusted.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. Restores take an abstract target so arrays come
back with the target's dtypes and shardings.

After a save completes, the primary process writes `digest.json` into the step's directory (so it
is garbage-collected with its step): the sha256 and size of every file of the step, whether the
saved state was all finite, and `bad` once the trainer learns that the state led to a non-finite
loss or a stall. A restore without a step takes the newest step whose files match its digest and
that is neither bad nor non-finite, logging one line per step it skips; a step without a digest
(an older postlab's, or a save killed between Orbax's rename and the digest) is unverified: taken,
with a warning, only when no verified step is left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from lm import sharding
from lm.train.rundir import write_text_atomic

log = logging.getLogger(__name__)

DIGEST = "digest.json"  # in each step's directory, beside Orbax's files


class CheckpointError(ValueError):
  """A checkpoint that cannot be trusted or restored; the message names the step and why."""


@dataclasses.dataclass(frozen=True)
class StepCheck:
  """What a step's digest says of it: `state` is "intact", "unverified" (no digest), "damaged"
  (files differ from the digest) or "bad" (marked bad, or non-finite); `why` says what was found."""
  step: int
  state: str
  why: str = ""


def _abstract(tree):
  """ShapeDtypeStructs (keeping shardings) for a pytree of arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree,
  )


@jax.jit
def _finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
  """Whether every floating-point array of `tree` is finite (in a multi-process run every process
  must call it: the reduction is a collective)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return bool(sharding.host_array(_finite(leaves))) if leaves else True


def _sha256(path: Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _files(step_dir: Path) -> dict[str, int]:
  """Relative path -> size of every file of a step's directory, the digest itself left out."""
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = Path(root) / name
      rel = path.relative_to(step_dir).as_posix()
      if rel not in (DIGEST, DIGEST + ".tmp"):
        out[rel] = path.stat().st_size
  return out


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
    return sorted(self._mgr.all_steps())

  def step_dir(self, step: int) -> Path:
    """The directory of `step` (Orbax's default step naming, which these options keep)."""
    return self.directory / str(int(step))

  def _save(self, step: int, items: dict, force: bool, finite: bool) -> bool:
    saved = self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)
    self._mgr.wait_until_finished()
    if saved and jax.process_index() == 0:
      self._write_digest(step, {"finite": bool(finite), "bad": None, "files": {
          rel: {"size": size, "sha256": _sha256(self.step_dir(step) / rel)}
          for rel, size in sorted(_files(self.step_dir(step)).items())}})
    return saved

  def save(self, step: int, model: nnx.Module | nnx.State, *, opt_state: Any = None,
           extra: dict | None = None, force: bool = False, finite: bool | None = None) -> bool:
    """Save at `step`; returns False where the save interval skips it. `finite`: whether the
    model state is all finite, when the caller knows (else it is computed) for the digest."""
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    pure = nnx.to_pure_dict(state)
    items = {"model": ocp.args.StandardSave(pure)}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    items["extra"] = ocp.args.JsonSave(dict(extra or {}, step=int(step)))
    return self._save(step, items, force, all_finite(pure) if finite is None else finite)

  def save_tree(self, step: int, tree: Any, *, extra: dict | None = None,
                force: bool = False) -> bool:
    """Save a plain pytree of arrays (e.g. the SAE trainers' state dicts) at `step`."""
    items = {"tree": ocp.args.StandardSave(tree),
             "extra": ocp.args.JsonSave(dict(extra or {}, step=int(step)))}
    return self._save(step, items, force, all_finite(tree))

  def _write_digest(self, step: int, digest: dict) -> None:
    write_text_atomic(self.step_dir(step) / DIGEST,
                      json.dumps({"step": int(step), **digest}, indent=1))

  def _read_digest(self, step: int) -> dict | None:
    """The step's digest; None when it has none; raises ValueError when it does not parse."""
    path = self.step_dir(step) / DIGEST
    if not path.exists():
      return None
    return json.loads(path.read_text())

  def mark_bad(self, step: int, reason: str) -> None:
    """Record in the step's digest that its state must not be resumed from, and why (the primary
    process writes it; a step without a digest gets one that says only this)."""
    if jax.process_index() != 0:
      return
    try:
      digest = self._read_digest(step)
    except ValueError:
      digest = None
    if not isinstance(digest, dict):
      digest = {"finite": None, "files": None}
    digest["bad"] = reason
    self._write_digest(step, {k: v for k, v in digest.items() if k != "step"})

  def check(self, step: int, *, hash_files: bool = True) -> StepCheck:
    """Whether `step` can be trusted: its digest against its files (sizes always, contents when
    `hash_files`), its finiteness and its bad mark."""
    step_dir = self.step_dir(step)
    try:
      digest = self._read_digest(step)
    except ValueError:
      digest = []
    if digest is not None and not (isinstance(digest, dict)
                                   and isinstance(digest.get("files") or {}, dict)):
      return StepCheck(step, "damaged", f"its {DIGEST} does not parse")
    if digest is None:
      return StepCheck(step, "unverified",
                       f"no {DIGEST}: its save did not complete, or an older postlab wrote it")
    if digest.get("bad"):
      return StepCheck(step, "bad", f"marked bad because {digest['bad']}")
    if digest.get("finite") is False:
      return StepCheck(step, "bad", "it holds non-finite values")
    for rel, want in (digest.get("files") or {}).items():
      path = step_dir / rel
      if not path.is_file():
        return StepCheck(step, "damaged", f"file missing: {rel}")
      size = path.stat().st_size
      if size != want["size"]:
        return StepCheck(step, "damaged", f"{rel} is {size} bytes, its digest says "
                         f"{want['size']} (truncated or overwritten)")
      if hash_files and _sha256(path) != want["sha256"]:
        return StepCheck(step, "damaged", f"digest mismatch in {rel}")
    return StepCheck(step, "intact")

  def _pick(self, *, hash_files: bool, quiet: bool) -> int | None:
    """The newest intact step, else the newest unverified one; unless `quiet`, a line for each
    step passed over, and an error listing every step and why when neither exists (quiet: None)."""
    passed, chosen = [], None
    for step in reversed(self.all_steps()):
      c = self.check(step, hash_files=hash_files)
      if c.state == "intact":
        chosen = c
        break
      passed.append(c)
    if chosen is None:
      chosen = next((p for p in passed if p.state == "unverified"), None)
    if quiet:
      return None if chosen is None else chosen.step
    self.warn_cut_off()
    if chosen is None:
      raise CheckpointError(
          f"no intact checkpoint in {self.directory}: "
          + "; ".join(f"step {p.step}: {p.why}" for p in passed)
          + ". Start a new run (a new --workdir).")
    for p in passed:
      if p is not chosen:
        log.warning("checkpoint step %d in %s skipped: %s", p.step, self.directory, p.why)
    if chosen.state == "unverified":
      log.warning("no verified checkpoint in %s; restoring step %d unverified (%s)",
                  self.directory, chosen.step, chosen.why)
    return chosen.step

  def cut_off(self) -> list[Path]:
    """Saves that never completed: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and
    renames it when done, so these are never among `all_steps`."""
    if not self.directory.is_dir():
      return []
    return sorted(p for p in self.directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)

  def warn_cut_off(self) -> None:
    """One line naming each save that never completed (`cut_off`), which a resume skips."""
    for path in self.cut_off():
      log.warning("checkpoint %s was cut off mid-write (Orbax's temporary directory, never "
                  "renamed into place): skipped", path)

  def newest_good(self) -> int | None:
    """The step a restore without a step would take (sizes checked, contents not hashed), or None;
    what error messages name as the last good checkpoint."""
    return self._pick(hash_files=False, quiet=True)

  def choose(self, step: int | None = None) -> int:
    """The step a restore reads: `step` itself once verified (refused by name when damaged or
    bad), or the newest intact one (see `_pick`)."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}; train first or drop --resume.")
    if step is None:
      return self._pick(hash_files=True, quiet=False)
    if int(step) not in steps:
      raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; its steps are "
                            f"{steps}.")
    c = self.check(int(step))
    if c.state in ("damaged", "bad"):
      raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be resumed from: "
                            f"{c.why}. Its steps are {steps}; drop --resume_step to take the "
                            "newest intact one.")
    if c.state == "unverified":
      log.warning("checkpoint step %d in %s is unverified (%s); restoring it", c.step,
                  self.directory, c.why)
    return int(step)

  def _restore(self, step: int, items: dict) -> dict:
    try:
      return self._mgr.restore(int(step), args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001 - Orbax's errors run to many lines; the first says what
      first = (str(e).strip().splitlines() or [""])[0][:300]
      raise CheckpointError(f"checkpoint step {step} in {self.directory} passed its checks but "
                            f"could not be restored: {type(e).__name__}: {first}") from None

  def restore(self, model: nnx.Module | nnx.State, *, step: int | None = None,
              opt_state: Any = None) -> tuple[Any, dict]:
    """Restore into `model` (a module, or an `nnx.State` such as the trainable part) in place,
    and an opt_state like the one given; returns `(opt_state, extra)`. `step` None: the newest
    intact step (`choose`); `extra["step"]` says which.

    `opt_state` may be a concrete or abstract (ShapeDtypeStruct) pytree used as the target.
    """
    step = self.choose(step)
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    items = {
        "model": ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(state))),
        "extra": ocp.args.JsonRestore(),
    }
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
    restored = self._restore(step, items)
    nnx.replace_by_pure_dict(state, restored["model"])
    if not isinstance(model, nnx.State):
      nnx.update(model, state)
    return (restored["opt_state"] if opt_state is not None else None), dict(restored["extra"])

  def restore_tree(self, target: Any, *, step: int | None = None) -> tuple[Any, dict]:
    """`(tree, extra)` saved by `save_tree`, with `target`'s structure, dtypes and shardings;
    `step` as in `restore`."""
    step = self.choose(step)
    restored = self._restore(step, {"tree": ocp.args.StandardRestore(_abstract(target)),
                                    "extra": ocp.args.JsonRestore()})
    return restored["tree"], dict(restored["extra"])

  def discard_after(self, step: int) -> list[int]:
    """Delete the steps after `step` (a run resumed from `step` writes its own); returns them."""
    later = [s for s in self.all_steps() if s > step]
    for s in later:
      self._mgr.delete(s)
    if later:
      log.info("removed checkpoints %s of %s: the run continues from step %d", later,
               self.directory, step)
    return later

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
