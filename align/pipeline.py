"""The `pipeline` task: pretrain -> SFT -> DPO -> verifier from one config, each stage starting from
the previous one's weights, each evaluated on the same table.

Stages run in sub-directories of the workdir (`pretrain/`, `sft/`, `dpo/`, `verifier/`), each a
complete run directory of its own task (`lm.pretrain`, `align.train`). The pretraining run's last
checkpoint seeds SFT (`align.train.load_model` reads a `pretrain` run directory, tokenizer
included); SFT and DPO train every parameter (`train.trainable = "full"`, no LoRA) and export HF
weights, which the next stage loads. The verifier trains a reward head on the DPO model. A stage
whose directory already holds a `summary.json` is kept (rerun the pipeline to continue it).

The table, per stage (pretrain, SFT, DPO; the verifier adds its best-of-n result):
- WikiText-2 test perplexity, sliding windows of the model's context advancing by half of it
  (every token scored once with at least half a context; HF's protocol);
- the Modern LLM report's protocol, under its own name: the first 100 non-empty lines of
  WikiText-2 *validation*, each scored alone (no context), at most 512 tokens;
- GSM8K exact match, greedy, on the first `eval.gsm8k_n` test problems ("Question: ...\\nAnswer:"
  prompt; the last number of the completion against the `#### n` answer);
- GPT-2 124M on the same protocols where its weights are reachable (`eval.reference`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import ml_collections
import numpy as np

from lm import data as lm_data
from lm import scoring
from lm.hub.vocab import encode_text
from lm.progress import Progress
from lm.train.rundir import RunDir, markdown_table

log = logging.getLogger(__name__)

STAGES = ("pretrain", "sft", "dpo", "verifier")


def _stage_config(name: str, variant: str, overrides) -> ml_collections.ConfigDict:
  """`configs/<name>.py:<variant>` with `overrides` (a nested dict) merged into it."""
  import importlib

  c = importlib.import_module(f"configs.{name}").get_config(variant)
  if overrides:
    c.update(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
  return c


def _check_stage_values(cfgs: dict, stages) -> None:
  """launch.py's value check (`configs.common.check_values`) on each stage's config as the
  stage will run it, so a bad override fails before the first stage trains."""
  from configs import common

  errors = []
  for name, cfg in cfgs.items():
    try:
      common.check_values(cfg, f"configs/{name}.py:{stages[name].variant} + stages.{name}.overrides")
    except ValueError as e:
      errors.append(str(e))
  if errors:
    raise ValueError("\n".join(errors))


def _run_stage(name: str, stage_cfg, path: Path, task: str):
  from importlib import import_module

  if (path / "summary.json").exists():
    log.info("stage %s: kept %s", name, path)
    return json.loads((path / "summary.json").read_text())
  module, fn = {"pretrain": ("lm.pretrain.task", "run"), "train": ("align.train", "run")}[task]
  stage_dir = RunDir(path, stage_cfg, resume="auto")
  try:
    return getattr(import_module(module), fn)(stage_cfg, stage_dir)
  finally:
    stage_dir.close()


def wikitext_perplexity(model, tokenizer, n_tokens: int | None) -> float:
  """WikiText-2 test: windows of the model's context advancing by half of it (the first
  `n_tokens` tokens; 0 or None: all)."""
  ids = encode_text(tokenizer, lm_data.load_wikitext("test"))[:n_tokens or None]  # 0: every token
  ctx = min(model.cfg.max_seq_len, len(ids))
  return scoring.perplexity(model, ids, window=ctx, stride=max(ctx // 2, 1)).perplexity


def line_by_line_perplexity(model, tokenizer, n_lines: int = 100, max_tokens: int = 512) -> float:
  """The Modern LLM report's protocol: the first `n_lines` non-empty lines of WikiText-2
  validation, each scored alone (its first token unscored), token-weighted."""
  lines = [ln.strip() for ln in lm_data.load_wikitext("valid").splitlines() if ln.strip()]
  rows = [encode_text(tokenizer, ln)[:min(max_tokens, model.cfg.max_seq_len)] for ln in lines[:n_lines]]
  rows = [r for r in rows if len(r) >= 2]
  lps = scoring.response_logprobs(model, [r[:1] for r in rows], [r[1:] for r in rows],
                                  batch_size=8)
  nll = -sum(float(np.sum(x, dtype=np.float64)) for x in lps) / sum(len(x) for x in lps)
  return math.exp(nll)


def gsm8k_exact_match(model, tokenizer, n: int, max_new_tokens: int) -> float:
  from decode.rewards import gsm8k_correct
  from decode.rollout import rollout

  rows = lm_data.read_rows(lm_data.shared_file("gsm8k/test.jsonl.gz"))[:n]
  prompts = [encode_text(tokenizer, f"Question: {r['question']}\nAnswer:") for r in rows]
  ctx = model.cfg.max_seq_len - max_new_tokens
  prompts = [p[-ctx:] for p in prompts]
  out = rollout(model, prompts, max_new_tokens=max_new_tokens, tokenizer=tokenizer, batch_size=8)
  texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out.sequences()]
  return float(np.mean(gsm8k_correct(None, texts, answer=[r["answer"] for r in rows])))


def evaluate(model, tokenizer, e) -> dict:
  return {"wikitext2_test_ppl": wikitext_perplexity(model, tokenizer, e.wikitext_tokens),
          "wikitext2_valid_lines_ppl": line_by_line_perplexity(model, tokenizer, e.n_lines),
          "gsm8k_em": gsm8k_exact_match(model, tokenizer, e.gsm8k_n, e.max_new_tokens)}


def _stage_configs(config) -> tuple[ml_collections.ConfigDict, dict]:
  """(the pretraining stage's config, the later stages' configs by name), every one checked."""
  s = config.stages
  pre_cfg = _stage_config("pretrain", s.pretrain.variant, s.pretrain.overrides)
  pre_cfg.corpus.store = str(Path(pre_cfg.corpus.store or
                                  f"runs/corpora/{pre_cfg.corpus.name}").resolve())
  cfgs = {name: _stage_config(name, s[name].variant, s[name].overrides) for name in STAGES[1:]}
  _check_stage_values({"pretrain": pre_cfg, **cfgs}, s)  # every stage, before the first runs
  return pre_cfg, cfgs


def _chained(cfg, previous: str):
  """A stage's config as it runs: from the previous stage's weights, every parameter trained."""
  cfg.model.update(name=previous, preset="", tokenizer="")
  cfg.lora.rank = 0
  cfg.train.trainable = "full"
  return cfg


def compile_only(config, mesh, topology: str) -> dict:
  """Every stage's training step compiled for `mesh` on abstract arrays (`launch.py
  --compile_only`): the pretraining step, then SFT, DPO and the verifier on the pretrained
  architecture (shapes only: no stage has trained). `stages` holds each stage's `aot.report`;
  the top-level fields are the stage that needs the most memory per device."""
  from align import train
  from lm.hub import runs, vocab
  from lm.hub.loader import shapes_of
  from lm.pretrain import task

  pre_cfg, cfgs = _stage_configs(config)
  stages = {"pretrain": task.compile_only(pre_cfg, mesh, topology)}
  arch = runs.model_config(pre_cfg, task.vocab_size_without_data(pre_cfg))
  tokenizer = vocab.gpt2_tokenizer().to_hf()  # what a pretrain run directory loads as
  for name, cfg in cfgs.items():
    cfg = _chained(cfg, "pretrain/")
    base = train.with_stack_settings(shapes_of(arch), cfg.model)
    stages[name] = train.compile_only(cfg, mesh, topology, base=(base, tokenizer))
  largest = max(stages.values(), key=lambda r: r["bytes_per_device"]["total"])
  name = next(k for k, v in stages.items() if v is largest)
  return {**largest, "task": "pipeline", "largest_stage": name, "stages": stages}


def run(config, run_dir: RunDir, mesh=None) -> dict:
  from align.train import load_model

  root = run_dir.path
  rows, verifier_rows = [], []
  pre_cfg, cfgs = _stage_configs(config)
  # each stage trains (its own progress lines), then the pipeline evaluates what it exports
  progress = Progress(len(STAGES), "pipeline", "stage", logger=log)
  _run_stage("pretrain", pre_cfg, root / "pretrain", "pretrain")
  previous = str(root / "pretrain")
  results = {}
  loaded_by = dict(zip(STAGES, STAGES[1:]))  # stage -> the stage that starts from its weights
  for name in STAGES:
    if name != "pretrain":
      cfg = _chained(cfgs[name], previous)
      summary = _run_stage(name, cfg, root / name, "train")
      results[name] = summary
      if name == "verifier":
        methods = json.loads((root / name / "verifier_eval.json").read_text())["methods"]
        verifier_rows = [{"method": m, "exact match": v["exact_match"]}
                         for m, v in methods.items()]
        progress.update(1, done=name)
        continue
      previous = str(root / name / summary["exported"])
    # the stage's weights as the next stage loads them, in float32
    model_cfg = ml_collections.ConfigDict(cfgs[loaded_by[name]].model.to_dict())
    model_cfg.update(name=previous, preset="", tokenizer="", dtype="float32")
    model, tok = load_model(model_cfg)
    model.eval()
    row = {"stage": name, **evaluate(model, tok, config.eval)}
    log.info("stage %s: %s", name, row)
    rows.append(row)
    progress.update(1, done=name)
  progress.close()
  reference = config.eval.reference
  if reference:
    try:
      from lm import hub

      model, tok = hub.load(reference)
      rows.append({"stage": f"reference: {reference}", **evaluate(model, tok, config.eval)})
    except Exception as e:  # offline: no GPT-2 weights here
      log.warning("reference %s unavailable (%s); the table has no reference row", reference, e)
  run_dir.write_json("summary.json", {"table": rows, "verifier": verifier_rows, "stages": {k: {kk: vv for kk, vv in v.items()
                                                                  if isinstance(vv, (int, float, str))}
                                                              for k, v in results.items()}})
  report = ["# Pipeline: pretrain -> SFT -> DPO -> verifier\n",
            "Each stage in its own run directory (`pretrain/`, `sft/`, `dpo/`, `verifier/`). "
            f"WikiText-2 test perplexity: sliding windows of the model's context advancing by half "
            f"of it; 'lines': the Modern LLM report's protocol (first {config.eval.n_lines} "
            "non-empty WikiText-2 validation lines, each alone); GSM8K exact match: greedy, first "
            f"{config.eval.gsm8k_n} test problems, {config.eval.max_new_tokens} new tokens.\n",
            markdown_table(rows),
            "\n## The verifier (trained on the DPO model): best-of-4 on held-out GSM8K "
            "solutions\n", markdown_table(verifier_rows)]
  run_dir.write_report("\n".join(report))
  return {}
