"""Toy models of superposition (Elhage et al. 2022): the "Superposition 101" notebook's settings,
each a set of instances trained together in one compiled step.

  python launch.py --config=configs/toy_superposition.py:cpu --workdir=runs/toy

Settings: `intro` n=5, m=2, importance 0.9^i, 10 densities 20^(−k/9) (the pentagon at low
density); `geometry` n=100, m=20, importance 100^(−i/99) (WᵀW, norms coloured by
superposition); `dimensionality` n=200, m=20, equal importance (D* against 1/(1−S), sticky at
1/2); `phase` n=2, m=1 over relative importance × density, next to the closed-form phase diagram.
Training as the notebook: AdamW lr 1e-3, 10,000 steps of batch 1024, constant lr.

Code: `sae/toy.py` (task `toy_superposition`).
"""

import ml_collections

from configs import common

VARIANTS = ("smoke", "cpu", "gpu_full")


def _setting(name: str, kind: str, n_features: int, n_hidden: int, **kw):
  return ml_collections.ConfigDict({"name": name, "kind": kind, "n_features": n_features,
                                    "n_hidden": n_hidden, **kw})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.header("toy_superposition", arg, VARIANTS)
  variant = c.variant
  c.seed = 0
  c.train = ml_collections.ConfigDict({"steps": 10_000, "batch": 1024, "lr": 1e-3,
                                       "weight_decay": 0.01, "chunks": 10})
  # density 1 − S of instance k of K: sparsity_base^(−k/(K−1))
  c.settings = [
      _setting("intro", "intro", 5, 2, instances=10, sparsity_base=20.0, importance="decay",
               importance_decay=0.9),
      _setting("geometry", "geometry", 100, 20, instances=20, sparsity_base=20.0,
               importance="power", importance_decay=100.0),
      _setting("dimensionality", "dimensionality", 200, 20, instances=20, sparsity_base=100.0,
               importance="equal", importance_decay=1.0),
      # the phase diagram: relative importance of feature 2 in [0.1, 10], density in [1, 0.01]
      _setting("phase", "phase", 2, 1, grid=16, seeds=4, importance_min=0.1, importance_max=10.0,
               density_min=0.01, checks=[(0.5, 1.0), (2.0, 1.0), (0.5, 0.1)]),
  ]
  if variant == "smoke":
    c.train.update(steps=200, batch=128, chunks=2)
    c.settings[0].instances = 3
    c.settings[1].update(n_features=20, n_hidden=5, instances=3)
    c.settings[2].update(n_features=20, n_hidden=5, instances=3)
    c.settings[3].update(grid=3, seeds=2)
  elif variant == "gpu_full":
    c.settings[2].update(instances=40, sparsity_base=1000.0)
    c.settings[3].update(grid=40, seeds=8, importance_min=0.05, importance_max=20.0,
                         density_min=0.001)
  return c
