"""Toy models of superposition (Elhage et al. 2022), many instances trained in one compiled step.

Model (the paper's ReLU output model): h = W x, x' = ReLU(Wᵀ h + b), W `[m, n]` per instance
(stored `[I, n, m]` as the notebook), b `[I, n]`. Feature i is U[0, 1) with probability p_i (the
density 1 − S) and 0 otherwise, independently. Loss of an instance: mean over the batch and the n
features of I_i (x_i − x'_i)²; the step minimises the sum over instances, so instances train
independently in one `jit` (each an independent problem; AdamW moments are per element).

Analysis (the paper's definitions): dimensions per feature D* = m / ‖W‖_F²; feature
dimensionality D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²; superposition of feature i Σ_{j≠i} (Ŵ_i · W_j)²;
for n = 2, m = 1 the phase of a trained model (`phase_of`) and the phase the closed-form losses
predict (`theoretical_phase`).

Code map: settings come from configs/toy_superposition.py; `run` is the launch task.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.progress import Progress

log = logging.getLogger(__name__)

PHASES = ("not_represented", "dedicated", "superposed")


def init(key, n_instances: int, n_features: int, n_hidden: int) -> dict:
  """W `[I, n, m]` Xavier-normal per instance (std √(2 / (n + m))), b `[I, n]` zeros."""
  std = np.sqrt(2.0 / (n_features + n_hidden))
  return {"W": std * jax.random.normal(key, (n_instances, n_features, n_hidden)),
          "b": jnp.zeros((n_instances, n_features))}


def forward(params: dict, x_ibn):
  """x' `[I, B, n]` = ReLU(Wᵀ W x + b) for every instance."""
  h_ibm = jnp.einsum("ibn,inm->ibm", x_ibn, params["W"])
  return jax.nn.relu(jnp.einsum("ibm,inm->ibn", h_ibm, params["W"]) + params["b"][:, None, :])


def sample(key, probability_in, batch: int):
  """Features `[I, B, n]`: U[0, 1) with probability p_in, else 0. One uniform u per entry serves
  both draws: the feature fires when u < p, and then u / p is U[0, 1) (half the random bits,
  which dominate a step on CPU)."""
  p = probability_in[:, None, :]
  u = jax.random.uniform(key, (probability_in.shape[0], batch, probability_in.shape[1]))
  return jnp.where(u < p, u / p, 0.0)


def instance_loss(params: dict, x_ibn, importance_in):
  """`[I]`: mean over the batch and features of I_i (x_i − x'_i)²."""
  return jnp.mean(importance_in[:, None, :] * (x_ibn - forward(params, x_ibn)) ** 2, axis=(1, 2))


