"""Embedded default: synthetic LiTS-format data, the three-stage curriculum, CPU minutes.

Run with `curriculum-seg train --config configs/synthetic.py --workdir runs/synthetic`; override
any field on the command line, e.g. `--config.data.synthetic.num_cases=20`.

`configs/synthetic.py:REGIME` picks the curriculum; every regime trains the same network on the
same data for the same total of 1,200 optimiser steps (the authors' ablations, issue 7):

  three_stage  (default) whole1 400 -> patch 400 -> whole2 400
  whole_only   whole 1200 (no curriculum)
  whole_patch  whole1 600 -> patch 600
  patch_whole  patch 600 -> whole2 600 (the first stage starts from scratch)
  cascade      liver network + tumour network on liver crops (configs/synthetic_cascade.py)

The training recipe (issue 13, chosen on validation data; README "Training recipe"):
  - whole stages fill half of every batch with tumour-bearing slices (tumour_fraction 0.5);
    whole slices stay whole;
  - loss: Dice + cross-entropy (nnU-Net, MONAI) with Dice smoothing 1e-5 and the tumour class
    weighted 10 in the cross-entropy; the paper's plain soft Dice is
    `--config.loss.name=dice --config.loss.dice_smooth=1`;
  - Adam with 50 warm-up steps and a cosine decay per stage, gradient clipping at norm 1;
  - the full-resolution U-Net (input_stride 1) with the head's bias at a 1 % foreground prior.
    The half-resolution variant (`--config.model.input_stride=2`, MONAI's layout: 3.7 instead
    of 15 GFLOP per 16x128x128 step) runs about twice the steps per second but plateaus near
    validation Dice 0.7 where this one passes 0.8, and the small lesions it should find are
    3-20 voxels (benchmarks/learning.py, README "Learning curves").
A patch stage starts from the previous stage's best checkpoint (by validation tumour Dice), its
starting point included (evaluated at its step 0); whole2 retrains the patch stage's last
weights on whole slices, as the paper does (configs/common.py:set_regime says why not its best),
and hands out its best, step 0 included. Whole stages use batch 8 at lr 1e-3,
the patch stage batch 16 of 64x64 patches at lr 3e-4.
The data: 14 cases, 4 held out for validation (15 lesions, 11 of them 10 mm or larger, as
`curriculum-seg evaluate` measures them), so the
demo's lesion recall is measured on more than a handful of lesions.
"""

import ml_collections

from configs import common

REGIMES = common.REGIME_NAMES + ("cascade",)
TOTAL_STEPS = 1200


def whole_stage(steps, init="best"):
  return common.stage("whole", steps=steps, batch_size=8, learning_rate=1e-3, init=init,
                      schedule="cosine", warmup_steps=50, tumour_fraction=0.5,
                      eval_every=100, checkpoint_every=100)


def patch_stage(steps, init="best"):
  return common.stage("patch", steps=steps, batch_size=16, learning_rate=3e-4, init=init,
                      schedule="cosine", warmup_steps=50, patch_size=64,
                      positive_fraction=0.7, eval_every=100, checkpoint_every=100)


def set_regime(config, regime, total_steps=TOTAL_STEPS):
  """Sets config.curriculum and config.stages for one of REGIMES (except 'cascade')."""
  return common.set_regime(config, regime, whole_stage, patch_stage, total_steps,
                           "configs/synthetic.py")


def get_config(arg=None):
  """The embedded default config; `arg` names a regime (default 'three_stage')."""
  regime = arg or "three_stage"
  if regime == "cascade":
    from configs import synthetic_cascade  # pylint: disable=g-import-not-at-top
    return synthetic_cascade.get_config()
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}: configs/synthetic.py:REGIME takes one of "
                     f"{', '.join(REGIMES)}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compilation_cache_dir = None  # None: ~/.cache/curriculum_seg/jax; "": no cache

  config.data = ml_collections.ConfigDict()
  config.data.lits_dir = "data/synthetic_lits"     # volume-N.nii[.gz] + segmentation-N.nii[.gz]
  config.data.tfds_dir = "data/tfds"               # where the prepared TFDS dataset lives
  config.data.file_format = "array_record"
  config.data.record_compression = "uncompressed"  # fast reads; "zstd:1" halves the disk
  config.data.context_slices = 3                   # slices stacked as channels (odd)
  config.data.image_size = 128                     # in-plane size slices are resampled to
  config.data.val_fraction = 0.3                   # share of cases held out for validation
  config.data.test_fraction = 0.0
  config.data.split_seed = 0

  # Synthesised into data.lits_dir when that folder has no complete manifest.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.enabled = True
  config.data.synthetic.num_cases = 14
  config.data.synthetic.seed = 0
  config.data.synthetic.size = 128
  config.data.synthetic.slices = 48
  config.data.synthetic.max_tumours = 8
  config.data.synthetic.storage_variants = True

  common.add_input_settings(config.data)          # HU window, slice selection, host threads

  # Joint image/label augmentation, drawn on the host and applied on the device.
  config.augment = common.augment()

  config.model = common.model(depth=3, base_width=8, norm="instance", block="residual",
                              task="tumour", input_stride=1, foreground_prior=0.01)
  config.loss = common.loss("dice_ce", dice_smooth=1e-5, class_weights=(1.0, 10.0))
  config.eval = ml_collections.ConfigDict(dict(batch_size=32))

  # The paper's curriculum (default): whole slices, tumour patches, whole slices again; each
  # stage starts from the previous stage's best checkpoint (by validation tumour Dice).
  return set_regime(config, regime)


# The ablation sweep (`curriculum-seg sweep --config configs/synthetic.py --out DIR`): every
# regime for every seed at one budget, scored on held-out test cases. Edit these to change it.
SWEEP_REGIMES = ("three_stage", "whole_only", "whole_patch", "patch_whole", "cascade")
SWEEP_SEEDS = (0, 1, 2, 3, 4)
SWEEP_STEPS = 1200  # optimiser steps per run, every regime (spread over its stages)
SWEEP_REFERENCE = "three_stage"  # compared with every other regime
SWEEP_CASES = dict(train=10, validation=4, test=40)  # cases per split of the sweep's data


def get_sweep(arg=None):
  """The regimes x seeds ablation (curriculum_seg/sweep.py reads it).

  `arg`: a comma-separated subset of SWEEP_REGIMES (default all of them). The data are this
  config's generator and settings with SWEEP_CASES cases per split, synthesised into the sweep's
  own folder (`{out}`: its --out), so the demo's data stay as they are; the test split scores
  the runs. Runs go seed by seed, so partial results pair the regimes early.
  """
  regimes = tuple(r for r in arg.split(",") if r) if arg else SWEEP_REGIMES
  cases = sum(SWEEP_CASES.values())
  data = {"data.lits_dir": "{out}/data/lits", "data.tfds_dir": "{out}/data/tfds",
          "data.synthetic.num_cases": cases,
          "data.val_fraction": SWEEP_CASES["validation"] / cases,
          "data.test_fraction": SWEEP_CASES["test"] / cases}
  return dict(runs=[dict(regime=r, seed=s) for s in SWEEP_SEEDS for r in regimes],
              total_steps=SWEEP_STEPS, reference=SWEEP_REFERENCE, overrides=data)
