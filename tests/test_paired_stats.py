"""benchmarks/paired_stats.py: scores from per-case records, paired bootstrap differences."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import paired_stats as ps  # noqa: E402

from curriculum_seg import metrics  # noqa: E402

SEEDS = (0, 1, 2, 3, 4)
N_CASES = 30
R = 2000  # resamples in these tests (the experiment uses ps.N_RESAMPLES)


def record(number, dice, tp=(0, 0, 0), fn=(0, 0, 0), fp=(0, 0, 0), assd=1.0, inter=10,
           pred=20, ref=20, any_tp=None):
  """A case_record-shaped dict; `any` detection = `iou` detection unless any_tp is given."""
  any_tp = tp if any_tp is None else any_tp
  lesions = {"iou": {b: dict(tp=tp[i], fn=fn[i], fp=fp[i]) for i, b in enumerate(ps.BINS)},
             "any": {b: dict(tp=any_tp[i], fn=tp[i] + fn[i] - any_tp[i], fp=fp[i])
                     for i, b in enumerate(ps.BINS)}}
  return dict(case_number=number, dice=dice, intersection=inter, prediction=pred, reference=ref,
              assd=assd, lesions=lesions)


def dice_runs(dice):
  """{seed: CaseTable} from a (seeds, cases) array of per-case Dice."""
  return {s: ps.case_table([record(c, float(dice[i, c])) for c in range(dice.shape[1])])
          for i, s in enumerate(SEEDS)}


def base_dice():
  rng = np.random.default_rng(0)
  case = rng.uniform(0.2, 0.7, N_CASES)
  seed = np.array([-0.1, -0.05, 0.0, 0.05, 0.1])
  return case[None, :] + seed[:, None] + rng.uniform(-0.02, 0.02, (len(SEEDS), N_CASES))


def test_scores_equal_the_evaluate_aggregate_of_the_same_cases():
  """Unit weights give metrics.aggregate's figures: Dice per case and global, ASSD over the
  finite cases, recall and precision per criterion and diameter bin."""
  rng = np.random.default_rng(3)
  shape, spacing = (64, 64, 32), (1.0, 1.0, 1.5)
  grid = np.indices(shape).astype(np.float64) * np.array(spacing)[:, None, None, None]

  def ball(centre, radius):
    return ((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) <= radius ** 2

  cases = []
  for n in range(6):
    ref = np.zeros(shape, np.uint8)
    ref[4:60, 4:60, 2:30] = 1  # liver
    pred = ref.copy()
    lesions = [((14, 14, 12), 3.0), ((40, 16, 20), 7.0), ((30, 44, 22), 12.0),
               ((52, 50, 8), 4.0)][: (0, 1, 2, 3, 4, 2)[n]]
    for i, (centre, radius) in enumerate(lesions):
      ref[ball(centre, radius)] = 2
      shift = rng.uniform(0, 1.6 * radius) if (i + n) % 3 else 0.3 * radius
      if (i + n) % 4 != 3:  # some lesions missed
        pred[ball(np.add(centre, (shift, 0, 0)), radius * rng.uniform(0.7, 1.2))] = 2
    if n == 4:
      pred[ball((50, 30, 30), 2.5)] = 2  # a false positive
    if n == 5:
      pred[pred == 2] = 1  # nothing predicted: ASSD inf
      pred[ball((20, 40, 10), 3.0)] = 0
    scored = metrics.json_safe(metrics.score_case(pred, ref, spacing, case_id=f"case-{n}"))
    cases.append(scored)
  aggregate = metrics.aggregate(cases)
  table = ps.case_table(ps.case_record(c) for c in json.loads(json.dumps(cases)))
  got = ps.point_scores(table)
  t = aggregate["tumour"]
  assert got["dice_per_case"] == pytest.approx(t["dice_per_case"])
  assert got["dice_global"] == pytest.approx(t["dice_global"])
  assert got["assd_mm"] == pytest.approx(t["assd"]["mean"])
  assert got["assd_inf_fraction"] == pytest.approx(t["assd"]["n_infinite"] / len(cases))
  assert t["assd"]["n_infinite"] >= 1
  det = aggregate["detection"]
  checked = 0
  for crit in ps.CRITERIA:
    for kind in ("recall", "precision"):
      want = float(det[crit][kind])
      assert got[f"{kind}_{crit}"] == pytest.approx(want, nan_ok=True)
      for b in ps.BINS:
        want = float(det[crit]["by_diameter"][b][kind])
        assert got[f"{kind}_{crit}_{b}"] == pytest.approx(want, nan_ok=True)
        checked += math.isfinite(want)
  assert checked >= 8
  counts = ps.lesion_counts(table)
  assert counts["all"] == det["num_reference_lesions"]
  assert all(counts[b] == det["iou"]["by_diameter"][b]["num_reference_lesions"] for b in ps.BINS)
  assert all(counts[b] > 0 for b in ps.BINS)


def test_diameter_bins_follow_metrics():
  for d in (0.0, 3.2, 9.999, 10.0, 15.0, 20.0, 20.0001, 45.0):
    assert ps.diameter_bin(d) == metrics._diameter_bin(d)  # pylint: disable=protected-access


def test_a_known_consistent_difference_is_recovered_with_intervals_that_exclude_zero():
  b = base_dice()
  per_seed = np.array([-0.02, -0.01, 0.0, 0.01, 0.02])  # mean 0
  per_case = np.where(np.arange(N_CASES) % 2 == 0, 0.03, -0.03)  # mean 0
  a = b + 0.05 + per_seed[:, None] + per_case[None, :]
  result = ps.compare(dice_runs(a), dice_runs(b), n_resamples=R)
  entry = result["dice_per_case"]
  assert result["seeds"] == list(SEEDS) and entry["seeds"] == list(SEEDS)
  assert entry["estimate"] == pytest.approx(0.05)
  assert entry["differences"] == pytest.approx(list(0.05 + per_seed))
  assert entry["n_positive"] == 5
  for kind in ("over_seeds", "over_cases"):
    iv = entry[kind]
    assert iv["low"] < 0.05 < iv["high"], kind
    assert iv["excludes_zero"] and iv["low"] > 0 and iv["n_undefined"] == 0
  assert entry["over_seeds"]["low"] >= 0.05 - 0.02 and entry["over_seeds"]["high"] <= 0.07
  assert entry["over_cases"]["n_cases"] == N_CASES
  # Same inputs, same intervals (fixed bootstrap seed); another seed moves them slightly.
  again = ps.compare(dice_runs(a), dice_runs(b), n_resamples=R)
  assert again["dice_per_case"] == entry
  other = ps.compare(dice_runs(a), dice_runs(b), n_resamples=R, seed=1)["dice_per_case"]
  assert other["estimate"] == entry["estimate"] and other["over_cases"] != entry["over_cases"]
  # Reversed: the negative difference.
  back = ps.compare(dice_runs(b), dice_runs(a), n_resamples=R)["dice_per_case"]
  assert back["estimate"] == pytest.approx(-0.05)
  assert back["over_cases"]["high"] == pytest.approx(-entry["over_cases"]["low"])


def test_an_inconsistent_difference_has_intervals_that_include_zero():
  b = base_dice()
  per_seed = np.array([0.06, -0.05, 0.04, -0.03, -0.02])
  per_case = np.where(np.arange(N_CASES) % 2 == 0, 0.05, -0.05)
  a = b + per_seed[:, None] + per_case[None, :]
  entry = ps.compare(dice_runs(a), dice_runs(b), n_resamples=R)["dice_per_case"]
  assert entry["estimate"] == pytest.approx(0.0, abs=1e-12)
  assert entry["n_positive"] == 2
  for kind in ("over_seeds", "over_cases"):
    assert entry[kind]["low"] < 0 < entry[kind]["high"] and not entry[kind]["excludes_zero"]


def test_recall_is_a_ratio_of_sums_over_the_resampled_cases():
  """Every case: 2 small, 1 medium, 1 large reference lesion. B detects one small lesion in the
  odd cases; A one more small lesion in two cases of three: recall < 10 mm differs by
  (cases with the extra) / (2 x cases) exactly, and in every case resample by the resampled
  ratio, never by a mean of per-case recalls."""
  def runs(extra):
    out = {}
    for s in SEEDS:
      recs = []
      for c in range(N_CASES):
        small = (c % 2) + (1 if extra and c % 3 else 0)
        recs.append(record(c, 0.5, tp=(small, 1, 0), fn=(2 - small, 0, 1), fp=(1, 0, 0)))
      out[s] = ps.case_table(recs)
    return out
  a, b = runs(True), runs(False)
  extra = sum(1 for c in range(N_CASES) if c % 3)
  result = ps.compare(a, b, n_resamples=R)
  entry = result["recall_iou_<10mm"]
  assert entry["estimate"] == pytest.approx(extra / (2 * N_CASES))
  assert entry["over_seeds"]["low"] == pytest.approx(entry["estimate"])  # identical seeds
  assert entry["over_cases"]["low"] < entry["estimate"] < entry["over_cases"]["high"]
  assert entry["over_cases"]["excludes_zero"]
  # The case interval equals percentiles of the resampled ratios, recomputed here by hand.
  w = ps.resample_weights(N_CASES, R, kind=1)
  small_ref = np.full(N_CASES, 2.0)
  tp_a = np.array([(c % 2) + (1 if c % 3 else 0) for c in range(N_CASES)], np.float64)
  tp_b = np.array([c % 2 for c in range(N_CASES)], np.float64)
  stats = (w @ tp_a - w @ tp_b) / (w @ small_ref)
  assert entry["over_cases"]["low"] == pytest.approx(np.percentile(stats, 2.5))
  assert entry["over_cases"]["high"] == pytest.approx(np.percentile(stats, 97.5))
  assert result["recall_iou_10-20mm"]["estimate"] == 0.0
  assert result["precision_iou"]["estimate"] > 0


def test_breaking_the_seed_pairing_widens_the_seed_interval_to_include_zero():
  """Seeds matter much more than regimes here: paired by seed, the small difference is clear;
  with regime B's seeds shuffled, the same mean difference is lost in the seed spread."""
  rng = np.random.default_rng(1)
  case = rng.uniform(0.3, 0.6, N_CASES)
  seed = np.array([-0.3, -0.15, 0.0, 0.15, 0.3])
  b = case[None, :] + seed[:, None] + 0.1
  a = b + 0.02 + np.array([0.002, -0.001, 0.0, 0.001, -0.002])[:, None]
  runs_a, runs_b = dice_runs(a), dice_runs(b)
  paired = ps.compare(runs_a, runs_b, n_resamples=R)["dice_per_case"]
  shuffled_b = {s: runs_b[t] for s, t in zip(SEEDS, (4, 3, 0, 1, 2))}
  shuffled = ps.compare(runs_a, shuffled_b, n_resamples=R)["dice_per_case"]
  assert paired["estimate"] == pytest.approx(0.02) == shuffled["estimate"]
  assert paired["over_seeds"]["excludes_zero"]
  assert paired["over_seeds"]["high"] - paired["over_seeds"]["low"] < 0.01
  assert not shuffled["over_seeds"]["excludes_zero"]
  assert shuffled["over_seeds"]["high"] - shuffled["over_seeds"]["low"] > 0.1


