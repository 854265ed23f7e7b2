"""What every config shares, and the check launch.py runs before a task.

`header` starts a config: its task, its variant (refused by name unless it is one of the module's)
and the device mesh. `check_fields` refuses a config that lacks a field its task reads, naming the
field and the config module that holds its default; `schema_of` names that module.
Like every config module this imports nothing but ml_collections.
"""

import ml_collections


def variant_of(arg: str | None, variants, what: str, default: str = "cpu") -> str:
  """`arg` (None: `default`), refused unless it is one of `variants`."""
  variant = arg or default
  if variant not in variants:
    raise ValueError(f"unknown {what} variant {variant!r}; use one of {', '.join(variants)}.")
  return variant


def mesh() -> ml_collections.ConfigDict:
  """The device mesh (lm.sharding.make_mesh): fsdp takes every device data and tensor leave."""
  return ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})


def header(task: str, arg: str | None, variants, default: str = "cpu",
           what: str | None = None) -> ml_collections.ConfigDict:
  """A config's first fields: `task` (launch.py's TASKS), `variant` (`arg` checked against
  `variants`; `what` names them in the error, default the task) and `mesh`."""
  c = ml_collections.ConfigDict()
  c.task = task
  c.variant = variant_of(arg, variants, what or task, default)
  c.mesh = mesh()
  return c


# task -> the config module whose default variant is the task's schema: every field the task
# reads, at its default. Where the schema follows a field of the config: (field, value -> module);
# a value with no module here (an algorithm of your own) is not checked.
SCHEMAS = {
    "quickstart": "configs/quickstart.py",
    "decode_sweep": "configs/decode_sweep.py",
    "pretrain": "configs/pretrain.py",
    "sinks": "configs/sinks.py",
    "pipeline": "configs/pipeline.py",
    "align_eval": "configs/align_eval.py",
    "toy_superposition": "configs/toy_superposition.py",
    "usae": ("data.dataset", {"cifar10": "configs/usae_vision.py",
                              "wikitext-2": "configs/sae_lm.py"}),
    "train": ("algorithm", {"align.losses.sft": "configs/sft.py",
                            "align.losses.reward": "configs/reward.py",
                            "align.losses.dpo": "configs/dpo.py",
                            "align.losses.grpo": "configs/grpo.py",
                            "align.losses.ppo": "configs/ppo.py",
                            "align.verifier": "configs/verifier.py"}),
}
# Sections whose keys are the user's to choose (name -> value), not fields: never checked.
FREE_FORM = ("rewards", "reward_args", "train.lr_multipliers", "model.overrides",
             "stages.*.overrides")


def _lookup(config, path: str):
  for name in path.split("."):
    if not _is_section(config) or name not in config:
      return None
    config = config[name]
  return config


def schema_of(config) -> str | None:
  """The config module (path) whose default variant is `config`'s schema; None: unchecked."""
  schema = SCHEMAS.get(_lookup(config, "task"))
  if isinstance(schema, tuple):
    field, modules = schema
    return modules.get(_lookup(config, field))
  return schema


def _is_section(value) -> bool:
  return isinstance(value, (ml_collections.ConfigDict, dict))


def _free_form(path: str) -> bool:
  parts = path.split(".")
  return any(len(p) == len(parts) and all(a in ("*", b) for a, b in zip(p, parts))
             for p in (f.split(".") for f in FREE_FORM))


def missing_fields(config, reference, prefix: str = "") -> list[tuple[str, object]]:
  """(dotted name, reference value) of every field of `reference` that `config` lacks; fields
  `config` has beyond them are allowed."""
  out = []
  for name, want in reference.items():
    path = prefix + name
    if not _is_section(config) or name not in config:
      out.append((path, want))
    elif _is_section(want) and not _free_form(path):
      out += missing_fields(config[name], want, path + ".")
  return out


def check_fields(config, reference, where: str, schema: str) -> None:
  """Refuses `config` (from `where`, e.g. "configs/mine.py:cpu") when it lacks a field of
  `reference` (the default variant of `schema`, the module the task's fields live in)."""
  missing = missing_fields(config, reference)
  if missing:
    task = _lookup(config, "task")
    raise ValueError("\n".join(
        f"config {where} lacks field {name}, which task {task} reads (default {_shown(value)} in "
        f"{schema}); add it" for name, value in missing))


def _shown(value) -> str:
  return repr(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)
