"""The pipelines' named transforms, each one step of turning a global position into a batch row.

Element transforms (one batch row) run in Grain's read threads and worker processes:
  ProcessRows (this process's k-th row -> its global position), SelectSlice (position -> the
  sampler's plan of the row), ReadSlice (+ image and label of the planned example), PlaceBlock
  and PlacePatch (+ the `centre` of a block or negative patch), ReadDepth (a 3-D row's slices
  around `centre_z`), CropPatch (the footprint around the centre, air outside), PadSlice (pad to
  the split's largest slice).
Batch transforms (after `MapDataset.batch`; a dict of arrays with a leading row axis):
  DrawAugmentation (+ per-row `affine` and `intensity`), MapIntoLiverBox (the affine composed
  with the map into each row's case liver box), TrainRows and EvalRows (the batch's keys),
  Normalise (HU -> float32 model input, label int32);
and, in the training process only (they run JAX on the host CPU, which worker processes do not
load): CropToLiverBox (evaluation of a liver-crop stage) and FinishOnHost (the augmentation warp
on the host, augment.on_device=False).

Every random quantity is drawn from a counter-based hash of (seed, global position) by the
sampler or augment.sample_params, never from Grain's per-element seeds, so a row is a pure
function of (seed, position) wherever and in whatever order it is made.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain
import numpy as np

from data_pipelines import augment, crops
from data_pipelines.index import SplitIndex


def window_into(dst: np.ndarray, hu: np.ndarray, lo: float, hi: float) -> None:
  """dst[...] = clip((hu - lo) / (hi - lo), 0, 1) in float32 (the paper's input scaling)."""
  np.subtract(hu, np.float32(lo), out=dst, dtype=np.float32)
  np.multiply(dst, np.float32(1.0 / (hi - lo)), out=dst)
  np.clip(dst, 0.0, 1.0, out=dst)


def normalise_into(dst: np.ndarray, hu: np.ndarray, normaliser) -> None:
  """dst[...] = the model's input of `hu` (an intensity.Normaliser; the paper's window exactly
  as `window_into` computes it, so runs made before normalisers keep their inputs bit for bit)."""
  if normaliser.name == "window" and normaliser.offset == normaliser.lo:
    window_into(dst, hu, normaliser.lo, normaliser.hi)
  else:
    normaliser.into(dst, hu)


def crop_into(dst: np.ndarray, src: np.ndarray, top: int, left: int, fill) -> None:
  """dst[:] = src[top:top+F, left:left+F] with `fill` where that leaves src."""
  f = dst.shape[0]
  h, w = src.shape[:2]
  r0, c0, r1, c1 = max(top, 0), max(left, 0), min(top + f, h), min(left + f, w)
  if r0 != top or c0 != left or r1 != top + f or c1 != left + f:
    dst[...] = fill
  if r1 > r0 and c1 > c0:
    dst[r0 - top:r1 - top, c0 - left:c1 - left] = src[r0:r1, c0:c1]


# ---- element transforms ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProcessRows(grain.transforms.Map):
  """Per-process slicing: this process's k-th row -> its global position. Global batch b holds
  positions b*B .. b*B+B-1; the process keeps `rows` of them from `first_row` on."""

  batch_size: int
  first_row: int
  rows: int

  def map(self, k: int) -> int:
    b, r = divmod(int(k), self.rows)
    return b * self.batch_size + self.first_row + r


@dataclasses.dataclass(frozen=True)
class SelectSlice(grain.transforms.Map):
  """position -> the sampler's plan of that batch row (`sampler.row`)."""

  sampler: Any

  def map(self, position: int) -> dict[str, np.ndarray]:
    return self.sampler.row(position)


@dataclasses.dataclass(frozen=True)
class ReadSlice(grain.transforms.Map):
  """+ the planned example's `image` and `label` (read-only, as decoded); a row with no
  example (evaluation padding, `example` -1) gets zeros."""

  records: Any  # records.SplitRecords

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    example = int(row["example"])
    if example < 0:
      s, c = self.records.image_size, self.records.channels
      image, label = np.zeros((s, s, c), np.int16), np.zeros((s, s), np.uint8)
    else:
      image, label = self.records[example]
    return dict(row, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class PlaceBlock(grain.transforms.Map):
  """+ `centre` of the row's whole-stage block, placed on its label (`BlockSampler.place`:
  on liver, on tumour in tumour rows, inside the slice where it fits)."""

  sampler: Any  # samplers.BlockSampler

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    centre = self.sampler.place(row["label"], row)
    if len(centre) == 3:  # a 3-D block: its centre slice in the case, then in plane
      return dict(row, centre_z=np.int64(centre[0]), centre=np.asarray(centre[1:], np.int64))
    return dict(row, centre=np.asarray(centre, np.int64))


@dataclasses.dataclass(frozen=True)
class ReadDepth(grain.transforms.Map):
  """image [H, W, C] and label [H, W] of the planned slice -> the `depth` slices of its case
  around `centre_z` (slice centre_z - depth // 2 first): image [D, H, W, C], label [D, H, W],
  air (and background) where the block leaves the case."""

  records: Any  # records.SplitRecords
  index: SplitIndex
  depth: int

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    example = int(row["example"])
    case = int(self.index.case_rows([example])[0])
    first, num_slices = (int(v) for v in self.index.cases[case, 1:3])
    z0 = int(row["centre_z"]) - self.depth // 2
    image = np.full((self.depth,) + row["image"].shape, np.int16(augment.AIR_HU), np.int16)
    label = np.zeros((self.depth,) + row["label"].shape, np.uint8)
    for k in range(self.depth):
      z = z0 + k
      if not 0 <= z < num_slices:
        continue
      if first + z == example:
        image[k], label[k] = row["image"], row["label"]
      else:
        image[k], label[k] = self.records[first + z]
    return dict(row, image=image, label=label)


@dataclasses.dataclass(frozen=True)
class PlacePatch(grain.transforms.Map):
  """A negative patch row (no tumour part planned) gets its `centre`: a liver pixel chosen
  from the label (`PatchSampler.negative_centre`); positive rows keep the planned one."""

  sampler: Any  # samplers.PatchSampler

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if row["positive"]:
      return row
    centre = self.sampler.negative_centre(row["label"], self.sampler.has_tumour(row["example"]),
                                          float(row["pixel_u"]))
    return dict(row, centre=np.asarray(centre, np.int64))


@dataclasses.dataclass(frozen=True)
class CropPatch(grain.transforms.Map):
  """image and label -> the `size` x `size` footprint around the row's `centre` (a patch's,
  or a block's from PlaceBlock), air (and background) outside the slice; a 3-D row's every
  slice alike."""

  size: int

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image, label = row["image"], row["label"]
    r, c = (int(v) for v in row["centre"])
    f = self.size
    top, left = r - f // 2, c - f // 2
    if image.ndim == 4:  # [D, H, W, C] (3-D): crop every slice in plane
      patch = np.empty((image.shape[0], f, f, image.shape[3]), np.int16)
      patch_label = np.empty((label.shape[0], f, f), np.uint8)
      for k in range(image.shape[0]):
        crop_into(patch[k], image[k], top, left, np.int16(augment.AIR_HU))
        crop_into(patch_label[k], label[k], top, left, 0)
      return dict(row, image=patch, label=patch_label)
    patch = np.empty((f, f, image.shape[2]), np.int16)
    patch_label = np.empty((f, f), np.uint8)
    crop_into(patch, image, top, left, np.int16(augment.AIR_HU))
    crop_into(patch_label, label, top, left, 0)
    return dict(row, image=patch, label=patch_label)


@dataclasses.dataclass(frozen=True)
class PadSlice(grain.transforms.Map):
  """image and label padded at the bottom and right to `shape` (rows, cols) with air and
  background, so slices of different sizes batch; pixel coordinates are unchanged."""

  shape: tuple[int, int]

  def map(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image, label = row["image"], row["label"]
    if image.shape[:2] == tuple(self.shape):
      return row
    padded = np.full(tuple(self.shape) + image.shape[2:], np.int16(augment.AIR_HU), np.int16)
    padded_label = np.zeros(tuple(self.shape), np.uint8)
    h, w = label.shape
    padded[:h, :w], padded_label[:h, :w] = image, label
    return dict(row, image=padded, label=padded_label)


# ---- batch transforms --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DrawAugmentation(grain.transforms.Map):
  """+ `affine` [n, 2, 3] (output pixel -> input pixel) and `intensity` [n, 2] ([n, 3] with lesion
  contrast) of each row,
  drawn from (seed, position) by augment.sample_params (identity when augmentation is off)."""

  spec: augment.AugmentSpec
  seed: int
  out_centre: float
  in_centre: float

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    params = augment.sample_params(self.spec, self.seed, batch["position"])
    out = dict(batch, affine=augment.affine_matrices(params, self.out_centre, self.in_centre),
               intensity=augment.intensity_pairs(params, lesion=self.spec.lesion_contrast))
    if "flip_depth" in params:
      out["flip_depth"] = params["flip_depth"]
    return out


@dataclasses.dataclass(frozen=True)
class MapIntoLiverBox(grain.transforms.Map):
  """The affine of each row composed with the map from the crop's frame into its case's liver
  box (crops.crop_affine), so crop, resize and augmentation are one warp."""

  index: SplitIndex
  boxes: np.ndarray  # [num_cases, 4], see index.case_liver_boxes
  out_size: int

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    box_maps = np.stack([crops.crop_affine(self.boxes[r], self.out_size)
                         for r in self.index.case_rows(batch["example"])])
    return dict(batch, affine=crops.compose(box_maps, batch["affine"]).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class TrainRows(grain.transforms.Map):
  """The training batch as it leaves the host: `image` int16 HU, `label` uint8, `mask` float32
  ones, `affine`, `intensity` (the plan's fields are dropped)."""

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(image=batch["image"], label=batch["label"],
               mask=np.ones(len(batch["image"]), np.float32), affine=batch["affine"],
               intensity=batch["intensity"])
    if "flip_depth" in batch:
      out["flip_depth"] = batch["flip_depth"]
    return out


@dataclasses.dataclass(frozen=True)
class EvalRows(grain.transforms.Map):
  """+ `mask` (1 for a real row, 0 for padding), `case_number` and `slice_index` (-1 for
  padding) of an evaluation batch; keeps image and label."""

  index: SplitIndex

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    real = batch["real"]
    n = len(real)
    case_number, slice_index = np.full(n, -1, np.int32), np.full(n, -1, np.int32)
    if real.any():
      case_number[real], slice_index[real] = self.index.case_and_slice(batch["example"][real])
    return dict(image=batch["image"], label=batch["label"], mask=real.astype(np.float32),
                case_number=case_number, slice_index=slice_index, example=batch["example"])


@dataclasses.dataclass(frozen=True)
class Normalise(grain.transforms.Map):
  """image HU -> float32 model input (`normaliser`: an intensity.Normaliser), zeros on padding
  rows (mask 0); label -> int32; drops the `example` column."""

  normaliser: Any

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    image = np.empty(batch["image"].shape, np.float32)
    normalise_into(image, batch["image"], self.normaliser)
    image[batch["mask"] == 0] = 0.0
    out = {k: v for k, v in batch.items() if k != "example"}
    return dict(out, image=image, label=batch["label"].astype(np.int32))


# ---- batch transforms of the training process (JAX on the host CPU) ----------------------------

@dataclasses.dataclass(frozen=True)
class CropToLiverBox(grain.transforms.Map):
  """Evaluation rows cropped to their case's liver box and resized to `out_size` as training
  crops them (crops.crop_slices, no augmentation), then normalised; padding rows stay zeros."""

  index: SplitIndex
  boxes: np.ndarray
  out_size: int
  normaliser: Any

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n, c, o = len(batch["mask"]), batch["image"].shape[-1], self.out_size
    image, label = np.zeros((n, o, o, c), np.float32), np.zeros((n, o, o), np.int32)
    rows = np.flatnonzero(batch["mask"])
    case_rows = self.index.case_rows(batch["example"][rows])
    for case_row in np.unique(case_rows):
      which = rows[case_rows == case_row]
      hu, labels = crops.crop_slices(batch["image"][which], tuple(self.boxes[case_row]), o,
                                     labels=batch["label"][which])
      for j, k in enumerate(which):
        normalise_into(image[k], hu[j], self.normaliser)
        label[k] = labels[j]
    out = {k: v for k, v in batch.items() if k != "example"}
    return dict(out, image=image, label=label)


class FinishOnHost(grain.transforms.Map):
  """Applies a batch's device half (augment.make_finish: warp, window, jitter) with XLA on this
  host's CPU, numpy in and out (augment.on_device=False)."""

  def __init__(self, finish: Callable[[dict], dict]):
    import jax  # pylint: disable=g-import-not-at-top
    self._cpu = jax.local_devices(backend="cpu")[0]
    self._finish = jax.jit(finish)

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.tree.map(np.asarray, self._finish(jax.device_put(batch, self._cpu)))
