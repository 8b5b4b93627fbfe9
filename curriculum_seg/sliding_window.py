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
  touches it has been added, and only the rows that later windows still touch are kept: at most
  window[0] + `slab` rows of accumulators (K scores and a weight sum, float32) at a time.
  `slab` (rows per slab, the last one shorter) defaults to max(window[0] // 2, 32): half a
  window is the step at which rows become final at overlap 0.5.
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
  slab = max(window[0] // 2, 32) if slab is None else _as_int(slab, "slab", 1)
  return _slabs(predict, image, window, overlap, weights, batch_size, pad_value, slab)


class _OpenRows:
  """Score and weight sums of the rows (along the first axis) that windows still touch.

  A fixed block of `rows` rows in padded coordinates, from `base` on; finished rows leave at the
  top and the open ones move up, so its size never depends on the volume's depth.
  """

  def __init__(self, rows: int, rest: tuple[int, ...], classes: int, pad_before: int):
    self.scores = np.zeros((rows,) + rest + (classes,), np.float32)
    self.weights = np.zeros((rows,) + rest, np.float32)
    self.pad_before = pad_before
    self.base = 0  # padded row of block row 0
    self.used = 0  # block rows [0, used) may hold sums
    self.done = 0  # image rows [0, done) were handed out

  def add(self, tile: tuple[int, ...], scores: np.ndarray, weights: np.ndarray) -> None:
    """Adds one window's weighted scores (`scores` already multiplied by `weights`)."""
    r = tile[0] - self.base
    region = (slice(r, r + weights.shape[0]),) + tuple(
        slice(t, t + w) for t, w in zip(tile[1:], weights.shape[1:]))
    self.scores[region] += scores
    self.weights[region] += weights
    self.used = max(self.used, r + weights.shape[0])

  def pop(self, n: int, crop: tuple[slice, ...]) -> tuple[int, int, np.ndarray]:
    """The weighted mean of the next `n` image rows (cropped in-plane by `crop`); drops them."""
    r0 = self.done + self.pad_before - self.base
    r1 = r0 + n
    region = (slice(r0, r1),) + crop
    mean = self.scores[region] / self.weights[region][..., None]
    keep = max(self.used - r1, 0)
    for j in range(0, keep, r1):  # moved up in pieces that do not overlap: no temporary copy
      k = min(j + r1, keep)
      self.scores[j:k] = self.scores[j + r1:k + r1]
      self.weights[j:k] = self.weights[j + r1:k + r1]
    self.scores[keep:self.used] = 0
    self.weights[keep:self.used] = 0
    z0 = self.done
    self.base, self.used, self.done = self.base + r1, keep, self.done + n
    return z0, z0 + n, mean


def _fill_window(out, image, tile, pad_before, pad_value):
  """Copies the window at padded-coordinate `tile` into `out`, `pad_value` outside the image."""
  src, dst = [], []
  for t, w, p, size in zip(tile, out.shape, pad_before, image.shape):
    lo, hi = t - p, t - p + w  # in image coordinates
    src.append(slice(max(lo, 0), min(hi, size)))
    dst.append(slice(max(lo, 0) - lo, min(hi, size) - lo))
  if any(d.stop - d.start < w for d, w in zip(dst, out.shape)):
    out[...] = pad_value
  out[tuple(dst)] = image[tuple(src)]


def _slabs(predict, image, window, overlap, weights, batch_size, pad_value, slab):
  """The generator behind `sliding_window_slabs` (arguments already checked)."""
  sizes = image.shape[:-1]
  padded = tuple(max(s, w) for s, w in zip(sizes, window))
  pad_before = tuple((p - s) // 2 for p, s in zip(padded, sizes))  # nnU-Net: the odd one after
  crop = tuple(slice(p, p + s) for p, s in zip(pad_before[1:], sizes[1:]))
  starts = [tile_starts(p, w, overlap) for p, w in zip(padded, window)]
  num_tiles = math.prod(len(s) for s in starts)
  tiles = itertools.product(*starts)  # lazily, ascending along the first axis
  batch_shape = (batch_size,) + window + image.shape[-1:]
  open_rows = weighted = None
  for _ in range(0, num_tiles, batch_size):
    batch_tiles = list(itertools.islice(tiles, batch_size))
    batch = np.empty(batch_shape, np.float32)  # a fresh array each call: predict may keep it
    for i, tile in enumerate(batch_tiles):
      _fill_window(batch[i], image, tile, pad_before, pad_value)
    batch[len(batch_tiles):] = 0  # the last batch's padding
    scores = np.asarray(predict(batch), dtype=np.float32)
    if open_rows is None:
      _check_scores(scores, batch_shape, None)
      rows = min(window[0] + slab, padded[0])  # enough: a window starts < slab rows below
      open_rows = _OpenRows(rows, padded[1:], scores.shape[-1], pad_before[0])
      weighted = np.empty(scores.shape[1:], np.float32)
    _check_scores(scores, batch_shape, open_rows.scores.shape[-1])
    for i, tile in enumerate(batch_tiles):
      # Tiles come in ascending order along the first axis: rows above this one are final.
      while tile[0] - pad_before[0] - open_rows.done >= slab:
        yield open_rows.pop(slab, crop)
      np.multiply(scores[i], weights[..., None], out=weighted)
      open_rows.add(tile, weighted, weights)
  while open_rows.done < sizes[0]:
    yield open_rows.pop(min(slab, sizes[0] - open_rows.done), crop)


def _check_scores(scores, batch_shape, classes):
  """A ValueError naming both shapes unless `scores` is [batch, *window, K] (K = `classes`)."""
  want = batch_shape[:-1] + (classes,)
  if scores.shape[:-1] != want[:-1] or scores.ndim != len(want) or scores.shape[-1] < 1 or (
      classes is not None and scores.shape[-1] != classes):
    shape = ", ".join(str(d) for d in want[:-1]) + f", {'K' if classes is None else classes}"
    raise ValueError(f"predict must return scores of shape ({shape}) for windows of shape "
                     f"{batch_shape}, got shape {scores.shape}")


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
