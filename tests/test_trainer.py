"""The one trainer: sharded = unsharded, accumulation = one big batch, only the trainable filter
moves, NaN stops naming the step with the last good checkpoint kept, SIGKILL + resume = uninterrupted."""

import json
import re
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from align import losses
from configs import train_base
from lm import lora
from lm.train.trainer import NonFiniteLossError, Trainer, make_optimizer
from lm import config as lm_config
from lm import sharding
from lm.train.checkpoint import Checkpointer
from lm.model import Transformer
from tests_helpers import killed_at_step, run_task



def _train_cfg(**kw):
  """The training configs' train section, at this file's settings (no evals or checkpoints
  unless a test asks)."""
  cfg = train_base.base("align.losses.sft", "smoke").train
  cfg.update(steps=3, batch_size=8, grad_accum=1, lr=1e-2, warmup_steps=0, schedule="constant",
             min_lr_ratio=0.0, grad_clip=1.0, weight_decay=0.01, seed=0, eval_every=0,
             checkpoint_every=0)
  cfg.update(kw)
  return cfg


def _batch(seed, b=8, s=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 256, (b, s)).astype(np.int32)
  attn = np.ones((b, s), np.int32)
  attn[::2, 12:] = 0
  loss_mask = attn.astype(np.float32)
  loss_mask[:, :4] = 0
  return {"tokens": tokens, "attn_mask": attn, "loss_mask": loss_mask}


def _model(lora_rank=0, dropout=0.0):
  cfg = lm_config.preset("tiny")
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  if lora_rank:
    lora.apply_lora(model, lora.LoraConfig(rank=lora_rank, alpha=8.0, dropout=dropout),
                    rngs=nnx.Rngs(params=1, lora_dropout=2))
  return model


def _flat(state):
  return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in state.flat_state()}


@pytest.mark.parametrize("mesh_shape,mode", [
    (dict(data=2, fsdp=4), "full"), (dict(data=1, fsdp=8), "lora"),
    (dict(data=2, fsdp=2, tensor=2), "full"), (dict(data=2, fsdp=2, tensor=2), "lora")])
