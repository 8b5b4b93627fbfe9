"""Learning curves: validation tumour Dice against optimiser steps and wall seconds, per recipe.

Trains a recipe (a named set of config overrides, RECIPES) on the default synthetic data for
several seeds, one curriculum (default `whole_only`: the recipe's whole-slice training, with no
curriculum to blur where it plateaus) at `--steps` steps, evaluating every `--eval_every`
steps, and writes

  OUT/learning.json   every run's curve (step, elapsed seconds, validation Dice), per-recipe
                      summaries, the machine and the command
  OUT/learning.md     the table: Dice at fixed steps (mean ± std over seeds), best Dice, the
                      plateau step, seconds to reach Dice 0.3 / 0.5 / 0.7, steps per second
  OUT/learning.png    the curves against steps and against wall seconds

Wall seconds are the run's clock (`elapsed_s` in metrics.jsonl: training and validation,
compilation included), with the machine's load recorded. Each run is a workdir under
OUT/runs/RECIPE/seedK; an interrupted invocation resumes every unfinished run at its exact step
and skips finished ones (refusing a finished one of another `--steps`). From the repository
root (`--config.KEY=VALUE` overrides apply to every recipe, after its own):

  .venv/bin/python experiments/learning.py --out docs/learning --recipes old,new --seeds 0,1,2 \
      --steps 3000 --eval_every 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from curriculum_seg import machine as machine_info  # noqa: E402
from curriculum_seg import sweep  # noqa: E402  step scaling

# name -> config overrides on top of configs/synthetic.py:REGIME (applied to every stage that
# has the field for `stages.*.FIELD`): new, the defaults (the README's training recipe);
# stride2, with the half-resolution U-Net (input_stride 2, a quarter of the FLOPs) the recipe
# first used; old, the recipe before Dice + cross-entropy: plain soft Dice (smoothing 1),
# uniform liver-range slices, a constant learning rate, the full-resolution U-Net, no prior.
RECIPES = {
    "new": (),
    "stride2": (("model.input_stride", "2"),),
    "old": (("loss.name", "dice"), ("loss.dice_smooth", "1.0"), ("loss.class_weights", "None"),
            ("stages.*.tumour_fraction", "0.0"), ("stages.*.schedule.name", "constant"),
            ("stages.*.schedule.warmup_steps", "0"), ("model.input_stride", "1"),
            ("model.foreground_prior", "None")),
}
DICE_AT = (250, 500, 1000, 2000, 3000, 5000)
THRESHOLDS = (0.3, 0.5, 0.7)


class LearningError(RuntimeError):
  """A benchmark that cannot run as asked (the message says why)."""


def recipe_config(recipe: str, seed: int, steps: int, eval_every: int, regime: str,
                  data_dir: Optional[str], overrides=()):
  """configs/synthetic.py:REGIME with the recipe's overrides, the seed and the budget."""
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  if recipe not in RECIPES:
    raise LearningError(f"unknown recipe {recipe!r}: choose from {', '.join(RECIPES)}")
  config = config_loading.load_config_file(f"{_ROOT}/configs/synthetic.py:{regime}")
  pairs = list(RECIPES[recipe]) + list(overrides)
  if data_dir:
    pairs = [("data.lits_dir", os.path.join(data_dir, "lits")),
             ("data.tfds_dir", os.path.join(data_dir, "tfds"))] + pairs
  names = list(config.curriculum)
  pairs += [("stages.*.eval_every", str(eval_every)), ("stages.*.checkpoint_every",
                                                        str(eval_every))]
  config = config_loading.apply_overrides(
      config, config_loading.expand_stage_wildcards(config, pairs))
  config.seed = int(seed)
  if steps < len(names):
    raise LearningError(f"--steps={steps} is fewer than the {len(names)} stages of {regime}")
  sweep.scale_steps(config, int(steps))
  return config


def curve(workdir: str) -> list[dict]:
  """(step over the whole run, elapsed seconds, val Dice) of each validation of a run."""
  from curriculum_seg import rundir  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  rows = rundir.MetricsLog(epath.Path(workdir)).read()
  return [dict(step=int(r["global_step"]), stage=r["stage"], seconds=float(r["elapsed_s"]),
               val_dice=float(r["val_dice"])) for r in rows if "val_dice" in r]


