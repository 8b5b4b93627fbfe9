"""The curriculum experiment (issues 7 and 14): does the three-stage curriculum find small tumours
better? Every regime at the same step budget, several seeds, a held-out test set of 100+
lesions, and paired statistics.

Trains every regime on the synthetic benchmark for every seed at the same total of optimiser
steps, scores each run's chosen checkpoint on the same held-out test cases (whole volumes, LiTS
scores: curriculum_seg.evaluate), and writes, after every finished run (partial results) and at
the end:

  OUT/results.json   every run (regime, seed, scores, per-case scores, validation curve), per
                     regime mean ± std over seeds, the paired differences with their bootstrap
                     intervals, the data (cases per split, test lesions per size), the machine
  OUT/results.md     the tables: scores per regime; REFERENCE − each other regime with 95 %
                     intervals over seeds and over test cases; the command
  OUT/results.png    scores per regime (bars: mean ± std over seeds; dots: seeds)
  OUT/val_dice.png   validation tumour Dice against the global step per regime (mean over seeds,
                     band: min-max), from each run's metrics.jsonl

Regimes (configs/synthetic.py:REGIME): three_stage (whole -> patch -> whole), whole_only,
whole_patch, patch_whole and cascade (liver network, then a tumour network on liver crops). All
use the same data, network and total optimiser steps (`--total_steps`, spread over a regime's
stages in proportion to its config: the cascade's two networks get its config's split, half
each). Seed s sets `config.seed` of every regime, so the regimes' runs of one seed share the
initialisation and the data order wherever their curricula share them (the first whole stage of
three_stage, whole_only and whole_patch), and the statistics pair the regimes by seed.

The data. Training and validation: exactly configs/synthetic.py's (EXPERIMENT_DATA overrides
nothing but the folders: generator seed 0, cases 0-13, val_fraction 0.3, so validation cases
0, 2, 3, 5 pick each stage's best checkpoint and the other 10 train). Test: `--test_cases` more
cases of the same generator with the same seed and settings (data_pipelines/synthetic.py draws
case i from (seed, i) alone), numbered on from data.synthetic.num_cases (14-53 by default),
written to their own folder OUT/data/test_lits and scored with evaluate's "every case of a LiTS
folder" (`evaluate_run(lits_dir=...)`), so the prepared training dataset stays the default's.
DEFAULT_TEST_CASES = 40 was measured (benchmarks/count_test_lesions.py): cases 14-53 hold 124
reference lesions as evaluate measures them, 62 under 10 mm, 37 of 10-20 mm, 25 over 20 mm
(34 cases, 14-47, are the fewest with >= 100 lesions: 101, 52 under 10 mm).

Statistics (benchmarks/paired_stats.py, whose docstring gives the exact method): per regime,
mean ± std over seeds of tumour Dice per case and global, lesion recall and precision at IoU > 0.5
and at any overlap overall and by diameter (< 10, 10-20, > 20 mm), ASSD; for REFERENCE (three_stage)
− each other regime, the mean paired difference with 95 % percentile-bootstrap intervals (10,000
resamples, fixed seed) over seeds and over test cases (recall recomputed as a ratio of sums over
the resampled cases).

It resumes: a run with a saved result (experiment.json) is skipped; an interrupted run resumes
at its exact step (the stage controller's resume); `--summarise_only` rebuilds the results from
the finished runs without training. Runs go seed by seed (every regime of seed 0, then of seed
1, ...), so partial results hold paired runs early. Run from the repository root:

  .venv/bin/python benchmarks/curriculum_experiment.py --out runs/experiment
  .venv/bin/python benchmarks/curriculum_experiment.py --out runs/experiment --summarise_only
  .venv/bin/python benchmarks/curriculum_experiment.py --out runs/experiment --seeds 0,1,2 \\
      --total_steps 900 --test_cases 60

`--config.KEY=VALUE` overrides apply to every regime; `--config.stages.*.FIELD=VALUE` sets FIELD
of every stage that has it (e.g. `stages.*.patch_size`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import machine_info  # noqa: E402  benchmarks/machine_info.py (this script's folder)
import paired_stats  # noqa: E402  benchmarks/paired_stats.py
from curriculum_seg import metrics  # noqa: E402  numpy and scipy only: json_safe

REGIMES = ("three_stage", "whole_only", "whole_patch", "patch_whole", "cascade")
REFERENCE = "three_stage"  # the differences are REFERENCE − each other regime
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
# The step budget of every run, every regime. PROVISIONAL: configs/synthetic.py's TOTAL_STEPS;
# to be set from the learning curves (docs/learning) to where validation Dice has converged.
DEFAULT_TOTAL_STEPS = 1200
# Overrides of configs/synthetic.py's data section: none, so the training and validation cases
# are the default's (the data folders are set to OUT/data by regime_config).
EXPERIMENT_DATA: tuple[tuple[str, str], ...] = ()
# Test cases: this many more cases of the same generator, numbered from data.synthetic.num_cases
# (see the docstring for the measurement behind 40).
DEFAULT_TEST_CASES = 40
TEST_FOLDER = "test_lits"          # under the data folder
TEST_MANIFEST = "test_manifest.json"
# What the test set should hold (issue 14); fewer is allowed (tiny runs) but said.
MIN_TEST_LESIONS, MIN_SMALL_TEST_LESIONS = 100, 30
BINS = paired_stats.BINS
LABELS = {k: label for k, label, _, _ in paired_stats.METRICS}
DIGITS = {k: digits for k, _, _, digits in paired_stats.METRICS}
HIGHER_IS_BETTER = {k: higher for k, _, higher, _ in paired_stats.METRICS}
# Columns of the per-regime table and rows of the difference tables (results.json has every
# score of paired_stats.METRICS).
TABLE_METRICS = ("dice_per_case", "dice_global", *[f"recall_iou_{b}" for b in BINS],
                 *[f"recall_any_{b}" for b in BINS], "precision_iou", "precision_any", "assd_mm")
DIFF_METRICS = ("dice_per_case", "dice_global", "recall_iou", *[f"recall_iou_{b}" for b in BINS],
                "recall_any", *[f"recall_any_{b}" for b in BINS], "precision_iou",
                "precision_any", "assd_mm", "assd_inf_fraction")
TUMOUR_TASKS = ("tumour", "three_class")  # stages whose validation Dice is tumour Dice


class ExperimentError(RuntimeError):
  """An experiment that cannot run as asked (the message says why)."""


# --------------------------------------------------------------------------- configs and data

def _split_overrides(overrides):
  per_stage = [(k[len("stages.*."):], v) for k, v in overrides if k.startswith("stages.*.")]
  plain = [(k, v) for k, v in overrides if not k.startswith("stages.*.")]
  return plain, per_stage


def scale_steps(config, total_steps: int) -> None:
  """Spreads `total_steps` over the curriculum's stages in proportion to their configured steps
  (the last stage takes the rounding remainder), so every regime trains exactly total_steps."""
  names = list(config.curriculum)
  configured = [int(config.stages[n].steps) for n in names]
  if total_steps < len(names):
    raise ExperimentError(f"--total_steps={total_steps} is fewer than the {len(names)} stages")
  scaled = [max(1, (s * total_steps) // sum(configured)) for s in configured[:-1]]
  scaled.append(total_steps - sum(scaled))
  for name, steps in zip(names, scaled):
    config.stages[name].steps = steps


def regime_config(regime: str, seed: int, total_steps: int, data_dir: str,
                  overrides=()) -> Any:
  """configs/synthetic.py:REGIME with the shared data folders, the seed and the step budget."""
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config_file(f"{_ROOT}/configs/synthetic.py:{regime}")
  plain, per_stage = _split_overrides(overrides)
  config = config_loading.apply_overrides(config, list(EXPERIMENT_DATA) + [
      ("data.lits_dir", os.path.join(data_dir, "lits")),
      ("data.tfds_dir", os.path.join(data_dir, "tfds"))] + list(plain))
  for field, value in per_stage:
    keys = [(f"stages.{n}.{field}", value) for n in config.stages.keys()
            if field.split(".")[0] in config.stages[n]]
    config = config_loading.apply_overrides(config, keys)
  config.seed = int(seed)
  scale_steps(config, int(total_steps))
  return config


def numbers_of_test_cases(config, count: int) -> list[int]:
  """The test cases: `count` synthetic cases numbered on from the training folder's last."""
  if count < 1:
    raise ExperimentError(f"--test_cases must be >= 1, got {count}")
  first = int(config.data.synthetic.num_cases)
  return list(range(first, first + count))


