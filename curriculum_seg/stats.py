"""Paired statistics of a sweep: scores per run, mean ± std over seeds per regime, and paired
differences between regimes with intervals over seeds and test cases together. numpy and scipy.

Input: for every run (regime, seed) the per-case records of its scored cases (`case_record` of
each `cases[*]` entry of `evaluate_run`'s result), gathered into a `CaseTable`.

Every score of a run is a ratio of sums over its cases, score = Σ_c num_c / Σ_c den_c:
  dice_per_case         num Dice_c, den 1 (a case's tumour Dice is 1 when both masks are empty)
  dice_global           num 2|A∩B|_c, den |A|_c + |B|_c; 1 when the denominator sums to 0
  recall_CRIT[_BIN]     num TP_c, den TP_c + FN_c: reference lesions detected / reference lesions,
                        pooled over the cases, of every size or of diameter bin BIN
  precision_CRIT[_BIN]  num TP_c, den TP_c + FP_c (TP counts reference lesions, the LiTS merge
                        rule; FP the predicted components matched to no detected lesion; per bin,
                        TP by the reference lesion's diameter, FP by the component's own)
  fp_per_case_CRIT[_BIN] num FP_c, den 1: false positive components per case
  assd_mm               num ASSD_c, den 1, over the cases whose tumour ASSD is finite
  assd_inf_fraction     num [ASSD_c infinite], den 1: the share of cases where exactly one of the
                        predicted and reference tumour masks is empty (left out of assd_mm)
CRIT: "iou" (the lesion's group has IoU > 0.5 with its prediction) or "any" (any overlap). BIN:
metrics.DIAMETER_BINS of the reference lesion's `diameter_mm`. A ratio with a zero denominator
is nan (no lesion of that bin). These equal `metrics.aggregate`'s figures for the same cases.

Paired differences between regimes (`compare`) have variance-components t intervals over seeds
and test cases together (`crossed_interval` says how and why).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from curriculum_seg import metrics

BINS = tuple(name for name, _, _ in metrics.DIAMETER_BINS)
CRITERIA = metrics.CRITERIA
LEVEL = 0.95
METHOD = ("variance-components t interval over seeds and test cases together (two-way random "
          "effects, Satterthwaite df; ratios of sums linearised); curriculum_seg/stats.py")


def _metric_list():
  out = [("dice_per_case", "tumour Dice per case", True, 3),
         ("dice_global", "tumour Dice global", True, 3)]
  names = {"iou": "IoU>0.5", "any": "any overlap"}
  for crit in CRITERIA:
    out.append((f"recall_{crit}", f"recall all ({names[crit]})", True, 2))
    out += [(f"recall_{crit}_{b}", f"recall {b} ({names[crit]})", True, 2) for b in BINS]
    out.append((f"precision_{crit}", f"precision all ({names[crit]})", True, 2))
    out += [(f"precision_{crit}_{b}", f"precision {b} ({names[crit]})", True, 2) for b in BINS]
    out.append((f"fp_per_case_{crit}", f"FP per case ({names[crit]})", False, 2))
    out += [(f"fp_per_case_{crit}_{b}", f"FP per case {b} ({names[crit]})", False, 2)
            for b in BINS]
  out += [("assd_mm", "tumour ASSD (mm)", False, 2),
          ("assd_inf_fraction", "share of cases with ASSD inf", False, 2)]
  return tuple(out)


# (key, label, higher is better, digits) of every score.
METRICS = _metric_list()
METRIC_KEYS = tuple(m[0] for m in METRICS)


def as_float(value) -> float:
  """A JSON value as a float ("inf"/"nan" strings, as metrics.json_safe writes them, included)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


# --------------------------------------------------------------------------- per-case records

