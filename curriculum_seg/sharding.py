"""The device mesh, the two shardings the steps use, and host batches -> global arrays.

Data parallelism only: one mesh axis 'data' over all devices (of all processes); the train state
is replicated, batches are split on their leading axis. Each process feeds its own rows of the
global batch (`host_to_global`), so the same code runs on one CPU, one GPU, or a multi-host TPU
slice after `maybe_initialize_distributed()`.

Axis type: the mesh uses `AxisType.Auto` (jax 0.10's `make_mesh` defaults to `Explicit`). With
Auto axes, plain `jax.jit` with `NamedSharding` in/out shardings lets the XLA partitioner
propagate shardings through the whole U-Net (convolutions, norms, reductions over the sharded
batch for losses and batch-norm statistics) with no sharding annotations in the model. Explicit
axes put shardings into the array types and every op must have a sharding rule for them: under
jax 0.10.2 the train step fails at trace time in flax's Dropout (`ShardingTypeError: select
'which' must be scalar or have the same sharding as cases`), and it buys nothing for pure data
parallelism.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

DATA_AXIS = 'data'


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named 'data' over the first `num_devices` devices (default: all, all processes)."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f'num_devices={num_devices} must be between 1 and {len(devices)}')
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(
        f'num_devices={n}: a multi-process mesh must span all {len(devices)} devices')
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits an array's leading (batch) axis over the 'data' axis; other axes are whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh (train state, rng keys, metrics)."""
  return NamedSharding(mesh, PartitionSpec())


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's rows of the global batch into global arrays sharded on 'data'.

  Every array must have the same number of rows, divisible by the mesh devices this process
  holds; the global batch is the concatenation of all processes' rows in process order.
  """
  local_devices = sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())
  sharding = batch_sharding(mesh)
  rows = {key: np.shape(value)[0] for key, value in batch.items()}
  if len(set(rows.values())) > 1:
    raise ValueError(f'batch arrays disagree on the number of rows: {rows}')
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % local_devices:
      raise ValueError(
          f'batch[{key!r}] has {value.shape[0]} rows on this process, not divisible by its '
          f'{local_devices} mesh devices; pad the batch (mask=0) to a multiple')
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out


def is_multiprocess_environment(environ: Mapping[str, str] | None = None) -> bool:
  """True when the environment describes more than one JAX process.

  Recognises an explicit coordinator (JAX_COORDINATOR_ADDRESS), multi-host Cloud TPU
  (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with several hosts, or multislice
  MEGASCALE_COORDINATOR_ADDRESS), SLURM with several tasks, and Open MPI with several ranks.
  """
  env = os.environ if environ is None else environ

  def count(key: str) -> int:
    try:
      return int(env.get(key, '1'))
    except ValueError:
      return 1

  if env.get('JAX_COORDINATOR_ADDRESS') or env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  for key in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    hosts = [h for h in env.get(key, '').split(',') if h.strip()]
    if len(hosts) > 1:
      return True
  if 'SLURM_JOB_ID' in env and count('SLURM_NTASKS') > 1:
    return True
  return count('OMPI_COMM_WORLD_SIZE') > 1


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
  """Calls `jax.distributed.initialize()` in a multi-process environment; a no-op otherwise.

  Must run before any other JAX call. Returns True when this call initialised the runtime.
  """
  if not is_multiprocess_environment(environ) or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize()
  return True
