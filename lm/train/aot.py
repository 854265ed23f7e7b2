"""Ahead-of-time compilation for a target topology, from any host (MaxText's `train_compile.py`
idea): the training step is lowered on abstract arrays (shapes and shardings, no weights or data)
over a mesh of the target's devices, compiled, and costed.

A topology is `cpu:N` (this process's CPU devices) or a TPU topology name such as `v5p:2x2x1` or
`v5e:4x4`, whose devices come from `jax.experimental.topologies` with libtpu installed (the `tpu`
extra) and no TPU attached. `report` turns the compiled step into `aot.json`'s fields: per-device
memory against the chip's HBM, FLOPs and bytes per step from XLA's cost analysis, and the roofline
step time at the chip's peak with the MFU it implies. XLA counts a loop body once (scanned layers,
micro-batches): the compute time uses the model's analytic FLOPs when they are larger, and the
memory time is a lower bound.
"""

from __future__ import annotations

import math

import jax

from lm.train.flops import chip


def topology_devices(topology: str) -> list:
  """The devices of `topology` (`cpu:N` or a TPU topology name); ValueError naming the fix."""
  kind, _, shape = topology.partition(":")
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
  from jax.experimental import topologies

  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except (RuntimeError, ValueError) as e:  # libtpu: a name it does not know
    raise ValueError(f"--topology={topology}: libtpu does not know this topology ({e}); use a "
                     "name such as v4:2x2x1, v5e:2x2, v5e:4x4, v5p:2x2x1, v5p:2x2x2 or v6e:2x2, or "
                     "cpu:N.") from None


def report(compiled, *, topology: str, mesh: jax.sharding.Mesh,
           model_flops: float | None) -> dict:
  """`aot.json`'s fields for a compiled step: memory per device, cost, roofline."""
  devices = list(mesh.devices.flat)
  kind = devices[0].device_kind
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  arg, out, tmp = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes)
  alias = getattr(mem, "alias_size_in_bytes", 0)
  total = arg + out + tmp - alias + mem.generated_code_size_in_bytes
  flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
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
      "model_flops_per_step": model_flops,
  }
  if spec is None:
    result.update(hbm_bytes_per_device=None, fits=None, step_s_bound=None, mfu_bound=None)
    return result
  hbm = spec.hbm_bytes / per_chip
  peak, bw = spec.peak_flops / per_chip, spec.hbm_bytes_per_s / per_chip
  # XLA's cost analysis counts a loop's body once (scanned layers, micro-batches), so the compute
  # time takes the larger of its FLOPs and the model's analytic FLOPs per device; the memory time
  # is a lower bound for the same reason.
  per_device = max(flops, (model_flops or 0.0) / len(devices))
  t_compute, t_memory = per_device / peak, bytes_accessed / bw
  bound = max(t_compute, t_memory)
  result.update(
      hbm_bytes_per_device=hbm, fits=total <= hbm, peak_flops_per_device=peak,
      hbm_bytes_per_s_per_device=bw, step_s_compute_bound=t_compute,
      step_s_memory_bound=t_memory, step_s_bound=bound,
      mfu_bound=(model_flops / (bound * peak * len(devices))
                 if model_flops and bound > 0 else None))
  return result


def chips_of(topology: str) -> int | None:
  """The chips a TPU topology name names (`v5p:2x2x1` -> 4); None for `cpu:N`."""
  kind, _, shape = topology.partition(":")
  if kind == "cpu" or not shape:
    return None
  try:
    return math.prod(int(x) for x in shape.split("x"))
  except ValueError:
    return None
