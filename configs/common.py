"""Building blocks shared by the experiment configs: a stage, a model, the data section.

A curriculum is `config.curriculum` (stage names in order) plus `config.stages.<name>`, each a
ConfigDict of the fields below, so every field of every stage can be overridden on the command
line, e.g. `--config.stages.patch.steps=500 --config.stages.patch.optimizer.learning_rate=1e-4`.
"""

import ml_collections

from data_pipelines import settings

REGIME_NAMES = ("three_stage", "whole_only", "whole_patch", "patch_whole")


def stage(pipeline, steps, batch_size, learning_rate, *, init="best", carry_optimizer=False,
          optimizer="adam", weight_decay=1e-4, schedule="constant", warmup_steps=0,
          patch_size=64, positive_fraction=0.7, component_sampling="component", patch_jitter=8,
          log_every=10, eval_every=50, checkpoint_every=50, crop_size=None, crop_margin=None,
          model=None, tumour_fraction=0.0, block_size=None, block_sampling="slice"):
  """One stage of a curriculum.

  Args:
    pipeline: 'whole' (whole slices), 'patch' (tumour-centred patches) or 'liver_crop' (the
      cascade's tumour network: liver-range slices cropped to the case's liver box widened by
      `crop_margin` stored pixels and resized to `crop_size`; see data_pipelines/crops.py).
    steps: optimiser steps in this stage.
    batch_size: global batch size (divisible by the number of processes).
    learning_rate: peak learning rate of the stage's schedule.
    init: how the stage starts: 'scratch', or from the previous stage's 'best' (by validation
      tumour Dice) or 'last' checkpoint. The first stage always starts from scratch.
    carry_optimizer: keep the previous stage's optimiser state (moments) instead of a fresh one;
      needs the same optimiser type. The schedule always restarts.
    eval_every, checkpoint_every, log_every: intervals in steps (0 = only at the stage's end).
    crop_size, crop_margin: the 'liver_crop' pipeline's output size and box margin (fields
      present only on such stages).
    tumour_fraction: 'whole' and 'liver_crop' stages: the share of every global batch filled
      with tumour-bearing slices (the rest drawn uniformly from the selected slices); 0 draws
      every row uniformly. The paper's blocks held tumour in about 61 % of cases; nnU-Net forces
      foreground into a third of each batch.
    block_size: 'whole' stages: train on blocks of this many pixels a side, placed on liver
      (and on tumour in tumour_fraction of the rows), instead of whole slices; required when
      slices differ in size (data.spacing_mm). None: whole slices.
    block_sampling: how a block's tumour rows are drawn: 'slice' (epoch-wise over tumour
      slices, as whole slices) or 'component' (each 3-D tumour component equally likely).
    model: overrides of `config.model` fields for this stage's network, e.g.
      dict(task='liver') (field present only when given). A stage whose network differs from
      the previous stage's must start from scratch.
  """
  s = ml_collections.ConfigDict()
  s.pipeline = pipeline
  s.steps = steps
  s.batch_size = batch_size
  s.init = init
  s.carry_optimizer = carry_optimizer
  s.optimizer = ml_collections.ConfigDict(dict(
      name=optimizer, learning_rate=learning_rate, weight_decay=weight_decay, b1=0.9, b2=0.999,
      eps=1e-8, momentum=0.9, nesterov=True, grad_clip_norm=1.0))
  s.schedule = ml_collections.ConfigDict(dict(
      name=schedule, warmup_steps=warmup_steps, end_factor=0.0, power=0.9))
  s.patch_size = patch_size
  s.positive_fraction = positive_fraction
  s.component_sampling = component_sampling
  s.patch_jitter = patch_jitter
  s.log_every = log_every
  s.eval_every = eval_every
  s.checkpoint_every = checkpoint_every
  if pipeline in ("whole", "liver_crop"):
    s.tumour_fraction = tumour_fraction
  if pipeline == "whole":
    s.block_size = block_size
    s.block_sampling = block_sampling
  if pipeline == "liver_crop":
    s.crop_size = crop_size
    s.crop_margin = 0 if crop_margin is None else crop_margin
  if model:
    s.model = ml_collections.ConfigDict(dict(model))
  return s


def model(depth=4, base_width=16, width_multiplier=2.0, norm="instance", block="residual",
          dropout=0.0, task="tumour", compute_dtype="float32", group_norm_groups=8,
          downsample="maxpool", convs_per_level=2, skip="concat", input_stride=1,
          foreground_prior=None, spatial_dims=2):
  """A U-Net, 2-D by default (the paper's authors: 3-D, residual blocks, instance norm, widths
  8..128, i.e. model(depth=4, base_width=8, spatial_dims=3)).

  The defaults of the last six fields build the original network. Cheaper variants (see
  curriculum_seg/models/unet.py): downsample='strided' (stride-2 convs instead of max-pool, as
  MONAI's UNet), convs_per_level=1 (one 3x3 conv per block instead of two), skip='add' (skips
  added instead of concatenated), input_stride=2 (every level at half resolution, a
  transposed-conv head; inputs must then be multiples of 2**(depth + 1)). foreground_prior
  (e.g. 0.01) starts the softmax foreground probability there instead of 1/classes.
  spatial_dims=3 makes every layer 3-D: inputs [batch, depth, height, width, channels], every
  spatial size a multiple of input_stride * 2**depth.
  """
  return ml_collections.ConfigDict(dict(
      name="unet", depth=depth, base_width=base_width, width_multiplier=width_multiplier,
      norm=norm, group_norm_groups=group_norm_groups, dropout=dropout, block=block, task=task,
      compute_dtype=compute_dtype, downsample=downsample, convs_per_level=convs_per_level,
      skip=skip, input_stride=input_stride, foreground_prior=foreground_prior,
      spatial_dims=spatial_dims))


