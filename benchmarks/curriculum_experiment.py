"""The curriculum experiment (issue 7): does the three-stage curriculum find small tumours better?

Trains every regime on the synthetic benchmark for several seeds at the same step budget,
evaluates each run's chosen checkpoint on the same held-out cases (whole volumes, LiTS scores:
curriculum_seg.evaluate), and writes

  OUT/results.json   every run's scores, per-regime mean and standard deviation, the machine
  OUT/results.md     the table (mean +- std over seeds)
  OUT/results.png    the plot

Regimes (configs/synthetic.py:REGIME): three_stage (whole -> patch -> whole), whole_only,
whole_patch, patch_whole and cascade (liver network, then a tumour network on liver crops). All
use the same data, network and total optimiser steps (`--total_steps`, spread over a regime's
stages in proportion to its config). Seeds vary `config.seed` (initialisation, data order,
augmentation); every run reads one prepared dataset (OUT/data), so the held-out cases are the
same for all.

The data are configs/synthetic.py's (same generator, image size and training set size: 9
training and 3 validation cases) plus 12 test cases (EXPERIMENT_DATA): the validation cases pick
each stage's best checkpoint, as in training, and the untouched test cases score the runs
(`--split test`). With the default's 3 validation cases only 3 lesions would be scored, too
few to compare lesion recall by size. This was fixed before any regime was compared.

It resumes: a run with a saved result is skipped; an interrupted run resumes at its exact step
(the stage controller's resume). Run from the repository root:

  .venv/bin/python benchmarks/curriculum_experiment.py --out runs/experiment
  .venv/bin/python benchmarks/curriculum_experiment.py --out runs/experiment --seeds 0,1,2,3 \\
      --total_steps 900 --config.data.synthetic.num_cases=24

`--config.KEY=VALUE` overrides apply to every regime; `--config.stages.*.FIELD=VALUE` sets FIELD
of every stage that has it (e.g. `stages.*.patch_size`).
"""

from __future__ import annotations

import argparse
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

REGIMES = ("three_stage", "whole_only", "whole_patch", "patch_whole", "cascade")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_TOTAL_STEPS = 300  # per run, every regime; fits 15 runs in about 35 min on 2 cores
# The experiment's data: configs/synthetic.py's generator and sizes, 9 training, 3 validation
# (checkpoint choice) and 12 test cases (scoring). Set before any comparison; see the docstring.
EXPERIMENT_DATA = (("data.synthetic.num_cases", "24"), ("data.val_fraction", "0.125"),
                   ("data.test_fraction", "0.5"))
BINS = ("<10mm", "10-20mm", ">20mm")

# (key, label, path into an evaluate aggregate, digits, higher is better)
METRICS = (
    ("dice_per_case", "tumour Dice per case", ("tumour", "dice_per_case"), 3, True),
    ("dice_global", "tumour Dice global", ("tumour", "dice_global"), 3, True),
    *[(f"recall_iou_{b}", f"recall {b} (IoU>0.5)", ("detection", "iou", "by_diameter", b,
                                                     "recall"), 2, True) for b in BINS],
    *[(f"recall_any_{b}", f"recall {b} (any overlap)", ("detection", "any", "by_diameter", b,
                                                         "recall"), 2, True) for b in BINS],
    ("precision_iou", "lesion precision (IoU>0.5)", ("detection", "iou", "precision"), 2, True),
    ("assd_mm", "tumour ASSD (mm)", ("tumour", "assd", "mean"), 2, False),
)


class ExperimentError(RuntimeError):
  """An experiment that cannot run as asked (the message says why)."""


# --------------------------------------------------------------------------- configs

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


# --------------------------------------------------------------------------- one run

