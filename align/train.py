"""The `train` task behind `launch.py`: the algorithm a config names in `config.algorithm`.

Loads the model (real weights by name, or a tiny preset for smoke runs), applies LoRA, lets the
algorithm's record (`align.algorithm.Algorithm`) wrap the model and shape the data, trains with
the one `lm.train.trainer.Trainer`, and leaves in the workdir: metrics (JSONL + TensorBoard),
checkpoints, loss/metric plots, the adapter (PEFT format) or full weights, and `report.md`.
"""

from __future__ import annotations

import logging
import os
import time

import jax
from flax import nnx

from align import algorithm, data, online
from lm import heads, hub, lora
from lm.hub import vocab
from lm.data import batching
from lm.train import aot
from lm.train.checkpoint import Checkpointer
from lm.train.rundir import RunDir, is_scalar, markdown_table, plot_history
from lm.train.trainer import Trainer

log = logging.getLogger(__name__)


def load_model(model_cfg, shapes_only: bool = False):
  """(Transformer, tokenizer) through the one loader (`lm.hub.load`): real weights by `name` (or a
  `pretrain` run directory), or a random `preset` (smoke runs) with the vocabulary of `tokenizer`;
  `scan_layers`/`remat` set how the stack runs. `shapes_only`: the model's arrays are
  ShapeDtypeStructs, no weights read."""
  if model_cfg.preset:
    model, tok = hub.load(preset=model_cfg.preset, tokenizer=model_cfg.tokenizer,
                          dtype=model_cfg.dtype, seed=model_cfg.seed, shapes_only=shapes_only)
  else:
    model, tok = hub.load(model_cfg.name, dtype=model_cfg.dtype, shapes_only=shapes_only)
  if isinstance(tok, (vocab.CharTokenizer, vocab.BPETokenizer)):  # a `pretrain` run directory
    if tok.prefix_ids or not isinstance(tok, vocab.BPETokenizer):
      raise ValueError(f"{model_cfg.name} was pretrained with a sink token or a character "
                       "vocabulary; the alignment stages need a GPT-2 BPE model without one.")
    tok = tok.to_hf()
  return with_stack_settings(model, model_cfg), tok


def with_stack_settings(model, model_cfg):
  """`model` running its layer stack as `model_cfg` says (`scan_layers`, `remat`: the same numbers,
  another program)."""
  model.cfg = model.cfg.replace(scan_layers=bool(model_cfg.scan_layers), remat=model_cfg.remat)
  return model


def _adapted(config, algo: algorithm.Algorithm, model):
  """The model as the algorithm trains it: LoRA on the decoder, then the algorithm's wrapper."""
  if config.lora.rank > 0:
    lora.apply_lora(model, lora.LoraConfig.from_config(config.lora),
                    rngs=nnx.Rngs(params=config.train.seed, lora_dropout=config.train.seed))
  return algo.wrap(model, config) if algo.wrap else model


def _trainable(config, algo: algorithm.Algorithm):
  filt = lora.trainable_filter(config.train.trainable, config.train.trainable_pattern)
  return algo.trainable(filt) if algo.trainable else filt


def _export(config, algo: algorithm.Algorithm, model, tokenizer, run_dir: RunDir) -> str:
  """Adapter (PEFT layout) when training LoRA; full HF weights otherwise; then the algorithm's own
  parts (e.g. a reward head) beside them."""
  backbone = heads.backbone(model)
  if config.train.trainable == "lora":
    path = run_dir.path / "adapter"
    lora.export_peft(backbone, path, cfg=lora.LoraConfig.from_config(config.lora),
                     base_model_name_or_path=config.model.name or config.model.preset)
  else:
    from lm.hub import weights

    path = run_dir.path / "model"
    if lora.count_params(backbone, nnx.LoRAParam):
      lora.merge(backbone)
    weights.save_hf_dir(backbone, path, tokenizer)
  if algo.export:
    algo.export(model, path)
  return str(path)


