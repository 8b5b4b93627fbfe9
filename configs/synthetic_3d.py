"""The three-stage curriculum in 3-D on synthetic LiTS-format data, sized for a 2-core CPU.

`curriculum-seg train --config configs/synthetic_3d.py --workdir runs/synthetic_3d`. The same
curriculum and regimes as configs/synthetic.py (`:REGIME`), with a 3-D U-Net (residual blocks,
instance norm, 2x2x2 transposed up-convolutions, widths 8-16-32-64) on cases resampled to 3 mm
voxels: whole stages on 24 x 64 x 64 blocks (72 x 192 x 192 mm) placed on liver, half of them on
tumour; the patch stage on 16 x 48 x 48 patches centred on tumour components; validation,
evaluate and predict by 3-D Gaussian sliding windows of the block's size. The cases are
synthesised with thinner slices than the 2-D default's, so that resampling to 3 mm keeps the
scan's z extent. configs/lits_three_stage_3d.py is the authors' setting on LiTS.
"""

import ml_collections

from configs import common, synthetic

REGIMES = common.REGIME_NAMES
TOTAL_STEPS = 600
BLOCK = (24, 64, 64)
PATCH = (16, 48, 48)


def whole_stage(steps, init="best"):
  return common.stage("whole", steps=steps, batch_size=2, learning_rate=1e-3, init=init,
                      schedule="cosine", warmup_steps=30, tumour_fraction=0.5,
                      eval_every=100, checkpoint_every=50, block_size=BLOCK, log_every=10)


def patch_stage(steps, init="best"):
  return common.stage("patch", steps=steps, batch_size=4, learning_rate=3e-4, init=init,
                      schedule="cosine", warmup_steps=30, patch_size=PATCH,
                      positive_fraction=0.7, patch_jitter=4, eval_every=0,
                      checkpoint_every=50, log_every=10)


def get_config(arg=None):
  """`arg` names a regime (default 'three_stage')."""
  regime = arg or "three_stage"
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}: configs/synthetic_3d.py:REGIME takes one of "
                     f"{', '.join(REGIMES)}")
  config = synthetic.get_config("whole_only")  # data, loss and augmentation as the 2-D default
  config.data.lits_dir = "data/synthetic_lits_3d"
  config.data.context_slices = 1               # 3-D: neighbouring slices are the depth axis
  config.data.spacing_mm = (3.0, 3.0, 3.0)
  config.data.synthetic.num_cases = 24
  config.data.synthetic.slices = 96            # 1.7-4.2 mm apart before resampling
  config.data.val_fraction = 0.25
  config.augment.flip_depth = 0.5
  config.model = common.model(depth=3, base_width=8, norm="instance", block="residual",
                              task="tumour", foreground_prior=0.01, spatial_dims=3)
  config.eval = ml_collections.ConfigDict(dict(batch_size=4, window=BLOCK, overlap=0.5,
                                               val_overlap=0.0, sigma_scale=0.125))
  return common.set_regime(config, regime, whole_stage, patch_stage, TOTAL_STEPS,
                           "configs/synthetic_3d.py")