def _get(tree: dict, path) -> float:
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return math.nan
    tree = tree[key]
  try:
    return float(tree)
  except (TypeError, ValueError):
    return math.nan


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def run_one(regime: str, seed: int, config, workdir: str, split: str = "test",
            log: Callable[[str], Any] = print) -> dict:
  """Trains (or resumes) one run and evaluates it; the record is saved in workdir."""
  from curriculum_seg import evaluate, rundir, stages  # pylint: disable=g-import-not-at-top
  record_path = os.path.join(workdir, "experiment.json")
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    current = rundir.config_to_json(config)
    if record.get("config") != current or record.get("split") != split:
      diff = _differences(record.get("config", {}), current) + (
          ["--split"] if record.get("split") != split else [])
      raise ExperimentError(f"{workdir} holds a finished run of another config (differing: "
                            f"{', '.join(diff[:8])}); use another --out or delete that run")
    log(f"[{regime} seed {seed}] done before: skipped")
    return dict(record, skipped=True)
  os.makedirs(workdir, exist_ok=True)
  resumed = os.path.exists(os.path.join(workdir, "config.json"))  # an interrupted run
  start = time.perf_counter()
  results = stages.train(config, workdir, log=lambda m: log(f"[{regime} seed {seed}] {m}"))
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  evaluation = evaluate.evaluate_run(workdir, split=split,
                                     output=os.path.join(workdir, "eval", "experiment"),
                                     pictures=False, log=lambda m: log(f"  {m}"))
  eval_s = time.perf_counter() - start
  aggregate = evaluation["aggregate"]
  record = dict(
      regime=regime, seed=int(seed), workdir=os.path.abspath(workdir), split=split,
      config=rundir.config_to_json(config),
      stages=[dict(name=r.name, steps=r.steps, task=r.task, best_val_dice=r.best_score,
                   best_step=r.best_step) for r in results],
      total_steps=sum(r.steps for r in results), resumed=resumed,
      train_seconds=None if resumed else train_s, eval_seconds=eval_s,
      checkpoint=evaluation.get("checkpoint"),
      scores={key: _get(aggregate, path) for key, _, path, _, _ in METRICS},
      lesions_per_bin={b: _get(aggregate, ("detection", "iou", "by_diameter", b,
                                           "num_reference_lesions")) for b in BINS},
      assd_cases_infinite=_get(aggregate, ("tumour", "assd", "n_infinite")),
      liver_dice_per_case=_get(aggregate, ("liver", "dice_per_case")),
      num_cases=aggregate.get("num_cases"), aggregate=aggregate)
  _atomic_write(record_path, json.dumps(_finite(record), indent=1))
  return record


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
  keys = sorted(set(a) | set(b))
  out = []
  for k in keys:
    x, y = a.get(k, "<absent>"), b.get(k, "<absent>")
    if isinstance(x, dict) and isinstance(y, dict):
      out += _differences(x, y, f"{prefix}{k}.")
    elif x != y:
      out.append(f"{prefix}{k}")
  return out


def _finite(obj):
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, float) and not math.isfinite(obj):
    return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
  return obj


# --------------------------------------------------------------------------- summary

def _as_float(value) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def summarise(records: list[dict], regimes) -> dict:
  """Per regime and metric: mean, std (ddof=1; 0 for one seed) over the seeds with a value."""
  summary = {}
  for regime in regimes:
    rows = [r for r in records if r["regime"] == regime]
    timed = [r["train_seconds"] for r in rows if r.get("train_seconds") is not None]
    entry = dict(seeds=[r["seed"] for r in rows],
                 train_seconds=float(np.mean(timed)) if timed else math.nan)  # uninterrupted
    for key, _, _, _, _ in METRICS + (("liver_dice_per_case", "", (), 3, True),):
      values = np.array([_as_float(r["scores"].get(key, r.get(key))) for r in rows], np.float64)
      values = values[np.isfinite(values)]
      entry[key] = dict(
          mean=float(values.mean()) if values.size else math.nan,
          std=float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else math.nan),
          n=int(values.size), values=[float(v) for v in values])
    summary[regime] = entry
  return summary


