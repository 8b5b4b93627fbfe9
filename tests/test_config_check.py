"""The whole config is checked before any work: every enumerated value, range and cross-field
rule of the shipped configs is refused with its full key, and the command line writes nothing."""

import os
import subprocess
import sys

import pytest

from curriculum_seg import config_check, config_loading
from curriculum_seg.config_loading import ConfigError

SYNTHETIC = "configs/synthetic.py"

# (override key, bad value, what the one-line message must say): every enumerated key of the
# shipped configs, the ranges a short run hits first, and the cross-field rules.
BAD_VALUES = [
    ("data.file_format", "tfrecord", "config.data.file_format='tfrecord' is not one of"),
    ("data.record_compression", "lz4", "config.data.record_compression='lz4' is not one of"),
    ("data.slice_selection", "lung", "config.data.slice_selection"),
    ("data.context_slices", "2", "config.data.context_slices=2 must be an odd integer"),
    ("data.image_size", "4", "config.data.image_size=4 and config.data.spacing_mm=(1.5, 1.5) "
     "are both set"),
    ("data.spacing_mm", "(0.0, 1.0)", "data.spacing_mm=(0.0, 1.0): in-plane spacing must be in"),
    ("data.spacing_mm", "(1.0, 1.0, -2.0)", "the slice spacing must be in [0, 50] mm"),
    ("stages.whole1.block_size", "(24, 64, 64)", "config.stages.whole1.block_size=(24, 64, 64) "
     "has 3 spatial axes but the network is 2-D"),
    ("model.spatial_dims", "3", "has 2 spatial axes but the network is 3-D"),
    ("eval.window", "(8, 64, 64)", "config.eval.window=(8, 64, 64) has 3 spatial axes"),
    ("data.spacing_mm", "None", "config.data.image_size=None must be an integer >= 8"),
    ("data.normalisation", "zscore", "config.data.normalisation='zscore' is not one of"),
    ("stages.whole1.block_size", "(100, 100)", "config.stages.whole1.block_size=100 does not fit"),
    ("stages.whole2.block_size", "(4000, 4000)", "config.stages.whole2.block_size=(4000, 4000) "
     "must be in [8, 1024]"),
    ("stages.whole2.block_size", "(64, 96)", "in-plane blocks are square"),
    ("stages.whole1.block_sampling", "voxel", "config.stages.whole1.block_sampling must be one of"),
    ("eval.window", "(100, 100)", "config.eval.window=100 does not fit the network"),
    ("eval.val_overlap", "1.0", "config.eval.val_overlap=1.0 must be in [0, 1)"),
    ("eval.sigma_scale", "0.0", "config.eval.sigma_scale=0.0 must be > 0"),
    ("data.val_fraction", "1.5", "config.data.val_fraction=1.5 must be in [0, 1)"),
    ("data.test_fraction", "0.9", "leaves no training case"),
    ("data.hu_window", "(100, -100)", "data.hu_window must be (lo, hi) with lo < hi"),
    ("data.worker_count", "-1", "config.data.worker_count must be >= 0"),
    ("data.liver_margin", "-2", "config.data.liver_margin must be >= 0"),
    ("data.synthetic.num_cases", "0", "config.data.synthetic.num_cases=0 must be >= 1"),
    ("data.synthetic.size", "8", "config.data.synthetic."),
    ("seed", "1.5", "config key seed expects an int"),
    ("stages.whole1.pipeline", "slices", "config.stages.whole1.pipeline='slices' is not one of"),
    ("stages.whole1.init", "previous", "config.stages.whole1.init='previous' is not one of"),
    ("stages.whole1.steps", "0", "config.stages.whole1.steps=0 must be >= 1"),
    ("stages.whole1.batch_size", "0", "config.stages.whole1.batch_size=0 must be >= 1"),
    ("stages.whole1.eval_every", "-1", "config.stages.whole1.eval_every=-1 must be >= 0"),
    ("stages.whole1.optimizer.name", "adamax",
     "config.stages.whole1.optimizer.name='adamax' is not one of"),
    ("stages.patch.schedule.name", "step", "config.stages.patch.schedule.name='step' is not one"),
    ("stages.whole2.schedule.warmup_steps", "-3",
     "config.stages.whole2.schedule.warmup_steps=-3 must be an integer >= 0"),
    ("stages.patch.component_sampling", "lesion",
     "config.stages.patch.component_sampling must be one of"),
    ("stages.patch.positive_fraction", "1.5",
     "config.stages.patch.positive_fraction must be in [0, 1]"),
    ("stages.patch.patch_size", "2000", "config.stages.patch.patch_size=2000 must be in [1, 1024]"),
    ("stages.patch.patch_jitter", "40", "config.stages.patch.patch_jitter (40.0) must be in"),
    ("stages.patch.tumour_fraction", "0.5", "unknown config key stages.patch.tumour_fraction"),
    ("stages.whole1.tumour_fraction", "2.0",
     "config.stages.whole1.tumour_fraction must be in [0, 1]"),
    ("stages.whole1.optimizer.learning_rate", "-1.0",
     "config.stages.whole1.optimizer.learning_rate=-1.0 must be a number >= 0"),
    ("stages.whole1.optimizer.b2", "1.0", "config.stages.whole1.optimizer.b2=1.0 must be in"),
    ("model.norm", "layer", "config.model.norm='layer' is not one of"),
    ("model.block", "dense", "config.model.block='dense' is not one of"),
    ("model.task", "lesion", "model.task"),
    ("model.downsample", "avgpool", "config.model.downsample='avgpool' is not one of"),
    ("model.skip", "gate", "config.model.skip='gate' is not one of"),
    ("model.compute_dtype", "float16", "config.model.compute_dtype='float16' is not one of"),
    ("model.depth", "8", "config.stages.whole1.block_size=128 does not fit the network"),
    ("model.foreground_prior", "1.5", "config.model.foreground_prior=1.5 must be None or in"),
    ("loss.name", "dicee", "config.loss.name='dicee' is not one of"),
    ("loss.class_weights", "(1.0, 2.0, 3.0)", "config.loss.class_weights=(1.0, 2.0, 3.0) needs"),
    ("eval.batch_size", "0", "config.eval.batch_size=0 must be an integer >= 1"),
    ("augment.rotate_deg", "-5.0", "config.augment."),
    ("curriculum", "('whole1', 'nothing')", "config.curriculum names stage 'nothing'"),
]


