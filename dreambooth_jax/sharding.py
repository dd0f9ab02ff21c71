"""Device mesh and parameter shardings from logical-axis rules (MaxText style); jit + NamedSharding only.

Mesh axes: "data" (pure data parallelism) and "fsdp" (data parallel with parameters and optimizer state sharded).
The batch is split over both. Each parameter dim gets a logical name from the kind of parameter; the rules map
logical names to mesh axes; a dim that the mesh axis does not divide stays replicated, so any model runs on any
mesh.
"""

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
# FSDP: shard the output features of weights over "fsdp"; everything else replicated.
DEFAULT_RULES = {
    "conv_out": "fsdp", "embed_out": "fsdp", "vocab": "fsdp",
    "conv_in": None, "embed_in": None, "embed": None, "norm": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = [data, fsdp]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or n % known:
      raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n or min(sizes) < 1:
    raise ValueError(f"mesh: data={sizes[0]} x fsdp={sizes[1]} != {n} devices")
  # Classic (Auto) axis semantics: shardings are hints that XLA propagates (jax >= 0.9 defaults to Explicit).
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh(tuple(sizes), AXES, axis_types=axis_types, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """`jax.set_mesh` (the replacement of the deprecated `with mesh:`)."""
  with jax.set_mesh(mesh):
    yield mesh


def logical_axes(path: tuple, shape: tuple) -> tuple:
  leaf = str(path[-1]) if path else ""
  if leaf == "kernel" and len(shape) == 4:
    return (None, None, "conv_in", "conv_out")
  if leaf in ("kernel", "lora_down", "lora_up") and len(shape) == 2:
    return ("embed_in", "embed_out")
  if leaf == "embedding" and len(shape) == 2:
    return ("vocab", "embed")
  if len(shape) == 1:
    return ("norm",)
  return (None,) * len(shape)


def spec_for(path: tuple, shape: tuple, mesh: Mesh, rules: dict = DEFAULT_RULES) -> P:
  spec = []
  for dim, name in zip(shape, logical_axes(path, shape)):
    axis = rules.get(name) if name else None
    spec.append(axis if axis is not None and dim % mesh.shape[axis] == 0 and mesh.shape[axis] > 1 else None)
  return P(*spec)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_shardings(tree, mesh: Mesh, rules: dict = DEFAULT_RULES):
  """NamedShardings for any pytree of arrays (params, optimizer states mirroring them, scalars replicated)."""
  def one(path, leaf):
    shape = getattr(leaf, "shape", ())
    if not shape:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, spec_for(tuple(_key_name(k) for k in path), tuple(shape), mesh, rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(mesh.axis_names))


def accumulation_batch_sharding(mesh: Mesh) -> NamedSharding:
  """(accumulation step, example, ...) arrays: micro-batch axis replicated, example axis over every device."""
  return NamedSharding(mesh, P(None, mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(tree):
  """numpy copies of a pytree of (possibly multi-host sharded) arrays, the same on every process."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)
