"""Meshes, logical-axis rules and NamedSharding trees; multi-host start-up.

The mesh has axes ``("data", "fsdp", "tensor")``. Model params carry logical
axis names (see ``zsjax.model``); a *strategy* is a list of rules mapping each
logical name to mesh axes. Batches are split over ``data`` and ``fsdp`` (FSDP
devices see different examples, as in ZeRO-3); ``tensor`` devices share a batch
and split heads, MLP width and vocab.

Presets (logical name -> mesh axes; names not listed are replicated):

  dp       params replicated
  fsdp     embed -> fsdp                  (every matrix split along D)
  tp       heads, kv_heads, mlp, vocab -> tensor
  fsdp_tp  both of the above

Custom rules (``config.sharding_rules``, pairs of logical name and mesh axes)
override a preset's entries. Every check that can fail (mesh size vs devices, a
dimension a mesh axis cannot divide) runs before anything is compiled and names
the sizes and a fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zsjax.model import KVCache, activation_sharding, init_cache, logical_axes, param_shapes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_ACTIVATION_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("cache_length", None),
)
_TENSOR_RULES = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                 ("vocab", "tensor"))
PRESETS: dict[str, tuple] = {
    "dp": _ACTIVATION_RULES,
    "fsdp": _ACTIVATION_RULES + (("embed", "fsdp"),),
    "tp": _ACTIVATION_RULES + _TENSOR_RULES,
    "fsdp_tp": _ACTIVATION_RULES + (("embed", "fsdp"),) + _TENSOR_RULES,
}

# Logical axes of the KV cache (zsjax.model.KVCache).
CACHE_AXES = {"k": P("layers", "batch", "cache_length", "kv_heads", "head_dim"),
              "v": P("layers", "batch", "cache_length", "kv_heads", "head_dim"),
              "lengths": P("batch")}


class ShardingError(ValueError):
  """A mesh or a shape that cannot be sharded as asked."""


# ----------------------------------------------------------------------------- mesh


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Sizes for ``data``, ``fsdp``, ``tensor``; one of them may be -1 (the rest)."""
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ShardingError(f"mesh axes {unknown} are not known; the mesh has axes {MESH_AXES}.")
  sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  bad = {axis: size for axis, size in sizes.items() if size == 0 or size < -1}
  if bad or len(free) > 1:
    raise ShardingError(f"mesh {sizes}: sizes must be positive, with at most one -1 "
                        "(meaning: the devices left over).")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ShardingError(
          f"mesh {sizes}: the fixed axes use {fixed} devices, which does not divide the "
          f"{num_devices} devices; choose sizes whose product divides {num_devices}.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ShardingError(
        f"mesh {sizes} has {fixed} devices but {num_devices} are available; make the "
        f"product equal {num_devices} or set one axis to -1 "
        f"(e.g. --config.mesh.data=-1).")
  return sizes


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all) with axes ``MESH_AXES``."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape or {"data": -1}, len(devices))
  dims = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(dims, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def rules_for(strategy: str, custom: Sequence = ()) -> tuple:
  """The rules of a preset, with ``custom`` (logical, mesh axes) pairs overriding it."""
  if strategy not in PRESETS:
    raise ShardingError(f"sharding strategy {strategy!r} is not one of {sorted(PRESETS)}; "
                        "set --config.sharding to one of them (and --config.sharding_rules "
                        "for custom overrides).")
  rules = dict(PRESETS[strategy])
  for pair in custom:
    if len(pair) != 2:
      raise ShardingError(f"sharding rule {pair!r} must be a (logical_name, mesh_axes) pair.")
    name, axes = pair
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      if axis not in MESH_AXES:
        raise ShardingError(f"sharding rule ({name!r}, {axes!r}) names mesh axis {axis!r}; "
                            f"mesh axes are {MESH_AXES}.")
    rules[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(rules.items())


# ------------------------------------------------------------------------ the plan


def _is_spec(x):
  return isinstance(x, P)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """A mesh plus logical rules: turns logical trees into NamedSharding trees."""

  mesh: Mesh
  rules: tuple
  strategy: str = "custom"

  @classmethod
  def from_config(cls, config, devices: Sequence | None = None) -> "ShardingPlan":
    """From ``config.mesh`` (sizes), ``config.sharding`` (a preset of ``RULES``) and
    ``config.sharding_rules`` (overrides); a ConfigDict or a dict with those keys."""
    return cls(make_mesh(dict(config["mesh"]), devices),
               rules_for(config["sharding"], config["sharding_rules"] or ()), config["sharding"])

  @classmethod
  def single_device(cls, device=None) -> "ShardingPlan":
    """Everything on one device (``jax.devices()[0]`` by default): jobs that run one
    program on one chip (evaluation, collecting tuning data)."""
    return cls(make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                         [device if device is not None else jax.devices()[0]]),
               rules_for("dp"), "dp")

  @property
  def sizes(self) -> dict[str, int]:
    return dict(self.mesh.shape)

  @property
  def batch_divisor(self) -> int:
    return self.sizes["data"] * self.sizes["fsdp"]

  def context(self):
    """Makes the model's activation constraints (``zsjax.model.constrain``) follow
    this plan. Enter it inside the function being traced; the jitted entry points
    of ``zsjax.train_step`` do."""
    return activation_sharding(lambda names: NamedSharding(self.mesh, self.mesh_axes(P(*names))))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def mesh_axes(self, logical: P) -> P:
    return nn.logical_to_mesh_axes(tuple(logical), self.rules)

  def shardings(self, logical_tree) -> Any:
    """NamedSharding tree for a tree of logical ``PartitionSpec``s."""
    return jax.tree_util.tree_map(lambda spec: NamedSharding(self.mesh, self.mesh_axes(spec)),
                                  logical_tree, is_leaf=_is_spec)

  def check_divisible(self, shapes, logical_tree, what: str = "params") -> None:
    """Fails, naming the leaf, dim and sizes, if a mesh axis cannot split a dim."""
    flat_specs = jax.tree_util.tree_leaves_with_path(logical_tree, is_leaf=_is_spec)
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
      mesh_spec = self.mesh_axes(spec)
      for dim, (logical, axes) in enumerate(zip(spec, mesh_spec)):
        names = (axes,) if isinstance(axes, str) else (axes or ())
        split = math.prod(self.sizes[a] for a in names)
        if split > 1 and leaf.shape[dim] % split:
          raise ShardingError(
              f"{what}{jax.tree_util.keystr(path)}: dim {dim} ({logical!r}) has size "
              f"{leaf.shape[dim]}, which mesh axes {names} of total size {split} cannot divide "
              f"(mesh {self.sizes}, strategy {self.strategy!r}). Fix: choose mesh sizes that "
              f"divide {leaf.shape[dim]}, or another strategy / a custom rule for {logical!r}.")

  # -- params and optimizer state

  def params(self, cfg, head: str = "lm"):
    """NamedSharding tree for the params of ``Transformer(cfg, head)`` (checked)."""
    logical = logical_axes(cfg, head)
    self.check_divisible(param_shapes(cfg, head), logical)
    return self.shardings(logical)

  def opt_state(self, tx, param_shapes, param_shardings):
    """Shardings of ``tx.init(params)``: moments like their params, counters replicated."""
    import optax

    abstract = jax.eval_shape(tx.init, param_shapes)
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract, param_shardings,
        transform_non_params=lambda _: self.replicated(),
        is_leaf=lambda x: isinstance(x, NamedSharding))

  # -- batches and caches

  def batch_spec(self, ndim: int, axis: int = 0) -> P:
    """Mesh axes of an ``ndim`` array whose dim ``axis`` holds the batch rows."""
    return self.mesh_axes(P(*("batch" if i == axis else None for i in range(ndim))))

  def rows(self, ndim: int, axis: int = 0) -> NamedSharding:
    """Sharding of an ``ndim`` array split over its batch rows (dim ``axis``)."""
    return NamedSharding(self.mesh, self.batch_spec(ndim, axis))

  def batch(self, tree):
    """Shardings splitting the leading (batch) dim of every leaf (checked)."""
    def one(leaf):
      shape = tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
      if not shape:
        return self.replicated()
      if shape[0] % self.batch_divisor:
        raise ShardingError(
            f"batch size {shape[0]} is not divisible by data x fsdp = "
            f"{self.sizes['data']} x {self.sizes['fsdp']} = {self.batch_divisor} devices "
            f"(mesh {self.sizes}); use a batch size that is a multiple of {self.batch_divisor}.")
      return self.rows(len(shape))
    return jax.tree_util.tree_map(one, tree)

  def cache(self, cfg, batch_size: int, max_length: int):
    """Shardings of ``zsjax.model.init_cache(cfg, batch_size, max_length)`` (checked)."""

    shapes = jax.eval_shape(lambda: init_cache(cfg, batch_size, max_length))
    logical = KVCache(**CACHE_AXES)
    self.check_divisible(shapes, logical, what="cache")
    return self.shardings(logical)

  def process_rows(self, global_batch_size: int, process_index: int | None = None) -> np.ndarray:
    """The global batch rows that this process feeds (sorted), read off the
    batch sharding: a data loader on each host loads exactly these."""
    sharding = self.batch(jax.ShapeDtypeStruct((global_batch_size,), np.int32))
    process_index = jax.process_index() if process_index is None else process_index
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch_size,)).items():
      if device.process_index == process_index:
        rows.update(range(global_batch_size)[index[0]])
    return np.array(sorted(rows), np.int64)

  def put_batch(self, local_batch):
    """Places a host batch: the whole batch on one process, or this process's rows
    (``process_rows``, via ``make_array_from_process_local_data``) when several
    processes share the mesh."""
    if jax.process_count() == 1:
      return jax.device_put(local_batch, self.batch(local_batch))

    def one(leaf):
      leaf = np.asarray(leaf)
      global_shape = (leaf.shape[0] * jax.process_count(),) + leaf.shape[1:]
      sharding = self.batch(jax.ShapeDtypeStruct(global_shape, leaf.dtype))
      return jax.make_array_from_process_local_data(sharding, leaf, global_shape)
    return jax.tree_util.tree_map(one, local_batch)


