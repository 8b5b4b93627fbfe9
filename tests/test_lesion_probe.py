"""experiments/lesion_probe.py: per-lesion contrast and probabilities, and the threshold sweep,
on hand-made volumes with known answers (no training)."""

import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import lesion_probe  # noqa: E402  pylint: disable=wrong-import-position
from curriculum_seg import metrics  # noqa: E402  pylint: disable=wrong-import-position


def _volume():
  """A liver at 100 HU with a dark lesion (60 HU, 3x3x3) and a bright one (150 HU, 2x2x2)."""
  labels = np.zeros((24, 24, 8), np.uint8)
  labels[2:22, 2:22, 1:7] = 1
  image = np.full(labels.shape, -100, np.int16)
  image[labels == 1] = 100
  labels[4:7, 4:7, 2:5] = 2
  image[4:7, 4:7, 2:5] = 60
  labels[14:16, 14:16, 3:5] = 2
  image[14:16, 14:16, 3:5] = 150
  prob = np.zeros(labels.shape, np.float32)
  prob[4:7, 4:7, 2:5] = 0.9   # the dark lesion is seen
  prob[14:16, 14:16, 3:5] = 0.2  # the bright one only faintly
  return labels, image, prob


def test_lesion_rows_measure_contrast_and_probability():
  labels, image, prob = _volume()
  rows = lesion_probe.lesion_rows(prob, labels, image, "case-0")
  assert [r["voxels"] for r in rows] == [27, 8]  # detect_lesions' order (first voxel)
  assert [r["contrast_hu"] for r in rows] == pytest.approx([-40.0, 50.0])
  assert [r["max_prob"] for r in rows] == pytest.approx([0.9, 0.2])
  assert [r["mean_prob"] for r in rows] == pytest.approx([0.9, 0.2])
  no_liver = np.where(labels == 1, 0, labels).astype(np.uint8)
  assert all(math.isnan(r["contrast_hu"])
             for r in lesion_probe.lesion_rows(prob, no_liver, image, "case-0"))
  with pytest.raises(ValueError, match="case-0: probability"):
    lesion_probe.lesion_rows(prob[:-1], labels, image, "case-0")


def test_a_lower_threshold_finds_the_faint_lesion():
  labels, _, prob = _volume()
  argmax = np.where(prob > 0.5, 2, np.where(labels >= 1, 1, 0)).astype(np.uint8)
  per_threshold = {}
  for t in ("argmax", 0.5, 0.1):
    pred = lesion_probe.thresholded(argmax, prob, t, predicts_liver=True)
    assert ((pred >= 1) == (argmax >= 1)).all(), "the liver is kept"
    per_threshold[t] = [metrics.json_safe(metrics.score_case(pred, labels, (2.0, 2.0, 2.0)))]
  rows = {r["threshold"]: r for r in lesion_probe.sweep_summary(per_threshold, large_mm=1.0)}
  assert rows["argmax"]["large"] == 2
  assert (rows["argmax"]["large_found_iou"], rows[0.5]["large_found_iou"]) == (1, 1)
  assert rows[0.1]["large_found_iou"] == rows[0.1]["large_found_any"] == 2
  assert rows[0.1]["dice_global"] == pytest.approx(1.0)
  assert rows["argmax"]["dice_global"] == pytest.approx(2 * 27 / (27 + 35))
  tumour_only = lesion_probe.thresholded(np.where(argmax == 1, 0, argmax).astype(np.uint8),
                                         prob, 0.95, predicts_liver=False)
  assert not tumour_only.any(), "lost tumour becomes background without a liver"


def test_thresholds_are_checked():
  args = lesion_probe.parse_args(["--workdir", "w", "--thresholds", "argmax,0.3"])
  assert args.thresholds == ["argmax", 0.3]
  for bad in ("0.3,high", "1.5"):
    with pytest.raises(SystemExit):
      lesion_probe.parse_args(["--workdir", "w", "--thresholds", bad])