def data_splits(config, test_numbers: Optional[list[int]]) -> dict[str, list[int]]:
  """Case numbers per split: train and validation as the dataset builder assigns them
  (data_pipelines.lits_tfds.assign_splits, the call the builder and evaluate make) to the
  training folder's cases (before it is synthesised: the cases 0..num_cases-1 it will hold),
  test the extra cases."""
  from data_pipelines import lits, lits_tfds  # pylint: disable=g-import-not-at-top
  d = config.data
  if os.path.isdir(d.lits_dir) and any(n.startswith("volume-") for n in os.listdir(d.lits_dir)):
    numbers = sorted(lits.find_cases(d.lits_dir))
  elif d.synthetic.enabled:
    numbers = list(range(int(d.synthetic.num_cases)))
  else:
    raise ExperimentError(f"{d.lits_dir}: no LiTS cases")
  splits = lits_tfds.assign_splits(numbers, float(d.val_fraction), float(d.test_fraction),
                                   int(d.split_seed))
  out = dict(train=splits["train"], validation=splits["validation"])
  if splits["test"]:
    out["unused_builder_test"] = splits["test"]  # data.test_fraction > 0: held out, not scored
  if test_numbers is not None:
    if set(test_numbers) & set(numbers):
      raise ExperimentError(f"test cases {sorted(set(test_numbers) & set(numbers))} are also in "
                            f"the training folder {d.lits_dir}")
    out["test"] = list(test_numbers)
  return out


