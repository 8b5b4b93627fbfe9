"""Cascade baseline on the synthetic data: a liver network, then a tumour network on liver crops.

Same data, network, loss and total steps (1,200) as configs/synthetic.py's three-stage
curriculum, and its schedule (50 warm-up steps, cosine decay):

  liver   600 steps: whole slices, model.task='liver' (liver vs the rest), batch 8, lr 1e-3
  tumour  600 steps: a new network (from scratch, model.task='tumour') on the liver-range
          slices cropped to each case's reference liver box + 8 stored pixels, resized to
          128 x 128 (data_pipelines/crops.py), batch 8 with half of it tumour-bearing slices,
          lr 1e-3

The loss is the default's for both networks (config.loss is one for the run), so the liver
network's cross-entropy also weights its foreground (liver) 10.

Each stage keeps its best checkpoint by its own validation Dice (liver Dice on whole slices for
the liver network, tumour Dice on liver crops for the tumour network). At inference
(curriculum_seg/cascade.py) the tumour network reads the box of the *predicted* liver, computed
by the same function.

  curriculum-seg train --config configs/synthetic_cascade.py --workdir runs/cascade
"""

import ml_collections

from configs import common
from configs import synthetic


def get_config(arg=None):
  """`arg` is unused (kept for the `file.py:arg` convention)."""
  del arg
  config = synthetic.get_config("whole_only")  # data, model, loss, eval as the default
  half = synthetic.TOTAL_STEPS // 2
  config.curriculum = ("liver", "tumour")
  config.stages = ml_collections.ConfigDict(dict(
      liver=common.stage("whole", steps=half, batch_size=8, learning_rate=1e-3, init="scratch",
                         schedule="cosine", warmup_steps=50, eval_every=100,
                         checkpoint_every=100, model=dict(task="liver"),
                         block_size=synthetic.BLOCK),
      tumour=common.stage("liver_crop", steps=synthetic.TOTAL_STEPS - half, batch_size=8,
                          learning_rate=1e-3, init="scratch", schedule="cosine",
                          warmup_steps=50, tumour_fraction=0.5, eval_every=100,
                          checkpoint_every=100, crop_size=128, crop_margin=8,
                          model=dict(task="tumour")),
  ))
  config.cascade = ml_collections.ConfigDict(dict(liver_stage="liver", tumour_stage="tumour"))
  return config
