"""Cascade baseline on the synthetic data: a liver network, then a tumour network on liver crops.

configs/synthetic.py's `cascade` regime (`cascade_stages`): the same data, network, loss, total
steps and schedule (warm-up, cosine decay) as its other regimes, half the steps each:

  liver   whole-stage blocks, model.task='liver' (liver vs the rest), batch 8, lr 1e-3
  tumour  a new network (from scratch, model.task='tumour') on the liver-range slices cropped
          to each case's reference liver box + 8 stored pixels, resized to 128 x 128
          (data_pipelines/crops.py), batch 8 with half of it tumour-bearing slices, lr 1e-3

The loss is one for the run, so the liver network's cross-entropy also weights its foreground
(liver) as the tumour network's. Each stage keeps its best checkpoint by its own validation Dice
(liver Dice for the liver network, tumour Dice on liver crops for the tumour network). At
inference (curriculum_seg/cascade.py) the tumour network reads the box of the *predicted* liver,
computed by the same function.

  curriculum-seg train --config configs/synthetic_cascade.py --workdir runs/cascade
"""

from configs import synthetic


def get_config(arg=None):
  """`configs/synthetic.py:cascade`; `arg` is unused (kept for the `file.py:arg` convention)."""
  del arg
  return synthetic.get_config("cascade")