def _bin_counts(diameters) -> dict[str, int]:
  counts = {b: 0 for b in BINS}
  for d in diameters:
    counts[paired_stats.diameter_bin(d)] += 1
  return dict(counts, all=sum(counts.values()))


def reference_lesion_diameters(volume, segmentation) -> list[float]:
  """`diameter_mm` of each reference lesion of a LiTS case, as evaluate measures it (the case
  loaded by data_pipelines.lits, lesions by curriculum_seg.metrics.detect_lesions)."""
  from curriculum_seg import metrics  # pylint: disable=g-import-not-at-top
  from data_pipelines import lits  # pylint: disable=g-import-not-at-top
  case = lits.load_case(volume, segmentation)
  ref = case.labels == 2
  det = metrics.detect_lesions(ref, ref, case.spacing)
  return [float(r["diameter_mm"]) for r in det["reference_lesions"]]


def _test_manifest_key(data_cfg, numbers) -> dict:
  from data_pipelines import lits_tfds, synthetic  # pylint: disable=g-import-not-at-top
  cfg = lits_tfds.synth_config(data_cfg)
  return dict(generator_version=synthetic.GENERATOR_VERSION, seed=int(data_cfg.synthetic.seed),
              config=json.loads(json.dumps(dataclasses.asdict(cfg))),
              case_numbers=[int(n) for n in numbers])


def read_test_manifest(folder: str) -> Optional[dict]:
  path = os.path.join(folder, TEST_MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def prepare_test_cases(data_cfg, folder: str, numbers: list[int],
                       log: Callable[[str], Any] = print) -> dict:
  """Writes the test cases (the training data's generator, seed and settings; case numbers
  `numbers`) into `folder` with their reference lesion diameters in TEST_MANIFEST (written
  last: a folder without it is incomplete and is rewritten). Reuses a complete folder of the
  same cases. Returns the manifest."""
  from data_pipelines import lits, lits_tfds, synthetic  # pylint: disable=g-import-not-at-top
  if not data_cfg.synthetic.enabled:
    raise ExperimentError("the test cases are synthetic cases of the training data's generator; "
                          "with data.synthetic.enabled=false use --split validation")
  want = _test_manifest_key(data_cfg, numbers)
  manifest = read_test_manifest(folder)
  if manifest is not None and all(manifest.get(k) == v for k, v in want.items()):
    return manifest
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, TEST_MANIFEST)
  if os.path.exists(path):
    os.remove(path)
  for name in os.listdir(folder):  # evaluate scores every case of the folder: only these
    if name.startswith(("volume-", "segmentation-")):
      os.remove(os.path.join(folder, name))
  log(f"synthesising {len(numbers)} test cases ({numbers[0]}-{numbers[-1]}) into {folder}")
  cfg = lits_tfds.synth_config(data_cfg)
  cases = []
  for n in numbers:
    synthetic.write_case(folder, want["seed"], n, cfg)
    volume, segmentation = lits.find_cases(folder)[n]
    cases.append(dict(case=n, diameters_mm=reference_lesion_diameters(volume, segmentation)))
  counts = _bin_counts(d for c in cases for d in c["diameters_mm"])
  manifest = dict(want, cases=cases, lesions_per_bin=counts)
  _atomic_write(path, json.dumps(manifest, indent=1))
  log(f"test cases: {len(numbers)}, reference lesions {counts['all']} ("
      + ", ".join(f"{b} {counts[b]}" for b in BINS) + ")")
  if counts["all"] < MIN_TEST_LESIONS or counts[BINS[0]] < MIN_SMALL_TEST_LESIONS:
    log(f"note: fewer than {MIN_TEST_LESIONS} test lesions or {MIN_SMALL_TEST_LESIONS} under "
        "10 mm; raise --test_cases for the experiment's figures")
  return manifest


