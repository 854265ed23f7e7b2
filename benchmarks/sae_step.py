"""SAE training steps on this CPU: the vectorised trainer vs the same instances one at a time, and
our USAE step vs the official update rule in PyTorch.

vectorised  `sae/train.py`: I TopK SAE instances (--seeds x --lrs; d_in 512, 2048 latents, k 32,
            batch 256 by default) in one jitted step vmapped over the instances, against the same I
            instances each with its own 1-instance state (`init_state`) and its own jitted
            `make_step`, called in turn in a Python loop every step. The SAE is the trainer's
            default (AuxK on); every instance sees the same rows. Figure: instance-steps/s; the
            target is a ratio of 3. Both sides end at the same per-instance MSE ("final_mse").
usae        `sae/usae.py` (loss mse, rule official, d_ins 1280 and 1024, the same latents, k and
            batch) against the official rule (YorkUCVIL/UniversalSAE train.py) written by hand in
            torch: one TopK SAE per source (a torch.nn.Linear encoder on x - b_dec, ReLU, torch.topk
            keeping the values, decoder rows W_dec [m, d] + b_dec); a step draws source i, encodes
            x_i, decodes every source j from that code, loss = sum_j mean over rows of
            sum_d (x_j - x^_j)^2, backward, clips source i's gradient to global norm 1, and steps
            only source i's torch.optim.Adam (lr 3e-4, as the official config). Its decoder-norm
            rule is ours ("project": the gradient's component along each decoder row removed
            before the update, rows renormalised after). What differs from the official code is
            listed in the JSON ("differences"). Torch runs with as many threads as the machine
            has cores, as a torch user would. Figure: steps/s.

Data is Gaussian (what a TopK step costs does not depend on it); the USAE's source sequence is drawn
from one seed, so both sides draw the same. Each side runs in its own live subprocess (its own peak
memory and runtime settings: ours as launch.py runs it, torch in its default environment), first
compiling (ours) or touching (torch) one step per program before it reports ready; then
`--warmup` untimed rounds and `--rounds` timed rounds of `--steps` steps each, the four sides
alternating (A B C D, D C B A, ...; `benchmarks.harness.race`), the machine probed before and
after. Rounds are quoted as min / median / max; a ratio is the ratio of medians.

  python -m benchmarks.sae_step [--rounds 5 --steps 10] [--smoke] [--strict]

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging

from benchmarks import harness
from lm.train import runtime

flags.DEFINE_integer("rounds", 5, "Timed rounds per side, alternating the sides.")
flags.DEFINE_integer("warmup", 1, "Untimed rounds per side before the timed ones.")
flags.DEFINE_integer("steps", 10, "Training steps per round (one timed unit).")
flags.DEFINE_bool("smoke", False, "Tiny sizes, 2 rounds of 2 steps: checks the code runs (never "
                  "quote).")
flags.DEFINE_bool("strict", False, "Exit 1 when the machine was not quiet during the run.")
flags.DEFINE_integer("d_in", 512, "vectorised: SAE input width.")
flags.DEFINE_integer("n_latents", 2048, "Latents m (both parts).")
flags.DEFINE_integer("k", 32, "TopK k (both parts).")
flags.DEFINE_integer("batch", 256, "Rows per step (both parts).")
flags.DEFINE_integer("seeds", 2, "vectorised: seeds; instances I = seeds x lrs.")
flags.DEFINE_list("lrs", ["1e-4", "3e-4", "1e-3", "3e-3"], "vectorised: learning rates.")
flags.DEFINE_list("usae_d_ins", ["1280", "1024"], "usae: each source's width.")
flags.DEFINE_integer("torch_threads", 0, "usae: torch intra-op threads (0: os.cpu_count()).")
flags.DEFINE_bool("torch_frozen_targets", False,
                  "usae: torch skips the gradients of the sources not drawn (the official code "
                  "computes them; only source i's optimizer uses any)")
flags.DEFINE_string("side", "", "internal: run one side (vectorised, loop, ours, torch)")
FLAGS = flags.FLAGS

SIDES = ("vectorised", "loop", "ours", "torch")
USAE_LR, MAX_GRAD_NORM, POOL = 3e-4, 1.0, 4  # POOL: distinct batches each side cycles through
FORWARD = ("rounds", "warmup", "steps", "d_in", "n_latents", "k", "batch", "seeds", "lrs",
           "usae_d_ins", "torch_threads", "torch_frozen_targets")
TARGET_RATIO = 3.0
DIFFERENCES = [
    ("decoder norm: both 'project' (ours' default); the official code (overcomplete 0.3.0 "
     "DictionaryLayer, normalization 'l2') renormalises W_dec in place before every training "
     "forward and keeps the gradient's component along each row"),
    ("encoder: a Linear on x - b_dec here, as ours; the official config uses overcomplete's "
     "mlp_bn_1 (Linear + BatchNorm1d + ReLU) and its decoder has no bias"),
    ("clipping: source i's gradient alone, as ours; the official code clips every SAE's "
     "gradient, which cannot change the update (only source i steps, the others' are zeroed "
     "before use)"),
    ("gradients: torch's backward computes every source's (as the official code; "
     "--torch_frozen_targets skips them); XLA drops the decoder gradients the official rule "
     "never uses"),
    "ours also computes per-target R^2 and L0 metrics every step; torch only the loss",
]


def _usae_sources(n: int) -> list[int]:
  import numpy as np

  rng = np.random.default_rng(1)
  return [int(s) for s in rng.integers(0, len(FLAGS.usae_d_ins), n)]


def _gaussian(shapes) -> list[list]:
  """POOL batches, each a list of float32 arrays of `shapes`."""
  import numpy as np

  rng = np.random.default_rng(0)
  return [[rng.standard_normal(s, np.float32) for s in shapes] for _ in range(POOL)]


def _sae_config():
  """The vectorised part's SAE: the trainer's defaults (AuxK included) at these sizes."""
  from sae import sae

  return sae.SAEConfig(d_in=FLAGS.d_in, n_latents=FLAGS.n_latents, activation="topk", k=FLAGS.k)


def _serve(first, run, done) -> None:
  """The side's protocol: `first()` (compiles), 'ready', then per 'go' `run(FLAGS.steps)` timed,
  then 'done' with `done()`'s fields."""
  t0 = time.perf_counter()
  first()
  first_s = time.perf_counter() - t0
  harness.say(event="ready")
  for _ in range(FLAGS.warmup + FLAGS.rounds):
    harness.wait_go()
    t0 = time.perf_counter()
    run(FLAGS.steps)
    harness.say(event="step", s=time.perf_counter() - t0)
  harness.say(event="done", first_s=first_s, peak_rss_mb=harness.max_rss_mb(), **done())


