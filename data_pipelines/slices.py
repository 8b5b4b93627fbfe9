"""Turning a canonical 3-D case into per-slice model inputs: the stored grid, context stacks,
in-plane resampling, the tumour components each slice cuts, and intensity histograms.

The dataset builder and whole-volume inference both use these functions, so training slices and
inference slices are made the same way. The stored grid of a case is either a fixed number of
pixels per slice (`data.image_size`) or a target spacing (`data.spacing_mm`: every pixel the
same size in mm, so a slice keeps its case's field of view and slice sizes differ per case).
Coordinates follow the half-pixel convention: stored pixel i covers [i, i + 1) in edge
coordinates and has its centre at i; resampling maps original centre r to (r + 0.5) * m / n - 0.5
for n original and m stored pixels.
"""

from __future__ import annotations

import math
import contextlib
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np
from scipy import ndimage

from data_pipelines.labels import LIVER, TUMOUR

_CHUNK = 16  # slices resampled at a time: float copies of a few MB, reused rather than faulted in
_SIX_CONNECTED = ndimage.generate_binary_structure(3, 1)
HU_LO, HU_HI = -1024, 3071  # the HU range of the intensity histograms (one bin per HU)
MAX_STORED_PIXELS = 2048  # a stored slice side; larger means a spacing far too fine for CT


def _no_stages(name: str):  # pylint: disable=unused-argument
  return contextlib.nullcontext()


def stored_shape(shape_xy: Sequence[int], spacing: Sequence[float], image_size: Optional[int],
                 target_mm: Optional[Sequence[float]]) -> tuple[int, int]:
  """The stored (rows, cols) of a case's slices: `image_size` square, or the in-plane shape
  resampled to `target_mm` (row, col) millimetres per pixel, rounded as nnU-Net rounds."""
  if target_mm is None:
    return int(image_size), int(image_size)
  shape = tuple(max(1, int(round(n * float(sp) / float(t))))
                for n, sp, t in zip(shape_xy[:2], spacing[:2], target_mm[:2]))
  if max(shape) > MAX_STORED_PIXELS:
    raise ValueError(f"data.spacing_mm={tuple(target_mm)} makes slices of {shape} pixels from "
                     f"{tuple(shape_xy[:2])} at {tuple(round(float(v), 3) for v in spacing[:2])} "
                     f"mm (more than {MAX_STORED_PIXELS}): is the spacing in millimetres?")
  return shape


def stored_depth(num_slices: int, slice_mm: float, target_mm: Optional[float]) -> int:
  """The stored slice count of a case: its own, or resampled to `target_mm` between slices."""
  if not target_mm:
    return int(num_slices)
  depth = max(1, int(round(num_slices * float(slice_mm) / float(target_mm))))
  if depth > 8 * MAX_STORED_PIXELS:
    raise ValueError(f"data.spacing_mm slice spacing {target_mm} mm makes {depth} slices of "
                     f"{num_slices} at {slice_mm:.3g} mm: is it in millimetres?")
  return depth


