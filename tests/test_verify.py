"""verify_folder: one call lists every bad file of a LiTS folder, in either process mode."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import lits, synthetic, verify

CFG = synthetic.SynthConfig(size=32, slices=8)
GOOD = (0, 1)


def _write_cases(folder, numbers) -> list[dict]:
  os.makedirs(folder, exist_ok=True)
  return [synthetic.write_case(os.fspath(folder), 0, n, CFG) for n in numbers]


def _resave(path, edit) -> None:
  """Rewrites a NIfTI file with `edit` applied to its stored array, on the same affine."""
  img = nib.load(path)
  data = edit(np.asarray(img.dataobj))
  nib.save(nib.Nifti1Image(data, img.affine, img.header), path)


def _truncate(path, keep) -> None:
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:keep(len(data))])


def _with_label_3(data):
  data = data.copy()
  data.flat[0] = 3
  return data


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
  """Cases 0 and 1 are good; every other case is broken in its own way. Returns (dir, bad paths)."""
  d = tmp_path_factory.mktemp("lits_bad")
  _write_cases(d, range(10))
  vol, seg = (lambda n: os.fspath(d / f"volume-{n}.nii.gz")), (
      lambda n: os.fspath(d / f"segmentation-{n}.nii.gz"))
  _truncate(vol(2), lambda n: n // 2)                       # truncated CT data
  _resave(seg(3), _with_label_3)                            # label 3
  _resave(seg(4), lambda a: np.ascontiguousarray(a[:, :, :-1]))  # one slice short
  nib.save(nib.load(vol(5)), d / "volume-5.nii")            # stored twice: .nii and .nii.gz
  os.remove(seg(6))                                         # volume without segmentation
  _truncate(vol(7), lambda n: n - 8)                        # gzip trailer cut, array complete
  os.remove(vol(8))                                         # segmentation without volume
  _truncate(vol(9), lambda n: n // 2)                       # both files of one case bad
  _resave(seg(9), _with_label_3)
  bad = [vol(2), seg(3), seg(4), vol(5), os.fspath(d / "volume-5.nii"), vol(6), vol(7), seg(8),
         vol(9), seg(9)]
  return os.fspath(d), bad


def test_one_call_lists_every_bad_file_and_no_good_one(bad_folder):
  d, bad = bad_folder
  lines = []
  report = verify.verify_folder(d, log=lines.append)
  for path in bad:
    assert any(path in line for line in report.problems), (path, report.problems)
  for n in GOOD:
    for name in (f"volume-{n}.nii.gz", f"segmentation-{n}.nii.gz"):
      assert not any(name in line for line in report.problems), name
  assert not any("segmentation-2.nii.gz" in line for line in report.problems)  # its CT is bad
  assert all("\n" not in line for line in report.problems)
  assert report.num_cases == 10 and report.num_bad_cases == 8
  assert any("label values [3]" in line for line in report.problems)
  assert any("truncated" in line and "volume-7" in line for line in report.problems)
  assert lines[-2].startswith("verify: 10/10 cases, 8 unusable")
  assert report.slices == len(GOOD) * CFG.slices
  assert report.voxels == len(GOOD) * CFG.size ** 2 * CFG.slices


def test_workers_give_the_same_report(bad_folder):
  d, _ = bad_folder
  serial = verify.verify_folder(d, workers=0, log=None)
  parallel = verify.verify_folder(d, workers=2, log=None)
  assert parallel == serial


def test_raise_if_bad_lists_every_problem(bad_folder):
  d, _ = bad_folder
  report = verify.verify_folder(d, log=None)
  with pytest.raises(lits.CaseError) as e:
    report.raise_if_bad()
  message = str(e.value)
  assert message.splitlines()[0] == f"8 of 10 cases in {d} are unusable:"
  for problem in report.problems:
    assert problem in message


def test_good_folder_has_no_problems(tmp_path):
  records = _write_cases(tmp_path, range(3))
  shutil.copy(tmp_path / "volume-0.nii.gz", tmp_path / "notes-volume-0.nii.gz")  # not a case
  lines = []
  report = verify.verify_folder(tmp_path, log=lines.append)
  assert report.ok and report.problems == [] and report.num_bad_cases == 0
  report.raise_if_bad()
  assert report.num_cases == 3 and report.slices == 3 * CFG.slices
  assert report.cases_without_tumour == sum(r["num_tumours"] == 0 for r in records)
  assert report.cases_without_liver == sum(r["liver_voxels"] == 0 for r in records)
  assert lines[0].startswith("verify: 1/3 cases") and "3/3 cases, 0 unusable" in lines[-2]
  assert lines[-1].startswith("verify: 3 of 3 cases usable")


def test_uncompressed_truncated_volume_is_listed(tmp_path):
  _write_cases(tmp_path, range(2))
  nib.save(nib.load(tmp_path / "volume-1.nii.gz"), tmp_path / "volume-1.nii")
  os.remove(tmp_path / "volume-1.nii.gz")
  _truncate(tmp_path / "volume-1.nii", lambda n: n - 100)
  report = verify.verify_folder(tmp_path, log=None)
  assert len(report.problems) == 1
  assert report.problems[0].startswith(os.fspath(tmp_path / "volume-1.nii") + ":")


def test_empty_folder_is_one_clear_problem(tmp_path):
  (tmp_path / "readme.txt").write_text("not a case")
  report = verify.verify_folder(tmp_path, log=None)
  assert report.num_cases == 0 and len(report.problems) == 1
  assert "no volume-N" in report.problems[0]
  with pytest.raises(lits.CaseError, match=r"^0 of 0 cases in .* are unusable: .*no volume-N"):
    report.raise_if_bad()


def test_missing_folder_raises_naming_it(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(lits.CaseFileNotFoundError, match="nope: LiTS folder does not exist"):
    verify.verify_folder(missing, log=None)
