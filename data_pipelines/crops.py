"""The cascade's liver region: the crop box from a liver mask, and the crop in and out of it.

The cascade's tumour network sees each slice cropped to the case's liver box and resized to a
fixed square. Training computes the box from the reference labels; inference computes it from
the predicted liver with the same function (`liver_box`), so both crop the same way:

1. Take the in-plane bounding box of the liver over the whole case (every slice), in stored
   pixels (the dataset's `image_size` grid): rows r_min..r_max, columns c_min..c_max.
2. Widen it by `margin` stored pixels on each side: edges [r_min - m, r_max + 1 + m).
3. Make it square by widening the shorter side equally on both sides (an odd difference puts the
   extra pixel after), so resizing keeps the aspect ratio. The box may leave the slice; what
   lies outside reads as air (image) and background (labels), as in the patch pipeline.

Boxes are integer (r0, c0, r1, c1) in stored edge coordinates, max exclusive. `crop_affine` maps
the crop's output pixels to slice coordinates (half-pixel convention: output pixel i covers
[r0 + i*h/O, r0 + (i+1)*h/O)); the training pipeline composes it with the augmentation map and
warps on the device, `crop_slices` applies it alone (evaluation, inference) with the same warp
functions, and `uncrop_probabilities` maps a network's crop probabilities back into the box.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from data_pipelines import augment

Box = tuple[int, int, int, int]


def liver_box(liver, margin: int) -> Optional[Box]:
  """The square crop box (r0, c0, r1, c1) of a liver mask, or None when the mask is empty.

  `liver` is a boolean mask [H, W] or [H, W, Z] (slices on the last axis, as in the canonical
  volumes; a 3-D mask gives the box over all its slices). `margin` is in the mask's pixels
  (stored pixels for the pipelines).
  """
  mask = np.asarray(liver)
  if mask.ndim == 3:
    mask = mask.any(axis=2)
  if mask.ndim != 2:
    raise ValueError(f"liver mask must be [H, W] or [H, W, Z], got shape {np.shape(liver)}")
  if int(margin) < 0:
    raise ValueError(f"crop margin must be >= 0, got {margin}")
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  if len(rows) == 0:
    return None
  m = int(margin)
  r0, r1 = int(rows[0]) - m, int(rows[-1]) + 1 + m
  c0, c1 = int(cols[0]) - m, int(cols[-1]) + 1 + m
  h, w = r1 - r0, c1 - c0
  if h < w:
    r0 -= (w - h) // 2
    r1 = r0 + w
  elif w < h:
    c0 -= (h - w) // 2
    c1 = c0 + h
  return r0, c0, r1, c1


def crop_affine(box: Box, out_size: int) -> np.ndarray:
  """[2, 3] float64 map from crop output pixel (row, col, 1) to slice pixel (row, col).

  Output pixel i's centre (i + 0.5 in edge coordinates) lands at r0 + (i + 0.5) * h / O in edge
  coordinates, i.e. pixel coordinate r0 + (i + 0.5) * h / O - 0.5.
  """
  r0, c0, r1, c1 = (int(v) for v in box)
  if r1 <= r0 or c1 <= c0:
    raise ValueError(f"crop box {box} is empty")
  sr, sc = (r1 - r0) / out_size, (c1 - c0) / out_size
  return np.array([[sr, 0.0, r0 + 0.5 * sr - 0.5],
                   [0.0, sc, c0 + 0.5 * sc - 0.5]], np.float64)


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
  """The affine map outer(inner(x)) of [..., 2, 3] maps (broadcasting), float64."""
  outer = np.asarray(outer, np.float64)
  inner = np.asarray(inner, np.float64)
  m = outer[..., :2] @ inner[..., :2]
  t = (outer[..., :2] @ inner[..., 2:])[..., 0] + outer[..., 2]
  return np.concatenate([m, t[..., None]], -1)


@functools.lru_cache(maxsize=8)
def _crop_fn(out_size: int):
  import jax  # pylint: disable=g-import-not-at-top

  def one(image, label, affine):
    return (augment.warp_bilinear(image, affine, out_size),
            augment.warp_nearest(label, affine, out_size))

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


def crop_slices(images, box: Box, out_size: int, labels=None,
                device=None) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """Crops slices to `box` and resizes them to out_size x out_size, as training does.

  `images`: HU [n, S, S, C] (int16 or float); returns float32 HU [n, O, O, C] (bilinear, air
  outside the slice; window it afterwards, as the training pipeline does) and, when `labels`
  [n, S, S] are given, uint8 labels [n, O, O] (nearest neighbour, background outside). Runs the
  pipelines' own warp (augment.warp_bilinear / warp_nearest), jitted on `device` (default: this
  host's CPU).
  """
  import jax  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  n = images.shape[0]
  if n == 0:
    return (np.zeros((0, out_size, out_size) + images.shape[3:], np.float32),
            None if labels is None else np.zeros((0, out_size, out_size), np.uint8))
  lab = np.zeros(images.shape[:3], np.uint8) if labels is None else np.asarray(labels, np.uint8)
  device = device if device is not None else jax.local_devices(backend="cpu")[0]
  affine = crop_affine(box, out_size).astype(np.float32)
  out_image, out_label = _crop_fn(int(out_size))(
      jax.device_put(images, device), jax.device_put(lab, device), jax.device_put(affine, device))
  out_image = np.asarray(out_image, np.float32)
  return out_image, (None if labels is None else np.asarray(out_label, np.uint8))


def _interpolation_matrix(start: int, stop: int, out_size: int, size: int) -> np.ndarray:
  """[size, out_size] linear-interpolation weights taking crop samples back to slice pixels.

  Slice pixel p inside [start, stop) reads the crop at u = (p + 0.5 - start) * O / h - 0.5,
  clamped to [0, O - 1] (edge values continue to the box's edge); rows outside the box are zero.
  """
  h = stop - start
  weights = np.zeros((size, out_size), np.float64)
  p = np.arange(max(start, 0), min(stop, size))
  u = np.clip((p + 0.5 - start) * out_size / h - 0.5, 0.0, out_size - 1)
  lo = np.floor(u).astype(int)
  hi = np.minimum(lo + 1, out_size - 1)
  frac = u - lo
  np.add.at(weights, (p, lo), 1.0 - frac)
  np.add.at(weights, (p, hi), frac)
  return weights


def uncrop_probabilities(probs, box: Box, size) -> np.ndarray:
  """Maps crop probabilities [n, O, O, K] back to slice probabilities [n, rows, cols, K]
  (`size`: (rows, cols), or an int for a square slice).

  Inside the box: bilinear interpolation of the crop (the inverse of `crop_slices`' resize);
  outside the box: class 0 (background) with probability 1.
  """
  probs = np.asarray(probs, np.float32)
  n, o, o2, k = probs.shape
  if o != o2:
    raise ValueError(f"crop probabilities must be square, got {probs.shape}")
  r0, c0, r1, c1 = (int(v) for v in box)
  rows, cols = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
  wr = _interpolation_matrix(r0, r1, o, rows).astype(np.float32)
  wc = _interpolation_matrix(c0, c1, o, cols).astype(np.float32)
  out = np.einsum("ro,nopk,cp->nrck", wr, probs, wc, optimize=True)
  inside = wr.sum(1)[:, None] * wc.sum(1)[None, :] > 0
  out[:, ~inside, :] = 0.0
  out[:, ~inside, 0] = 1.0
  return out
