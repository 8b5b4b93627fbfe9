"""The authors' setting of the three-stage curriculum: a 3-D residual U-Net on LiTS at 1 mm.

As the authors' code (Li et al., arXiv 1910.07895): cases resampled to 1 mm voxels, whole stages
on 64 x 256 x 256 blocks inside the liver region (blocks placed on liver; half of every batch on
tumour), the patch stage on 64 x 192 x 192 patches centred on tumour components (the authors'
190, rounded to what four 2x poolings divide) with negatives from tumour-free liver, a 3-D
residual U-Net with widths 8-16-32-64-128, instance norm and 2x2x2 transposed up-convolutions,
the soft Dice of tumour against everything else, Adam with weight decay 1e-4 at lr 1e-5 (whole,
batch 1) and 1e-6 (patches, batch 4), the -60..140 HU window scaled to [0, 1], and each stage
starting from the previous stage's best checkpoint by validation tumour Dice. Sized for one
accelerator of about 40 GB or more (the train step's memory: docs/3d_convolutions.md); bfloat16
compute.

  curriculum-seg train --config configs/lits_three_stage_3d.py \
      --config.data.lits_dir=gs://BUCKET/lits --config.data.tfds_dir=gs://BUCKET/tfds \
      --workdir gs://BUCKET/runs/three_stage_3d

`:REGIME` gives the same ablations as configs/lits_three_stage.py at the same total steps.
"""

import ml_collections

from configs import common, lits_three_stage

REGIMES = common.REGIME_NAMES
TOTAL_STEPS = 60_000
BLOCK = (64, 256, 256)
PATCH = (64, 192, 192)


def whole_stage(steps, init="best"):
  return common.stage("whole", steps=steps, batch_size=1, learning_rate=1e-5, init=init,
                      schedule="constant", log_every=100, eval_every=2_000,
                      checkpoint_every=1_000, block_size=BLOCK, tumour_fraction=0.5)


def patch_stage(steps, init="best"):
  return common.stage("patch", steps=steps, batch_size=4, learning_rate=1e-6, init=init,
                      schedule="constant", patch_size=PATCH, positive_fraction=0.7,
                      patch_jitter=8, log_every=100, eval_every=2_000, checkpoint_every=1_000)


def get_config(arg=None):
  """`arg` names a regime (default 'three_stage')."""
  regime = arg or "three_stage"
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}: configs/lits_three_stage_3d.py:REGIME takes "
                     f"one of {', '.join(REGIMES)}")
  config = lits_three_stage.get_config("whole_only")  # the data's folders, splits, augmentation
  config.data.context_slices = 1                     # 3-D: neighbouring slices are the depth
  config.data.spacing_mm = (1.0, 1.0, 1.0)
  config.data.normalisation = "window"               # the authors' -60..140 HU
  config.augment.flip_depth = 0.5
  config.model = common.model(depth=4, base_width=8, norm="instance", block="residual",
                              task="tumour", compute_dtype="bfloat16", spatial_dims=3)
  config.loss = common.loss("dice")                  # tumour against everything else
  config.eval = ml_collections.ConfigDict(dict(batch_size=2, window=BLOCK, overlap=0.5,
                                               val_overlap=0.25, sigma_scale=0.125))
  config = common.set_regime(config, regime, whole_stage, patch_stage, TOTAL_STEPS,
                             "configs/lits_three_stage_3d.py")
  for name in config.curriculum:  # the authors hand on each stage's best checkpoint
    if config.stages[name].init == "last":
      config.stages[name].init = "best"
  return config
