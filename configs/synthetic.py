"""Embedded default: synthetic LiTS-format data, the three-stage curriculum, CPU minutes.

`curriculum-seg train --config configs/synthetic.py --workdir runs/synthetic`; any field can be
overridden (`--config.data.synthetic.num_cases=20`). `configs/synthetic.py:REGIME` picks the
curriculum, every regime at the same total of optimiser steps on the same data and network:

  three_stage  (default) whole1 -> patch -> whole2, a third of the steps each
  whole_only   whole slices only (no curriculum)
  whole_patch  whole1 -> patch;   patch_whole  patch -> whole2
  cascade      a liver network, then a tumour network on liver crops (cascade_stages)
  pgps         whole-stage blocks growing 64 -> 96 -> 128 pixels, batch scaled to keep the
               pixels of a batch about constant (progressive growing of patch size, PGPS+)

The grid: cases synthesised at 256 pixels a slice (1.1-2 mm) and resampled to 1.5 mm a pixel,
so a 5 mm lesion covers about 9 pixels of its central slice; whole stages train on 128 x 128
blocks (192 mm) placed on liver, half of every batch on tumour; validation, evaluate and predict
use Gaussian sliding windows of the same size. docs/recipe.md says why each setting is what it
is, as measured on the validation cases.
"""

import ml_collections

from configs import common

REGIMES = common.REGIME_NAMES + ("cascade", "pgps")
# pgps: (block side, batch size) of its growing whole stages, pixels per batch about 128^2 x 8.
PGPS_BLOCKS = ((64, 32), (96, 14), (128, 8))
TOTAL_STEPS = 1800


BLOCK = (128, 128)  # whole-stage blocks: 192 mm at 1.5 mm a pixel, most of a liver


def whole_stage(steps, init="best", block=BLOCK, batch_size=8):
  return common.stage("whole", steps=steps, batch_size=batch_size, learning_rate=1e-3,
                      init=init, schedule="cosine", warmup_steps=50, tumour_fraction=0.5,
                      eval_every=300, checkpoint_every=100, block_size=block,
                      block_sampling="slice")


def patch_stage(steps, init="best"):
  return common.stage("patch", steps=steps, batch_size=16, learning_rate=3e-4, init=init,
                      schedule="cosine", warmup_steps=50, patch_size=64,
                      positive_fraction=0.7, eval_every=0, checkpoint_every=100)


def pgps_stages(total_steps=TOTAL_STEPS):
  """The pgps regime's stages: whole stages on growing blocks, each continuing the previous
  one's last weights and optimiser moments; one warm-up at the start and one cosine decay in
  the last, so the learning rate runs as in a single stage."""
  stages = []
  n = len(PGPS_BLOCKS)
  for k, (side, batch) in enumerate(PGPS_BLOCKS):
    steps = total_steps // n if k < n - 1 else total_steps - (n - 1) * (total_steps // n)
    stage = whole_stage(steps, "scratch" if k == 0 else "last", block=(side, side),
                        batch_size=batch)
    stage.carry_optimizer = k > 0
    stage.schedule.name = "cosine" if k == n - 1 else "constant"
    stage.schedule.warmup_steps = 50 if k == 0 else 0
    stages.append((f"grow{side}", stage))
  return stages


def cascade_stages(total_steps=TOTAL_STEPS):
  """The cascade regime's stages (configs/synthetic_cascade.py says why each is so): a liver
  network on whole blocks, then a new tumour network on liver crops, half the steps each."""
  half = total_steps // 2
  return (
      ("liver", common.stage("whole", steps=half, batch_size=8, learning_rate=1e-3,
                             init="scratch", schedule="cosine", warmup_steps=50, eval_every=100,
                             checkpoint_every=100, model=dict(task="liver"), block_size=BLOCK)),
      ("tumour", common.stage("liver_crop", steps=total_steps - half, batch_size=8,
                              learning_rate=1e-3, init="scratch", schedule="cosine",
                              warmup_steps=50, tumour_fraction=0.5, eval_every=100,
                              checkpoint_every=100, crop_size=128, crop_margin=8,
                              model=dict(task="tumour"))))


