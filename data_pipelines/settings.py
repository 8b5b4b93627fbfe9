"""The pipelines' settings from the config, validated, each error naming its key.

What the batches hold: `data.hu_window`, the stage's crop settings, the process's rows of a
global batch. How they are made (Grain; none of these changes a batch): `data.worker_count`,
`data.host_threads`, `data.prefetch_batches`; how the dataset is prepared (it is the same
either way): `data.prepare_workers`.
"""

from __future__ import annotations

import os
from typing import Optional

DEFAULT_HU_WINDOW = (-60.0, 140.0)
# ArrayRecord compressions `prepare` can write (data.record_compression).
RECORD_COMPRESSIONS = ("uncompressed", "zstd:1", "zstd:3", "brotli:6")


def hu_window(data_cfg) -> tuple[float, float]:
  """The HU window (lo, hi) that scales images to [0, 1]."""
  window = tuple(data_cfg.get("hu_window", DEFAULT_HU_WINDOW))
  if len(window) != 2 or not float(window[0]) < float(window[1]):
    raise ValueError(f"data.hu_window must be (lo, hi) with lo < hi, got {window!r}")
  return float(window[0]), float(window[1])


def target_spacing(data_cfg) -> Optional[tuple[float, ...]]:
  """`data.spacing_mm` as millimetres per pixel along the canonical array axes, or None.

  None (or absent): every slice is resampled to `data.image_size` pixels, whatever its field of
  view (the grid of datasets made before target spacing). A number s or a 1-tuple: s x s mm in
  plane; a pair: (rows, cols); a triple adds the slice spacing (cases are resampled along z
  too, for 3-D), 0 keeping each case's own.
  """
  value = data_cfg.get("spacing_mm", None)
  if value is None:
    return None
  if isinstance(value, (list, tuple)) and len(value) == 3 and value[2] == 0:
    value = tuple(value[:2])
  values = (value,) if isinstance(value, (int, float)) else tuple(value)
  if not 1 <= len(values) <= 3 or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    raise ValueError(f"data.spacing_mm must be a number of mm or a tuple (rows, cols[, slices]), "
                     f"got {value!r}")
  in_plane = values[:2] if len(values) >= 2 else (values[0], values[0])
  if not all(0 < float(v) <= 50 for v in in_plane):
    raise ValueError(f"data.spacing_mm={value!r}: in-plane spacing must be in (0, 50] mm")
  through = float(values[2]) if len(values) == 3 else 0.0
  if not 0 <= through <= 50:
    raise ValueError(f"data.spacing_mm={value!r}: the slice spacing must be in [0, 50] mm (0 "
                     "keeps each case's)")
  return tuple(float(v) for v in in_plane) + ((through,) if through > 0 else ())


def worker_count(data_cfg) -> int:
  """Grain worker processes that make batches (0: the training process makes them)."""
  workers = int(data_cfg.get("worker_count", 0))
  if workers < 0:
    raise ValueError(f"data.worker_count must be >= 0 (0: batches are made in the training "
                     f"process), got {workers}")
  return workers


def prepare_workers(data_cfg) -> int:
  """Processes that write the dataset's cases when `prepare` builds it on this host (0: the
  available cores); the dataset is the same for any number."""
  workers = data_cfg.get("prepare_workers", 0)
  if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
    raise ValueError(f"data.prepare_workers must be an integer >= 0 (0: the available cores), "
                     f"got {workers!r}")
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


MAX_BLOCK = 1024  # pixels a side of a block or patch: more is a whole LiTS slice twice over


MAX_BLOCK_DEPTH = 512  # slices of a 3-D block or patch


def _shape(value, key: str, minimum: int) -> tuple[int, ...]:
  """An int or a 1-tuple (a square), (rows, cols) or (slices, rows, cols), validated."""
  values = (value,) if isinstance(value, int) else tuple(value)
  if (len(values) not in (1, 2, 3) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in values)):
    raise ValueError(f"stage.{key} must be an int, (rows, cols) or (slices, rows, cols), got "
                     f"{value!r}")
  values = (values[0], values[0]) if len(values) == 1 else values
  if values[-1] != values[-2]:
    raise ValueError(f"stage.{key}={value!r}: in-plane blocks are square")
  if not minimum <= values[-1] <= MAX_BLOCK:
    raise ValueError(f"stage.{key}={value!r} must be in [{minimum}, {MAX_BLOCK}] pixels")
  if len(values) == 3 and not 1 <= values[0] <= MAX_BLOCK_DEPTH:
    raise ValueError(f"stage.{key}={value!r}: the depth must be in [1, {MAX_BLOCK_DEPTH}]")
  return values


def block_size(stage_cfg) -> Optional[tuple[int, ...]]:
  """A whole stage's `block_size` as (rows, cols), or (slices, rows, cols) for a 3-D network;
  None: whole slices as stored. An int or a 1-tuple is a square; in-plane blocks are square
  (the augmentation warps squares)."""
  value = stage_get(stage_cfg, "block_size", None)
  return None if value is None else _shape(value, "block_size", 8)


def patch_shape(stage_cfg) -> tuple[int, ...]:
  """A patch stage's `patch_size` as (rows, cols), or (slices, rows, cols) for 3-D patches."""
  return _shape(stage_get(stage_cfg, "patch_size", 0), "patch_size", 1)


def crop_settings(stage_cfg, image_size: Optional[int]) -> tuple[int, int]:
  """(crop_size, crop_margin) of a 'liver_crop' stage, validated (defaults: the stored slice
  size, when slices have one, and 0)."""
  size = stage_get(stage_cfg, "crop_size", image_size)
  if size is None:
    raise ValueError("stage.crop_size must be set when slices have no fixed size "
                     "(data.spacing_mm)")
  size = int(size)
  margin = int(stage_get(stage_cfg, "crop_margin", 0))
  if size < 1:
    raise ValueError(f"stage.crop_size must be >= 1, got {size}")
  if margin < 0:
    raise ValueError(f"stage.crop_margin must be >= 0 (stored pixels), got {margin}")
  return size, margin
