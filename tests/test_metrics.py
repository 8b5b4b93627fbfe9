"""metrics: agreement with independent implementations, LiTS conventions, detection, aggregation."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage, spatial

from curriculum_seg import metrics

SPACING = (0.7, 0.8, 2.5)  # anisotropic, mm per array axis


def _blobs(rng, shape, threshold, sigma=1.5):
  """Random smooth blobs (several components, touching the border now and then)."""
  noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
  return noise > threshold * noise.std()


def _brute_force_distances(pred, ref, spacing):
  """Independent reference: scipy erosion for the surfaces, all pairwise distances for the rest."""
  structure = ndimage.generate_binary_structure(3, 2)
  surf_p = pred & ~ndimage.binary_erosion(pred, structure=structure)
  surf_r = ref & ~ndimage.binary_erosion(ref, structure=structure)
  pts_p = np.argwhere(surf_p) * np.asarray(spacing)
  pts_r = np.argwhere(surf_r) * np.asarray(spacing)
  dist = spatial.distance.cdist(pts_p, pts_r)
  return dist.min(axis=1), dist.min(axis=0)


def _brute_force_scores(pred, ref, spacing):
  d_p, d_r = _brute_force_distances(pred, ref, spacing)
  d = np.concatenate([d_p, d_r])
  return dict(assd=d.mean(), msd=d.max(), rmsd=np.sqrt(np.mean(d ** 2)))


def _random_pairs(n, shape=(22, 18, 10)):
  rng = np.random.default_rng(1234)
  pairs = []
  for _ in range(n):
    ref = _blobs(rng, shape, 0.6)
    pred = _blobs(rng, shape, 0.6) | (ref & (rng.random(shape) > 0.3))
    pairs.append((pred, ref))
  return pairs


# ----------------------------------------------------------------------------- surfaces

def test_erosion_matches_scipy_including_the_array_border():
  rng = np.random.default_rng(0)
  for shape in [(7, 9, 5), (1, 6, 6), (12, 3, 8)]:
    mask = rng.random(shape) > 0.25
    expected = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 2))
    np.testing.assert_array_equal(metrics.binary_erosion_18(mask), expected)


def test_full_array_mask_has_its_border_as_surface():
  full = np.ones((5, 6, 7), dtype=bool)
  surface = metrics.surface_voxels(full)
  assert surface.sum() == full.size - 3 * 4 * 5
  assert not surface[1:-1, 1:-1, 1:-1].any()
  scores = metrics.case_scores(full, full, SPACING)
  assert scores["assd"] == scores["msd"] == scores["rmsd"] == 0.0
  assert scores["dice"] == 1.0 and scores["rvd"] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_surface_scores_match_brute_force(seed):
  pred, ref = _random_pairs(6)[seed]
  assert pred.any() and ref.any()
  got = metrics.case_scores(pred, ref, SPACING)
  expected = _brute_force_scores(pred, ref, SPACING)
  for key in ("assd", "msd", "rmsd"):
    assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


def test_surface_scores_match_medpy():
  binary = pytest.importorskip("medpy.metric.binary")
  structure = ndimage.generate_binary_structure(3, 2)
  for pred, ref in _random_pairs(4):
    got = metrics.case_scores(pred, ref, SPACING)
    assert got["msd"] == pytest.approx(binary.hd(pred, ref, voxelspacing=SPACING, connectivity=2))
    # medpy's assd is the mean of the two directed means; LiTS pools all distances, so weight the
    # directed means (medpy asd) by the surface sizes.
    n_p = np.count_nonzero(pred & ~ndimage.binary_erosion(pred, structure=structure))
    n_r = np.count_nonzero(ref & ~ndimage.binary_erosion(ref, structure=structure))
    pooled = (n_p * binary.asd(pred, ref, voxelspacing=SPACING, connectivity=2)
              + n_r * binary.asd(ref, pred, voxelspacing=SPACING, connectivity=2)) / (n_p + n_r)
    assert got["assd"] == pytest.approx(pooled, rel=1e-12)
    assert got["dice"] == pytest.approx(binary.dc(pred, ref), rel=1e-12)
    assert got["jaccard"] == pytest.approx(binary.jc(pred, ref), rel=1e-12)
    # medpy ravd(result, reference) = (|result| - |reference|) / |reference|.
    assert got["rvd"] == pytest.approx(binary.ravd(pred, ref), rel=1e-12)
    assert got["rvd_scorer"] == pytest.approx(binary.ravd(ref, pred), rel=1e-12)


def test_kdtree_and_distance_transform_agree_and_cropping_changes_nothing():
  for pred, ref in _random_pairs(3, shape=(30, 26, 14)):
    ref = ref.copy()
    ref[0, 5:15, 3:9] = True  # touches the array border
    pred = pred.copy()
    pred[-1, :, -1] = True
    kd = metrics.surface_distances(pred, ref, SPACING)
    for crop, method in [(False, "kdtree"), (True, "edt"), (False, "edt")]:
      other = metrics.surface_distances(pred, ref, SPACING, crop=crop, method=method)
      for a, b in zip(kd, other):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_cropped_scores_equal_whole_volume_brute_force_wherever_the_masks_sit():
  pred, ref = _random_pairs(1, shape=(16, 14, 8))[0]
  assert pred[0].any() or ref[0].any() or pred[-1].any() or ref[-1].any()  # touches the border
  small = metrics.case_scores(pred, ref, SPACING)
  assert small == pytest.approx(dict(small, **_brute_force_scores(pred, ref, SPACING)), rel=1e-12)
  for offset in [(0, 0, 0), (5, 3, 7), (34, 26, 22)]:  # low corner, inside, high corner
    big_p = np.zeros((50, 40, 30), dtype=bool)
    big_r = np.zeros_like(big_p)
    sl = tuple(slice(o, o + n) for o, n in zip(offset, pred.shape))
    big_p[sl], big_r[sl] = pred, ref
    big = metrics.case_scores(big_p, big_r, SPACING)
    expected = _brute_force_scores(big_p, big_r, SPACING)  # uncropped, independent
    for key in ("assd", "msd", "rmsd"):
      assert big[key] == pytest.approx(expected[key], rel=1e-12), (offset, key)
    for key in ("dice", "jaccard", "voe", "rvd", "rvd_scorer"):
      assert big[key] == pytest.approx(small[key], rel=1e-12), (offset, key)


# ----------------------------------------------------------------------------- conventions

def test_both_empty():
  empty = np.zeros((4, 5, 6), dtype=bool)
  s = metrics.case_scores(empty, empty, SPACING)
  assert (s["dice"], s["jaccard"], s["voe"]) == (1.0, 1.0, 0.0)
  assert (s["assd"], s["msd"], s["rmsd"]) == (0.0, 0.0, 0.0)
  assert math.isnan(s["rvd"]) and math.isnan(s["rvd_scorer"])
  assert set(metrics.CASE_SCORE_KEYS) <= set(s)


def test_exactly_one_empty():
  empty = np.zeros((4, 5, 6), dtype=bool)
  mask = empty.copy()
  mask[1:3, 1:3, 2:5] = True
  missed = metrics.case_scores(empty, mask, SPACING)  # empty prediction
  assert missed["dice"] == missed["jaccard"] == 0.0 and missed["voe"] == 1.0
  assert missed["rvd"] == -1.0 and math.isnan(missed["rvd_scorer"])
  assert missed["assd"] == missed["msd"] == missed["rmsd"] == math.inf
  spurious = metrics.case_scores(mask, empty, SPACING)  # empty reference
  assert math.isnan(spurious["rvd"]) and spurious["rvd_scorer"] == -1.0
  assert spurious["assd"] == math.inf
  with pytest.raises(ValueError):
    metrics.surface_distances(mask, empty, SPACING)


def test_overlap_scores_by_hand():
  ref = np.zeros((6, 6, 6), dtype=bool)
  ref[0:4, 0:2, 0:1] = True  # 8 voxels
  pred = np.zeros_like(ref)
  pred[2:6, 0:2, 0:1] = True  # 8 voxels, 4 shared
  s = metrics.case_scores(pred, ref, (1, 1, 1))
  assert s["dice"] == pytest.approx(0.5)
  assert s["jaccard"] == pytest.approx(4 / 12) and s["voe"] == pytest.approx(8 / 12)
  assert s["rvd"] == 0.0
  pred[5, 5, 5] = True  # 9 voxels
  s = metrics.case_scores(pred, ref, (1, 1, 1))
  assert s["rvd"] == pytest.approx(1 / 8) and s["rvd_scorer"] == pytest.approx(-1 / 9)


def test_bad_inputs_are_refused():
  a = np.zeros((3, 3, 3), dtype=bool)
  with pytest.raises(ValueError, match="differs"):
    metrics.case_scores(a, np.zeros((3, 3, 4), dtype=bool), SPACING)
  with pytest.raises(ValueError, match="spacing"):
    metrics.case_scores(a, a, (1.0, 0.0, 1.0))
  with pytest.raises(ValueError, match="3-D"):
    metrics.case_scores(a[0], a[0], SPACING)


def test_dice_global_pools_cases():
  r1 = np.zeros((4, 4, 4), dtype=bool)
  r1[:2] = True  # 32
  p1 = np.zeros_like(r1)
  p1[1:3] = True  # 32, 16 shared
  empty = np.zeros_like(r1)
  assert metrics.dice_global([(p1, r1), (empty, empty)]) == pytest.approx(32 / 64)
  counts = [metrics.overlap_counts(p1, r1), metrics.overlap_counts(r1, empty)]
  assert metrics.dice_global(counts) == pytest.approx(32 / 96)
  assert metrics.dice_global([(empty, empty)]) == 1.0


# ----------------------------------------------------------------------------- detection

def _box(mask, *slices):
  mask[tuple(slices)] = True


def _counts(result, crit):
  return tuple(result[crit][k] for k in ("tp", "fp", "fn"))


def test_two_reference_lesions_merged_by_one_prediction():
  ref = np.zeros((12, 8, 5), dtype=bool)
  _box(ref, slice(2, 5), slice(2, 5), slice(1, 4))
  _box(ref, slice(6, 9), slice(2, 5), slice(1, 4))
  pred = np.zeros_like(ref)
  _box(pred, slice(2, 9), slice(2, 5), slice(1, 4))  # IoU of the merged group 54/63
  r = metrics.detect_lesions(pred, ref, (1, 1, 1))
  assert (r["num_reference"], r["num_predicted"]) == (2, 1)
  assert _counts(r, "iou") == (2, 0, 0) and _counts(r, "any") == (2, 0, 0)
  assert (r["merge_errors"], r["split_errors"]) == (1, 0)
  groups = {rec["group"] for rec in r["reference_lesions"]}
  assert len(groups) == 1
  assert r["reference_lesions"][0]["iou"] == pytest.approx(54 / 63)


def test_one_reference_lesion_split_into_two_predictions():
  ref = np.zeros((12, 8, 5), dtype=bool)
  _box(ref, slice(2, 10), slice(2, 5), slice(1, 4))  # 72 voxels
  pred = np.zeros_like(ref)
  _box(pred, slice(2, 5), slice(2, 5), slice(1, 4))  # 27, alone IoU 0.375
  _box(pred, slice(7, 10), slice(2, 5), slice(1, 4))  # 27
  r = metrics.detect_lesions(pred, ref, (1, 1, 1))
  assert _counts(r, "iou") == (1, 0, 0)  # merged predictions: IoU 54/72 = 0.75
  assert (r["merge_errors"], r["split_errors"]) == (0, 1)
  assert all(rec["tp_iou"] for rec in r["predicted_lesions"])
  assert r["reference_lesions"][0]["iou"] == pytest.approx(0.75)


@pytest.mark.parametrize("n_pred, detected", [(9, False), (10, False), (11, True)])
def test_iou_threshold_is_strict(n_pred, detected):
  ref = np.zeros((25, 3, 3), dtype=bool)
  ref[0:20, 1, 1] = True  # 20 voxels
  pred = np.zeros_like(ref)
  pred[0:n_pred, 1, 1] = True  # IoU n/20: 0.45, exactly 0.5, 0.55
  r = metrics.detect_lesions(pred, ref, (1, 1, 1))
  assert _counts(r, "iou") == ((1, 0, 0) if detected else (0, 1, 1))
  assert _counts(r, "any") == (1, 0, 0)
  assert r["reference_lesions"][0]["detected_iou"] is detected


def test_false_positive_missed_lesion_and_poor_overlap_together():
  ref = np.zeros((30, 30, 6), dtype=bool)
  pred = np.zeros_like(ref)
  _box(ref, slice(1, 5), slice(1, 5), slice(1, 3))  # found well
  _box(pred, slice(1, 5), slice(1, 5), slice(1, 3))
  _box(ref, slice(10, 14), slice(1, 5), slice(1, 3))  # missed
  _box(pred, slice(20, 23), slice(20, 23), slice(2, 4))  # false positive
  _box(ref, slice(1, 11), slice(15, 25), slice(1, 2))  # 100 voxels, overlapped by 20: IoU 0.2
  _box(pred, slice(1, 3), slice(15, 25), slice(1, 2))
  r = metrics.detect_lesions(pred, ref, (1, 1, 1))
  assert (r["num_reference"], r["num_predicted"]) == (3, 3)
  assert _counts(r, "iou") == (1, 2, 2)
  assert _counts(r, "any") == (2, 1, 1)
  assert (r["merge_errors"], r["split_errors"]) == (0, 0)
  assert [rec["detected_iou"] for rec in r["reference_lesions"]].count(True) == 1


def test_prediction_overlapping_two_lesions_goes_to_the_one_it_overlaps_most():
  ref = np.zeros((20, 6, 3), dtype=bool)
  _box(ref, slice(0, 8), slice(1, 3), slice(1, 2))  # g1, 16 voxels
  _box(ref, slice(10, 14), slice(1, 3), slice(1, 2))  # g2, 8 voxels
  pred = np.zeros_like(ref)
  _box(pred, slice(0, 11), slice(1, 3), slice(1, 2))  # p1: 16 of g1, 2 of g2
  _box(pred, slice(12, 14), slice(1, 3), slice(1, 2))  # p2: 4 of g2 -> owns g2 (no merge)
  r = metrics.detect_lesions(pred, ref, (1, 1, 1))
  assert r["merge_errors"] == 0
  g1, g2 = r["reference_lesions"]
  assert g1["group"] != g2["group"]
  assert g1["iou"] == pytest.approx(16 / 22)  # p1 (22 voxels) vs g1
  assert g2["iou"] == pytest.approx(4 / 8)  # p2 vs g2: exactly 0.5, not detected
  assert _counts(r, "iou") == (1, 1, 1)


def test_lesions_are_six_connected_and_empty_inputs_count_nothing():
  ref = np.zeros((6, 6, 6), dtype=bool)
  ref[1, 1, 1] = ref[2, 2, 1] = True  # diagonal neighbours: two lesions
  pred = np.zeros_like(ref)
  r = metrics.detect_lesions(pred, ref, (1, 1, 1))
  assert r["num_reference"] == 2 and _counts(r, "any") == (0, 0, 2)
  r = metrics.detect_lesions(pred, pred, (1, 1, 1))
  assert _counts(r, "iou") == (0, 0, 0) and r["reference_lesions"] == []


def test_lesion_diameters():
  mask = np.zeros((12, 8, 4), dtype=bool)
  mask[1:11, 2:6, 1:3] = True  # 10 x 4 pixels, 2 slices
  d = metrics.lesion_diameters(mask, (0.5, 1.0, 3.0))
  assert d["volume_mm3"] == pytest.approx(80 * 1.5)
  assert d["diameter_mm"] == pytest.approx(math.hypot(5.0, 4.0))
  assert d["equivalent_diameter_mm"] == pytest.approx((6 * 120 / math.pi) ** (1 / 3))
  disk = np.zeros((41, 41, 1), dtype=bool)
  yy, xx = np.mgrid[-20:21, -20:21]
  disk[..., 0] = yy ** 2 + xx ** 2 <= 15 ** 2
  d = metrics.lesion_diameters(disk, (1.0, 1.0, 1.0))
  assert 30.0 <= d["diameter_mm"] <= 31.5


# ----------------------------------------------------------------------------- burden, aggregate

def test_tumour_burden():
  labels = np.zeros((4, 5, 5), dtype=np.uint8)
  labels[0:2] = 1  # 50 liver
  labels[0, 0:2] = 2  # 10 tumour (inside the liver count)
  assert metrics.tumour_burden(labels) == pytest.approx(10 / 50)
  assert math.isnan(metrics.tumour_burden(np.zeros_like(labels)))
  b = metrics.burden_scores(np.zeros_like(labels), labels)
  assert b == {"reference": pytest.approx(0.2), "prediction": 0.0, "error": pytest.approx(-0.2)}


def _hand_cases():
  shape, spacing = (30, 30, 4), (1.0, 1.0, 2.0)
  ref1 = np.zeros(shape, dtype=np.uint8)
  ref1[0:20, 0:20, :] = 1  # 1600 liver voxels
  ref1[2:6, 2:6, 0:2] = 2  # L1: 32 voxels, axial diameter sqrt(32) = 5.66 mm
  ref1[8:20, 8:20, 1:3] = 2  # L2: 288 voxels, axial diameter sqrt(288) = 16.97 mm
  pred1 = ref1.copy()
  pred1[8:20, 8:20, 1:3] = 1  # L2 missed
  pred1[25:28, 25:28, 0] = 2  # false positive, 9 voxels, diameter sqrt(18) = 4.24 mm
  ref2 = np.zeros(shape, dtype=np.uint8)
  ref2[0:20, 0:20, :] = 1  # no tumour, predicted perfectly
  ref3 = ref2.copy()
  pred3 = ref2.copy()
  pred3[3:5, 3:5, 0] = 2  # tumour where there is none: surface distances infinite
  return [metrics.score_case(p, r, spacing, case_id=str(i))
          for i, (p, r) in enumerate([(pred1, ref1), (ref2, ref2), (pred3, ref3)])]


def test_aggregate_by_hand():
  cases = _hand_cases()
  agg = metrics.aggregate(cases)
  json.dumps(agg, allow_nan=False)
  tumour = agg["tumour"]
  dice1 = 2 * 32 / (320 + 41)
  assert tumour["dice_per_case"] == pytest.approx((dice1 + 1 + 0) / 3)
  assert tumour["dice_global"] == pytest.approx(2 * 32 / (320 + 41 + 4))
  assert tumour["dice"]["std"] == pytest.approx(np.std([dice1, 1, 0]))
  assert tumour["assd"]["n"] == 2 and tumour["assd"]["n_infinite"] == 1
  assert tumour["msd"]["mean"] == pytest.approx(cases[0]["tumour"]["msd"] / 2)
  assert tumour["rvd"]["n"] == 1 and tumour["rvd"]["n_undefined"] == 2
  assert tumour["rvd"]["mean"] == pytest.approx((41 - 320) / 320)
  assert agg["liver"]["dice_per_case"] < 1.0

  det = agg["detection"]
  assert (det["num_reference_lesions"], det["num_predicted_lesions"]) == (2, 3)
  iou = det["iou"]
  assert (iou["tp"], iou["fp"], iou["fn"]) == (1, 2, 1)
  assert iou["precision"] == pytest.approx(1 / 3) and iou["recall"] == pytest.approx(0.5)
  assert iou["f1"] == pytest.approx(0.4)
  small, medium, large = (iou["by_diameter"][k] for k in ("<10mm", "10-20mm", ">20mm"))
  assert (small["tp"], small["fp"], small["fn"]) == (1, 2, 0)  # both false positives are small
  assert small["recall"] == 1.0 and small["f1"] == pytest.approx(0.5)
  assert (medium["tp"], medium["fp"], medium["fn"]) == (0, 0, 1)
  assert medium["recall"] == 0.0 and medium["precision"] == "nan" and medium["f1"] == "nan"
  assert large["num_reference_lesions"] == 0 and large["recall"] == "nan"
  assert det["any"]["tp"] == 1

  e1 = 41 / 1609 - 320 / 1600
  e3 = 4 / 1600
  burden = agg["burden"]
  assert burden["rmse"] == pytest.approx(math.sqrt((e1 ** 2 + e3 ** 2) / 3))
  assert burden["max_error"] == pytest.approx(abs(e1)) and burden["n"] == 3


def test_aggregate_counts_undefined_burden_and_json_safe_round_trips():
  labels = np.zeros((6, 6, 3), dtype=np.uint8)
  case = metrics.score_case(labels, labels, (1, 1, 1))
  agg = metrics.aggregate([case])
  assert agg["burden"]["n_undefined"] == 1 and agg["burden"]["rmse"] == "nan"
  assert agg["tumour"]["dice_global"] == 1.0
  safe = metrics.json_safe({"a": math.inf, "b": [np.float32(-np.inf), np.nan], "c": np.int64(3),
                            "d": np.bool_(True), "e": None})
  assert safe == {"a": "inf", "b": ["-inf", "nan"], "c": 3, "d": True, "e": None}
  assert json.loads(json.dumps(metrics.json_safe(case), allow_nan=False))["case_id"] is None


@pytest.mark.parametrize("axial_axis", [2, 0])
def test_component_records_shortcut_matches_lesion_diameters(axial_axis):
  """The bounding-box-diagonal shortcut gives exactly the per-lesion measurement."""
  rng = np.random.default_rng(7)
  mask = ndimage.binary_opening(rng.random((50, 40, 16)) < 0.3) | (rng.random((50, 40, 16)) < 0.05)
  labels, n = ndimage.label(mask, structure=metrics.LESION_STRUCTURE)
  spacing = np.array([0.7, 0.9, 2.5])
  fast = metrics._component_records(labels, n, spacing, axial_axis)
  slow = [metrics.lesion_diameters(labels[sl] == i + 1, spacing, axial_axis)
          for i, sl in enumerate(ndimage.find_objects(labels))]
  assert n > 500 and len(fast) == n
  for a, b in zip(fast, slow):
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