def train_one(config, workdir: str, log) -> dict:
  """Trains (or resumes, or skips when finished) one run; returns its curve and speed."""
  from curriculum_seg import rundir, stages  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  summary = os.path.join(workdir, "summary.json")
  if not os.path.exists(summary):
    stages.train(config, workdir, log=log)
  else:
    check_finished_length(config, workdir)
  rows = rundir.MetricsLog(epath.Path(workdir)).read()
  rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r]
  return dict(curve=curve(workdir), steps_per_s=float(np.median(rates)) if rates else math.nan,
              steps=sum(int(config.stages[n].steps) for n in config.curriculum))


def check_finished_length(config, workdir: str) -> None:
  """Refuses a finished run whose stage lengths are not the ones asked for now.

  The stage controller hands back a completed stage as it is (and the schedule's length is part
  of the run), so reusing a run of another `--steps` would report its curve as this one's.
  """
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise LearningError(f"{path}: cannot read the finished run's config ({e}); delete "
                        f"{workdir} to rerun it") from e
  saved_steps = {n: int(saved.get("stages", {}).get(n, {}).get("steps", -1))
                 for n in saved.get("curriculum", [])}
  asked = {n: int(config.stages[n].steps) for n in config.curriculum}
  if saved_steps != asked:
    raise LearningError(
        f"{workdir} holds a finished run of other stage lengths ({saved_steps}) than asked "
        f"({asked}, from --steps); use another --out, or delete that run to retrain it")


def _interp(points: list[dict], key: str, at: float) -> float:
  xs = [p["step"] for p in points]
  if not xs or at > xs[-1]:
    return math.nan
  return float(np.interp(at, xs, [p[key] for p in points]))


def summarise(runs: dict) -> dict:
  """Per recipe: Dice at DICE_AT steps, best Dice, plateau step and time to THRESHOLDS."""
  out = {}
  for recipe, seeds in runs.items():
    entry = dict(seeds=sorted(seeds))
    stats = lambda vals: dict(  # noqa: E731
        mean=float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan,
        std=float(np.nanstd(vals, ddof=1)) if np.isfinite(vals).sum() > 1 else 0.0,
        values=[float(v) for v in vals])
    for at in DICE_AT:
      entry[f"dice_at_{at}"] = stats(np.array([_interp(r["curve"], "val_dice", at)
                                               for r in seeds.values()]))
    entry["best_dice"] = stats(np.array([max((p["val_dice"] for p in r["curve"]),
                                             default=math.nan) for r in seeds.values()]))
    entry["final_dice"] = stats(np.array([r["curve"][-1]["val_dice"] if r["curve"] else math.nan
                                          for r in seeds.values()]))
    # Plateau: the first step where the mean curve reaches 95 % of its maximum.
    common = sorted(set.intersection(*[{p["step"] for p in r["curve"]} for r in seeds.values()]))
    mean_curve = [float(np.mean([next(p["val_dice"] for p in r["curve"] if p["step"] == s)
                                 for r in seeds.values()])) for s in common]
    if mean_curve and max(mean_curve) > 0:
      top = max(mean_curve)
      entry["plateau_step"] = int(next(s for s, v in zip(common, mean_curve) if v >= 0.95 * top))
    else:
      entry["plateau_step"] = None
    for threshold in THRESHOLDS:
      entry[f"seconds_to_{threshold}"] = stats(np.array([
          next((p["seconds"] for p in r["curve"] if p["val_dice"] >= threshold), math.nan)
          for r in seeds.values()]))
    entry["steps_per_s"] = stats(np.array([r["steps_per_s"] for r in seeds.values()]))
    out[recipe] = entry
  return out


def _cell(stat: dict, digits: int = 3) -> str:
  vals = [v for v in stat["values"] if math.isfinite(v)]
  if not vals:
    return "n/a"
  text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
  return text if len(vals) == len(stat["values"]) else f"{text} ({len(vals)}/{len(stat['values'])})"


