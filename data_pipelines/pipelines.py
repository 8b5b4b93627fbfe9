"""The input pipelines, assembled per stage from the config: whole slices, tumour patches, liver
crops (training) and whole or liver-cropped slices (evaluation), on Grain.

A pipeline is a `grain.MapDataset` over this process's rows of the global batches: row k is
global position p (transforms.ProcessRows), and the element at position p is a pure function
of (seed, p): the sampler's plan of that row (which slice or tumour part, where the patch is
centred), the slice read from the prepared dataset, the patch cropped around its centre; rows
are batched and get their augmentation parameters, drawn from the positions. So the global
batches are the same whatever the number of processes, worker processes, threads or devices,
and resuming is slicing the dataset at a saved `position` (global batches consumed); see
stream.Stream for threads and worker processes (`data.host_threads`, `data.worker_count`).

Training batches leave the host as int16 HU (whole slices, or patch footprints cropped with air
padding) plus per-row affine and intensity parameters (for liver crops, the augmentation map
composed with the map into the case's liver box, so crop, resize and augmentation are one
warp); `stream.finish` (a JAX function) turns them into the model's batch: `image` float32
[b, H, W, C] windowed to [0, 1], `label` int32 [b, H, W] (0 background, 1 liver, 2 tumour),
`mask` float32 [b]. The device feed applies it on the accelerator; with
`augment.on_device=False` the stream applies it on the host CPU and yields finished batches.
Evaluation batches are finished on the host and also carry `case_number` and `slice_index`.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import grain
import numpy as np

from data_pipelines import augment, index as index_lib, intensity, records, samplers, stream
from data_pipelines import transforms as T
# The settings' public names, as callers know them (pipelines.hu_window, ...).
from data_pipelines.settings import (DEFAULT_HU_WINDOW, MAX_BLOCK, block_size,  # noqa: F401
                                     crop_settings, host_threads, hu_window, patch_shape,
                                     worker_count)
from data_pipelines.settings import process_rows, stage_get, stream_settings

PIPELINES = ("whole", "patch", "liver_crop")
_ENDLESS = 1 << 62  # rows of an endless training dataset (Grain datasets have a length)


def _keep_tensorflow_off_accelerators() -> None:
  """The accelerator belongs to JAX: hide GPUs from TensorFlow if it is loaded (TFDS loads it)."""
  tf = sys.modules.get("tensorflow")
  if tf is None:
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError, AttributeError):
    pass  # already initialised or no GPU support: nothing to hide


def open_split(builder, split: str) -> tuple[index_lib.SplitIndex, records.SplitRecords]:
  index = index_lib.SplitIndex.from_builder(builder, split)
  split_records = records.SplitRecords(builder, split)
  if split_records.num_examples != index.num_examples:
    raise ValueError(f"the dataset index lists {index.num_examples} {split} slices but the "
                     f"files hold {split_records.num_examples}: prepare the dataset again")
  return index, split_records


def case_liver_boxes(builder, split: str, margin: int, data_cfg) -> np.ndarray:
  """[num_cases, 4] liver crop boxes of a split's cases (see index.case_liver_boxes)."""
  index, split_records = open_split(builder, split)
  return index_lib.case_liver_boxes(split_records.labels, index, margin, host_threads(data_cfg))


def _rows(num_batches: int, batch_size: int, rows: tuple[int, int]) -> grain.MapDataset:
  """This process's rows of global batches 0 .. num_batches-1, as global positions."""
  per = rows[1] - rows[0]
  return grain.MapDataset.range(num_batches * per).map(T.ProcessRows(batch_size, rows[0], per))


# ---- the pipelines ---------------------------------------------------------------------------

