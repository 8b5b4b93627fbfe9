"""`curriculum-seg compare`: a sweep's results rebuilt from its finished runs' records alone.

Reads DIR/records/*.json and DIR/sweep.json (the plan; without it every record is used and
--reference is required) and writes into DIR:
  results.json  per regime, mean ± std over seeds of every score of curriculum_seg/stats.py; the
                paired differences of the reference regime against every other one with their
                intervals over seeds and test cases together; the scored cases and their
                reference lesions per size; each run's scores
  results.md    the tables
  results.png   scores per regime (bars: mean ± std over seeds; dots: seeds)
  differences.png  the paired differences of the reference and every other regime with their
                intervals (the headline picture: one panel a score, one row a regime)
  val_dice.png  validation tumour Dice against the global step per regime (mean over seeds,
                band: min-max)
Nothing of the invocation (time, machine, folder) goes in, so the same records give the same
files: the sweep writes them after every finished run, and `compare` on a copy of the records
(small enough to commit) gives them again.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Callable, Optional

import numpy as np

from curriculum_seg import metrics, rundir, stats, sweep_folder

BINS = stats.BINS
LABELS = {k: label for k, label, _, _ in stats.METRICS}
DIGITS = {k: digits for k, _, _, digits in stats.METRICS}
HIGHER_IS_BETTER = {k: higher for k, _, higher, _ in stats.METRICS}
# Columns of the per-regime table and rows of the differences table (results.json has every
# score of stats.METRICS).
TABLE_METRICS = ("dice_per_case", "dice_global", *[f"recall_iou_{b}" for b in BINS],
                 *[f"recall_any_{b}" for b in BINS], "precision_iou", "fp_per_case_iou",
                 "precision_any", "assd_mm")
DIFF_METRICS = ("dice_per_case", "dice_global", "recall_iou", *[f"recall_iou_{b}" for b in BINS],
                "recall_any", *[f"recall_any_{b}" for b in BINS], "precision_iou",
                "fp_per_case_iou", "precision_any", "fp_per_case_any", "assd_mm",
                "assd_inf_fraction")
RESULT_FILES = ("results.json", "results.md", "results.png", "differences.png", "val_dice.png")
# The panels of differences.png: Dice, lesion recall per size bin, precision, FP per case.
PLOT_DIFFERENCES = ("dice_per_case", "dice_global", *[f"recall_iou_{b}" for b in BINS],
                    "precision_iou", "fp_per_case_iou")


class CompareError(Exception):
  """Records that cannot be compared as asked; the one-line message says why."""


# --------------------------------------------------------------------------- results

def _regimes(plan: Optional[dict], records: list[dict]) -> list[str]:
  seen = list(dict.fromkeys(r["regime"] for r in records))
  if plan is None:
    return seen
  return list(plan["regimes"]) + [r for r in seen if r not in plan["regimes"]]


def _tables(records: list[dict], regime: str) -> dict:
  return {r["seed"]: stats.case_table(r["cases"]) for r in records if r["regime"] == regime}


def build_results(plan: Optional[dict], records: dict[str, dict],
                  reference: Optional[str] = None) -> dict:
  """results.json's content from the plan (or None) and the records (by run name)."""
  reference = reference or (plan or {}).get("reference")
  if plan is not None:
    planned = [r["name"] for r in plan["runs"]]
    rows = [records[n] for n in planned if n in records]
  else:
    planned = sorted(records)
    rows = [records[n] for n in planned]
  if not rows:
    raise CompareError("no finished run to compare")
  regimes = [g for g in _regimes(plan, rows) if any(r["regime"] == g for r in rows)]
  if reference is None:
    raise CompareError("no reference regime: give --reference (one of "
                       f"{', '.join(regimes)})")
  if reference not in regimes:
    raise CompareError(f"--reference {reference}: no finished run of that regime (regimes with "
                       f"finished runs: {', '.join(regimes)})")
  order = {g: i for i, g in enumerate(regimes)}
  rows.sort(key=lambda r: (order[r["regime"]], r["seed"], r["name"]))
  for regime in regimes:
    seeds = [r["seed"] for r in rows if r["regime"] == regime]
    if len(set(seeds)) != len(seeds):
      raise CompareError(f"regime {regime} has two finished runs of one seed "
                         f"({sorted(seeds)}); the comparison pairs runs by seed")
  first = rows[0]
  for r in rows[1:]:
    if r.get("scored_on") != first.get("scored_on") or r["case_numbers"] != first["case_numbers"]:
      raise CompareError(f"runs {first['name']} and {r['name']} were scored on different cases")
  lesions = stats.lesion_counts(stats.case_table(first["cases"]))
  for r in rows[1:]:
    if stats.lesion_counts(stats.case_table(r["cases"])) != lesions:
      raise CompareError(f"runs {first['name']} and {r['name']} see different reference "
                         "lesions on the same cases")
  summary = {}
  for regime in regimes:
    mine = [r for r in rows if r["regime"] == regime]
    timed = [r["train_seconds"] for r in mine if r.get("train_seconds") is not None]
    summary[regime] = dict(seeds=[r["seed"] for r in mine],
                           train_seconds=float(np.mean(timed)) if timed else math.nan,
                           **stats.summarise(_tables(mine, regime)))
  comparisons = {}
  ref_tables = _tables(rows, reference)
  for other in regimes:
    if other != reference:
      result = stats.compare(ref_tables, _tables(rows, other))
      comparisons[f"{reference} - {other}"] = dict(result, a=reference, b=other)
  steps = sorted({r["total_steps"] for r in rows})
  results = dict(
      config=(plan or {}).get("config"), command=(plan or {}).get("command"),
      reference=reference, regimes=regimes, seeds=sorted({r["seed"] for r in rows}),
      total_steps=steps[0] if len(steps) == 1 else steps,
      planned_runs=len(planned), finished_runs=len(rows), complete=len(rows) == len(planned),
      data=dict(scored_on=first.get("scored_on"), case_numbers=first["case_numbers"],
                lesions_per_bin=lesions),
      statistics=dict(method=stats.METHOD, level=stats.LEVEL),
      summary=summary, comparisons=comparisons,
      runs=[dict(name=r["name"], regime=r["regime"], seed=r["seed"],
                 config_file=r.get("config_file"), config_digest=r.get("config_digest"),
                 total_steps=r["total_steps"], stages=r.get("stages"),
                 scores=stats.point_scores(stats.case_table(r["cases"])),
                 train_seconds=r.get("train_seconds"), eval_seconds=r.get("eval_seconds"),
                 resumed=r.get("resumed"),
                 machine={k: (r.get("machine") or {}).get(k) for k in ("cpu", "cores")})
            for r in rows])
  return json.loads(json.dumps(metrics.json_safe(results), allow_nan=False))


