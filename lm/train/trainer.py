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

Guards: a non-finite loss, a step that makes the trainable parameters non-finite (checked inside
the step, one fused reduction) and a stall (a zero gradient with a non-zero loss for
`train.stall_steps` consecutive steps) stop the run with a `DivergedError` naming the step and the
newest good checkpoint; a checkpoint whose state led there is marked bad in its digest
(`lm.train.checkpoint`), so `--resume` skips it. A non-finite state is never saved. During `fit`,
SIGTERM/SIGINT save a checkpoint at the next step boundary and raise `Preempted`.

Metrics are scalars or diagnostics of any fixed shape (e.g. a per-layer norm `[L]`, a histogram
of advantages `[bins]`): both are averaged over micro-batches (and eval batches); scalars come back
as floats, diagnostics as numpy arrays, and the run's `metrics.jsonl` holds them as lists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm import heads, inputs, lora, sharding
from lm.train import aot
from lm.train.checkpoint import Checkpointer, all_finite
from lm.train.rundir import read_history

log = logging.getLogger(__name__)


class DivergedError(FloatingPointError):
  """Training cannot go on from here; the message names the step (and, from `fit`, the newest
  good checkpoint). `bad_from`: the checkpoints of this step and later hold the state that led
  here (`why` says how), so `fit` marks them bad; None when every saved one is still good."""

  def __init__(self, message: str, *, step: int, bad_from: int | None = None, why: str = "",
               fix: str = ""):
    super().__init__(message)
    self.step, self.bad_from, self.why, self.fix = step, bad_from, why, fix


class NonFiniteLossError(DivergedError):
  """The loss, or the trainable state an update made, became NaN/inf."""


class StalledError(DivergedError):
  """A zero gradient with a non-zero loss for `train.stall_steps` consecutive steps."""


class Preempted(Exception):
  """A SIGTERM/SIGINT stopped `fit` at a step boundary, after it saved a checkpoint there
  (`checkpoint_dir`: the checkpoints' directory, None when `fit` had no checkpointer)."""

  def __init__(self, signal_name: str, step: int, checkpoint_dir):
    where = (f"checkpoint saved in {checkpoint_dir}" if checkpoint_dir
             else "no checkpointer: nothing saved")
    super().__init__(f"stopped by {signal_name} at step {step}; {where}")
    self.signal, self.step, self.checkpoint_dir = signal_name, step, checkpoint_dir


