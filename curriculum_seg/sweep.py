"""`curriculum-seg sweep`: every run of the ablation sweep a config file declares, at equal
optimiser steps, each scored on held-out cases and kept as a small record for `compare`.

A config file declares its sweep beside `get_config` (`get_sweep`, see `load_sweep`), as
big_vision declares sweeps beside its configs.

OUT (a new or empty folder, or one the sweep made: it writes nowhere else):
  sweep.json         the plan: config, runs, reference, where the runs are scored, the command
  runs/NAME/         each run's workdir (the train command's layout: it resumes)
  records/NAME.json  each finished run's record: regime, seed, config and its digest, stages,
                     validation curve, per-case scores with every reference lesion
                     (stats.case_record). Small and self-contained: `compare` needs only these
                     and sweep.json
  results.*          compare's results (curriculum_seg/compare.py), after every finished run
A finished run (its record) is skipped; an interrupted one resumes at its exact step. SIGTERM
stops the current run at a checkpoint (or its scoring) and raises SweepStopped; the same command
continues. `records_from` (--records) takes finished runs from a copy of another folder's
records (a committed sweep's), each checked as a finished run is, so a new OUT continues it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import ml_collections

from curriculum_seg import config_loading, machine, metrics, rundir, stats, tasks
from curriculum_seg.sweep_folder import (  # noqa: F401  (also read here as sweep.*)
    PLAN_FILE, RECORDS_DIR, SweepError, describe_scored_on, read_plan, read_record_folder,
    read_records, record_path)

MARK_FILE = ".curriculum_seg_sweep"  # marks a folder the sweep made
RUNS_DIR = "runs"
RECORD_FORMAT = 1
# Keys that do not change a run's result (where the data and the caches lie, how batches are
# made): left out of the config digest and of the check of a finished run against its config.
NOT_RESULTS = rundir.PATH_FIELDS + ("compilation_cache_dir",) + rundir.INPUT_SPEED_FIELDS
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SWEEP_KEYS = ("runs", "total_steps", "reference", "overrides", "held_out")
HELD_OUT_DIR = "held_out"  # OUT/data/held_out: a declared synthetic held-out set
_HELD_OUT_KEYS = ("num_cases", "seed", "max_tumours")
_RUN_KEYS = ("regime", "seed", "name", "overrides", "config")


class SweepStopped(Exception):
  """SIGTERM stopped the sweep; the message says where and how to continue."""


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  regime: str
  seed: int
  overrides: tuple[tuple[str, str], ...] = ()
  config: Optional[str] = None  # FILE[:ARG] of a config of its own, else the sweep's file


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A config file's declared sweep (`get_sweep`), checked."""

  spec: str  # the --config given, FILE[:ARG]
  path: str  # the config file
  runs: tuple[Run, ...]
  reference: str
  total_steps: Optional[int]
  overrides: tuple[tuple[str, str], ...] = ()
  # A synthetic held-out set the sweep makes and scores on (keys: _HELD_OUT_KEYS), or None.
  held_out: Optional[tuple[tuple[str, int], ...]] = None

  @property
  def regimes(self) -> list[str]:
    return list(dict.fromkeys(r.regime for r in self.runs))

  @property
  def seeds(self) -> list[int]:
    return sorted({r.seed for r in self.runs})


# --------------------------------------------------------------------------- the declaration

def _text(value: Any) -> str:
  """An override value as command-line text (config_loading parses it to the field's type)."""
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return "true" if value else "false"
  return repr(value)


def _overrides(value: Any, where: str) -> tuple[tuple[str, str], ...]:
  if value is None:
    return ()
  if isinstance(value, Mapping):
    items = list(value.items())
  else:
    try:
      items = [tuple(pair) for pair in value]
    except TypeError:
      items = [()]
    if any(len(pair) != 2 for pair in items):
      raise SweepError(f"{where}: overrides must be a dict {{key: value}} or (key, value) pairs")
  for key, _ in items:
    if not isinstance(key, str) or not key:
      raise SweepError(f"{where}: override key {key!r} is not a dotted config key")
  return tuple((key, _text(v)) for key, v in items)


