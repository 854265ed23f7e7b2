"""Pretraining from scratch: the `pretrain` task behind `launch.py`, and its loss.

The corpus (`lm.pretrain.corpus`) is tokenised once into a token store; packed windows of `data.seq_len`
tokens train a randomly initialised decoder (`model.preset` + `model.overrides`, its vocabulary
the store's, optionally padded to a multiple of `model.vocab_multiple`) on the one trainer
(`lm.train.trainer.Trainer`: accumulation, clipping, warm-up + cosine, loss-spike guard, checkpoints
with the iterator state, exact `--resume`). Every step logs tokens/s and TFLOP/s (`lm.train.flops`,
"causal" convention; MFU where the device's peak is known). Held-out: the validation split's
windows, token-weighted.

`model.sink` picks how the model may park attention (the from-scratch variants of the sink
studies): "none" (vanilla softmax), "logit" (one learned sink logit per head, gpt-oss), "zero"
(that logit frozen at 0: softmax with a 1 in the denominator, StreamingLLM's "zero sink" /
SoftMax_1), "token" (a dedicated sink token, one id past the corpus vocabulary, prepended to every
row and visible to every query: StreamingLLM's learnable sink token). Every evaluation also
logs the sink rate (Gu et al., eps 0.3, on `sink_rate_sequences` validation windows of up to 64
tokens), so the run records when sinks emerge.

The run directory holds the token store's manifest and split statistics, metrics, checkpoints,
plots, `summary.json` (final validation loss next to the unigram and bigram baselines of the same
split) and `report.md`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import config as lm_config
from lm.hub import runs, vocab
from lm.hub.loader import shapes_of
from lm.hub.runs import model_config, trainable
from lm.pretrain import corpus, sink_stats
from lm.train import aot, flops
from lm.train.checkpoint import Checkpointer
from lm.model import Transformer
from lm.data import REPO_ROOT
from lm.train.rundir import RunDir, markdown_table, plot_history, pyplot, save_figure
from lm.train.trainer import Trainer

log = logging.getLogger(__name__)


def attention_mask(batch: dict) -> jax.Array:
  """`[B, S, S]` keys each query may see (the model adds causality): its own document
  (`segment_ids` > 0), and every `global_keys` position (a sink token)."""
  seg = batch["segment_ids"]
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
  return same | (batch["global_keys"][:, None, :] > 0)


def lm_loss(model, batch: dict, cfg) -> tuple[jax.Array, dict]:
  """Mean next-token cross-entropy over `loss_mask`, plus `z_loss` * mean(log Z)^2 (PaLM's
  auxiliary loss keeping the softmax normaliser near 1; 0 = off).

  `document_mask` True: each token attends within its own document, RoPE restarting
  there; False attends causally across the packed documents with positions 0..S-1 (nanoGPT's
  convention), which lets a fused kernel run its plain causal mask.

  Metrics: `loss` (what is optimised), `nll` (mean cross-entropy, nats/token), `nll_sum` and
  `n_tokens` (so held-out means can be token-weighted across batches), `log_z` (mean |log Z|).
  """
  if cfg.document_mask:
    logits = model(batch["tokens"], batch["positions"], attention_mask(batch))[0]
  else:
    logits = model(batch["tokens"])[0]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  w = batch["loss_mask"].astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  mean_nll = (nll * w).sum() / n
  loss = mean_nll + float(cfg.z_loss) * ((log_z**2) * w).sum() / n
  return loss, {"loss": loss, "nll": mean_nll, "nll_sum": (nll * w).sum(), "n_tokens": w.sum(),
                "log_z": (jnp.abs(log_z) * w).sum() / n}


def init_loss_prediction(cfg: lm_config.ModelConfig) -> float:
  """Expected loss at initialisation: the final RMSNorm makes |h|^2 = d, so the logits h.E_v of
  N(0, s^2) embedding rows are N(0, s^2 d) (s = 0.02, tied head), and for V of them
  E[log sum exp] ~ ln V + s^2 d / 2 while the target's logit averages 0."""
  from lm.layers import _INIT_STD

  return math.log(cfg.vocab_size) + _INIT_STD**2 * cfg.d_model / 2