# --------------------------------------------------------------------------- the tables

_num = stats.as_float  # a JSON value as a float ("nan" and "inf" strings included)


def _cell(stat: dict, digits: int) -> str:
  if not stat["n"]:
    return "n/a"
  text = f"{_num(stat['mean']):.{digits}f} ± {_num(stat['std']):.{digits}f}"
  return text if stat["n"] == len(stat["values"]) else f"{text} ({stat['n']}/{len(stat['values'])})"


def _diff_cell(entry: dict, digits: int) -> str:
  if not entry or not entry.get("seeds") or not math.isfinite(_num(entry["estimate"])):
    return "n/a"
  iv = entry["interval"]
  low, high = _num(iv["low"]), _num(iv["high"])
  text = f"{_num(entry['estimate']):+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"
  if iv["excludes_zero"]:
    text = f"**{text}**"
  return text + f" {entry['n_positive']}/{len(entry['seeds'])}"


def markdown(results: dict) -> str:
  """results.md: scores per regime, the paired differences with their intervals, the data."""
  summary, comparisons = results["summary"], results["comparisons"]
  regimes = list(summary)
  lines = []
  if not results["complete"]:
    lines += [f"(partial: {results['finished_runs']} of {results['planned_runs']} runs "
              "finished; the figures change as the others finish)", ""]
  head = ["regime", "seeds"] + [LABELS[k] for k in TABLE_METRICS] + ["ASSD inf cases",
                                                                      "train s / run"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  best = {}
  for key in TABLE_METRICS:
    means = {r: _num(summary[r][key]["mean"]) for r in regimes if summary[r][key]["n"]}
    if means:
      top = (max if HIGHER_IS_BETTER[key] else min)(means.values())
      winners = [r for r, m in means.items() if m == top]
      if len(winners) == 1:  # ties: no bold
        best[key] = winners[0]
  for regime in regimes:
    entry = summary[regime]
    cells = [regime, str(len(entry["seeds"]))]
    for key in TABLE_METRICS:
      text = _cell(entry[key], DIGITS[key])
      cells.append(f"**{text}**" if best.get(key) == regime else text)
    cells.append(_cell(entry["assd_inf_fraction"], 2))
    seconds = _num(entry["train_seconds"])
    cells.append(f"{seconds:.0f}" if math.isfinite(seconds) else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  data = results["data"]
  numbers, lesions = data["case_numbers"], data["lesions_per_bin"]
  scored_on = data["scored_on"] or {}
  where = sweep_folder.describe_scored_on(scored_on)
  steps = results["total_steps"]
  lines += [
      "",
      "Mean ± standard deviation over seeds (ddof 1; (k/n): only k of n seeds have the score); "
      f"bold: the best mean (none on a tie). {steps} optimiser steps per run. Scored on the "
      f"same {len(numbers)} held-out cases ({where}): {lesions['all']} reference lesions ("
      + ", ".join(f"{b} {lesions[b]}" for b in BINS) + "), diameters as evaluate measures "
      "them. Recall: detected reference lesions / reference lesions, pooled over the cases "
      "(LiTS merge rule; IoU > 0.5, or any overlap); precision: detected / (detected + false "
      "positive components); FP per case: false positive components per case. ASSD: mean over "
      "the cases where the predicted and reference tumour are both non-empty or both empty; "
      "ASSD inf cases: the share with exactly one of them empty. Train s / run: wall seconds "
      "of an uninterrupted run's training, not counting scoring.",
  ]
  names = list(comparisons)
  if names:
    level = round(100 * results["statistics"]["level"])
    lines += ["", f"Paired differences: mean difference [{level} % interval over seeds and "
              "test cases], then how many seeds' differences are > 0", "",
              "| score | " + " | ".join(n.replace(" - ", " − ") for n in names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for key in DIFF_METRICS:
      label = LABELS[key] + ("" if HIGHER_IS_BETTER[key] else " (lower is better)")
      cells = [_diff_cell(comparisons[n].get(key, {}), DIGITS[key] + 1) for n in names]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    one_seed = any(not comparisons[n].get(k, {}).get("interval", {}).get("seed_variation", True)
                   for n in names for k in DIFF_METRICS if comparisons[n].get(k, {}).get("seeds"))
    lines += [
        "",
        "Difference: the first regime's score minus the second's, per seed on all scored "
        "cases, averaged over the seeds both ran. Interval: the seeds and the cases are "
        "crossed (every seed's run is scored on every case), so it counts the variation "
        "between seeds, between cases and of their interaction together: a variance-"
        "components (two-way random effects) t interval with Satterthwaite's degrees of "
        "freedom, recall and precision linearised as ratios of summed lesion counts. Bold: the "
        "interval excludes 0. Method: curriculum_seg/stats.py."
        + (" With one seed the interval covers only the cases' variation." if one_seed
           else ""),
    ]
  if results.get("command"):
    lines += ["", f"Command: `{results['command']}`"]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the pictures

def _png(fig) -> bytes:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", metadata={"Software": None})
  return buffer.getvalue()


def plot_scores(results: dict) -> bytes:
  """Grouped bars (mean ± std over seeds, dots: seeds) of Dice, recall by size, precision."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  keys = ["dice_per_case", "dice_global"] + [f"recall_iou_{b}" for b in BINS] + [
      f"recall_any_{b}" for b in BINS] + ["precision_iou"]
  summary = results["summary"]
  regimes = list(summary)
  fig = Figure(figsize=(13, 4.8), dpi=110)
  ax = fig.add_subplot()
  width = 0.8 / max(len(regimes), 1)
  x = np.arange(len(keys))
  for i, regime in enumerate(regimes):
    means = [_num(summary[regime][k]["mean"]) for k in keys]
    stds = [_num(summary[regime][k]["std"]) for k in keys]
    pos = x - 0.4 + width * (i + 0.5)
    ax.bar(pos, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=2,
           label=regime, alpha=0.85)
    for j, k in enumerate(keys):
      values = [v for v in map(_num, summary[regime][k]["values"]) if math.isfinite(v)]
      ax.plot([pos[j]] * len(values), values, "k.", markersize=3)
  ax.set_xticks(x)
  ax.set_xticklabels([LABELS[k].replace(" (", "\n(") for k in keys], fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("score")
  counts = sorted({len(summary[r]["seeds"]) for r in regimes})
  seeds = (f"{counts[0]} seed{'s' if counts[0] != 1 else ''}" if len(counts) == 1 else
           f"the seeds each regime finished ({counts[0]}-{counts[-1]})")
  ax.set_title(f"{results.get('config') or 'sweep'}, held-out cases: {results['total_steps']} "
               f"steps per run, mean ± std over {seeds} (dots: seeds)", fontsize=10)
  ax.legend(fontsize=8, ncol=len(regimes))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return _png(fig)


def plot_differences(results: dict) -> bytes:
  """The paired differences (reference minus each other regime) of PLOT_DIFFERENCES: a panel a
  score, a row a regime; dot: the estimate, bar: its interval (filled: it excludes 0)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  pairs = list(results["comparisons"].items())
  fig = Figure(figsize=(2.0 * len(PLOT_DIFFERENCES) + 1.6, 0.45 * len(pairs) + 1.6), dpi=110)
  axes = fig.subplots(1, len(PLOT_DIFFERENCES), sharey=True, squeeze=False)[0]
  rows = np.arange(len(pairs))[::-1]
  for ax, key in zip(axes, PLOT_DIFFERENCES):
    for row, (_, entry) in zip(rows, pairs):
      d = entry[key]
      est, low, high = (_num(d["estimate"]), _num(d["interval"]["low"]),
                        _num(d["interval"]["high"]))
      if not math.isfinite(est):
        continue
      ax.plot([low, high], [row, row], "-", color="k", linewidth=1.2)
      ax.plot([est], [row], "o", color="k", markersize=5,
              markerfacecolor="k" if d["interval"]["excludes_zero"] else "white")
    ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
    better = "higher" if HIGHER_IS_BETTER[key] else "lower"
    ax.set_title(f"{LABELS[key]}\n({better} favours {results['reference']})", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)
  axes[0].set_yticks(rows)
  axes[0].set_yticklabels([f"{name.split(' - ', 1)[1]} ({len(e['seeds'])} seed"
                           f"{'s' if len(e['seeds']) != 1 else ''})" for name, e in pairs],
                          fontsize=8)
  level = int(round(100 * float(results["statistics"]["level"])))
  fig.suptitle(f"{results['reference']} minus each regime on the held-out cases: estimate and "
               f"{level} % interval over seeds and cases (filled: excludes 0)", fontsize=9)
  fig.tight_layout()
  return _png(fig)


def curve_band(curves: list[list[dict]]) -> dict:
  """Mean, min and max over runs of validation Dice at the points every run has, keyed and
  ordered by (global step, stage, stage step) as logged (a stage's step-0 evaluation shares the
  global step of the previous stage's last)."""
  if not curves:
    return dict(global_step=[], mean=[], low=[], high=[])
  keyed = [{(p["global_step"], p["stage"], p["step"]): _num(p["val_dice"]) for p in c}
           for c in curves]
  order = [k for k in ((p["global_step"], p["stage"], p["step"]) for p in curves[0])
           if all(k in c for c in keyed)]
  values = np.array([[c[k] for c in keyed] for k in order], np.float64).reshape(len(order), -1)
  return dict(global_step=[k[0] for k in order], mean=values.mean(1).tolist(),
              low=values.min(1).tolist(), high=values.max(1).tolist())


def plot_curves(records: list[dict], regimes: list[str]) -> bytes:
  """Validation tumour Dice against the global step per regime: mean over seeds, min-max band."""
  from matplotlib import rcParams  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(9, 4.8), dpi=110)
  ax = fig.add_subplot()
  colours = rcParams["axes.prop_cycle"].by_key()["color"]
  for i, regime in enumerate(regimes):
    runs = [r for r in records if r["regime"] == regime and r.get("curve")]
    band = curve_band([r["curve"] for r in runs])
    if not band["global_step"]:
      continue
    colour = colours[i % len(colours)]
    label = f"{regime} ({len(runs)} seed{'s' if len(runs) != 1 else ''})"
    ax.plot(band["global_step"], band["mean"], "-", marker=".", color=colour, label=label)
    ax.fill_between(band["global_step"], band["low"], band["high"], color=colour, alpha=0.2)
  ax.set_xlabel("global optimiser step (all stages of a run)")
  ax.set_ylabel("validation tumour Dice (global)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("Validation tumour Dice per regime (tumour networks): mean over seeds, band "
               "min-max")
  fig.tight_layout()
  return _png(fig)


# --------------------------------------------------------------------------- files

def write_results(out: str, plan: Optional[dict], records: dict[str, dict],
                  reference: Optional[str] = None,
                  log: Callable[[str], Any] = print) -> dict:
  """Writes RESULT_FILES (results.json, .md, .png, differences.png, val_dice.png) into `out`
  (each atomically); returns the results."""
  plan = json.loads(json.dumps(plan)) if plan is not None else None
  records = json.loads(json.dumps(records))  # as read back from the files: the same figures
  try:
    results = build_results(plan, records, reference)
  except ValueError as e:  # stats' refusals (runs scored on different cases)
    raise CompareError(str(e)) from e
  text = json.dumps(results, indent=1, allow_nan=False) + "\n"
  rundir.write_atomically(os.path.join(out, "results.json"), text)
  rundir.write_atomically(os.path.join(out, "results.md"), markdown(results))
  finished = [r for r in records.values() if r["name"] in {x["name"] for x in results["runs"]}]
  rundir.write_atomically(os.path.join(out, "results.png"), plot_scores(results))
  rundir.write_atomically(os.path.join(out, "differences.png"), plot_differences(results))
  rundir.write_atomically(os.path.join(out, "val_dice.png"),
                          plot_curves(finished, results["regimes"]))
  log(f"{'' if results['complete'] else 'partial '}results of {results['finished_runs']} of "
      f"{results['planned_runs']} runs: {out}/" + ", ".join(RESULT_FILES))
  return results


def compare_dir(folder: str, reference: Optional[str] = None,
                log: Callable[[str], Any] = print) -> dict:
  """The `compare` command: rebuilds the results of the sweep folder `folder` from its
  records (and plan), with `reference` (default: the plan's) against every other regime."""
  if not os.path.isdir(folder):
    raise CompareError(f"{folder}: no such folder")
  try:
    plan = sweep_folder.read_plan(folder)
    records = sweep_folder.read_records(folder)
  except sweep_folder.SweepError as e:
    raise CompareError(str(e)) from e
  if not records:
    raise CompareError(f"{folder} holds no finished run's record "
                       f"({sweep_folder.RECORDS_DIR}/*.json): run `curriculum-seg sweep "
                       "--config FILE --out DIR` first")
  if plan is not None:
    extra = sorted(set(records) - {r["name"] for r in plan["runs"]})
    if extra:
      log(f"records of runs the plan ({sweep_folder.PLAN_FILE}) does not list are left out: "
          + ", ".join(extra))
  return write_results(folder, plan, records, reference, log)
