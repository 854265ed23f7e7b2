"""One logical-axis rules table, a (`data`, `fsdp`, `tensor`) mesh helper and state sharding.

Parameters name their axes (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`);
activations use `act_*` names so fsdp shards weights, not activations. A logical axis maps to
nothing where its mesh axes do not divide the dimension (e.g. SmolLM2's 3 kv heads on tensor=2).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "lora_rank": (),
    "act_batch": ("data", "fsdp"),
    "act_seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_vocab": ("tensor",),
    "instances": ("data", "fsdp"),  # independent models trained side by side (sae/train.py)
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices; one of the sizes may be -1 to take the rest."""
  devices = list(devices or jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {sizes}.")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices; "
        f"{len(devices)} are available. Set the sizes so their product is the device count."
    )
  device_grid = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_spec(names: Sequence[str | None] | None, shape: Sequence[int],
                 mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> PartitionSpec:
  """PartitionSpec for logical axis names on a concrete shape, by `RULES`."""
  if not names:
    return PartitionSpec()
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    axes = tuple(a for a in RULES.get(name, ()) if a in mesh.shape and a not in used) if name else ()
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = ()
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*out)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Whole on every device of `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def state_shardings(state, mesh: jax.sharding.Mesh):
  """NamedShardings (same tree as `state`) from each Variable's `logical_axes` names."""

  def one(v):
    if isinstance(v, nnx.Variable):
      names = v.get_metadata().get("logical_axes")
      return v.replace(NamedSharding(mesh, logical_spec(names, v.get_value().shape, mesh)))
    return replicated(mesh)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
  """Place the model's state on `mesh` by the rules table (in place); returns the model."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, mesh)))
  return model


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names under an active mesh (`jax.set_mesh`); else a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
  """Inputs sharded on their leading batch axis over (`data`, `fsdp`)."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def host_array(x) -> np.ndarray:
  """`x` whole on this host as numpy. An array sharded across processes is gathered (a collective:
  in a multi-process run every process must call this for the same array, in the same order)."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
