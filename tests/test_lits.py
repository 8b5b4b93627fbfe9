"""load_case: every storage variant loads to the same arrays; every bad input names its file."""

import gzip
import itertools
import os

import nibabel as nib
import numpy as np
import pytest

from data_pipelines import lits, synthetic

SPACING = (0.8, 0.7, 2.5)


@pytest.fixture(scope="module")
def case_arrays():
  rng = np.random.default_rng(0)
  image = rng.integers(-1024, 2000, size=(12, 10, 6)).astype(np.int16)
  labels = rng.integers(0, 3, size=(12, 10, 6)).astype(np.uint8)
  return image, labels


def _write(tmp_path, image, labels, axcodes, ct, lab, ext=".nii.gz", name="0"):
  v = tmp_path / f"volume-{name}{ext}"
  s = tmp_path / f"segmentation-{name}{ext}"
  nib.save(synthetic.to_nifti(image, SPACING, axcodes, ct), v)
  nib.save(synthetic.to_nifti(labels, SPACING, axcodes, lab, is_label=True), s)
  return v, s


@pytest.mark.parametrize("axcodes", synthetic.ORIENTATIONS + (("S", "P", "R"),))
def test_every_orientation_loads_to_the_canonical_arrays(tmp_path, case_arrays, axcodes):
  image, labels = case_arrays
  v, s = _write(tmp_path, image, labels, axcodes, "int16", "uint8")
  stored = nib.load(v).get_fdata()
  if axcodes != ("R", "A", "S"):
    assert stored.shape != image.shape or not np.array_equal(stored, image)
  case = lits.load_case(v, s)
  np.testing.assert_array_equal(case.image, image)
  np.testing.assert_array_equal(case.labels, labels)
  np.testing.assert_allclose(case.spacing, SPACING, rtol=1e-6)
  assert case.image.dtype == np.int16 and case.labels.dtype == np.uint8
  assert nib.aff2axcodes(case.affine) == ("R", "A", "S")


@pytest.mark.parametrize("ct,lab,ext", list(itertools.product(
    synthetic.CT_STORAGE, synthetic.LABEL_STORAGE, (".nii", ".nii.gz"))))
def test_every_storage_type_loads_to_identical_arrays(tmp_path, case_arrays, ct, lab, ext):
  image, labels = case_arrays
  v, s = _write(tmp_path, image, labels, ("L", "P", "S"), ct, lab, ext)
  case = lits.load_case(v, s)
  np.testing.assert_array_equal(case.image, image)
  np.testing.assert_array_equal(case.labels, labels)
  assert case.image.dtype == np.int16 and case.labels.dtype == np.uint8


def test_float_ct_with_fractional_hu_is_rounded(tmp_path):
  image = np.full((4, 4, 3), 10.4, np.float32)
  image[0] = -3.6
  nib.save(nib.Nifti1Image(image, np.diag([1, 1, 2, 1.0])), tmp_path / "v.nii")
  case = lits.load_case(tmp_path / "v.nii")
  assert case.image[0, 0, 0] == -4 and case.image[1, 1, 1] == 10
  assert case.labels is None


def test_to_original_and_save_mask_restore_the_files_geometry(tmp_path, case_arrays):
  image, labels = case_arrays
  v, s = _write(tmp_path, image, labels, ("P", "L", "I"), "float32_scaled", "int16")
  case = lits.load_case(v, s)
  out = tmp_path / "mask.nii.gz"
  case.save_mask(case.labels, out)
  written = nib.load(out)
  original = nib.load(s)
  assert written.shape == original.shape
  np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(written.dataobj), original.get_fdata().astype(np.uint8))


def test_spacing_in_meters_is_converted_to_mm(tmp_path):
  img = nib.Nifti1Image(np.zeros((4, 4, 3), np.int16), np.diag([0.001, 0.001, 0.003, 1]))
  img.header.set_xyzt_units("meter")
  nib.save(img, tmp_path / "v.nii")
  np.testing.assert_allclose(lits.load_case(tmp_path / "v.nii").spacing, (1, 1, 3), rtol=1e-5)


# --- bad input: each refused with a CaseError naming the file --------------------------------


def _refused(path_named, *args):
  with pytest.raises(lits.CaseError) as e:
    lits.load_case(*args)
  assert str(path_named) in str(e.value)
  return str(e.value)


def test_missing_files(tmp_path, case_arrays):
  msg = _refused(tmp_path / "volume-9.nii", tmp_path / "volume-9.nii")
  assert "does not exist" in msg
  v, _ = _write(tmp_path, *case_arrays, ("R", "A", "S"), "int16", "uint8")
  assert "does not exist" in _refused(tmp_path / "seg.nii", v, tmp_path / "seg.nii")
  with pytest.raises(FileNotFoundError):
    lits.load_case(tmp_path / "nothing.nii")


