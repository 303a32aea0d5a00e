"""Devices: the mesh, how parameters and batches are laid out on it, and multi-host start-up.

Two mesh axes: `data` (replicas that each see a slice of the batch) and `fsdp` (parameters, gradients and optimizer
state split across devices, gathered by XLA where a layer needs them). The batch is split over both axes. Every
step is a `jax.jit` over arrays carrying these shardings, the modern form of pmap data parallelism.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# Below this many elements a parameter is replicated: splitting it saves little memory and costs a gather.
DEFAULT_MIN_FSDP_SIZE = 2**18


def initialize_distributed(mode: str = "auto") -> None:
  """Joins a multi-host run before any other JAX call.

  mode "auto": initialise when `JAX_COORDINATOR_ADDRESS` is set (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, and
  optionally `JAX_LOCAL_DEVICE_IDS`), else stay single-process. "on": always initialise, letting JAX detect the
  cluster (TPU pods, SLURM, Open MPI) when the variables are absent. "off": never.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == "off" or (mode == "auto" and "JAX_COORDINATOR_ADDRESS" not in os.environ):
    return
  kwargs: dict[str, Any] = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    try:
      kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                    num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]))
    except KeyError as e:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not: set JAX_NUM_PROCESSES and "
                       "JAX_PROCESS_ID too") from e
    if "JAX_LOCAL_DEVICE_IDS" in os.environ:
      kwargs["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
  jax.distributed.initialize(**kwargs)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
  """Resolves the (data, fsdp) sizes; one of them may be -1 (= whatever is left)."""
  if data == -1 and fsdp == -1:
    raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 else 0
  elif fsdp == -1:
    fsdp = num_devices // data if data > 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not use the {num_devices} devices exactly; "
                     "choose sizes whose product is the device count (or -1 for one of them)")
  return data, fsdp


def config_mesh(mesh_config) -> Mesh:
  """The mesh of a stage's `mesh.*` settings: (data, fsdp) over the first `num_devices` devices (0: all of them)."""
  devices = jax.devices()[:mesh_config.num_devices] if mesh_config.num_devices > 0 else None
  return make_mesh(mesh_config.data, mesh_config.fsdp, devices)


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices (or `devices`); by default everything on `data` (pure data parallel)."""
  if devices is None:
    shape = mesh_shape(jax.device_count(), data, fsdp)
    # Lays the axes over the physical topology (fast links inside the fsdp groups).
    grid = mesh_utils.create_device_mesh(shape)
  else:
    grid = np.asarray(devices).reshape(mesh_shape(len(devices), data, fsdp))
  return Mesh(grid, BATCH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = DEFAULT_MIN_FSDP_SIZE) -> P:
  """Splits the largest dimension divisible by the fsdp size over `fsdp`; small or indivisible arrays replicate."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  return P(*[FSDP_AXIS if i == axis else None for i in range(len(shape))])


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """Shardings for every array in `tree` (params, an optimizer state, an nnx.State; concrete or abstract)."""
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp; the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_tree(tree: Any, mesh: Mesh, min_size: int = DEFAULT_MIN_FSDP_SIZE) -> Any:
  """Places a tree of arrays onto the mesh by the FSDP rule."""
  return jax.device_put(tree, tree_shardings(tree, mesh, min_size))


def enable_compilation_cache(setting: str, cache_root: str) -> str | None:
  """Points JAX's persistent compilation cache at a folder (`config.compilation_cache`); returns it, or None."""
  if setting == "auto":
    if jax.default_backend() == "cpu":
      return None  # XLA:CPU compiles a cached program again when loading it
    setting = os.path.join(cache_root, "xla")
  if setting:
    jax.config.update("jax_compilation_cache_dir", setting)
    log.info("persistent compilation cache: %s", setting)
  return setting or None


def host_numpy(x: jax.Array) -> np.ndarray:
  """A full copy of a (possibly sharded, possibly multi-host) array on this host: in a multi-host run every host
  gathers the whole array."""
  if not x.is_fully_addressable:
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def compile_all(lowered: list) -> None:
  """Compiles lowered programs (`jax.jit(f).lower(...)`) on parallel threads: XLA compiles outside the GIL, so a
  run's several batch shapes compile in about the time of the slowest. Later calls of those shapes reuse them."""
  if not lowered:
    return
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(lowered), os.cpu_count() or 1)) as pool:
    list(pool.map(lambda program: program.compile(), lowered))
