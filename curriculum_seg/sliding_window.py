"""Gaussian-weighted sliding-window inference over whole images and volumes, as nnU-Net does it.

A network trained on windows (patches or crops) is applied to overlapping windows that tile the
image; every voxel's result is the mean of the windows' predictions there, weighted by a Gaussian
centred on each window, so the less reliable window borders count less and seams disappear.

Tiling and weights follow nnU-Net (`compute_steps_for_sliding_window`, `compute_gaussian`):
starts spread evenly so the last window meets the border, axes smaller than the window padded
symmetrically. Everything stays numpy on the host, accumulated in place in float32; `predict`
sees fixed-size batches, so a jitted network compiles one shape.

Volumes stream along their first spatial axis (`sliding_window_slabs`): a slab is handed out as
soon as no later window touches it, so only about one window depth plus one slab of accumulators
exists at a time, never the whole volume's (a LiTS volume's K-class float32 scores alone are
gigabytes).
"""

from __future__ import annotations

import itertools
import math
import operator
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

Predict = Callable[[np.ndarray], Any]


def _as_int(value, name: str, minimum: int) -> int:
  """`value` as an int >= `minimum`, else a ValueError naming `name`."""
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  try:
    number = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
  if number < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return number


def _check_overlap(overlap) -> float:
  try:
    overlap = float(overlap)
  except (TypeError, ValueError):
    raise ValueError(f"overlap must be a number in [0, 1), got {overlap!r}") from None
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"overlap must be in [0, 1), got {overlap}")
  return overlap


def _check_sigma_scale(sigma_scale) -> float:
  try:
    sigma_scale = float(sigma_scale)
  except (TypeError, ValueError):
    raise ValueError(f"sigma_scale must be a number > 0, got {sigma_scale!r}") from None
  if not (sigma_scale > 0.0 and math.isfinite(sigma_scale)):
    raise ValueError(f"sigma_scale must be a finite number > 0, got {sigma_scale}")
  return sigma_scale


def _check_window(window) -> tuple[int, ...]:
  try:
    entries = tuple(window)
  except TypeError:
    raise ValueError(f"window must be a tuple of integers >= 1, got {window!r}") from None
  if not entries:
    raise ValueError("window must have one entry per spatial axis, got an empty window")
  return tuple(_as_int(w, f"window[{i}]", 1) for i, w in enumerate(entries))


def tile_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
  """Start offsets of the windows tiling one axis of `size` voxels, as nnU-Net places them.

  Target step window * (1 - overlap) (at least 1); ceil((size - window) / step) + 1 tiles with
  starts spread evenly from 0 to size - window and rounded, so the last tile meets the border
  and no gap is ever larger than the target step rounded up. An axis no longer than the window
  (padded to it by the caller) has the single start 0.
  """
  size = _as_int(size, "size", 1)
  window = _as_int(window, "window", 1)
  overlap = _check_overlap(overlap)
  if size <= window:
    return [0]
  target = max(1.0, window * (1.0 - overlap))
  count = int(math.ceil((size - window) / target)) + 1
  step = (size - window) / (count - 1)
  return [int(np.round(step * i)) for i in range(count)]


