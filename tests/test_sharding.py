"""The mesh, the shardings, host -> global batches (1 and 8 CPU devices), distributed detection."""

import json
import os
import subprocess
import sys
import textwrap

import jax
from jax.sharding import PartitionSpec
import numpy as np
import pytest

from curriculum_seg import sharding


def run_with_devices(code: str, num_devices: int = 8) -> dict:
  """Runs `code` in a fresh Python with `num_devices` virtual CPU devices; returns its JSON."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_mesh_has_one_auto_data_axis_over_all_devices():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.devices.size == jax.device_count()
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,)
  assert sharding.batch_sharding(mesh).spec == PartitionSpec('data')
  assert sharding.replicated(mesh).spec == PartitionSpec()


def test_mesh_size_out_of_range_is_an_error():
  with pytest.raises(ValueError, match='num_devices=0'):
    sharding.make_mesh(0)
  with pytest.raises(ValueError, match=f'between 1 and {jax.device_count()}'):
    sharding.make_mesh(jax.device_count() + 1)


def test_host_to_global_on_one_device_keeps_values():
  mesh = sharding.make_mesh(1)
  batch = {'image': np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3),
           'label': np.ones((2, 2, 2), np.int32), 'mask': np.array([1.0, 0.0], np.float32)}
  out = sharding.host_to_global(batch, mesh)
  for key, value in batch.items():
    assert out[key].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(out[key]), value)
    assert out[key].dtype == value.dtype


def test_host_to_global_rejects_disagreeing_rows():
  with pytest.raises(ValueError, match='disagree on the number of rows'):
    sharding.host_to_global({'image': np.zeros((2, 4)), 'mask': np.zeros(3)},
                            sharding.make_mesh(1))


def test_host_to_global_splits_rows_over_eight_devices():
  out = run_with_devices("""
      import json, jax, numpy as np
      from curriculum_seg import sharding
      mesh = sharding.make_mesh()
      image = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
      arr = sharding.host_to_global({'image': image}, mesh)['image']
      shards = sorted((s.index[0].start, s.data.shape[0]) for s in arr.addressable_shards)
      try:
        sharding.host_to_global({'image': image[:6]}, mesh)
        error = ''
      except ValueError as e:
        error = str(e)
      print(json.dumps({'size': mesh.devices.size, 'one': sharding.make_mesh(1).devices.size,
                        'shards': shards, 'equal': bool((np.asarray(arr) == image).all()),
                        'error': error}))
  """)
  assert out['size'] == 8 and out['one'] == 1
  assert out['shards'] == [[2 * i, 2] for i in range(8)]
  assert out['equal']
  assert '6 rows on this process, not divisible by its 8 mesh devices' in out['error']


@pytest.mark.parametrize('environ,expected', [
    ({}, False),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1'}, True),
    ({'TPU_PROCESS_ADDRESSES': 'a:1,b:1,c:1,d:1'}, True),
    ({'MEGASCALE_COORDINATOR_ADDRESS': 'host-0'}, True),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, False),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, True),
    ({'SLURM_NTASKS': '4'}, False),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '1'}, False),
    ({'JAX_NUM_PROCESSES': '2'}, True),
    ({'JAX_PROCESS_ID': '0'}, True),
])
def test_multiprocess_environment_detection(environ, expected):
  assert sharding.is_multiprocess_environment(environ) is expected


EXPLICIT = {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1234', 'JAX_NUM_PROCESSES': '2',
            'JAX_PROCESS_ID': '1'}


def test_explicit_launch_settings_come_from_the_environment_and_flags_win():
  assert sharding.distributed_settings({}) is None
  assert sharding.distributed_settings(EXPLICIT) == dict(
      coordinator_address='127.0.0.1:1234', num_processes=2, process_id=1)
  assert sharding.distributed_settings(
      EXPLICIT, coordinator_address='10.0.0.1:99', process_id=0, num_processes=None) == dict(
          coordinator_address='10.0.0.1:99', num_processes=2, process_id=0)
  assert sharding.distributed_settings(
      {}, coordinator_address='h:1', num_processes=4, process_id=3) == dict(
          coordinator_address='h:1', num_processes=4, process_id=3)


@pytest.mark.parametrize('environ,flags,message', [
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2'}, {},
     'JAX_PROCESS_ID (or --process_id) is not set'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1'}, {},
     'JAX_NUM_PROCESSES (or --num_processes) and JAX_PROCESS_ID (or --process_id) are not set'),
    ({}, {'num_processes': 2, 'process_id': 0},
     'JAX_COORDINATOR_ADDRESS (or --coordinator_address) is not set'),
    (dict(EXPLICIT, JAX_NUM_PROCESSES='two'), {}, "JAX_NUM_PROCESSES='two' is not an integer"),
    (EXPLICIT, {'process_id': 2}, '--process_id=2 must be in [0, 2)'),
    (EXPLICIT, {'num_processes': 0}, '--num_processes=0 must be >= 1'),
])
def test_half_specified_launch_names_what_is_missing(environ, flags, message):
  with pytest.raises(sharding.DistributedConfigError) as info:
    sharding.distributed_settings(environ, **flags)
  assert message in str(info.value)


def test_clusters_jax_detects_fill_in_what_is_not_given():
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}
  assert sharding.distributed_settings(slurm) == {}
  assert sharding.distributed_settings(
      dict(slurm, JAX_COORDINATOR_ADDRESS='h:1')) == dict(coordinator_address='h:1')
  assert sharding.distributed_settings({'TPU_WORKER_HOSTNAMES': 'a,b'}) == {}
  assert sharding.distributed_settings({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None
  assert sharding.cluster_environment({'OMPI_COMM_WORLD_SIZE': '2'}) == 'Open MPI'
  assert sharding.cluster_environment({}) is None


def test_distributed_initialisation_is_a_no_op_on_one_machine():
  assert sharding.maybe_initialize_distributed({}) is False
  assert not jax.distributed.is_initialized()
  with pytest.raises(sharding.DistributedConfigError):
    sharding.maybe_initialize_distributed({'JAX_COORDINATOR_ADDRESS': 'h:1'})
  assert not jax.distributed.is_initialized()


def test_all_or_none_on_one_process_passes_errors_through():
  assert sharding.process_failures(False) == [] and sharding.process_failures(True) == [0]
  with sharding.all_or_none('to do nothing'):
    pass
  with pytest.raises(KeyError, match='boom'):
    with sharding.all_or_none('to fail'):
      raise KeyError('boom')
  sharding.barrier('nothing to wait for')