def _cell(stat: dict, digits: int) -> str:
  if not stat["n"]:
    return "n/a"
  return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(summary: dict, records: list[dict], total_steps: int, command: str,
                   split: str = "test") -> str:
  """The results table: one row per regime, mean ± std over seeds."""
  regimes = list(summary)
  lesions = records[0]["lesions_per_bin"] if records else {}
  cases = records[0].get("num_cases") if records else None
  head = ["regime", "seeds"] + [label for _, label, _, _, _ in METRICS] + ["train s / run"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  best = {}
  for key, _, _, _, higher in METRICS:
    means = {r: summary[r][key]["mean"] for r in regimes if summary[r][key]["n"]}
    if means:
      top = (max if higher else min)(means.values())
      winners = [r for r, m in means.items() if m == top]
      if len(winners) == 1:  # ties: no bold
        best[key] = winners[0]
  for regime in regimes:
    entry = summary[regime]
    cells = [regime, str(len(entry["seeds"]))]
    for key, _, _, digits, _ in METRICS:
      text = _cell(entry[key], digits)
      cells.append(f"**{text}**" if best.get(key) == regime else text)
    seconds = entry["train_seconds"]
    cells.append(f"{seconds:.0f}" if math.isfinite(seconds) else "n/a")
    lines.append("| " + " | ".join(cells) + " |")
  notes = [
      "",
      "Mean ± standard deviation over seeds (ddof 1); bold: the best mean (none on a tie). "
      f"{total_steps} optimiser steps per run; the same {cases} held-out {split} cases (whole volumes) score "
      "every run; "
      "reference lesions per diameter bin: "
      + ", ".join(f"{b} {int(v) if math.isfinite(_as_float(v)) else v}"
                  for b, v in lesions.items()) + ".",
      "Recall: detected reference lesions / reference lesions in the bin, pooled over the cases "
      "(LiTS merge rule; IoU > 0.5, or any overlap). ASSD over the cases where the predicted and "
      "reference tumour are both non-empty or both empty. Train s / run: wall seconds of an "
      "uninterrupted run's training (data preparation included for the first), not counting "
      "evaluation.",
      "",
      f"Command: `{command}`",
  ]
  return "\n".join(lines + notes) + "\n"


def plot(summary: dict, path: str, total_steps: int) -> None:
  """Grouped bars (mean ± std over seeds, dots: seeds) of Dice and recall by lesion size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  keys = ["dice_per_case", "dice_global"] + [f"recall_iou_{b}" for b in BINS] + [
      f"recall_any_{b}" for b in BINS]
  labels = {k: lab for k, lab, _, _, _ in METRICS}
  regimes = list(summary)
  fig, ax = plt.subplots(figsize=(12, 4.8), dpi=110)
  width = 0.8 / max(len(regimes), 1)
  x = np.arange(len(keys))
  for i, regime in enumerate(regimes):
    means = [summary[regime][k]["mean"] for k in keys]
    stds = [summary[regime][k]["std"] for k in keys]
    pos = x - 0.4 + width * (i + 0.5)
    ax.bar(pos, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=2,
           label=regime, alpha=0.85)
    for j, k in enumerate(keys):
      values = summary[regime][k]["values"]
      ax.plot([pos[j]] * len(values), values, "k.", markersize=3)
  ax.set_xticks(x)
  ax.set_xticklabels([labels[k].replace(" (", "\n(") for k in keys], fontsize=8)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("score")
  seeds = max((len(summary[r]["seeds"]) for r in regimes), default=0)
  ax.set_title(f"Synthetic benchmark: {total_steps} steps per run, mean ± std over {seeds} "
               f"seeds (dots: seeds)")
  ax.legend(fontsize=8, ncol=len(regimes))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


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
  parser.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                      help="comma-separated seeds (default %(default)s)")
  parser.add_argument("--total_steps", type=int, default=DEFAULT_TOTAL_STEPS,
                      help="optimiser steps per run, for every regime (default %(default)s)")
  parser.add_argument("--split", default="test", choices=("test", "validation"),
                      help="the held-out cases that score the runs (default %(default)s)")
  parser.add_argument("--data_dir", default=None,
                      help="the synthetic data and its prepared dataset (default OUT/data)")
  args = parser.parse_args(argv)
  args.regimes = [r.strip() for r in args.regimes.split(",") if r.strip()]
  unknown = [r for r in args.regimes if r not in REGIMES]
  if unknown:
    parser.error(f"unknown regime(s) {unknown}; choose from {', '.join(REGIMES)}")
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
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  out = os.path.abspath(args.out)
  data_dir = os.path.abspath(args.data_dir or os.path.join(out, "data"))
  os.makedirs(out, exist_ok=True)
  log = lambda m: print(m, flush=True)  # noqa: E731
  configs = {(r, s): regime_config(r, s, args.total_steps, data_dir, args.overrides)
             for r in args.regimes for s in args.seeds}
  datas = {json.dumps(c.data.to_dict(), sort_keys=True, default=str) for c in configs.values()}
  if len(datas) != 1:
    raise ExperimentError("the regimes' data sections differ; every run must read the same data")
  start = time.perf_counter()
  records = []
  for (regime, seed), config in configs.items():
    workdir = os.path.join(out, "runs", regime, f"seed{seed}")
    records.append(run_one(regime, seed, config, workdir, split=args.split, log=log))
  summary = summarise(records, args.regimes)
  command = "python benchmarks/curriculum_experiment.py " + " ".join(raw)
  table = markdown_table(summary, records, args.total_steps, command.strip(), args.split)
  result = dict(
      benchmark="curriculum_experiment", command=command.strip(),
      machine=machine_info.describe("jax", "flax", "orbax-checkpoint"),
      regimes=args.regimes, seeds=args.seeds, total_steps=args.total_steps, split=args.split,
      data_dir=data_dir, wall_seconds_this_invocation=time.perf_counter() - start,
      computed_this_invocation=[f"{r['regime']}/seed{r['seed']}" for r in records
                                if "skipped" not in r],
      summary=summary, runs=[{k: v for k, v in r.items()
                              if k not in ("aggregate", "config", "skipped")} for r in records])
  machine_info.write_result(os.path.join(out, "results.json"), _finite(result))
  _atomic_write(os.path.join(out, "results.md"), table)
  plot(summary, os.path.join(out, "results.png"), args.total_steps)
  log(table)
  log(f"wrote {out}/results.json, results.md, results.png")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ExperimentError as e:
    print(f"curriculum_experiment: error: {e}", file=sys.stderr)
    sys.exit(2)
