"""One trainer for every algorithm: a pure step jitted once, with explicit shardings and donation.

The trainer knows a `loss_fn(model, batch, cfg) -> (loss, metrics)` and a filter naming the
trainable variables (LoRA factors, every parameter, or a regex subset); nothing about DPO or SFT.
`nnx.split(model, trainable, ...)` gives the trainable state that the gradient, the optax state and
the checkpoints cover; everything else (the frozen base) is passed to the step undonated.

Gradient accumulation scans over `grad_accum` micro-batches inside the one compiled step. Mixed
precision: the model's `dtype` (compute, e.g. bfloat16) is independent of `param_dtype` (float32
master weights), so the optimizer always updates float32. Checkpoints hold the trainable state,
the optimizer state, the step and the data iterator's state, so `resume` continues exactly.

Loss-spike guard (`train.spike_factor` > 0): after `spike_warmup` steps, a step whose loss exceeds
`spike_factor` x the running mean (EMA, `spike_ema` decay, of the losses of the steps taken) leaves
the parameters and optimizer state as they were (metric `skipped`); the EMA is checkpointed.
With `flops_per_token` (`lm.flops`), each step also reports `tflops_per_s` and, where the device's
peak is known, `mfu` (model FLOP/s over the peak of all devices in the mesh).

Metrics are scalars or diagnostics of any fixed shape (e.g. a per-layer norm `[L]`, a histogram
of advantages `[bins]`): both are averaged over micro-batches (and eval batches); scalars come back
as floats, diagnostics as numpy arrays, and the run's `metrics.jsonl` holds them as lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm import heads, inputs, lora, sharding
from lm.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def make_schedule(cfg) -> optax.Schedule:
  """Linear warmup to `lr`, then `cosine`, `linear` decay to `lr * min_lr_ratio`, or `constant`."""
  peak, warmup, steps = cfg.lr, int(cfg.warmup_steps), int(cfg.steps)
  end = peak * cfg.min_lr_ratio
  kind = cfg.schedule
  decay_steps = max(steps - warmup, 1)
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
  elif kind == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"train.schedule={kind!r} is unknown; use 'cosine', 'linear' or 'constant'.")
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decays(variable) -> bool:
  axes = getattr(variable, "logical_axes", None)
  if axes is None:  # a parameter without logical axes: matrices decay
    return jnp.ndim(variable) >= 2
  return "lora_rank" in axes or ("embed" in axes and len(axes) >= 2)


def weight_decay_mask(params):
  """True for the weights that map between spaces, read from their logical axes: kernels,
  embeddings and LoRA factors decay; norm scales, biases (a q bias is 2-D `[heads, head_dim]`)
  and attention sinks do not."""
  return jax.tree.map(_decays, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW; weight decay by `weight_decay_mask`; `lr_multipliers`
  (parameter-path substring -> factor, e.g. {"value": 10.0} for PPO's value head) scale those
  parameters' updates, i.e. their learning rate and decoupled decay."""
  parts = []
  if cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=weight_decay_mask))
  multipliers = dict(cfg.lr_multipliers)
  if multipliers:
    parts.append(_scale_by_path(multipliers))
  return optax.chain(*parts)


