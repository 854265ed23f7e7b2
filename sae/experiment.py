"""Launch task `usae`: a universal SAE study over real activation sources, from one config.

1. Activations: every source (`config.sources`: a vision model and tap) is captured once on the
   training and the held-out images into the activation store (`config.store_dir`, reused across
   runs while the manifests match); standardised with the training store's statistics.
2. Training: USAE instances (seeds × lrs) for each update rule in `config.usae.rules`, and one
   independent TopK SAE per source and instance (same width, k, lr, batches) for the alignment
   tax, all on the same shuffled batches, the instance axis split over the mesh's devices; a source is drawn per step from (seed, step), so a
   resumed run draws the same sequence. Orbax checkpoints every `checkpoint_every` steps hold every
   state and the data iterator's position (`--resume` continues exactly).
3. Evaluation on the held-out store, each metric under its own name (`sae/metrics.py`): the R²
   matrix (R² about the global mean, and explained variance about the per-dimension mean), cross R²,
   firing entropy with τ, universal (H > 0.9) / specific (H < 0.1) / dead counts, co-firing
   (pooled and per-latent mean) beside chance k/m, energy, the alignment tax.
4. Pictures: R² heatmap, entropy histogram, training curves, top-activating held-out images per
   concept for every model, coordinated activation maximisation (one input per model optimised for
   the same shared latent, jitter + Gaussian blur).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm.progress import Progress
from sae import activations, images, metrics, usae
from sae import sae as sae_lib
from sae import train as sae_train

log = logging.getLogger(__name__)

PA5 = {"r2": [[0.759, 0.618], [0.718, 0.771]], "universal": 763, "specific": 319,
       "n_latents": 2048, "k": 32, "co_firing": 0.2144, "independent_r2": 0.8089,
       "usae_self_r2": 0.7566, "alignment_tax": 0.0523}


def _image_stores(config):
  d = config.data
  train = images.load_cifar10("train", n_per_class=d.train_per_class)
  test = images.load_cifar10("test", n_per_class=d.test_per_class)
  out = []
  for data, name in ((train, f"cifar10-train-{d.train_per_class}pc"),
                     (test, f"cifar10-test-{d.test_per_class}pc")):
    out.append([activations.image_store(config.store_dir, s.model, data, name, tap=s.tap or None,
                                        pool=s.pool, batch=d.capture_batch)
                for s in config.sources])
  return out[0], out[1], test


def _text_stores(config):
  from lm.data import load_wikitext

  d = config.data
  out = []
  for split, n in (("valid", d.train_seqs), ("test", d.test_seqs)):
    text = load_wikitext(split)
    name = f"wikitext2-{split}-{n}x{d.seq_len}-skip{d.skip_first}"
    out.append([activations.lm_store(config.store_dir, s.model, s.layer, text, name,
                                     seq_len=d.seq_len,
                                     n_seqs=n, batch=d.capture_batch,
                                     skip_first=d.skip_first)
                for s in config.sources])
  return out[0], out[1], None


def _image_widths(config) -> list[int]:
  return [activations.image_width(s.model, images.CIFAR10_SHAPE, tap=s.tap or None, pool=s.pool)
          for s in config.sources]


def _text_widths(config) -> list[int]:
  return [activations.lm_width(s.model) for s in config.sources]


# config.data.dataset -> (its stores, its sources' widths without a capture)
_DATASETS = {"cifar10": (_image_stores, _image_widths),
             "wikitext-2": (_text_stores, _text_widths)}


def _dataset(config):
  if config.data.dataset not in _DATASETS:
    raise ValueError(f"data.dataset={config.data.dataset!r}: use one of {sorted(_DATASETS)}.")
  return _DATASETS[config.data.dataset]


def _stores(config):
  """(training stores, held-out stores, the held-out images or None) for config.data.dataset."""
  return _dataset(config)[0](config)


def widths(config) -> list[int]:
  """Each source's activation width d_j, as its store will hold it, from the models' shapes alone
  (no weights, images or text read)."""
  return _dataset(config)[1](config)


def _take(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


class _Models:
  """Every trained state of the run: USAE instances per rule, independent SAEs per source."""

  def __init__(self, config, d_ins):
    u, t = config.usae, config.train
    self.seeds = np.repeat(np.asarray(t.seeds), len(t.lrs))
    self.lrs = np.tile(np.asarray(t.lrs, np.float32), len(t.seeds))
    clips = np.full(len(self.seeds), t.max_grad_norm, np.float32)
    self.cfgs = {r: usae.USAEConfig(d_ins=tuple(d_ins), n_latents=u.n_latents, k=u.k, loss=u.loss,
                                    rule=r, aux_coef=u.aux_coef, decoder_norm=u.decoder_norm,
                                    auxk_coef=u.auxk_coef, dead_after=u.dead_after)
                 for r in u.rules}
    self.steps = {r: usae.make_instances_step(c, clips) for r, c in self.cfgs.items()}
    # the same AuxK as the USAE (counted in each SAE's own steps), so the tax compares like
    self.sae_cfgs = [sae_lib.SAEConfig(d_in=d, n_latents=u.n_latents, activation="topk", k=u.k,
                                       decoder_norm=u.decoder_norm,
                                       aux_coef=u.auxk_coef, dead_after=u.dead_after)
                     for d in d_ins]
    self.inst = sae_train.Instances(seed=self.seeds.astype(np.int32), lr=self.lrs,
                                    max_grad_norm=clips, l1_coef=np.zeros_like(clips),
                                    l0_coef=np.zeros_like(clips))
    self.sae_steps = [sae_train.make_step(c, self.inst) if config.independent else None
                      for c in self.sae_cfgs]
    self.config = config

  def init(self):
    state = {"usae": {r: usae.init_instances(c, self.seeds, self.lrs, self.inst.max_grad_norm)
                      for r, c in self.cfgs.items()}}
    if self.config.independent:
      state["sae"] = [sae_train.init_state(c, self.inst) for c in self.sae_cfgs]
    return state

  def step(self, state, source: int, xs) -> tuple[dict, dict[str, float]]:
    out, scalars = {"usae": {}}, {}
    for r, step in self.steps.items():
      out["usae"][r], m = step(state["usae"][r], source, xs)
      scalars[f"{r}/loss"] = m["loss"]
      scalars[f"{r}/l0"] = m["l0"]
      scalars[f"{r}/r2_from_drawn"] = m["r2_row"]
      scalars[f"{r}/dead_for_drawn"] = m["dead"]
    if "sae" in state:
      out["sae"] = []
      for j, step in enumerate(self.sae_steps):
        x = jnp.broadcast_to(xs[j], (len(self.seeds),) + xs[j].shape)
        s, m = step(state["sae"][j], x)
        out["sae"].append(s)
        scalars[f"independent/{j}/mse"] = m["mse"]
    return out, scalars


def _source_of_step(seed: int, step: int, n: int) -> int:
  return int(np.random.default_rng([seed, step]).integers(n))


def train(config, run_dir, models: _Models, train_stores, standardise, mesh=None
          ) -> tuple[dict, int]:
  """Trains every model to `epochs`; returns the final state and the step it started from (0, or
  the checkpoint's step when resumed)."""
  from lm.train.checkpoint import Checkpointer

  t = config.train
  n_sources = len(train_stores)
  steps = int(t.epochs * (len(train_stores[0]) // t.batch))
  ds = activations.aligned_batches(train_stores, standardise, batch=t.batch, seed=config.seed)
  it = iter(ds)
  state = models.init()
  if mesh is not None and mesh.size > 1:  # instances split over the devices
    state = sae_train.shard_instances(state, mesh)
  start = 0
  ckpt = Checkpointer(run_dir.path / "checkpoints", max_to_keep=2)
  resume_step = getattr(run_dir, "resume_step", None)
  if (run_dir.resume or resume_step is not None) and (ckpt.all_steps() or resume_step is not None):
    # the newest intact checkpoint (or resume_step, verified); later ones are dropped
    state, extra = ckpt.restore_tree(state, step=resume_step)
    it.set_state(extra["data"])
    start = int(extra["step"])
    ckpt.discard_after(start)
    run_dir.metrics.rewind(start)
    log.info("resumed at step %d of %d", start, steps)
  progress = Progress(steps, "train", "step", initial=start, logger=log)
  for step in range(start, steps):
    batch = next(it)
    xs = [jnp.asarray(batch[f"x{j}"]) for j in range(n_sources)]
    source = _source_of_step(config.seed, step, n_sources)
    state, scalars = models.step(state, source, xs)
    done = step + 1
    if done % t.log_every == 0 or done == steps:
      flat = {k: float(np.asarray(v).mean()) for k, v in scalars.items()}
      progress.update(1, **{k: f"{v:.4g}" for k, v in flat.items() if k.endswith("loss")})
      run_dir.metrics.write(done, {**flat, "source": source, "steps_per_s": progress.rate()})
    else:
      progress.update(1)
    if done % t.checkpoint_every == 0 or done == steps:
      ckpt.save_tree(done, state, extra={"data": it.get_state()})
  progress.close()
  ckpt.close()
  return state, start


def _logged(run_dir) -> list[dict]:
  path = run_dir.path / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(config, models: _Models, state, xs_test) -> dict[str, Any]:
  """Every held-out number, per rule and instance; the universality statistics for instance 0."""
  u, e = config.usae, config.eval
  xs = [jnp.asarray(x) for x in xs_test]
  out: dict[str, Any] = {"instances": [{"seed": int(s), "lr": float(lr)}
                                       for s, lr in zip(models.seeds, models.lrs)]}
  independent = None
  if "sae" in state:
    independent = np.zeros((len(models.seeds), len(xs)))
    for j, (c, s) in enumerate(zip(models.sae_cfgs, state["sae"])):
      for i in range(len(models.seeds)):
        p = _take(s["params"], i)
        x_hat = sae_lib.decode(p, sae_lib.encode(p, xs[j], c)[1], c)
        independent[i, j] = float(metrics.r2_global(xs[j], x_hat))
    out["independent_r2"] = independent.tolist()
  for rule, cfg in models.cfgs.items():
    per = []
    for i in range(len(models.seeds)):
      params = _take(state["usae"][rule]["params"], i)
      r2 = np.asarray(usae.r2_matrix(params, xs, cfg))
      ev = np.asarray(usae.r2_matrix(params, xs, cfg, metrics.explained_variance))
      row = {"r2_global": r2.tolist(), "explained_variance": ev.tolist(),
             "cross_r2": float(metrics.cross_r2(jnp.asarray(r2)))}
      if independent is not None:
        row["alignment_tax"] = (independent[i] - np.diag(r2)).tolist()
      per.append(row)
    params = _take(state["usae"][rule]["params"], 0)
    codes = usae.codes(params, xs, cfg)
    counts = metrics.firing_counts(codes, e.tau)
    dead = np.asarray(metrics.dead_latents(counts))
    dicts = [sae_lib.dictionary(params[j], cfg.source(j)) for j in range(len(xs))]
    energy = sum(np.asarray(metrics.energy(codes[j], dicts[j])) for j in range(len(xs)))
    out[rule] = {
        "per_instance": per, "tau": e.tau, "n_latents": u.n_latents, "k": u.k,
        "dead": int(dead.sum()), "counts": np.asarray(counts).tolist(), "energy": energy.tolist(),
        "l0": [float(metrics.l0(z)) for z in codes]}
    if len(xs) > 1:  # universality needs two models at least
      entropy = np.asarray(metrics.firing_entropy(counts))
      live = entropy[~dead]
      cof = metrics.co_firing(codes, e.tau, model=0)
      out[rule].update(
          universal=int(np.sum(live > e.universal)), specific=int(np.sum(live < e.specific)),
          entropy=np.where(dead, np.nan, entropy).tolist(),
          co_firing_pooled=float(cof["pooled"]), co_firing_mean=float(cof["mean"]),
          co_firing_chance=u.k / u.n_latents)
  return out


def _pre_activation(params_j, scfg, x_std):
  return (x_std - params_j["b_dec"]) @ params_j["W_enc"] + params_j["b_enc"]


def chosen_concepts(result: dict, n: int) -> list[tuple[str, int]]:
  """The n most energetic universal latents, then the most energetic specific latent of each
  model (labelled by the model that fires it); with one model, its n most energetic latents."""
  energy = np.asarray(result["energy"])
  counts = np.asarray(result["counts"])
  order = np.argsort(-energy)
  if "entropy" not in result:  # one model: the most energetic latents
    return [("top", int(c)) for c in order[:n]]
  ent = np.asarray(result["entropy"], float)
  picks = [("universal", int(c)) for c in order if ent[c] > 0.9][:n]
  for m in range(counts.shape[0]):
    spec = [int(c) for c in order
            if ent[c] < 0.1 and counts[m, c] > 0 and counts[m, c] == counts[:, c].max()]
    if spec:
      picks.append((f"specific to {m}", spec[0]))
  return picks


def top_images(codes_m, concept: int, n: int) -> np.ndarray:
  return np.argsort(-np.asarray(codes_m[:, concept]))[:n]


def _gaussian_blur(x_bhwc, sigma: float):
  r = max(int(3 * sigma), 1)
  g = jnp.exp(-0.5 * (jnp.arange(-r, r + 1) / sigma) ** 2)
  g = g / g.sum()
  pad = jnp.pad(x_bhwc, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  y = sum(g[i] * pad[:, i:i + x_bhwc.shape[1], r:r + x_bhwc.shape[2]] for i in range(2 * r + 1))
  y = jnp.pad(y, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
  return sum(g[i] * y[:, :, i:i + x_bhwc.shape[2]] for i in range(2 * r + 1))


def activation_maximisation(model_name: str, tap: str, pool: str, standardise, params_j, scfg,
                            concepts: list[int], viz, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Images `[C, s, s, 3]` (0-255) that maximise each concept's pre-activation in this model's USAE
  encoder, optimised from grey noise at `viz.size` px (upsampled to the model's input) with Adam,
  random jitter every step and a Gaussian blur every `viz.blur_every` steps; and the final
  pre-activations `[C]`."""
  from sae import vision

  model, spec = vision.load(model_name)
  # the weights travel as arguments: closed over, they would be compiled in as constants
  graphdef, weights = nnx.split(model)
  fixed = (weights, params_j, jnp.asarray(standardise.mean), jnp.asarray(standardise.std),
           jnp.asarray(concepts))

  def objective(fixed, img):
    weights, params_j, mean, std, cs = fixed
    feats = nnx.merge(graphdef, weights).features(spec.preprocess(img), (tap,))[tap]
    x = (activations.pool_rows(feats, pool) - mean) / std
    pre = _pre_activation(params_j, scfg, x)
    return pre[jnp.arange(len(concepts)), cs]

  opt = optax.adam(viz.lr)

  @jax.jit
  def step(fixed, img, opt_state, key):
    shift = jax.random.randint(key, (2,), -viz.jitter, viz.jitter + 1)
    def loss(p):
      return -jnp.sum(objective(fixed, jnp.roll(p, shift, axis=(1, 2))))
    g = jax.grad(loss)(img)
    upd, opt_state = opt.update(g, opt_state, img)
    return jnp.clip(img + upd, 0.0, 255.0), opt_state

  key = jax.random.key(seed)
  img = 128.0 + 8.0 * jax.random.normal(key, (len(concepts), viz.size, viz.size, 3))
  opt_state = opt.init(img)
  blur = jax.jit(lambda x: _gaussian_blur(x, viz.blur_sigma))
  progress = Progress(viz.steps, "feature visualisation", "step", logger=log)
  for s in range(viz.steps):
    key, k = jax.random.split(key)
    img, opt_state = step(fixed, img, opt_state, k)
    if viz.blur_every and (s + 1) % viz.blur_every == 0:
      img = blur(img)
    progress.update(1)
  progress.close()
  return np.asarray(img), np.asarray(jax.jit(objective)(fixed, img))


def step_flops(config, d_ins, source: int) -> float:
  """Analytic FLOPs of one training step (`_Models.step`) with `source` drawn, every instance and
  model together. Only the matmuls count, 2 FLOPs per multiply-add, each `[B, d] x [d, m]` (or its
  transpose) 2·B·m·d. A USAE instance encodes source i and decodes every source j: forward
  2·B·m·(d_i + Σ_j d_j); backward the same again for the input gradients (dz from every decoder,
  d(x − b_dec) for b_dec_i), plus the weight gradients of the encoder (2·B·m·d_i) and of the
  decoders that step (`official`: decoder i's, 2·B·m·d_i; `joint`: every one, 2·B·m·Σ_j d_j). An
  independent SAE on source j is 6·B·(2·m·d_j) (6 FLOPs per weight and row). Not counted: top-k,
  the element-wise loss and Adam, the `l1` loss's auxiliary decode and AuxK (which runs only on
  steps with dead latents)."""
  b, m = int(config.train.batch), int(config.usae.n_latents)
  d_i, d_all = d_ins[source], sum(d_ins)

  def mm(d):
    return 2.0 * b * m * d

  per = 0.0
  for rule in config.usae.rules:
    stepped = d_i if rule == "official" else d_all
    per += 2 * (mm(d_i) + mm(d_all)) + mm(d_i) + mm(stepped)
  if config.independent:
    per += sum(6 * mm(d) for d in d_ins)
  return len(config.train.seeds) * len(config.train.lrs) * per


def compile_only(config, mesh, topology: str) -> dict:
  """The task's training step compiled for `mesh` (the target topology's devices) on abstract
  arrays, no weights or data read (`launch.py --compile_only`): `aot.report`'s fields for
  `aot.json`, with the task's own.

  The step is `_Models.step` (every rule's USAE instances and the independent SAEs, one after
  another) jitted as one program with the state donated, as `train` calls it: the state is
  `jax.eval_shape` of `_Models.init` with the shardings `sae.train.shard_instances` gives it, the
  batch each source's `[B, d_j]` float32 rows, replicated (a run feeds them from the host). d_j
  comes from the sources' shapes (`widths`). The drawn source is static (one program each), so
  every source is compiled: the report is the one with the most bytes per device, `per_source`
  lists each. A run calls the pieces as separate programs, one after another; compiled as one,
  XLA may keep several pieces' temporaries alive at once, so the temporaries here may exceed the
  run's largest piece's."""
  from lm import sharding
  from lm.train import aot

  d_ins = widths(config)
  models = _Models(config, d_ins)
  state = sae_train.abstract_instances(models.init, mesh)
  batch = int(config.train.batch)
  xs = [jax.ShapeDtypeStruct((batch, d), jnp.float32, sharding=sharding.replicated(mesh))
        for d in d_ins]
  reports = []
  for source in range(len(d_ins)):
    step = jax.jit(lambda s, x, i=source: models.step(s, i, x), donate_argnums=0)
    compiled = step.lower(state, xs).compile()
    reports.append(aot.report(compiled, topology=topology, mesh=mesh,
                              model_flops=step_flops(config, d_ins, source)))
  worst = max(range(len(reports)), key=lambda i: reports[i]["bytes_per_device"]["total"])
  params = [u["params"] for u in state["usae"].values()] + [
      s["params"] for s in state.get("sae", ())]
  leaf = jax.tree.leaves(state["usae"])[0]
  out = dict(reports[worst])
  out.update(
      task="usae", models=[dict(s) for s in config.sources], d_ins=d_ins,
      n_instances=len(models.seeds),
      instance_shards=leaf.shape[0] // leaf.sharding.shard_shape(leaf.shape)[0],
      n_latents=int(config.usae.n_latents), k=int(config.usae.k),
      rules=list(config.usae.rules), independent=bool(config.independent), batch_size=batch,
      trainable_params=int(sum(x.size for x in jax.tree.leaves(params))), source=worst,
      per_source=[{"source": i, "bytes_per_device": r["bytes_per_device"]["total"],
                   "model_flops_per_step": r["model_flops_per_step"],
                   "flops_per_step_per_device": r["flops_per_step_per_device"],
                   "step_s_bound": r["step_s_bound"]} for i, r in enumerate(reports)])
  return out


def run(config, run_dir, mesh) -> dict:
  """Launch task `usae`: activations → USAE (+ independent SAEs) → held-out metrics, pictures,
  `results.json`, `report.md`."""
  from sae import report as sae_report

  train_stores, test_stores, test_images = _stores(config)
  standardise = [activations.Standardise.of(s, config.standardise) for s in train_stores]
  models = _Models(config, [s.d for s in train_stores])
  t0 = time.time()
  state, start = train(config, run_dir, models, train_stores, standardise, mesh)
  train_s = time.time() - t0
  history = _logged(run_dir)  # the whole run's records, a resumed run's earlier ones included
  xs_test = [activations.standardised(s, f) for s, f in zip(test_stores, standardise)]
  result = evaluate(config, models, state, xs_test)
  result.update(train_s=train_s, resumed_at=start, sources=[dict(s) for s in config.sources],
                stores=[str(s.path) for s in train_stores + test_stores],
                standardise=[f.to_json() for f in standardise], n_train=len(train_stores[0]),
                n_test=len(test_stores[0]), pa5=PA5)
  rule = config.usae.rules[0]
  params = _take(state["usae"][rule]["params"], 0)
  cfg = models.cfgs[rule]
  codes = [np.asarray(z) for z in usae.codes(params, [jnp.asarray(x) for x in xs_test], cfg)]
  concepts = chosen_concepts(result[rule], config.viz.concepts)
  result["concepts"] = [{"kind": k, "latent": c} for k, c in concepts]
  actmax = None
  if config.viz.steps and test_images is not None:
    actmax = []
    for j, s in enumerate(config.sources):
      tap = s.tap or test_stores[j].manifest["tap"]
      img, pre = activation_maximisation(s.model, tap, s.pool, standardise[j], params[j],
                                         cfg.source(j), [c for _, c in concepts], config.viz,
                                         config.seed + j)
      natural = np.asarray(_pre_activation(params[j], cfg.source(j), jnp.asarray(xs_test[j])))
      p99 = np.percentile(natural[:, [c for _, c in concepts]], 99, axis=0)
      actmax.append({"images": img, "pre": pre, "natural_p99": p99})
    result["actmax"] = [{"model": s.model, "pre": a["pre"].tolist(),
                         "natural_p99": a["natural_p99"].tolist(),
                         "above_p99": (a["pre"] > a["natural_p99"]).tolist()}
                        for s, a in zip(config.sources, actmax)]
  run_dir.write_json("results.json", result)
  sae_report.write(config, run_dir, result, history, test_images, test_stores, codes, concepts,
                   actmax)
  return {"train_s": train_s, **{f"{r}_cross_r2": result[r]["per_instance"][0]["cross_r2"]
                                  for r in models.cfgs}}