def _instances_side(loop: bool) -> None:
  """vectorised: one group of I instances; loop: I groups of one, stepped in turn."""
  runtime.use_cpu_training_flags()  # as launch.py does for training runs
  import jax
  import jax.numpy as jnp
  import numpy as np

  from sae import train

  cfg = _sae_config()
  inst = train.Instances.grid(cfg, seeds=tuple(range(FLAGS.seeds)),
                              lrs=tuple(float(x) for x in FLAGS.lrs), max_grad_norm=MAX_GRAD_NORM)
  groups = ([train.Instances(**{f.name: getattr(inst, f.name)[i:i + 1]
                                for f in dataclasses.fields(inst)}) for i in range(len(inst))]
            if loop else [inst])
  states = [train.init_state(cfg, g) for g in groups]
  steps = [train.make_step(cfg, g) for g in groups]
  width = len(groups[0])
  pool = [jnp.asarray(np.broadcast_to(x, (width,) + x.shape))
          for (x,) in _gaussian([(FLAGS.batch, FLAGS.d_in)])]
  last = [None] * len(groups)

  def run(n):
    for t in range(n):
      for g in range(len(groups)):
        states[g], last[g] = steps[g](states[g], pool[t % POOL])
    jax.block_until_ready(states)

  def done():
    mse = np.concatenate([np.asarray(m["mse"]) for m in last])
    return {"instances": len(inst), "programs": len(groups), "final_mse": mse.tolist()}

  _serve(lambda: run(1), run, done)


