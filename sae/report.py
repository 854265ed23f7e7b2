"""The USAE run's plots and `report.md` (task `usae`, `sae/experiment.py`)."""

from __future__ import annotations

import numpy as np

from lm.train.rundir import markdown_table, pyplot, save_figure


def _r2_heatmap(plt, r2, names, title, path):
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 1.2 * len(names)))
  im = ax.imshow(r2, vmin=min(0.0, float(np.min(r2))), vmax=1.0, cmap="viridis")
  ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
  ax.set_yticks(range(len(names)), names)
  ax.set_xlabel("target (decoded)")
  ax.set_ylabel("source (encoded)")
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, f"{r2[i][j]:.3f}", ha="center", va="center", color="w")
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax)
  return save_figure(fig, path)


def _entropy_hist(plt, res, path):
  ent = np.asarray(res["entropy"], float)
  fig, ax = plt.subplots(figsize=(5, 3))
  ax.hist(ent[~np.isnan(ent)], bins=40, color="C0")
  ax.axvline(0.9, color="k", ls="--", lw=0.8)
  ax.axvline(0.1, color="k", ls="--", lw=0.8)
  ax.set_xlabel(f"normalised firing entropy (τ = {res['tau']})")
  ax.set_ylabel("latents")
  ax.set_title(f"universal {res['universal']}, specific {res['specific']}, dead {res['dead']} "
               f"of {res['n_latents']}", fontsize=9)
  return save_figure(fig, path)


def _curves(plt, history, path):
  fig, ax = plt.subplots(figsize=(6, 3.2))
  steps = [h["step"] for h in history]
  for key in sorted({k for h in history for k in h if k.endswith("loss") or k.endswith("mse")}):
    ax.plot(steps, [h.get(key, np.nan) for h in history], label=key)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.legend(fontsize=7)
  return save_figure(fig, path)


def _top_images(plt, data, codes, concepts, names, n, path):
  rows = [(kind, c, m) for kind, c in concepts for m in range(len(codes))]
  fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 0.95), squeeze=False)
  for r, (kind, c, m) in enumerate(rows):
    idx = np.argsort(-codes[m][:, c])[:n]
    for j, i in enumerate(idx):
      ax = axes[r][j]
      ax.imshow(data.images[i])
      ax.set_xticks([])
      ax.set_yticks([])
      if j == 0:
        ax.set_ylabel(f"{c} {kind[:4]}\n{names[m]}", fontsize=5, rotation=0, ha="right")
  return save_figure(fig, path, dpi=110)


def _actmax_grid(plt, actmax, concepts, names, path):
  fig, axes = plt.subplots(len(concepts), len(actmax), figsize=(1.5 * len(actmax), 1.5 * len(concepts)),
                           squeeze=False)
  for m, a in enumerate(actmax):
    for r, (kind, c) in enumerate(concepts):
      ax = axes[r][m]
      ax.imshow(np.clip(a["images"][r], 0, 255).astype(np.uint8))
      ax.set_xticks([])
      ax.set_yticks([])
      above = "↑" if a["pre"][r] > a["natural_p99"][r] else ""
      ax.set_title(f"{names[m]}: {a['pre'][r]:.2g}{above}", fontsize=6)
      if m == 0:
        ax.set_ylabel(f"{c}\n{kind}", fontsize=6)
  return save_figure(fig, path, dpi=110)


def top_contexts(store, tokenizer, codes_m, concept: int, n: int, width: int = 12) -> list[str]:
  """The n held-out token positions where `concept` fires hardest, each as its preceding `width`
  tokens with the firing token in [brackets]."""
  tokens = np.load(store.path / "tokens.npy")
  item = np.load(store.path / "item.npy")
  out = []
  for r in np.argsort(-codes_m[:, concept])[:n]:
    seq, pos = item[r]
    before = tokenizer.decode(tokens[seq, max(pos - width, 0):pos].tolist())
    here = tokenizer.decode(tokens[seq, pos:pos + 1].tolist())
    out.append(f"{before}[{here}] ({codes_m[r, concept]:.2f})".replace("\n", "⏎").replace("|", "/"))
  return out


def _contexts_section(config, test_stores, codes, concepts) -> list[str]:
  from lm.hub import load_pretrained

  lines = ["## Top-activating contexts", "",
           f"Held-out tokens where each concept fires hardest (firing token in [brackets], code "
           f"value after it; rule `{config.usae.rules[0]}`, instance 0):", ""]
  for m, (src, store) in enumerate(zip(config.sources, test_stores)):
    _, tokenizer = load_pretrained(src.model)
    rows = []
    for kind, c in concepts:
      for i, ctx in enumerate(top_contexts(store, tokenizer, codes[m], c, config.viz.top_images)):
        rows.append({"model": src.model if not rows else "", "latent": f"{c} ({kind})" if i == 0 else "",
                     "context": ctx})
    lines += [markdown_table(rows), ""]
  return lines


