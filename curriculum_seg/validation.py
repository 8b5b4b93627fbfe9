"""Validation during training: the scores that choose each stage's best checkpoint.

Two ways, by what the stage's network sees:
  whole slices    datasets of one slice size (`data.image_size`) whose stage trains on whole
                  slices (every run made before blocks): every validation slice through the
                  compiled eval step in batches;
  sliding window  everything else (a target spacing, blocks): each validation case's selected
                  slices (`data.slice_selection`) predicted by a Gaussian sliding window of
                  `config.eval.window` (default: the curriculum's whole-stage block) at
                  `config.eval.val_overlap`, as evaluate and predict segment volumes.
A liver-crop stage (the cascade's tumour network) is scored on the liver-range slices cropped
to each case's reference liver box, as it trains. Both report `val_dice` (global Dice of the
task's foreground over all scored pixels), `val_dice_mean` (mean per-slice Dice, 1 where both
are empty), `val_loss` (whole slices: the configured loss; sliding window: the cross-entropy of
the merged probabilities) and `val_slices`.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from curriculum_seg import sharding, tasks, train_step
from curriculum_seg import sliding_window as sw
from data_pipelines import augment, crops, index as index_lib, intensity, pipelines
from data_pipelines import settings



def eval_window(config: ml_collections.ConfigDict) -> Optional[tuple[int, ...]]:
  """The sliding window of evaluation ((rows, cols), or (slices, rows, cols) for a 3-D
  network): `config.eval.window`, else the block of the last whole stage that has one; None
  (whole slices) when neither is set."""
  if config.eval.window is not None:
    return settings.block_size(dict(block_size=config.eval.window))
  for name in reversed(list(config.curriculum)):
    stage = config.stages[name]
    if stage.pipeline == "whole" and stage.block_size is not None:
      return settings.block_size(stage)
  return None


def uses_sliding_window(config: ml_collections.ConfigDict, stage) -> bool:
  """Whether `stage` is validated by sliding window (see the module docstring)."""
  fixed = config.data.spacing_mm is None
  if stage is not None and stage.pipeline == "liver_crop":
    return not fixed
  return not fixed or eval_window(config) is not None


def _overlap(config) -> float:
  value = float(config.eval.val_overlap)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"config.eval.val_overlap={value} must be in [0, 1)")
  return value


class Validator:
  """Scores train states on a prepared dataset's validation split (see the module docstring).

  One per controller: it caches the compiled steps per network and the validation cases'
  liver boxes, and reads each case's slices with `data.host_threads` threads.
  """

  def __init__(self, config: ml_collections.ConfigDict, builder, mesh: jax.sharding.Mesh,
               normaliser: intensity.Normaliser):
    self.config, self.builder, self.mesh, self.normaliser = config, builder, mesh, normaliser
    self._eval_steps: dict[str, Any] = {}
    self._predict_steps: dict[str, Any] = {}
    self._liver_boxes: dict[int, np.ndarray] = {}
    self._split = None

  def scores(self, state, model, model_cfg, stage, key: str) -> dict[str, float]:
    """The validation scores of `state` for the network `model` (`key` names it in caches)."""
    if uses_sliding_window(self.config, stage):
      return self._sliding(state, model, model_cfg, stage, key)
    return self._whole_slices(state, model, model_cfg, stage, key)

  # --- whole slices ---------------------------------------------------------------------

  def _boxes(self, margin: int) -> np.ndarray:
    if margin not in self._liver_boxes:
      index, split_records = self._open()
      self._liver_boxes[margin] = index_lib.case_liver_boxes(
          split_records.labels, index, margin, settings.host_threads(self.config.data))
    return self._liver_boxes[margin]

  def _whole_slices(self, state, model, model_cfg, stage, key):
    if key not in self._eval_steps:
      self._eval_steps[key] = train_step.make_eval_step(model, model_cfg.task, self.mesh,
                                                        self.config.loss)
    eval_step = self._eval_steps[key]
    crop_stage, boxes = None, None
    if stage is not None and stage.pipeline == "liver_crop":
      crop_stage = stage
      _, margin = pipelines.crop_settings(stage, int(self.config.data.image_size))
      boxes = self._boxes(margin)
    stream = pipelines.make_eval_pipeline(
        self.builder, self.config.data, "validation", int(self.config.eval.batch_size),
        jax.process_index(), jax.process_count(), stage_cfg=crop_stage, liver_boxes=boxes)
    totals: dict[str, float] = {}
    for host_batch in stream:
      batch = sharding.host_to_global(
          {k: host_batch[k] for k in ("image", "label", "mask")}, self.mesh)
      for k, v in jax.device_get(eval_step(state, batch)).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    dice = float(train_step.dice_from_sums(totals["intersection"], totals["pred_sum"],
                                           totals["target_sum"]))
    return dict(val_dice=dice, val_dice_mean=totals["dice_sum"] / count,
                val_loss=totals["loss_sum"] / count, val_slices=int(totals.get("count", 0)))

  # --- sliding window -------------------------------------------------------------------

  def _open(self):
    if self._split is None:
      self._split = pipelines.open_split(self.builder, "validation")
    return self._split

  def _predict(self, state, model, key, three_d: bool = False):
    """windows [n, 1, h, w, C] (a 2-D network) or [n, d, h, w, C] (3-D) -> probabilities of
    the same shape with K classes, n a multiple of the global batch; every process passes the
    same windows and gets all the probabilities."""
    if key not in self._predict_steps:
      self._predict_steps[key] = train_step.make_predict_step(model, self.mesh, gather=True)
    step = self._predict_steps[key]
    processes, me = jax.process_count(), jax.process_index()

    def predict(windows: np.ndarray) -> np.ndarray:
      n = windows.shape[0]
      flat = windows if three_d else windows.reshape((n,) + windows.shape[2:])
      share = n // processes
      mine = flat[me * share:(me + 1) * share]
      probs = step(state, sharding.host_to_global(dict(image=mine), self.mesh)["image"])
      out = np.asarray(probs.addressable_data(0))
      return out if three_d else out.reshape((n, 1) + out.shape[1:])

    return predict

  def _case_examples(self, index, stage) -> list[tuple[int, np.ndarray]]:
    """(row of the case in the index, its selected example indices in slice order)."""
    if stage is not None and stage.pipeline == "liver_crop":
      examples = index.liver_range_slices(0)
    else:
      examples = index.select(self.config.data.get("slice_selection", "liver"),
                              int(self.config.data.get("liver_margin", 10)))
    rows = index.case_rows(examples)
    return [(int(r), examples[rows == r]) for r in np.unique(rows)]

  def _sliding(self, state, model, model_cfg, stage, key):
    index, split_records = self._open()
    task = str(model_cfg.task)
    foreground = tasks.foreground_class(task)
    batch = int(self.config.eval.batch_size)
    devices = self.mesh.size
    batch = int(math.ceil(batch / devices) * devices)
    crop = None
    if stage is not None and stage.pipeline == "liver_crop":
      out, margin = pipelines.crop_settings(stage, self.config.data.get("image_size", None))
      crop, boxes = out, self._boxes(margin)
      window = (out, out)
    else:
      window = eval_window(self.config)
      if window is None:
        raise ValueError("config.eval.window must be set to validate slices of different sizes")
    three_d = len(window) == 3
    predict = self._predict(state, model, key, three_d)
    pad_value = float(self.normaliser(np.array([augment.AIR_HU], np.float32))[0])
    sums = dict(intersection=0.0, pred_sum=0.0, target_sum=0.0, dice_sum=0.0, ce_sum=0.0,
                pixels=0.0, count=0)
    threads = settings.host_threads(self.config.data)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for row, examples in self._case_examples(index, stage):
        pairs = list(pool.map(split_records.__getitem__, examples.tolist()))
        hu = np.stack([p[0] for p in pairs])
        labels = np.stack([p[1] for p in pairs])
        if crop is not None:
          hu, labels = crops.crop_slices(hu, tuple(boxes[row]), crop, labels=labels)
        image = np.empty(hu.shape, np.float32)
        self.normaliser.into(image, hu)
        targets = tasks.class_targets(labels, task)
        for z0, z1, probs in sw.sliding_window_slabs(
            predict, image, tuple(window) if three_d else (1,) + tuple(window),
            overlap=_overlap(self.config),
            sigma_scale=float(self.config.eval.sigma_scale),
            batch_size=batch, pad_value=pad_value):
          t = targets[z0:z1]
          pred = probs.argmax(-1) == foreground
          fg = t == foreground
          inter = (pred & fg).sum(axis=(1, 2)).astype(np.float64)
          p_sum, t_sum = pred.sum(axis=(1, 2)), fg.sum(axis=(1, 2))
          sums["intersection"] += inter.sum()
          sums["pred_sum"] += float(p_sum.sum())
          sums["target_sum"] += float(t_sum.sum())
          denominator = p_sum + t_sum
          sums["dice_sum"] += float(np.where(denominator > 0, 2 * inter / np.maximum(
              denominator, 1), 1.0).sum())
          true_p = np.take_along_axis(probs, t[..., None], -1)[..., 0]
          sums["ce_sum"] += float(-np.log(np.maximum(true_p, 1e-7)).sum())
          sums["pixels"] += true_p.size
          sums["count"] += z1 - z0
    count = max(sums["count"], 1)
    dice = float(train_step.dice_from_sums(sums["intersection"], sums["pred_sum"],
                                           sums["target_sum"]))
    return dict(val_dice=dice, val_dice_mean=sums["dice_sum"] / count,
                val_loss=sums["ce_sum"] / max(sums["pixels"], 1), val_slices=int(sums["count"]))