def test_not_a_nifti_file(tmp_path):
  p = tmp_path / "volume-0.nii"
  p.write_text("this is a CSV, not an image\n1,2,3\n" * 20)
  assert "NIfTI" in _refused(p, p)


def test_truncated_gzip(tmp_path, case_arrays):
  v, _ = _write(tmp_path, *case_arrays, ("R", "A", "S"), "int16", "uint8")
  data = v.read_bytes()
  cut = tmp_path / "volume-1.nii.gz"
  cut.write_bytes(data[: len(data) // 2])
  assert "truncated" in _refused(cut, cut)


def test_gzip_of_garbage(tmp_path):
  p = tmp_path / "volume-0.nii.gz"
  with gzip.open(p, "wb") as f:
    f.write(b"\x00" * 100)
  _refused(p, p)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 4, 2)])
def test_not_3d(tmp_path, shape):
  p = tmp_path / "volume-0.nii"
  nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), p)
  assert "3-D" in _refused(p, p)


def test_trailing_singleton_dimension_is_accepted(tmp_path):
  p = tmp_path / "volume-0.nii"
  nib.save(nib.Nifti1Image(np.ones((5, 4, 3, 1), np.int16), np.eye(4)), p)
  assert lits.load_case(p).image.shape == (5, 4, 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_ct(tmp_path, bad):
  image = np.zeros((6, 6, 40), np.float32)  # more slices than one conversion chunk
  image[2, 3, 37] = bad
  p = tmp_path / "volume-0.nii"
  nib.save(nib.Nifti1Image(image, np.eye(4)), p)
  assert "NaN or infinite" in _refused(p, p)


@pytest.mark.parametrize("dtype,value", [(np.uint8, 3), (np.int16, -1), (np.int16, 255),
                                         (np.float32, 1.5), (np.float32, 4.0),
                                         (np.float32, np.nan)])
def test_label_values_outside_0_1_2(tmp_path, dtype, value):
  v = tmp_path / "volume-0.nii"
  s = tmp_path / "segmentation-0.nii"
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), np.eye(4)), v)
  labels = np.zeros((6, 6, 4), dtype)
  labels[1, 1, 1] = value
  nib.save(nib.Nifti1Image(labels, np.eye(4)), s)
  assert "outside {0, 1, 2}" in _refused(s, v, s)


def test_shape_mismatch(tmp_path):
  v, s = tmp_path / "v.nii", tmp_path / "s.nii"
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), np.eye(4)), v)
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 5), np.uint8), np.eye(4)), s)
  assert "shape" in _refused(s, v, s)


def test_grid_mismatch(tmp_path):
  v, s = tmp_path / "v.nii", tmp_path / "s.nii"
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), np.eye(4)), v)
  shifted = np.eye(4)
  shifted[0, 3] = 5.0
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), shifted), s)
  assert "affine" in _refused(s, v, s)
  flipped = np.diag([-1.0, 1, 1, 1])
  nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), flipped), s)
  _refused(s, v, s)


@pytest.mark.parametrize("zoom", [0.0, np.nan, np.inf])
def test_bad_spacing(tmp_path, zoom):
  p = tmp_path / "volume-0.nii"
  img = nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), np.eye(4))
  img.header["pixdim"][3] = zoom
  nib.save(img, p)
  assert "spacing" in _refused(p, p)


def test_singular_affine(tmp_path):
  p = tmp_path / "volume-0.nii"
  img = nib.Nifti1Image(np.zeros((6, 6, 4), np.int16), np.eye(4))
  img.header["qform_code"] = 0
  img.header["sform_code"] = 2
  img.header["srow_z"] = [0.0, 0.0, 0.0, 0.0]  # z axis collapses: a singular grid
  img.update_header = lambda: None  # keep the header fields exactly as set
  nib.save(img, p)
  assert "singular" in _refused(p, p)


def test_find_cases(tmp_path, case_arrays):
  _write(tmp_path, *case_arrays, ("R", "A", "S"), "int16", "uint8", name="3")
  _write(tmp_path, *case_arrays, ("R", "A", "S"), "int16", "uint8", ext=".nii", name="10")
  (tmp_path / "readme.txt").write_text("x")
  cases = lits.find_cases(tmp_path)
  assert list(cases) == [3, 10]
  assert cases[10][0].name == "volume-10.nii"
  os.remove(tmp_path / "segmentation-3.nii.gz")
  with pytest.raises(lits.CaseError, match=r"without a segmentation.*\[3\]"):
    lits.find_cases(tmp_path)
  with pytest.raises(lits.CaseError, match="does not exist"):
    lits.find_cases(tmp_path / "nope")