# --------------------------------------------------------------------------- one run

def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  """Dotted keys where saved config `a` and current config `b` differ; a field that `a` predates
  counts as equal when `b` holds the value that gives the old behaviour
  (rundir.ADDED_FIELD_DEFAULTS)."""
  from curriculum_seg import rundir  # pylint: disable=g-import-not-at-top
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(x, dict) and isinstance(y, dict):
      out += _differences(x, y, f"{prefix}{k}.")
    elif k not in a and k in rundir.ADDED_FIELD_DEFAULTS:
      if y != rundir.ADDED_FIELD_DEFAULTS[k]:
        out.append(f"{prefix}{k}")
    elif x != y:
      out.append(f"{prefix}{k}")
  return out


def read_curve(workdir: str, stages: list[dict]) -> list[dict]:
  """The run's validation tumour Dice rows of metrics.jsonl: global_step, stage, step, val_dice
  (the cascade's liver network is left out: its validation Dice is liver Dice)."""
  from curriculum_seg import rundir  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  tumour = {s["name"] for s in stages if s.get("task") in TUMOUR_TASKS}
  return [dict(global_step=int(r["global_step"]), stage=r["stage"], step=int(r["step"]),
               val_dice=float(r["val_dice"]))
          for r in rundir.MetricsLog(epath.Path(workdir)).read()
          if "val_dice" in r and r.get("stage") in tumour]


def load_record(workdir: str, config, split: str, scored_cases: list[int]) -> Optional[dict]:
  """The saved result of a finished run (None when there is none); refuses one of another
  config, split or test set."""
  from curriculum_seg import rundir  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "experiment.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    record = json.load(f)
  current = rundir.config_to_json(config)
  diff = _differences(record.get("config", {}), current)
  if record.get("split") != split:
    diff.append("--split")
  if record.get("scored_cases") != list(scored_cases):
    diff.append("the scored cases (--test_cases)")
  if diff:
    raise ExperimentError(f"{workdir} holds a finished run of another config (differing: "
                          f"{', '.join(diff[:8])}); use another --out or delete that run")
  if "cases" not in record:
    raise ExperimentError(f"{workdir}/experiment.json has no per-case scores (an older version "
                          "of this script); delete it to re-evaluate the run")
  return record


def run_one(regime: str, seed: int, config, workdir: str, split: str = "test",
            test_dir: Optional[str] = None, scored_cases: Optional[list[int]] = None,
            log: Callable[[str], Any] = print) -> dict:
  """Trains (or resumes) one run and scores it on the test folder (split 'test') or on its
  validation split; the record is saved in workdir/experiment.json. A finished run is read back
  (with `skipped`)."""
  from curriculum_seg import evaluate, rundir, stages  # pylint: disable=g-import-not-at-top
  if scored_cases is None:
    raise ValueError("scored_cases: the case numbers the run is scored on")
  record = load_record(workdir, config, split, scored_cases)
  if record is not None:
    log(f"[{regime} seed {seed}] done before: skipped")
    return dict(record, skipped=True)
  if split == "test" and test_dir is None:
    raise ValueError("split 'test' needs the test folder")
  os.makedirs(workdir, exist_ok=True)
  resumed = os.path.exists(os.path.join(workdir, "config.json"))  # an interrupted run
  start = time.perf_counter()
  results = stages.train(config, workdir, log=lambda m: log(f"[{regime} seed {seed}] {m}"))
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  evaluation = evaluate.evaluate_run(
      workdir, split="validation" if split == "validation" else "test",
      lits_dir=test_dir if split == "test" else None,
      output=os.path.join(workdir, "eval", "experiment"), pictures=False,
      log=lambda m: log(f"  {m}"))
  eval_s = time.perf_counter() - start
  cases = [paired_stats.case_record(c) for c in evaluation["cases"]]
  scored = sorted(c["case_number"] for c in cases)
  if scored != sorted(scored_cases):
    raise ExperimentError(f"{workdir}: scored cases {scored}, expected {sorted(scored_cases)}")
  table = paired_stats.case_table(cases)
  aggregate = evaluation["aggregate"]
  stage_records = [dict(name=r.name, steps=r.steps, task=r.task, best_val_dice=r.best_score,
                        best_step=r.best_step) for r in results]
  record = dict(
      regime=regime, seed=int(seed), workdir=os.path.abspath(workdir), split=split,
      scored_cases=scored, config=rundir.config_to_json(config), stages=stage_records,
      total_steps=sum(r.steps for r in results), resumed=resumed,
      train_seconds=None if resumed else train_s, eval_seconds=eval_s,
      checkpoint=evaluation.get("checkpoint"),
      scores=paired_stats.point_scores(table), lesions_per_bin=paired_stats.lesion_counts(table),
      liver_dice_per_case=_as_float(aggregate.get("liver", {}).get("dice_per_case")),
      num_cases=aggregate.get("num_cases"), curve=read_curve(workdir, stage_records),
      cases=cases, aggregate=aggregate)
  record = metrics.json_safe(record)
  _atomic_write(os.path.join(workdir, "experiment.json"), json.dumps(record, indent=1))
  return record