def set_regime(config, regime, total_steps=TOTAL_STEPS):
  """Sets config.curriculum and config.stages (and a cascade's config.cascade) for one of
  REGIMES."""
  if regime == "cascade":
    stages = cascade_stages(total_steps)
    config.curriculum = tuple(name for name, _ in stages)
    config.stages = ml_collections.ConfigDict(dict(stages))
    config.cascade = ml_collections.ConfigDict(dict(liver_stage="liver", tumour_stage="tumour"))
    return config
  if regime == "pgps":
    stages = pgps_stages(total_steps)
    config.curriculum = tuple(name for name, _ in stages)
    config.stages = ml_collections.ConfigDict(dict(stages))
    return config
  return common.set_regime(config, regime, whole_stage, patch_stage, total_steps,
                           "configs/synthetic.py")


def get_config(arg=None):
  """The embedded default config; `arg` names a regime (default 'three_stage')."""
  regime = arg or "three_stage"
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
  config.data.image_size = None                    # (a fixed slice size, before spacing_mm)
  config.data.val_fraction = 0.17                  # share of cases held out for validation
  config.data.test_fraction = 0.0
  config.data.split_seed = 0

  # Synthesised into data.lits_dir when that folder has no complete manifest.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.enabled = True
  config.data.synthetic.num_cases = 48
  config.data.synthetic.seed = 0
  config.data.synthetic.size = 256
  config.data.synthetic.slices = 48
  config.data.synthetic.max_tumours = 8
  config.data.synthetic.storage_variants = True

  # In-plane millimetres a pixel (LiTS: 0.56-1.0 mm; the authors resample to 1 mm).
  common.add_input_settings(config.data, spacing_mm=(1.5, 1.5), normalisation="ct_foreground")

  # Joint image/label augmentation, drawn on the host and applied on the device.
  config.augment = common.augment()

  config.model = common.model(depth=3, base_width=8, norm="instance", block="residual",
                              task="tumour", input_stride=1, foreground_prior=0.01)
  config.loss = common.loss("dice_ce", dice_smooth=1e-5, class_weights=(1.0, 10.0))
  # Validation, evaluate and predict: Gaussian sliding windows of the whole stages' blocks.
  config.eval = ml_collections.ConfigDict(dict(batch_size=32, window=BLOCK, overlap=0.5,
                                               val_overlap=0.0, sigma_scale=0.125))

  # The paper's curriculum (default): whole blocks, tumour patches, whole blocks again
  # (configs/common.py:set_regime says which checkpoint each stage starts from).
  return set_regime(config, regime)


# The ablation sweep (`curriculum-seg sweep --config configs/synthetic.py --out DIR`): every
# regime for every seed at one budget, scored on held-out cases. Edit these to change it.
SWEEP_REGIMES = ("three_stage", "whole_only", "whole_patch", "patch_whole", "cascade", "pgps")
SWEEP_SEEDS = (0, 1, 2, 3, 4)
SWEEP_STEPS = TOTAL_STEPS  # optimiser steps per run, every regime (spread over its stages)
SWEEP_REFERENCE = "three_stage"  # compared with every other regime
# Held-out cases: the same generator with another seed and up to 16 tumours a case (LiTS scans
# hold 0-12, some many more), so that every size bin holds 60 or more lesions.
SWEEP_HELD_OUT = dict(num_cases=64, seed=1, max_tumours=16)


def get_sweep(arg=None):
  """The regimes x seeds ablation (curriculum_seg/sweep.py reads it).

  `arg`: a comma-separated subset of SWEEP_REGIMES (default all of them). The runs train on this
  config's data, synthesised into the sweep's own folder (`{out}`: its --out) so the demo's
  stay as they are, and are scored on SWEEP_HELD_OUT. Runs go seed by seed, so partial results
  pair the regimes early.
  """
  regimes = tuple(r for r in arg.split(",") if r) if arg else SWEEP_REGIMES
  data = {"data.lits_dir": "{out}/data/lits", "data.tfds_dir": "{out}/data/tfds"}
  return dict(runs=[dict(regime=r, seed=s) for s in SWEEP_SEEDS for r in regimes],
              total_steps=SWEEP_STEPS, reference=SWEEP_REFERENCE, overrides=data,
              held_out=SWEEP_HELD_OUT)