def case_record(case: Mapping[str, Any]) -> dict:
  """The per-case values a sweep keeps of one `cases[*]` entry of `evaluate_run`'s result:
  case number, tumour Dice, overlap counts and ASSD, liver Dice (None for a tumour-only
  network), every reference lesion (diameter, volume, its group's IoU, detected at IoU > 0.5 and
  at any overlap) and the false positive components per criterion and diameter bin (their count
  only: a noisy prediction can have thousands). ASSD may be inf (write with metrics.json_safe)."""
  tumour, det = case["tumour"], case["detection"]
  fps = {crit: {b: 0 for b in BINS} for crit in CRITERIA}
  for rec in det["predicted_lesions"]:
    b = metrics.diameter_bin(as_float(rec["diameter_mm"]))
    for crit in CRITERIA:
      if not rec[f"tp_{crit}"]:
        fps[crit][b] += 1
  lesions = [dict(diameter_mm=as_float(r["diameter_mm"]), volume_mm3=as_float(r["volume_mm3"]),
                  iou=as_float(r["iou"]), detected_iou=bool(r["detected_iou"]),
                  detected_any=bool(r["detected_any"])) for r in det["reference_lesions"]]
  counts = tumour["counts"]
  number = case.get("case_number")
  if number is None:  # "case-N"
    number = int(str(case["case_id"]).rsplit("-", 1)[-1])
  liver = case.get("liver")
  return dict(case_number=int(number), dice=as_float(tumour["dice"]),
              intersection=int(counts["intersection"]), prediction=int(counts["prediction"]),
              reference=int(counts["reference"]), assd=as_float(tumour["assd"]),
              liver_dice=None if liver is None else as_float(liver["dice"]),
              reference_lesions=lesions, num_predicted=int(det["num_predicted"]),
              false_positives=fps)


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
    raise ValueError("a run without scored cases")
  numbers = np.array([int(r["case_number"]) for r in records])
  if np.unique(numbers).size != numbers.size:
    raise ValueError(f"a case is listed twice: {numbers.tolist()}")
  n, k = len(records), len(BINS)
  tp = {c: np.zeros((n, k), np.int64) for c in CRITERIA}
  fn = {c: np.zeros((n, k), np.int64) for c in CRITERIA}
  fp = {c: np.zeros((n, k), np.int64) for c in CRITERIA}
  for i, r in enumerate(records):
    for lesion in r["reference_lesions"]:
      j = BINS.index(metrics.diameter_bin(as_float(lesion["diameter_mm"])))
      for c in CRITERIA:
        (tp if lesion[f"detected_{c}"] else fn)[c][i, j] += 1
    for c in CRITERIA:
      fp[c][i] = [int(r["false_positives"][c][b]) for b in BINS]
  col = lambda key: np.array([as_float(r[key]) for r in records], np.float64)  # noqa: E731
  count = lambda key: np.array([int(r[key]) for r in records], np.int64)  # noqa: E731
  return CaseTable(numbers, col("dice"), count("intersection"), count("prediction"),
                   count("reference"), col("assd"), tp, fn, fp)


def lesion_counts(table: CaseTable) -> dict[str, int]:
  """Reference lesions per diameter bin (and "all") over the table's cases."""
  n = table.tp["iou"] + table.fn["iou"]
  return dict({b: int(n[:, i].sum()) for i, b in enumerate(BINS)}, all=int(n.sum()))


# --------------------------------------------------------------------------- scores

def score_parts(table: CaseTable) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
  """{key: (num, den, empty)} of every score: per-case numerators and denominators (float
  arrays over the cases) and the score when the denominators sum to 0 (nan: undefined)."""
  ones = np.ones(table.num_cases)
  finite = np.isfinite(table.assd)
  out = dict(dice_per_case=(table.dice, ones, math.nan),
             dice_global=(2.0 * table.intersection,
                          (table.prediction + table.reference).astype(np.float64), 1.0))
  for crit in CRITERIA:
    tp, fn, fp = (x[crit].astype(np.float64) for x in (table.tp, table.fn, table.fp))
    out[f"recall_{crit}"] = (tp.sum(1), tp.sum(1) + fn.sum(1), math.nan)
    out[f"precision_{crit}"] = (tp.sum(1), tp.sum(1) + fp.sum(1), math.nan)
    out[f"fp_per_case_{crit}"] = (fp.sum(1), ones, math.nan)
    for i, b in enumerate(BINS):
      out[f"recall_{crit}_{b}"] = (tp[:, i], tp[:, i] + fn[:, i], math.nan)
      out[f"precision_{crit}_{b}"] = (tp[:, i], tp[:, i] + fp[:, i], math.nan)
      out[f"fp_per_case_{crit}_{b}"] = (fp[:, i], ones, math.nan)
  out["assd_mm"] = (np.where(finite, table.assd, 0.0), finite.astype(np.float64), math.nan)
  out["assd_inf_fraction"] = (np.isinf(table.assd).astype(np.float64), ones, math.nan)
  return {k: (np.asarray(out[k][0], np.float64), np.asarray(out[k][1], np.float64), out[k][2])
          for k in METRIC_KEYS}


def ratio(num: np.ndarray, den: np.ndarray, empty: float = math.nan) -> np.ndarray:
  """Σ num / Σ den over the last axis; `empty` where Σ den is 0."""
  n, d = np.asarray(num, np.float64).sum(-1), np.asarray(den, np.float64).sum(-1)
  out = np.full(np.shape(d), empty, np.float64)
  np.divide(n, d, out=out, where=d > 0)
  return out


def point_scores(table: CaseTable) -> dict[str, float]:
  """Every score on all of the run's cases."""
  return {k: float(ratio(num, den, empty)) for k, (num, den, empty) in score_parts(table).items()}