# --------------------------------------------------------------------------- summary

def _as_float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def _tables(records: list[dict], regime: str) -> dict:
  return {r["seed"]: paired_stats.case_table(r["cases"]) for r in records
          if r["regime"] == regime}


def summarise(records: list[dict], regimes) -> dict:
  """Per regime: `seeds`, `train_seconds` (mean over uninterrupted runs) and for every score of
  paired_stats.METRICS {mean, std (ddof 1), n, values, seeds} over the seeds."""
  summary = {}
  for regime in regimes:
    rows = sorted((r for r in records if r["regime"] == regime), key=lambda r: r["seed"])
    timed = [r["train_seconds"] for r in rows if r.get("train_seconds") is not None]
    entry = dict(seeds=[r["seed"] for r in rows],
                 train_seconds=float(np.mean(timed)) if timed else math.nan)
    entry.update(paired_stats.summarise(_tables(rows, regime)))
    summary[regime] = entry
  return summary


def compare_regimes(records: list[dict], regimes, reference: str = REFERENCE,
                    n_resamples: int = paired_stats.N_RESAMPLES) -> dict:
  """{"REFERENCE - OTHER": paired_stats.compare(...)} for every other regime with runs."""
  out = {}
  if reference not in regimes:
    return out
  ref = _tables(records, reference)
  for other in regimes:
    if other == reference:
      continue
    result = paired_stats.compare(ref, _tables(records, other), n_resamples=n_resamples)
    out[f"{reference} - {other}"] = dict(result, a=reference, b=other)
  return out


def _cell(stat: dict, digits: int) -> str:
  if not stat["n"]:
    return "n/a"
  text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
  return text if stat["n"] == len(stat["values"]) else f"{text} ({stat['n']}/{len(stat['values'])})"


def _diff_cell(entry: dict, kind: str, digits: int) -> str:
  if not entry or not entry.get("seeds") or not math.isfinite(entry["estimate"]):
    return "n/a"
  iv = entry[kind]
  text = f"{entry['estimate']:+.{digits}f} [{iv['low']:+.{digits}f}, {iv['high']:+.{digits}f}]"
  if iv["excludes_zero"]:
    text = f"**{text}**"
  if kind == "over_seeds":
    text += f" {entry['n_positive']}/{len(entry['seeds'])}"
  if iv.get("n_undefined"):
    text += f" ({iv['n_undefined']} undefined)"
  return text


def _lesion_text(counts: dict) -> str:
  return (f"{counts.get('all', 'n/a')} reference lesions (" +
          ", ".join(f"{b} {counts.get(b, 'n/a')}" for b in BINS) + ")")


