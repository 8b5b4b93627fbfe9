"""The synthetic LiTS-format generator: deterministic, realistic enough, true to its manifest."""

import json
import os

import numpy as np
import pytest
from scipy import ndimage

from data_pipelines import lits, synthetic

SMALL = synthetic.SynthConfig(size=96, slices=24)
SIX = ndimage.generate_binary_structure(3, 1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  out = tmp_path_factory.mktemp("synth")
  manifest = synthetic.synthesise(str(out), 8, seed=3, cfg=SMALL)
  return out, manifest


def test_same_seed_same_case_and_case_independent_of_count():
  a = synthetic.generate_case(5, 2, SMALL)
  b = synthetic.generate_case(5, 2, SMALL)
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["labels"], b["labels"])
  c = synthetic.generate_case(6, 2, SMALL)
  assert not np.array_equal(a["image"], c["image"])


def test_written_cases_load_and_hold_the_manifests_tumours(written):
  out, manifest = written
  assert manifest["num_cases"] == 8 and len(manifest["cases"]) == 8
  assert json.loads((out / "manifest.json").read_text()) == manifest
  for record in manifest["cases"]:
    case = lits.load_case(out / record["volume"], out / record["segmentation"])
    assert list(case.image.shape) == record["shape"]
    np.testing.assert_allclose(case.spacing, record["spacing"], rtol=1e-5)
    comps, n = ndimage.label(case.labels == 2, structure=SIX)
    assert n == record["num_tumours"] == len(record["tumours"])
    for t in record["tumours"]:
      cid = comps[tuple(t["centre_voxel"])]
      assert cid > 0, "a tumour's centre voxel is tumour"
      assert (comps == cid).sum() == t["voxels"]
    # Tumours lie inside the liver region and are never on the liver's outer boundary.
    liver = case.labels >= 1
    assert not (ndimage.binary_dilation(case.labels == 2) & ~liver).any()


def test_storage_varies_like_lits(written):
  _, manifest = written
  cases = manifest["cases"]
  assert len({c["orientation"] for c in cases}) >= 3
  assert len({c["ct_storage"] for c in cases}) >= 2
  assert len({c["label_storage"] for c in cases}) >= 2
  spacings = np.array([c["spacing"] for c in cases])
  assert np.ptp(spacings[:, 0]) > 0 and np.ptp(spacings[:, 2]) > 0
  # LiTS's ranges, scaled from 512 pixels to this grid in-plane.
  assert np.all((spacings[:, 0] >= 0.56 * 512 / 96) & (spacings[:, 0] <= 1.0 * 512 / 96))
  assert np.all((spacings[:, 2] >= 0.45) & (spacings[:, 2] <= 6.0))


def test_tumour_sizes_are_mostly_small_and_some_cases_have_none():
  cfg = synthetic.SynthConfig(size=64, slices=16)
  diameters, empty = [], 0
  for i in range(40):
    tumours = synthetic.generate_case(11, i, cfg)["tumours"]
    empty += not tumours
    diameters += [t["diameter_mm"] for t in tumours]
  diameters = np.array(diameters)
  assert empty >= 1
  assert diameters.min() >= 3.0 and diameters.max() <= 40.0
  assert np.mean(diameters < 10) > 0.5
  assert diameters.max() > 15


def test_anatomy_has_hard_negatives_and_contrast():
  case = synthetic.generate_case(0, 1, synthetic.SynthConfig(size=128, slices=32))
  hu, lab = case["image"].astype(np.float32), case["labels"]
  liver = lab == 1
  liver_hu = np.median(hu[liver])
  assert 60 < liver_hu < 160, "contrast-enhanced parenchyma"
  body = hu > -500
  outside = body & (lab == 0)
  # Organs of liver-like density outside the liver (spleen, bowel): many voxels within 15 HU.
  assert (np.abs(hu[outside] - liver_hu) < 15).sum() > 0.1 * liver.sum()
  assert (hu < -900).mean() > 0.1, "air around the body"
  assert (hu > 400).sum() > 100, "bone"
  assert ((hu > -150) & (hu < -50)).sum() > 1000, "fat"


def test_large_tumours_contrast_with_the_parenchyma():
  cfg = synthetic.SynthConfig(size=128, slices=32)
  for i in range(20):  # the first case holding a tumour large enough to have an interior
    case = synthetic.generate_case(2, i, cfg)
    big = [t for t in case["tumours"] if t["equivalent_diameter_mm"] > 15]
    if big:
      break
  else:
    pytest.fail("no tumour over 15 mm in 20 cases")
  hu, lab = case["image"].astype(np.float32), case["labels"]
  comps, _ = ndimage.label(lab == 2, structure=SIX)
  interior = ndimage.binary_erosion(comps == comps[tuple(big[0]["centre_voxel"])])
  assert abs(np.median(hu[interior]) - np.median(hu[lab == 1])) > 20


def test_ensure_synthetic_reuses_a_complete_folder_and_redoes_an_incomplete_one(tmp_path):
  cfg = synthetic.SynthConfig(size=64, slices=12)
  first = synthetic.ensure_synthetic(str(tmp_path), 2, 0, cfg)
  mtime = os.path.getmtime(tmp_path / "volume-1.nii.gz")
  assert synthetic.ensure_synthetic(str(tmp_path), 2, 0, cfg) == first
  assert os.path.getmtime(tmp_path / "volume-1.nii.gz") == mtime
  os.remove(tmp_path / "manifest.json")  # as after an interrupted run
  assert synthetic.read_manifest(str(tmp_path)) is None
  assert synthetic.ensure_synthetic(str(tmp_path), 2, 0, cfg)["cases"] == first["cases"]
  assert synthetic.ensure_synthetic(str(tmp_path), 3, 0, cfg)["num_cases"] == 3


def test_bad_generator_settings():
  with pytest.raises(ValueError, match="size"):
    synthetic.SynthConfig(size=8)
  with pytest.raises(ValueError, match="num_cases"):
    synthetic.synthesise("/tmp/unused", 0, 0)
