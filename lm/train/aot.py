"""Ahead-of-time compilation for a target topology, from any host (MaxText's `train_compile.py`
idea): the training step is lowered on abstract arrays (shapes and shardings, no weights or data)
over a mesh of the target's devices, compiled, and costed.

A topology is `cpu:N` (this process's CPU devices); a TPU topology name such as `v5p:2x2x1` or
`v5e:4x4`, whose devices come from `jax.experimental.topologies` with libtpu installed (the `tpu`
extra) and no TPU attached; or `h100:HxG` / `h200:HxG`, H hosts of G NVIDIA GPUs, compiled by the
CUDA plugin (the `cuda12`/`cuda13` extra) with no GPU or driver from XLA's GPU target description
(`GPUS`; XLA:GPU then gives memory but no cost analysis, so the step bound uses analytic FLOPs).
`report` turns the compiled step into `aot.json`'s fields: per-device memory against the chip's
HBM, FLOPs and bytes per step from XLA's cost analysis, and the roofline step time at the chip's
peak with the MFU it implies. XLA counts a loop body once (scanned layers,
micro-batches): the compute time uses the model's analytic FLOPs when they are larger, and the
memory time is a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
from flax import nnx

from lm import sharding
from lm.train.flops import chip


def is_abstract(tree) -> bool:
  """Whether every array of `tree` (a pytree or an nnx module) is a `jax.ShapeDtypeStruct`: a
  model or state of shapes alone, which `--compile_only` builds and nothing may compute on."""
  leaves = jax.tree.leaves(nnx.state(tree) if isinstance(tree, nnx.Module) else tree)
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def abstract(tree, shardings):
  """`tree`'s shapes and dtypes with `shardings` (same structure), as ShapeDtypeStructs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def replicated_spec(x, mesh: jax.sharding.Mesh) -> jax.ShapeDtypeStruct:
  """`x`'s shape and dtype (an array, a ShapeDtypeStruct or a PRNG key) replicated over `mesh`."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Gpu:
  """What XLA:GPU compiles for (a `GpuTargetConfig`), from the vendor's spec sheet."""

  description: str  # the device kind jax reports
  memory_bytes: int
  bandwidth: float  # bytes/s
  cores: int = 132  # SMs
  l2_bytes: int = 50 * 2**20
  clock_ghz: float = 1.98
  capability: tuple[int, int] = (9, 0)

  def target_config(self) -> str:
    """The `xla.gpu.GpuTargetConfigProto` text `get_topology_desc(target_config=)` reads."""
    major, minor = self.capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {self.cores}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {int(self.bandwidth)} l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz} device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: 232448 registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{self.description}"
"""


# `--topology=h100:HxG` / `h200:HxG`: H hosts of G GPUs (SXM parts, as `lm.train.flops.CHIPS`)
GPUS = {"h100": Gpu("NVIDIA H100 80GB HBM3", 85_520_809_984, 3.35e12),
        "h200": Gpu("NVIDIA H200", 150_754_820_096, 4.8e12)}


def has_cuda_plugin() -> bool:
  """Whether jax's CUDA plugin (the `cuda12` / `cuda13` extra) is installed."""
  import importlib.util

  try:
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13))
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def _gpu_devices(topology: str, kind: str, shape: str) -> list:
  try:
    hosts, gpus = (int(x) for x in shape.split("x"))
  except ValueError:
    raise ValueError(f"--topology={topology}: a GPU target is {kind}:HxG, H hosts of G GPUs "
                     f"(e.g. {kind}:1x8).") from None
  if not has_cuda_plugin():
    raise ValueError(f"--topology={topology} needs jax's CUDA plugin to compile for GPUs without "
                     "one: pip install -e '.[cuda12]' --constraint constraints.txt (or make run "
                     "EXTRAS=cuda12).")
  # the plugin checks the driver's CUDA version at start-up; a compile host has no driver
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{gpus}",
                                             target_config=GPUS[kind].target_config()).devices)
  except (RuntimeError, ValueError, NotImplementedError) as e:
    raise ValueError(f"--topology={topology}: the CUDA plugin cannot compile without a GPU here "
                     f"({str(e).splitlines()[0]}); start JAX before anything else touches it, with "
                     "JAX_PLATFORMS unset.") from None