def markdown_table(summary: dict, comparisons: dict, data: dict, total_steps: int,
                   command: str, split: str = "test", finished: int = 0,
                   planned: int = 0) -> str:
  """results.md: scores per regime (mean ± std over seeds), the paired differences with their
  intervals over seeds and over test cases, the data and the command."""
  regimes = list(summary)
  lines = []
  if finished < planned:
    lines += [f"(partial: {finished} of {planned} runs finished; the figures change as the "
              "others finish)", ""]
  head = ["regime", "seeds"] + [LABELS[k] for k in TABLE_METRICS] + ["ASSD inf cases",
                                                                      "train s / run"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  best = {}
  for key in TABLE_METRICS:
    means = {r: summary[r][key]["mean"] for r in regimes if summary[r][key]["n"]}
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
    seconds = entry["train_seconds"]
    cells.append(f"{seconds:.0f}" if math.isfinite(seconds) else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  scored = data.get(split, [])
  lesions = data.get("scored_lesions_per_bin", {})
  lines += [
      "",
      "Mean ± standard deviation over seeds (ddof 1; (k/n): only k of n seeds have the score); "
      f"bold: the best mean (none on a tie). {total_steps} optimiser steps per run, every "
      f"regime. Scored on the same {len(scored)} held-out {split} cases (whole volumes"
      + (f", cases {scored[0]}-{scored[-1]}" if scored else "") + f"): {_lesion_text(lesions)}"
      ", diameters as evaluate measures them. Recall: detected reference lesions / reference "
      "lesions in the bin, pooled over the cases (LiTS merge rule; IoU > 0.5, or any overlap); "
      "precision: detected / (detected + unmatched predicted components). ASSD: mean over the "
      "cases where the predicted and reference tumour are both non-empty or both empty; ASSD "
      "inf cases: the share of cases with exactly one of them empty (left out of ASSD). Train "
      "s / run: wall seconds of an uninterrupted run's training (data preparation included for "
      "the first), not counting evaluation.",
  ]
  names = list(comparisons)
  for kind, title in (("over_seeds", "over seeds (seeds resampled, paired by seed)"),
                      ("over_cases", "over test cases (cases resampled, paired by case and "
                                     "seed; seeds fixed)")):
    if not names:
      break
    lines += ["", f"Paired differences, {title}: mean difference [95 % interval]"
              + (", then how many seeds' differences are > 0" if kind == "over_seeds" else ""),
              "", "| score | " + " | ".join(n.replace(" - ", " − ") for n in names) + " |",
              "|" + "---|" * (len(names) + 1)]
    for key in DIFF_METRICS:
      label = LABELS[key] + ("" if HIGHER_IS_BETTER[key] else " (lower is better)")
      cells = [_diff_cell(comparisons[n].get(key, {}), kind, DIGITS[key] + 1) for n in names]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
  if names:
    n_seeds = max(len(c.get("seeds", [])) for c in comparisons.values())
    lines += [
        "",
        "Difference: the first regime's score minus the second's, per seed on all test cases, "
        "averaged over the seeds both ran. Intervals: 2.5th-97.5th percentiles of "
        f"{paired_stats.N_RESAMPLES:,} bootstrap resamples (fixed seed "
        f"{paired_stats.BOOTSTRAP_SEED}); over seeds: the seeds drawn with replacement; over "
        "test cases: the cases drawn with replacement, the same draw for every run, each run's "
        "scores recomputed on it (recall and precision as ratios of summed lesion counts). Bold: "
        "the interval excludes 0. Method: benchmarks/paired_stats.py."
        + (f" With {n_seeds} seeds the seed interval comes from at most "
           f"{math.comb(2 * n_seeds - 1, n_seeds)} distinct resamples and is too narrow (with 5 "
           "seeds and no true difference it excluded 0 in 16 % of simulated data sets: see "
           "paired_stats); the case interval holds the seeds fixed." if n_seeds else ""),
    ]
  splits = ", ".join(f"{name} {len(v)}" for name, v in data.items()
                     if isinstance(v, list))
  lines += ["", f"Data: the training data's cases 0..data.synthetic.num_cases-1 split as the "
            f"dataset builder splits them (configs/synthetic.py's unless overridden): train "
            f"{data.get('train')}, validation {data.get('validation')} (best checkpoints); "
            + (f"test: cases {data['test'][0]}-{data['test'][-1]}, more cases of the same "
               "generator, seed and settings; " if data.get("test") else "")
            + f"cases per split: {splits}.", "", f"Command: `{command}`"]
  return "\n".join(lines) + "\n"


def plot(summary: dict, path: str, total_steps: int) -> None:
  """Grouped bars (mean ± std over seeds, dots: seeds) of Dice and recall by lesion size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = ["dice_per_case", "dice_global"] + [f"recall_iou_{b}" for b in BINS] + [
      f"recall_any_{b}" for b in BINS] + ["precision_iou"]
  regimes = list(summary)
  fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
  width = 0.8 / max(len(regimes), 1)
  x = np.arange(len(keys))
  for i, regime in enumerate(regimes):
    means = [summary[regime][k]["mean"] for k in keys]
    stds = [summary[regime][k]["std"] for k in keys]
    pos = x - 0.4 + width * (i + 0.5)
    ax.bar(pos, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=2,
           label=regime, alpha=0.85)
    for j, k in enumerate(keys):
      values = [v for v in summary[regime][k]["values"] if math.isfinite(v)]
      ax.plot([pos[j]] * len(values), values, "k.", markersize=3)
  ax.set_xticks(x)
  ax.set_xticklabels([LABELS[k].replace(" (", "\n(") for k in keys], fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("score")
  seeds = max((len(summary[r]["seeds"]) for r in regimes), default=0)
  ax.set_title(f"Synthetic benchmark, test cases: {total_steps} steps per run, mean ± std over "
               f"{seeds} seeds (dots: seeds)")
  ax.legend(fontsize=8, ncol=len(regimes))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def curve_band(curves: list[list[dict]]) -> dict:
  """Mean, min and max over runs of validation Dice at the points every run has, keyed and
  ordered by (global step, stage, stage step) as logged (a stage's step-0 evaluation shares the
  global step of the previous stage's last)."""
  if not curves:
    return dict(global_step=[], mean=[], low=[], high=[])
  keyed = [{(p["global_step"], p["stage"], p["step"]): p["val_dice"] for p in c} for c in curves]
  order = [k for k in ((p["global_step"], p["stage"], p["step"]) for p in curves[0])
           if all(k in c for c in keyed)]
  values = np.array([[c[k] for c in keyed] for k in order], np.float64).reshape(len(order), -1)
  return dict(global_step=[k[0] for k in order], mean=values.mean(1).tolist(),
              low=values.min(1).tolist(), high=values.max(1).tolist())


def plot_curves(records: list[dict], regimes, path: str) -> None:
  """Validation tumour Dice against the global step per regime: mean over seeds, min-max band."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, regime in enumerate(regimes):
    runs = [r for r in records if r["regime"] == regime and r.get("curve")]
    band = curve_band([r["curve"] for r in runs])
    if not band["global_step"]:
      continue
    colour = colours[i % len(colours)]
    label = f"{regime} ({len(runs)} seed{'s' if len(runs) != 1 else ''})" + (
        ", tumour network on liver crops" if regime == "cascade" else "")
    ax.plot(band["global_step"], band["mean"], "-", marker=".", color=colour, label=label)
    ax.fill_between(band["global_step"], band["low"], band["high"], color=colour, alpha=0.2)
  ax.set_xlabel("global optimiser step (all stages of a run)")
  ax.set_ylabel("validation tumour Dice (global)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("Validation tumour Dice per regime: mean over seeds, band min-max")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_results(out: str, records: list[dict], args, raw: list[str], data: dict,
                  planned: int, start: float, log: Callable[[str], Any] = print) -> str:
  """results.json, results.md, results.png and val_dice.png of the runs finished so far."""
  records = sorted(records, key=lambda r: (args.regimes.index(r["regime"]), r["seed"]))
  summary = summarise(records, args.regimes)
  comparisons = compare_regimes(records, args.regimes, args.reference)
  if records:
    counts = records[0]["lesions_per_bin"]
    if any(r["lesions_per_bin"] != counts for r in records):
      raise ExperimentError("the runs were scored on different cases")
    data = dict(data, scored_lesions_per_bin=counts)
  command = ("python benchmarks/curriculum_experiment.py " + " ".join(raw)).strip()
  table = markdown_table(summary, comparisons, data, args.total_steps, command, args.split,
                         finished=len(records), planned=planned)
  result = dict(
      benchmark="curriculum_experiment", command=command,
      machine=machine_info.describe("jax", "flax", "orbax-checkpoint"),
      regimes=args.regimes, seeds=args.seeds, reference=args.reference,
      total_steps=args.total_steps, split=args.split, data=data,
      complete=len(records) == planned, finished_runs=len(records), planned_runs=planned,
      wall_seconds_this_invocation=time.perf_counter() - start,
      computed_this_invocation=[f"{r['regime']}/seed{r['seed']}" for r in records
                                if not r.get("skipped")],
      statistics=dict(n_resamples=paired_stats.N_RESAMPLES,
                      bootstrap_seed=paired_stats.BOOTSTRAP_SEED,
                      interval_percentiles=list(paired_stats.INTERVAL),
                      method="benchmarks/paired_stats.py"),
      summary=summary, comparisons=comparisons,
      runs=[{k: v for k, v in r.items() if k not in ("aggregate", "config", "skipped")}
            for r in records])
  machine_info.write_result(os.path.join(out, "results.json"), metrics.json_safe(result))
  _atomic_write(os.path.join(out, "results.md"), table)
  if records:
    plot(summary, os.path.join(out, "results.png"), args.total_steps)
    plot_curves(records, args.regimes, os.path.join(out, "val_dice.png"))
  log(f"{'partial ' if len(records) < planned else ''}results of {len(records)} of {planned} "
      f"runs: {out}/results.json, results.md, results.png, val_dice.png")
  return table


# --------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]] = None):
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = config_loading.split_override_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/experiment",
                      help="output folder (default %(default)s)")
  parser.add_argument("--regimes", default=",".join(REGIMES),
                      help="comma-separated subset of " + ", ".join(REGIMES))
  parser.add_argument("--reference", default=REFERENCE,
                      help="the regime the others are compared with (default %(default)s)")
  parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                      help="comma-separated seeds (default %(default)s)")
  parser.add_argument("--total_steps", type=int, default=DEFAULT_TOTAL_STEPS,
                      help="optimiser steps per run, for every regime (default %(default)s)")
  parser.add_argument("--test_cases", type=int, default=DEFAULT_TEST_CASES,
                      help="synthetic test cases, numbered from data.synthetic.num_cases "
                           "(default %(default)s)")
  parser.add_argument("--split", default="test", choices=("test", "validation"),
                      help="the held-out cases that score the runs: the test cases, or the "
                           "runs' validation split (default %(default)s)")
  parser.add_argument("--data_dir", default=None,
                      help="the synthetic data and its prepared dataset (default OUT/data)")
  parser.add_argument("--summarise_only", action="store_true",
                      help="rebuild the results from the finished runs; train nothing")
  args = parser.parse_args(argv)
  args.regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
  unknown = [r for r in args.regimes if r not in REGIMES]
  if unknown:
    parser.error(f"unknown regime(s) {unknown}; choose from {', '.join(REGIMES)}")
  if args.reference not in REGIMES:
    parser.error(f"--reference must be one of {', '.join(REGIMES)}")
  if args.test_cases < 1:
    parser.error("--test_cases must be >= 1")
  args.seeds = parse_seeds(parser, args.seeds)
  args.overrides = overrides
  return args


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
  """`--seeds` (comma-separated integers, at least one), or the parser's error."""
  try:
    seeds = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    parser.error(f"--seeds must be comma-separated integers, got {text!r}")
  if not seeds:
    parser.error("--seeds names no seed")
  return seeds


def main(argv: Optional[list[str]] = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  raw = sys.argv[1:] if argv is None else argv
  args = parse_args(raw)
  out = os.path.abspath(args.out)
  data_dir = os.path.abspath(args.data_dir or os.path.join(out, "data"))
  os.makedirs(out, exist_ok=True)
  log = lambda m: print(m, flush=True)  # noqa: E731
  # Seed by seed: every regime of the first seed, then the next, so partial results pair early.
  configs = {(r, s): regime_config(r, s, args.total_steps, data_dir, args.overrides)
             for s in args.seeds for r in args.regimes}
  datas = {json.dumps(c.data.to_dict(), sort_keys=True, default=str) for c in configs.values()}
  if len(datas) != 1:
    raise ExperimentError("the regimes' data sections differ; every run must read the same data")
  first = next(iter(configs.values()))
  test_dir = os.path.join(data_dir, TEST_FOLDER)
  test_numbers = numbers_of_test_cases(first, args.test_cases) if args.split == "test" else None
  data = data_splits(first, test_numbers)
  scored_cases = data[args.split]
  if not scored_cases:
    raise ExperimentError(f"no {args.split} cases to score the runs on")
  data["test_folder"] = test_dir if args.split == "test" else None
  start = time.perf_counter()
  workdir = lambda r, s: os.path.join(out, "runs", r, f"seed{s}")  # noqa: E731
  records = []
  if args.summarise_only:
    for (regime, seed), config in configs.items():
      record = load_record(workdir(regime, seed), config, args.split, scored_cases)
      if record is None:
        log(f"[{regime} seed {seed}] not finished: left out")
      else:
        records.append(dict(record, skipped=True))
  else:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.ERROR)
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
    if args.split == "test":
      prepare_test_cases(first.data, test_dir, test_numbers, log)
    keys = list(configs)
    for i, (regime, seed) in enumerate(keys):
      record = run_one(regime, seed, configs[regime, seed], workdir(regime, seed), args.split,
                       test_dir if args.split == "test" else None, scored_cases, log)
      records.append(record)
      if not record.get("skipped") and i < len(keys) - 1:
        write_results(out, records, args, raw, _with_manifest(data, test_dir), len(configs),
                      start, log)  # partial results after every finished run
  table = write_results(out, records, args, raw, _with_manifest(data, test_dir), len(configs),
                        start, log)
  log(table)
  return 0


def _with_manifest(data: dict, test_dir: str) -> dict:
  """The data description plus the test cases' lesion counts measured when they were written."""
  manifest = read_test_manifest(test_dir) if data.get("test_folder") else None
  if manifest is None:
    return data
  return dict(data, test_lesions_per_bin=manifest["lesions_per_bin"])


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ExperimentError as e:
    print(f"curriculum_experiment: error: {e}", file=sys.stderr)
    sys.exit(2)
