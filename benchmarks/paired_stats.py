"""Paired statistics of the curriculum experiment (issue 14): scores per run, mean ± std over
seeds, and paired differences between regimes with 95 % bootstrap intervals over seeds and over
test cases. Pure numpy; no JAX.

Input: for every run (regime, seed), the per-case records of its test cases (`case_record` of
each `cases[*]` entry of `curriculum-seg evaluate`'s metrics.json), gathered into a `CaseTable`.

Scores of one run on a set of cases (w_c: a weight per case; 1 for every case, or in a bootstrap
resample the number of times case c was drawn):
  dice_per_case        Σ w_c Dice_c / Σ w_c (a case's tumour Dice is 1 when both masks are empty,
                       as curriculum_seg/metrics.py)
  dice_global          2 Σ w_c |A∩B|_c / Σ w_c (|A|_c + |B|_c); 1 when that sum is 0
  recall_CRIT[_BIN]    Σ w_c TP_c / Σ w_c (TP_c + FN_c): reference lesions detected / reference
                       lesions, pooled over the cases (a ratio of sums, so every lesion counts once
                       per draw of its case), of every size or of the diameter bin BIN
  precision_CRIT[_BIN] Σ w_c TP_c / Σ w_c (TP_c + FP_c); TP counts reference lesions (the LiTS
                       merge rule), FP the predicted components matched to no detected lesion; per
                       bin, TP by the reference lesion's diameter and FP by the predicted
                       component's own diameter (as metrics.aggregate)
  assd_mm              tumour ASSD, Σ w_c ASSD_c / Σ w_c over the cases whose ASSD is finite (both
                       masks non-empty, or both empty: 0); nan when there is none
  assd_inf_fraction    Σ w_c [ASSD_c infinite] / Σ w_c: the share of cases where exactly one of
                       the predicted and reference tumour masks is empty (ASSD undefined: metrics.py
                       makes it inf); reported beside assd_mm, which leaves these cases out
CRIT: "iou" (the lesion's group has IoU > 0.5 with its prediction) or "any" (any overlap). BIN:
the reference lesion's `diameter_mm` (longest axial diameter, as evaluate measures it) in
"<10mm" [0, 10), "10-20mm" [10, 20] or ">20mm" (20, inf), metrics.DIAMETER_BINS' rule. A ratio with
a zero denominator is nan (no lesion of that bin; no predicted and no detected lesion). With every
weight 1 the scores equal `metrics.aggregate`'s figures for the same cases (tested).

Per regime (`summarise`): mean and standard deviation (ddof 1; 0 for one seed) over its seeds of
each run's score on all test cases; a seed whose score is nan is left out (`n` counts the rest).

Paired difference A − B (`compare`; e.g. A = three_stage, B = whole_only), for each score:
  d_s      = score(A, seed s) − score(B, seed s) on all test cases, for the seeds S that both
             regimes ran and where both scores are finite (seed s of both regimes shares the
             initialisation and the data order where the curricula share them);
  estimate = mean over S of d_s; `n_positive`: how many d_s are > 0.
  (a) over seeds: R resamples, each |S| seeds drawn with replacement from S (each seed's A and
      B stay together); statistic = mean of d_s over the drawn seeds.
  (b) over test cases: R resamples, each n test cases drawn with replacement from the n test
      cases; the same drawn cases (with their multiplicities as the weights w_c) for both
      regimes and every seed, so the comparison stays paired by case and by seed; each run's
      score is recomputed from its per-case values on the drawn cases (ratios of sums as above);
      statistic = mean over S of the differences. The seeds are held fixed: (b) measures how much
      the difference depends on which test cases were drawn, (a) on which seeds were run.
  Interval: the 2.5th and 97.5th percentiles of the R statistics (percentile bootstrap;
  numpy.percentile, linear interpolation). A resample whose statistic is undefined (nan: e.g. no
  reference lesion of a bin among the drawn cases, or a run with no finite ASSD there) is left
  out of the percentiles and counted in `n_undefined`. `excludes_zero`: the interval lies
  entirely above or below 0.
  R = N_RESAMPLES (10,000); the resamples come from numpy.random.default_rng([BOOTSTRAP_SEED,
  kind, n]) (kind 0: seeds, 1: cases; n: how many are drawn from), so the same runs always
  give the same intervals, and every score and comparison with the same n uses the same
  resamples.
Caveats. (a) with few seeds is too narrow: 5 seeds give at most 126 distinct resamples, and the
percentile interval of a mean of so few values undercovers. Simulated (independent standard
normal seed differences with no true difference, 2,000 data sets, 10,000 resamples each), the
95 % seed interval excluded 0 for 24.9 % of the data sets with 3 seeds, 16.0 % with 5 and 9.6 %
with 10: read a seed interval that barely excludes 0 with 5 seeds as weak evidence. (b) holds
the seeds fixed, so it leaves out the seed-to-seed variation (that is (a)'s part); it treats the
test cases as a sample from the generator, which they are (more cases of the same synthetic
generator).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

BINS = ("<10mm", "10-20mm", ">20mm")
CRITERIA = ("iou", "any")
N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 14
INTERVAL = (2.5, 97.5)  # percentiles: a 95 % interval


def _metric_list():
  out = [("dice_per_case", "tumour Dice per case", True, 3),
         ("dice_global", "tumour Dice global", True, 3)]
  names = {"iou": "IoU>0.5", "any": "any overlap"}
  for crit in CRITERIA:
    out.append((f"recall_{crit}", f"recall all ({names[crit]})", True, 2))
    out += [(f"recall_{crit}_{b}", f"recall {b} ({names[crit]})", True, 2) for b in BINS]
    out.append((f"precision_{crit}", f"precision all ({names[crit]})", True, 2))
    out += [(f"precision_{crit}_{b}", f"precision {b} ({names[crit]})", True, 2) for b in BINS]
  out += [("assd_mm", "tumour ASSD (mm)", False, 2),
          ("assd_inf_fraction", "share of cases with ASSD inf", False, 2)]
  return tuple(out)


# (key, label, higher is better, digits) of every score `scores` computes.
METRICS = _metric_list()
METRIC_KEYS = tuple(m[0] for m in METRICS)


def diameter_bin(diameter_mm: float) -> str:
  """The bin of a lesion diameter: metrics.DIAMETER_BINS' rule (20 mm itself is in 10-20mm)."""
  d = float(diameter_mm)
  if not d >= 0:
    raise ValueError(f"diameter {diameter_mm} is in no bin")
  if d < 10.0:
    return BINS[0]
  return BINS[1] if d <= 20.0 else BINS[2]


