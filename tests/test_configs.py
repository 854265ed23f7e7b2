"""Every config variant builds, unknown variants are refused by name, every variant has the fields
its task reads and a config that lacks one is refused at start-up naming it, every numeric field
has a range rule that every variant passes and a bad value or type is refused naming the field,
the value and the range, and the stability study's runs point at each other: the GRPO runs read
the reward model the study trains, align_eval reads the adapters the study writes, and no GRPO run
trains on align_eval's prompts."""

import importlib
import subprocess

import ml_collections
import pytest

from configs import align_eval, common, dpo, grpo, ppo
from tests_helpers import REPO, launch_cmd, launch_env

VARIANTS = {
    "align_eval": ["smoke", "cpu", "standin", "gpu_full", "stability", "stability_gpu"],
    "decode_sweep": ["smoke", "cpu", "gpu_full"],
    "dpo": ["smoke", "cpu", "gpu_full", "tpu_pod"],
    "grpo": ["smoke", "cpu", "gpu_full", *grpo.STUDY],
    "pipeline": ["smoke", "cpu", "gpu_full"],
    "ppo": ["smoke", "cpu", "gpu_full"],
    "pretrain": ["smoke", "cpu_char", "cpu_char256", "cpu", "gpu_full", "tpu_pod"],
    "quickstart": ["smoke", "cpu", "gpu_full"],
    "reward": ["smoke", "cpu", "gpu_full"],
    "sae_lm": ["smoke", "cpu", "gpu_full"],
    "sft": ["smoke", "cpu", "gpu_full"],
    "sinks": ["smoke", "cpu", "ours", "gpu_full"],
    "toy_superposition": ["smoke", "cpu", "gpu_full"],
    "usae_vision": ["smoke", "cpu", "gpu_full"],
    "verifier": ["smoke", "cpu", "gpu_full"],
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_builds_and_an_unknown_one_is_named(name):
  module = importlib.import_module(f"configs.{name}")
  assert list(module.VARIANTS) == VARIANTS[name]  # what `launch.py --list` shows
  for variant in VARIANTS[name]:
    config = module.get_config(variant)
    assert config.task, (name, variant)
  with pytest.raises(ValueError, match="nonsense"):
    module.get_config("nonsense")


def _module(path: str):
  return importlib.import_module(path.removesuffix(".py").replace("/", "."))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_has_the_fields_its_task_reads(name):
  """The check launch.py runs passes every shipped variant: its schema (the task's config
  module's default variant) holds no field the variant lacks."""
  module = importlib.import_module(f"configs.{name}")
  for variant in VARIANTS[name]:
    config = module.get_config(variant)
    schema = common.schema_of(config)
    assert schema is not None, (name, variant)
    common.check_fields(config, _module(schema).get_config(), f"configs/{name}.py:{variant}",
                        schema)


def test_a_missing_field_is_refused_by_name_and_extra_fields_are_allowed(tmp_path):
  config = dpo.get_config("cpu")
  config.my_note = "extra fields are the user's"
  common.check_fields(config, dpo.get_config(), "configs/mine.py:cpu", "configs/dpo.py")
  del config.train["grad_accum"]
  want = ("config configs/mine.py:cpu lacks field train.grad_accum, which task train reads "
          "(default 1 in configs/dpo.py); add it")
  with pytest.raises(ValueError) as e:
    common.check_fields(config, dpo.get_config(), "configs/mine.py:cpu", "configs/dpo.py")
  assert str(e.value) == want
  # launch.py runs the check before the task (and before JAX starts)
  mine = tmp_path / "mine.py"
  mine.write_text("from configs import dpo\n"
                  "def get_config(arg=None):\n"
                  "  c = dpo.get_config(arg)\n"
                  "  del c.train['grad_accum']\n"
                  "  return c\n")
  r = subprocess.run(launch_cmd(f"--config={mine}:cpu", f"--workdir={tmp_path}/w"),
                     cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and want.replace("configs/mine.py", str(mine)) in r.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_numeric_field_has_a_rule_and_every_variant_passes_it(name):
  """A new numeric field cannot slip past check_values: every number (and numeric placeholder) of
  every variant matches a pattern of common.RULES, and every shipped variant passes the check."""
  module = importlib.import_module(f"configs.{name}")
  for variant in VARIANTS[name]:
    config = module.get_config(variant)
    uncovered = [path for path, field in common.numeric_fields(config)
                 if common.rule_for(field, config.task) is None]
    assert not uncovered, (name, variant, uncovered)
    common.check_values(config, f"configs/{name}.py:{variant}")


# (field, bad value, what the message says is allowed)
BAD_VALUES = [
    ("train.steps", -1, "must be an integer >= 1"),
    ("train.lr", -0.01, "must be a number > 0"),
    ("train.lr", 0.0, "must be a number > 0"),
    ("train.batch_size", 0, "must be an integer >= 1"),
    ("train.grad_accum", 0, "must be an integer >= 1"),
    ("train.eval_every", -1, "must be an integer >= 0"),
    ("train.b2", 1.0, "must be a number in [0, 1)"),
    ("train.stall_steps", -1, "must be an integer >= 0"),
    ("rollout.top_p", 1.5, "must be a number in (0, 1]"),
    ("rollout.temperature", float("nan"), "must be a number >= 0"),
    ("lora.dropout", 1.0, "must be a number in [0, 1)"),
    ("lora.rank", -8, "must be an integer >= 0"),
    ("loss.kl_clamp", None, "or None with kl_estimator k1 or k2 only"),
    ("loss.kl_clamp", 1000.0, "must be a number in (0, 80]"),
]


@pytest.mark.parametrize("field,value,allowed", BAD_VALUES)
def test_a_bad_value_is_refused_naming_the_field_value_and_range(field, value, allowed):
  config = grpo.get_config("smoke")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError) as e:
    common.check_values(config, "configs/mine.py:smoke")
  (line,) = [line for line in str(e.value).splitlines() if f" {field}=" in line]
  assert line.startswith(f"config configs/mine.py:smoke: {field}={value!r} ")
  assert allowed in line


def test_a_value_of_the_wrong_type_is_refused_and_every_bad_field_is_listed():
  """A string where a number goes, a float where an int goes and a bool for a number are refused
  against the schema's types (an int where a float goes is fine); one error lists them all."""
  config = dpo.get_config("cpu")
  # sections replaced whole, as a config of one's own may: ConfigDict no longer casts
  config.train = ml_collections.ConfigDict(dict(config.train.to_dict(), lr="1e-4", steps=10.0,
                                                weight_decay=1, grad_clip=True))
  config.lora.dropout = 0.5
  config.data.batch_size = 0
  with pytest.raises(ValueError) as e:
    common.check_values(config, "configs/mine.py:cpu")
  assert sorted(str(e.value).splitlines()) == [
      "config configs/mine.py:cpu: data.batch_size=0 is out of range; must be an integer >= 1",
      ("config configs/mine.py:cpu: train.grad_clip=True is a bool, not a float as in "
       "configs/dpo.py; must be a number >= 0"),
      ("config configs/mine.py:cpu: train.lr='1e-4' is a str, not a float as in configs/dpo.py; "
       "must be a number > 0"),
      ("config configs/mine.py:cpu: train.steps=10.0 is a float, not an int as in "
       "configs/dpo.py; must be an integer >= 1")]


def test_kl_clamp_may_be_none_only_where_the_estimator_cannot_overflow():
  config = ppo.get_config("smoke")  # k1
  config.loss.kl_clamp = None
  common.check_values(config, "configs/ppo.py:smoke")
  config.loss.kl_estimator = "k3"
  with pytest.raises(ValueError, match=r"loss.kl_clamp=None"):
    common.check_values(config, "configs/ppo.py:smoke")


def _load(spec: str):
  path, variant = spec.split(":")
  return _module(path).get_config(variant)


@pytest.mark.parametrize("scale,eval_variant", [("cpu", "stability"), ("gpu_full", "stability_gpu")])
def test_stability_study_runs_point_at_each_other(scale, eval_variant):
  runs = align_eval.STUDIES[scale]
  configs = {name: _load(spec) for name, (spec, _) in runs.items()}
  rm_workdir = runs["reward model"][1]
  assert configs["reward model"].algorithm == "align.losses.reward"
  assert configs["lora-dpo"].algorithm == "align.losses.dpo"
  grpo_1x, grpo_10x = configs["grpo-rm"], configs["grpo-rm-10x-lr"]
  for c in (grpo_1x, grpo_10x):
    assert dict(c.rewards) == {"reward_model": 1.0}
    assert c.reward_args.reward_model.run_dir == rm_workdir
    # LoRA of DPO's shape, and DPO's learning rate for the 1x run
    assert (c.lora.rank, c.lora.alpha) == (configs["lora-dpo"].lora.rank,
                                           configs["lora-dpo"].lora.alpha)
  assert grpo_1x.train.lr == configs["lora-dpo"].train.lr
  assert grpo_10x.train.lr == pytest.approx(10 * grpo_1x.train.lr)
  # everything but the learning rate is the same in the two GRPO runs
  a, b = grpo_1x.to_dict(), grpo_10x.to_dict()
  a["train"].pop("lr"), b["train"].pop("lr"), a.pop("variant"), b.pop("variant")
  assert a == b

  ev = align_eval.get_config(eval_variant)
  assert ev.reward_run == rm_workdir
  assert [m["adapter"] for m in ev.models[1:]] == [
      f"{runs[name][1]}/adapter" for name in ("lora-dpo", "grpo-rm", "grpo-rm-10x-lr")]
  # the GRPO runs never train on align_eval's prompts, and sample as many tokens as it decodes
  assert ev.prompts.source == grpo_1x.prompts.source == "alpaca_eval"
  assert grpo_1x.prompts.skip_first >= ev.prompts.n
  if scale == "gpu_full":
    assert grpo_1x.rollout.max_new_tokens == ev.decode.max_new_tokens == 128


def test_study_prompts_fit_the_instruction_set(shared_data):
  from lm import data

  n = len(data.load_instructions("alpaca_eval"))
  for variant in grpo.STUDY:
    p = grpo.get_config(variant).prompts
    assert p.skip_first + p.n_train + p.n_eval <= n, variant


def test_pretrain_gpu_full_builds_the_modern_253m_preset_itself():
  """`:gpu_full` trains the preset as published, not the small base variant's overrides merged in
  (ConfigDict.update merges a nested dict: it once trained a 7M model under this name)."""
  from configs import pretrain
  from lm import config as lm_config
  from lm.hub.runs import model_config

  cfg = model_config(pretrain.get_config("gpu_full"), 50257)
  ref = lm_config.preset("modern-253m")
  assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (
      ref.d_model, ref.n_layers, ref.n_heads, ref.d_ff)
  assert cfg.n_params == pytest.approx(253e6, rel=0.01)
