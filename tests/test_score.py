"""`curriculum-seg score`: pairing by file name, scores equal to `metrics` on the arrays, any file
orientation and label storage, one-line errors, and input folders left untouched."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from curriculum_seg import cli, metrics, score
from data_pipelines import synthetic

SHAPE = (24, 24, 8)
SPACING = (0.8, 0.7, 2.5)


def reference_labels():
  """RAS labels: a liver block with two tumours at asymmetric places."""
  labels = np.zeros(SHAPE, np.uint8)
  labels[3:21, 4:20, 1:7] = 1
  labels[5:9, 6:10, 2:4] = 2
  labels[13:19, 12:18, 3:6] = 2
  return labels


def predicted_labels():
  """The reference with the small tumour missed and one extra tumour."""
  labels = reference_labels()
  labels[5:9, 6:10, 2:4] = 1
  labels[10:12, 5:7, 5:6] = 2
  return labels


def save(labels, path, axcodes=("R", "A", "S"), storage="uint8"):
  nib.save(synthetic.to_nifti(labels, SPACING, axcodes, storage, is_label=True), path)


def snapshot(folder):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def folders(tmp_path):
  ref, pred = tmp_path / "ref", tmp_path / "pred"
  ref.mkdir()
  pred.mkdir()
  save(reference_labels(), ref / "segmentation-0.nii")
  save(predicted_labels(), pred / "segmentation-0.nii.gz")  # .nii pairs with .nii.gz
  save(reference_labels(), ref / "segmentation-1.nii.gz")
  save(reference_labels(), pred / "segmentation-1.nii.gz")
  return ref, pred


def run(capsys, *args):
  code = cli.main(["score", *map(str, args)])
  out, err = capsys.readouterr()
  return code, out, err


def test_scores_equal_the_metrics_and_inputs_stay_untouched(folders, tmp_path, capsys):
  ref, pred = folders
  before = snapshot(ref), snapshot(pred)
  out = tmp_path / "out"
  code, stdout, err = run(capsys, "--reference", ref, "--prediction", pred, "--output", out)
  assert code == 0, err
  saved = json.loads((out / "metrics.json").read_text())
  assert [c["case_id"] for c in saved["cases"]] == ["segmentation-0", "segmentation-1"]
  assert saved["cases"][0]["prediction"].endswith("segmentation-0.nii.gz")
  direct = metrics.case_scores(predicted_labels() == 2, reference_labels() == 2, SPACING)
  for key in ("dice", "jaccard", "assd", "msd"):
    assert saved["cases"][0]["tumour"][key] == pytest.approx(direct[key])
  assert saved["cases"][1]["tumour"]["dice"] == 1.0
  per_case = (direct["dice"] + 1.0) / 2
  assert saved["aggregate"]["tumour"]["dice_per_case"] == pytest.approx(per_case)
  iou = saved["aggregate"]["detection"]["iou"]
  assert (iou["tp"], iou["fn"], iou["fp"]) == (3, 1, 1)  # case 0 misses one, adds one
  assert "| segmentation-0 |" in (out / "metrics.md").read_text()
  assert f"tumour Dice per case {per_case:.3f}" in stdout and "liver Dice" in stdout
  assert "recall 0.750, precision 0.750" in stdout
  assert (snapshot(ref), snapshot(pred)) == before
  assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]


def test_file_orientation_and_label_storage_do_not_change_the_scores(tmp_path):
  ref, pred = tmp_path / "ref", tmp_path / "pred"
  ref.mkdir()
  pred.mkdir()
  save(reference_labels(), ref / "segmentation-0.nii.gz")
  save(predicted_labels(), pred / "segmentation-0.nii.gz")
  # The same case stored permuted and flipped, as float32; LiTS submission naming.
  save(reference_labels(), ref / "segmentation-1.nii.gz", ("P", "I", "R"), "float32")
  save(predicted_labels(), pred / "test-segmentation-1.nii", ("P", "I", "R"), "int16")
  result = score.score_folders(ref, pred, tmp_path / "out", log=lambda m: None)
  ras, permuted = result["cases"]
  assert permuted["prediction"].endswith("test-segmentation-1.nii")
  for part in ("tumour", "liver"):
    for key in ("dice", "assd", "msd", "rmsd"):
      assert permuted[part][key] == pytest.approx(ras[part][key])
  # Lesion diameters are in-plane whatever the array axis of the slices.
  assert (sorted(r["diameter_mm"] for r in ras["detection"]["reference_lesions"])
          == pytest.approx(sorted(r["diameter_mm"]
                                  for r in permuted["detection"]["reference_lesions"])))
  assert sorted(permuted["spacing"]) == pytest.approx(sorted(SPACING))


def test_missing_predictions_are_one_error_or_empty_masks(folders, tmp_path, capsys):
  ref, pred = folders
  save(reference_labels(), ref / "segmentation-7.nii.gz")
  save(reference_labels(), ref / "segmentation-9.nii.gz")
  out = tmp_path / "out"
  code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output", out)
  assert code == 2
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
  assert "segmentation-7.nii.gz" in err and "segmentation-9.nii.gz" in err
  assert "--allow_missing" in err and not out.exists()
  code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output", out,
                     "--allow_missing")
  assert code == 0, err
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["missing_predictions"] == ["segmentation-7.nii.gz", "segmentation-9.nii.gz"]
  missing = saved["cases"][2]
  assert missing["prediction"] is None and missing["tumour"]["dice"] == 0.0
  assert missing["detection"]["iou"]["fn"] == 2


def test_shape_mismatch_and_bad_labels_name_the_files(folders, tmp_path, capsys):
  ref, pred = folders
  save(reference_labels()[:, :, :6], pred / "segmentation-1.nii.gz")
  code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output",
                     tmp_path / "out")
  assert code == 2 and len(err.strip().splitlines()) == 1
  assert str(pred / "segmentation-1.nii.gz") in err and str(ref / "segmentation-1.nii.gz") in err
  bad = reference_labels()
  bad[0, 0, 0] = 3
  save(bad, pred / "segmentation-1.nii.gz")
  code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output",
                     tmp_path / "out")
  assert code == 2 and "segmentation-1.nii.gz" in err and "outside {0, 1, 2}" in err


def test_output_never_lands_in_an_input_folder(folders, tmp_path, capsys):
  ref, pred = folders
  before = snapshot(ref), snapshot(pred)
  for folder in (ref, pred):
    code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output", folder)
    assert code == 2 and "choose another folder" in err
  code, _, err = run(capsys, "--reference", ref, "--prediction", ref)
  assert code == 2 and "same folder" in err
  assert (snapshot(ref), snapshot(pred)) == before
  code, stdout, err = run(capsys, "--reference", ref, "--prediction", pred)
  assert code == 0, err
  assert (tmp_path / "score-pred" / "metrics.json").exists()
  # A prediction folder inside the reference folder: the default would land inside it.
  inner = ref / "preds"
  inner.mkdir()
  save(reference_labels(), inner / "segmentation-0.nii.gz")
  save(reference_labels(), inner / "segmentation-1.nii.gz")
  code, _, err = run(capsys, "--reference", ref, "--prediction", inner)
  assert code == 2 and "give --output" in err


def test_a_lits_folder_is_a_reference_and_duplicates_are_refused(folders, tmp_path, capsys):
  ref, pred = folders
  hu = np.full(SHAPE, -1000, np.int16)
  nib.save(synthetic.to_nifti(hu, SPACING), ref / "volume-0.nii")  # CT volumes are skipped
  code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output",
                     tmp_path / "out")
  assert code == 0, err
  save(reference_labels(), pred / "segmentation-1.nii")
  code, _, err = run(capsys, "--reference", ref, "--prediction", pred, "--output",
                     tmp_path / "out")
  assert code == 2 and "stored twice" in err
