"""The pipelines' settings: defaults, the threads shared out over worker processes, process
rows, errors that name their key."""

import os

import ml_collections
import pytest

from data_pipelines import settings


def data(**kw):
  return ml_collections.ConfigDict(kw)


def test_defaults_and_threads_shared_out_over_the_worker_processes():
  cores = len(os.sched_getaffinity(0))
  assert settings.hu_window(data()) == settings.DEFAULT_HU_WINDOW == (-60.0, 140.0)
  assert settings.worker_count(data()) == 0
  assert settings.host_threads(data()) == cores
  assert settings.host_threads(data(worker_count=2)) == max(1, cores // 2)
  assert settings.host_threads(data(worker_count=4 * cores)) == 1
  assert settings.host_threads(data(host_threads=3, worker_count=2)) == 3
  assert settings.prefetch(data(), 3) == 6 and settings.prefetch(data(), 0) == 2
  assert settings.prefetch(data(prefetch_batches=1), 3) == 1
  assert settings.stream_settings(data(host_threads=2, worker_count=1)) == dict(
      read_threads=2, prefetch=4, worker_count=1)


def test_process_rows_split_a_global_batch_evenly():
  assert [settings.process_rows(8, p, 4, "k") for p in range(4)] == [(0, 2), (2, 4), (4, 6),
                                                                     (6, 8)]
  assert settings.process_rows(8, 0, 1, "k") == (0, 8)
  with pytest.raises(ValueError, match=r"stage\.batch_size \(6\) must be divisible"):
    settings.process_rows(6, 0, 4, "stage.batch_size")
  with pytest.raises(ValueError, match="process_index"):
    settings.process_rows(8, 4, 4, "k")


def test_stage_fields_and_crop_settings():
  stage = ml_collections.ConfigDict(dict(crop_size=None, crop_margin=3))
  assert settings.stage_get(stage, "crop_size", 7) == 7  # None: the default
  assert settings.crop_settings(stage, 32) == (32, 3)
  assert settings.crop_settings(ml_collections.ConfigDict(), 16) == (16, 0)


@pytest.mark.parametrize("fn,value,key", [
    (settings.hu_window, dict(hu_window=(140.0, -60.0)), "data.hu_window"),
    (settings.worker_count, dict(worker_count=-1), "data.worker_count"),
    (settings.host_threads, dict(host_threads=-1), "data.host_threads"),
    (lambda d: settings.prefetch(d, 1), dict(prefetch_batches=-2), "data.prefetch_batches"),
    (lambda d: settings.crop_settings(d, 8), dict(crop_size=0), "stage.crop_size"),
    (lambda d: settings.crop_settings(d, 8), dict(crop_margin=-1), "stage.crop_margin"),
])
def test_bad_values_name_their_key(fn, value, key):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    fn(data(**value))
