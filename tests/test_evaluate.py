"""`evaluate` and `predict` end to end on a tiny trained run: files written, scores that agree with
scoring the predictions directly, the LiTS split the run used, and one-line errors."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from curriculum_seg import cli, evaluate, metrics, stages, trained_run
from data_pipelines import lits, lits_tfds


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
  root = tmp_path_factory.mktemp("eval_run")
  config = tiny_config(root, **{"curriculum": "('whole1',)", "stages.whole1.steps": "4",
                                "stages.whole1.eval_every": "2",
                                "stages.whole1.checkpoint_every": "2",
                                "data.synthetic.num_cases": "5", "data.val_fraction": "0.4"})
  workdir = root / "run"
  stages.train(config, workdir, log=lambda m: None)
  return workdir, config


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "curriculum_seg.cli", *args], capture_output=True,
                        text=True, timeout=300)


def test_evaluate_scores_the_validation_cases_and_writes_its_files(tiny_run, tmp_path):
  workdir, config = tiny_run
  out = tmp_path / "eval"
  result = evaluate.evaluate_run(workdir, output=out, log=lambda m: None)
  cases = lits.find_cases(config.data.lits_dir)
  expected = lits_tfds.assign_splits(sorted(cases), 0.4, 0.0, 0)["validation"]
  assert [c["case_number"] for c in result["cases"]] == expected
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["aggregate"]["num_cases"] == len(expected)
  assert saved["checkpoint"]["networks"] == [dict(stage="whole1", which="best",
                                                  step=saved["checkpoint"]["networks"][0]["step"],
                                                  task="tumour")]
  # Scores agree with scoring the predictor's masks directly.
  predictor = trained_run.load_predictor(workdir)
  first = lits.load_case(*cases[expected[0]])
  pred = predictor.predict_case(first)
  direct = metrics.case_scores(pred == 2, first.labels == 2, first.spacing)
  for key in ("dice", "jaccard"):
    assert saved["cases"][0]["tumour"][key] == pytest.approx(direct[key])
  # A tumour-only model is not scored on the liver; burden uses the reference liver.
  assert "liver" not in saved["cases"][0] and saved["burden_uses_reference_liver"]
  table = (out / "metrics.md").read_text()
  assert "| tumour |" in table and "IoU > 0.5, <10mm" in table
  assert f"| case-{expected[0]} |" in table
  pictures = sorted(p.name for p in (out / "pictures").iterdir())
  assert pictures == sorted(saved["pictures"])
  assert {"smallest_tumour.png", "largest_tumour.png"} <= set(pictures)
  assert all((out / "pictures" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
  assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_picture_shows_ct_and_both_contours():
  image = np.full((30, 30, 3), -1000, np.int16)
  image[5:25, 5:25] = 100
  ref = np.zeros(image.shape, np.uint8)
  ref[5:25, 5:25] = 1
  ref[8:12, 8:12] = 2
  pred = np.zeros(image.shape, np.uint8)
  pred[9:13, 9:13] = 2
  picture = evaluate._Picture(key=0.0, title="t", name="n", image=image[:, :, 1],
                              reference=ref[:, :, 1], prediction=pred[:, :, 1],
                              spacing=(0.5, 0.5))
  fig = evaluate.draw_overlay(picture, (-60, 140))
  ax = fig.axes[0]
  assert len(ax.images) == 1 and ax.images[0].get_clim() == (-60, 140)
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  # one convention with inspect.plot_slice (curriculum_seg.pictures): colour = structure, solid =
  # reference, dashed = prediction; a prediction without liver draws no predicted liver
  assert labels == ["reference liver", "reference tumour", "predicted tumour"]
  # one contour set per structure present: liver, reference tumour, predicted tumour
  from matplotlib.contour import ContourSet
  assert len([c for c in ax.collections if isinstance(c, ContourSet)]) == 3
  assert ax.xaxis_inverted()


@pytest.mark.slow
def test_cli_evaluate_a_named_checkpoint_and_refuse_a_missing_split(tiny_run, tmp_path):
  workdir, _ = tiny_run
  out = tmp_path / "e2"
  result = run_cli("evaluate", "--workdir", str(workdir), "--stage", "whole1", "--step", "2",
                   "--checkpoint", "latest", "--output", str(out), "--no_pictures")
  assert result.returncode == 0, result.stderr
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["checkpoint"]["networks"][0]["step"] == 2
  assert saved["pictures"] == [] and not (out / "pictures").exists()
  assert "tumour Dice per case" in result.stdout
  missing = run_cli("evaluate", "--workdir", str(workdir), "--split", "test")
  assert missing.returncode == 2
  assert "no test cases" in missing.stderr and "Traceback" not in missing.stderr
  bad = run_cli("evaluate", "--workdir", str(workdir), "--stage", "whole9")
  assert bad.returncode == 2 and "'whole9' is not in the run's curriculum" in bad.stderr


@pytest.mark.slow
def test_cli_predict_file_and_folder(tiny_run, tmp_path):
  workdir, config = tiny_run
  cases = lits.find_cases(config.data.lits_dir)
  volume = cases[min(cases)][0]
  out = tmp_path / "mask.nii"
  result = run_cli("predict", "--workdir", str(workdir), "--input", str(volume), "--output",
                   str(out))
  assert result.returncode == 0, result.stderr
  written, source = nib.load(out), nib.load(volume)
  assert written.shape == source.shape
  np.testing.assert_array_equal(written.affine, source.affine)
  assert set(np.unique(np.asarray(written.dataobj))) <= {0, 2}
  # The same mask as predicting in Python, in the file's own layout.
  case = lits.load_case(volume)
  expected = case.to_original(trained_run.load_predictor(workdir).predict_case(case))
  np.testing.assert_array_equal(np.asarray(written.dataobj), expected)

  folder = tmp_path / "in"
  folder.mkdir()
  for n in sorted(cases)[:2]:
    v = cases[n][0]
    (folder / v.name).write_bytes(v.read_bytes())
  (folder / "segmentation-0.nii.gz").write_bytes(cases[min(cases)][1].read_bytes())  # skipped
  masks = tmp_path / "masks"
  result = run_cli("predict", "--workdir", str(workdir), "--input", str(folder), "--output",
                   str(masks))
  assert result.returncode == 0, result.stderr
  names = sorted(p.name for p in masks.iterdir())
  assert names == sorted(cases[n][0].name.replace("volume-", "segmentation-")
                         for n in sorted(cases)[:2])
  assert "wrote 2 mask(s)" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--input", "{missing}", "--output", "{tmp}/m.nii.gz"], "no such file or folder"),
    (["--input", "{volume}", "--output", "{tmp}/m.png"], "must be a .nii or .nii.gz"),
    (["--input", "{volume}", "--output", "{tmp}/no/m.nii.gz"], "does not exist"),
    (["--input", "{notnifti}", "--output", "{tmp}/m.nii.gz"], "not a .nii or .nii.gz file"),
    (["--input", "{emptydir}", "--output", "{tmp}/out"], "holds no .nii"),
    (["--input", "{corrupt}", "--output", "{tmp}/m.nii.gz"], "corrupt.nii"),
    (["--input", "{volume}", "--output", "{tmp}/m.nii.gz", "--batch_size", "0"],
     "--batch_size must be >= 1"),
])
def test_cli_predict_bad_inputs_are_one_line_errors(tiny_run, tmp_path, capsys, args, message):
  workdir, config = tiny_run
  cases = lits.find_cases(config.data.lits_dir)
  (tmp_path / "empty").mkdir()
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "corrupt.nii").write_bytes(b"\x00" * 400)
  values = dict(missing=str(tmp_path / "nope.nii.gz"), tmp=str(tmp_path),
                volume=str(cases[min(cases)][0]), notnifti=str(tmp_path / "notes.txt"),
                emptydir=str(tmp_path / "empty"), corrupt=str(tmp_path / "corrupt.nii"))
  # In-process (the console script's `main`): the subprocess tests above cover the entry point.
  code = cli.main(["predict", "--workdir", str(workdir), *[a.format(**values) for a in args]])
  err = capsys.readouterr().err
  assert code == 2, err
  assert message in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / "m.nii.gz").exists()


def test_cli_predict_refuses_a_directory_without_a_run(tiny_run, tmp_path):
  _, config = tiny_run
  volume = lits.find_cases(config.data.lits_dir)[0][0]
  result = run_cli("predict", "--workdir", str(tmp_path), "--input", str(volume), "--output",
                   str(tmp_path / "m.nii.gz"))
  assert result.returncode == 2
  assert "not a run directory (no config.json)" in result.stderr
  assert not (tmp_path / "m.nii.gz").exists()
