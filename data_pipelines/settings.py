"""The pipelines' settings from the config, validated, each error naming its key.

What the batches hold: `data.hu_window`, the stage's crop settings, the process's rows of a
global batch. How they are made (Grain; none of these changes a batch): `data.worker_count`,
`data.host_threads`, `data.prefetch_batches`.
"""

from __future__ import annotations

import os

DEFAULT_HU_WINDOW = (-60.0, 140.0)
# ArrayRecord compressions `prepare` can write (data.record_compression).
RECORD_COMPRESSIONS = ("uncompressed", "zstd:1", "zstd:3", "brotli:6")


def hu_window(data_cfg) -> tuple[float, float]:
  """The HU window (lo, hi) that scales images to [0, 1]."""
  window = tuple(data_cfg.get("hu_window", DEFAULT_HU_WINDOW))
  if len(window) != 2 or not float(window[0]) < float(window[1]):
    raise ValueError(f"data.hu_window must be (lo, hi) with lo < hi, got {window!r}")
  return float(window[0]), float(window[1])


def worker_count(data_cfg) -> int:
  """Grain worker processes that make batches (0: the training process makes them)."""
  workers = int(data_cfg.get("worker_count", 0))
  if workers < 0:
    raise ValueError(f"data.worker_count must be >= 0 (0: batches are made in the training "
                     f"process), got {workers}")
  return workers


def host_threads(data_cfg) -> int:
  """Read threads in each process that makes batches (0: the available cores shared out over
  the worker processes, or all of them without workers)."""
  threads = int(data_cfg.get("host_threads", 0))
  if threads < 0:
    raise ValueError(f"data.host_threads must be >= 0 (0: one per available core), got "
                     f"{threads}")
  return threads or max(1, len(os.sched_getaffinity(0)) // max(1, worker_count(data_cfg)))


def prefetch(data_cfg, threads: int) -> int:
  """Batches each process that makes batches makes ahead (0: twice its threads)."""
  batches = int(data_cfg.get("prefetch_batches", 0))
  if batches < 0:
    raise ValueError(f"data.prefetch_batches must be >= 0 (0: automatic), got {batches}")
  return batches or max(2, 2 * threads)


def stream_settings(data_cfg) -> dict:
  """Keyword arguments of stream.Stream: read threads, prefetch, worker processes."""
  threads = host_threads(data_cfg)
  return dict(read_threads=threads, prefetch=prefetch(data_cfg, threads),
              worker_count=worker_count(data_cfg))


def process_rows(batch_size: int, process_index: int, process_count: int,
                 key: str) -> tuple[int, int]:
  """Rows [p*B/P, (p+1)*B/P) of a global batch of B that process p of P feeds."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index ({process_index}) must be in [0, process_count "
                     f"({process_count}))")
  if batch_size < 1:
    raise ValueError(f"{key} must be >= 1, got {batch_size}")
  if batch_size % process_count:
    raise ValueError(f"{key} ({batch_size}) must be divisible by the number of processes "
                     f"({process_count}): each process feeds an equal share of a global batch")
  per = batch_size // process_count
  return process_index * per, (process_index + 1) * per


def stage_get(stage_cfg, key: str, default=None):
  """A stage field, `default` when absent or None."""
  value = stage_cfg.get(key, default) if hasattr(stage_cfg, "get") else getattr(
      stage_cfg, key, default)
  return default if value is None else value


def crop_settings(stage_cfg, image_size: int) -> tuple[int, int]:
  """(crop_size, crop_margin) of a 'liver_crop' stage, validated (defaults: the stored slice
  size and 0)."""
  size = int(stage_get(stage_cfg, "crop_size", image_size))
  margin = int(stage_get(stage_cfg, "crop_margin", 0))
  if size < 1:
    raise ValueError(f"stage.crop_size must be >= 1, got {size}")
  if margin < 0:
    raise ValueError(f"stage.crop_margin must be >= 0 (stored pixels), got {margin}")
  return size, margin