class _StopSignals:
  """When to stop for a signal: `stop_at(step)` at each step boundary names the signal to stop
  for, or None.

  One process: within the block, SIGTERM and SIGINT set `received` (their name); a second SIGINT
  raises KeyboardInterrupt at once (Ctrl-C twice: out now). Installed only in the main thread; the
  previous handlers come back when the block ends.

  Several processes must stop at the same step or the others wait forever in the next collective:
  JAX's preemption service (started by `jax.distributed.initialize`) catches a SIGTERM sent to any
  of them and agrees one step for all (`multihost_utils.reached_preemption_sync_point`, called by
  every process at every step), so no Python handler is installed over its own. SIGINT stays
  KeyboardInterrupt: a crash that `--resume` recovers from the last checkpoint."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}
    self._agreed = jax.process_count() > 1
    if self._agreed and not _preemption_service():
      self._agreed = False
      log.warning("several processes but no JAX preemption service "
                  "(jax_enable_preemption_service is off): a SIGTERM ends the run without a save")

  def stop_at(self, step: int) -> str | None:
    if self._agreed:
      from jax.experimental import multihost_utils

      return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
    return self.received

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received is not None:
      raise KeyboardInterrupt
    # no logging here: a handler that writes could re-enter a write it interrupted
    self.received = self.received or signal.Signals(signum).name

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _preemption_service() -> bool:
  """Whether JAX's preemption sync manager runs in this process (multi-process runs)."""
  from jax._src import distributed

  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


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
    self.tx = make_optimizer(train_cfg)
    self.schedule = make_schedule(train_cfg)
    # A model of shapes alone (nnx.eval_shape) gives an abstract trainer: its state is
    # ShapeDtypeStructs with their shardings, for `compile_step` on any mesh (lm.train.aot).
    self.abstract = aot.is_abstract(params)
    params_sh, rest_sh = (sharding.state_shardings(t, self.mesh) for t in (params, rest))
    if self.abstract:
      self.params, self.rest = aot.abstract(params, params_sh), aot.abstract(rest, rest_sh)
    else:
      # Copies (may_alias=False): the step donates them, and the caller's model keeps its arrays.
      self.params = jax.device_put(params, params_sh, may_alias=False)
      self.rest = jax.device_put(rest, rest_sh)
    opt_shapes = jax.eval_shape(self.tx.init, self.params)
    opt_sh = self._opt_shardings(self.params, opt_shapes)
    if self.abstract:
      self.opt_state = aot.abstract(opt_shapes, opt_sh)
    else:
      with jax.set_mesh(self.mesh):
        self.opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(self.params)
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
    # read with a default until every config names it; 0 turns the stall guard off
    self.stall_steps = int(getattr(train_cfg, "stall_steps", 5))
    self._stalled_since: int | None = None  # first step of the current run of zero gradients
    self._finite: bool | None = None  # whether self.params are all finite; None: not known
    self._train_step = jax.jit(self._step_fn, donate_argnums=(0, 1),
                               out_shardings=(_tree_shardings(self.params),
                                              _tree_shardings(self.opt_state), None, None))
    self._eval_step = jax.jit(self._eval_fn)
    log.info("trainable parameters: %s of %s", f"{self.n_trainable:,}",
             f"{self.n_trainable + sum(x.size for x in jax.tree.leaves(rest)):,}")

  def _opt_shardings(self, params, opt_shapes):
    """Shardings for the optimizer state of shapes `opt_shapes`: each moment sharded as its
    parameter (its path ends with the parameter's: `[1][0].mu['embed']...`), the rest (step
    counts) replicated."""
    by_path = {path: x for path, x in jax.tree_util.tree_leaves_with_path(params)}

    def one(path, leaf):
      for i in range(len(path)):  # the longest tail of the path that is a parameter's
        param = by_path.get(path[i:])
        if param is not None and param.shape == leaf.shape:
          return param.sharding
      return sharding.replicated(self.mesh)

    return jax.tree_util.tree_map_with_path(one, opt_shapes)

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
    """One update: `(params, opt_state, metrics, finite)`, `finite` saying whether the new
    trainable parameters are all finite (what the trainer may save)."""
    base_key = jax.random.fold_in(jax.random.key(self._seed), step)

    def micro(carry, mb_and_i):
      mb, i = mb_and_i
      mb = jax.tree.map(lambda x: sharding.constrain(x, ("act_batch",) + (None,) * (x.ndim - 1)), mb)

      rest_i = self._reseeded(params, rest, jax.random.fold_in(base_key, i))

      def loss_of(p):
        return self.loss_fn(self._merged(p, rest_i), mb, self.loss_cfg)

      (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
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
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_params)]))
    return new_params, new_opt_state, metrics, finite

  def _eval_fn(self, params, rest, batch):
    _, metrics = self.loss_fn(self._merged(params, rest, train=False), batch, self.loss_cfg)
    return metrics

  def compile_step(self, batch: dict):
    """The training step compiled ahead of time for this trainer's mesh (any topology, no
    device needed) on a global batch of `batch`'s shapes and dtypes (anything with .shape and
    .dtype); returns jax's `Compiled` (memory_analysis, cost_analysis)."""
    specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                     sharding=sharding.batch_sharding(self.mesh, len(v.shape)))
             for k, v in batch.items()}
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=sharding.replicated(self.mesh))
    with jax.set_mesh(self.mesh):
      return self._train_step.lower(self.params, self.opt_state, self.rest, specs,
                                    scalar(jnp.int32), scalar(jnp.float32)).compile()

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
    """One optimizer step on a global batch; returns host metrics. Raises `NonFiniteLossError` on
    a non-finite loss or parameters, `StalledError` on a stall (see the module docstring)."""
    self._check_batch(batch)
    n_tokens = int(np.asarray(batch["attn_mask"]).sum()) if "attn_mask" in batch else int(
        np.asarray(batch["tokens"]).size)
    t0 = time.perf_counter()
    with jax.set_mesh(self.mesh):
      self.params, self.opt_state, metrics, finite = self._train_step(
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
    self._check_progress(metrics, bool(sharding.host_array(finite)))
    if not metrics.get("skipped"):
      d = self.spike_decay
      self.loss_ema = metrics["loss"] if self.loss_ema is None else (
          d * self.loss_ema + (1 - d) * metrics["loss"])
    return metrics

  def _check_progress(self, metrics: dict, finite: bool) -> None:
    """Raise when the step just taken (`self.step`) cannot be trained on from."""
    self._finite = finite
    loss, step = metrics["loss"], self.step
    lower = "Lower train.lr, raise train.warmup_steps or check the data"
    if not math.isfinite(loss):
      # the state before this step (a checkpoint at step - 1) gave this loss
      raise NonFiniteLossError(f"loss is {loss} at step {step}", step=step, bad_from=step - 1,
                               why=f"the loss of step {step} computed from it was {loss}",
                               fix=lower)
    if not finite:
      raise NonFiniteLossError(
          f"the update of step {step} made the trainable parameters non-finite (its loss was "
          f"{loss:.6g}); that state is not saved", step=step, fix=lower)
    if self.stall_steps <= 0 or not (metrics["grad_norm"] < 1e-30 and loss != 0):
      self._stalled_since = None
      return
    if self._stalled_since is None:
      self._stalled_since = step
    since = self._stalled_since
    if step - since + 1 < self.stall_steps:
      return
    uniform = math.log(self._vocab_size)
    at = (f" (= ln {self._vocab_size}, the uniform prediction)"
          if abs(loss - uniform) <= 1e-3 * uniform else "")
    raise StalledError(
        f"the run stalled at step {step}: the loss sits at {loss:.6g}{at} with zero gradient "
        f"since step {since} (train.stall_steps={self.stall_steps})", step=step,
        bad_from=since - 1, why=f"the gradient computed from it at step {since} was zero",
        fix="Lower train.lr or raise train.warmup_steps (train.stall_steps=0 turns this guard off)")

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
    """Save the trainable and optimizer state at `self.step`; a non-finite state is refused."""
    finite = all_finite(self.params) if self._finite is None else self._finite
    if not finite:
      raise NonFiniteLossError(f"the trainable state at step {self.step} is not finite; it was "
                               "not saved", step=self.step)
    extra = {"data_state": json.dumps(data_state) if data_state is not None else None,
             "loss_ema": self.loss_ema}
    return ckpt.save(self.step, self.params, opt_state=self.opt_state, extra=extra, force=force,
                     finite=True)

  def restore(self, ckpt: Checkpointer, step: int | None = None) -> Any:
    """Restore trainable state, optimizer state and step from `step` (verified), or from the
    newest intact checkpoint; returns the saved data-iterator state."""
    opt_state, extra = ckpt.restore(self.params, step=step, opt_state=self.opt_state)
    self.opt_state = opt_state
    self.step = int(extra["step"])
    self.loss_ema = extra.get("loss_ema")
    self._finite, self._stalled_since = None, None
    data_state = extra.get("data_state")
    return json.loads(data_state) if data_state else None

  def fit(self, data_iter: Iterator[dict], *, run_dir=None, ckpt: Checkpointer | None = None,
          eval_batches: Callable[[], Any] | None = None,
          evaluate: Callable[[], dict] | None = None, resume: bool = False,
          resume_step: int | None = None) -> list[dict[str, float | np.ndarray]]:
    """Train to `train.steps`: metrics every step, eval every `eval_every` (and at 0 and the end),
    checkpoints every `checkpoint_every`. `data_iter` is a grain iterator or any iterator with
    `get_state`/`set_state` (its state is saved); one with `pop_metrics() -> dict` (an online-RL
    rollout stream) adds host metrics about the batch it made to the step's. Eval is the loss's
    metrics over `eval_batches()`, or `evaluate()` (e.g. held-out rollouts) when given.

    `resume`: continue from the newest intact checkpoint, or from `resume_step` (verified); the
    checkpoints and metrics after it are dropped. Returns the whole run's history: on a resume,
    the records of `run_dir`'s `metrics.jsonl` up to the resumed step, then this call's.

    A `DivergedError` (non-finite loss or state, a stall) stops the run naming the step and the
    newest good checkpoint, after marking bad the checkpoints whose state led there. A SIGTERM or
    SIGINT saves a checkpoint at the next step boundary and raises `Preempted`.
    """
    from lm.progress import Progress

    cfg = self.cfg
    steps = int(cfg.steps)
    eval_every = int(cfg.eval_every)
    ckpt_every = int(cfg.checkpoint_every)
    resume = resume or resume_step is not None
    if resume and ckpt is not None and (ckpt.all_steps() or resume_step is not None):
      data_state = self.restore(ckpt, resume_step)
      if data_state is not None:
        data_iter.set_state(data_state)
      ckpt.discard_after(self.step)
      if run_dir is not None:
        run_dir.metrics.rewind(self.step)
      log.info("resumed at step %d from %s", self.step, ckpt.directory)
    elif resume:  # nothing to resume from: the run starts over
      if ckpt is not None:
        ckpt.warn_cut_off()  # e.g. its first save was killed mid-write
      if run_dir is not None:
        run_dir.metrics.rewind(-1)
    history = []
    if resume and run_dir is not None and getattr(run_dir, "primary", True):
      history = read_history(run_dir.path / "metrics.jsonl")

    def record(scalars, prefix):
      scalars = {f"{prefix}/{k}": v for k, v in scalars.items()}
      if run_dir is not None:
        run_dir.metrics.write(self.step, scalars)
      history.append({"step": self.step, **scalars})

    def data_state():
      return data_iter.get_state() if hasattr(data_iter, "get_state") else None

    if evaluate is None and eval_batches is not None:
      evaluate = lambda: self.evaluate(eval_batches())
    with _StopSignals() as signals:
      if evaluate is not None and self.step == 0:
        record(evaluate(), "eval")
      bar = Progress(steps, "train", "step", initial=self.step, logger=log)
      while self.step < steps:
        batch = next(data_iter)
        try:
          metrics = self.train_step(batch)
        except DivergedError as e:
          bar.close()
          raise type(e)(self._stopped_message(e, ckpt), step=e.step, bad_from=e.bad_from,
                        why=e.why, fix=e.fix) from None
        if hasattr(data_iter, "pop_metrics"):
          metrics.update(data_iter.pop_metrics())
        record(metrics, "train")
        bar.update(1, loss=f"{metrics['loss']:.4f}", tokens_per_s=f"{metrics['tokens_per_s']:.0f}",
                   lr=f"{metrics['lr']:.2e}")
        if evaluate is not None and ((eval_every and self.step % eval_every == 0)
                                     or self.step == steps):
          record(evaluate(), "eval")
        saved = False
        if ckpt is not None and ((ckpt_every and self.step % ckpt_every == 0)
                                 or self.step == steps):
          saved = self.save(ckpt, data_state())
        received = signals.stop_at(self.step)
        if received and self.step < steps:  # a step boundary: save here and stop
          # (after the last step the run is done: the task finishes its export and report)
          if ckpt is not None and not saved:
            self.save(ckpt, data_state(), force=True)
          bar.close()
          stop = Preempted(received, self.step, ckpt.directory if ckpt else None)
          log.warning("%s", stop)
          raise stop
      bar.close()
    return history

  def _stopped_message(self, e: DivergedError, ckpt: Checkpointer | None) -> str:
    """`e`'s message with what became of the checkpoints and how to go on; marks bad those from
    `e.bad_from` on."""
    marked = []
    if ckpt is not None and e.bad_from is not None:
      marked = [s for s in ckpt.all_steps() if s >= e.bad_from]
      for s in marked:
        ckpt.mark_bad(s, e.why)
    msg = f"{e}; the run stopped"
    if len(marked) == 1:
      msg += f"; checkpoint {marked[0]} held the state that led here and is marked bad"
    elif marked:
      msg += (f"; checkpoints {', '.join(map(str, marked))} held the states that led here and "
              "are marked bad")
    good = ckpt.newest_good() if ckpt is not None else None
    if good is not None:
      return (f"{msg}; the last good checkpoint (step {good}) in {ckpt.directory} is kept. "
              f"{e.fix}, then continue with --resume (or --resume_step={good}).")
    where = (f"no good checkpoint is left in {ckpt.directory}" if ckpt is not None
             and ckpt.all_steps() else "no checkpoint had been written")
    return f"{msg}; {where}. {e.fix}, then start a new run (a new --workdir)."