# ------------------------------------------------------------------------ multi-host


def initialize_distributed(config) -> bool:
  """Starts JAX's multi-process runtime when configured; returns True if started.

  ``config`` (``config.distributed``): ``coordinator_address``, ``num_processes``
  (0: unset), ``process_id`` (-1: unset), ``auto`` and ``local_device_ids`` (():
  all). Unset fields come from the environment: ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. With no address, ``auto=True`` lets
  JAX find the cluster itself (SLURM, TPU pods); otherwise one process runs.
  """
  address = config["coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address and not config["auto"]:
    return False
  kwargs = {"coordinator_address": address or None}
  num = config["num_processes"] or os.environ.get("JAX_NUM_PROCESSES")
  pid = config["process_id"]
  if pid is None or pid == -1:
    pid = os.environ.get("JAX_PROCESS_ID")
  if num is not None:
    kwargs["num_processes"] = int(num)
  if pid is not None:
    kwargs["process_id"] = int(pid)
  if config["local_device_ids"]:
    kwargs["local_device_ids"] = list(config["local_device_ids"])
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """True on process 0: the one that logs and writes files."""
  return jax.process_index() == 0


def to_host(tree):
  """Device arrays -> numpy, gathering rows from every process when there are several."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def place(array, sharding) -> jax.Array:
  """A host array (the same on every process) onto ``sharding``."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def bytes_per_device(tree) -> dict[int, int]:
  """Bytes of ``tree``'s shards held by each addressable device (by device id)."""
  held: dict[int, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
  return held
