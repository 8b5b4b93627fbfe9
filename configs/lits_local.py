"""The three-stage curriculum on your own LiTS folder, sized for one GPU or a workstation.

The recipe of configs/lits_three_stage.py (its stages, model, loss and augmentation) with the
data on local disk and batches that fit one 24 GB GPU (whole slices 16, patches 64; bfloat16).
`data.lits_dir` has no default: it is your folder of `volume-N.nii[.gz]` and
`segmentation-N.nii[.gz]`, which the tool only reads. The prepared dataset goes to
`data.tfds_dir` (default ~/tensorflow_datasets, as TFDS's own default).

  curriculum-seg check   --config configs/lits_local.py --config.data.lits_dir=/data/lits
  curriculum-seg prepare --config configs/lits_local.py --config.data.lits_dir=/data/lits
  curriculum-seg train   --config configs/lits_local.py --config.data.lits_dir=/data/lits \
      --workdir runs/lits_local

`configs/lits_local.py:REGIME` takes the regimes of configs/lits_three_stage.py (three_stage,
whole_only, whole_patch, patch_whole). On a GPU with less memory lower the batches
(--config.stages.whole1.batch_size=8 ...); on a CPU-only machine use
--config.model.compute_dtype=float32.
"""

from configs import lits_three_stage

REGIMES = lits_three_stage.REGIMES
BATCH_SIZES = {"whole": 32, "patch": 64}  # blocks of 256 x 256, patches of 128 x 128 at 1 mm


def get_config(arg=None):
  """`arg` names a regime (default 'three_stage')."""
  regime = arg or "three_stage"
  if regime not in REGIMES:
    raise ValueError(f"unknown regime {regime!r}: configs/lits_local.py:REGIME takes one of "
                     f"{', '.join(REGIMES)}")
  config = lits_three_stage.get_config(regime)
  config.data.lits_dir = ""  # required: --config.data.lits_dir=YOUR_FOLDER
  config.data.tfds_dir = "~/tensorflow_datasets"
  config.eval.batch_size = BATCH_SIZES["whole"]
  for name in config.curriculum:
    stage = config.stages[name]
    stage.batch_size = BATCH_SIZES[stage.pipeline]
  return config
