"""A tiny 3-D run end to end: cases resampled to isotropic voxels, 3-D blocks and patches,
3-D sliding-window validation, evaluate, and predict writing a mask on the input's grid."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from curriculum_seg import inference, rundir
from data_pipelines import lits, lits_tfds, slices

pytestmark = pytest.mark.slow  # trains runs in its fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_3D = {
    "data.synthetic.num_cases": "4", "data.synthetic.size": "64", "data.synthetic.slices": "24",
    "data.spacing_mm": "(6.0, 6.0, 6.0)", "model.depth": "2", "model.base_width": "4",
    "stages.whole1.block_size": "(8, 16, 16)", "stages.whole2.block_size": "(8, 16, 16)",
    "stages.patch.patch_size": "(8, 16, 16)", "stages.patch.patch_jitter": "2",
    "eval.window": "(8, 16, 16)", "eval.batch_size": "4",
    "stages.whole1.steps": "3", "stages.patch.steps": "3", "stages.whole2.steps": "3",
    "stages.whole1.eval_every": "3", "stages.whole2.eval_every": "3",
}


def cli(*args):
  return subprocess.run([sys.executable, "-m", "curriculum_seg.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("three_d")
  args = [f"--config.{k}={v}" for k, v in dict(
      TINY_3D, **{"data.lits_dir": str(root / "lits"), "data.tfds_dir": str(root / "tfds")}
  ).items()]
  result = cli("train", "--config", "configs/synthetic_3d.py", "--workdir", str(root / "run"),
               *args)
  assert result.returncode == 0, result.stderr[-3000:]
  return root


def test_cases_are_resampled_to_isotropic_voxels(run):
  config = rundir.read_config(run / "run")
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  assert builder.builder_config.name.startswith("ctx1_sp6_")
  index = builder.info.metadata["index"]["train"]
  for number, first, n, *_ in index["cases"]:
    case = lits.load_case(f"{config.data.lits_dir}/volume-{number}.nii.gz")
    assert n == slices.stored_depth(case.image.shape[2], case.spacing[2], 6.0)
    example = builder.as_data_source("train")[int(first)]
    np.testing.assert_allclose(example["spacing"], [6.0, 6.0, 6.0], rtol=0.1)
    assert example["image"].shape[-1] == 1, "3-D: one channel, depth from the slices"


def test_a_3d_run_validates_evaluates_and_predicts_on_the_files_grid(run, tmp_path):
  rows = rundir.MetricsLog(run / "run").read()
  assert [r["input_size"] for r in rows if r.get("stage") == "whole1" and "loss" in r][0] == [
      8, 16, 16]
  assert any("val_dice" in r for r in rows)
  evaluated = cli("evaluate", "--workdir", str(run / "run"), "--output", str(tmp_path / "eval"))
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["aggregate"]["num_cases"]
  volume = sorted((run / "lits").glob("volume-*.nii.gz"))[0]
  out = tmp_path / "mask.nii.gz"
  predicted = cli("predict", "--workdir", str(run / "run"), "--input", str(volume), "--output",
                  str(out))
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  ct, mask = nib.load(str(volume)), nib.load(str(out))
  assert mask.shape == ct.shape
  np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-5)


def test_3d_probabilities_map_back_onto_every_slice(run):
  """A stand-in 3-D network that calls bright voxels tumour: after resampling to 6 mm voxels
  and back, its mask follows the bright region of the volume on the file's own grid."""
  net = inference.load_network(run / "run")
  volume = sorted((run / "lits").glob("volume-*.nii.gz"))[0]
  case = lits.load_case(str(volume))
  lo, hi = net.normaliser.range

  def bright(windows, options=None):
    p = (windows[..., 0] > lo + 0.6 * (hi - lo)).astype(np.float32)
    return np.stack([1 - p, p], -1)

  net.slice_probabilities = bright
  labels = net.label_volume(case.image, spacing=case.spacing)
  assert labels.shape == case.image.shape
  expected = case.image > net.normaliser.lo + 0.6 * (net.normaliser.hi - net.normaliser.lo)
  got = labels == 2
  dice = 2 * (got & expected).sum() / (got.sum() + expected.sum())
  assert dice > 0.7, dice


def test_load_run_on_a_3d_run(run):
  from curriculum_seg import inspect  # pylint: disable=g-import-not-at-top
  loaded = inspect.load_run(run / "run")
  volume = sorted((run / "lits").glob("volume-*.nii.gz"))[0]
  labels = loaded.predict(str(volume))
  assert labels.shape == nib.load(str(volume)).shape
  fig = loaded.plot_batches()
  assert len(fig.axes) >= 2
  assert [s.pipeline for s in loaded.stages] == ["whole", "patch", "whole"]
