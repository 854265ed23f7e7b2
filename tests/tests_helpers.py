"""Shared constants and helpers for tests."""

import contextlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# `python launch.py ARGS` with torch hidden as if not installed: every library path must run
# without it (only the parity extra installs torch).
_LAUNCH_WITHOUT_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv[0] = 'launch.py'; "
                         "runpy.run_path('launch.py', run_name='__main__')")


def launch_cmd(*args: str) -> list[str]:
  """Command line running launch.py (from the repo root) with torch unimportable."""
  return [sys.executable, "-c", _LAUNCH_WITHOUT_TORCH, *args]


def launch_env(**extra: str) -> dict[str, str]:
  """The environment launch.py would re-exec itself with, so it runs in this one process."""
  from lm.train.runtime import cpu_allocator_env

  return cpu_allocator_env(dict(os.environ, JAX_PLATFORMS="cpu", **extra))


def task_config(spec: str, overrides: dict | None = None):
  """The locked config of `NAME:VARIANT` (configs/NAME.py) with dotted overrides, as launch.py
  builds it from `--config=configs/NAME.py:VARIANT --config.a.b=value`."""
  import importlib

  name, _, variant = spec.partition(":")
  config = importlib.import_module(f"configs.{name}").get_config(variant or None)
  for path, value in (overrides or {}).items():
    *sections, field = path.split(".")
    target = config
    for section in sections:
      target = target[section]
    if field not in target:
      raise KeyError(f"{spec} has no field {path}")
    target[field] = value
  config.lock()
  return config


def run_task(spec: str, workdir, overrides: dict | None = None, *, resume: bool = False,
             devices: int = 1, **run_args):
  """launch.py's task in this process (`launch.run`; `run_args` such as `resume_step`,
  `allow_config_change` as its flags): no interpreter start-up, imports or compiles paid again.
  On the first `devices` CPU devices: a launch.py process has one."""
  import jax

  import launch

  return launch.run(task_config(spec, overrides), workdir, resume=resume,
                    devices=jax.devices()[:devices], where=f"configs/{spec.replace(':', '.py:')}",
                    **run_args)


# Every file a `train` run directory holds, beside its plots.
TRAIN_RUN_FILES = ["config.json", "metrics.jsonl", "report.md", "summary.json", "data_stats.json",
                   "adapter/adapter_model.safetensors", "adapter/adapter_config.json"]


def check_train_run_directory(work, plots, steps: int) -> None:
  """`work` holds a whole `train` run directory: its files, `plots`, TensorBoard events, and
  metrics up to `steps`."""
  import json

  for name in TRAIN_RUN_FILES + [f"plots/{p}" for p in plots]:
    assert (work / name).exists(), name
  assert list((work / "tensorboard").iterdir())
  logged = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert max(logged) == steps


class Killed(BaseException):
  """A process death simulated in-process: a BaseException, so no task code catches it."""


@contextlib.contextmanager
def killed_at_step(step: int, workdir):
  """The trainer dies inside the block when it is about to train step `step + 1` (step `step`
  logged, its checkpoint written only if `step` is a checkpoint step), as a SIGKILL between steps
  would leave `workdir`; the block must die there. tests/test_multiprocess.py kills real processes."""
  import pytest

  from lm.train.trainer import Trainer

  train_step = Trainer.train_step

  def dying(self, batch):
    if self.step == step:
      raise Killed(f"killed before step {step + 1}")
    return train_step(self, batch)

  with pytest.MonkeyPatch.context() as m, pytest.raises(Killed):
    m.setattr(Trainer, "train_step", dying)
    yield
  assert f'"step": {step}' in (Path(workdir) / "metrics.jsonl").read_text()


def random_hf_llama(path: Path, *, tie: bool = True, max_position_embeddings: int = 128):
  """A random tiny HF LlamaForCausalLM (weights larger than init, so errors show), saved to path."""
  import torch
  import transformers

  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
      tie_word_embeddings=tie, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in hf.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
              else 0.15 * torch.randn_like(p))
  hf.save_pretrained(path)
  return hf


def scrambled(model, seed: int = 0, std: float = 0.15):
  """`model` with every parameter redrawn at a size that makes attention non-uniform (norm scales
  around 1), so a position, mask or layer mistake moves the logits."""
  import jax
  from flax import nnx

  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  for norm in [model.final_norm] + [n for b in model.layers for n in (b.input_norm, b.post_attn_norm)]:
    norm.scale[...] = 1.0 + norm.scale[...]
  return model


def trl_style_correctness(completions, answer, **kwargs):
  """A reward function as TRL's docs write one (columns by keyword, the rest swallowed): 1 where
  a completion's last word is the row's answer, None (no score) where the row has no answer."""
  return [None if a is None else float((c.split() or [""])[-1] == a)
          for c, a in zip(completions, answer)]