def _float(value) -> float:
  """A JSON value as a float ("inf"/"nan" strings, as metrics.json_safe writes them, included)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


# --------------------------------------------------------------------------- per-case values

def case_record(case: Mapping[str, Any]) -> dict:
  """The per-case values the statistics need, from one `cases[*]` entry of evaluate's output:
  case number, tumour Dice, overlap counts, ASSD, and per criterion and diameter bin the counts
  tp and fn (reference lesions) and fp (unmatched predicted components). JSON-serialisable,
  except that ASSD may be inf (write it with a converter such as metrics.json_safe)."""
  tumour, det = case["tumour"], case["detection"]
  lesions = {crit: {b: dict(tp=0, fn=0, fp=0) for b in BINS} for crit in CRITERIA}
  for rec in det["reference_lesions"]:
    b = diameter_bin(rec["diameter_mm"])
    for crit in CRITERIA:
      lesions[crit][b]["tp" if rec[f"detected_{crit}"] else "fn"] += 1
  for rec in det["predicted_lesions"]:
    b = diameter_bin(rec["diameter_mm"])
    for crit in CRITERIA:
      if not rec[f"tp_{crit}"]:
        lesions[crit][b]["fp"] += 1
  counts = tumour["counts"]
  number = case.get("case_number")
  if number is None:  # "case-N"
    number = int(str(case["case_id"]).rsplit("-", 1)[-1])
  return dict(case_number=int(number), dice=_float(tumour["dice"]),
              intersection=int(counts["intersection"]), prediction=int(counts["prediction"]),
              reference=int(counts["reference"]), assd=_float(tumour["assd"]), lesions=lesions)


@dataclasses.dataclass(frozen=True)
class CaseTable:
  """One run's per-case values as arrays over its cases (sorted by case number).

  tp, fn, fp: {criterion: int array (cases, len(BINS))}.
  """

  case_numbers: np.ndarray
  dice: np.ndarray
  intersection: np.ndarray
  prediction: np.ndarray
  reference: np.ndarray
  assd: np.ndarray
  tp: dict
  fn: dict
  fp: dict

  @property
  def num_cases(self) -> int:
    return int(self.case_numbers.size)

  def permuted(self, order: Sequence[int]) -> "CaseTable":
    """The same case numbers with the values of cases `order` (tests: breaking the pairing)."""
    order = np.asarray(order)
    pick = lambda a: a[order]  # noqa: E731
    return CaseTable(self.case_numbers, *(pick(getattr(self, f)) for f in (
        "dice", "intersection", "prediction", "reference", "assd")),
        *({c: pick(d[c]) for c in CRITERIA} for d in (self.tp, self.fn, self.fp)))


def case_table(records: Iterable[Mapping[str, Any]]) -> CaseTable:
  """A CaseTable of `case_record` dicts (as written to JSON: "inf" strings are read back)."""
  records = sorted(records, key=lambda r: int(r["case_number"]))
  if not records:
    raise ValueError("a run without test cases")
  numbers = np.array([int(r["case_number"]) for r in records])
  if np.unique(numbers).size != numbers.size:
    raise ValueError(f"a case is listed twice: {numbers.tolist()}")
  col = lambda key, dtype: np.array([_float(r[key]) if dtype is float else int(r[key])  # noqa
                                     for r in records], dtype=dtype)
  lesion = lambda kind: {crit: np.array([[int(r["lesions"][crit][b][kind]) for b in BINS]  # noqa
                                         for r in records], dtype=np.int64) for crit in CRITERIA}
  return CaseTable(numbers, col("dice", float), col("intersection", np.int64),
                   col("prediction", np.int64), col("reference", np.int64), col("assd", float),
                   lesion("tp"), lesion("fn"), lesion("fp"))


# --------------------------------------------------------------------------- scores

def _ratio(num: np.ndarray, den: np.ndarray, empty: float = math.nan) -> np.ndarray:
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  out = np.full(np.broadcast(num, den).shape, empty, dtype=np.float64)
  np.divide(num, den, out=out, where=den > 0)
  return out


def scores(table: CaseTable, weights: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """Every score of METRICS for each row of `weights` (shape (R, cases): a weight per case, e.g.
  a bootstrap resample's multiplicities); None: one row of ones (all cases once). Returns
  {key: float array (R,)}."""
  n = table.num_cases
  w = np.ones((1, n)) if weights is None else np.asarray(weights, np.float64)
  if w.ndim != 2 or w.shape[1] != n:
    raise ValueError(f"weights of shape {w.shape} for {n} cases")
  total = w.sum(axis=1)
  out = dict(dice_per_case=_ratio(w @ table.dice, total),
             dice_global=_ratio(2.0 * (w @ table.intersection),
                                w @ (table.prediction + table.reference), empty=1.0))
  for crit in CRITERIA:
    tp, fn, fp = (w @ x[crit] for x in (table.tp, table.fn, table.fp))  # (R, bins)
    out[f"recall_{crit}"] = _ratio(tp.sum(1), tp.sum(1) + fn.sum(1))
    out[f"precision_{crit}"] = _ratio(tp.sum(1), tp.sum(1) + fp.sum(1))
    for i, b in enumerate(BINS):
      out[f"recall_{crit}_{b}"] = _ratio(tp[:, i], tp[:, i] + fn[:, i])
      out[f"precision_{crit}_{b}"] = _ratio(tp[:, i], tp[:, i] + fp[:, i])
  finite = np.isfinite(table.assd)
  out["assd_mm"] = _ratio(w @ np.where(finite, table.assd, 0.0), w @ finite)
  out["assd_inf_fraction"] = _ratio(w @ np.isinf(table.assd), total)
  return {k: out[k] for k in METRIC_KEYS}


def point_scores(table: CaseTable) -> dict[str, float]:
  """Every score on all of the run's cases, each case once."""
  return {k: float(v[0]) for k, v in scores(table).items()}


def lesion_counts(table: CaseTable) -> dict[str, int]:
  """Reference lesions per diameter bin (and "all") over the table's cases."""
  n = table.tp["iou"] + table.fn["iou"]
  return dict({b: int(n[:, i].sum()) for i, b in enumerate(BINS)}, all=int(n.sum()))


# --------------------------------------------------------------------------- over seeds

def _mean_std(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return dict(mean=float(v.mean()) if v.size else math.nan,
              std=float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else math.nan),
              n=int(v.size))


def summarise(runs: Mapping[int, CaseTable]) -> dict:
  """One regime: {key: {mean, std, n, values, seeds}} over its runs (seed -> CaseTable); a seed
  with a nan score is left out of that score's mean and std."""
  seeds = sorted(runs)
  points = {s: point_scores(runs[s]) for s in seeds}
  out = {}
  for key in METRIC_KEYS:
    values = [points[s][key] for s in seeds]
    out[key] = dict(_mean_std(values), values=values, seeds=seeds)
  return out


# --------------------------------------------------------------------------- paired differences

def resample_weights(n: int, n_resamples: int, kind: int, seed: int = BOOTSTRAP_SEED
                     ) -> np.ndarray:
  """(n_resamples, n) counts: how often each of n items is drawn in each resample of n draws
  with replacement, from numpy.random.default_rng([seed, kind, n])."""
  if n < 1:
    raise ValueError("nothing to resample")
  rng = np.random.default_rng([int(seed), int(kind), int(n)])
  return rng.multinomial(n, np.full(n, 1.0 / n), size=int(n_resamples)).astype(np.float64)


def _interval(stats: np.ndarray) -> dict:
  finite = stats[np.isfinite(stats)]
  if not finite.size:
    return dict(low=math.nan, high=math.nan, n_undefined=int(stats.size), excludes_zero=False)
  low, high = (float(x) for x in np.percentile(finite, INTERVAL))
  return dict(low=low, high=high, n_undefined=int(stats.size - finite.size),
              excludes_zero=bool(low > 0 or high < 0))


def _check_cases(tables: Iterable[CaseTable]) -> np.ndarray:
  tables = list(tables)
  numbers = tables[0].case_numbers
  for t in tables[1:]:
    if not np.array_equal(t.case_numbers, numbers):
      raise ValueError("the runs were scored on different test cases: "
                       f"{numbers.tolist()} vs {t.case_numbers.tolist()}")
  return numbers


def compare(runs_a: Mapping[int, CaseTable], runs_b: Mapping[int, CaseTable], *,
            n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
            metrics: Sequence[str] = METRIC_KEYS) -> dict:
  """Paired differences A − B of every score, with bootstrap intervals over seeds and over
  test cases (the module docstring gives the method). `runs_a`, `runs_b`: seed -> CaseTable.

  Returns {key: dict(estimate, seeds, differences, n_positive, over_seeds=dict(low, high,
  n_undefined, excludes_zero), over_cases=dict(same, n_cases))} plus "seeds" (the paired
  seeds) and "n_resamples"; estimate and intervals are nan when no seed has both scores.
  """
  seeds = sorted(set(runs_a) & set(runs_b))
  result: dict[str, Any] = dict(seeds=seeds, n_resamples=int(n_resamples))
  if not seeds:
    return result
  numbers = _check_cases([runs_a[s] for s in seeds] + [runs_b[s] for s in seeds])
  case_w = resample_weights(numbers.size, n_resamples, kind=1, seed=seed)
  boot_a = {s: scores(runs_a[s], case_w) for s in seeds}
  boot_b = {s: scores(runs_b[s], case_w) for s in seeds}
  point_a = {s: point_scores(runs_a[s]) for s in seeds}
  point_b = {s: point_scores(runs_b[s]) for s in seeds}
  for key in metrics:
    diffs = np.array([point_a[s][key] - point_b[s][key] for s in seeds])
    ok = np.isfinite(diffs)
    used = [s for s, good in zip(seeds, ok) if good]
    entry = dict(seeds=used, differences=[float(d) for d in diffs[ok]],
                 n_positive=int((diffs[ok] > 0).sum()))
    if not used:
      nan = dict(low=math.nan, high=math.nan, n_undefined=int(n_resamples),
                 excludes_zero=False)
      entry.update(estimate=math.nan, over_seeds=dict(nan),
                   over_cases=dict(nan, n_cases=int(numbers.size)))
    else:
      d = diffs[ok]
      seed_w = resample_weights(d.size, n_resamples, kind=0, seed=seed)
      over_seeds = _interval(seed_w @ d / d.size)
      per_case = np.stack([boot_a[s][key] - boot_b[s][key] for s in used])  # (seeds, R)
      over_cases = _interval(per_case.mean(axis=0))  # nan if any seed is undefined there
      entry.update(estimate=float(d.mean()), over_seeds=over_seeds,
                   over_cases=dict(over_cases, n_cases=int(numbers.size)))
    result[key] = entry
  return result