def _config(overrides=(), spec=SYNTHETIC):
  config = config_loading.load_config_file(spec)
  return config_loading.apply_overrides(config, overrides)


def test_the_shipped_configs_pass(tmp_path):
  for spec in ("configs/synthetic.py", "configs/synthetic.py:whole_only",
               "configs/synthetic_3d.py", "configs/synthetic_3d.py:patch_whole",
               "configs/synthetic.py:patch_whole", "configs/synthetic.py:cascade",
               "configs/lits_three_stage.py", "configs/lits_whole_only.py",
               "configs/lits_cascade.py"):
    config = _config([("data.lits_dir", str(tmp_path / "lits"))], spec)
    if not config.data.synthetic.enabled:  # a user's LiTS folder must exist
      os.makedirs(config.data.lits_dir, exist_ok=True)
    config_check.check_config(config)


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_each_bad_value_names_its_full_key(key, value, message, tmp_path):
  try:
    config = _config([(key, value), ("data.lits_dir", str(tmp_path / "new"))])
  except ConfigError as e:  # refused as the override is parsed
    assert message in str(e)
    return
  with pytest.raises(ConfigError) as e:
    config_check.check_config(config)
  assert message in str(e.value), str(e.value)
  assert "\n" not in str(e.value)


def test_a_warmup_longer_than_a_short_stage_is_clamped_not_refused(tmp_path):
  config = _config([("stages.whole1.steps", "5"), ("data.lits_dir", str(tmp_path / "new"))])
  assert config.stages.whole1.schedule.warmup_steps > 5
  config_check.check_config(config)


def test_data_folders_checked_and_made_absolute(tmp_path):
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "volume-0.nii").write_bytes(b"mine")
  with pytest.raises(ConfigError, match="data.synthetic.enabled=false"):
    config_check.check_config(_config([("data.lits_dir", str(foreign))]))
  with pytest.raises(ConfigError, match="LiTS folder does not exist"):
    config_check.check_config(_config([("data.lits_dir", str(tmp_path / "none")),
                                       ("data.synthetic.enabled", "false")]))
  resolved = config_check.resolve_paths(_config([("data.lits_dir", "rel/lits")]))
  assert resolved.data.lits_dir == os.path.abspath("rel/lits")
  assert os.path.isabs(resolved.data.tfds_dir)
  assert config_check.resolve_paths(_config([("data.lits_dir", "gs://b/lits")])
                                    ).data.lits_dir == "gs://b/lits"


def _cli(*args, cwd=None):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="")  # the tool quiets TensorFlow itself
  return subprocess.run([sys.executable, "-m", "curriculum_seg.cli", *args], capture_output=True,
                        text=True, cwd=cwd, timeout=300, env=env)


@pytest.mark.parametrize("command", ["prepare", "train", "check"])
@pytest.mark.parametrize("override", ["--config.stages.whole2.schedule.name=linear",
                                      "--config.loss.name=dicee",
                                      "--config.model.norm=layer"])
def test_the_command_line_refuses_before_any_work(command, override, tmp_path):
  lits_dir, tfds_dir, workdir = tmp_path / "lits", tmp_path / "tfds", tmp_path / "run"
  args = [command, "--config", SYNTHETIC, f"--config.data.lits_dir={lits_dir}",
          f"--config.data.tfds_dir={tfds_dir}", override]
  if command == "train":
    args += ["--workdir", str(workdir)]
  result = _cli(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"curriculum-seg {command}: error: config."), \
      result.stderr
  assert result.stdout.strip() in ("", ), result.stdout
  assert sorted(os.listdir(tmp_path)) == [], "nothing synthesised, prepared or claimed"