def _store_dir(config):
  path = config.corpus.store or f"runs/corpora/{config.corpus.name}"
  return REPO_ROOT / path if not path.startswith("/") else path


def validation_loss(trainer: Trainer, windows: corpus.Windows, batch_size: int,
                    max_batches: int | None) -> dict:
  """Token-weighted held-out cross-entropy over the validation windows."""
  m = trainer.evaluate(corpus.eval_batches(windows, batch_size, max_batches))
  nll = m["nll_sum"] / max(m["n_tokens"], 1e-9)
  return {"loss": nll, "ppl": math.exp(min(nll, 50.0)), "log_z": m["log_z"]}


def _sink_probe(windows: corpus.Windows, n: int):
  """`[n, T]` validation tokens for the sink rate (T <= 64, the first n windows; None if n = 0)."""
  if n <= 0:
    return None
  t = min(64, windows.seq_len)
  rows = [windows[i]["tokens"][:t] for i in range(min(n, len(windows)))]
  return np.stack(rows)


def _sample(model, tokenizer, prompt_ids: list[int], n: int, seq_len: int, seed: int,
            vocab: int, prefix: list[int], temperature: float = 0.8) -> str:
  """A short sample for the report: ancestral sampling over the corpus vocabulary (`vocab` ids),
  each step reading `prefix` + the last tokens that fill `seq_len` (left-padded with the first
  prompt token at the start, for one static shape)."""
  ids = list(prompt_ids)
  key = jax.random.key(seed)
  fwd = nnx.jit(lambda m, t: m(t)[0][0, -1, :vocab])
  span = seq_len - len(prefix)
  for _ in range(n):
    window = ids[-span:]
    window = prefix + [window[0]] * (span - len(window)) + window
    logits = fwd(model, jnp.asarray([window], jnp.int32))
    key, sub = jax.random.split(key)
    ids.append(int(jax.random.categorical(sub, logits / temperature)))
  return tokenizer.decode(ids)


def vocab_size_without_data(config) -> int:
  """The corpus vocabulary, from its token store when one exists, else from the tokenizer alone
  (GPT-2 BPE); a character vocabulary comes from the text, so it needs the store."""
  manifest = Path(_store_dir(config)) / "manifest.json"
  if manifest.exists():
    return corpus.TokenStore(manifest.parent).vocab_size
  if config.corpus.tokenizer == "gpt2":
    return vocab.gpt2_tokenizer().vocab_size
  raise ValueError(f"--compile_only: corpus.tokenizer={config.corpus.tokenizer!r} takes its "
                   "vocabulary from the text; build the token store first (run the config once) "
                   "or compile a GPT-2 BPE config.")


def compile_only(config, mesh, topology: str) -> dict:
  """The training step of `config` compiled for `mesh` (the target topology's devices) on abstract
  arrays, no weights or data read: `aot.report`'s fields for `aot.json`."""
  seq_len = int(config.data.seq_len)
  n_vocab = vocab_size_without_data(config)
  cfg = model_config(config, n_vocab)
  model = shapes_of(cfg, int(config.model.seed))
  fpt = flops.flops_per_token(cfg, seq_len)
  trainer = Trainer(model, lm_loss, config.loss, config.train, trainable=trainable(config),
                    mesh=mesh, flops_per_token=fpt.total)
  sink = n_vocab if config.model.sink == "token" else None
  zeros = np.zeros(seq_len + 2, np.int32)
  row = corpus.Windows(zeros, zeros, seq_len, sink)[0]
  batch_size = int(config.train.batch_size)
  batch = {k: jax.ShapeDtypeStruct((batch_size,) + v.shape, np.int32) for k, v in row.items()}
  compiled = trainer.compile_step(batch)
  out = aot.report(compiled, topology=topology, mesh=mesh,
                   model_flops=fpt.total * batch_size * seq_len)
  out.update(task="pretrain", model=cfg.name, n_params=cfg.n_params,
             trainable_params=trainer.n_trainable, batch_size=batch_size, seq_len=seq_len)
  return out