def test_sharded_step_equals_single_device(mesh_shape, mode):
  results = []
  for mesh in (None, sharding.make_mesh(**mesh_shape)):
    model = _model(lora_rank=4 if mode == "lora" else 0)
    # lr 1e-3: Adam normalises near-zero gradients, so reduction-order noise moves a weight by
    # up to ~lr; the tolerance below is a fraction of one step.
    trainer = Trainer(model, losses.get("sft"), None, _train_cfg(lr=1e-3), mesh=mesh,
                      trainable=lora.trainable_filter(mode))
    losses_seen = [trainer.train_step(_batch(i))["loss"] for i in range(2)]
    results.append((losses_seen, _flat(trainer.params)))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=2e-5)
  for k in p1:
    np.testing.assert_allclose(p1[k], p8[k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_grad_accumulation_equals_one_batch():
  out = []
  for accum in (1, 4):
    trainer = Trainer(_model(), losses.get("sft"), None, _train_cfg(grad_accum=accum, lr=1e-3))
    # equal target-token counts per micro-batch, so the mean of means is the batch mean
    batch = _batch(0)
    batch["attn_mask"][:] = 1
    batch["loss_mask"][:, 4:] = 1
    m = trainer.train_step(batch)
    out.append((m["loss"], m["grad_norm"], _flat(trainer.params)))
  assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
  assert out[0][1] == pytest.approx(out[1][1], rel=1e-4)
  for k in out[0][2]:
    np.testing.assert_allclose(out[0][2][k], out[1][2][k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_only_trainable_filter_moves_and_bf16_compute_keeps_f32_masters():
  model = _model(lora_rank=4, dropout=0.1)
  before = _flat(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  trainer = Trainer(model, losses.get("sft"), None, _train_cfg(),
                    trainable=lora.trainable_filter("lora"))
  trainer.train_step(_batch(0))
  after = _flat(nnx.state(trainer.model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)
  assert any(np.abs(v).sum() > 0 for k, v in _flat(trainer.params).items() if "lora_b" in k)

  def matmul_dtypes(trainer):
    """Operand types of every dot in the compiled train step, e.g. {'bf16', 'f32'}."""
    batch = trainer._device_batch(_batch(0))
    hlo = trainer._train_step.lower(trainer.params, trainer.opt_state, trainer.rest, batch,
                                    jnp.asarray(0, jnp.int32),
                                    jnp.asarray(jnp.inf, jnp.float32)).as_text()
    return {t for line in hlo.splitlines() if "dot_general" in line
            for t in re.findall(r"tensor<[0-9x]*x(bf16|f32)>", line)}

  cfg = lm_config.preset("tiny", dtype="bfloat16")
  bf = Trainer(Transformer(cfg, rngs=nnx.Rngs(0)), losses.get("sft"), None, _train_cfg())
  f32 = Trainer(Transformer(cfg.replace(dtype="float32"), rngs=nnx.Rngs(0)), losses.get("sft"),
                None, _train_cfg())
  assert "bf16" in matmul_dtypes(bf) and "bf16" not in matmul_dtypes(f32)  # compute in bf16
  m_bf, m_f32 = bf.train_step(_batch(0)), f32.train_step(_batch(0))
  assert np.isfinite(m_bf["loss"])
  assert 0 < abs(m_bf["loss"] - m_f32["loss"]) < 0.05 * abs(m_f32["loss"])  # rounding, not a bug
  assert all(v.dtype == np.float32 for v in _flat(bf.params).values())  # float32 masters


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tmp_path):
  def poisoned(model, batch, cfg):
    loss, metrics = losses.get("sft")(model, batch, cfg)
    loss = loss + batch["poison"].sum()
    return loss, dict(metrics, loss=loss)

  batches = []
  for i in range(5):
    b = _batch(i)
    b["poison"] = np.full((8,), np.nan if i == 3 else 0.0, np.float32)
    batches.append(b)
  trainer = Trainer(_model(), poisoned, None, _train_cfg(steps=5, checkpoint_every=2))
  ckpt = Checkpointer(tmp_path / "ckpt")
  with pytest.raises(NonFiniteLossError, match=r"step 4.*last good checkpoint \(step 2\)"):
    trainer.fit(iter(batches), ckpt=ckpt)
  assert ckpt.latest_step == 2
  # the kept checkpoint restores finite parameters
  fresh = Trainer(_model(), poisoned, None, _train_cfg(steps=5))
  fresh.restore(ckpt)
  assert fresh.step == 2
  assert all(np.isfinite(v).all() for v in _flat(fresh.params).values())


def test_diagnostics_of_any_shape_average_over_micro_batches_and_reach_the_run_files(tmp_path):
  """A loss may return arrays beside its scalars: each is the mean over micro-batches (train) and
  over batches (eval), comes back as numpy, and `metrics.jsonl` holds it as a list."""
  from lm.train.rundir import RunDir

  def with_diagnostics(model, batch, cfg):
    loss, metrics = losses.get("sft")(model, batch, cfg)
    mask = batch["loss_mask"]
    return loss, dict(metrics, per_row_targets=mask.sum(axis=1),  # [micro-batch]
                      first_tokens=batch["tokens"][:, :2].astype(jnp.float32))  # [micro-batch, 2]

  batch = _batch(0)
  trainer = Trainer(_model(), with_diagnostics, None, _train_cfg(steps=1, grad_accum=2))
  m = trainer.train_step(batch)
  assert isinstance(m["loss"], float)
  halves = np.split(batch["loss_mask"].sum(axis=1), 2)  # the two micro-batches, 4 rows each
  np.testing.assert_allclose(m["per_row_targets"], (halves[0] + halves[1]) / 2)
  tokens = np.split(batch["tokens"][:, :2].astype(np.float64), 2)
  np.testing.assert_allclose(m["first_tokens"], (tokens[0] + tokens[1]) / 2)
  ev = trainer.evaluate([_batch(1), _batch(2)])
  want = (_batch(1)["tokens"][:, :2] + _batch(2)["tokens"][:, :2]) / 2
  assert ev["first_tokens"].shape == (8, 2)
  np.testing.assert_allclose(ev["first_tokens"], want)

  run = RunDir(tmp_path / "run", {"x": 1})
  trainer = Trainer(_model(), with_diagnostics, None, _train_cfg(steps=2, grad_accum=2))
  history = trainer.fit(iter([_batch(3), _batch(4)]), run_dir=run)
  run.close()
  logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged] == [1, 2]
  for rec, h in zip(logged, history):
    assert isinstance(rec["train/loss"], float)
    np.testing.assert_allclose(rec["train/first_tokens"], h["train/first_tokens"])
    assert np.shape(rec["train/first_tokens"]) == (4, 2)
  assert list((tmp_path / "run/tensorboard").iterdir())


def test_a_loss_without_a_scalar_loss_metric_is_refused():
  def no_loss(model, batch, cfg):
    loss, metrics = losses.get("sft")(model, batch, cfg)
    return loss, {"nll": metrics["nll"]}

  with pytest.raises(ValueError, match="no scalar 'loss' metric"):
    Trainer(_model(), no_loss, None, _train_cfg()).train_step(_batch(0))


def test_bad_batch_config_names_the_field():
  with pytest.raises(ValueError, match="grad_accum"):
    Trainer(_model(), losses.get("sft"), None, _train_cfg(batch_size=6, grad_accum=4))
  with pytest.raises(ValueError, match="batch shards"):
    Trainer(_model(), losses.get("sft"), None, _train_cfg(batch_size=4),
            mesh=sharding.make_mesh(data=8, fsdp=1))


def _train(workdir, algo, resume=False):
  # GRPO also scores with a function written for TRL, named by import path in the config
  rewards = {"rewards": {"length_penalty": 0.5, "trl_style": 1.0},
             "reward_functions": {"trl_style": "tests_helpers:trl_style_correctness"}}
  return run_task(f"{algo}:smoke", workdir, {"train.steps": 6, "train.checkpoint_every": 2,
                                             "lora.dropout": 0.1, **rewards}, resume=resume)


def _metrics(workdir):
  rows = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    rows.setdefault(r["step"], {}).update(
        {k: v for k, v in r.items() if k.startswith(("train/loss", "train/rewards", "train/grad",
                                                       "train/reward", "train/kl", "eval/"))})
  return rows


@pytest.mark.real_weights
@pytest.mark.parametrize("algo", ["grpo"])  # DPO: tests/test_multiprocess.py kills and resumes
def test_killed_and_resumed_equals_uninterrupted(tmp_path, shared_data, smollm2_gguf, algo):
  """GRPO: the rollouts after the resume are sampled by the restored policy with the step's seed,
  so rewards, KL and losses repeat the uninterrupted run's at every step (killed before step 4:
  checkpoint 2 on disk, step 3 logged and dropped by the resume)."""
  _train(tmp_path / "full", algo)
  with killed_at_step(3, tmp_path / "killed"):
    _train(tmp_path / "killed", algo)
  assert (tmp_path / "killed/checkpoints/2").is_dir()
  assert not (tmp_path / "killed/checkpoints/4").exists()
  _train(tmp_path / "killed", algo, resume=True)
  a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "killed")
  assert sorted(a) == sorted(b) and max(a) == 6
  if algo == "grpo":  # the run trained: losses and rewards moved; its run directory is whole
    assert len({a[s]["train/loss"] for s in range(1, 7)}) > 1
    assert len({a[s]["train/reward"] for s in range(1, 7)}) > 1
    assert all("train/reward/trl_style" in a[s] for s in range(1, 7))  # scored at every step
    full = tmp_path / "full"
    for name in ["report.md", "summary.json", "rl_summary.json", "data_stats.json",
                 "adapter/adapter_model.safetensors", "plots/reward.png", "plots/kl.png",
                 "plots/entropy.png", "plots/time_rollout_s.png"]:
      assert (full / name).exists(), name
    assert "Trends" in (full / "report.md").read_text()
  for step in a:
    assert a[step] == b[step], step


def test_cpu_training_flags_keep_the_users(monkeypatch):
  """Training XLA flags are added once; a flag the user already set keeps the user's value."""
  from lm.train.runtime import CPU_TRAINING_XLA_FLAGS, use_cpu_training_flags

  name = CPU_TRAINING_XLA_FLAGS[0].split("=")[0]
  monkeypatch.setenv("XLA_FLAGS", f"{name}=true --xla_dump_to=/tmp/x")
  use_cpu_training_flags()
  use_cpu_training_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert f"{name}=true" in flags and CPU_TRAINING_XLA_FLAGS[0] not in flags
  assert "--xla_dump_to=/tmp/x" in flags
  assert all(flags.count(f) == 1 for f in CPU_TRAINING_XLA_FLAGS[1:])


def test_weight_decay_follows_logical_axes():
  """Kernels, embeddings and LoRA factors decay; norms, biases (2-D q/k/v ones too) and sinks not."""
  from lm.train.trainer import weight_decay_mask

  model = Transformer(lm_config.preset("tiny", attention_bias=True, mlp_bias=True,
                                       attention_sinks=True), rngs=nnx.Rngs(0))
  lora.apply_lora(model, lora.LoraConfig(rank=2, alpha=4.0, dropout=0.0), rngs=nnx.Rngs(1))
  flat = {"/".join(map(str, k)): bool(v) for k, v in
          nnx.State(weight_decay_mask(nnx.state(model, nnx.Param))).flat_state()}
  decayed = {k for k, v in flat.items() if v}
  assert {"embed/embedding", "layers/0/attn/q_proj/kernel", "layers/0/mlp/down_proj/kernel",
          "layers/0/attn/q_proj/lora_a", "layers/0/attn/q_proj/lora_b"} <= decayed
  for kept in ("final_norm/scale", "layers/0/input_norm/scale", "layers/0/attn/q_proj/bias",
               "layers/0/attn/k_proj/bias", "layers/0/attn/o_proj/bias",
               "layers/0/mlp/gate_proj/bias", "layers/0/attn/sinks"):
    assert flat[kept] is False, kept
  # and through the optimizer: with zero gradients only decayed weights move
  cfg = _train_cfg(lr=0.1, weight_decay=0.5, grad_clip=0.0)
  tx = make_optimizer(cfg)
  params = nnx.state(model, nnx.Param)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  moved = {"/".join(map(str, k)) for k, v in nnx.State(updates).flat_state()
           if float(jnp.abs(v.get_value() if hasattr(v, "get_value") else v).max()) > 0}
  nonzero = {"/".join(map(str, k)) for k, v in params.flat_state()
             if float(jnp.abs(v.get_value()).max()) > 0}  # LoRA B starts at 0: decay leaves it
  assert moved == decayed & nonzero and "layers/0/attn/q_proj/lora_a" in moved


def test_lr_multipliers_scale_only_the_named_parameters_updates():
  """train.lr_multipliers {"value": 10}: the value head's AdamW update is 10x, the rest 1x."""
  from lm.heads import PolicyWithValue

  model = PolicyWithValue(_model(), rngs=nnx.Rngs(1))
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  base, scaled = (make_optimizer(_train_cfg(grad_clip=0.0, weight_decay=0.0, **kw))
                  for kw in ({}, {"lr_multipliers": {"value": 10.0}}))
  u0 = _flat(nnx.State(base.update(grads, base.init(params), params)[0]))
  u1 = _flat(nnx.State(scaled.update(grads, scaled.init(params), params)[0]))
  assert u0.keys() == u1.keys() and "value/kernel" in u0
  for name in u0:
    np.testing.assert_allclose(u1[name], u0[name] * (10.0 if name == "value/kernel" else 1.0),
                               rtol=1e-6, err_msg=name)