def _scale_by_path(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiply each update by the factor of the first key of `multipliers` that is a substring of
  its state path ("backbone/embed/embedding"; a Variable's own `.value` attribute is no part)."""
  def factor(path) -> float:
    name = "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
    return next((float(m) for key, m in multipliers.items() if key in name), 1.0)

  def scale(updates, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates)

  return optax.stateless(scale)


def _check_train_config(cfg, n_batch_shards: int) -> None:
  for field in ("steps", "batch_size", "lr"):
    if field not in cfg:
      raise ValueError(f"config.train.{field} is missing; see configs/sft.py for a complete one.")
  accum = int(cfg.grad_accum)
  if cfg.batch_size % accum:
    raise ValueError(f"train.batch_size={cfg.batch_size} is not divisible by "
                     f"train.grad_accum={accum}; make the batch a multiple of the accumulation.")
  micro = cfg.batch_size // accum
  if micro % n_batch_shards:
    raise ValueError(
        f"micro-batch {micro} (train.batch_size / train.grad_accum) does not split over the "
        f"{n_batch_shards} batch shards of the mesh (data x fsdp); use a micro-batch that is a "
        "multiple of it.")


def host_metric(v) -> float | np.ndarray:
  """A metric on the host: a float for a scalar, a float64 array for a diagnostic of any shape."""
  a = np.asarray(sharding.host_array(v), np.float64)
  return float(a) if a.ndim == 0 else a


def _fresh(tree):
  return jax.tree.map(lambda x: x, tree)


def _tree_shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass
class StepTimes:
  compile_s: float = 0.0
  steady_s: float = 0.0
  steady_steps: int = 0
  steady_tokens: int = 0

  @property
  def tokens_per_s(self) -> float:
    return self.steady_tokens / self.steady_s if self.steady_s else float("nan")


class Trainer:
  """Trains the `trainable` variables of `model` on `loss_fn`; see the module docstring."""

  def __init__(self, model: nnx.Module, loss_fn: Callable, loss_cfg: Any, train_cfg: Any, *,
               trainable: Any = nnx.Param, mesh: jax.sharding.Mesh | None = None,
               flops_per_token: float | None = None):
    self.mesh = mesh or sharding.make_mesh(devices=jax.devices()[:1])
    self.cfg = train_cfg
    self.loss_fn, self.loss_cfg = loss_fn, loss_cfg
    self.n_batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    _check_train_config(train_cfg, self.n_batch_shards)
    self.accum = int(train_cfg.grad_accum)
    self.trainable = trainable
    lm_cfg = heads.backbone(model).cfg
    self._vocab_size, self._max_seq_len = lm_cfg.vocab_size, lm_cfg.max_seq_len
    self.graphdef, params, rest = nnx.split(model, trainable, ...)
    self.n_trainable = sum(x.size for x in jax.tree.leaves(params))
    if not self.n_trainable:
      raise ValueError("the trainable filter selects no parameters; check config.train.trainable "
                       "(and that LoRA was applied when training 'lora').")
    # Copies (may_alias=False): the step donates them, and the caller's model keeps its arrays.
    self.params = jax.device_put(params, sharding.state_shardings(params, self.mesh),
                                 may_alias=False)
    self.rest = jax.device_put(rest, sharding.state_shardings(rest, self.mesh))
    self.tx = make_optimizer(train_cfg)
    self.schedule = make_schedule(train_cfg)
    with jax.set_mesh(self.mesh):
      self.opt_state = jax.jit(self.tx.init)(self.params)
    self.step = 0
    self.times = StepTimes()
    self._seed = int(train_cfg.seed)
    self.flops_per_token = flops_per_token
    if flops_per_token:
      from lm.train.flops import peak_flops

      peak = peak_flops(self.mesh.devices.flat[0])
      self._peak = peak * self.mesh.devices.size if peak else None
    self.spike_factor = float(train_cfg.spike_factor)
    self.spike_warmup = int(train_cfg.spike_warmup)
    self.spike_decay = float(train_cfg.spike_ema)
    self.loss_ema: float | None = None
    self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1),
                               out_shardings=(_tree_shardings(self.params),
                                              _tree_shardings(self.opt_state), None))
    self._eval_step = jax.jit(self._eval_fn)
    log.info("trainable parameters: %s of %s", f"{self.n_trainable:,}",
             f"{self.n_trainable + sum(x.size for x in jax.tree.leaves(rest)):,}")

  @property
  def model(self) -> nnx.Module:
    """The model with the current trainable state (shares arrays; do not donate them)."""
    return nnx.merge(self.graphdef, self.params, self.rest)

  def host_model(self) -> nnx.Module:
    """The model with every array whole on this process, for export and host-side scoring. In a
    multi-process run every process must call it (sharded arrays are gathered across them)."""
    if jax.process_count() == 1:
      return self.model
    whole = lambda tree: jax.tree.map(lambda x: jnp.asarray(sharding.host_array(x)), tree)
    return nnx.merge(self.graphdef, whole(self.params), whole(self.rest))

  def _merged(self, params, rest, train: bool = True):
    """The model at this trace level (fresh Variables: nnx forbids mutating, e.g. dropout rng
    counts, variables created at another trace level)."""
    m = nnx.merge(self.graphdef, _fresh(params), _fresh(rest))
    if not train:
      m.eval()
    return m

  def _reseeded(self, params, rest, key):
    """`rest` with every dropout stream reseeded from `key`."""
    m = self._merged(params, rest)
    lora.set_dropout_key(m, key)
    return nnx.split(m, self.trainable, ...)[2]

  def _step_fn(self, params, opt_state, rest, batch, step, max_loss):
    base_key = jax.random.fold_in(jax.random.key(self._seed), step)

    def micro(carry, mb_and_i):
      mb, i = mb_and_i
      mb = jax.tree.map(lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb)

      rest_i = self._reseeded(params, rest, jax.random.fold_in(base_key, i))

      def loss_of(p):
        return self.loss_fn(self._merged(p, rest_i), mb, self.loss_cfg)

      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      acc = jax.tree.map(jnp.add, carry, grads)
      return acc, metrics

    split = lambda x: x.reshape((self.accum, x.shape[0] // self.accum) + x.shape[1:])
    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, metrics = jax.lax.scan(micro, zeros, (jax.tree.map(split, batch), jnp.arange(self.accum)))
    grads = jax.tree.map(lambda g: g / self.accum, grads)
    metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
    metrics["grad_norm"] = optax.global_norm(grads)
    updates, new_opt_state = self.tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    metrics["lr"] = self.schedule(step)
    if self.spike_factor > 0:  # a spike leaves params and moments as they were
      ok = metrics["loss"] <= max_loss
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
      new_params, new_opt_state = keep(new_params, params), keep(new_opt_state, opt_state)
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    return new_params, new_opt_state, metrics

  def _eval_fn(self, params, rest, batch):
    _, metrics = self.loss_fn(self._merged(params, rest, train=False), batch, self.loss_cfg)
    return metrics

  def _device_batch(self, batch: dict) -> dict:
    """Global numpy batch -> arrays sharded on the batch axis (each process feeds its rows)."""
    n_proc, pid = jax.process_count(), jax.process_index()
    out = {}
    for k, v in batch.items():
      v = np.asarray(v)
      rows = v.shape[0] // n_proc
      out[k] = jax.make_array_from_process_local_data(
          sharding.batch_sharding(self.mesh, v.ndim), v[pid * rows:(pid + 1) * rows], v.shape)
    return out

  def _check_batch(self, batch: dict) -> None:
    """Token ids inside the vocabulary and sequences within max_seq_len, before anything is
    traced. Packed rows hold several sequences: their `positions` say how long each one is."""
    for k, v in batch.items():
      if k == "tokens" or k.endswith("_tokens"):
        inputs.token_array(v, vocab_size=self._vocab_size, what=f"batch[{k!r}]")
    if "positions" in batch:
      longest, what = int(np.max(batch["positions"], initial=-1)) + 1, "sequences reach position"
    else:
      longest, what = int(np.shape(batch.get("tokens", np.zeros((0,))))[-1]), "rows have"
    if longest > self._max_seq_len:
      raise inputs.InputError(
          f"batch {what} {longest} tokens, more than the model's max_seq_len "
          f"{self._max_seq_len}; lower data.max_length.")

  def train_step(self, batch: dict) -> dict[str, float]:
    """One optimizer step on a global batch; returns host metrics (raises on a non-finite loss)."""
    self._check_batch(batch)
    n_tokens = int(np.asarray(batch["attn_mask"]).sum()) if "attn_mask" in batch else int(
        np.asarray(batch["tokens"]).size)
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      self.params, self.opt_state, metrics = self._train_step(
          self.params, self.opt_state, self.rest, self._device_batch(batch),
          jnp.asarray(self.step, jnp.int32), jnp.asarray(self._max_loss(), jnp.float32))
    metrics = {k: host_metric(v) for k, v in metrics.items()}
    if not isinstance(metrics.get("loss"), float):
      name = getattr(self.loss_fn, "__name__", "loss_fn")
      raise ValueError(f"{name} returned no scalar 'loss' metric; the trainer reports and checks "
                       "it at every step (add metrics['loss'] = loss).")
    dt = time.perf_counter() - t0
    if self.times.compile_s == 0.0:
      self.times.compile_s = dt
    else:
      self.times.steady_s += dt
      self.times.steady_steps += 1
      self.times.steady_tokens += n_tokens
    self.step += 1
    metrics.update(step_s=dt, tokens=n_tokens, tokens_per_s=n_tokens / dt)
    if self.flops_per_token:
      metrics["tflops_per_s"] = n_tokens * self.flops_per_token / dt / 1e12
      if self._peak:
        metrics["mfu"] = n_tokens * self.flops_per_token / dt / self._peak
    if not math.isfinite(metrics["loss"]):
      raise NonFiniteLossError(f"loss is {metrics['loss']} at step {self.step}")
    if not metrics.get("skipped"):
      d = self.spike_decay
      self.loss_ema = metrics["loss"] if self.loss_ema is None else (
          d * self.loss_ema + (1 - d) * metrics["loss"])
    return metrics

  def _max_loss(self) -> float:
    """The loss above which the spike guard skips this step (inf when it is off or warming up)."""
    if self.spike_factor <= 0 or self.loss_ema is None or self.step < self.spike_warmup:
      return float("inf")
    return self.spike_factor * self.loss_ema

  def evaluate(self, batches) -> dict[str, float | np.ndarray]:
    """Mean of the loss's metrics over `batches` (eval mode: no dropout)."""
    sums: dict[str, float | np.ndarray] = {}
    n = 0
    with jax.set_mesh(self.mesh):
      for batch in batches:
        self._check_batch(batch)
        m = self._eval_step(self.params, self.rest, self._device_batch(batch))
        for k, v in m.items():
          sums[k] = sums.get(k, 0.0) + host_metric(v)
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}

  def save(self, ckpt: Checkpointer, data_state: Any = None, force: bool = False) -> bool:
    extra = {"data_state": json.dumps(data_state) if data_state is not None else None,
             "loss_ema": self.loss_ema}
    return ckpt.save(self.step, self.params, opt_state=self.opt_state, extra=extra, force=force)

  def restore(self, ckpt: Checkpointer, step: int | None = None) -> Any:
    """Restore trainable state, optimizer state and step; returns the saved data-iterator state."""
    opt_state, extra = ckpt.restore(self.params, step=step, opt_state=self.opt_state)
    self.opt_state = opt_state
    self.step = int(extra["step"])
    self.loss_ema = extra.get("loss_ema")
    data_state = extra.get("data_state")
    return json.loads(data_state) if data_state else None

  def fit(self, data_iter: Iterator[dict], *, run_dir=None, ckpt: Checkpointer | None = None,
          eval_batches: Callable[[], Any] | None = None,
          evaluate: Callable[[], dict] | None = None, resume: bool = False
          ) -> list[dict[str, float | np.ndarray]]:
    """Train to `train.steps`: metrics every step, eval every `eval_every` (and at 0 and the end),
    checkpoints every `checkpoint_every`. `data_iter` is a grain iterator or any iterator with
    `get_state`/`set_state` (its state is saved); one with `pop_metrics() -> dict` (an online-RL
    rollout stream) adds host metrics about the batch it made to the step's. Eval is the loss's
    metrics over `eval_batches()`, or `evaluate()` (e.g. held-out rollouts) when given.

    A NaN/inf loss stops the run with `NonFiniteLossError` naming the step; the last good
    checkpoint is left as it was.
    """
    from tqdm import tqdm

    cfg = self.cfg
    steps = int(cfg.steps)
    eval_every = int(cfg.eval_every)
    ckpt_every = int(cfg.checkpoint_every)
    if resume and ckpt is not None and ckpt.latest_step is not None:
      data_state = self.restore(ckpt)
      if data_state is not None:
        data_iter.set_state(data_state)
      if run_dir is not None:
        run_dir.metrics.rewind(self.step)
      log.info("resumed at step %d from %s", self.step, ckpt.directory)
    history = []

    def record(scalars, prefix):
      scalars = {f"{prefix}/{k}": v for k, v in scalars.items()}
      if run_dir is not None:
        run_dir.metrics.write(self.step, scalars)
      history.append({"step": self.step, **scalars})

    if evaluate is None and eval_batches is not None:
      evaluate = lambda: self.evaluate(eval_batches())
    if evaluate is not None and self.step == 0:
      record(evaluate(), "eval")
    bar = tqdm(total=steps, initial=self.step, desc="train", unit="step", mininterval=2.0)
    t_log = time.perf_counter()
    while self.step < steps:
      batch = next(data_iter)
      try:
        metrics = self.train_step(batch)
      except NonFiniteLossError as e:
        last = ckpt.latest_step if ckpt is not None else None
        where = (f"the last good checkpoint (step {last}) in {ckpt.directory} is kept"
                 if last is not None else "no checkpoint had been written")
        raise NonFiniteLossError(f"{e}; the run stopped and {where}. Lower train.lr, raise "
                                 "train.warmup_steps or check the data.") from None
      if hasattr(data_iter, "pop_metrics"):
        metrics.update(data_iter.pop_metrics())
      record(metrics, "train")
      bar.update(1)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
      if time.perf_counter() - t_log > 30 or self.step == steps:
        log.info("step %d/%d loss %.4f  %.0f tokens/s  lr %.2e", self.step, steps,
                 metrics["loss"], metrics["tokens_per_s"], metrics["lr"])
        t_log = time.perf_counter()
      if evaluate is not None and ((eval_every and self.step % eval_every == 0)
                                   or self.step == steps):
        record(evaluate(), "eval")
      if ckpt is not None and ((ckpt_every and self.step % ckpt_every == 0) or self.step == steps):
        self.save(ckpt, data_iter.get_state() if hasattr(data_iter, "get_state") else None)
    bar.close()
    return history
