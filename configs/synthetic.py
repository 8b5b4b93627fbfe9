"""Embedded default: synthetic LiTS-format data, the three-stage curriculum, CPU minutes.

Run with `curriculum-seg train --config configs/synthetic.py --workdir runs/synthetic`; override
any field on the command line, e.g. `--config.data.synthetic.num_cases=20`.

`configs/synthetic.py:REGIME` picks the curriculum; every regime trains the same network on the
same data for the same total of 600 optimiser steps (the authors' ablations, issue 7):

  three_stage  (default) whole1 200 -> patch 200 -> whole2 200
  whole_only   whole 600 (no curriculum)
  whole_patch  whole1 300 -> patch 300
  patch_whole  patch 300 -> whole2 300 (the first stage starts from scratch)
  cascade      liver network 300 (whole slices, task 'liver') + tumour network 300 on liver
               crops (configs/synthetic_cascade.py)

Each later stage starts from the previous stage's best checkpoint (by validation tumour Dice);
whole stages use batch 8 at lr 1e-3, patch stages batch 16 of 64x64 patches at lr 3e-4.
"""

import ml_collections

from configs import common

REGIMES = common.REGIME_NAMES + ("cascade",)
TOTAL_STEPS = 600


def whole_stage(steps, init="best"):
  return common.stage("whole", steps=steps, batch_size=8, learning_rate=1e-3, init=init,
                      eval_every=50, checkpoint_every=50)


def patch_stage(steps, init="best"):
  return common.stage("patch", steps=steps, batch_size=16, learning_rate=3e-4, init=init,
                      patch_size=64, positive_fraction=0.7, eval_every=50,
                      checkpoint_every=50)


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
  config.data.val_fraction = 0.25                  # share of cases held out for validation
  config.data.test_fraction = 0.0
  config.data.split_seed = 0

  # Synthesised into data.lits_dir when that folder has no complete manifest.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.enabled = True
  config.data.synthetic.num_cases = 12
  config.data.synthetic.seed = 0
  config.data.synthetic.size = 128
  config.data.synthetic.slices = 48
  config.data.synthetic.max_tumours = 8
  config.data.synthetic.storage_variants = True

  common.add_input_settings(config.data)          # HU window, slice selection, host threads

  # Joint image/label augmentation, drawn on the host and applied on the device.
  config.augment = common.augment()

  config.model = common.model(depth=3, base_width=8, norm="instance", block="residual",
                              task="tumour")
  config.loss = common.loss("dice")
  config.eval = ml_collections.ConfigDict(dict(batch_size=32))

  # The paper's curriculum (default): whole slices, tumour patches, whole slices again; each
  # stage starts from the previous stage's best checkpoint (by validation tumour Dice).
  return set_regime(config, regime)
