"""Universal sparse autoencoders (Thasarathan et al. 2025): one TopK encoder and one decoder per
model, one shared latent. A step draws a source i, encodes A_i and reconstructs every model j
from that code: L = Σ_j L(A_j, dec_j(enc_i(A_i))).

Update rules (`rule`):
  official  as the official code (YorkUCVIL/UniversalSAE train.py): only source i's optimizer
            steps. Its encoder gets ∇ Σ_j L_j, its decoder ∇ L_i (the only term it is in); the other
            decoders' cross gradients are dropped, and their Adam moments and step counts do not
            advance.
  joint     every parameter gets the gradient of the summed loss and every source's optimizer
            steps (the encoders not drawn see a zero gradient, their moments decay).

Losses (`loss`), per target j with e = A_j − Â_j over a batch:
  mse        mean over rows of Σ_d e² (the PA5 report; the same expression as `sae.loss_fn`, so a
             one-source USAE is the plain SAE)
  l1         mean |e| + aux_coef · mean |e − a D_j|, a the m/2 largest of ReLU(pre_i) − z_i
             (the official code's criterion: the strongest pre-codes TopK did not keep)
  frobenius  ‖e‖_F, not squared (the USAE paper's Fig. 3)

AuxK (`auxk_coef` > 0; off in the official code): latents silent in source i's code for
`dead_after` steps on which i was drawn learn, from i's top pre-activations among them, to explain
the residual of A_i's own reconstruction (the plain SAE's AuxK on the drawn source).

Each source is an `sae.SAEConfig` TopK SAE of its own width with the shared n_latents and k; the
decoder-norm rule is theirs (`project` or `forward`; the official code normalises in the forward).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sae import metrics as sae_metrics
from sae import sae as sae_lib
from sae import train as sae_train

RULES = ("official", "joint")
LOSSES = ("mse", "l1", "frobenius")


@dataclasses.dataclass(frozen=True)
class USAEConfig:
  d_ins: tuple[int, ...]
  n_latents: int
  k: int = 32
  loss: str = "mse"
  rule: str = "official"
  aux_coef: float = 0.1
  decoder_norm: str = "project"
  auxk_coef: float = 0.0  # AuxK (Gao et al.) per drawn source; 0: none, as the official code
  dead_after: int = 1000  # steps with source i drawn and latent c silent in its code

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"rule={self.rule!r}: use one of {RULES}.")
    if self.loss not in LOSSES:
      raise ValueError(f"loss={self.loss!r}: use one of {LOSSES}.")

  def source(self, j: int) -> sae_lib.SAEConfig:
    return sae_lib.SAEConfig(d_in=self.d_ins[j], n_latents=self.n_latents, activation="topk",
                             k=self.k, decoder_norm=self.decoder_norm, aux_coef=0.0)


def init(key, cfg: USAEConfig, data_means=None) -> list[dict]:
  """Source j's SAE from `fold_in(key, j)`."""
  means = data_means or [None] * len(cfg.d_ins)
  return [sae_lib.init(jax.random.fold_in(key, j), cfg.source(j), means[j])
          for j in range(len(cfg.d_ins))]


