"""launch.py end to end (torch hidden): the quickstart on real weights, sweeps, training smoke runs,
and workdirs are never silently reused."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from align import verifier
from lm.train.rundir import ConfigChangedError, NoRunToResumeError, RunDir, WorkdirExistsError
from tests_helpers import (REPO, check_train_run_directory, launch_cmd, launch_env, run_task,
                           task_config)


def test_rundir_refuses_existing_run(tmp_path):
  RunDir(tmp_path, {"a": 1}).close()
  with pytest.raises(WorkdirExistsError, match="--resume"):
    RunDir(tmp_path, {"a": 2})
  assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}
  RunDir(tmp_path, {"a": 1}, resume=True).close()
  with pytest.raises(ConfigChangedError, match="a: 1 -> 3"):  # tests/test_faults_run.py: more
    RunDir(tmp_path, {"a": 3}, resume=True)
  RunDir(tmp_path, {"a": 3}, resume=True, allow_config_change=True).close()
  assert json.loads((tmp_path / "config.json").read_text()) == {"a": 3}


def test_resume_needs_a_run_and_resume_auto_continues_one_or_starts_it(tmp_path):
  with pytest.raises(NoRunToResumeError, match="holds no run to continue.*--resume=auto"):
    RunDir(tmp_path / "typo", {"a": 1}, resume=True)
  assert not (tmp_path / "typo").exists()  # refused before anything was made
  fresh = RunDir(tmp_path / "auto", {"a": 1}, resume="auto")  # a scheduler's first start
  assert fresh.resume is False
  fresh.close()
  again = RunDir(tmp_path / "auto", {"a": 1}, resume="auto")  # the same command after preemption
  assert again.resume is True
  again.close()
  with pytest.raises(ConfigChangedError):  # auto continues only the same experiment
    RunDir(tmp_path / "auto", {"a": 2}, resume="auto")
  import launch

  parse = launch._ResumeParser().parse  # --resume, --noresume, --resume=auto
  assert [parse(v) for v in ("true", "false", "auto", "AUTO")] == [True, False, "auto", "auto"]
  with pytest.raises(ValueError):
    parse("sometimes")


@pytest.mark.subprocess
def test_launch_requires_known_task(tmp_path):
  cfg = tmp_path / "bad.py"
  cfg.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n"
                 "  return ml_collections.ConfigDict({'task': 'nope'})\n")
  r = subprocess.run(launch_cmd(f"--config={cfg}", f"--workdir={tmp_path}/w"),
                     cwd=REPO, env=launch_env(), capture_output=True, text=True)
  assert r.returncode != 0 and "config.task='nope' is unknown" in r.stderr


def test_list_shows_every_task_and_every_config_with_its_variants():
  import launch

  text = launch.list_configs()
  for task, target in launch.TASKS.items():
    assert f"  {task} " in text and target in text
  shipped = [p for p in sorted((REPO / "configs").glob("*.py"))
             if "def get_config" in p.read_text()]
  assert len(shipped) >= 15
  for path in shipped:
    module = importlib.import_module(f"configs.{path.stem}")
    line = next(x for x in text.splitlines() if x.startswith(f"  {path.name} "))
    default = module.get_config().variant
    assert f" {module.get_config().task} " in line
    assert all(f" {v}{'*' if v == default else ''} " in line for v in module.VARIANTS), line


@pytest.mark.subprocess
def test_postlab_command_prints_the_resolved_config_from_any_directory(tmp_path):
  """`postlab` (the console script) = `python launch.py`; `--print_config` prints what a run with
  these flags would write as config.json, after the same checks; configs/ resolves to postlab's
  own configs outside the checkout."""
  postlab = Path(sys.executable).with_name("postlab")
  assert postlab.exists(), "pip install -e . installs the postlab command (make test does)"
  args = ["--config=configs/dpo.py:smoke", "--config.train.steps=3", "--print_config"]
  r = subprocess.run([str(postlab), *args], cwd=tmp_path, env=launch_env(), capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  want = task_config("dpo:smoke", {"train.steps": 3})
  assert json.loads(r.stdout) == json.loads(want.to_json_best_effort())
  assert not list(tmp_path.iterdir())  # nothing written
  r = subprocess.run([str(postlab), "--config=configs/dpo.py:smoke", "--config.train.steps=0",
                      "--print_config"], cwd=tmp_path, env=launch_env(), capture_output=True,
                     text=True)
  assert r.returncode == 1 and "train.steps=0 is out of range" in r.stderr


@pytest.mark.real_weights
def test_quickstart_smoke_on_real_weights(tmp_path, smollm2_gguf, shared_data):
  """The README's first command at `:smoke` (CI's `make run` also runs it, torch-free, as a new
  user would; here in-process, with what its outputs must say)."""
  work = tmp_path / "qs"
  run_task("quickstart:smoke", work)
  for name in ("config.json", "provenance.json", "metrics.jsonl", "report.md", "generations.json",
               "plots/answer_logprobs.png"):
    assert (work / name).exists(), name
  prov = json.loads((work / "provenance.json").read_text())
  assert {"time", "command", "code", "versions", "devices", "host"} <= set(prov)
  assert "## Provenance" in (work / "report.md").read_text()
  assert list((work / "tensorboard").iterdir())
  gens = json.loads((work / "generations.json").read_text())
  assert any("Paris" in g["answer"] for g in gens)
  metrics = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
  assert 5 < metrics["wikitext2_perplexity"] < 100


@pytest.mark.real_weights
def test_decode_sweep_smoke_writes_every_output(tmp_path, smollm2_gguf, shared_data):
  work = tmp_path / "sweep"
  run_task("decode_sweep:smoke", work)
  plots = ["avg_logprob_box_greedy_beam.png", "beam_cumulative_scores.png",
           "avg_logprob_vs_temperature.png", "distinct_vs_temperature.png",
           "distinct_within_vs_across.png", "quality_vs_diversity.png"]
  for name in ["generations.jsonl", "summary.json", "report.md", "metrics.jsonl"] + [
      f"plots/{p}" for p in plots]:
    assert (work / name).exists(), name
  rows = [json.loads(line) for line in (work / "generations.jsonl").read_text().splitlines()]
  # 2 prompts: greedy 1 + beam 1 + (top-k, top-p) x 2 temperatures x 2 samples, per prompt.
  assert len(rows) == 2 * (1 + 1 + 2 * 2 * 2)
  summary = json.loads((work / "summary.json").read_text())
  assert {s["strategy"] for s in summary["strategies"]} >= {"greedy", "beam4"}
  assert len(summary["beam_logprob_sums"]["beam4"]) == 2 * 4


@pytest.mark.real_weights
@pytest.mark.parametrize("algo,plots", [("sft", ["loss.png", "perplexity.png"]),
                                        ("reward", ["loss.png", "accuracy.png"]),
                                        ("verifier", ["loss.png", "best_of_n.png"])])
def test_train_smoke_writes_run_directory(tmp_path, shared_data, smollm2_gguf, algo, plots):
  """SFT, reward-model and verifier smoke runs end to end through launch.run and align/train.py
  (DPO's: tests/test_multiprocess.py; GRPO's: tests/test_trainer.py's resume test)."""
  work = tmp_path / algo
  run_task(f"{algo}:smoke", work, {"train.steps": 2, "train.eval_every": 0})
  check_train_run_directory(work, plots, steps=2)
  if algo == "verifier":
    result = json.loads((work / "verifier_eval.json").read_text())
    assert result["n_problems"] == 8 and set(result["methods"]) == set(verifier.METHODS)
  if algo == "reward":
    _reward_model_loads_back(work)


def _reward_model_loads_back(work):
  """The one loader rebuilds the trained reward model (preset base + adapter + head), and it
  scores the logged held-out texts as the run did at its end."""
  import numpy as np

  from lm import heads, hub

  rows = json.loads((work / "reward_samples.json").read_text())
  assert len(rows) == 8
  model, tok = hub.load(preset="tiny", tokenizer="smollm2-135m-instruct",
                        adapter=work / "adapter", reward_head=work / "adapter")
  texts = [r["text"] for r in rows]
  assert [tok(t, add_special_tokens=False)["input_ids"] for t in texts] == [r["ids"] for r in rows]
  logged = np.array([r["score"] for r in rows])
  np.testing.assert_allclose(heads.score_texts(model, tok, texts), logged, rtol=1e-5, atol=1e-5)
  assert np.ptp(logged) > 1e-4  # texts get different scores: the head is not a constant
  # the run as a scorer (what decode_sweep / align_eval take as config.reward_run): same model
  from decode import scorers

  pairs = [("Is the sky blue?", "Yes."), ("Is the sky blue?", "Green, always.")]
  got = scorers.score(scorers.load_reward_model(work), *zip(*pairs))
  p_ids, r_ids = hub.encode_pairs(tok, pairs, max_response_tokens=512)
  np.testing.assert_allclose(got, heads.score_ids(model, [p + r for p, r in zip(p_ids, r_ids)]),
                             rtol=1e-6, atol=1e-6)
  # and as an online-RL reward: the same scores, dataset columns ignored
  from decode import rewards

  total, each = rewards.combine({"rm": rewards.get("reward_model", run_dir=work)}, {"rm": 2.0},
                                *zip(*pairs), columns={"answer": ["1", "2"]})
  np.testing.assert_allclose(each["rm"], got, rtol=1e-6)
  np.testing.assert_allclose(total, 2 * got, rtol=1e-6)
