"""What several test modules share: the tiny run's config, the tiny prepared dataset, tolerances.

The tiny run is configs/synthetic.py made small (4 cases of 64 x 64 x 16 at 8 mm a pixel, a
depth-2 U-Net of width 4, STEPS steps a stage); test modules add their own overrides. The tiny
dataset (4 cases stored at 32 x 32, every slice selected) is prepared once a session.
"""

import functools

import numpy as np
import pytest

STEPS = 6  # steps of each stage of the tiny run

# Tolerance for images that the augmentation warp computed in another XLA program (another batch
# or shard shape, device or process count): XLA:CPU may contract a multiply and an add into one
# FMA in one program and not the other (seen between 1 and 4 devices on AMD EPYC, and on Intel
# with --xla_cpu_max_isa=AVX2). The image is a bilinear blend of HU values (|HU| < 2**12)
# divided by the window width (200 HU): allow a few float32 ULPs of the largest HU, in window
# units (about 1e-5; XLA's code without any FMA, for AVX or SSE4.2, gave images at most 4.3e-6
# from the FMA ones). Labels, masks, positions and example indices are integers: bitwise.
WARP_ATOL = 4 * np.finfo(np.float32).eps * 2**12 / 200


def make_tiny_overrides(root, **extra) -> dict[str, str]:
  """`--config.KEY=VALUE` overrides (KEY: VALUE) of configs/synthetic.py for the tiny run, its
  data under `root`; `extra` adds or replaces overrides."""
  values = {
      "data.lits_dir": f"{root}/lits", "data.tfds_dir": f"{root}/tfds",
      "data.synthetic.num_cases": "4", "data.synthetic.size": "64", "data.synthetic.slices": "16",
      "data.spacing_mm": "(8.0, 8.0)", "data.val_fraction": "0.25", "model.depth": "2",
      "model.base_width": "4", "stages.patch.patch_size": "16", "stages.patch.patch_jitter": "4",
      "stages.whole1.block_size": "32", "stages.whole2.block_size": "32", "eval.window": "32",
      "eval.batch_size": "8"}
  for name in ("whole1", "patch", "whole2"):
    values.update({f"stages.{name}.steps": str(STEPS), f"stages.{name}.batch_size": "4",
                   f"stages.{name}.eval_every": "3", f"stages.{name}.checkpoint_every": "3",
                   f"stages.{name}.log_every": "1",
                   f"stages.{name}.schedule.warmup_steps": "0"})  # the default's 50 > 6 steps
  values.update(extra)
  return values


def make_tiny_config(root, **extra):
  """The tiny run's config (`make_tiny_overrides` applied to configs/synthetic.py)."""
  from curriculum_seg import config_loading  # pylint: disable=import-outside-toplevel
  return config_loading.apply_overrides(config_loading.load_config_file("configs/synthetic.py"),
                                        make_tiny_overrides(root, **extra).items())


def prepare_tiny_dataset(tmp_path_factory, name, **synth):
  """A tiny synthetic dataset under pytest's base temp (reused by later calls in a session):
  (builder, config.data).

  Slices are stored at the generator's size (no resampling), so every tumour part in the index
  is in the stored labels.
  """
  from configs import synthetic as synthetic_config  # pylint: disable=import-outside-toplevel
  from data_pipelines import lits_tfds  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp() / name
  cfg = synthetic_config.get_config()
  cfg.data.lits_dir = str(root / "lits")
  cfg.data.tfds_dir = str(root / "tfds")
  cfg.data.image_size = 32
  cfg.data.spacing_mm = None
  cfg.data.synthetic.update(dict(num_cases=4, size=32, slices=16, storage_variants=False))
  cfg.data.synthetic.update(synth)
  with cfg.data.unlocked():
    cfg.data.hu_window = (-60.0, 140.0)
    cfg.data.normalisation = "window"  # tests read window units (intensity: its own tests)
    cfg.data.slice_selection = "all"
    cfg.data.liver_margin = 2
    cfg.data.host_threads = 2
  return lits_tfds.prepare(cfg.data, log=lambda _: None), cfg.data


@pytest.fixture(scope="session")
def tiny_overrides():
  """`make_tiny_overrides(root, **extra)`."""
  return make_tiny_overrides


@pytest.fixture(scope="session")
def tiny_config():
  """`make_tiny_config(root, **extra)`."""
  return make_tiny_config


@pytest.fixture(scope="session")
def warp_atol():
  return WARP_ATOL


@pytest.fixture(scope="session")
def prepare_tiny(tmp_path_factory):
  """`prepare_tiny(name, **synth)`: `prepare_tiny_dataset` in this session's base temp."""
  return functools.partial(prepare_tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_dataset(prepare_tiny):
  """(builder, config.data) of 4 tiny cases with tumours."""
  return prepare_tiny("pipelines_tumours")


@pytest.fixture(scope="session")
def tiny_dataset_without_tumours(prepare_tiny):
  """(builder, config.data) of 2 tiny cases without tumours."""
  return prepare_tiny("pipelines_no_tumours", num_cases=2, max_tumours=0)
