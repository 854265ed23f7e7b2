"""Shared settings of the training configs (sft.py, reward.py, dpo.py); not a config itself.

Every training config runs `align/train.py` (task `train`) with the algorithm in the module it
names in `config.algorithm` (`align/losses/NAME.py`: the loss, its batch layout and its record).

Variants: `smoke` (tiny random model with SmolLM2's tokenizer, seconds), `cpu` (SmolLM2-135M-Instruct,
LoRA r=8 α=16 dropout 0.05, a few dozen steps on the offline hh-rlhf pairs, minutes on 2 cores),
`gpu_full` (the seeds' settings: 500 steps, batch 4, lr 2e-5, by-name hub datasets).
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "gpu_full")


def data_config() -> ml_collections.ConfigDict:
  """The `data` section every training config starts from: the fields `align.data.build` reads."""
  c = ml_collections.ConfigDict()
  c.source = "hh-rlhf"  # local .json/.jsonl(.gz) path, HF dataset name, or offline "hh-rlhf"
  c.split = "train"  # HF split (ultrafeedback_binarized: "train_prefs"); ignored by files
  c.n = ml_collections.config_dict.placeholder(int)  # first n raw rows; None = all
  c.format = "auto"  # see normalize_sft / normalize_preference
  c.on_error = "fail"  # "skip": malformed rows are left out, counted in stats and logged
  c.max_length = 512  # tokens per sequence, prompt + response
  c.max_prompt_length = ml_collections.config_dict.placeholder(int)  # None = only max_length
  c.truncation = "keep_response"  # or "drop" (rows over a limit are counted and left out)
  c.pad_multiple = 0  # 0: S = max_length; k > 0: S = longest example rounded up to k (<= max)
  c.pack = False  # SFT only: first-fit pack examples into rows of S
  # DPO only: each pair as one [prompt | chosen | rejected] segment packed into rows (the prompt
  # is scored once); rows x width planned over the run's batches (`plan_shared_layout`)
  c.share_prompt = False
  c.share_prompt_width = 0  # 0: the longest pair segment rounded up to 64 tokens
  c.n_eval = 64  # held-out records (drawn by seed) for eval
  c.seed = 0  # holdout draw, shuffle order, packing bins
  c.shuffle = True
  c.num_epochs = ml_collections.config_dict.placeholder(int)  # None = repeat forever
  c.batch_size = 8
  return c


def base(algorithm: str, variant: str | None) -> ml_collections.ConfigDict:
  """Shared settings; `algorithm` names the module holding the algorithm's code and record."""
  c = common.header("train", variant, VARIANTS, what=algorithm.rsplit(".", 1)[-1])
  variant = c.variant
  c.model = ml_collections.ConfigDict({
      "name": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "float32",
      "preset": "", "tokenizer": "smollm2-135m-instruct", "seed": 0,
      # how the layer stack runs (same numbers): one lax.scan, and lm.config.REMAT_POLICIES
      "scan_layers": False, "remat": "none"})
  c.lora = ml_collections.ConfigDict({"rank": 8, "alpha": 16.0, "dropout": 0.05,
                                      "targets": "all-linear"})
  c.train = ml_collections.ConfigDict({
      "steps": 24, "batch_size": 4, "grad_accum": 1, "lr": 5e-4, "warmup_steps": 3,
      "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 1.0,
      "b1": 0.9, "b2": 0.999, "eps": 1e-8, "eval_every": 0, "eval_batch_size": 16,
      "checkpoint_every": 10, "keep_checkpoints": 2, "seed": 0,
      "trainable": "lora", "trainable_pattern": ml_collections.config_dict.placeholder(str),
      # parameter-path substring -> learning-rate factor (e.g. ppo.py's value head); {} = none
      "lr_multipliers": {},
      # a step whose loss exceeds spike_factor x its running mean (EMA spike_ema, after
      # spike_warmup steps) is skipped; 0 = off
      "spike_factor": 0.0, "spike_warmup": 100, "spike_ema": 0.99,
      # consecutive steps with a zero gradient after which the trainer stops the run; 0 = off
      "stall_steps": 5,
  })
  c.algorithm = algorithm  # e.g. "align.losses.dpo": its ALGORITHM record, run by align/train.py
  c.loss = ml_collections.ConfigDict()  # the algorithm's own settings (beta, margin, ...)
  c.data = data_config()
  # hh-rlhf offline: 2303 usable pairs (9 malformed rows are skipped and counted); prompts are
  # cut from the left to fit, replies kept.
  c.data.update(source="hh-rlhf", split="train", max_length=128, max_prompt_length=96,
                n_eval=64, pad_multiple=64, on_error="skip")
  # one batch size: the data pipeline batches what the trainer steps on
  c.data.batch_size = c.train.get_ref("batch_size")
  if variant == "smoke":
    c.model.update(preset="tiny", name="")
    c.lora.dropout = 0.0
    c.train.update(steps=4, batch_size=4, eval_every=2, eval_batch_size=4, checkpoint_every=2,
                   lr=1e-3, warmup_steps=1)
    c.data.update(n=48, n_eval=8, max_length=128, max_prompt_length=96)
  elif variant == "gpu_full":
    c.train.update(steps=500, batch_size=4, lr=2e-5, warmup_steps=50, eval_every=100,  # seeds
                   eval_batch_size=16, checkpoint_every=100)
    c.data.update(source="Anthropic/hh-rlhf", max_length=512, max_prompt_length=384, n_eval=256)
  return c
