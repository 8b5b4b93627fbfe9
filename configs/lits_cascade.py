"""Cascade baseline on LiTS 2017: a liver network, then a tumour network on the liver region.

The counterpart of configs/lits_three_stage.py (same data, model size, total steps 60,000):

  liver   30,000 steps: whole 512x512 slices, model.task='liver', batch 64, lr 1e-4 cosine
  tumour  30,000 steps: a new network (from scratch, model.task='tumour') on the liver-range
          slices cropped to each case's reference liver box + 16 stored pixels (about 1 cm),
          resized to 256x256 (data_pipelines/crops.py), batch 64, lr 1e-4 cosine

A LiTS liver spans about 200-300 of the 512 stored pixels, so a 256 crop keeps about the native
resolution; a tumour step costs about a quarter of a whole-slice step. Each stage keeps its best
checkpoint by its own validation Dice (liver Dice on whole slices; tumour Dice on liver crops).
At inference (curriculum_seg/cascade.py) the crop box comes from the predicted liver.

  curriculum-seg train --config configs/lits_cascade.py \\
      --config.data.lits_dir=gs://BUCKET/lits --config.data.tfds_dir=gs://BUCKET/tfds \\
      --workdir gs://BUCKET/runs/cascade
"""

import ml_collections

from configs import common
from configs import lits_three_stage


def get_config(arg=None):
  """`arg` is unused (kept for the `file.py:arg` convention)."""
  del arg
  config = lits_three_stage.get_config("whole_only")  # data, model, loss, eval
  half = lits_three_stage.TOTAL_STEPS // 2
  schedule = dict(schedule="cosine", warmup_steps=500, log_every=100, eval_every=1_000,
                  checkpoint_every=1_000)
  config.curriculum = ("liver", "tumour")
  config.stages = ml_collections.ConfigDict(dict(
      liver=common.stage("whole", steps=half, batch_size=64, learning_rate=1e-4,
                         init="scratch", model=dict(task="liver"),
                         block_size=lits_three_stage.BLOCK, **schedule),
      tumour=common.stage("liver_crop", steps=lits_three_stage.TOTAL_STEPS - half,
                          batch_size=64, learning_rate=1e-4, init="scratch", crop_size=256,
                          crop_margin=16, model=dict(task="tumour"), **schedule),
  ))
  config.cascade = ml_collections.ConfigDict(dict(liver_stage="liver", tumour_stage="tumour"))
  return config