def topology_devices(topology: str) -> list:
  """The devices of `topology` (`cpu:N`, a TPU topology name, or `h100:HxG` / `h200:HxG`);
  ValueError naming the fix."""
  kind, _, shape = topology.partition(":")
  if kind in GPUS:
    return _gpu_devices(topology, kind, shape)
  if kind == "cpu":
    n = int(shape or 0)
    have = jax.devices("cpu")
    if n < 1 or n > len(have):
      raise ValueError(f"--topology={topology}: this process has {len(have)} CPU devices; use "
                       f"cpu:N with 1 <= N <= {len(have)} (--cpu_devices=N exposes N).")
    return have[:n]
  try:
    import libtpu  # noqa: F401  (only to say what is missing)
  except ImportError:
    raise ValueError(f"--topology={topology} needs libtpu to compile for TPUs without one: "
                     "pip install -e '.[tpu]' --constraint constraints.txt (or make run "
                     "EXTRAS=tpu).") from None
  # libtpu holds a lock file against two processes driving one TPU; compiling drives none, so
  # compiles may run side by side (pytest workers, a table of recipes)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except (RuntimeError, ValueError) as e:  # libtpu: a name it does not know
    raise ValueError(f"--topology={topology}: libtpu does not know this topology ({e}); use a "
                     "name such as v4:2x2x1, v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x2x2 or v6e:2x2, "
                     "h100:1x8 or h200:2x8 (GPUs), or cpu:N.") from None


def report(compiled, *, topology: str, mesh: jax.sharding.Mesh, model_flops: float | None,
           model_bytes: float | None = None) -> dict:
  """`aot.json`'s fields for a compiled step: memory per device, cost, roofline.

  model_flops: the program's useful FLOPs (all devices), e.g. 6N per trained token; None takes
  XLA's count (right for a program without loops). model_bytes: the bytes it must move at least
  (all devices), e.g. every weight once per decoded token, where a loop makes XLA's count low.
  The MFU bound is model_flops over the bound time at peak: 1 for a compute-bound program whose
  every FLOP is useful."""
  devices = list(mesh.devices.flat)
  kind = devices[0].device_kind
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}  # XLA:GPU deviceless: none
  arg, out, tmp = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes)
  alias = getattr(mem, "alias_size_in_bytes", 0)
  total = arg + out + tmp - alias + mem.generated_code_size_in_bytes
  flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  model_flops = model_flops if model_flops is not None else flops * len(devices)
  spec = chip(kind)
  # devices per chip: TPU v4 topologies expose each chip's two cores as devices
  chips = chips_of(topology)
  per_chip = len(devices) / chips if chips else 1
  result = {
      "topology": topology, "device_kind": kind, "devices": len(devices),
      "processes": len({d.process_index for d in devices}), "mesh": dict(mesh.shape),
      "bytes_per_device": {"arguments": arg, "outputs": out, "temporaries": tmp, "aliased": alias,
                           "code": mem.generated_code_size_in_bytes, "total": total},
      "flops_per_step_per_device": flops, "bytes_accessed_per_step_per_device": bytes_accessed,
      "model_flops_per_step": model_flops, "model_bytes_per_step": model_bytes,
  }
  if spec is None:
    result.update(hbm_bytes_per_device=None, fits=None, step_s_bound=None, mfu_bound=None)
    return result
  hbm = spec.hbm_bytes / per_chip
  peak, bw = spec.peak_flops / per_chip, spec.hbm_bytes_per_s / per_chip
  # XLA's cost analysis counts a loop's body once (scanned layers, micro-batches), so the compute
  # time takes the larger of its FLOPs and the model's analytic FLOPs per device; the memory time
  # is a lower bound for the same reason.
  per_device = max(flops, model_flops / len(devices))
  moved = max(bytes_accessed, (model_bytes or 0.0) / len(devices))
  t_compute, t_memory = per_device / peak, moved / bw
  bound = max(t_compute, t_memory)
  result.update(
      hbm_bytes_per_device=hbm, fits=total <= hbm, peak_flops_per_device=peak,
      hbm_bytes_per_s_per_device=bw, step_s_compute_bound=t_compute,
      step_s_memory_bound=t_memory, step_s_bound=bound or None,  # None: no cost known
      mfu_bound=(model_flops / (bound * peak * len(devices))
                 if model_flops and bound > 0 else None))
  return result


def chips_of(topology: str) -> int | None:
  """The chips a TPU or GPU topology name names (`v5p:2x2x1` -> 4, `h100:2x8` -> 16); None for
  `cpu:N`."""
  kind, _, shape = topology.partition(":")
  if kind == "cpu" or not shape:
    return None
  try:
    return math.prod(int(x) for x in shape.split("x"))
  except ValueError:
    return None


def versions() -> dict:
  """The compiler's versions (jax, jaxlib, libtpu, the CUDA plugin: those installed) for
  `aot.json`: a row is these versions'."""
  from lm.train import provenance

  return provenance.versions(("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin"))