def loss(name="dice", dice_smooth=1.0, class_weights=None, dice_weight=1.0, ce_weight=1.0):
  """The paper's loss: soft Dice of tumour vs everything else.

  name='dice_ce' is nnU-Net's and MONAI's Dice + cross-entropy: dice_weight * (batch-global soft
  Dice loss of the task's foreground) + ce_weight * (pixel cross-entropy, `class_weights`
  optional). dice_smooth is added to the Dice's numerator and denominator (nnU-Net and MONAI use
  1e-5; the paper's loss here uses 1).
  """
  return ml_collections.ConfigDict(dict(name=name, dice_smooth=dice_smooth,
                                        class_weights=class_weights, dice_weight=dice_weight,
                                        ce_weight=ce_weight))


def augment(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0, scale_range=(0.85, 1.15),
            intensity_shift=0.05, intensity_scale=0.05, lesion_scale=(1.0, 1.0),
            lesion_invert=0.0, on_device=True, flip_depth=0.0):
  """Joint image/label augmentation (nnU-Net-like magnitudes); intensities in window units.

  lesion_scale / lesion_invert: label-guided lesion contrast (data_pipelines/augment.py): a
  tumour's difference from the liver's mean HU is scaled by |f| in lesion_scale, negated with
  probability lesion_invert; (1, 1) and 0 leave lesions as they are. flip_depth: probability
  of mirroring a 3-D block's slices.
  """
  return ml_collections.ConfigDict(dict(
      enabled=enabled, flip_lr=flip_lr, flip_ud=flip_ud, rotate_deg=rotate_deg,
      scale_range=scale_range, intensity_shift=intensity_shift,
      intensity_scale=intensity_scale, lesion_scale=lesion_scale, lesion_invert=lesion_invert,
      on_device=on_device, flip_depth=flip_depth))


def add_input_settings(data, spacing_mm=None, normalisation="window"):
  """The pipelines' settings, as the paper uses them, on a config's `data` section.

  `spacing_mm` (millimetres a pixel in plane, e.g. (1.0, 1.0)): slices resampled to a target
  spacing instead of to `data.image_size` pixels. `normalisation`: 'window' (the paper: clip to
  hu_window, scale to [0, 1]) or 'ct_foreground' (nnU-Net: the training foreground's 0.5-99.5
  percentiles, then its mean and standard deviation; data_pipelines/intensity.py).
  """
  data.spacing_mm = spacing_mm
  data.normalisation = normalisation
  data.hu_window = settings.DEFAULT_HU_WINDOW  # the paper's -60..140 HU
  data.slice_selection = "liver"            # liver z-range +- margin ("all": every slice)
  data.liver_margin = 10                    # slices, as the paper
  # How batches are made (Grain; none of these changes a batch, see data_pipelines/stream.py):
  data.worker_count = 0                     # Grain worker processes (0: the training process)
  data.host_threads = 0                     # read threads per process that makes batches
                                            # (0: the available cores over the processes)
  data.prefetch_batches = 0                 # batches each such process makes ahead (0: auto)
  # How the dataset is prepared (the same dataset for any value):
  data.prepare_workers = 0                  # processes writing cases (0: the available cores)
  return data


def set_regime(config, regime, whole_stage, patch_stage, total_steps, config_file):
  """Sets `config.curriculum` and `config.stages` for one of the authors' ablations, each at
  `total_steps` optimiser steps in all: three_stage (whole1 -> patch -> whole2, a third each),
  whole_only, whole_patch and patch_whole (half each). `whole_stage(steps, init)` and
  `patch_stage(steps, init)` build the config's stages. The first stage starts from scratch; a
  patch stage after a whole stage starts from that stage's best checkpoint; a whole stage after
  a patch stage starts from the patch stage's last checkpoint, as the paper retrains the
  patch-trained network on whole slices. (Chosen by whole-slice validation Dice, the patch
  stage's best is almost always its step 0, the weights it started from: patch training
  over-segments whole slices until whole2 adapts it, so 'best' there would skip the patch stage
  and make three_stage whole-slice training with idle steps.)"""
  third, half = total_steps // 3, total_steps // 2
  stages = {
      "three_stage": (("whole1", whole_stage(third, "scratch")),
                      ("patch", patch_stage(third, "best")),
                      ("whole2", whole_stage(total_steps - 2 * third, "last"))),
      "whole_only": (("whole", whole_stage(total_steps, "scratch")),),
      "whole_patch": (("whole1", whole_stage(half, "scratch")),
                      ("patch", patch_stage(total_steps - half, "best"))),
      "patch_whole": (("patch", patch_stage(half, "scratch")),
                      ("whole2", whole_stage(total_steps - half, "last"))),
  }
  if regime not in stages:
    raise ValueError(f"unknown regime {regime!r}: {config_file}:REGIME takes one of "
                     f"{', '.join(REGIME_NAMES)}")
  config.curriculum = tuple(name for name, _ in stages[regime])
  config.stages = ml_collections.ConfigDict({name: s for name, s in stages[regime]})
  return config