def _parse(declared: Any, spec: str, path: str) -> Sweep:
  where = f"{path}: get_sweep()"
  if not isinstance(declared, Mapping):
    raise SweepError(f"{where} returned {type(declared).__name__}, not a dict")
  unknown = sorted(set(declared) - set(_SWEEP_KEYS))
  if unknown:
    raise SweepError(f"{where}: unknown key(s) {unknown} (keys: {', '.join(_SWEEP_KEYS)})")
  runs_in = declared.get("runs")
  if not isinstance(runs_in, (list, tuple)) or not runs_in:
    raise SweepError(f"{where}: 'runs' must be a non-empty list of dict(regime=..., seed=...)")
  runs, names = [], set()
  for i, r in enumerate(runs_in):
    at = f"{where} runs[{i}]"
    if not isinstance(r, Mapping):
      raise SweepError(f"{at} is a {type(r).__name__}, not a dict(regime=..., seed=...)")
    bad = sorted(set(r) - set(_RUN_KEYS))
    if bad:
      raise SweepError(f"{at}: unknown key(s) {bad} (keys: {', '.join(_RUN_KEYS)})")
    regime, seed = r.get("regime"), r.get("seed")
    if not isinstance(regime, str) or not regime:
      raise SweepError(f"{at}: 'regime' (the get_config arg) must be a non-empty string")
    if isinstance(seed, bool) or not isinstance(seed, int):
      raise SweepError(f"{at}: 'seed' must be an integer, got {seed!r}")
    name = r.get("name") or f"{regime}-seed{seed}"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
      raise SweepError(f"{at}: name {name!r} must be letters, digits, '_', '.' or '-' (it "
                       "names the run's folder and record)")
    if name in names:
      raise SweepError(f"{at}: two runs are named {name!r}; give each a distinct 'name'")
    names.add(name)
    config = r.get("config")
    if config is not None:
      config = _relative_spec(str(config), path)
    runs.append(Run(name=name, regime=regime, seed=int(seed),
                    overrides=_overrides(r.get("overrides"), at), config=config))
  reference = declared.get("reference")
  regimes = list(dict.fromkeys(r.regime for r in runs))
  if reference not in regimes:
    raise SweepError(f"{where}: reference {reference!r} is not a regime of its runs "
                     f"({', '.join(regimes)})")
  total = declared.get("total_steps")
  if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
    raise SweepError(f"{where}: total_steps must be a positive integer or None, got {total!r}")
  held_out = declared.get("held_out")
  if held_out is not None:
    if not isinstance(held_out, Mapping) or set(held_out) - set(_HELD_OUT_KEYS) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in held_out.values()):
      raise SweepError(f"{where}: held_out must be a dict of non-negative integers with keys "
                       f"among {', '.join(_HELD_OUT_KEYS)}, got {held_out!r}")
    if held_out.get("num_cases", 0) < 1:
      raise SweepError(f"{where}: held_out needs num_cases >= 1")
    held_out = tuple(sorted(held_out.items()))
  return Sweep(spec=spec, path=path, runs=tuple(runs), reference=reference, total_steps=total,
               overrides=_overrides(declared.get("overrides"), where), held_out=held_out)


def _relative_spec(spec: str, declaring_file: str) -> str:
  """A run's FILE[:ARG], FILE relative to the declaring file's folder when it is there."""
  file, sep, arg = spec.partition(":")
  beside = os.path.join(os.path.dirname(declaring_file), file)
  return (beside if not os.path.isabs(file) and os.path.exists(beside) else file) + sep + arg


