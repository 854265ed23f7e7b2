"""pretrain -> SFT -> DPO -> verifier from one config (task `pipeline`, `align/pipeline.py`).

  python launch.py --config=configs/pipeline.py:cpu --workdir=runs/pipeline

Each stage is its own config (`configs/{pretrain,sft,dpo,verifier}.py` at `stages.<name>.variant`,
changed by `stages.<name>.overrides`, a nested dict merged into it); SFT, DPO and the verifier start from the
previous stage's weights and train every parameter (no LoRA). Variants: `smoke` (a tiny GPT-2-BPE
model pretrained for a few steps on GSM8K train, every stage a few steps; seconds per stage),
`cpu` (`pretrain.py:cpu`, the small GPT-2-BPE model on the offline text, then the `:cpu` stages;
about half an hour on 2 cores), `gpu_full` (`pretrain.py:gpu_full`, the Modern LLM recipe, then the
`:gpu_full` stages).
"""

import ml_collections

VARIANTS = ("smoke", "cpu", "gpu_full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "cpu"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.task = "pipeline"
  c.variant = variant
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  stage = lambda v, **o: ml_collections.ConfigDict({"variant": v, "overrides": o})
  c.stages = ml_collections.ConfigDict({
      "pretrain": stage(variant), "sft": stage(variant),
      # no LoRA in the pipeline, so no adapters to switch off: the reference is scored once
      "dpo": stage(variant, loss={"reference": "precomputed"}),
      "verifier": stage(variant)})
  # wikitext_tokens: the first N test tokens (0 = all); reference: scored beside the stages
  c.eval = ml_collections.ConfigDict({"wikitext_tokens": 0, "n_lines": 100, "gsm8k_n": 100,
                                      "max_new_tokens": 96, "reference": "gpt2"})
  if variant == "smoke":
    c.stages.pretrain.overrides = {
        "corpus": {"name": "gsm8k-gpt2", "store": "", "tokenizer": "gpt2", "sources": ["gsm8k"],
                   "split": "hash", "val_fraction": 0.005, "append_eos": True},
        "model": {"vocab_multiple": 64}, "data": {"seq_len": 128}, "sample_tokens": 0}
    c.eval.update(wikitext_tokens=1024, n_lines=8, gsm8k_n=4, max_new_tokens=8, reference="")
  return c