def table(results: list[dict]) -> str:
  """A markdown table of `aot.json` results, one row each: recipe, topology (devices, hosts), mesh,
  GB per device against the chip's HBM, fits, the step-time bound and the MFU bound; an online
  RL recipe adds its rollout's decoding program, a pipeline its largest stage."""
  lines = ["| recipe | topology | devices (hosts) | mesh data×fsdp×tensor | GB / device (HBM) | fits "
           "| step ≥ (ms) | MFU bound | also compiled |",
           "|---|---|---|---|---|---|---|---|---|"]
  ms = lambda r: f"{1e3 * r['step_s_bound']:.3g}" if r.get("step_s_bound") else "—"
  gb = lambda r: (f"{r['bytes_per_device']['total'] / 1e9:.2f}"
                  + (f" ({r['hbm_bytes_per_device'] / 1e9:.0f})" if r.get("hbm_bytes_per_device")
                     else ""))
  for r in results:
    mesh = r["mesh"]
    also = []
    for name, p in (r.get("programs") or {}).items():
      also.append(f"{name}: {gb(p)} GB, ≥ {ms(p)} ms")
    if r.get("stages"):
      also.append("stages " + ", ".join(f"{k} {v['bytes_per_device']['total'] / 1e9:.2f} GB"
                                        for k, v in r["stages"].items())
                  + f"; largest: {r['largest_stage']}")
    if r.get("per_source"):
      n = len(r["per_source"])
      also.append(f"{n} sources, the largest shown" if n > 1 else "1 source")
    mfu = f"{r['mfu_bound']:.2f}" if r.get("mfu_bound") is not None else "—"
    fits = {True: "yes", False: "**no**", None: "—"}[r.get("fits")]
    lines.append(f"| `{r['config']}` | {r['topology']} ({r['device_kind']}) | {r['devices']} "
                 f"({r['processes']}) | {mesh['data']}×{mesh['fsdp']}×{mesh['tensor']} | {gb(r)} "
                 f"| {fits} | {ms(r)} | {mfu} | {'; '.join(also) or '—'} |")
  return "\n".join(lines) + "\n"


def write_readme(root: str, rows: list[str]) -> str:
  """`root/README.md`: the table of the `aot.json` of each directory in `rows` under `root`
  (`make aot`: `configs/aot.py`'s rows), in that order; rows not compiled yet are left out."""
  import json
  from pathlib import Path

  results, commands = [], []
  for row in rows:
    path = Path(root) / row / "aot.json"
    if path.exists():
      results.append(json.loads(path.read_text()))
      commands.append(f"- [`{row}/aot.json`]({row}/aot.json): `{results[-1].get('command')}`")
  versions = sorted({", ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or {}).items()))
                     for r in results})
  text = "\n".join([
      "# Every accelerator recipe, compiled for TPU and GPU targets from a CPU host\n",
      "Generated by `make aot` (rows: `configs/aot.py`): each row is `launch.py --config=... "
      "--compile_only --topology=T`, the training step compiled ahead of time on abstract arrays "
      "(no weights or data read) by libtpu with no TPU attached, or for `h100`/`h200` rows by "
      "jax's CUDA plugin with no GPU or driver (`make aot EXTRAS=cuda12`); its `aot.json` is in "
      "the row's directory here, its command in the `command` field.\n",
      "- **GB / device**: arguments + outputs + temporaries + code − aliased (donated) bytes, "
      "from XLA's memory analysis, against the chip's HBM per device.",
      "- **step ≥**: the roofline bound, max(FLOPs / peak, bytes / bandwidth) per device at the "
      "chip's dense bf16 peak and HBM bandwidth (`lm.train.flops.CHIPS`). XLA counts a loop's body "
      "once (a scanned layer stack, micro-batches, the decoding loop), so FLOPs are the larger of "
      "XLA's and the analytic model FLOPs (6N per trained token for pretraining, 2N per token for "
      "decoding), and bytes the larger of XLA's and every weight read once per decoded token.",
      "- **MFU bound**: model FLOPs over that bound at peak: the most a step can reach (1 for a "
      "compute-bound step whose every FLOP is useful; the alignment steps count XLA's FLOPs, LoRA's "
      "frozen weights included).",
      "- **mesh**: the config's own (FSDP over every device) unless the row overrides it; the "
      "pretraining rows over three meshes are the mesh search on one topology.",
      "- **GPU rows**: XLA:GPU compiled without a device reports memory but no cost analysis, so "
      "a GPU row has a step bound only where the task has analytic FLOPs (pretraining, the "
      "rollout); `fits` compares against the whole HBM (jax preallocates 75% by default: "
      "`XLA_PYTHON_CLIENT_MEM_FRACTION`).",
      "- **also compiled**: online RL's rollout decoding program (prompts_per_step prompts of the "
      "longest prompt, G samples each, max_new_tokens), the pipeline's stages, the SAE step for "
      "each activation source.\n",
      table(results),
      "Compiled with " + "; ".join(versions) + ".\n",
      "## Each row's command\n",
      *commands, "",
  ])
  out = Path(root) / "README.md"
  out.write_text(text)
  return str(out)

