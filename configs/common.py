"""What every config shares, and the checks launch.py runs before a task.

`header` starts a config: its task, its variant (refused by name unless it is one of the module's)
and the device mesh. `check_fields` refuses a config that lacks a field its task reads, naming the
field and the config module that holds its default; `schema_of` names that module.
`check_values` refuses a value no run can use (a number outside the range RULES gives its field,
or a type other than the schema's), naming the field, the value and what is allowed.
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
FREE_FORM = ("rewards", "reward_functions", "reward_args", "train.lr_multipliers",
             "model.overrides", "stages.*.overrides")


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


class Rule:
  """What a field's values may be. `text` says it in errors ("an integer >= 1"); `ok(value,
  section)` checks a number (the field's own `section` lets a rule read a sibling field);
  `none(section)` says whether None passes where the schema's default is not None."""

  def __init__(self, text: str, ok, none=None):
    self.text, self.ok, self.none = text, ok, none or (lambda section: False)


def _number(value) -> bool:
  """A finite int or float; a bool is neither."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and -float("inf") < value < float("inf"))  # NaN fails both comparisons


def _int(low: int, *, none: str = "") -> Rule:
  """An integer >= `low`; `none`: what None means, where it may be None."""
  text = f"an integer >= {low}" + (f", or None ({none})" if none else "")
  return Rule(text, lambda v, s: isinstance(v, int) and not isinstance(v, bool) and v >= low,
              (lambda s: True) if none else None)


def _num(low=None, high=None, *, closed: str = "[]", none: str = "") -> Rule:
  """A finite number above `low` and below `high` (None: unbounded), `closed` saying which ends
  are included ("[]", "[)", "(]", "()")."""
  above = (lambda v: True) if low is None else (
      (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low))
  below = (lambda v: True) if high is None else (
      (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high))
  if low is None and high is None:
    text = "a finite number"
  elif high is None:
    text = f"a number {'>=' if closed[0] == '[' else '>'} {low}"
  elif low is None:
    text = f"a number {'<=' if closed[1] == ']' else '<'} {high}"
  else:
    text = f"a number in {closed[0]}{low}, {high}{closed[1]}"
  text += f", or None ({none})" if none else ""
  return Rule(text, lambda v, s: _number(v) and above(v) and below(v),
              (lambda s: True) if none else None)


_MESH = Rule("an integer >= 1, or -1 (every device the other axes leave)",
             lambda v, s: isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1))
# k3 = e^{log r} - log r - 1 overflows float32 past log r ~ 88: the clamp on log r keeps it
# finite; k1 and k2 are finite without one.
_KL_CLAMP = Rule(
    "a number in (0, 80] (log r is clipped to [-kl_clamp, kl_clamp] before exp), or None with "
    "kl_estimator k1 or k2 only (k3 overflows float32 unclamped)",
    lambda v, s: _number(v) and 0 < v <= 80,
    lambda s: _lookup(s, "kl_estimator") in ("k1", "k2"))

# Field-name pattern -> what its values may be; the first pattern that matches a field wins.
# A pattern is the last dotted components of a field's name ("lr" matches train.lr and viz.lr,
# "train.steps" only that), `*` matching any run of characters within a component; "TASK:" in
# front limits it to that task. A list's elements follow the list's rule (train.lrs[0] is "lrs");
# the fields of sections in a list are named through it (settings[1].n_features is
# "settings.n_features"). Every numeric field of every config variant has a rule (tested).
RULES = (
    # how long, how often
    ("train.steps", _int(1)),
    ("epochs", _int(1)),
    ("usae:*_every", _int(1)),  # sae/experiment.py logs and saves at step % every == 0
    ("*_every", _int(0)),  # 0: never (the trainer still evaluates and saves at the last step)
    ("warmup_steps", _int(0)),
    ("stall_steps", _int(0)),  # 0: off
    ("spike_warmup", _int(0)),
    ("keep_checkpoints", _int(1)),
    ("eval_batches", _int(0)),  # 0: all
    ("chunks", _int(1)),
    ("viz.steps", _int(0)),  # 0: no activation maximisation
    # batches
    ("eval.batch_size", _int(0)),  # GRPO/PPO: 0 = the decoder's default
    ("*batch_size", _int(1)),
    ("batch", _int(1)),
    ("*_batch", _int(1)),
    ("batch_rows", _int(1)),
    ("grad_accum", _int(1)),
    # the optimizer
    ("lr", _num(0, closed="()")),
    ("lrs", _num(0, closed="()")),
    ("b1", _num(0, 1, closed="[)")),
    ("b2", _num(0, 1, closed="[)")),
    ("eps", _num(0, closed="()")),
    ("weight_decay", _num(0)),
    ("grad_clip", _num(0)),  # 0: no clipping
    ("max_grad_norm", _num(0)),
    ("min_lr_ratio", _num(0, 1)),
    ("spike_factor", _num(0)),  # 0: off
    ("spike_ema", _num(0, 1, closed="[)")),
    # seeds and counts of them
    ("settings.seeds", _int(1)),
    ("seed", _int(0)),
    ("seeds", _int(0)),
    # LoRA (align_eval's stand_in_lora too)
    ("*lora.rank", _int(0)),
    ("*lora.alpha", _num(0, closed="()")),
    ("lora.dropout", _num(0, 1, closed="[)")),
    ("stand_in_lora.b_std", _num(0)),
    # the device mesh
    ("mesh.*", _MESH),
    # sampling
    ("top_p", _num(0, 1, closed="(]")),
    ("top_k", _int(0)),  # 0: off
    ("loss.temperature", _num(0, closed="()")),  # log-probs are scored at it
    ("kl.temperature", _num(0, closed="()")),
    ("temperature", _num(0)),  # 0: greedy
    ("temperatures", _num(0)),
    # data
    ("data.n", _int(1, none="every row")),
    ("n_eval", _int(0)),
    ("max_length", _int(1)),
    ("max_prompt_length", _int(1, none="max_length alone")),
    ("pad_multiple", _int(0)),  # 0: pad to max_length
    ("share_prompt_width", _int(0)),  # 0: planned from the data
    ("num_epochs", _int(1, none="repeat forever")),
    ("seq_len", _int(1)),
    ("skip_first", _int(0)),
    ("*_per_class", _int(1)),
    ("*_seqs", _int(1)),
    ("val_fraction", _num(0, 1, closed="()")),
    # prompts and rollouts
    ("prompts.n", _int(1)),
    ("n_train", _int(1)),
    ("max_operand", _int(1)),
    ("max_prompt_tokens", _int(0)),  # 0: no limit
    ("prompts_per_step", _int(1)),
    ("num_generations", _int(1)),
    ("max_new_tokens", _int(1)),
    ("num_iterations", _int(1)),
    ("adv_eps", _num(0)),
    ("adv_ddof", _int(0)),
    ("critic_warmup", _int(0)),
    ("overlong_buffer", _int(0)),  # 0: off
    ("overlong_factor", _num(0)),
    # losses
    ("loss.beta", _num(0)),  # 0: no KL (DPO refuses 0 itself)
    ("hacking.beta", _num(0, closed="()")),
    ("kl_clamp", _KL_CLAMP),
    ("kl_coef", _num(0)),
    ("eps_low", _num(0, 1, closed="()")),
    ("eps_high", _num(0, none="eps_low")),
    ("dual_clip", _num(1, closed="()", none="off")),
    ("cliprange", _num(0, closed="()")),
    ("cliprange_value", _num(0, closed="()")),
    ("vf_coef", _num(0)),
    ("gamma", _num(0, 1, closed="(]")),
    ("lam", _num(0, 1, closed="(]")),
    ("label_smoothing", _num(0, 0.5, closed="[)")),
    ("margin", _num(0)),
    ("center_coef", _num(0)),
    ("z_loss", _num(0)),
    ("max_completion_length", _int(1, none="no constant normaliser")),
    # evaluations
    ("hacking.n", _int(1, none="every prompt")),
    ("max_response_tokens", _int(1)),
    ("max_tokens", _int(1)),
    ("max_chars", _int(1)),
    ("pairs_n", _int(1)),
    ("window", _int(1)),
    ("windows", _int(1)),
    ("stride", _int(1)),
    ("text_tokens", _int(1)),
    ("n_tokens", _int(1)),
    ("context", _int(1)),
    ("dense_first", _int(0)),
    ("sinks", _int(0)),
    ("analysis.n_sequences", _int(1)),
    ("analysis.local", _int(1)),
    ("sink_rate_sequences", _int(1)),
    ("sample_tokens", _int(0)),  # 0: no sample
    ("score_multiple", _int(1)),
    ("word_limit", _int(1)),
    ("n_eval_problems", _int(0)),  # 0: all
    ("gsm8k_n", _int(0)),
    ("n_lines", _int(0)),
    ("wikitext_tokens", _int(0)),  # 0: all
    ("report_pairs", _int(0)),
    # decoding sweeps
    ("num_samples", _int(1)),
    ("num_beams", _int(1)),
    ("length_penalty", _num()),
    ("repeat_ngram_block", _int(0)),  # 0: off
    ("repeat_threshold", _int(1)),
    # models
    ("vocab_multiple", _int(1)),
    ("sources.layer", _int(0)),
    # sparse autoencoders
    ("n_latents", _int(1)),
    ("usae.k", _int(1)),
    ("aux_coef", _num(0)),
    ("auxk_coef", _num(0)),
    ("dead_after", _int(1)),
    ("eval.tau", _num(0)),
    ("eval.universal", _num(0, 1)),
    ("eval.specific", _num(0, 1)),
    ("viz.concepts", _int(1)),
    ("viz.top_images", _int(1)),
    ("viz.size", _int(1)),
    ("viz.jitter", _int(0)),
    ("viz.blur_every", _int(0)),  # 0: no blur
    ("viz.blur_sigma", _num(0)),
    # toy models of superposition
    ("n_features", _int(1)),
    ("n_hidden", _int(1)),
    ("instances", _int(1)),
    ("sparsity_base", _num(1)),
    ("importance_decay", _num(0, closed="()")),
    ("settings.grid", _int(1)),
    ("importance_min", _num(0, closed="()")),
    ("importance_max", _num(0, closed="()")),
    ("density_min", _num(0, 1, closed="(]")),
    ("settings.checks", _num(0, closed="()")),  # (relative importance, density) pairs
)


def _component_match(pattern: str, name: str) -> bool:
  head, star, tail = pattern.partition("*")
  if not star:
    return pattern == name
  return len(name) >= len(head) + len(tail) and name.startswith(head) and name.endswith(tail)


def rule_for(name: str, task: str | None = None) -> Rule | None:
  """The rule of the field `name` (dotted, list indices left out) of a `task` config; None where
  no pattern of RULES matches."""
  parts = name.split(".")
  for pattern, rule in RULES:
    scope, _, pattern = pattern.rpartition(":")
    if scope and scope != task:
      continue
    want = pattern.split(".")
    if len(want) <= len(parts) and all(
        _component_match(p, n) for p, n in zip(want, parts[-len(want):])):
      return rule
  return None


def _leaves(value, path: str = "", name: str = "", section=None, reference=None,
            declared=None):
  """(path, name, value, section, reference, declared) of every leaf under `value`: its path
  with list indices, its name for the rules (without them), the section holding it, the
  schema's value of the same field (None where the schema lacks it or it sits in a list) and, for
  a None, the type its ConfigDict declares. Free-form sections are left out."""
  if _is_section(value):
    if _free_form(name):
      return
    for key in value:
      child = value[key]
      ref = reference[key] if _is_section(reference) and key in reference else None
      typed = (value.get_type(key) if child is None and isinstance(value, ml_collections.ConfigDict)
               else None)
      yield from _leaves(child, f"{path}.{key}" if path else key,
                         f"{name}.{key}" if name else key, value, ref, typed)
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      yield from _leaves(item, f"{path}[{i}]", name, section)
  else:
    yield path, name, value, section, reference, declared


def _type_name(t: type) -> str:
  return {int: "an int", float: "a float", bool: "a bool", str: "a str"}.get(t, t.__name__)


def _type_ok(value, want: type) -> bool:
  if want is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if want is int:
    return isinstance(value, int) and not isinstance(value, bool)
  return isinstance(value, want)


def numeric_fields(config) -> list[tuple[str, str]]:
  """(path, name for the rules) of every number in `config` and of every None its ConfigDict
  declares a number (a placeholder); free-form sections are left out."""
  return [(path, name) for path, name, value, _, _, declared in _leaves(config)
          if isinstance(value, float) or _number(value) or declared in (int, float)]


def schema_default(config):
  """The default variant of `config`'s schema module (`schema_of`); None where it has none."""
  schema = schema_of(config)
  if schema is None:
    return None
  # the builtin import function: this module imports nothing but ml_collections
  module = __import__(schema.removesuffix(".py").replace("/", "."), fromlist=["get_config"])
  return module.get_config()


def check_values(config, where: str, reference=None) -> None:
  """Refuses `config` (from `where`, e.g. "configs/mine.py:cpu") when a field holds a value its
  run cannot use, before anything starts: a number outside its rule's range (RULES), or a value
  whose type differs from the field's in the task's schema (`reference`, by default
  `schema_default(config)`: an int passes where a float is expected, a bool never passes for a
  number). None passes where the schema's field is None (a placeholder) or the rule allows it.
  One ValueError with a line per bad field: "config WHERE: FIELD=VALUE is out of range; must
  be ...".
  """
  if reference is None:
    reference = schema_default(config)
  schema, task = schema_of(config), _lookup(config, "task")
  bad = []
  for path, name, value, section, ref, _ in _leaves(config, reference=reference):
    rule = rule_for(name, task)
    shown = f"config {where}: {path}={value!r}"
    if value is None:
      if ref is not None and not (rule is not None and rule.none(section)):
        bad.append(f"{shown} is not allowed ({schema} has {ref!r}); must be "
                   f"{rule.text if rule is not None else _type_name(type(ref))}")
      continue
    want = type(ref) if ref is not None else None
    if want in (int, float, bool, str) and not _type_ok(value, want):
      bad.append(f"{shown} is {_type_name(type(value))}, not {_type_name(want)} as in {schema}; "
                 f"must be {rule.text if rule is not None else _type_name(want)}")
    elif rule is None or want is str:
      continue
    elif not _number(value):
      bad.append(f"{shown} is not a number; must be {rule.text}")
    elif not rule.ok(value, section):
      bad.append(f"{shown} is out of range; must be {rule.text}")
  if bad:
    raise ValueError("\n".join(bad))