def load_sweep(spec: str) -> Sweep:
  """The sweep config file FILE[:ARG] declares with `get_sweep(ARG)`, checked.

  The declaration:

    def get_sweep(arg=None):
      return dict(
          runs=[dict(regime=r, seed=s) for s in (0, 1, 2) for r in ("three_stage", "whole_only")],
          total_steps=1200,          # every run's optimiser steps (None: each as configured)
          reference="three_stage",   # the regime every other one is compared with
          overrides={"data.test_fraction": 0.3},  # for every run (optional)
          held_out=None)  # or dict(num_cases=45, seed=1, max_tumours=16): synthetic cases
                          # made into OUT/data/held_out and scored instead of a test split

  A run is `regime` (the `get_config` arg) and `seed` (config.seed), with optional `name`
  (default REGIME-seedSEED), `overrides` (its own) and `config` (another config file FILE[:ARG],
  relative to the declaring file's folder, for a regime with a config of its own). Overrides are
  {key: value}, a value as Python or as command-line text; `stages.*.FIELD` sets FIELD of every
  stage that has it; `{out}` in a text value is the sweep's --out folder (a synthetic data set of
  its own, for example). Runs are trained in the order listed (seed by seed pairs regimes early).

  A run's config: get_config(regime), then the sweep's overrides, the run's, the command line's
  --config.KEY=VALUE, config.seed = seed, and its stages' steps scaled to `total_steps` in their
  configured proportions. Every run must read the same data. Each is scored with `evaluate_run` on
  the prepared dataset's test split (config.data.test_fraction > 0) or on every case of a LiTS
  folder (`score_dir`).
  """
  file, _, arg = spec.partition(":")
  module = config_loading.load_config_module(file)
  path = module.__file__
  if not callable(getattr(module, "get_sweep", None)):
    raise SweepError(f"config file {file} declares no sweep: add get_sweep(arg=None) beside "
                     "get_config (configs/synthetic.py has one)")
  try:
    declared = module.get_sweep(arg or None)
  except Exception as e:  # the user's config: one line
    raise SweepError(f"config file {spec}: get_sweep({arg or None!r}) failed: "
                     f"{type(e).__name__}: {e}") from e
  return _parse(declared, spec, path)


# --------------------------------------------------------------------------- run configs

