"""Device mesh, shardings and host-to-device batches (single- and multi-host).

Mesh axes are `("data", "fsdp")`. The batch is split over both axes (FSDP is data
parallel too); parameters are replicated, or with `fsdp > 1` the big ones are split
on `fsdp` along their largest divisible dimension (optimizer moments follow, since
the rule only looks at shapes). Each process feeds its own rows of the global batch
with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scanformer_jax.errors import UserError
from scanformer_jax.config import MeshConfig

BATCH_AXES = ("data", "fsdp")


def initialize_distributed(cfg: MeshConfig) -> None:
  """`jax.distributed.initialize` when `mesh.distributed` is set (before any jax use).

  Unset address/count/id fields are auto-detected (Cloud TPU, SLURM, ...). On CPU the
  cross-process collectives are gloo (jax's default `jax_cpu_collectives_implementation`).
  """
  if not cfg.distributed or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
      process_id=cfg.process_id)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A `(data, fsdp)` mesh over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  fsdp = cfg.fsdp
  if fsdp < 1 or len(devices) % fsdp:
    raise UserError(f"mesh.fsdp={fsdp} must divide the device count {len(devices)}")
  data = len(devices) // fsdp if cfg.data == -1 else cfg.data
  if data * fsdp != len(devices):
    raise UserError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the device count "
                    f"{len(devices)} (use mesh.data=-1 to take the rest)")
  try:
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  except Exception:  # pylint: disable=broad-except  # Non-TPU topologies: plain order.
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[K, B, ...] batches of a multi-step call: the second (batch) axis split."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def fsdp_spec(shape: Sequence[int], mesh: Mesh, min_size: int) -> P:
  """Split the largest dimension divisible by the fsdp size (big_vision's rule)."""
  size = mesh.shape["fsdp"]
  if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(abstract_tree: Any, mesh: Mesh, cfg: MeshConfig) -> Any:
  """NamedSharding for every leaf of a (shape-only) pytree: FSDP rule or replicated."""
  def leaf_sharding(x):
    return NamedSharding(mesh, fsdp_spec(getattr(x, "shape", ()), mesh, cfg.fsdp_min_size))
  return jax.tree.map(leaf_sharding, abstract_tree)


def check_batch_size(global_batch: int, mesh: Mesh, what: str) -> int:
  """Rows this process feeds per step; the global batch must split evenly."""
  shards = mesh.size
  if global_batch % shards or global_batch % jax.process_count():
    raise UserError(f"{what} {global_batch} must be divisible by the number of devices "
                    f"({shards}) and processes ({jax.process_count()})")
  return global_batch // jax.process_count()


def process_rows(mesh: Mesh, global_batch: int) -> slice:
  """The contiguous rows of the global batch that live on this process's devices."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  start, stop = min(starts), max(stops)
  if stop - start != global_batch // jax.process_count():
    raise ValueError("this process's batch rows are not contiguous on the mesh")
  return slice(start, stop)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
              stacked: bool = False) -> dict[str, jax.Array]:
  """Process-local numpy rows -> global arrays sharded on the batch axes.

  stacked: the leaves are [K, B_local, ...] (K batches, one per step of a call).
  """
  sharding = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def per_device(fn: Callable, mesh: Mesh, replicated_args: Sequence[int]) -> Callable:
  """`fn(*args)` run by each device on its own batch rows (`jax.shard_map`).

  The arguments at `replicated_args` (parameters, switches) are whole on every device
  (gathered first if FSDP splits them); the others and every output are split on the
  batch axes. For per-sample programs (eval, the exit scan): whatever `fn` does across
  its batch axis (sorting rows into capacity groups, compacting the samples still
  scanning) stays on one device, with no collective.
  """
  def run(*args):
    specs = tuple(P() if i in replicated_args else P(BATCH_AXES) for i in range(len(args)))
    # check_vma off: `fn` uses no collective, and the check would make every
    # `lax.switch` branch mark its constant outputs (e.g. a bucket's slot count) as
    # device-varying by hand.
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(BATCH_AXES),
                         check_vma=False)(*args)
  return run


def fetch(tree: Any) -> Any:
  """Device arrays -> host numpy (gathers across processes when needed)."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
  return jax.tree.map(get, tree)


def gather_texts(text: str) -> list[str]:
  """Every process's `text`, in process order (a collective: all processes call it)."""
  if jax.process_count() == 1:
    return [text]
  data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)  # [L]
  lengths = multihost_utils.process_allgather(np.int32(data.size))  # [P]
  padded = np.zeros(int(lengths.max()) or 1, np.int32)  # [max L]
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)  # [P, max L]
  return [bytes(row[:n].astype(np.uint8)).decode("utf-8") for row, n in zip(rows, lengths)]


def broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (a collective: all processes call it)."""
  return gather_texts(text if jax.process_index() == 0 else "")[0]