def train(key, importance_in, probability_in, n_hidden: int, *, steps: int, batch: int,
          lr: float, weight_decay: float = 0.01, chunks: int = 10, label: str = "toy"):
  """Trains I instances (`importance_in`, `probability_in` `[I, n]`) at once; returns the params
  and the per-instance loss `[chunks, I]` at the end of each chunk of steps (AdamW, constant lr,
  as the paper's notebook)."""
  n_instances, n_features = importance_in.shape
  k_init, key = jax.random.split(key)
  params = init(k_init, n_instances, n_features, n_hidden)
  opt = optax.adamw(lr, weight_decay=weight_decay)
  importance_in = jnp.asarray(importance_in, jnp.float32)
  probability_in = jnp.asarray(probability_in, jnp.float32)

  def step(carry, k):
    params, opt_state = carry
    x = sample(k, probability_in, batch)
    loss_i, grads = jax.value_and_grad(lambda p: instance_loss(p, x, importance_in).sum())(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss_i

  @jax.jit
  def run_chunk(carry, keys):
    carry, _ = jax.lax.scan(step, carry, keys[:-1])
    x = sample(keys[-1], probability_in, batch)
    return carry, instance_loss(carry[0], x, importance_in)

  carry = (params, opt.init(params))
  per_chunk = max(steps // chunks, 1)
  losses = []
  progress = Progress(per_chunk * chunks, label, "step", logger=log)
  for _ in range(chunks):
    key, k = jax.random.split(key)
    carry, loss_i = run_chunk(carry, jax.random.split(k, per_chunk + 1))
    losses.append(np.asarray(loss_i))
    progress.update(per_chunk, mean_loss=f"{float(losses[-1].mean()):.3g}")
  progress.close()
  return jax.tree.map(np.asarray, carry[0]), np.stack(losses)


def dimensions_per_feature(w_inm):
  """D* `[I]` = m / ‖W‖_F²."""
  return w_inm.shape[-1] / np.sum(w_inm ** 2, axis=(1, 2))


def feature_geometry(w_inm) -> dict[str, np.ndarray]:
  """Per instance and feature `[I, n]`: norm ‖W_i‖, superposition Σ_{j≠i} (Ŵ_i · W_j)², and
  dimensionality D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)² (0 for a feature with W_i = 0)."""
  norm = np.linalg.norm(w_inm, axis=-1)
  unit = w_inm / np.maximum(norm, 1e-12)[..., None]
  dots2 = np.einsum("inm,ikm->ink", unit, w_inm) ** 2  # (Ŵ_i · W_k)²
  total = dots2.sum(-1)
  own = norm ** 2
  return {"norm": norm, "superposition": total - own,
          "dimensionality": np.where(total > 1e-12, own / np.maximum(total, 1e-12), 0.0)}


def phase_of(w_i2, threshold: float = 0.5) -> str:
  """The phase of a trained n = 2, m = 1 model from its two weights (feature 1, the extra
  feature 2): a feature is represented when |w| > threshold; both represented = superposed."""
  a, b = np.abs(np.ravel(w_i2)[:2]) > threshold
  if a and b:
    return "superposed"
  return "dedicated" if b else "not_represented"


def candidate_losses(relative_importance: float, density: float) -> dict[str, float]:
  """Closed-form loss (summed over the two features) of each candidate n = 2, m = 1 solution;
  feature 1 has importance 1, feature 2 importance r, each U[0, 1) with probability p:

    not_represented  W = (1, 0), b_2 = E[x_2] = p/2:  r (p/3 − p²/4)
    dedicated        W = (0, 1), b_1 = p/2:           p/3 − p²/4
    superposed       W = (1, −1), b = 0: only when both fire is there an error, min(x_1, x_2)
                     on each feature, E[min²] = 1/6:  (1 + r) p²/6
  """
  r, p = relative_importance, density
  unrep = p / 3 - p * p / 4
  return {"not_represented": r * unrep, "dedicated": unrep, "superposed": (1 + r) * p * p / 6}


def theoretical_phase(relative_importance: float, density: float) -> str:
  losses = candidate_losses(relative_importance, density)
  return min(losses, key=losses.get)


def _grid(setting) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(importance `[I, n]`, probability `[I, n]`, labels) of one config setting."""
  n = int(setting.n_features)
  if setting.kind == "phase":
    r = np.geomspace(setting.importance_min, setting.importance_max, setting.grid)
    p = np.geomspace(1.0, setting.density_min, setting.grid)
    rr, pp, _ = np.meshgrid(r, p, np.arange(setting.seeds), indexing="ij")
    rr, pp = rr.ravel(), pp.ravel()
    importance = np.stack([np.ones_like(rr), rr], axis=1)
    return importance, np.repeat(pp[:, None], 2, axis=1), {"relative_importance": r,
                                                             "density": p}
  k = int(setting.instances)
  density = setting.sparsity_base ** -np.linspace(0.0, 1.0, k)
  if setting.importance == "decay":
    imp = setting.importance_decay ** np.arange(n)
  elif setting.importance == "power":
    imp = setting.importance_decay ** -np.linspace(0.0, 1.0, n)
  else:
    imp = np.ones(n)
  return (np.tile(imp, (k, 1)), np.repeat(density[:, None], n, axis=1), {"density": density})


def train_setting(key, setting, train_cfg) -> dict:
  importance, probability, labels = _grid(setting)
  params, losses = train(key, importance, probability, int(setting.n_hidden),
                         steps=int(train_cfg.steps), batch=int(train_cfg.batch),
                         lr=float(train_cfg.lr), weight_decay=float(train_cfg.weight_decay),
                         chunks=int(train_cfg.chunks), label=setting.name)
  return {"params": params, "losses": losses, "importance": importance,
          "probability": probability, **labels}


def phase_grid(result: dict, setting) -> dict[str, np.ndarray]:
  """Trained and theoretical phase indices `[grid_r, grid_p]`; among seeds, the lowest final loss
  wins (a seed can stop in a worse local optimum)."""
  g, s = int(setting.grid), int(setting.seeds)
  final = result["losses"][-1].reshape(g, g, s)
  w = result["params"]["W"].reshape(g, g, s, 2)
  best = final.argmin(-1)
  trained = np.zeros((g, g), int)
  theory = np.zeros((g, g), int)
  for i, r in enumerate(result["relative_importance"]):
    for j, p in enumerate(result["density"]):
      trained[i, j] = PHASES.index(phase_of(w[i, j, best[i, j]]))
      theory[i, j] = PHASES.index(theoretical_phase(r, p))
  return {"trained": trained, "theory": theory}


def _plot_intro(plt, result, setting):
  """n = 5, m = 2: each feature's column W_i as a vector in the 2-d hidden space, per density."""
  w, density = result["params"]["W"], result["density"]
  k = len(density)
  fig, axes = plt.subplots(1, k, figsize=(2.0 * k, 2.3))
  colours = plt.cm.viridis(np.linspace(0, 1, w.shape[1]))
  for i, ax in enumerate(np.atleast_1d(axes)):
    for f in range(w.shape[1]):
      ax.plot([0, w[i, f, 0]], [0, w[i, f, 1]], color=colours[f], lw=1.5)
      ax.scatter([w[i, f, 0]], [w[i, f, 1]], color=colours[f], s=10)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"1−S = {density[i]:.3g}", fontsize=8)
  fig.suptitle(f"{setting.name}: columns of W (colour: importance, bright = least)", fontsize=9)
  return fig


def _plot_geometry(plt, result, setting):
  """n = 100, m = 20: WᵀW and the feature norms coloured by superposition, for a few densities."""
  w, density = result["params"]["W"], result["density"]
  pick = np.unique(np.linspace(0, len(density) - 1, min(4, len(density))).astype(int))
  geo = feature_geometry(w)
  fig, axes = plt.subplots(2, len(pick), figsize=(3.2 * len(pick), 6))
  axes = np.asarray(axes).reshape(2, len(pick))
  for col, i in enumerate(pick):
    wtw = w[i] @ w[i].T
    lim = np.abs(wtw).max()
    axes[0, col].imshow(wtw, cmap="RdBu", vmin=-lim, vmax=lim)
    axes[0, col].set_title(f"WᵀW, 1−S = {density[i]:.3g}", fontsize=8)
    axes[0, col].set_xticks([])
    axes[0, col].set_yticks([])
    sup = np.clip(geo["superposition"][i] / np.maximum(geo["norm"][i] ** 2, 1e-12), 0, 1)
    axes[1, col].barh(np.arange(w.shape[1]), geo["norm"][i], color=plt.cm.plasma(sup))
    axes[1, col].invert_yaxis()
    axes[1, col].set_xlabel("‖W_i‖ (colour: superposition share)", fontsize=8)
  fig.suptitle(f"{setting.name}: feature i top to bottom by importance", fontsize=9)
  return fig


def _plot_dimensionality(plt, result, setting):
  """n = 200, m = 20: D* against 1/(1 − S), with each feature's D_i as points."""
  w, density = result["params"]["W"], result["density"]
  geo = feature_geometry(w)
  fig, ax = plt.subplots(figsize=(6, 4))
  x = 1.0 / density
  ax.plot(x, dimensions_per_feature(w), color="k", lw=2, label="m / ‖W‖_F²")
  for i in range(len(x)):
    d = geo["dimensionality"][i]
    d = d[geo["norm"][i] > 0.5]  # represented features
    ax.scatter(np.full(d.shape, x[i]), d, s=4, alpha=0.3, color="tab:blue")
  for frac in (1.0, 3 / 4, 2 / 3, 1 / 2, 2 / 5, 3 / 8):
    ax.axhline(frac, color="grey", lw=0.5, ls=":")
  ax.set_xscale("log")
  ax.set_xlabel("1 / (1 − S)")
  ax.set_ylabel("dimensions per feature")
  ax.legend(fontsize=8)
  ax.set_title(f"{setting.name}: points = D_i of represented features (‖W_i‖ > 0.5)", fontsize=9)
  return fig


def _plot_phase(plt, result, grids, setting):
  from matplotlib.colors import ListedColormap
  cmap = ListedColormap(["#d9d9d9", "#4c72b0", "#dd8452"])
  r, p = result["relative_importance"], result["density"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  for ax, (name, grid) in zip(axes, (("trained (lowest-loss seed)", grids["trained"]),
                                     ("theory (closed-form candidates)", grids["theory"]))):
    ax.pcolormesh(r, p, grid.T, cmap=cmap, vmin=0, vmax=2, shading="nearest")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("relative importance of feature 2")
    ax.set_ylabel("feature density 1 − S")
    ax.set_title(name, fontsize=9)
  handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(3)]
  axes[1].legend(handles, ["feature 2 not represented", "neuron dedicated to feature 2",
                           "superposition"], loc="lower right", fontsize=7, framealpha=0.9)
  return fig


def run(config, run_dir, mesh) -> dict:
  """Launch task `toy_superposition`: trains each setting of `config.settings`, writes plots,
  `results.json` (phase agreement, D* per density, final losses), metrics and `report.md`."""
  del mesh
  from lm.train.rundir import markdown_table, pyplot, save_figure

  plt = pyplot()
  key = jax.random.key(int(config.seed))
  results, sections, plots = {}, [], []
  for step, setting in enumerate(config.settings):
    key, k = jax.random.split(key)
    t0 = time.time()
    res = train_setting(k, setting, config.train)
    wall = time.time() - t0
    summary: dict[str, Any] = {"instances": int(res["importance"].shape[0]),
                               "final_loss_mean": float(res["losses"][-1].mean()),
                               "wall_s": wall}
    if setting.kind == "phase":
      grids = phase_grid(res, setting)
      agree = float(np.mean(grids["trained"] == grids["theory"]))
      checks = []
      for r, p in setting.checks:
        i = int(np.abs(np.log(res["relative_importance"] / r)).argmin())
        j = int(np.abs(np.log(res["density"] / p)).argmin())
        checks.append({"relative_importance": float(res["relative_importance"][i]),
                       "density": float(res["density"][j]),
                       "trained": PHASES[grids["trained"][i, j]],
                       "theory": PHASES[grids["theory"][i, j]]})
      summary.update(agreement=agree, checks=checks,
                     trained=grids["trained"].tolist(), theory=grids["theory"].tolist())
      fig = _plot_phase(plt, res, grids, setting)
      sections.append(f"## {setting.name}: phase diagram, n = 2, m = 1\n\n"
                      f"Trained and theoretical phase agree on {agree:.0%} of the "
                      f"{setting.grid} × {setting.grid} grid ({setting.seeds} seeds per cell, the "
                      "lowest final loss kept).\n\n" + markdown_table(checks))
    else:
      d_star = dimensions_per_feature(res["params"]["W"])
      summary.update(density=res["density"].tolist(), dimensions_per_feature=d_star.tolist())
      plot = {"intro": _plot_intro, "geometry": _plot_geometry,
              "dimensionality": _plot_dimensionality}[setting.kind]
      fig = plot(plt, res, setting)
      rows = [{"1 − S": float(p), "D* = m/‖W‖²": float(d), "loss": float(l)}
              for p, d, l in zip(res["density"], d_star, res["losses"][-1])]
      sections.append(f"## {setting.name}: n = {setting.n_features}, m = {setting.n_hidden}\n\n"
                      + markdown_table(rows))
    name = f"{setting.name}.png"
    save_figure(fig, run_dir.plots / name)
    plots.append(name)
    sections[-1] += f"\n![{setting.name}](plots/{name})\n"
    run_dir.metrics.write(step, {f"{setting.name}/final_loss_mean": summary["final_loss_mean"],
                                 f"{setting.name}/wall_s": wall})
    results[setting.name] = summary
  run_dir.write_json("results.json", results)
  t = config.train
  run_dir.write_report(
      "# Toy models of superposition\n\n"
      f"ReLU output model x' = ReLU(WᵀWx + b); AdamW lr {t.lr} (weight decay {t.weight_decay}), "
      f"{t.steps} steps of batch {t.batch}, every instance of a setting in one compiled step "
      "(`sae/toy.py`).\n\n" + "\n".join(sections))
  return {k: v.get("agreement", v["final_loss_mean"]) for k, v in results.items()}