def z_weights(n: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Linear interpolation from n to m slices (half-pixel convention): for each output slice
  the lower and upper source slices and the upper one's weight."""
  src = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
  lo = np.floor(src).astype(np.int64)
  return lo, np.minimum(lo + 1, n - 1), (src - lo).astype(np.float32)


def resample_depth(volume: np.ndarray, depth: int) -> np.ndarray:
  """An (X, Y, Z) int16 HU volume resampled along Z to `depth` slices, linearly (as nnU-Net
  resamples a separate, coarse z axis), a band of rows at a time."""
  z = volume.shape[2]
  if z == depth:
    return volume
  lo, hi, w = z_weights(z, depth)
  out = np.empty(volume.shape[:2] + (depth,), np.int16)
  for r in range(0, volume.shape[0], _CHUNK):
    band = volume[r:r + _CHUNK].astype(np.float32)
    out[r:r + _CHUNK] = np.rint(band[:, :, lo] * (1 - w) + band[:, :, hi] * w)
  return out


def resample_labels_depth(labels: np.ndarray, depth: int, num_classes: int = 3) -> np.ndarray:
  """(X, Y, Z) labels resampled along Z: linear interpolation of each class, then argmax (the
  same rule as in plane)."""
  z = labels.shape[2]
  if z == depth:
    return labels
  lo, hi, w = z_weights(z, depth)
  out = np.empty(labels.shape[:2] + (depth,), np.uint8)
  for r in range(0, labels.shape[0], _CHUNK):
    band = labels[r:r + _CHUNK]
    scores = [(band[:, :, lo] == c) * (1 - w) + (band[:, :, hi] == c) * w
              for c in range(1, num_classes)]
    scores.insert(0, 1.0 - sum(scores))
    out[r:r + _CHUNK] = np.argmax(np.stack(scores, -1), -1).astype(np.uint8)
  return out


def resample_case_depth(image: np.ndarray, labels: Optional[np.ndarray], spacing,
                        target_mm: Optional[float]):
  """(image, labels, spacing) of a case resampled along Z to `target_mm` between slices
  (unchanged without a target)."""
  depth = stored_depth(image.shape[2], spacing[2], target_mm)
  if depth == image.shape[2]:
    return image, labels, tuple(spacing)
  spacing = (spacing[0], spacing[1], spacing[2] * image.shape[2] / depth)
  labels = None if labels is None else resample_labels_depth(labels, depth)
  return resample_depth(image, depth), labels, spacing


def _size2(size) -> tuple[int, int]:
  return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def context_indices(num_slices: int, context_slices: int) -> np.ndarray:
  """Indices [num_slices, context_slices] of each slice's neighbours, clamped at the ends."""
  if context_slices < 1 or context_slices % 2 == 0:
    raise ValueError(f"data.context_slices must be a positive odd number, got {context_slices}")
  half = context_slices // 2
  offsets = np.arange(-half, half + 1)
  return np.clip(np.arange(num_slices)[:, None] + offsets[None, :], 0, num_slices - 1)


def resample_image(volume: np.ndarray, size) -> np.ndarray:
  """Resamples an (X, Y, Z) int16 HU volume in-plane to `size` = (rows, cols) (or an int for a
  square), antialiased bilinear.

  Slices go to TensorFlow as the channels of one image (no transposed copies); each channel is
  resampled alone, so the result is that of resampling slice by slice.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x, y, z = volume.shape
  size = _size2(size)
  if (x, y) == size:
    return volume
  out = np.empty(size + (z,), dtype=np.int16)
  for k in range(0, z, _CHUNK):
    chunk = volume[None, :, :, k:k + _CHUNK].astype(np.float32)
    res = tf.image.resize(chunk, size, method="bilinear", antialias=True).numpy()[0]
    np.rint(res, out=res)
    np.clip(res, -32768, 32767, out=res)
    out[:, :, k:k + _CHUNK] = res
  return out


def resample_labels(labels: np.ndarray, size, num_classes: int = 3) -> np.ndarray:
  """Resamples (X, Y, Z) labels in-plane to `size` (rows, cols, or an int): linear
  interpolation of each class, then argmax.

  Only slices holding a foreground label are interpolated (the rest stay background), and the
  background's share is 1 minus the others', so a LiTS case costs a fraction of a full one-hot.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x, y, z = labels.shape
  size = _size2(size)
  if (x, y) == size:
    return labels
  out = np.zeros(size + (z,), dtype=np.uint8)
  busy = np.flatnonzero(labels.any(axis=(0, 1)))
  for k in range(0, len(busy), _CHUNK):
    ks = busy[k:k + _CHUNK]
    chunk = labels[:, :, ks]
    # Channels [slice, class] of one image: each channel is interpolated on its own.
    onehot = np.empty((1, x, y, len(ks), num_classes - 1), np.float32)
    for c in range(1, num_classes):
      np.equal(chunk, c, out=onehot[..., c - 1])
    res = tf.image.resize(onehot.reshape(1, x, y, -1), size, method="bilinear",
                          antialias=True).numpy().reshape(size + (len(ks), num_classes - 1))
    out[:, :, ks] = _argmax_with_background(res)
  return out


def _argmax_with_background(res: np.ndarray) -> np.ndarray:
  """argmax over [1 - sum(res), res[..., 0], res[..., 1], ...] (the first maximum wins, as
  numpy's argmax), without stacking the scores."""
  best = 1.0 - res.sum(-1)
  out = np.zeros(best.shape, np.uint8)
  for c in range(res.shape[-1]):
    better = res[..., c] > best
    out[better] = c + 1
    np.maximum(best, res[..., c], out=best)
  return out


def resample_probabilities_back(probs: np.ndarray, shape_xy: tuple[int, int]) -> np.ndarray:
  """Resamples [Z, rows, cols, K] per-slice probabilities back to [Z, X, Y, K] (bilinear)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if probs.shape[1:3] == tuple(shape_xy):
    return probs
  return tf.image.resize(probs, shape_xy, method="bilinear").numpy()


def liver_z_range(labels: np.ndarray) -> tuple[int, int]:
  """First and last slice holding liver (label >= 1), or (-1, -1)."""
  zs = np.flatnonzero((labels >= 1).any(axis=(0, 1)))
  return (int(zs[0]), int(zs[-1])) if len(zs) else (-1, -1)


def intensity_histograms(image: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
  """Counts of each HU value (HU_LO..HU_HI, values outside counted at the ends) of the liver
  (label 1) and tumour (label 2) voxels, at the case's own resolution: summed over a split's
  cases they give that split's exact foreground percentiles, mean and spread."""
  out = {}
  zs = np.flatnonzero(labels.any(axis=(0, 1)))  # only slices with a label hold foreground
  z = slice(int(zs[0]), int(zs[-1]) + 1) if len(zs) else slice(0, 0)
  image, labels = image[:, :, z], labels[:, :, z]
  for name, value in (("liver", LIVER), ("tumour", TUMOUR)):
    hu = np.clip(image[labels == value].astype(np.int32), HU_LO, HU_HI) - HU_LO
    out[name] = np.bincount(hu, minlength=HU_HI - HU_LO + 1).astype(np.int64)
  return out


def tumour_components(labels: np.ndarray, spacing, size) -> list[list[dict]]:
  """For each slice, the 3-D tumour components (6-connected) it cuts, in stored-pixel terms.

  Returns a list over slices of records: `component` (1-based id in the case), `bbox`
  (row_min, col_min, row_max, col_max in stored edge coordinates, max exclusive), `centre`
  (row, col centre of mass of the component's part in this slice, stored pixel coordinates),
  `area_mm2` (that part's area), `diameter_mm` (the 3-D component's equivalent-sphere diameter)
  and `num_voxels` (the 3-D component's voxel count). `case_examples` adds `stored_pixels`: the
  tumour pixels of the stored (resampled) label inside the part's box, 0 when resampling lost it.
  Components are labelled inside the tumour's bounding box, which numbers them as the whole
  volume would (the scan order is the same).
  """
  x, y, z = labels.shape
  per_slice: list[list[dict]] = [[] for _ in range(z)]
  tumour = labels == 2
  box = _bounding_box(tumour)
  if box is None:
    return per_slice
  comps, n = ndimage.label(tumour[box], structure=_SIX_CONNECTED)
  origin = [s.start for s in box]
  rows, cols = _size2(size)
  sr, sc = rows / x, cols / y
  voxel_mm3 = float(np.prod(spacing))
  pixel_mm2 = float(spacing[0] * spacing[1])
  for cid, box in enumerate(ndimage.find_objects(comps), start=1):
    part = comps[box] == cid
    voxels = int(part.sum())
    diameter = (6.0 * voxels * voxel_mm3 / math.pi) ** (1.0 / 3.0)
    for kz in range(part.shape[2]):
      plane = part[:, :, kz]
      count = int(plane.sum())
      if count == 0:
        continue
      rows, cols = np.nonzero(plane)
      rows = rows + box[0].start + origin[0]
      cols = cols + box[1].start + origin[1]
      per_slice[box[2].start + origin[2] + kz].append(dict(
          component=cid,
          bbox=np.array([rows.min() * sr, cols.min() * sc, (rows.max() + 1) * sr,
                         (cols.max() + 1) * sc], np.float32),
          centre=np.array([(rows.mean() + 0.5) * sr - 0.5, (cols.mean() + 0.5) * sc - 0.5],
                          np.float32),
          area_mm2=np.float32(count * pixel_mm2),
          diameter_mm=np.float32(diameter),
          num_voxels=np.int32(voxels)))
  return per_slice


def _bounding_box(mask: np.ndarray) -> Optional[tuple[slice, ...]]:
  """The smallest box (one slice per axis) holding every True voxel of a 3-D `mask`, or None.

  The last axis is narrowed first, so the other two are searched inside that slab only.
  """
  zs = np.flatnonzero(mask.any(axis=(0, 1)))
  if len(zs) == 0:
    return None
  z = slice(int(zs[0]), int(zs[-1]) + 1)
  slab = mask[:, :, z]
  xs = np.flatnonzero(slab.any(axis=(1, 2)))
  ys = np.flatnonzero(slab.any(axis=(0, 2)))
  return slice(int(xs[0]), int(xs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1), z


def case_examples(image: np.ndarray, labels: np.ndarray, spacing, case_number: int,
                  context_slices: int, size, *,
                  stages: Callable[[str], ContextManager] = _no_stages
                  ) -> Iterator[tuple[int, dict]]:
  """(slice index, example) per axial slice of a canonical case, as the TFDS builder stores them.

  `size`: the stored (rows, cols) of the case's slices (`stored_shape`), or an int for a square.
  The heavy work (resampling, components) happens in this call, not lazily; the context stacks
  are made as the examples are consumed. `stages(name)` is entered around each stage
  ("components", "resample", "context"), for a benchmark to time them.
  """
  z = image.shape[2]
  size = _size2(size)
  stored_spacing = np.array([spacing[0] * image.shape[0] / size[0],
                             spacing[1] * image.shape[1] / size[1], spacing[2]], np.float32)
  with stages("components"):
    components = tumour_components(labels, spacing, size)
    liver_range = np.array(liver_z_range(labels), np.int32)
  with stages("resample"):
    image_r = resample_image(image, size)
    labels_r = resample_labels(labels, size)
  with stages("components"):
    for k, parts in enumerate(components):
      for part in parts:  # tumour pixels the stored (resampled) label keeps of this part
        r0, c0 = np.floor(part["bbox"][:2]).astype(int)
        r1, c1 = np.ceil(part["bbox"][2:]).astype(int)
        part["stored_pixels"] = np.int32(np.count_nonzero(labels_r[r0:r1, c0:c1, k] == 2))
  with stages("context"):  # slice-major copies, so each stack reads whole slices
    image_z = np.ascontiguousarray(np.moveaxis(image_r, 2, 0))
    labels_z = np.ascontiguousarray(np.moveaxis(labels_r, 2, 0))
  del image_r, labels_r
  neighbours = context_indices(z, context_slices)

  def examples():
    for k in range(z):
      with stages("context"):
        stack = np.stack([image_z[i] for i in neighbours[k]], axis=-1)
      yield k, dict(image=stack, label=labels_z[k], case_number=np.int32(case_number),
                    slice_index=np.int32(k), num_slices=np.int32(z), spacing=stored_spacing,
                    liver_z_range=liver_range, tumours=components[k])

  return examples()