def run(config, run_dir: RunDir, mesh=None) -> dict:
  store = corpus.open_or_build(_store_dir(config), config.corpus)
  run_dir.write_json(runs.MANIFEST,
                     {k: v for k, v in store.manifest.items() if k != "documents"})
  seq_len = int(config.data.seq_len)
  sink = store.vocab_size if config.model.sink == "token" else None
  train_tokens, train_docs = store.split_stream("train")
  val_tokens, val_docs = store.split_stream("val", config.data.val_sources or None)
  train_w = corpus.Windows(train_tokens, train_docs, seq_len, sink)
  val_w = corpus.Windows(val_tokens, val_docs, seq_len, sink)

  cfg = model_config(config, store.vocab_size)
  model = Transformer(cfg, rngs=nnx.Rngs(params=int(config.model.seed)))
  fpt = flops.flops_per_token(cfg, seq_len)
  trainer = Trainer(model, lm_loss, config.loss, config.train, trainable=trainable(config),
                    mesh=mesh, flops_per_token=fpt.total)
  train_iter = iter(corpus.packed_dataset(train_w, batch_size=config.train.batch_size,
                                          seed=int(config.train.seed)))
  eval_bs = int(config.train.eval_batch_size)
  max_eval = config.train.eval_batches or None
  stats = {
      "train_tokens": int(len(train_tokens)), "val_tokens": int(len(val_tokens)),
      "train_windows": len(train_w), "val_windows": len(val_w), "seq_len": seq_len,
      "sink_token": sink, "n_params": cfg.n_params,
      "flops_per_token": {"learnable": fpt.learnable, "attention": fpt.attention,
                          "total": fpt.total,
                          "nanogpt": flops.flops_per_token(cfg, seq_len, "nanogpt").total},
      "epochs": config.train.steps * config.train.batch_size / len(train_w),
  }
  run_dir.write_json("data_stats.json", stats)
  log.info("model %s: %s parameters; %.3g train FLOPs/token; %s train / %s val tokens; "
           "%.2f epochs", cfg.name, f"{cfg.n_params:,}", fpt.total, f"{len(train_tokens):,}",
           f"{len(val_tokens):,}", stats["epochs"])

  ckpt = Checkpointer(run_dir.path / "checkpoints",
                      max_to_keep=config.train.keep_checkpoints)
  probe = _sink_probe(val_w, int(config.sink_rate_sequences))

  def evaluate():
    out = validation_loss(trainer, val_w, eval_bs, max_eval)
    if probe is not None:
      out["sink_rate"] = sink_stats.head_stats(trainer.model, probe).sink_rate(0.3)
    return out

  t0 = time.time()
  history = trainer.fit(train_iter, run_dir=run_dir, ckpt=ckpt, evaluate=evaluate,
                        resume=getattr(run_dir, "resume", False),
                        resume_step=getattr(run_dir, "resume_step", None))
  wall = time.time() - t0
  ckpt.close()
  final = validation_loss(trainer, val_w, eval_bs, None)  # every validation window
  # the report's sample runs on process 0 alone: on the whole model, which every process takes
  # part in gathering (a model sharded across processes would wait for the others there)
  model = trainer.host_model() if config.sample_tokens else None
  if not run_dir.primary:
    return {}
  baselines = corpus.bigram_nll(train_tokens, val_tokens, store.vocab_size)
  plots = plot_history(history, ["loss", "nll", "tokens_per_s", "tflops_per_s", "mfu",
                                 "grad_norm", "lr", "log_z", "sink_rate"], run_dir)
  plots.append(_plot_curve(history, baselines, run_dir))
  tokenizer = vocab.tokenizer_from_json(store.tokenizer_meta)
  sample = ""
  if config.sample_tokens:
    prompt = val_tokens[:min(seq_len // 2, 16)].tolist()
    sample = _sample(model, tokenizer, prompt, int(config.sample_tokens), seq_len,
                     int(config.train.seed), store.vocab_size, [sink] if sink is not None else [])
  summary = {
      "model": cfg.name, "n_params": cfg.n_params, "steps": trainer.step, "wall_s": wall,
      "compile_s": trainer.times.compile_s, "tokens_per_s": trainer.times.tokens_per_s,
      "tflops_per_s": trainer.times.tokens_per_s * fpt.total / 1e12,
      "val_loss": final["loss"], "val_ppl": final["ppl"],
      "bigram_val_loss": baselines["bigram"]["nll"], "unigram_val_loss": baselines["unigram"]["nll"],
      "baselines": baselines, "init_loss_predicted": init_loss_prediction(cfg),
      "skipped_steps": int(sum(h.get("train/skipped", 0) for h in history)),
      "data": stats,
  }
  evals = [h for h in history if "eval/loss" in h]
  if evals:
    summary["val_loss_at_start"] = evals[0]["eval/loss"]
  run_dir.write_json("summary.json", summary)
  unit = "char" if store.tokenizer_meta["kind"] == "char" else "token"
  rows = [{"model": f"ours ({cfg.name}, {cfg.n_params:,} params)", f"val nats/{unit}": final["loss"]},
          {"model": "bigram (add-alpha, same split)", f"val nats/{unit}": baselines["bigram"]["nll"]},
          {"model": "unigram (same split)", f"val nats/{unit}": baselines["unigram"]["nll"]}]
  report = [
      f"# Pretraining run: {cfg.name}\n",
      f"{cfg.n_layers} layers, d {cfg.d_model}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), ffn "
      f"{cfg.d_ff}, vocabulary {cfg.vocab_size} ({store.tokenizer_meta['kind']}), context "
      f"{seq_len}, {cfg.n_params:,} parameters, compute {cfg.dtype}.\n",
      f"Corpus {', '.join(store.manifest['sources'])}: {len(train_tokens):,} train / "
      f"{len(val_tokens):,} validation tokens (split `{store.manifest['split_rule']}`, "
      f"{store.manifest['overlap_documents']} documents in both); {trainer.step} steps of batch "
      f"{config.train.batch_size} = {stats['epochs']:.2f} epochs.\n",
      f"Wall {wall:.0f} s; first step (compile) {trainer.times.compile_s:.1f} s; steady "
      f"{trainer.times.tokens_per_s:,.0f} tokens/s = {summary['tflops_per_s'] * 1e3:.1f} GFLOP/s "
      f"at {fpt.total:.3g} train FLOPs/token (lm.flops, causal convention).\n",
      "## Validation loss (every validation window, token-weighted)\n",
      markdown_table(rows),
      f"\nLoss at initialisation: predicted {summary['init_loss_predicted']:.3f}, measured "
      f"{summary.get('val_loss_at_start', float('nan')):.3f}.\n",
      (f"## Sample (temperature 0.8)\n\n```\n{sample}\n```\n" if sample else ""),
      "## Plots\n",
      *[f"![{p}](plots/{p})\n" for p in plots],
  ]
  run_dir.write_report("\n".join(report))
  return {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}


def _plot_curve(history: list[dict], baselines: dict, run_dir: RunDir) -> str:
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  tr = [(h["step"], h["train/nll"]) for h in history if "train/nll" in h]
  ev = [(h["step"], h["eval/loss"]) for h in history if "eval/loss" in h]
  if tr:
    ax.plot(*zip(*tr), alpha=0.6, label="train (batch)")
  if ev:
    ax.plot(*zip(*ev), "o-", label="validation")
  for name, style in (("bigram", "--"), ("unigram", ":")):
    ax.axhline(baselines[name]["nll"], color="gray", linestyle=style, label=f"{name} baseline")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats)")
  ax.set_ylim(top=max(baselines["unigram"]["nll"] * 1.15, min([v for _, v in ev] or [10]) + 0.5))
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, run_dir.plots / "loss_curve.png", dpi=110)
  return "loss_curve.png"