def test_breaking_the_case_pairing_widens_the_case_interval_to_include_zero():
  rng = np.random.default_rng(2)
  case = rng.uniform(0.05, 0.95, N_CASES)
  b = np.clip(case[None, :] + rng.uniform(-0.01, 0.01, (len(SEEDS), N_CASES)), 0, 0.97)
  a = b + 0.02
  runs_a, runs_b = dice_runs(a), dice_runs(b)
  paired = ps.compare(runs_a, runs_b, n_resamples=R)["dice_per_case"]
  order = rng.permutation(N_CASES)
  unpaired_b = {s: t.permuted(order) for s, t in runs_b.items()}
  unpaired = ps.compare(runs_a, unpaired_b, n_resamples=R)["dice_per_case"]
  assert paired["estimate"] == pytest.approx(0.02) and unpaired["estimate"] == pytest.approx(0.02)
  assert paired["over_cases"]["excludes_zero"]
  assert paired["over_cases"]["high"] - paired["over_cases"]["low"] < 1e-9
  assert not unpaired["over_cases"]["excludes_zero"]
  # The seed interval ignores which case is which.
  assert unpaired["over_seeds"] == pytest.approx(paired["over_seeds"])


def test_undefined_and_infinite_scores():
  """No lesion in a bin: recall nan, difference nan, no error. ASSD inf (one mask empty): left
  out of assd_mm, counted in assd_inf_fraction. A seed whose score is nan is left out."""
  def runs(assd_first, predicted):
    out = {}
    for s in SEEDS[:3]:
      recs = [record(c, 0.5, tp=(1 if predicted or s else 0, 0, 0), fn=(0 if predicted or s else 1,
                                                                       0, 0),
                     assd=assd_first if c == 0 else 2.0 + c) for c in range(4)]
      out[s] = ps.case_table(recs)
    return out
  a, b = runs(math.inf, True), runs(1.0, False)
  point = ps.point_scores(a[0])
  assert point["assd_mm"] == pytest.approx(np.mean([3.0, 4.0, 5.0]))
  assert point["assd_inf_fraction"] == pytest.approx(0.25)
  assert math.isnan(point["recall_iou_>20mm"]) and math.isnan(point["precision_iou_>20mm"])
  assert math.isnan(ps.point_scores(b[0])["precision_iou"])  # nothing predicted, none found
  result = ps.compare(a, b, n_resamples=200)
  json.dumps(metrics.json_safe(result), allow_nan=False)
  big = result["recall_iou_>20mm"]
  assert math.isnan(big["estimate"]) and big["seeds"] == []
  assert big["over_cases"]["n_undefined"] == 200
  assert result["precision_iou"]["seeds"] == [1, 2]  # seed 0 of B: precision undefined
  assert result["assd_inf_fraction"]["estimate"] == pytest.approx(0.25)
  summary = ps.summarise(b)
  assert summary["precision_iou"]["n"] == 2 and summary["dice_per_case"]["n"] == 3
  assert summary["dice_per_case"]["std"] == 0.0


def test_runs_on_different_cases_are_refused():
  a = {0: ps.case_table([record(0, 0.5), record(1, 0.5)])}
  b = {0: ps.case_table([record(0, 0.5), record(2, 0.5)])}
  with pytest.raises(ValueError, match="different test cases"):
    ps.compare(a, b, n_resamples=10)


def test_resample_weights():
  w = ps.resample_weights(7, 50, kind=1)
  assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all()
  assert np.array_equal(w, ps.resample_weights(7, 50, kind=1))
  assert not np.array_equal(w, ps.resample_weights(7, 50, kind=0))