def check_stage_settings(stage_cfg, data_cfg, image_size: Optional[int]) -> dict:
  """Validates a training stage's input settings (no data needed); returns them by name.

  `image_size` is the stored slice size, None when slices differ in size (data.spacing_mm).
  Checked before any work (`curriculum_seg.config_check`) and again when the pipeline is
  built. Messages name the field as `stage.<field>`.
  """
  pipeline = stage_get(stage_cfg, "pipeline", "whole")
  if pipeline not in PIPELINES:
    raise ValueError(f"stage.pipeline must be one of {PIPELINES}, got {pipeline!r}")
  tumour_fraction = float(stage_get(stage_cfg, "tumour_fraction", 0.0))
  if not 0.0 <= tumour_fraction <= 1.0:
    raise ValueError(f"stage.tumour_fraction must be in [0, 1], got {tumour_fraction}")
  if pipeline == "whole":
    margin = int(data_cfg.get("liver_margin", 10))
    if margin < 0:
      raise ValueError(f"data.liver_margin must be >= 0, got {margin}")
    selection = data_cfg.get("slice_selection", "liver")
    if selection not in index_lib.SLICE_SELECTIONS:
      raise ValueError(f"data.slice_selection must be one of {index_lib.SLICE_SELECTIONS}, got "
                       f"{selection!r}")
    block = block_size(stage_cfg)
    if block is None and image_size is None:
      raise ValueError("stage.block_size must be set: with data.spacing_mm slices differ in size "
                       "per case, so a whole stage trains on fixed-size blocks of them")
    sampling = stage_get(stage_cfg, "block_sampling", "slice")
    if sampling not in samplers.BLOCK_SAMPLING:
      raise ValueError(f"stage.block_sampling must be one of {samplers.BLOCK_SAMPLING}, got "
                       f"{sampling!r}")
    return dict(tumour_fraction=tumour_fraction, margin=margin, selection=selection,
                block=block, block_sampling=sampling)
  if pipeline == "liver_crop":
    out_size, margin = crop_settings(stage_cfg, image_size)
    return dict(tumour_fraction=tumour_fraction, out_size=out_size, margin=margin)
  if tumour_fraction:
    raise ValueError(f"stage.tumour_fraction ({tumour_fraction}) applies to 'whole' and "
                     f"'liver_crop' stages; a patch stage's tumour share is "
                     f"stage.positive_fraction")
  shape = patch_shape(stage_cfg)
  out_size = shape[-1]
  if image_size is not None and not 1 <= out_size <= image_size:
    raise ValueError(f"stage.patch_size ({out_size}) must be in [1, data.image_size="
                     f"{image_size}]")
  fraction = float(stage_get(stage_cfg, "positive_fraction", 0.5))
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"stage.positive_fraction must be in [0, 1], got {fraction}")
  sampling = stage_get(stage_cfg, "component_sampling", "component")
  if sampling not in samplers.COMPONENT_SAMPLING:
    raise ValueError(f"stage.component_sampling must be one of {samplers.COMPONENT_SAMPLING}, "
                     f"got {sampling!r}")
  jitter = float(stage_get(stage_cfg, "patch_jitter", 0))
  if not 0.0 <= jitter < min(shape) / 2:
    raise ValueError(f"stage.patch_jitter ({jitter}) must be in [0, patch_size/2 = "
                     f"{min(shape) / 2}): the tumour must stay in the patch")
  return dict(tumour_fraction=0.0, out_size=out_size, fraction=fraction, sampling=sampling,
              jitter=jitter, depth=shape[0] if len(shape) == 3 else 0)


def _train_sampler(pipeline, stage_cfg, data_cfg, index, split_records, seed, batch_size):
  """The stage's sampler, its output size, the liver boxes (liver_crop) and a description."""
  s = split_records.image_size
  settings = check_stage_settings(dict(stage_cfg, pipeline=pipeline), data_cfg, s)
  tumour_fraction = settings["tumour_fraction"]
  tumour_slices = index.tumour_slices()
  if pipeline == "whole":
    selection = settings["selection"]
    examples = index.select(selection, settings["margin"])
    if len(examples) == 0:
      raise ValueError(f"data.slice_selection={selection!r} selects no training slice (no "
                       f"case has liver); use slice_selection='all'")
    block = settings["block"]
    if block is not None:
      sampler = samplers.BlockSampler(index, examples, seed, batch_size, block, tumour_fraction,
                                      settings["block_sampling"])
      return sampler, block[-1], None, dict(
          pipeline="whole", block_size=list(block), block_sampling=settings["block_sampling"],
          examples=len(examples), selection=selection, tumour_fraction=tumour_fraction,
          tumour_slices=len(sampler.tumour_examples), components=sampler.num_components,
          tumour_rows_per_batch=sampler.num_tumour)
    sampler = samplers.WholeSliceSampler(examples, seed, batch_size, tumour_slices,
                                         tumour_fraction)
    return sampler, s, None, dict(
        pipeline="whole", examples=len(examples), selection=selection,
        tumour_fraction=tumour_fraction, tumour_slices=len(sampler.tumour_examples),
        tumour_rows_per_batch=sampler.num_tumour)
  if pipeline == "liver_crop":
    out_size, margin = settings["out_size"], settings["margin"]
    boxes = index_lib.case_liver_boxes(split_records.labels, index, margin,
                                       host_threads(data_cfg))
    examples = index.liver_range_slices(0)
    if len(examples) == 0:
      raise ValueError("stage.pipeline='liver_crop' needs liver labels, but no training case "
                       "has liver")
    sampler = samplers.WholeSliceSampler(examples, seed, batch_size, tumour_slices,
                                         tumour_fraction)
    return sampler, out_size, boxes, dict(
        pipeline="liver_crop", examples=len(examples), crop_size=out_size, crop_margin=margin,
        tumour_fraction=tumour_fraction, tumour_slices=len(sampler.tumour_examples),
        tumour_rows_per_batch=sampler.num_tumour)
  out_size = settings["out_size"]
  sampler = samplers.PatchSampler(index, seed, batch_size, settings["fraction"],
                                  settings["sampling"], settings["jitter"], out_size,
                                  depth=settings["depth"])
  return sampler, out_size, None, dict(
      pipeline="patch", parts=len(index.tumours), components=sampler.num_components,
      positives_per_batch=sampler.num_positive, negative_slices=len(sampler.negative_pool),
      patch_size=list(patch_shape(stage_cfg)))