def scale_steps(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """Spreads `total_steps` over the curriculum's stages in proportion to their configured steps
  (the last stage takes the rounding remainder), so every regime trains exactly total_steps."""
  names = list(config.curriculum)
  configured = [int(config.stages[n].steps) for n in names]
  if total_steps < len(names):
    raise SweepError(f"total_steps={total_steps} is fewer than the {len(names)} stages of "
                     f"{', '.join(names)}")
  scaled = [max(1, (s * total_steps) // sum(configured)) for s in configured[:-1]]
  scaled.append(total_steps - sum(scaled))
  for name, steps in zip(names, scaled):
    config.stages[name].steps = steps


def run_spec(sweep: Sweep, run: Run) -> str:
  """The FILE[:ARG] whose get_config gives the run's config before the sweep's changes."""
  return run.config or f"{sweep.path}:{run.regime}"


def run_config(sweep: Sweep, run: Run, out: str,
               overrides: Iterable[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  """The run's resolved config (the module docstring's order), checked whole; one ConfigError
  naming the run for anything wrong."""
  from curriculum_seg import config_check  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  config = config_loading.load_config_file(run_spec(sweep, run))
  pairs = [(k, v.replace("{out}", out)) for k, v in (*sweep.overrides, *run.overrides,
                                                       *overrides)]
  try:
    config = config_loading.apply_overrides(
        config, config_loading.expand_stage_wildcards(config, pairs))
    config.seed = int(run.seed)
    if sweep.total_steps is not None:
      scale_steps(config, sweep.total_steps)
    config_check.check_config(config)
  except config_loading.ConfigError as e:
    raise config_loading.ConfigError(f"run {run.name}: {e}") from e
  return config_check.resolve_paths(config)


def _without(value: Any, ignored: tuple[str, ...], prefix: str = "") -> Any:
  if not isinstance(value, dict):
    return value
  return {k: _without(v, ignored, f"{prefix}{k}.") for k, v in value.items()
          if k not in ignored and f"{prefix}{k}" not in ignored}


def config_digest(config_json: dict) -> str:
  """A short digest of a resolved config (as config.json holds it), NOT_RESULTS left out: runs
  with the same digest train the same way."""
  text = json.dumps(_without(config_json, NOT_RESULTS), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_wildcards(configs: dict, overrides) -> None:
  """Refuses a command-line `stages.*.FIELD` that no stage of any run has (a typo). A sweep's
  own may name fields of regimes a subset of its runs leaves out."""
  keys = {k for k, _ in overrides}
  for key in sorted(k for k in keys if k.startswith(config_loading.STAGE_WILDCARD)):
    field = key[len(config_loading.STAGE_WILDCARD):].split(".")[0]
    if not any(field in c.stages[n] for c in configs.values() for n in c.stages.keys()):
      raise config_loading.ConfigError(f"unknown config key {key}: no stage of any run has "
                                       f"a field {field!r}")


def _check_same_data(sweep: Sweep, configs: dict) -> None:
  first = sweep.runs[0].name
  want = configs[first].data.to_dict()
  for run in sweep.runs[1:]:
    diff = rundir.config_differences(want, configs[run.name].data.to_dict(), ignore=())
    if diff:
      raise SweepError(f"runs {first} and {run.name} read different data (data."
                       f"{', data.'.join(diff[:5])}); a paired comparison needs the same data")


def held_out_settings(sweep: Sweep, config: ml_collections.ConfigDict, out: str) -> dict:
  """The declared synthetic held-out set: its folder and the generator settings (the runs'
  generator with the declared case count, seed and tumours per case at most)."""
  from data_pipelines import lits_tfds  # pylint: disable=g-import-not-at-top
  data = config.data
  if not data.synthetic.enabled:
    raise SweepError("held_out declares synthetic held-out cases, but the runs' data are not "
                     "synthetic (config.data.synthetic.enabled=false): give --score_dir")
  settings = dict(sweep.held_out)
  seed = settings.get("seed", int(data.synthetic.seed) + 1)
  if seed == int(data.synthetic.seed):
    raise SweepError(f"held_out seed {seed} is the training generator's seed: its cases would "
                     "be the training cases; declare another seed")
  generator = lits_tfds.synth_config(data)
  if "max_tumours" in settings:
    generator = dataclasses.replace(generator, max_tumours=int(settings["max_tumours"]))
  return dict(folder=os.path.join(out, "data", HELD_OUT_DIR), num_cases=int(
      settings["num_cases"]), seed=int(seed), generator=dataclasses.asdict(generator))


def make_held_out(held_out: dict, log: Callable[[str], Any]) -> None:
  """Synthesises the declared held-out set into its folder (reused when complete)."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  cfg = synthetic.SynthConfig(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in held_out["generator"].items()})
  if synthetic.read_manifest(held_out["folder"]) is None:
    log(f"synthesising {held_out['num_cases']} held-out cases (seed {held_out['seed']}) into "
        f"{held_out['folder']}")
  synthetic.ensure_synthetic(held_out["folder"], held_out["num_cases"], held_out["seed"], cfg,
                             key="held_out")


def score_folder(source: dict, out: str) -> Optional[str]:
  """The LiTS folder the runs are scored on (None: the prepared dataset's test split)."""
  if "held_out" in source:
    return os.path.join(out, "data", HELD_OUT_DIR)
  return source.get("folder")


def scored_cases(config: ml_collections.ConfigDict,
                 score_dir: Optional[str]) -> tuple[dict, list[int]]:
  """Where the runs are scored and the case numbers: every case of `score_dir`, or the test
  split of the prepared dataset (as the builder assigns it)."""
  from data_pipelines import lits, lits_tfds  # pylint: disable=g-import-not-at-top
  data = config.data
  if score_dir is not None:
    folder = os.path.abspath(os.path.expanduser(score_dir))
    training = os.fspath(data.lits_dir)
    if os.path.isdir(folder) and os.path.isdir(training) and os.path.samefile(folder, training):
      raise SweepError(f"--score_dir {score_dir} is the training data folder "
                       "config.data.lits_dir; give a folder of held-out cases")
    return dict(folder=folder), sorted(lits.find_cases(folder))
  if not float(data.get("test_fraction", 0.0)) > 0:
    raise SweepError("the runs' data have no held-out test split (config.data.test_fraction="
                     f"{data.get('test_fraction', 0.0)}): set data.test_fraction in the "
                     "sweep's overrides or with --config.data.test_fraction=F, or give "
                     "--score_dir FOLDER")
  if data.synthetic.enabled:
    numbers = list(range(int(data.synthetic.num_cases)))
  else:
    numbers = sorted(lits.find_cases(data.lits_dir))
  test = lits_tfds.assign_splits(numbers, float(data.val_fraction), float(data.test_fraction),
                                 int(data.split_seed))["test"]
  return dict(split="test"), test


# --------------------------------------------------------------------------- the folder

def check_out(out: str) -> None:
  """Refuses an --out the sweep may not write into: a file, or a folder holding files it did
  not write (it writes only into a new or empty folder or one it made)."""
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise SweepError(f"--out {out} is a file, not a folder")
  if os.path.exists(os.path.join(out, MARK_FILE)):
    return
  names = sorted(os.listdir(out))
  if names:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise SweepError(f"--out {out} holds files the sweep did not write ({shown}); it writes "
                     "only into a new or empty folder or one it made: name another")


def _claim_out(out: str) -> None:
  check_out(out)
  os.makedirs(out, exist_ok=True)
  mark = os.path.join(out, MARK_FILE)
  if not os.path.exists(mark):
    rundir.write_atomically(mark, json.dumps(dict(made_by="curriculum-seg sweep")) + "\n")
  os.makedirs(os.path.join(out, RECORDS_DIR), exist_ok=True)


def _check_finished(record: dict, run: Run, config_json: dict, source: dict,
                    numbers: list[int], path: str) -> None:
  """Refuses a record of another config, or one scored on other cases."""
  diff = rundir.config_differences(record.get("config", {}), config_json, ignore=NOT_RESULTS)
  if (record.get("regime"), record.get("seed")) != (run.regime, run.seed):
    diff = ["regime or seed"] + diff
  if diff:
    raise SweepError(f"{path} is a finished run of another config (differing: "
                     f"{', '.join(diff[:8])}); use another --out, or delete the record and "
                     f"{RUNS_DIR}/{run.name} to retrain it")
  if record.get("scored_on") != source or record.get("case_numbers") != numbers:
    raise SweepError(f"{path} was scored on other cases ({record.get('scored_on')}); use another "
                     "--out, or delete the record to score the run again")


# --------------------------------------------------------------------------- one run

def read_curve(workdir: str, stage_results: list[dict]) -> list[dict]:
  """The run's validation rows of its tumour networks (metrics.jsonl): global_step, stage,
  step, val_dice, val_loss (a cascade's liver network is left out: its Dice is liver Dice)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  tumour = {s["name"] for s in stage_results if s["task"] in tasks.TUMOUR_TASKS}
  return [dict(global_step=int(r["global_step"]), stage=r["stage"], step=int(r["step"]),
               val_dice=float(r["val_dice"]), val_loss=float(r.get("val_loss", "nan")))
          for r in rundir.MetricsLog(epath.Path(workdir)).read()
          if "val_dice" in r and r.get("stage") in tumour]


def train_and_score(sweep: Sweep, run: Run, config: ml_collections.ConfigDict, out: str,
                    source: dict, numbers: list[int],
                    log: Callable[[str], Any] = print) -> dict:
  """Trains (or resumes) one run in OUT/runs/NAME, scores its chosen checkpoint on the held-out
  cases, and writes its record (returned) to OUT/records/NAME.json."""
  from curriculum_seg import evaluate, stages  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(out, RUNS_DIR, run.name)
  resumed = rundir.has_checkpoint(workdir)
  prefixed = lambda m: log(f"[{run.name}] {m}")  # noqa: E731
  start = time.perf_counter()
  results = stages.train(config, workdir, log=prefixed)
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  evaluation = evaluate.evaluate_run(
      workdir, split="test", lits_dir=score_folder(source, out),
      output=os.path.join(workdir, "eval", "sweep"), pictures=False, log=prefixed)
  eval_s = time.perf_counter() - start
  cases = [stats.case_record(c) for c in evaluation["cases"]]
  scored = sorted(c["case_number"] for c in cases)
  if scored != list(numbers):
    raise SweepError(f"{workdir}: scored cases {scored}, expected {list(numbers)}")
  stage_results = [dict(name=r.name, steps=r.steps, task=r.task, best_val_dice=r.best_score,
                        best_step=r.best_step, chosen=r.chosen) for r in results]
  config_json = rundir.config_to_json(config)
  record = dict(
      format=RECORD_FORMAT, name=run.name, regime=run.regime, seed=run.seed,
      config_file=run_spec(sweep, run), config_digest=config_digest(config_json),
      config=config_json, total_steps=sum(r.steps for r in results), stages=stage_results,
      checkpoint=evaluation["checkpoint"], scored_on=source, case_numbers=list(numbers),
      curve=read_curve(workdir, stage_results),
      cases=sorted(cases, key=lambda c: c["case_number"]),
      resumed=resumed, train_seconds=None if resumed else train_s, eval_seconds=eval_s,
      machine=machine.describe("jax", "jaxlib", "flax"))
  record = metrics.json_safe(record)
  _write_record(out, run.name, record)
  return record


def _write_record(out: str, name: str, record: dict) -> None:
  rundir.write_atomically(record_path(out, name),
                          json.dumps(record, indent=1, allow_nan=False) + "\n")


class _StopOnSigterm:
  """SIGTERM raises SweepStopped in the main thread, wherever the sweep is: while a run trains,
  the stage controller takes the signal, saves a checkpoint, and hands it on to this handler."""

  def __init__(self):
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._raise)
    return self

  @staticmethod
  def _raise(signum, frame):
    del signum, frame
    raise SweepStopped("SIGTERM")

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --------------------------------------------------------------------------- the sweep

def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def _headline(record: dict) -> str:
  table = stats.case_table(record["cases"])
  s = stats.point_scores(table)
  return (f"tumour Dice per case {s['dice_per_case']:.3f}, global {s['dice_global']:.3f}, "
          f"lesion recall (IoU > 0.5) {s['recall_iou']:.2f}, precision {s['precision_iou']:.2f}")


def _given_records(records_from: Optional[str], finished: dict[str, dict],
                   runs: dict[str, Run]) -> dict[str, dict]:
  """The records of `records_from` that OUT lacks (one of another sweep, or one that differs
  from OUT's record of the same run, is refused)."""
  if records_from is None:
    return {}
  if not os.path.isdir(records_from):
    raise SweepError(f"--records {records_from} is not a folder")
  given = read_record_folder(records_from)
  if not given:
    raise SweepError(f"--records {records_from} holds no record (NAME.json)")
  for name, record in given.items():
    if name not in runs:
      raise SweepError(f"--records {records_from}: {name}.json is not a run of this sweep "
                       f"(its runs: {', '.join(list(runs)[:6])}{' ...' if len(runs) > 6 else ''})")
    if name in finished and finished[name] != record:
      raise SweepError(f"--records {records_from}: {name}.json differs from "
                       f"{RECORDS_DIR}/{name}.json of --out; delete one of them")
  return {n: r for n, r in given.items() if n not in finished}


def run_sweep(spec: str, out: str, *, score_dir: Optional[str] = None,
              overrides: Iterable[tuple[str, str]] = (), command: Optional[str] = None,
              records_from: Optional[str] = None,
              log: Callable[[str], Any] = print) -> dict:
  """Runs the sweep `spec` (FILE[:ARG]) declares into `out`; returns compare's results.

  Everything is checked before any work (the declaration, every run's config, the data, the
  scored cases, the folder, finished records); a mistake is one SweepError or ConfigError.
  """
  from curriculum_seg import compare  # pylint: disable=g-import-not-at-top
  from curriculum_seg import stages  # pylint: disable=g-import-not-at-top
  overrides = list(overrides)
  sweep = load_sweep(spec)
  out = os.path.abspath(out)
  configs = {run.name: run_config(sweep, run, out, overrides) for run in sweep.runs}
  _check_wildcards(configs, overrides)
  _check_same_data(sweep, configs)
  held_out = None
  if sweep.held_out is not None and score_dir is None:
    held_out = held_out_settings(sweep, configs[sweep.runs[0].name], out)
    source = dict(held_out=dict(num_cases=held_out["num_cases"], seed=held_out["seed"],
                                max_tumours=held_out["generator"]["max_tumours"]))
    numbers = list(range(held_out["num_cases"]))
  else:
    source, numbers = scored_cases(configs[sweep.runs[0].name], score_dir)
  if not numbers:
    raise SweepError("no held-out case to score the runs on")
  check_out(out)
  finished = read_records(out)
  given = _given_records(records_from, finished, {r.name: r for r in sweep.runs})
  jsons = {name: rundir.config_to_json(c) for name, c in configs.items()}
  for run in sweep.runs:
    if run.name in finished:
      _check_finished(finished[run.name], run, jsons[run.name], source, numbers,
                      record_path(out, run.name))
    elif run.name in given:
      _check_finished(given[run.name], run, jsons[run.name], source, numbers,
                      os.path.join(records_from, f"{run.name}.json"))
  command = command or f"curriculum-seg sweep --config {spec} --out {out}"
  plan = dict(
      format=RECORD_FORMAT, config=spec, command=command, reference=sweep.reference,
      total_steps=sweep.total_steps, regimes=sweep.regimes, seeds=sweep.seeds,
      overrides=[list(p) for p in overrides], scored_on=source, case_numbers=numbers,
      runs=[dict(name=r.name, regime=r.regime, seed=r.seed, config_file=run_spec(sweep, r),
                 config_digest=config_digest(jsons[r.name])) for r in sweep.runs])
  _claim_out(out)
  for name, record in given.items():
    _write_record(out, name, record)
  finished.update(given)
  if held_out is not None:
    make_held_out(held_out, log)
  rundir.write_atomically(os.path.join(out, PLAN_FILE), json.dumps(plan, indent=1) + "\n")
  where = describe_scored_on(source)
  log(f"sweep {spec}: {len(sweep.runs)} runs ({_count(len(sweep.regimes), 'regime')} x "
      f"{_count(len(sweep.seeds), 'seed')}), "
      + (f"{sweep.total_steps} optimiser steps each" if sweep.total_steps else "steps as "
         "configured") + f", scored on {len(numbers)} held-out cases ({where}); into {out}")
  records = {name: r for name, r in finished.items() if name in configs}
  total = len(sweep.runs)
  current = None
  try:
    with _StopOnSigterm():
      for i, run in enumerate(sweep.runs, start=1):
        tag = f"[{i}/{total} {run.name}]"
        if run.name in records:
          log(f"{tag} finished before: skipped")
          continue
        current = run
        log(f"{tag} training ({sweep.total_steps or 'configured'} steps) in "
            f"{os.path.join(out, RUNS_DIR, run.name)}")
        record = train_and_score(sweep, run, configs[run.name], out, source, numbers, log)
        records[run.name] = record
        current = None
        log(f"{tag} done: {_headline(record)}; {len(records)} of {total} runs finished")
        if len(records) < total:
          compare.write_results(out, plan, records, log=log)
  except (SweepStopped, stages.Preempted) as e:
    where = (f"during run {current.name} (its training resumes at its last checkpoint)"
             if current else "between runs")
    raise SweepStopped(f"SIGTERM: stopped {where}; {len(records)} of {total} runs finished. "
                       f"Run the same command to continue: {command}") from e
  return compare.write_results(out, plan, records, log=log)