def write(config, run_dir, result, history, test_images, test_stores, codes, concepts,
          actmax) -> None:
  plt = pyplot()
  names = [s.model for s in config.sources]
  plots = run_dir.plots
  kind = "Universal SAE over" if len(names) > 1 else "SAE on"
  lines = [f"# {kind} {', '.join(names)} ({config.variant})", ""]
  taps = ", ".join(f"{s.model}." + (s.tap or (f"resid.{s.layer}" if "layer" in s else "pooled"))
                   for s in config.sources)
  inputs = ("CIFAR-10 images (JPEG)" if test_images is not None
            else f"token rows (WikiText-2 valid / test, windows of {config.data.seq_len})")
  lines += [f"Sources: {taps}; "
            f"{result['n_train']} training / {result['n_test']} held-out {inputs}; "
            f"standardisation `{config.standardise}` from the training store. USAE m = "
            f"{config.usae.n_latents}, k = {config.usae.k}, loss `{config.usae.loss}`, decoder norm "
            f"`{config.usae.decoder_norm}`; Adam lr {list(config.train.lrs)} × seeds "
            f"{list(config.train.seeds)}, batch {config.train.batch}, {config.train.epochs} epochs "
            f"({result['train_s']:.0f} s" + (f" in this process, resumed at step {result['resumed_at']}"
                                    if result["resumed_at"] else "")
            + "). Every number below is on the held-out set.", ""]
  _curves(plt, history, plots / "training.png")
  for rule in config.usae.rules:
    res = result[rule]
    first = res["per_instance"][0]
    _r2_heatmap(plt, first["r2_global"], names, f"R² about the global mean, rule {rule}",
                plots / f"r2_{rule}.png")
    if "entropy" in res:
      _entropy_hist(plt, res, plots / f"entropy_{rule}.png")
    lines += [f"## Rule `{rule}`", "",
              "R² matrix (rows: encoded source, columns: decoded target), R² about the global mean "
              "(overcomplete / the official USAE):", ""]
    lines.append(markdown_table([{"source": names[i], **{names[j]: first["r2_global"][i][j]
                                                         for j in range(len(names))}}
                                 for i in range(len(names))]))
    lines += ["", "The same, explained variance about the per-dimension mean:", ""]
    lines.append(markdown_table([{"source": names[i], **{names[j]: first["explained_variance"][i][j]
                                                         for j in range(len(names))}}
                                 for i in range(len(names))]))
    rows = []
    for inst, per in zip(result["instances"], res["per_instance"]):
      row = {**inst, **({"cross_r2": per["cross_r2"]} if len(names) > 1 else {}),
             **{f"R[{n},{n}]": per["r2_global"][i][i] for i, n in enumerate(names)}}
      if "alignment_tax" in per:
        row.update({f"tax {n}": per["alignment_tax"][i] for i, n in enumerate(names)})
      rows.append(row)
    tax = (" (tax = independent SAE's R² − the USAE's R[A, A], same seed, lr and batches)"
           if "alignment_tax" in first else "")
    lines += ["", f"Every instance{tax}:", "", markdown_table(rows), ""]
    if "entropy" not in res:
      lines += [f"Instance 0: dead latents **{res['dead']}** of {res['n_latents']} (τ = "
                f"{res['tau']}); L0 {[round(x, 1) for x in res['l0']]}.", "",
                f"![R²](plots/r2_{rule}.png)", ""]
      continue
    lines += [f"Universality (instance 0, τ = {res['tau']}): universal (H > 0.9) "
              f"**{res['universal']}**, specific (H < 0.1) **{res['specific']}**, dead "
              f"**{res['dead']}** (reported apart: no model fires them) of {res['n_latents']}; "
              f"co-firing pooled Σ_c C_c / Σ_c F_{names[0]},c = **{res['co_firing_pooled']:.4f}**, "
              f"per-latent mean {res['co_firing_mean']:.4f}, chance k/m = "
              f"{res['co_firing_chance']:.4f}; L0 per model {[round(x, 1) for x in res['l0']]}.", "",
              f"![R²](plots/r2_{rule}.png) ![entropy](plots/entropy_{rule}.png)", ""]
  if test_images is None:
    lines += _contexts_section(config, test_stores, codes, concepts)
    run_dir.write_report("\n".join(lines + ["![training](plots/training.png)", ""]))
    return
  _top_images(plt, test_images, codes, concepts, names, config.viz.top_images,
              plots / "top_images.png")
  lines += ["## Concepts", "",
            f"Chosen: the {config.viz.concepts} most energetic universal latents, then each model's "
            "most energetic specific one. Top-activating held-out images per concept and model "
            f"(rule `{config.usae.rules[0]}`, instance 0):", "", "![top images](plots/top_images.png)",
            ""]
  if actmax:
    _actmax_grid(plt, actmax, concepts, names, plots / "actmax.png")
    above = [a for r in result["actmax"] for a in r["above_p99"]]
    lines += [f"Coordinated activation maximisation ({config.viz.steps} Adam steps at "
              f"{config.viz.size} px, jitter ±{config.viz.jitter}, blur σ {config.viz.blur_sigma} "
              f"every {config.viz.blur_every}); title = the concept's pre-activation, ↑ where it "
              f"beats the 99th percentile over held-out images ({sum(above)}/{len(above)}):", "",
              "![activation maximisation](plots/actmax.png)", ""]
  pa5 = result["pa5"]
  lines += ["## Beside the PA5 report", "",
            f"PA5 (ResNet-18 + ViT-B/16, m {pa5['n_latents']}, k {pa5['k']}): R² A→A "
            f"{pa5['r2'][0][0]}, A→B {pa5['r2'][0][1]}, B→A {pa5['r2'][1][0]}, B→B {pa5['r2'][1][1]}; "
            f"universal {pa5['universal']}, specific {pa5['specific']}; co-firing "
            f"{pa5['co_firing']:.2%} (chance {pa5['k'] / pa5['n_latents']:.2%}); independent SAE "
            f"{pa5['independent_r2']} vs USAE {pa5['usae_self_r2']}, tax {pa5['alignment_tax']}.",
            "", "![training](plots/training.png)", ""]
  run_dir.write_report("\n".join(lines))