def make_train_pipeline(builder, data_cfg, augment_cfg, stage_cfg, seed: int,
                        process_index: int, process_count: int,
                        start: int = 0) -> stream.Stream:
  """An endless stream of this process's training batches for one stage.

  `stage_cfg.pipeline` picks 'whole' (slices chosen by data.slice_selection, with
  stage.tumour_fraction of every batch tumour-bearing slices), 'patch'
  (stage.patch_size patches, stage.positive_fraction of them on tumour parts sampled per
  stage.component_sampling with +-stage.patch_jitter pixels of jitter) or 'liver_crop' (the
  cascade's tumour network: the slices within each case's liver z-range, cropped to the case's
  reference liver box widened by stage.crop_margin stored pixels (see data_pipelines.crops)
  and resized to stage.crop_size; augmentation acts in the crop's frame). `stage_cfg.batch_size`
  is the global batch; this process gets rows [p*B/P, (p+1)*B/P). `start` is a saved
  `position`. The stream's `finish` is the device half of the batch (None when
  augment.on_device is False: the batches are then finished here).
  """
  _keep_tensorflow_off_accelerators()
  pipeline = stage_get(stage_cfg, "pipeline", "whole")
  if pipeline not in PIPELINES:
    raise ValueError(f"stage.pipeline must be one of {PIPELINES}, got {pipeline!r}")
  batch_size = int(stage_get(stage_cfg, "batch_size", 0))
  rows = process_rows(batch_size, process_index, process_count, "stage.batch_size")
  spec = augment.AugmentSpec.from_config(augment_cfg)
  normaliser = intensity.normaliser_for(data_cfg, builder.info.metadata)
  settings = stream_settings(data_cfg)
  index, split_records = open_split(builder, "train")
  sampler, out_size, boxes, info = _train_sampler(pipeline, stage_cfg, data_cfg, index,
                                                  split_records, seed, batch_size)
  s = split_records.image_size
  rows_ds = _rows(_ENDLESS // batch_size, batch_size, rows).map(T.SelectSlice(sampler))
  rows_ds = rows_ds.map(T.ReadSlice(split_records))
  blocks = isinstance(sampler, samplers.BlockSampler)
  if pipeline == "patch" or blocks:  # warp the footprint around the centre into the patch
    in_size = spec.footprint(out_size)
    out_centre, in_centre = float(out_size // 2), float(in_size // 2)
    rows_ds = rows_ds.map(T.PlaceBlock(sampler) if blocks else T.PlacePatch(sampler))
    depth = sampler.block[0] if blocks and len(sampler.block) == 3 else (
        0 if blocks else sampler.depth)
    if depth:  # 3-D: the block's or patch's slices of the case
      rows_ds = rows_ds.map(T.ReadDepth(split_records, index, depth))
    rows_ds = rows_ds.map(T.CropPatch(in_size))
  elif pipeline == "liver_crop":  # augment in the crop's frame, then map it into the box
    if s is None:  # slices of several sizes: padded to the largest so that they batch
      largest = tuple(int(v) for v in index.cases[:, 5:7].max(axis=0))
      rows_ds = rows_ds.map(T.PadSlice(largest))
    in_size = s
    out_centre = in_centre = (out_size - 1) / 2.0
  else:
    in_size = s
    out_centre = in_centre = (s - 1) / 2.0
  batches = rows_ds.batch(rows[1] - rows[0], drop_remainder=True).map(
      T.DrawAugmentation(spec, int(seed), out_centre, in_centre))
  if boxes is not None:
    batches = batches.map(T.MapIntoLiverBox(index, boxes, out_size))
  batches = batches.map(T.TrainRows())
  finish = augment.make_finish(normaliser, out_size, warp=(spec.geometric or in_size != out_size
                                                           or pipeline == "liver_crop"))
  host_transforms = []
  if not spec.on_device:
    host_transforms, finish = [T.FinishOnHost(finish)], None
  info.update(batch_size=batch_size, rows=rows, out_size=out_size, in_size=in_size,
              normalisation=normaliser.describe(), threads=settings["read_threads"],
              workers=settings["worker_count"])

  def plan(b: int) -> dict[str, np.ndarray]:
    """This process's rows of the sampler's global batch b."""
    return {k: v[rows[0]:rows[1]] for k, v in sampler.global_batch(b).items()}

  out = stream.Stream(batches, start, None, host_transforms=host_transforms, finish=finish,
                      info=info, plan=plan, **settings)
  out.sampler = sampler  # what draws the rows (tests and notebooks inspect its choices)
  return out


def make_eval_pipeline(builder, data_cfg, split: str, batch_size: int, process_index: int,
                       process_count: int, *, slice_selection: str = "all",
                       stage_cfg=None, liver_boxes: Optional[np.ndarray] = None
                       ) -> stream.Stream:
  """A finite stream over every slice of `split` once (by default), in (case, slice) order.

  `batch_size` is global; all processes yield the same number of batches; the last global
  batch is padded (mask 0, case_number and slice_index -1) instead of dropped. Batches are
  finished: `image` float32 windowed, `label` int32, `mask`, `case_number`, `slice_index`.

  With a 'liver_crop' `stage_cfg` the stream holds what that stage's network sees: the slices
  within each case's liver z-range, cropped to the case's reference liver box and resized to
  stage.crop_size exactly as training crops them (no augmentation); `slice_selection` is
  ignored. `liver_boxes` (from `case_liver_boxes` for this split and the stage's margin) saves
  reading every liver slice's label again when a caller evaluates repeatedly.
  """
  _keep_tensorflow_off_accelerators()
  rows = process_rows(int(batch_size), process_index, process_count, "eval batch_size")
  normaliser = intensity.normaliser_for(data_cfg, builder.info.metadata)
  settings = stream_settings(data_cfg)
  index, split_records = open_split(builder, split)
  s = split_records.image_size
  if s is None:
    raise ValueError(f"the prepared dataset's slices differ in size (data.spacing_mm): "
                     f"evaluate split {split!r} by sliding window (curriculum_seg.validation)")
  cropped = stage_cfg is not None and stage_get(stage_cfg, "pipeline", "whole") == "liver_crop"
  if cropped:
    out, margin = crop_settings(stage_cfg, s)
    boxes = (index_lib.case_liver_boxes(split_records.labels, index, margin,
                                        settings["read_threads"])
             if liver_boxes is None else np.asarray(liver_boxes))
    if boxes.shape != (len(index.cases), 4):
      raise ValueError(f"liver_boxes must be [{len(index.cases)}, 4] (one per case of split "
                       f"{split!r}), got {boxes.shape}")
    examples = index.liver_range_slices(0)
  else:
    out = s
    examples = index.select(slice_selection, int(data_cfg.get("liver_margin", 10)))
  num_batches = math.ceil(len(examples) / batch_size)
  batches = _rows(num_batches, int(batch_size), rows).map(
      T.SelectSlice(samplers.EvalSampler(examples))).map(T.ReadSlice(split_records)).batch(
          rows[1] - rows[0], drop_remainder=True).map(T.EvalRows(index))
  host_transforms = []
  if cropped:
    host_transforms = [T.CropToLiverBox(index, boxes, out, normaliser)]
  else:
    batches = batches.map(T.Normalise(normaliser))
  return stream.Stream(batches, 0, num_batches, host_transforms=host_transforms, info=dict(
      pipeline="eval_liver_crop" if cropped else "eval", split=split, examples=len(examples),
      batches=num_batches, batch_size=batch_size, rows=rows, out_size=out), **settings)