def _target_loss(params_j, z, pre, x_j, cfg: USAEConfig, scfg):
  e = x_j - sae_lib.decode(params_j, z, scfg)
  if cfg.loss == "mse":
    return jnp.mean(jnp.sum(e ** 2, axis=-1))
  if cfg.loss == "frobenius":
    return jnp.sqrt(jnp.sum(e ** 2))
  unchosen = jax.nn.relu(pre) - z
  half = max(cfg.n_latents // 2, 1)
  a = jnp.where(sae_lib.topk_mask(unchosen, half), unchosen, 0.0)
  aux = jnp.mean(jnp.abs(e - a @ sae_lib.dictionary(params_j, scfg)))
  return jnp.mean(jnp.abs(e)) + cfg.aux_coef * aux


def loss_fn(params: list[dict], source: int, xs, cfg: USAEConfig, dead=None):
  """(Σ_j L_j [+ auxk_coef · AuxK_i], (metrics, z)) with source i = `source` encoded; xs[j]
  `[B, d_j]` the same B items. `dead` `[m]` bool: latents dead for source i, which AuxK trains to
  explain the residual of A_i's own reconstruction (the plain SAE's `aux_loss` on source i)."""
  scfg = cfg.source(source)
  pre, z = sae_lib.encode(params[source], xs[source], scfg)
  recon = [sae_lib.decode(params[j], z, cfg.source(j)) for j in range(len(xs))]
  per = [_target_loss(params[j], z, pre, xs[j], cfg, cfg.source(j)) for j in range(len(xs))]
  r2 = jnp.stack([sae_metrics.r2_global(xs[j], recon[j]) for j in range(len(xs))])
  loss = sum(per)
  metrics = {"loss_per_target": jnp.stack(per), "r2_row": r2,
             "l0": jnp.mean(jnp.sum(z > 0, axis=-1))}
  if dead is not None and cfg.auxk_coef:
    e = jax.lax.stop_gradient(xs[source] - recon[source])
    aux = sae_lib.aux_loss(params[source], pre, e, dead, scfg)
    loss = loss + cfg.auxk_coef * aux
    metrics["auxk"] = aux
  metrics["loss"] = loss
  return loss, (metrics, z)


def init_state(key, cfg: USAEConfig, lr: float, max_grad_norm: float = 1.0,
               data_means=None) -> dict:
  """Params and one optimizer state per source (its lr inside, `sae.train.optimizer`)."""
  params = init(key, cfg, data_means)
  opt = sae_train.optimizer(lr, max_grad_norm)
  return _own_buffers({"params": params, "opt_state": [opt.init(p) for p in params],
                       "since_fired": jnp.zeros((len(params), cfg.n_latents), jnp.int32)})


def init_instances(cfg: USAEConfig, seeds, lrs, max_grad_norms, data_means=None) -> dict:
  """Stacked states of I USAEs (leading axis I), one per (seed, lr, max_grad_norm)."""
  states = jax.vmap(lambda s, lr, c: init_state(jax.random.key(s), cfg, lr, c, data_means))(
      jnp.asarray(seeds), jnp.asarray(lrs, jnp.float32), jnp.asarray(max_grad_norms, jnp.float32))
  return _own_buffers(states)


def _own_buffers(tree):
  """Every leaf in a buffer of its own (equal leaves may come back shared, and the step donates)."""
  return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def _update(cfg: USAEConfig, state, source: int, xs, max_grad_norm):
  """One step of one USAE. Each source clips by its own global norm (the official code's
  per-model clip_grad_norm); `official` steps source `source` alone, `joint` every source."""
  params = state["params"]
  since = state["since_fired"]
  dead = since[source] >= cfg.dead_after
  (_, (metrics, z)), grads = jax.value_and_grad(
      lambda p: loss_fn(p, source, xs, cfg, dead), has_aux=True)(params)
  since = since.at[source].set(jnp.where(jnp.any(z > 0, axis=0), 0, since[source] + 1))
  metrics["dead"] = jnp.sum(since[source] >= cfg.dead_after)
  opt = sae_train.optimizer(0.0, max_grad_norm)  # the lr lives in each source's state
  stepping = [source] if cfg.rule == "official" else range(len(params))
  new_params, new_opt = list(params), list(state["opt_state"])
  for j in stepping:
    scfg = cfg.source(j)
    g = sae_lib.remove_parallel_grads(params[j], grads[j], scfg)
    updates, new_opt[j] = opt.update(g, state["opt_state"][j], params[j])
    new_params[j] = sae_lib.renormalise(optax.apply_updates(params[j], updates), scfg)
  return {"params": new_params, "opt_state": new_opt, "since_fired": since}, metrics


def make_step(cfg: USAEConfig, max_grad_norm: float = 1.0):
  """`step(state, source, xs) -> (state, metrics)`; one compiled program per source, the state
  donated (the official rule passes the other sources through without copying them)."""
  return jax.jit(functools.partial(_update, cfg, max_grad_norm=max_grad_norm), static_argnums=1,
                 donate_argnums=0)


def make_instances_step(cfg: USAEConfig, max_grad_norms):
  """`step(states, source, xs) -> (states, metrics [I])` for I stacked USAEs (`init_instances`)
  in one compiled, vmapped program. The source is drawn once per step for every instance (so the
  step stays one branch); xs[j] `[B, d_j]` are shared by all instances."""
  clips = np.asarray(max_grad_norms, np.float32)  # on no device until the step runs

  def step(states, source: int, xs):
    return jax.vmap(lambda s, c: _update(cfg, s, source, xs, c))(states, clips)

  return jax.jit(step, static_argnums=1, donate_argnums=0)


def r2_matrix(params: list[dict], xs, cfg: USAEConfig, metric=sae_metrics.r2_global):
  """R[i, j] = metric(A_j, dec_j(enc_i(A_i))) on held-out xs."""
  recon = []
  for i in range(len(xs)):
    _, z = sae_lib.encode(params[i], xs[i], cfg.source(i))
    recon.append([sae_lib.decode(params[j], z, cfg.source(j)) for j in range(len(xs))])
  return sae_metrics.r2_matrix(list(xs), recon, metric)


def codes(params: list[dict], xs, cfg: USAEConfig):
  """Each model's code of its own activations `[M][N, m]` (the universality statistics' input)."""
  return [sae_lib.encode(params[i], xs[i], cfg.source(i))[1] for i in range(len(xs))]