def pseudo_values(num: np.ndarray, den: np.ndarray, empty: float = math.nan) -> np.ndarray:
  """Per-case values whose mean over the last axis (the cases) is the ratio of sums: the
  ratio plus each case's linearised influence, (num − R den) / mean(den). Arrays (..., cases);
  a ratio whose denominators sum to 0 gives `empty` in every case."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  r = ratio(num, den, empty)[..., None]
  mean_den = den.mean(-1, keepdims=True)
  influence = np.zeros(np.broadcast_shapes(num.shape, den.shape))
  np.divide(num - r * den, mean_den, out=influence, where=mean_den > 0)
  return r + influence


# --------------------------------------------------------------------------- intervals

def crossed_interval(y: np.ndarray, level: float = LEVEL) -> dict[str, np.ndarray]:
  """The variance-components t interval of the grand mean of y (..., seeds, cases), vectorised
  over the leading axes. Returns arrays: estimate, low, high, se, df, and the estimated parts of
  the mean's variance var_seed (σ_s²/S), var_case (σ_c²/n) and var_interaction (σ_e²/(S n)),
  each clipped at 0.

  Paired difference A − B of a score (`compare`). The seeds S that both regimes ran (and where
  both scores are defined) and the n test cases are crossed: every seed's run is scored on every
  case, so a difference varies with the seeds drawn, with the cases drawn and with their
  interaction. The estimate is the mean over S of d_s = score(A, s) − score(B, s). Its interval is
  a variance-components (two-way random effects) t interval:
    1. Pseudo-values (linearisation): y_sc = R_s + (num_sc − R_s den_sc) / mean_c(den_sc), R_s a
       run's ratio, so mean_c y_sc = R_s exactly and y is the per-case score itself for per-case
       means; Y_sc = y_sc(A) − y_sc(B) (a ratio of sums thus counts every lesion once per case).
    2. Two-way ANOVA without replication of Y: mean squares of seeds MS_s (|S| − 1 df), of cases
       MS_c (n − 1 df) and of their interaction MS_e ((|S| − 1)(n − 1) df). The variance of the
       grand mean under crossed random seed, case and interaction effects,
       σ_s²/|S| + σ_c²/n + σ_e²/(|S| n), is estimated without bias by
       V = (MS_s + MS_c − MS_e) / (|S| n), with Satterthwaite's degrees of freedom
       ν = (MS_s + MS_c − MS_e)² / (MS_s²/(|S|−1) + MS_c²/(n−1) + MS_e²/((|S|−1)(n−1))).
       V is never taken below max(MS_s, MS_c) / (|S| n) (each is at most V in expectation; then ν is
       that mean square's df), so it is never negative.
    3. Interval: estimate ± t(0.975, ν) √V. `excludes_zero`: it lies above or below 0.
  With one seed (or one case) the seed (case) variation cannot be measured: the interval is then
  the one-way t interval over the cases (seeds) and `seed_variation` says so.
  Why not resample: with a handful of seeds a bootstrap over seeds, alone or crossed with cases,
  reads its percentiles off a few distinct seed draws and undercovers when seeds matter; the t
  quantile with few degrees of freedom is what corrects that. tests/test_stats.py simulates null
  data sets with seed, case and interaction effects, for per-case means and lesion ratios, and
  checks that the interval covers about 95 % of them.
  """
  y = np.asarray(y, np.float64)
  s, n = y.shape[-2:]
  mean = y.mean((-2, -1))
  if s < 1 or n < 1:
    raise ValueError(f"no values: {s} seeds, {n} cases")
  seed_means, case_means = y.mean(-1), y.mean(-2)
  nan = np.full(mean.shape, math.nan)
  if s > 1 and n > 1:
    ms_seed = n * ((seed_means - mean[..., None]) ** 2).sum(-1) / (s - 1)
    ms_case = s * ((case_means - mean[..., None]) ** 2).sum(-1) / (n - 1)
    resid = y - seed_means[..., :, None] - case_means[..., None, :] + mean[..., None, None]
    ms_err = (resid ** 2).sum((-2, -1)) / ((s - 1) * (n - 1))
    combined = ms_seed + ms_case - ms_err
    floor = np.maximum(ms_seed, ms_case)
    full = combined >= floor
    var = np.where(full, combined, floor) / (s * n)
    with np.errstate(divide="ignore", invalid="ignore"):
      df_full = combined ** 2 / (ms_seed ** 2 / (s - 1) + ms_case ** 2 / (n - 1)
                                 + ms_err ** 2 / ((s - 1) * (n - 1)))
    df = np.where(full, df_full, np.where(ms_seed >= ms_case, s - 1, n - 1)).astype(np.float64)
    df = np.where(np.isfinite(df), df, min(s, n) - 1.0)  # every y equal: V 0, any df
    parts = dict(var_seed=np.maximum(ms_seed - ms_err, 0.0) / (s * n),
                 var_case=np.maximum(ms_case - ms_err, 0.0) / (s * n),
                 var_interaction=ms_err / (s * n))
  elif s > 1 or n > 1:  # one seed (or one case): a one-way interval over the other factor
    means, k = (case_means, n) if s == 1 else (seed_means, s)
    var = ((means - mean[..., None]) ** 2).sum(-1) / (k - 1) / k
    df = np.full(mean.shape, k - 1.0)
    parts = dict(var_seed=var if s > 1 else nan, var_case=var if n > 1 else nan,
                 var_interaction=nan)
  else:
    var, df = nan, nan
    parts = dict(var_seed=nan, var_case=nan, var_interaction=nan)
  se = np.sqrt(var)
  half = scipy_stats.t.ppf(0.5 + level / 2, df) * se
  return dict(estimate=mean, low=mean - half, high=mean + half, se=se, df=df, **parts)


# --------------------------------------------------------------------------- over seeds

def _mean_std(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return dict(mean=float(v.mean()) if v.size else math.nan,
              std=float(v.std(ddof=1)) if v.size > 1 else (0.0 if v.size else math.nan),
              n=int(v.size))


def summarise(runs: Mapping[int, CaseTable]) -> dict:
  """One regime: {key: {mean, std, n, values, seeds}} over its runs (seed -> CaseTable); a seed
  with a nan score is left out of that score's mean and std (`n` counts the rest)."""
  seeds = sorted(runs)
  points = {s: point_scores(runs[s]) for s in seeds}
  return {key: dict(_mean_std([points[s][key] for s in seeds]),
                    values=[points[s][key] for s in seeds], seeds=seeds)
          for key in METRIC_KEYS}


# --------------------------------------------------------------------------- paired differences

def _check_cases(tables: Iterable[CaseTable]) -> np.ndarray:
  tables = list(tables)
  numbers = tables[0].case_numbers
  for t in tables[1:]:
    if not np.array_equal(t.case_numbers, numbers):
      raise ValueError("the runs were scored on different cases: "
                       f"{numbers.tolist()} vs {t.case_numbers.tolist()}")
  return numbers


def compare(runs_a: Mapping[int, CaseTable], runs_b: Mapping[int, CaseTable], *,
            level: float = LEVEL, metrics_keys: Sequence[str] = METRIC_KEYS) -> dict:
  """Paired differences A − B of every score with their crossed intervals (the module
  docstring gives the method). `runs_a`, `runs_b`: seed -> CaseTable.

  Returns {key: dict(estimate, seeds, differences, n_positive, interval=dict(low, high, level,
  se, df, excludes_zero, n_seeds, n_cases, seed_variation, variance=dict(seed, case,
  interaction)))} plus "seeds" (the seeds both ran) and "level". estimate and interval are nan
  when no seed has both scores.
  """
  seeds = sorted(set(runs_a) & set(runs_b))
  result: dict[str, Any] = dict(seeds=seeds, level=float(level))
  if not seeds:
    return result
  numbers = _check_cases([runs_a[s] for s in seeds] + [runs_b[s] for s in seeds])
  parts_a = {s: score_parts(runs_a[s]) for s in seeds}
  parts_b = {s: score_parts(runs_b[s]) for s in seeds}
  for key in metrics_keys:
    ya = np.stack([pseudo_values(*parts_a[s][key]) for s in seeds])  # (seeds, cases)
    yb = np.stack([pseudo_values(*parts_b[s][key]) for s in seeds])
    diffs = ya.mean(1) - yb.mean(1)
    ok = np.isfinite(diffs)
    used = [s for s, good in zip(seeds, ok) if good]
    entry = dict(seeds=used, differences=[float(d) for d in diffs[ok]],
                 n_positive=int((diffs[ok] > 0).sum()))
    interval = dict(level=float(level), n_seeds=len(used), n_cases=int(numbers.size),
                    seed_variation=len(used) > 1)
    if not used:
      entry.update(estimate=math.nan)
      interval.update(low=math.nan, high=math.nan, se=math.nan, df=math.nan,
                      excludes_zero=False,
                      variance=dict(seed=math.nan, case=math.nan, interaction=math.nan))
    else:
      iv = {k: float(v) for k, v in crossed_interval(ya[ok] - yb[ok], level).items()}
      entry.update(estimate=iv["estimate"])
      defined = math.isfinite(iv["low"]) and math.isfinite(iv["high"])
      interval.update(low=iv["low"], high=iv["high"], se=iv["se"], df=iv["df"],
                      excludes_zero=bool(defined and (iv["low"] > 0 or iv["high"] < 0)),
                      variance=dict(seed=iv["var_seed"], case=iv["var_case"],
                                    interaction=iv["var_interaction"]))
    entry["interval"] = interval
    result[key] = entry
  return result
