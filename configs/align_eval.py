"""Alignment diagnostics: perplexity, KL to the reference, verbosity, length compliance, hacking.

Code: `align/evals/compare.py` (task `align_eval`), over the metrics in `align/evals/`.

Variants: `stability` (the stability study, docs/studies/stability.md: the reference, LoRA-DPO
of `dpo.py:cpu`, GRPO with the reward-model reward `grpo.py:rm_cpu` and the same at ten times the
learning rate `grpo.py:rm_cpu_10x`, side by side, with the `reward.py:cpu` reward model in the
hacking probes; train the four runs first), `cpu` (default; SmolLM2-135M-Instruct vs the LoRA-DPO adapter of `dpo.py:cpu` in
`runs/dpo-cpu/adapter`, which must exist: train it first; 24 AlpacaEval prompts, 96 new tokens,
minutes here), `standin` (cpu with a labelled STAND-IN random LoRA instead of the adapter), `smoke` (random tiny models with a byte tokenizer, seconds, for
tests), `gpu_full` (the seeds' settings: 400 prompts, 256 new tokens, whole WikiText-2 test),
`stability_gpu` (the stability study at gpu_full scale, 128 new tokens as PA5: `make stability
STUDY=gpu_full` trains its four runs first).

`models`: a list of `{name, model, adapter, stand_in_lora}`; `model` is a hub id, path, offline
alias or `tiny:SEED`; `adapter` a PEFT LoRA directory (loaded by `lm.lora.load_peft`);
`stand_in_lora` a random LoRA `{rank, alpha, b_std, seed}` used until a trained DPO adapter
exists (labelled "stand-in" in the report). Replace the stand-in entry by
`{"name": "lora-dpo", "model": BASE, "adapter": "runs/dpo/adapter"}` once one does.
"""


import ml_collections

from configs import common, grpo

_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Written by `launch.py --config=configs/dpo.py:cpu --workdir=runs/dpo-cpu`.
DPO_CPU_ADAPTER = "runs/dpo-cpu/adapter"
# The stability study's runs at each scale: name -> (--config, --workdir); align_eval.py:stability
# (and :stability_gpu) reads their adapters and the reward model. `make stability [STUDY=gpu_full]`
# trains them.
STUDIES = {
    scale: {
        "reward model": (f"configs/reward.py:{scale}", grpo.RM_RUNS[scale]),
        "lora-dpo": (f"configs/dpo.py:{scale}", f"runs/dpo-{tag}"),
        "grpo-rm": (f"configs/grpo.py:rm_{scale}", f"runs/grpo-rm-{tag}"),
        "grpo-rm-10x-lr": (f"configs/grpo.py:rm_{scale}_10x", f"runs/grpo-rm-10x-{tag}"),
    } for scale, tag in (("cpu", "cpu"), ("gpu_full", "gpu"))}
VARIANTS = ("smoke", "cpu", "standin", "gpu_full", "stability", "stability_gpu")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("align_eval", arg, VARIANTS)
  variant = c.variant
  c.seed = 0
  c.reward_run = ""  # a reward run's --workdir: its reward model joins the hacking probes
  c.dtype = "float32"
  # cpu: the trained LoRA-DPO adapter of dpo.py:cpu (train it first); standin: a labelled random
  # LoRA. The variant alone decides, never what happens to be on disk.
  policy = ({"name": "lora-dpo", "model": _BASE, "adapter": DPO_CPU_ADAPTER, "stand_in_lora": None}
            if variant != "standin"
            else {"name": "lora-dpo (stand-in)", "model": _BASE, "adapter": None,
                  "stand_in_lora": {"rank": 8, "alpha": 16.0, "b_std": 0.03, "seed": 0}})
  c.models = [{"name": "reference", "model": _BASE, "adapter": None, "stand_in_lora": None},
              policy]
  c.reference = "reference"
  c.prompts = ml_collections.ConfigDict({"source": "alpaca_eval", "n": 24})
  c.score_multiple = 64  # scored rows are padded to a multiple of this: fewer compiles
  # One decoding batch for all 48 prompts (plain + length-instructed): CPU decode steps are
  # weight-bandwidth bound, so a larger batch costs about the same per step.
  c.decode = ml_collections.ConfigDict({"max_new_tokens": 96, "batch_size": 48})
  c.perplexity = ml_collections.ConfigDict({
      "max_chars": 40_000,
      "text": {"max_tokens": 1024, "window": 512, "stride": 256, "batch_size": 4},
      "pairs_source": "alpaca_eval", "pairs_n": 24, "max_response_tokens": 128, "batch_size": 8,
  })
  c.kl = ml_collections.ConfigDict({"temperature": 1.0, "text_tokens": 512, "window": 256,
                                    "stride": 128, "batch_size": 4})
  c.verbosity = ml_collections.ConfigDict({"length_instruction": "Answer in at most 50 words.",
                                           "word_limit": 50})
  c.hacking = ml_collections.ConfigDict({
      "perturbations": ["filler", "keywords", "reorder", "padding"], "beta": 0.1,
      "n": 8,  # the first n of the reference's greedy answers (None: all)
      "batch_size": 8, "max_response_tokens": 256})
  if variant == "smoke":
    c.models = [
        {"name": "reference", "model": "tiny:0", "adapter": None, "stand_in_lora": None},
        {"name": "lora (stand-in)", "model": "tiny:0", "adapter": None,
         "stand_in_lora": {"rank": 4, "alpha": 8.0, "b_std": 0.5, "seed": 0}},
    ]
    c.prompts.n = 4
    c.score_multiple = 256
    c.decode.update(max_new_tokens=16, batch_size=8)
    c.perplexity.update(max_chars=2000, pairs_n=4, max_response_tokens=64, batch_size=4)
    c.perplexity.text.update(max_tokens=512, window=128, stride=64)
    c.kl.update(text_tokens=256, window=128, stride=64)
    c.hacking.update(n=None, batch_size=4, max_response_tokens=64)
  elif variant in ("gpu_full", "stability_gpu"):
    c.prompts.n = 400
    c.decode.update(max_new_tokens=256, batch_size=64)
    c.perplexity.update(max_chars=10**8, pairs_n=400, max_response_tokens=512, batch_size=32)
    c.perplexity.text.update(max_tokens=10**8, window=1024, stride=512, batch_size=16)
    c.kl.update(text_tokens=32_768, window=1024, stride=512, batch_size=16)
    c.hacking.update(n=None, batch_size=32, max_response_tokens=512)
  if variant.startswith("stability"):
    runs = STUDIES["gpu_full" if variant == "stability_gpu" else "cpu"]
    c.models = [c.models[0]] + [
        {"name": name, "model": _BASE, "adapter": f"{workdir}/adapter", "stand_in_lora": None}
        for name, (_, workdir) in runs.items() if name != "reward model"]
    c.reward_run = runs["reward model"][1]
    c.hacking.n = None  # every prompt: the reward model scores every model's own answers too
    if variant == "stability_gpu":
      c.decode.max_new_tokens = 128  # PA5's max.new.tokens, as the GRPO runs sampled
  return c
