"""A curriculum as its config says it: the stages, their networks and inputs, the checks, and
which checkpoint each stage hands on.

A stage keeps two checkpoints (`curriculum_seg.checkpoints`): its latest ('latest' on disk, the
checkpoint a config's `init='last'` names) and its best by validation Dice ('best'). The taker of
a stage's weights is the next stage, which asks for what its `init` says ('scratch' takes
nothing), and for the curriculum's last stage evaluate and predict, which ask for the best: the
checkpoint the run hands out. A stage hands on its best when the taker asks for the best and one
was saved, else its latest (`handed_on`): the controller, inference and inspect all use this.
"""

from __future__ import annotations

import json
from typing import Optional

import ml_collections
from etils import epath

from curriculum_seg import checkpoints as ckpt_lib
from curriculum_seg import tasks
from data_pipelines import pipelines

PIPELINES = pipelines.PIPELINES  # 'whole', 'patch', 'liver_crop'
INITS = ("scratch", "best", "last")  # stage.init: 'last' is the stage's LATEST checkpoint
HANDS_OUT = "best"  # what evaluate and predict ask of a run's last stage


class StageError(RuntimeError):
  """A curriculum that cannot run as configured (the message names the config key)."""


def taker_wants(config: ml_collections.ConfigDict, name: str) -> Optional[str]:
  """What the taker of stage `name`'s weights asks for: the next stage's `init` ('best' or
  'last'; None for 'scratch'), or HANDS_OUT for the last stage."""
  names = list(config.curriculum)
  index = names.index(name)
  if index + 1 == len(names):
    return HANDS_OUT
  init = config.stages[names[index + 1]].init
  return None if init == "scratch" else init


def handed_on(wants: Optional[str], has_best: bool) -> str:
  """The checkpoint a stage hands on (ckpt_lib.BEST or LATEST): its best when the taker `wants`
  'best' and a best was saved, else its latest."""
  return ckpt_lib.BEST if wants == "best" and has_best else ckpt_lib.LATEST


