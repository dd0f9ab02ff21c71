"""Device mesh and parameter shardings from logical-axis rules (MaxText style); jit + NamedSharding only.

Mesh axes: "data" (pure data parallelism) and "fsdp" (data parallel with parameters and optimizer state sharded).
The batch is split over both when it divides the device count; otherwise over "data" alone and replicated over
"fsdp" (each fsdp group computes the same examples, its devices each holding a slice of the parameters), so a
small batch still runs on many devices. mesh_for_batch: the default mesh gives "data" the largest divisor of the
device count that divides the batch and "fsdp" the rest. Each parameter dim gets a logical name from the kind of parameter; the rules map
logical names to mesh axes; a dim that the mesh axis does not divide stays replicated, so any model runs on any
mesh.
"""

import contextlib

import jax
from absl import logging
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


def batch_axes(mesh: Mesh, batch_size: int | None = None) -> tuple:
  """The mesh axes the example axis is split over: all of them, or `data` alone when the batch does not divide the
  device count (then replicated over `fsdp`)."""
  if batch_size is None or batch_size % mesh.devices.size == 0:
    return tuple(mesh.axis_names)
  return ("data",)


def batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
  """Leading (example) axis split over batch_axes (every device when batch_size is None: callers pad)."""
  return NamedSharding(mesh, P(batch_axes(mesh, batch_size)))


def accumulation_batch_sharding(mesh: Mesh, batch_size: int | None = None) -> NamedSharding:
  """(accumulation step, example, ...) arrays: micro-batch axis replicated, example axis over batch_axes."""
  return NamedSharding(mesh, P(None, batch_axes(mesh, batch_size)))


def default_data_size(devices: int, batch_size: int) -> int:
  """The largest divisor of the device count that divides the batch."""
  return max(d for d in range(1, devices + 1) if devices % d == 0 and batch_size % d == 0)


def mesh_for_batch(data: int, fsdp: int, batch_size: int, devices=None, batch_name: str = "") -> Mesh:
  """make_mesh for a global batch of batch_size examples. data=-1 with fsdp=1 (the default): data parallelism over
  default_data_size devices, fsdp over the rest. An explicit mesh whose `data` axis does not divide the batch is
  refused (ValueError naming mesh_data/mesh_fsdp)."""
  devices = list(jax.devices() if devices is None else devices)
  if data == -1 and fsdp == 1:
    data = default_data_size(len(devices), batch_size)
    fsdp = len(devices) // data
  mesh = make_mesh(data, fsdp, devices=devices)
  size = mesh.shape["data"]
  if batch_size % size:
    raise ValueError(f"mesh_data={size} x mesh_fsdp={mesh.shape['fsdp']} cannot split "
                     f"{batch_name or f'a global batch of {batch_size} examples'} over mesh_data: set mesh_data to a "
                     f"divisor of {batch_size} (mesh_data=-1 with mesh_fsdp=1 picks one) or make the batch a "
                     f"multiple of {size} examples (train_batch_size)")
  if jax.process_count() > 1 and batch_axes(mesh, batch_size) != tuple(mesh.axis_names):
    # each process loads its own slice of the batch: that needs every device to hold a distinct slice
    raise ValueError(f"multi-host: the global batch ({batch_size} examples) must be a multiple of the "
                     f"{mesh.devices.size} devices")
  logging.info("mesh data=%d x fsdp=%d over %d devices; the global batch of %d examples is split over %s",
               size, mesh.shape["fsdp"], mesh.devices.size, batch_size, " x ".join(batch_axes(mesh, batch_size)))
  return mesh


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
