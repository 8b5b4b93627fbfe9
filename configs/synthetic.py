"""Embedded default: synthetic LiTS-format data, the three-stage curriculum, CPU minutes.

Run with `curriculum-seg train --config configs/synthetic.py --workdir runs/synthetic`; override
any field on the command line, e.g. `--config.data.synthetic.num_cases=20`.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  """The embedded default config. `arg` is unused (kept for the `file.py:arg` convention)."""
  del arg
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compilation_cache_dir = None  # None: ~/.cache/curriculum_seg/jax; "": no cache

  config.data = ml_collections.ConfigDict()
  config.data.lits_dir = "data/synthetic_lits"     # volume-N.nii[.gz] + segmentation-N.nii[.gz]
  config.data.tfds_dir = "data/tfds"               # where the prepared TFDS dataset lives
  config.data.file_format = "array_record"
  config.data.record_compression = "uncompressed"  # fast reads; "zstd:1" halves the disk         # random access: exact resume, per-host shards
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

  # The paper's curriculum: whole slices, tumour patches, whole slices again; each stage starts
  # from the previous stage's best checkpoint (by validation tumour Dice).
  config.curriculum = ("whole1", "patch", "whole2")
  config.stages = ml_collections.ConfigDict()
  config.stages.whole1 = common.stage("whole", steps=200, batch_size=8, learning_rate=1e-3,
                                      init="scratch", eval_every=50, checkpoint_every=50)
  config.stages.patch = common.stage("patch", steps=200, batch_size=16, learning_rate=3e-4,
                                     patch_size=64, positive_fraction=0.7, eval_every=50,
                                     checkpoint_every=50)
  config.stages.whole2 = common.stage("whole", steps=200, batch_size=8, learning_rate=1e-3,
                                      eval_every=50, checkpoint_every=50)
  return config
