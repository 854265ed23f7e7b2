"""Every config variant builds, unknown variants are refused by name, every variant has the fields
its task reads and a config that lacks one is refused at start-up naming it, and the stability
study's runs point at each other: the GRPO runs read the reward model the study trains, align_eval
reads the adapters the study writes, and no GRPO run trains on align_eval's prompts."""

import importlib
import subprocess

import pytest

from configs import align_eval, common, dpo, grpo
from tests_helpers import REPO, launch_cmd, launch_env

VARIANTS = {
    "align_eval": ["smoke", "cpu", "standin", "gpu_full", "stability", "stability_gpu"],
    "decode_sweep": ["smoke", "cpu", "gpu_full"],
    "dpo": ["smoke", "cpu", "gpu_full"],
    "grpo": ["smoke", "cpu", "gpu_full", *grpo.STUDY],
    "pipeline": ["smoke", "cpu", "gpu_full"],
    "ppo": ["smoke", "cpu", "gpu_full"],
    "pretrain": ["smoke", "cpu_char", "cpu_char256", "cpu", "gpu_full"],
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