def markdown_table(summary: dict, steps: int, command: str, machine: dict) -> str:
  ats = [a for a in DICE_AT if a <= steps]
  head = (["recipe", "seeds"] + [f"Dice @ {a}" for a in ats] +
          ["best Dice", "plateau step"] + [f"s to Dice {t}" for t in THRESHOLDS] + ["steps/s"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for recipe, e in summary.items():
    cells = [recipe, str(len(e["seeds"]))] + [_cell(e[f"dice_at_{a}"]) for a in ats] + [
        _cell(e["best_dice"]), str(e["plateau_step"])] + [
        _cell(e[f"seconds_to_{t}"], 0) for t in THRESHOLDS] + [_cell(e["steps_per_s"], 1)]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Validation tumour Dice (global over the validation slices), mean ± std over "
            "seeds (ddof 1); (k/n): only k of n seeds reached it. Plateau step: where the "
            "seeds' mean curve first reaches 95 % of its maximum. Seconds: the run's clock "
            "(training, validation and compilation). "
            f"Machine: {machine['cpu']}, {machine['cores']} cores, load average at the end "
            f"{', '.join(f'{x:.1f}' for x in machine['load_average'])}.", "",
            f"Command: `{command}`"]
  return "\n".join(lines) + "\n"


def plot(runs: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), dpi=110)
  colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for k, (recipe, seeds) in enumerate(runs.items()):
    for j, (seed, r) in enumerate(sorted(seeds.items())):
      xs = [p["step"] for p in r["curve"]]
      ts = [p["seconds"] for p in r["curve"]]
      ys = [p["val_dice"] for p in r["curve"]]
      label = recipe if j == 0 else None
      axes[0].plot(xs, ys, color=colours[k % len(colours)], alpha=0.8, label=label)
      axes[1].plot(ts, ys, color=colours[k % len(colours)], alpha=0.8, label=label)
  for ax, xlabel in zip(axes, ("optimiser step", "wall seconds (training + validation)")):
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation tumour Dice (global)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle("Learning curves on the synthetic default (one line per seed)")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def parse_args(argv: Optional[list[str]] = None):
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = config_loading.split_override_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="runs/learning", help="output folder (%(default)s)")
  parser.add_argument("--recipes", default="old,new", help="comma-separated: " +
                      ", ".join(RECIPES))
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (%(default)s)")
  parser.add_argument("--steps", type=int, default=3000, help="steps per run (%(default)s)")
  parser.add_argument("--eval_every", type=int, default=100, help="(%(default)s)")
  parser.add_argument("--regime", default="whole_only",
                      help="configs/synthetic.py:REGIME (%(default)s)")
  parser.add_argument("--data_dir", default=None,
                      help="data and prepared dataset (default: OUT/data, shared by all runs)")
  args = parser.parse_args(argv)
  args.recipes = [r for r in args.recipes.split(",") if r]
  unknown = [r for r in args.recipes if r not in RECIPES]
  if unknown:
    parser.error(f"unknown recipe(s) {unknown}: choose from {', '.join(RECIPES)}")
  args.seeds = parse_seeds(parser, args.seeds)
  if args.steps < 1 or args.eval_every < 1:
    parser.error("--steps and --eval_every must be >= 1")
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
  out = os.path.abspath(args.out)
  data_dir = os.path.abspath(args.data_dir or os.path.join(out, "data"))
  os.makedirs(out, exist_ok=True)
  start = time.perf_counter()
  runs: dict = {}
  for recipe in args.recipes:
    for seed in args.seeds:
      config = recipe_config(recipe, seed, args.steps, args.eval_every, args.regime, data_dir,
                             args.overrides)
      workdir = os.path.join(out, "runs", recipe, f"seed{seed}")
      log = lambda m, r=recipe, s=seed: print(f"[{r} seed {s}] {m}", flush=True)  # noqa: E731
      runs.setdefault(recipe, {})[seed] = train_one(config, workdir, log)
      # Partial results after every run, so an interrupted invocation leaves readable figures.
      table = write_results(out, runs, args, raw, data_dir, start,
                            complete=(recipe, seed) == (args.recipes[-1], args.seeds[-1]))
  print(table)
  return 0


def write_results(out: str, runs: dict, args, raw, data_dir: str, start: float,
                  complete: bool) -> str:
  """learning.json, learning.md and learning.png of the runs finished so far."""
  summary = summarise(runs)
  machine = machine_info.describe("jax", "flax", "optax")
  command = ("python experiments/learning.py " + " ".join(raw)).strip()
  table = markdown_table(summary, args.steps, command, machine)
  if not complete:
    table = "(partial: not every recipe and seed has finished)\n\n" + table
  result = dict(benchmark="learning", command=command, machine=machine, regime=args.regime,
                steps=args.steps, eval_every=args.eval_every, data_dir=data_dir,
                complete=complete, recipes={r: list(RECIPES[r]) for r in args.recipes},
                wall_seconds_this_invocation=time.perf_counter() - start, summary=summary,
                runs={r: {str(s): v for s, v in seeds.items()} for r, seeds in runs.items()})
  machine_info.write_result(os.path.join(out, "learning.json"), result)
  with open(os.path.join(out, "learning.md"), "w") as f:
    f.write(table)
  plot(runs, os.path.join(out, "learning.png"))
  return table


if __name__ == "__main__":
  try:
    sys.exit(main())
  except LearningError as e:
    print(f"learning: error: {e}", file=sys.stderr)
    sys.exit(2)