def _ours_side() -> None:
  runtime.use_cpu_training_flags()
  import jax
  import jax.numpy as jnp

  from sae import usae

  d_ins = tuple(int(d) for d in FLAGS.usae_d_ins)
  cfg = usae.USAEConfig(d_ins=d_ins, n_latents=FLAGS.n_latents, k=FLAGS.k, loss="mse",
                        rule="official")
  state = {"s": usae.init_state(jax.random.key(0), cfg, lr=USAE_LR, max_grad_norm=MAX_GRAD_NORM)}
  step = usae.make_step(cfg, max_grad_norm=MAX_GRAD_NORM)
  pool = [[jnp.asarray(x) for x in xs] for xs in _gaussian([(FLAGS.batch, d) for d in d_ins])]
  sources = iter(_usae_sources(FLAGS.steps * (FLAGS.warmup + FLAGS.rounds)))
  last = {}

  def run_sources(seq):
    for t, i in enumerate(seq):
      state["s"], last["m"] = step(state["s"], i, pool[t % POOL])
    jax.block_until_ready(state["s"])

  _serve(lambda: run_sources(range(len(d_ins))),  # one program per source
         lambda n: run_sources([next(sources) for _ in range(n)]),
         lambda: {"final_loss": float(last["m"]["loss"])})


