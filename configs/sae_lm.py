"""A sparse autoencoder on a language model's residual stream (SmolLM2-135M-Instruct, real weights),
through the same task as the vision USAE: one source is a plain TopK SAE (a one-source USAE is the
plain SAE bit for bit, `tests/test_usae.py`), several sources with the same tokenizer a USAE over
token-aligned residual streams.

  python launch.py --config=configs/sae_lm.py:cpu --workdir=runs/sae-lm-cpu

Activations: the residual stream after block `layer` on WikiText-2 valid (training) and test
(held-out), windows of `seq_len` tokens, the first `skip_first` positions of each window left
out. Instances: the lrs × seeds grid in one vmapped step. The report lists each concept's
top-activating held-out contexts.

Code: `sae/experiment.py` (task `usae`), `sae/activations.py` (`lm_store`), `sae/usae.py`.
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "gpu_full")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("usae", arg, VARIANTS)
  variant = c.variant
  c.seed = 0
  c.store_dir = "runs/activations"
  # skip_first: window positions left out (the sink positions' norms reach 100x the median)
  c.data = ml_collections.ConfigDict({"dataset": "wikitext-2", "seq_len": 128, "train_seqs": 400,
                                      "test_seqs": 100, "capture_batch": 8, "skip_first": 4})
  c.sources = [ml_collections.ConfigDict({"model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                          "layer": 15, "tap": "", "pool": "tokens"})]
  c.standardise = "scalar"
  c.usae = ml_collections.ConfigDict({"n_latents": 4608, "k": 32, "loss": "mse",
                                      "rules": ["official"], "aux_coef": 0.1,
                                      "decoder_norm": "project", "auxk_coef": 0.0,
                                      "dead_after": 1000})
  c.independent = False  # one source: the USAE is the plain SAE
  c.train = ml_collections.ConfigDict({"epochs": 5, "batch": 512, "lrs": [3e-4, 1e-3],
                                       "seeds": [0], "max_grad_norm": 1.0, "log_every": 50,
                                       "checkpoint_every": 200})
  c.eval = ml_collections.ConfigDict({"tau": 0.0, "universal": 0.9, "specific": 0.1})
  c.viz = ml_collections.ConfigDict({"concepts": 6, "top_images": 5, "steps": 0})
  if variant == "smoke":
    c.data.update(seq_len=32, train_seqs=16, test_seqs=8, capture_batch=8)
    c.sources[0].layer = 3
    c.usae.update(n_latents=256, k=8)
    c.train.update(epochs=2, batch=64, log_every=4, checkpoint_every=8)
    c.viz.update(concepts=2, top_images=3)
  elif variant == "gpu_full":
    c.data.update(train_seqs=1600, test_seqs=400, capture_batch=64)
    c.usae.update(n_latents=9216)
    c.train.update(epochs=20, seeds=[0, 1, 2], lrs=[1e-4, 3e-4, 1e-3])
  return c
