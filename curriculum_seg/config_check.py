"""The whole resolved config, checked before any work: one `ConfigError` naming the full key.

`check_config` builds every cheap piece a run would build (each stage's optimiser and schedule,
model, loss and input settings; the augmentation; the data and synthetic settings) and checks
the data folder: for synthesis, that the tool may write there; otherwise, that it exists. So a
bad value fails in a second, before data is synthesised or prepared and before the workdir is
touched, instead of after the long work. `resolve_paths` makes a config's local data paths
absolute, so a saved run opens its data wherever the command runs.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from curriculum_seg import curriculum, losses, optim
from curriculum_seg.config_loading import ConfigError
from curriculum_seg.models import build_model, num_classes
from data_pipelines import augment, intensity, pipelines, settings, synthetic

FILE_FORMATS = ("array_record",)  # the pipelines read records at random (Grain)
PATH_KEYS = ("lits_dir", "tfds_dir")  # config.data's folders, made absolute by resolve_paths


def _checked(prefix: str, fn: Callable[..., Any], *args) -> Any:
  """Calls fn(*args); a ValueError or TypeError becomes a ConfigError with the full key.

  Messages of the library's checks name the field relative to its section ('schedule.x',
  'stage.x', 'model.x'); `prefix` is the section's place in the config ('config.stages.whole1.').
  """
  try:
    return fn(*args)
  except (ValueError, TypeError, KeyError) as e:
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if message.startswith("stage."):
      message = message[len("stage."):]
    if message.startswith("data."):  # a data setting checked with a stage's
      message = "config." + message
    elif not message.startswith("config."):
      message = prefix + message
    raise ConfigError(message) from e


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _check_data(data: ml_collections.ConfigDict, check_folders: bool) -> None:
  _require(data.get("file_format") in FILE_FORMATS,
           f"config.data.file_format={data.get('file_format')!r} is not one of "
           f"{list(FILE_FORMATS)}")
  compression = data.get("record_compression", "uncompressed")
  _require(compression in settings.RECORD_COMPRESSIONS,
           f"config.data.record_compression={compression!r} is not one of "
           f"{list(settings.RECORD_COMPRESSIONS)}")
  context = data.get("context_slices")
  _require(isinstance(context, int) and context >= 1 and context % 2 == 1,
           f"config.data.context_slices={context!r} must be an odd integer >= 1 (slices "
           "stacked around the centre slice)")
  spacing = _checked("config.", settings.target_spacing, data)
  size = data.get("image_size")
  if spacing is None:
    _require(isinstance(size, int) and size >= 8,
             f"config.data.image_size={size!r} must be an integer >= 8 (pixels), or set "
             "config.data.spacing_mm")
  else:
    _require(size is None, f"config.data.image_size={size!r} and config.data.spacing_mm="
             f"{data.spacing_mm!r} are both set: a slice is resampled to a size or to a "
             "spacing; set config.data.image_size=None")
  _checked("config.", intensity.normalisation_name, data)
  for key in ("val_fraction", "test_fraction"):
    value = data.get(key, 0.0)
    _require(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
             f"config.data.{key}={value!r} must be in [0, 1)")
  _require(data.val_fraction + data.get("test_fraction", 0.0) < 1.0,
           f"config.data.val_fraction + config.data.test_fraction = "
           f"{data.val_fraction + data.get('test_fraction', 0.0)} leaves no training case")
  for fn in (settings.hu_window, settings.worker_count, settings.host_threads,
             settings.prepare_workers):
    _checked("config.", fn, data)
  _checked("config.", settings.prefetch, data, 1)
  for key in PATH_KEYS:
    value = data.get(key)
    _require(isinstance(value, str) and value.strip() != "",
             f"config.data.{key} is not set: give --config.data.{key}=FOLDER")
  synth = data.get("synthetic", None)
  enabled = bool(synth is not None and synth.get("enabled", False))
  if enabled:
    _require(isinstance(synth.num_cases, int) and synth.num_cases >= 1,
             f"config.data.synthetic.num_cases={synth.num_cases!r} must be >= 1")
    _checked("config.data.synthetic.", _synth_config, data)
  if not check_folders:
    return
  lits_dir = os.fspath(data.lits_dir)
  if enabled:
    _checked("", synthetic.check_writable, lits_dir, "config.data.lits_dir")
  elif "://" not in lits_dir and not os.path.isdir(lits_dir):
    raise ConfigError(f"config.data.lits_dir={lits_dir}: LiTS folder does not exist (or set "
                      "config.data.synthetic.enabled=true to synthesise data there)")


def _synth_config(data):
  from data_pipelines import lits_tfds  # pylint: disable=g-import-not-at-top
  return lits_tfds.synth_config(data)


def _check_stage(config, name: str) -> None:
  stage = config.stages[name]
  prefix = f"config.stages.{name}."
  _checked(prefix, pipelines.check_stage_settings, stage, config.data,
           config.data.get("image_size", None))
  _checked(prefix, optim.build_optimizer, stage.optimizer, stage.schedule, int(stage.steps))
  model_cfg = _checked(prefix, curriculum.stage_model_config, config, name)
  model_prefix = prefix if stage.get("model", None) else "config."
  model = _checked(model_prefix, build_model, model_cfg, int(config.data.context_slices))
  spatial = curriculum.input_shape(config, stage)
  shape = (int(stage.batch_size),) + spatial + (int(config.data.context_slices),)
  dims = int(model_cfg.spatial_dims)
  if len(spatial) != dims:
    what = {"patch": "patch_size", "whole": "block_size"}.get(stage.pipeline, "crop_size")
    raise ConfigError(f"config.stages.{name}.{what}={spatial} has {len(spatial)} spatial axes "
                      f"but the network is {dims}-D (config.model.spatial_dims={dims})")
  what = {"patch": "patch_size", "liver_crop": "crop_size"}.get(stage.pipeline)
  if stage.pipeline == "whole" and stage.get("block_size", None) is not None:
    what = "block_size"
  key = f"config.stages.{name}.{what}" if what else "config.data.image_size"
  try:
    model.check_input_shape(shape)
  except ValueError as e:
    shown = shape[1] if len(spatial) == 2 else spatial
    raise ConfigError(f"{key}={shown} does not fit the network of stage {name}: {e}") from e
  _checked("config.", losses.make_loss_fn, config.loss, model_cfg.task)
  weights = config.loss.get("class_weights", None)
  if weights is not None:
    classes = num_classes(model_cfg.task)
    _require(len(tuple(weights)) == classes,
             f"config.loss.class_weights={tuple(weights)} needs one weight per class of task "
             f"{model_cfg.task!r} ({classes} classes)")


def check_config(config: ml_collections.ConfigDict, check_folders: bool = True) -> None:
  """Raises ConfigError (one line, full key) for anything in `config` a run would refuse.

  `check_folders`: also check `data.lits_dir` (synthesis may write there, or it exists).
  """
  _require(isinstance(config.get("seed", None), int), f"config.seed={config.get('seed')!r} "
           "must be an integer")
  _check_data(config.data, check_folders)
  _checked("config.", augment.AugmentSpec.from_config, config.get("augment", None))
  batch = config.get("eval", {}).get("batch_size", 1)
  _require(isinstance(batch, int) and batch >= 1,
           f"config.eval.batch_size={batch!r} must be an integer >= 1")
  try:
    curriculum.validate(config)
  except curriculum.StageError as e:
    raise ConfigError(str(e)) from e
  for name in config.curriculum:
    _check_stage(config, name)
  _check_eval(config)


def _check_eval(config) -> None:
  """The sliding window of validation, evaluate and predict (curriculum_seg.validation)."""
  from curriculum_seg import validation  # pylint: disable=g-import-not-at-top
  evaluation = config.get("eval", {})
  for key in ("overlap", "val_overlap"):
    value = evaluation.get(key, 0.5)
    _require(isinstance(value, (int, float)) and 0.0 <= value < 1.0,
             f"config.eval.{key}={value!r} must be in [0, 1)")
  sigma = evaluation.get("sigma_scale", 0.125)
  _require(isinstance(sigma, (int, float)) and sigma > 0,
           f"config.eval.sigma_scale={sigma!r} must be > 0")
  try:
    window = validation.eval_window(config)
  except ValueError as e:
    raise ConfigError(f"config.eval.window: {str(e).replace('stage.block_size', 'window')}") from e
  tumour_stages = [n for n in config.curriculum if config.stages[n].pipeline != "liver_crop"]
  if window is None:
    _require(config.data.get("spacing_mm", None) is None or not tumour_stages,
             "config.eval.window must be set (or a whole stage's block_size): with "
             "config.data.spacing_mm slices differ in size, so evaluation uses a sliding window")
    return
  for name in tumour_stages:
    model_cfg = curriculum.stage_model_config(config, name)
    model = build_model(model_cfg, int(config.data.context_slices))
    dims = int(model_cfg.spatial_dims)
    shown = window[0] if len(window) == 2 else window
    if len(window) != dims:
      raise ConfigError(f"config.eval.window={tuple(window)} has {len(window)} spatial axes but "
                        f"the network of stage {name} is {dims}-D")
    try:
      model.check_input_shape((1,) + tuple(window) + (int(config.data.context_slices),))
    except ValueError as e:
      raise ConfigError(f"config.eval.window={shown} does not fit the network of stage "
                        f"{name}: {e}") from e


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose local data folders (and compilation cache) are absolute paths,
  so the run's saved config.json finds them from any working directory. gs:// stays as is."""
  config = ml_collections.ConfigDict(config.to_dict(preserve_field_references=False))

  def absolute(value):
    if isinstance(value, str) and value and "://" not in value:
      return os.path.abspath(os.path.expanduser(value))
    return value

  with config.unlocked():
    for key in PATH_KEYS:
      if key in config.data:
        config.data[key] = absolute(config.data[key])
    if config.get("compilation_cache_dir", None):
      config.compilation_cache_dir = absolute(config.compilation_cache_dir)
  return config

