"""The paper's three-stage curriculum on LiTS 2017 in 2-D, sized for a Cloud TPU (v4-8 / v5e-8).

whole blocks -> tumour-centred patches -> whole blocks (Li et al., arXiv 1910.07895): slices
resampled to the authors' 1 mm in plane, whole stages on 256 x 256 blocks placed on liver
(half of every batch on tumour), patches of 128 x 128 on tumour components, Gaussian sliding
windows of 256 for validation and inference; inputs normalised as nnU-Net does CT (the
training foreground's 0.5-99.5 percentiles, then its mean and spread;
--config.data.normalisation=window gives the authors' -60..140 HU).

Deviations from the authors' code, which trains a 3-D residual U-Net on 64x256x256 blocks with
Adam at lr 1e-5 (whole) and 1e-6 (patches; configs/lits_three_stage_3d.py): this is the 2-D
version (3 adjacent slices as channels), so it keeps the authors' 10:1 whole/patch learning-rate
ratio at magnitudes that train a 2-D U-Net from scratch in tens of thousands of steps.

  curriculum-seg train --config configs/lits_three_stage.py \
      --config.data.lits_dir=gs://BUCKET/lits --config.data.tfds_dir=gs://BUCKET/tfds \
      --workdir gs://BUCKET/runs/three_stage

`configs/lits_three_stage.py:REGIME` gives the authors' ablations at the same 60,000 total steps:
three_stage (default: 20k + 20k + 20k), whole_only (60k; = configs/lits_whole_only.py),
whole_patch (30k + 30k), patch_whole (30k + 30k); configs/lits_cascade.py is the cascade.
"""

import ml_collections

from configs import common

REGIMES = common.REGIME_NAMES
TOTAL_STEPS = 60_000


BLOCK = (256, 256)  # 256 mm at 1 mm a pixel, as the authors' blocks


def whole_stage(steps, init="best"):
  return common.stage("whole", steps=steps, batch_size=64, learning_rate=1e-4, init=init,
                      schedule="cosine", warmup_steps=500, log_every=100, eval_every=1_000,
                      checkpoint_every=1_000, block_size=BLOCK, tumour_fraction=0.5)


def patch_stage(steps, init="best"):
  return common.stage("patch", steps=steps, batch_size=256, learning_rate=1e-5, init=init,
                      patch_size=128, positive_fraction=0.7, patch_jitter=16,
                      schedule="cosine", log_every=100, eval_every=1_000,
                      checkpoint_every=1_000)


def set_regime(config, regime, total_steps=TOTAL_STEPS):
  """Sets config.curriculum and config.stages for one of REGIMES."""
  return common.set_regime(config, regime, whole_stage, patch_stage, total_steps,
                           "configs/lits_three_stage.py")


def get_config(arg=None):
  """`arg` names a regime (default 'three_stage')."""
  regime = arg or "three_stage"
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}: configs/lits_three_stage.py:REGIME takes one "
                     f"of {', '.join(REGIMES)}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.compilation_cache_dir = None  # None: ~/.cache/curriculum_seg/jax; "": no cache

  config.data = ml_collections.ConfigDict()
  config.data.lits_dir = "gs://YOUR_BUCKET/lits"      # volume-N.nii + segmentation-N.nii
  config.data.tfds_dir = "gs://YOUR_BUCKET/tfds"
  config.data.file_format = "array_record"
  config.data.record_compression = "uncompressed"  # fast reads; "zstd:1" halves the disk
  config.data.context_slices = 3
  config.data.image_size = None                       # (a fixed slice size, before spacing_mm)
  config.data.val_fraction = 0.15                     # 20 of 131 cases
  config.data.test_fraction = 0.0
  config.data.split_seed = 0
  config.data.synthetic = ml_collections.ConfigDict(dict(
      enabled=False, num_cases=0, seed=0, size=512, slices=128, max_tumours=8,
      storage_variants=True))

  common.add_input_settings(config.data, spacing_mm=(1.0, 1.0), normalisation="ct_foreground")
  # Grain worker processes: the README's estimate for a v5e-8 host ("Input pipelines (Grain)")
  # is --config.data.worker_count=96 --config.data.host_threads=1
  # --config.data.prefetch_batches=1; the default makes batches in the training process.

  # Joint image/label augmentation, drawn on the host and applied on the device.
  config.augment = common.augment()

  config.model = common.model(depth=5, base_width=32, norm="instance", block="residual",
                              task="tumour", compute_dtype="bfloat16")
  config.loss = common.loss("dice")
  config.eval = ml_collections.ConfigDict(dict(batch_size=64, window=BLOCK, overlap=0.5,
                                               val_overlap=0.25, sigma_scale=0.125))

  return set_regime(config, regime)


# The ablation sweep (`curriculum-seg sweep --config configs/lits_three_stage.py --out DIR
# --config.data.lits_dir=... --config.data.tfds_dir=...`): the regimes above and the cascade
# (configs/lits_cascade.py) for every seed at TOTAL_STEPS, scored on a held-out test split.
SWEEP_REGIMES = REGIMES + ("cascade",)
SWEEP_SEEDS = (0, 1, 2)
SWEEP_STEPS = TOTAL_STEPS
SWEEP_REFERENCE = "three_stage"
SWEEP_TEST_FRACTION = 0.15  # 20 of LiTS's 131 training cases held out (its test set has no labels)


def get_sweep(arg=None):
  """The regimes x seeds ablation on LiTS; `arg`: a comma-separated subset of SWEEP_REGIMES."""
  regimes = tuple(r for r in arg.split(",") if r) if arg else SWEEP_REGIMES
  runs = [dict(regime=r, seed=s, **(dict(config="lits_cascade.py") if r == "cascade" else {}))
          for s in SWEEP_SEEDS for r in regimes]
  return dict(runs=runs, total_steps=SWEEP_STEPS, reference=SWEEP_REFERENCE,
              overrides={"data.test_fraction": SWEEP_TEST_FRACTION})