def _torch_side() -> None:
  import torch

  threads = FLAGS.torch_threads or os.cpu_count()
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  d_ins = [int(d) for d in FLAGS.usae_d_ins]
  m, k = FLAGS.n_latents, FLAGS.k

  class TopKSAE(torch.nn.Module):
    def __init__(self, d):
      super().__init__()
      w = torch.randn(m, d)
      w /= w.norm(dim=-1, keepdim=True)
      self.encoder = torch.nn.Linear(d, m)
      with torch.no_grad():  # W_enc = W_dec^T, b_enc = 0, as ours
        self.encoder.weight.copy_(w)
        self.encoder.bias.zero_()
      self.W_dec = torch.nn.Parameter(w.clone())
      self.b_dec = torch.nn.Parameter(torch.zeros(d))

    def encode(self, x):
      acts = torch.relu(self.encoder(x - self.b_dec))
      top = torch.topk(acts, k, dim=-1)
      return torch.zeros_like(acts).scatter(-1, top.indices, top.values)

    def decode(self, z):
      return z @ self.W_dec + self.b_dec

  saes = [TopKSAE(d) for d in d_ins]
  opts = [torch.optim.Adam(s.parameters(), lr=USAE_LR) for s in saes]
  pool = [[torch.from_numpy(x) for x in xs] for xs in _gaussian([(FLAGS.batch, d) for d in d_ins])]
  sources = iter(_usae_sources(FLAGS.steps * (FLAGS.warmup + FLAGS.rounds)))
  last = {}

  def step(i, xs):
    if FLAGS.torch_frozen_targets:
      for j, s in enumerate(saes):
        s.requires_grad_(j == i)
    opts[i].zero_grad()  # as the official code: the other sources' gradients are never used
    z = saes[i].encode(xs[i])
    loss = sum(((x - s.decode(z)) ** 2).sum(-1).mean() for s, x in zip(saes, xs))
    loss.backward()
    w = saes[i].W_dec
    with torch.no_grad():
      w.grad -= (w.grad * w).sum(-1, keepdim=True) * w
    torch.nn.utils.clip_grad_norm_(saes[i].parameters(), MAX_GRAD_NORM)
    opts[i].step()
    with torch.no_grad():
      w /= w.norm(dim=-1, keepdim=True) + 1e-8
    last["loss"] = loss.item()

  def run_sources(seq):
    for t, i in enumerate(seq):
      step(i, pool[t % POOL])

  _serve(lambda: run_sources(range(len(d_ins))),
         lambda n: run_sources([next(sources) for _ in range(n)]),
         lambda: {"final_loss": last["loss"], "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "frozen_targets": FLAGS.torch_frozen_targets})


def _side(name: str) -> harness.LiveSide:
  cmd = [sys.executable, "-m", "benchmarks.sae_step", f"--side={name}"]
  cmd += [FLAGS[f].serialize() for f in FORWARD]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if name != "torch":  # ours as launch.py runs it
    env = runtime.cpu_allocator_env(env)
  return harness.LiveSide(name, cmd, env)


def _summary(side: harness.LiveSide, done: dict, work: int, unit: str) -> dict:
  """`work`: instance-steps (or steps) per round; `unit` names the rate."""
  rounds = harness.spread([s["s"] for s in side.steps[FLAGS.warmup:]])
  return {"round_s": rounds, unit: work / rounds["median"],
          **{k: v for k, v in done.items() if k != "event"}}


def main(argv):
  del argv
  if FLAGS.smoke:
    FLAGS.rounds, FLAGS.warmup, FLAGS.steps = 2, 1, 2
    FLAGS.d_in, FLAGS.n_latents, FLAGS.k, FLAGS.batch = 16, 64, 4, 32
    FLAGS.seeds, FLAGS.lrs, FLAGS.usae_d_ins = 1, ["1e-3", "3e-3"], ["24", "16"]
  if FLAGS.side:
    {"vectorised": lambda: _instances_side(False), "loop": lambda: _instances_side(True),
     "ours": _ours_side, "torch": _torch_side}[FLAGS.side]()
    return
  done, machine = harness.race({name: (lambda n=name: _side(n)) for name in SIDES},
                               warmup=FLAGS.warmup, rounds=FLAGS.rounds)
  instances = FLAGS.seeds * len(FLAGS.lrs)
  res = {name: _summary(*done[name], instances * FLAGS.steps, "instance_steps_per_s")
         for name in ("vectorised", "loop")}
  res.update({name: _summary(*done[name], FLAGS.steps, "steps_per_s")
              for name in ("ours", "torch")})
  for name in SIDES:
    logging.info("%s %s", name, res[name])
  ratio = res["vectorised"]["instance_steps_per_s"] / res["loop"]["instance_steps_per_s"]
  print(json.dumps({
      "benchmark": "sae_step", "dtype": "float32", "device": "cpu", "rounds": FLAGS.rounds,
      "warmup": FLAGS.warmup, "steps_per_round": FLAGS.steps, "smoke": FLAGS.smoke,
      "settings": {
          "n_latents": FLAGS.n_latents, "k": FLAGS.k, "batch": FLAGS.batch,
          "vectorised": {"sae": dataclasses.asdict(_sae_config()), "seeds": FLAGS.seeds,
                         "lrs": [float(x) for x in FLAGS.lrs], "instances": instances,
                         "max_grad_norm": MAX_GRAD_NORM,
                         "data": "gaussian, the same rows for every instance"},
          "usae": {"d_ins": [int(d) for d in FLAGS.usae_d_ins], "loss": "mse",
                   "rule": "official", "decoder_norm": "project", "lr": USAE_LR,
                   "max_grad_norm": MAX_GRAD_NORM, "data": "gaussian, source drawn per step"}},
      "vectorised": {"ours": res["vectorised"], "loop": res["loop"], "ratio": ratio,
                     "target_ratio": TARGET_RATIO, "target_met": ratio >= TARGET_RATIO},
      "usae": {"ours": res["ours"], "torch": res["torch"],
               "ratio": res["ours"]["steps_per_s"] / res["torch"]["steps_per_s"],
               "reference": "the official rule hand-written in torch (torch.nn.Linear, "
               "torch.topk, one torch.optim.Adam per source); overcomplete 0.3.0's TopKSAE does "
               "not import without scikit-learn",
               "differences": DIFFERENCES},
      "machine": machine, "ratio": ratio, "target_ratio": TARGET_RATIO,
  }))
  if FLAGS.strict and machine["verdict"] != "quiet":
    sys.exit(f"not quiet: {machine['verdict']}")


if __name__ == "__main__":
  app.run(main)
