"""The pretrain -> SFT -> DPO -> verifier pipeline runs every stage from one config, each stage
starting from the previous one's weights, and writes the evaluation table per stage."""

import json
import math

from tests_helpers import run_task


def test_pipeline_smoke_runs_every_stage(tmp_path, shared_data):
  work = tmp_path / "pipe"
  run_task("pipeline:smoke", work,
           {"stages.pretrain.overrides.corpus.store": str(tmp_path / "s")})
  for stage in ("pretrain", "sft", "dpo", "verifier"):
    assert (work / stage / "summary.json").exists(), stage
  # SFT started from the pretraining run's checkpoint, DPO from SFT's export
  sft = json.loads((work / "sft/config.json").read_text())
  dpo = json.loads((work / "dpo/config.json").read_text())
  assert sft["model"]["name"] == str(work / "pretrain")
  assert dpo["model"]["name"] == str(work / "sft/model")
  summary = json.loads((work / "summary.json").read_text())
  assert [row["stage"] for row in summary["table"]] == ["pretrain", "sft", "dpo"]
  for row in summary["table"]:
    assert math.isfinite(row["wikitext2_test_ppl"]) and math.isfinite(
        row["wikitext2_valid_lines_ppl"]) and 0 <= row["gsm8k_em"] <= 1
  assert {row["method"] for row in summary["verifier"]} >= {"verifier", "majority", "oracle"}