def stage_model_config(config: ml_collections.ConfigDict,
                       stage: str | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` with the stage's `model` overrides (if any) applied; `stage` is a stage
  name or a stage ConfigDict. Unknown override keys are a StageError."""
  if isinstance(stage, str):
    name, stage = stage, config.stages[stage]
  else:
    name = next((n for n in config.stages.keys() if config.stages[n] is stage), "<stage>")
  model = ml_collections.ConfigDict(config.model.to_dict())
  overrides = stage.get("model", None)
  if overrides:
    for key, value in overrides.items():
      if key not in model:
        raise StageError(f"config.stages.{name}.model.{key} is not a field of config.model "
                         f"(fields: {', '.join(model.keys())})")
      with model.ignore_type():
        model[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return model


def model_key(model_cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(model_cfg.to_dict(), sort_keys=True, default=str)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the curriculum part of a config, naming the offending key."""
  if not config.get("curriculum"):
    raise StageError("config.curriculum must name at least one stage")
  for name in config.curriculum:
    if name not in config.stages:
      raise StageError(f"config.curriculum names stage {name!r}, but config.stages has no such "
                       f"stage (stages: {', '.join(config.stages.keys())})")
  if len(set(config.curriculum)) != len(config.curriculum):
    raise StageError(f"config.curriculum repeats a stage name: {list(config.curriculum)}")
  for k, name in enumerate(config.curriculum):
    s = config.stages[name]
    key = f"config.stages.{name}"
    if s.pipeline not in PIPELINES:
      raise StageError(f"{key}.pipeline={s.pipeline!r} is not one of {list(PIPELINES)}")
    if s.init not in INITS:
      raise StageError(f"{key}.init={s.init!r} is not one of {list(INITS)}")
    if int(s.steps) < 1:
      raise StageError(f"{key}.steps={s.steps} must be >= 1")
    if int(s.batch_size) < 1:
      raise StageError(f"{key}.batch_size={s.batch_size} must be >= 1")
    for field in ("eval_every", "checkpoint_every", "log_every"):
      if int(s[field]) < 0:
        raise StageError(f"{key}.{field}={s[field]} must be >= 0")
    model = stage_model_config(config, name)
    if model.task not in tasks.TASKS:
      raise StageError(f"{key}.model.task (or config.model.task)={model.task!r} is not one of "
                       f"{list(tasks.TASKS)}")
    if s.pipeline == "patch" and model.task == "liver":
      raise StageError(f"{key}.pipeline='patch' (tumour-centred patches) cannot train a liver "
                       f"network (model.task='liver'): use pipeline='whole'")
    if k > 0:
      prev_name = config.curriculum[k - 1]
      prev = config.stages[prev_name]
      if s.init != "scratch" and model_key(model) != model_key(
          stage_model_config(config, prev_name)):
        raise StageError(
            f"{key}.init={s.init!r}: stage {name!r} trains a different network than stage "
            f"{prev_name!r} (config.stages.{name}.model differs), so it cannot start from "
            f"{prev_name!r}'s weights; set {key}.init='scratch'")
      if s.carry_optimizer and prev.optimizer.name != s.optimizer.name:
        raise StageError(f"{key}.carry_optimizer needs the previous stage's optimiser type, "
                         f"got {prev.optimizer.name!r} then {s.optimizer.name!r}")
  _validate_cascade(config)


def _validate_cascade(config: ml_collections.ConfigDict) -> None:
  """`config.cascade` (liver_stage, tumour_stage) names a liver stage and a liver-crop stage."""
  cascade = config.get("cascade", None)
  if not cascade:
    return
  for field in ("liver_stage", "tumour_stage"):
    name = cascade.get(field, None)
    if name not in config.curriculum:
      raise StageError(f"config.cascade.{field}={name!r} is not a stage of config.curriculum "
                       f"({', '.join(config.curriculum)})")
  liver, tumour = cascade.liver_stage, cascade.tumour_stage
  if stage_model_config(config, liver).task != "liver":
    raise StageError(f"config.cascade.liver_stage={liver!r} must train a liver network: set "
                     f"config.stages.{liver}.model.task='liver'")
  if config.stages[tumour].pipeline != "liver_crop":
    raise StageError(f"config.cascade.tumour_stage={tumour!r} must train on liver crops: set "
                     f"config.stages.{tumour}.pipeline='liver_crop'")
  if stage_model_config(config, tumour).task not in tasks.TUMOUR_TASKS:
    raise StageError(f"config.cascade.tumour_stage={tumour!r} must train a tumour network: "
                     f"config.stages.{tumour}.model.task must be one of {list(tasks.TUMOUR_TASKS)}")


def same_validation(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  """Whether two stages of one network are validated on the same view of the data (liver-crop
  stages on their crops, every other stage alike)."""
  if "liver_crop" not in (a.pipeline, b.pipeline):
    return True
  return (a.pipeline == b.pipeline and a.get("crop_size") == b.get("crop_size")
          and a.get("crop_margin") == b.get("crop_margin"))


def input_shape(config: ml_collections.ConfigDict,
                stage: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The spatial shape of a stage's inputs: its patch, crop or block shape ((rows, cols), or
  (slices, rows, cols) for 3-D), or the dataset's slice size (whole slices)."""
  if stage.pipeline == "patch":
    return pipelines.patch_shape(stage)
  if stage.pipeline == "liver_crop":
    size = pipelines.crop_settings(stage, config.data.get("image_size", None))[0]
    return (size, size)
  block = pipelines.block_size(stage)
  if block is not None:
    return block
  size = config.data.get("image_size", None)
  if size is None:
    raise StageError("a whole stage needs stage.block_size when data.spacing_mm is set")
  return (int(size), int(size))


def input_size(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict):
  """What the metrics log says of a stage's inputs: the side of its square inputs, or the
  [slices, rows, cols] of 3-D ones."""
  shape = input_shape(config, stage)
  return shape[-1] if len(shape) == 2 else list(shape)


def check_run_lengths(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Refuses steps that a run's finished stages cannot take: fewer than a finished stage
  trained, or more for a finished stage that a later stage already trained from (only the last
  trained stage can be extended). Raises StageError naming the key."""
  root = epath.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return
  names = list(config.curriculum)
  metas = {}
  for name in names:
    ckpts = ckpt_lib.StageCheckpoints(root, name, read_only=True)
    metas[name] = ckpts.meta()
    ckpts.close()
  for index, name in enumerate(names):
    meta, steps = metas[name], int(config.stages[name].steps)
    if meta is None or not meta.get("completed") or int(meta["step"]) == steps:
      continue
    done, key = int(meta["step"]), f"config.stages.{name}.steps"
    if steps < done:
      raise StageError(f"{key}={steps}, but the stage already trained {done} steps in "
                       f"{workdir}; give {key}={done} or more, or use a new --workdir")
    for later in names[index + 1:]:
      if metas[later] is not None:
        raise StageError(f"{key}={steps} extends stage {name} ({done} steps), but stage "
                         f"{later} already trained from it; only the last trained stage can "
                         "be extended: use a new --workdir")