def _offline_data(config, algo: algorithm.Algorithm, model, tok, mesh):
  """(train iterator, eval examples, eval batches, stats) from `align.data`."""
  transform = algo.transform_train(config, model) if algo.transform_train else None
  train_ds, eval_examples, data_stats = data.build(config.data, tok, algo.data_kind,
                                                   transform_train=transform)
  if algo.prepare_eval:
    eval_examples = algo.prepare_eval(config, model, eval_examples)
  eval_bs = config.train.eval_batch_size
  # Whole batches only: a padded row would count as a wrong pair in the accuracy.
  eval_examples = eval_examples[:len(eval_examples) // eval_bs * eval_bs]
  if not eval_examples and config.train.eval_every:
    raise ValueError(f"data.n_eval={config.data.n_eval} leaves no full eval batch of {eval_bs}; "
                     "raise data.n_eval or lower train.eval_batch_size.")
  eval_batches = (lambda: batching.eval_batches(eval_examples, eval_bs)) if eval_examples else None
  if algo.arrange:
    train_ds, eval_batches, layout = algo.arrange(config, train_ds, eval_batches, mesh)
    data_stats.update(layout)
  return iter(train_ds), eval_examples, eval_batches, data_stats


def compile_only(config, mesh, topology: str, base=None) -> dict:
  """The training step of `config`'s algorithm compiled for `mesh` (the target topology's devices)
  on abstract arrays, no weights or data read (`lm.train.aot`): the model's shapes from its config
  or file metadata with LoRA and the algorithm's wrapper, the largest batch the data limits admit
  in the algorithm's own layout, and for online RL also the rollout's decoding program
  (`programs.rollout`). Returns `aot.report`'s fields for `aot.json`. `base`: (model of shapes,
  tokenizer) in place of `config.model`'s (a pipeline stage whose base is not trained yet)."""
  algo = algorithm.load(config.algorithm)
  if algo.check:
    algo.check(config)
  base, tok = base or load_model(config.model, shapes_only=True)
  model = nnx.eval_shape(lambda m: _adapted(config, algo, m), base)
  trainer = Trainer(model, algo.loss, config.loss, config.train,
                    trainable=_trainable(config, algo), mesh=mesh)
  programs = {}
  if algo.make_batch_for:
    batch, programs["rollout"] = online.compile_only(
        config, trainer, tok, algo.make_batch_for(config, trainer), topology)
  else:
    transform = algo.transform_train(config, model) if algo.transform_train else None
    train_ds, _, _ = data.build(config.data, tok, algo.data_kind, transform_train=transform,
                                shapes_only=True)
    if algo.arrange:
      train_ds, _, _ = algo.arrange(config, train_ds, None, mesh)
    batch = next(iter(train_ds))
  # XLA's FLOPs are the step's (no loop in it) unless micro-batches or a scanned stack loop
  looped = int(config.train.grad_accum) > 1 or bool(config.model.scan_layers)
  out = aot.report(trainer.compile_step(batch), topology=topology, mesh=mesh, model_flops=None)
  out.update(task="train", algorithm=algo.name, model=config.model.name or config.model.preset,
             n_params=sum(x.size for x in jax.tree.leaves(nnx.state(base))),
             trainable_params=trainer.n_trainable, batch_size=int(config.train.batch_size),
             batch_shapes={k: list(v.shape) for k, v in batch.items()},
             flops_loop_counted_once=looped, programs=programs)
  return out


def run(config, run_dir: RunDir, mesh=None) -> dict:
  algo = algorithm.load(config.algorithm)
  if algo.check:
    algo.check(config)
  model, tok = load_model(config.model)
  model = _adapted(config, algo, model)
  # The trainer copies the trainable state, so the data hooks below may still read `model`.
  trainer = Trainer(model, algo.loss, config.loss, config.train,
                    trainable=_trainable(config, algo), mesh=mesh)
  if algo.make_batch_for:  # batches come from rollouts of the policy being trained
    train_iter, evaluate, data_stats = online.setup(config, trainer, tok,
                                                    algo.make_batch_for(config, trainer))
    eval_examples, eval_batches = [], None
  else:
    train_iter, eval_examples, eval_batches, data_stats = _offline_data(config, algo, model, tok,
                                                                        mesh)
    evaluate = None
  run_dir.write_json("data_stats.json", data_stats)
  ckpt = Checkpointer(run_dir.path / "checkpoints",
                      max_to_keep=config.train.keep_checkpoints)
  t0 = time.time()
  # the whole run's history, a resumed run's earlier records included, so the report's start
  # values and plots are those of an uninterrupted run
  history = trainer.fit(train_iter, run_dir=run_dir, ckpt=ckpt, eval_batches=eval_batches,
                        evaluate=evaluate, resume=getattr(run_dir, "resume", False),
                        resume_step=getattr(run_dir, "resume_step", None))
  wall = time.time() - t0
  ckpt.close()
  model = trainer.host_model()  # every process takes part in gathering; process 0 writes
  if not run_dir.primary:
    return {}
  plots = plot_history(history, list(algo.plotted), run_dir)
  finished = algo.finish(config, model, tok, eval_examples, run_dir) if algo.finish else {}
  finished_md = finished.pop("report_md", "")
  exported = os.path.relpath(_export(config, algo, model, tok, run_dir), run_dir.path)

  evals = [h for h in history if any(k.startswith("eval/") for k in h)]
  first, last = (evals[0], evals[-1]) if evals else ({}, {})
  rows = [{"metric": k[5:], "start": first.get(k, float("nan")), "end": last.get(k, float("nan"))}
          for k in sorted(last) if k.startswith("eval/") and is_scalar(last[k])]
  summary = {
      "algorithm": algo.name, "steps": trainer.step, "wall_s": wall,
      "compile_s": trainer.times.compile_s, "tokens_per_s": trainer.times.tokens_per_s,
      "trainable_params": trainer.n_trainable, "eval_start": first, "eval_end": last,
      "exported": exported, **finished, "data": data_stats, "devices": len(jax.devices()),
  }
  run_dir.write_json("summary.json", summary)
  report = [
      f"# {algo.name.upper()} run\n",
      f"Model `{config.model.name or config.model.preset}`, trainable "
      f"`{config.train.trainable}` ({trainer.n_trainable:,} parameters), {trainer.step} steps of "
      f"batch {config.train.batch_size} on {data_stats['source']} ({data_stats['n_train']} train / "
      f"{data_stats['n_eval']} held-out examples, sequence length {data_stats['seq_len']}).\n",
      f"Wall {wall:.0f} s; first step (compile) {trainer.times.compile_s:.1f} s; steady "
      f"{trainer.times.tokens_per_s:.0f} tokens/s.\n",
      "## Held-out metrics, start vs end\n",
      markdown_table(rows),
      finished_md,
      "## Plots\n",
      *[f"![{p}](plots/{p})\n" for p in plots],
      f"\nExported: `{exported}`. Config: `config.json`; every step: `metrics.jsonl`.\n",
  ]
  run_dir.write_report("\n".join(report))
  return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
