"""The device mesh, the two shardings the steps use, and host batches -> global arrays.

Data parallelism only: one mesh axis 'data' over all devices (of all processes); the train state
is replicated, batches are split on their leading axis. Each process feeds its own rows of the
global batch (`host_to_global`), so the same code runs on one CPU, one GPU, or a multi-host TPU
slice after `maybe_initialize_distributed()` (an explicit launch from flags or JAX_* variables,
or what jax detects on Cloud TPU, SLURM and Open MPI). `all_or_none` wraps the steps that one
process does for all (the workdir lock, preparing the data): when it fails there, every process
stops, instead of the others waiting for it in a collective.

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

from collections.abc import Iterator, Mapping
import contextlib
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
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


# Explicit launches: (environment variable, `curriculum-seg train` flag) per setting.
EXPLICIT_SETTINGS = (('coordinator_address', 'JAX_COORDINATOR_ADDRESS', '--coordinator_address'),
                     ('num_processes', 'JAX_NUM_PROCESSES', '--num_processes'),
                     ('process_id', 'JAX_PROCESS_ID', '--process_id'))


class DistributedConfigError(ValueError):
  """A multi-process launch that is half specified or malformed (names the variable/flag)."""


class OtherProcessFailed(RuntimeError):
  """Another process of the run failed a step every process must pass; its own error says why."""


def _count(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env.get(key, '1'))
  except ValueError:
    return 1


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
  """The cluster whose variables `jax.distributed.initialize()` reads by itself, if any.

  Cloud TPU (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES, or multislice
  MEGASCALE_COORDINATOR_ADDRESS), SLURM (SLURM_JOB_ID) and Open MPI (OMPI_COMM_WORLD_SIZE).
  """
  env = os.environ if environ is None else environ
  if any(env.get(k) for k in ('TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
                              'MEGASCALE_COORDINATOR_ADDRESS')):
    return 'Cloud TPU'
  if 'SLURM_JOB_ID' in env:
    return 'SLURM'
  if 'OMPI_COMM_WORLD_SIZE' in env:
    return 'Open MPI'
  return None


def is_multiprocess_environment(environ: Mapping[str, str] | None = None) -> bool:
  """True when the environment describes more than one JAX process.

  Recognises an explicit launch (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID),
  multi-host Cloud TPU (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with several hosts, or
  multislice MEGASCALE_COORDINATOR_ADDRESS), SLURM with several tasks, and Open MPI with
  several ranks.
  """
  env = os.environ if environ is None else environ
  if any(env.get(var) for _, var, _ in EXPLICIT_SETTINGS):
    return True
  if env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return True
  for key in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):
    hosts = [h for h in env.get(key, '').split(',') if h.strip()]
    if len(hosts) > 1:
      return True
  if 'SLURM_JOB_ID' in env and _count(env, 'SLURM_NTASKS') > 1:
    return True
  return _count(env, 'OMPI_COMM_WORLD_SIZE') > 1


def distributed_settings(environ: Mapping[str, str] | None = None,
                         **flags: str | int | None) -> dict[str, Any] | None:
  """The arguments for `jax.distributed.initialize`, or None for a one-process run.

  `flags` (coordinator_address, num_processes, process_id; None = not given) win over the
  environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax
  itself reads only the first). An explicit launch needs all three, unless a cluster that jax
  detects by itself (Cloud TPU, SLURM, Open MPI) supplies the rest; such a cluster alone gives
  `{}` (detect everything) when it has several processes.
  """
  env = os.environ if environ is None else environ
  unknown = set(flags) - {name for name, _, _ in EXPLICIT_SETTINGS}
  if unknown:
    raise TypeError(f'unknown distributed settings: {sorted(unknown)}')
  given = {}
  for name, var, flag in EXPLICIT_SETTINGS:
    value = flags.get(name)
    source = flag
    if value is None or value == '':
      value, source = env.get(var) or None, var
    if value is None:
      continue
    if name != 'coordinator_address':
      try:
        value = int(value)
      except (TypeError, ValueError):
        raise DistributedConfigError(f'{source}={value!r} is not an integer') from None
    given[name] = (value, source)
  cluster = cluster_environment(env)
  if not given:
    return {} if is_multiprocess_environment(env) else None
  if cluster is None:
    missing = [f'{var} (or {flag})' for name, var, flag in EXPLICIT_SETTINGS if name not in given]
    if missing:
      raise DistributedConfigError(
          f'{" and ".join(missing)} {"is" if len(missing) == 1 else "are"} not set: an explicit '
          'multi-process launch needs the coordinator address, the number of processes and '
          'this process\'s id')
  if 'num_processes' in given and given['num_processes'][0] < 1:
    raise DistributedConfigError(f'{given["num_processes"][1]}={given["num_processes"][0]} '
                                 'must be >= 1')
  if 'process_id' in given:
    pid, source = given['process_id']
    count = given.get('num_processes', (None,))[0]
    if pid < 0 or (count is not None and pid >= count):
      raise DistributedConfigError(
          f'{source}={pid} must be in [0, {count if count is not None else "num_processes"})')
  return {name: value for name, (value, _) in given.items()}


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None,
                                 **flags: str | int | None) -> bool:
  """Calls `jax.distributed.initialize` in a multi-process launch; a no-op otherwise.

  Explicit settings (`flags`, else the JAX_* variables; see `distributed_settings`) are passed
  on; on Cloud TPU, SLURM and Open MPI jax detects what is not given. CPU processes exchange
  collectives through `jax_cpu_collectives_implementation` (JAX_CPU_COLLECTIVES_IMPLEMENTATION;
  'gloo' by default in jax 0.10). Must run before any other JAX call. Returns True when this
  call initialised the runtime.
  """
  settings = distributed_settings(environ, **flags)
  if settings is None or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(**settings)
  return True


def process_failures(failed: bool) -> list[int]:
  """Indices of the processes that passed `failed=True` (every process must call this)."""
  if jax.process_count() == 1:
    return [0] if failed else []
  flags = multihost_utils.process_allgather(np.array([int(failed)], np.int32))
  return [int(i) for i in np.flatnonzero(np.asarray(flags).reshape(-1))]


@contextlib.contextmanager
def all_or_none(what: str) -> Iterator[None]:
  """A block every process runs and every process must pass: if it raises on any process, it
  raises on all (the failed ones their own error, the others OtherProcessFailed), so no process
  goes on to wait for a peer that has stopped.
  """
  error = None
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    error = e
  failed = process_failures(error is not None)
  if error is not None:
    raise error
  if failed:
    raise OtherProcessFailed(f'process {", ".join(map(str, failed))} of '
                             f'{jax.process_count()} failed {what}; see its error')


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op in a one-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'curriculum_seg:{name}')
