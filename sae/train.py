"""The vectorised SAE trainer: I instances (seeds × learning rates × sparsity coefficients × data
sources) trained in one compiled step with `jax.vmap` over a leading instance axis.

Each instance has its own parameters, Adam moments, learning rate, gradient clip (by its own global
norm) and dead-latent counter; instances share the architecture (`SAEConfig`: width, activation,
k). A step takes a batch `[I, B, d]` (instance i's rows; the same rows broadcast when instances
share a source) and returns per-instance metrics `[I]`. Vectorised and one-at-a-time training give
the same parameters (`tests/test_sae_train.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae import sae as sae_lib


@dataclasses.dataclass(frozen=True)
class Instances:
  """Per-instance settings, each `[I]`: seed, lr, max_grad_norm, and the sparsity coefficients a
  config may vary (l1_coef for relu, l0_coef for jumprelu)."""
  seed: np.ndarray
  lr: np.ndarray
  max_grad_norm: np.ndarray
  l1_coef: np.ndarray
  l0_coef: np.ndarray

  @classmethod
  def grid(cls, cfg: sae_lib.SAEConfig, *, seeds=(0,), lrs=(1e-3,), max_grad_norm=1.0,
           l1_coefs=None, l0_coefs=None) -> "Instances":
    """The product seeds × lrs × coefficients, flattened in that order."""
    l1s = l1_coefs if l1_coefs is not None else (cfg.l1_coef,)
    l0s = l0_coefs if l0_coefs is not None else (cfg.l0_coef,)
    rows = [(s, lr, l1, l0) for s in seeds for lr in lrs for l1 in l1s for l0 in l0s]
    s, lr, l1, l0 = (np.asarray(c) for c in zip(*rows))
    return cls(seed=s.astype(np.int32), lr=lr.astype(np.float32),
               max_grad_norm=np.full(len(rows), max_grad_norm, np.float32),
               l1_coef=l1.astype(np.float32), l0_coef=l0.astype(np.float32))

  def __len__(self) -> int:
    return len(self.seed)


def optimizer(lr, max_grad_norm):
  """Clip by the global norm, then Adam with the lr held in the state (inject_hyperparams), so
  the lr may differ per vmapped instance; `update` reads it from the state."""
  return optax.chain(optax.clip_by_global_norm(max_grad_norm),
                     optax.inject_hyperparams(optax.adam)(learning_rate=lr))


def init_state(cfg: sae_lib.SAEConfig, inst: Instances, data_mean=None) -> dict:
  """Stacked state of every instance: params, opt_state, steps since each latent last fired."""
  def one(seed, lr, clip):
    params = sae_lib.init(jax.random.key(seed), cfg, data_mean)
    # the chain's clip is rebuilt from `clip` at every step, so only the lr lives in the state
    return {"params": params, "opt_state": optimizer(lr, clip).init(params),
            "since_fired": jnp.zeros((cfg.n_latents,), jnp.int32)}

  state = jax.vmap(one)(jnp.asarray(inst.seed), jnp.asarray(inst.lr),
                        jnp.asarray(inst.max_grad_norm))
  return {**state, "step": jnp.zeros((), jnp.int32)}


def instance_shardings(tree, mesh):
  """The NamedShardings (same tree as `tree`: arrays or ShapeDtypeStructs) of a stacked state or
  batches `[I, ...]` on `mesh`: every leaf's leading instance axis split over the mesh's batch axes
  (`instances` in `lm.sharding.RULES`, where their size divides I; else replicated), scalars
  replicated. The vmapped steps then run each device's instances on that device: instances never
  talk to each other."""
  from jax.sharding import NamedSharding

  from lm import sharding

  def one(a):
    names = ("instances",) + (None,) * (a.ndim - 1) if a.ndim else None
    return NamedSharding(mesh, sharding.logical_spec(names, a.shape, mesh))

  return jax.tree.map(one, tree)


def shard_instances(tree, mesh):
  """`tree` (a stacked state, or batches `[I, ...]`) placed on `mesh` by `instance_shardings`."""
  return jax.device_put(tree, instance_shardings(tree, mesh))


def abstract_instances(init, mesh):
  """The state `init()` returns, as ShapeDtypeStructs with the shardings `shard_instances` gives
  it on `mesh`: `jax.eval_shape` of the real initialiser (nothing computed, no weights), so an
  ahead-of-time compile sees the shapes, dtypes and placement a run has."""
  from lm.train import aot

  shapes = jax.eval_shape(init)
  return aot.abstract(shapes, instance_shardings(shapes, mesh))


def _instance_step(cfg: sae_lib.SAEConfig, state, x_bd, clip, l1_coef, l0_coef, aux: bool):
  """One instance's update; the sparsity coefficients are traced, so they may differ per
  instance under vmap. aux=False skips AuxK (its loss is 0 while no latent is dead)."""
  params = state["params"]
  dead = state["since_fired"] >= cfg.dead_after if aux else None

  def loss(p):
    return sae_lib.loss_fn(p, x_bd, cfg, dead=dead, l1_coef=l1_coef, l0_coef=l0_coef)

  (_, (metrics, z)), grads = jax.value_and_grad(loss, has_aux=True)(params)
  grads = sae_lib.remove_parallel_grads(params, grads, cfg)
  grad_norm = optax.global_norm(grads)
  opt = optimizer(0.0, clip)  # the lr comes from the state (inject_hyperparams)
  updates, opt_state = opt.update(grads, state["opt_state"], params)
  params = sae_lib.renormalise(optax.apply_updates(params, updates), cfg)
  fired = jnp.any(z > 0, axis=0)
  since = jnp.where(fired, 0, state["since_fired"] + 1)
  metrics = {**metrics, "grad_norm": grad_norm, "dead": jnp.sum(since >= cfg.dead_after)}
  if cfg.aux_coef and not aux:
    metrics["aux"] = jnp.zeros(())
  return {"params": params, "opt_state": opt_state, "since_fired": since}, metrics


def make_step(cfg: sae_lib.SAEConfig, inst: Instances):
  """`step(state, x_ibd) -> (state, metrics [I])`, jitted, the state donated. AuxK's top-k runs
  only on steps where some instance has a dead latent (one `cond` outside the vmap, so it stays
  a branch rather than a select)."""
  # host arrays: building the step puts nothing on a device (an ahead-of-time compile has none)
  clip, l1, l0 = (np.asarray(a, np.float32) for a in (inst.max_grad_norm, inst.l1_coef,
                                                      inst.l0_coef))

  def instances(inner, x_ibd, aux: bool):
    return jax.vmap(lambda s, x, c, a, b: _instance_step(cfg, s, x, c, a, b, aux))(
        inner, x_ibd, clip, l1, l0)

  def step(state, x_ibd):
    inner = {k: v for k, v in state.items() if k != "step"}
    if cfg.aux_coef:
      any_dead = jnp.any(inner["since_fired"] >= cfg.dead_after)
      new, metrics = jax.lax.cond(any_dead, lambda: instances(inner, x_ibd, True),
                                  lambda: instances(inner, x_ibd, False))
    else:
      new, metrics = instances(inner, x_ibd, False)
    return {**new, "step": state["step"] + 1}, metrics

  return jax.jit(step, donate_argnums=0)


def fit(cfg: sae_lib.SAEConfig, inst: Instances, batches, *, steps: int, data_mean=None,
        log_every: int = 100, on_metrics=None) -> tuple[dict, list[dict[str, Any]]]:
  """Trains every instance for `steps` on `batches` (an iterator of `[I, B, d]` or `[B, d]`,
  broadcast to all instances). `on_metrics(step, metrics)` gets host arrays `[I]` per metric
  every `log_every` steps. Returns the final state and the logged records."""
  state = init_state(cfg, inst, data_mean)
  step = make_step(cfg, inst)
  history = []
  for t in range(steps):
    x = jnp.asarray(next(batches))
    if x.ndim == 2:
      x = jnp.broadcast_to(x, (len(inst),) + x.shape)
    state, metrics = step(state, x)
    if (t + 1) % log_every == 0 or t + 1 == steps:
      record = {k: np.asarray(v) for k, v in metrics.items()}
      history.append({"step": t + 1, **record})
      if on_metrics is not None:
        on_metrics(t + 1, record)
  return state, history