def gaussian_importance(window: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
  """The weight of each position of a window: a Gaussian, float32, of shape `window`.

  Per axis sigma = sigma_scale * w around the centre (w - 1) / 2 (so it is symmetric), product
  over axes, normalised to max 1; zeros (underflow of a narrow Gaussian) become the smallest
  non-zero weight, as in nnU-Net, so every voxel of every window counts and no sum is zero.
  An axis of size 1 has weight 1.
  """
  window = _check_window(window)
  sigma_scale = _check_sigma_scale(sigma_scale)
  weights = np.ones((), np.float64)
  for w in window:
    x = np.arange(w, dtype=np.float64) - (w - 1) / 2.0
    axis = np.exp(-0.5 * (x / (sigma_scale * w)) ** 2)
    weights = np.multiply.outer(weights, axis)
  weights = (weights / weights.max()).astype(np.float32)
  zero = weights == 0
  if zero.any():
    weights[zero] = weights[~zero].min()
  return weights


def _check_image(image, window) -> tuple[np.ndarray, tuple[int, ...]]:
  image = np.asarray(image)
  if image.ndim not in (3, 4):
    raise ValueError(f"image must be [H, W, C] or [D, H, W, C], got shape {image.shape}")
  if not (np.issubdtype(image.dtype, np.number) or image.dtype == np.bool_):
    raise ValueError(f"image must be numeric, got dtype {image.dtype}")
  if min(image.shape) < 1:
    raise ValueError(f"image has an empty axis: shape {image.shape}")
  window = _check_window(window)
  if len(window) != image.ndim - 1:
    raise ValueError(f"window {window} must have one entry per spatial axis of the image "
                     f"(shape {image.shape}: {image.ndim - 1} spatial axes)")
  return image, window


def sliding_window_slabs(predict: Predict, image: np.ndarray, window: Sequence[int],
                         overlap: float = 0.5, sigma_scale: float = 0.125, *,
                         batch_size: int = 8, pad_value: float = 0.0,
                         slab: Optional[int] = None
                         ) -> Iterator[tuple[int, int, np.ndarray]]:
  """Yields (z0, z1, scores [z1 - z0, *rest, K] float32) along the first spatial axis, in order.

  The slabs together are `sliding_window`'s result. Each is finalised once every window that
  touches it has been added, and only the rows that later windows still touch are kept: about
  window[0] + `slab` rows of accumulators at a time (`slab`, default max(window[0], 32) rows).
  A window of depth 1 over a volume ([D, H, W, C], window (1, h, w)) is a 2-D network applied
  slice by slice; its slabs are chunks of `slab` slices.
  """
  if not callable(predict):
    raise ValueError(f"predict must be callable, got {type(predict).__name__}")
  image, window = _check_image(image, window)
  overlap = _check_overlap(overlap)
  weights = gaussian_importance(window, sigma_scale)
  batch_size = _as_int(batch_size, "batch_size", 1)
  try:
    pad_value = float(pad_value)
  except (TypeError, ValueError):
    raise ValueError(f"pad_value must be a number, got {pad_value!r}") from None
  slab = max(window[0], 32) if slab is None else _as_int(slab, "slab", 1)
  return _slabs(predict, image, window, overlap, weights, batch_size, pad_value, slab)


def _slabs(predict, image, window, overlap, weights, batch_size, pad_value, slab):
  """The generator behind `sliding_window_slabs` (arguments already checked)."""
  sizes = image.shape[:-1]
  channels = image.shape[-1]
  padded = tuple(max(s, w) for s, w in zip(sizes, window))
  pad_before = tuple((p - s) // 2 for p, s in zip(padded, sizes))  # nnU-Net: extra one after
  starts = [tile_starts(p, w, overlap) for p, w in zip(padded, window)]
  tiles = itertools.product(*starts)  # lazy, first axis major: starts along axis 0 ascending
  num_tiles = math.prod(len(s) for s in starts)
  depth, rows = window[0], window[0] + slab
  rest = padded[1:]
  crop_rest = tuple(slice(p, p + s) for p, s in zip(pad_before[1:], sizes[1:]))
  expected = None  # (batch_size, *window, K) once the first batch tells K

  state = dict(acc=None, wsum=None, base=0, hi=0, done=0)  # accumulators of the open rows

  def emit(n):
    """Scores of the next `n` image rows; drops their rows from the accumulators."""
    acc, wsum, base, hi, done = (state[k] for k in ("acc", "wsum", "base", "hi", "done"))
    r0 = done + pad_before[0] - base
    r1 = r0 + n
    region = (slice(r0, r1),) + crop_rest
    scores = acc[region] / wsum[region][..., None]
    keep = max(hi - r1, 0)
    acc[:keep] = acc[r1:r1 + keep]
    wsum[:keep] = wsum[r1:r1 + keep]
    acc[keep:hi] = 0
    wsum[keep:hi] = 0
    state.update(base=base + r1, hi=keep, done=done + n)
    return done, done + n, scores

  def window_of(tile, out):
    """Copies the window at padded-coordinate `tile` into `out`, `pad_value` outside the image."""
    src, dst = [], []
    for s, w, p, size in zip(tile, window, pad_before, sizes):
      lo, hi = s - p, s - p + w  # in image coordinates
      src.append(slice(max(lo, 0), min(hi, size)))
      dst.append(slice(max(lo, 0) - lo, min(hi, size) - lo))
    if any(d.stop - d.start < w for d, w in zip(dst, window)):
      out[...] = pad_value
    out[tuple(dst)] = image[tuple(src)]

  for b0 in range(0, num_tiles, batch_size):
    batch_tiles = list(itertools.islice(tiles, batch_size))
    batch = np.zeros((batch_size,) + window + (channels,), np.float32)  # fresh: predict may keep
    for i, tile in enumerate(batch_tiles):
      window_of(tile, batch[i])
    scores = np.asarray(predict(batch), dtype=np.float32)
    if expected is None:
      if scores.ndim == len(window) + 2 and scores.shape[:-1] == (batch_size,) + window:
        expected = scores.shape
    if expected is None or scores.shape != expected or scores.shape[-1] < 1:
      want = expected if expected is not None else (batch_size,) + window + ("K",)
      want = "(" + ", ".join(str(d) for d in want) + ")"
      raise ValueError(f"predict must return scores of shape {want} for windows of shape "
                       f"{batch.shape}, got shape {scores.shape}")
    if state["acc"] is None:
      state["acc"] = np.zeros((rows,) + rest + (expected[-1],), np.float32)
      state["wsum"] = np.zeros((rows,) + rest, np.float32)
    weighted = scores[:len(batch_tiles)] * weights[..., None]
    for i, tile in enumerate(batch_tiles):
      # Rows before this window's start are final (tiles come in ascending order of start).
      while tile[0] - pad_before[0] - state["done"] >= slab:
        yield emit(slab)
      r = tile[0] - state["base"]
      region = (slice(r, r + depth),) + tuple(slice(s, s + w) for s, w in zip(tile[1:],
                                                                               window[1:]))
      state["acc"][region] += weighted[i]
      state["wsum"][region] += weights
      state["hi"] = max(state["hi"], r + depth)
  while state["done"] < sizes[0]:
    yield emit(min(slab, sizes[0] - state["done"]))


def sliding_window(predict: Predict, image: np.ndarray, window: Sequence[int],
                   overlap: float = 0.5, sigma_scale: float = 0.125, *, batch_size: int = 8,
                   pad_value: float = 0.0) -> np.ndarray:
  """The Gaussian-weighted mean of `predict` over windows tiling `image`: float32 [*spatial, K].

  `image` is [H, W, C] or [D, H, W, C] with one `window` entry per spatial axis; `predict` maps
  a batch of exactly `batch_size` windows [n, *window, C] (float32) to scores [n, *window, K]
  (numpy or jax). Neighbouring windows overlap by about `overlap` of the window; each window's
  scores are weighted by `gaussian_importance(window, sigma_scale)`. A per-pixel `predict` gives
  exactly that function of the whole image. A window of depth 1 over a volume runs a 2-D
  network slice by slice (predict then sees [n, 1, h, w, C]).
  """
  image = np.asarray(image)
  out = None
  slab = image.shape[0] if image.ndim == 3 and image.shape[0] > 0 else None  # 2-D: one slab
  for z0, z1, scores in sliding_window_slabs(predict, image, window, overlap, sigma_scale,
                                             batch_size=batch_size, pad_value=pad_value,
                                             slab=slab):
    if out is None:
      out = np.empty((image.shape[0],) + scores.shape[1:], np.float32)
    out[z0:z1] = scores
  return out
