"""Pretraining the modern decoder from scratch (task `pretrain`, code in `lm/pretrain/task.py`).

  python launch.py --config=configs/pretrain.py:cpu_char --workdir=runs/pretrain-char
  python launch.py --config=configs/pretrain.py:cpu --workdir=runs/pretrain-bpe
  python launch.py --config=configs/pretrain.py:gpu_full --workdir=runs/pretrain-253m

Variants:
- `smoke`: a tiny character model on tiny Shakespeare, a few steps (seconds).
- `cpu_char`: nanoGPT's CPU recipe for `shakespeare_char` (4 layers, 4 heads, d 128, context 64,
  batch 12, 2,000 iterations, lr 1e-3 -> 1e-4 cosine, warm-up 100, beta2 0.99, dropout 0) on the
  modern block (RMSNorm, RoPE, SwiGLU with ffn 352 ~ the 4d GELU MLP's parameters), first 90% of
  the characters train / last 10% validation, as nanoGPT splits. nanoGPT's figure: val 1.88.
- `cpu_char256`: the same model at a context of 256 for 1,500 steps (4.6M characters), the base of
  the sink studies: `--config.model.sink=none|logit|zero|token` (lm/pretrain/task.py).
- `cpu`: a small GPT-2-BPE model (4 layers, d 256, 4 heads / 2 kv, context 256) on the offline text
  (tiny Shakespeare, GSM8K train, hh-rlhf test dialogues, AlpacaEval; documents split 95/5 by text
  hash); WikiText-2 stays out for evaluation.
- `gpu_full`: the Modern LLM recipe on `modern-253m` (d 1024, 12 layers, 16 heads, ffn 4096,
  context 1024, tied embeddings; vocabulary padded to 50304): AdamW 3e-4 (beta 0.9/0.95), wd 0.1,
  clip 1.0, warm-up 500 then cosine to 3e-5, batch 128 x 1024 as micro 32 x 4, bf16 compute over
  float32 masters, 40k steps, a learned sink logit per head kept on under the fused (cuDNN)
  attention that the Modern LLM run had to give sinks up for. Offline it trains on the same text
  as `cpu` (about 3.7M tokens: many epochs); with a hub, point corpus.sources at a real corpus.
- `tpu_pod`: `gpu_full` on a TPU slice of two hosts or more (v5p:2x2x2: 8 chips, 2 hosts): the data
  axis (2) across the hosts, FSDP over the chips of each; the fused attention is XLA's there
  (`jax.nn.dot_product_attention`; no Splash kernel). Check it from any host with
  `launch.py --config=configs/pretrain.py:tpu_pod --compile_only --topology=v5p:2x2x2`.
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu_char", "cpu_char256", "cpu", "gpu_full", "tpu_pod")
# the offline text in GPT-2 BPE (WikiText-2 is kept out: it is the evaluation set)
OFFLINE_BPE = {"name": "offline-gpt2", "tokenizer": "gpt2",
               "sources": ["tinyshakespeare", "gsm8k", "hh-rlhf", "alpaca-eval"],
               "split": "hash", "val_fraction": 0.05, "append_eos": True}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("pretrain", arg, VARIANTS, default="cpu_char")
  variant = c.variant
  # the token store: built once under runs/corpora/<name> (or `store`), reused by later runs
  c.corpus = ml_collections.ConfigDict({
      "name": "shakespeare-char", "store": "", "tokenizer": "char",
      "sources": ["tinyshakespeare"], "split": "tail", "val_fraction": 0.1, "seed": 0,
      "append_eos": False})
  # val_sources: the sources validated on ([] = every one)
  c.data = ml_collections.ConfigDict({"seq_len": 64, "val_sources": []})
  c.model = ml_collections.ConfigDict({
      "preset": "tiny", "overrides": {"d_model": 128, "n_layers": 4, "n_heads": 4,
                                      "n_kv_heads": 4, "d_ff": 352},
      "vocab_multiple": 1, "dtype": "float32", "seed": 0, "scan_layers": False, "remat": "none",
      # "unfused" (the reference; fastest on a CPU) or "fused" (lm/attention.py: cuDNN on a GPU)
      "attention_impl": "unfused",
      # where attention may park (lm/pretrain/task.py): none | logit | zero | token
      "sink": "none"})
  # document_mask False: attend across packed documents (nanoGPT's way; a fused kernel's plain
  # causal mask) instead of within each
  c.loss = ml_collections.ConfigDict({"z_loss": 0.0, "document_mask": True})
  # eval_batches: validation batches per evaluation in training (0 = all; the final one is all)
  c.train = ml_collections.ConfigDict({
      "steps": 2000, "batch_size": 12, "grad_accum": 1, "lr": 1e-3, "warmup_steps": 100,
      "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.1, "grad_clip": 1.0,
      "b1": 0.9, "b2": 0.99, "eps": 1e-8, "eval_every": 250, "eval_batch_size": 64,
      "eval_batches": 40, "checkpoint_every": 500, "keep_checkpoints": 2, "seed": 1337,
      "spike_factor": 0.0, "spike_warmup": 100, "spike_ema": 0.99,
      # consecutive steps with a zero gradient after which the trainer stops the run; 0 = off
      "stall_steps": 5,
      "lr_multipliers": {}})  # parameter-path substring -> learning-rate factor; {} = none
  c.sample_tokens = 300  # a sample of this many tokens in the report (0 = none)
  c.sink_rate_sequences = 16  # validation windows for the sink rate logged at every evaluation
  if variant == "smoke":
    c.model.overrides = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64}
    c.train.update(steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_batch_size=8,
                   eval_batches=2, checkpoint_every=2)
    c.data.seq_len = 32
    c.sample_tokens = 20
  elif variant == "cpu_char256":  # the sink variants' model: cpu_char at a context of 256
    c.data.seq_len = 256
    c.train.update(steps=1500, eval_every=250, eval_batch_size=16, eval_batches=20)
  elif variant == "cpu":
    c.corpus.update(OFFLINE_BPE)
    c.data.seq_len = 256
    c.model.overrides = {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                         "d_ff": 688}
    c.model.vocab_multiple = 64
    c.train.update(steps=600, batch_size=8, lr=1e-3, warmup_steps=60, b2=0.95,
                   eval_every=100, eval_batch_size=16, eval_batches=20, checkpoint_every=100)
    c.sample_tokens = 60
  elif variant in ("gpu_full", "tpu_pod"):
    c.corpus.update(OFFLINE_BPE)
    c.data.seq_len = 1024
    c.model.overrides = {}  # the preset as it is (update() would merge into the base's overrides)
    c.model.update(preset="modern-253m", vocab_multiple=64, dtype="bfloat16",
                   scan_layers=True, remat="none", attention_impl="fused", sink="logit")
    c.train.update(steps=40_000, batch_size=128, grad_accum=4, lr=3e-4, warmup_steps=500,
                   min_lr_ratio=0.1, b2=0.95, eval_every=1000, eval_batch_size=32,
                   eval_batches=20, checkpoint_every=1000, spike_factor=3.0, spike_warmup=1000)
    c.sample_tokens = 100
    if variant == "tpu_pod":
      c.mesh.update(data=2, fsdp=-1, tensor=1)
  return c
