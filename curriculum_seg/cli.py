"""The `curriculum-seg` command line: thin wrappers that parse flags and call one function each.

Bad input (a wrong config key or type, a missing or malformed file) is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

from curriculum_seg import config_loading

_USAGE = """\
usage: curriculum-seg COMMAND [options]

commands:
  synth    --out_dir DIR --num_cases N --seed S   write synthetic LiTS-format cases
  prepare  --config FILE [--config.key=value ...] build the TFDS dataset the config names
  train    --config FILE --workdir DIR [...]      run or resume the config's curriculum

`curriculum-seg COMMAND --help` describes a command's options.
"""


class UsageError(Exception):
  """A command-line mistake, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line instead of argparse's usage dump
    raise UsageError(message)


def _quiet_tensorflow() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)


def _load_config(args, overrides):
  if not args.config:
    raise UsageError("--config FILE is required")
  config = config_loading.load_config_file(args.config)
  return config_loading.apply_overrides(config, overrides)


def cmd_synth(argv: list[str]) -> int:
  parser = _Parser(prog="curriculum-seg synth",
                   description="Write synthetic LiTS-format cases and a manifest.")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--num_cases", type=int, required=True)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=256, help="in-plane pixels (default 256)")
  parser.add_argument("--slices", type=int, default=64, help="axial slices (default 64)")
  parser.add_argument("--max_tumours", type=int, default=8)
  parser.add_argument("--plain_storage", action="store_true",
                      help="store every case as RAS int16/uint8 instead of LiTS's mix")
  args = parser.parse_args(argv)
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  try:
    cfg = synthetic.SynthConfig(size=args.size, slices=args.slices, max_tumours=args.max_tumours,
                                storage_variants=not args.plain_storage)
  except ValueError as e:
    raise UsageError(str(e)) from e
  if args.num_cases < 1:
    raise UsageError(f"--num_cases must be >= 1, got {args.num_cases}")
  start = time.perf_counter()

  def progress(r):
    diameters = ", ".join(f"{t['diameter_mm']:.1f}" for t in r["tumours"]) or "none"
    print(f"  {r['volume']}  {tuple(r['shape'])}  spacing {tuple(round(s, 2) for s in r['spacing'])}"
          f"  {r['orientation']} {r['ct_storage']}/{r['label_storage']}  tumours (mm): {diameters}")

  manifest = synthetic.synthesise(args.out_dir, args.num_cases, args.seed, cfg, progress)
  diameters = [t["diameter_mm"] for c in manifest["cases"] for t in c["tumours"]]
  print(f"wrote {args.num_cases} cases ({len(diameters)} tumours, "
        f"{sum(d < 10 for d in diameters)} under 10 mm) and manifest.json to {args.out_dir} "
        f"in {time.perf_counter() - start:.1f} s")
  return 0


def cmd_prepare(argv: list[str]) -> int:
  argv, overrides = config_loading.split_override_args(argv)
  parser = _Parser(prog="curriculum-seg prepare",
                   description="Build the TFDS dataset from config.data.lits_dir.")
  parser.add_argument("--config", help="config file, e.g. configs/synthetic.py")
  args = parser.parse_args(argv)
  config = _load_config(args, overrides)
  _quiet_tensorflow()
  from data_pipelines import lits_tfds  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  builder = lits_tfds.prepare(config.data)
  print(lits_tfds.describe(builder))
  print(f"prepare done in {time.perf_counter() - start:.1f} s")
  return 0


def cmd_train(argv: list[str]) -> int:
  argv, overrides = config_loading.split_override_args(argv)
  parser = _Parser(prog="curriculum-seg train",
                   description="Run (or resume) every stage of the config's curriculum.")
  parser.add_argument("--config", help="config file, e.g. configs/synthetic.py")
  parser.add_argument("--workdir", required=True, help="run directory (local or gs://)")
  args = parser.parse_args(argv)
  config = _load_config(args, overrides)
  _quiet_tensorflow()
  from curriculum_seg import rundir, stages  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    results = stages.train(config, args.workdir, log=lambda m: print(m, flush=True))
  except (stages.StageError, rundir.RunDirError) as e:
    raise UsageError(str(e)) from e
  except stages.Preempted as e:
    print(f"curriculum-seg train: {e}", file=sys.stderr)
    return 143
  except stages.NonFiniteLossError as e:
    print(f"curriculum-seg train: error: {e}", file=sys.stderr)
    return 1
  print(f"trained {len(results)} stages in {time.perf_counter() - start:.1f} s "
        f"(workdir {args.workdir})")
  for r in results:
    score = "n/a" if r.best_score is None else f"{r.best_score:.4f}"
    print(f"  {r.name:<12} {r.steps:>6} steps  best validation tumour Dice {score}"
          + ("" if r.best_step is None else f" (step {r.best_step})"))
  return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "synth": cmd_synth,
    "prepare": cmd_prepare,
    "train": cmd_train,
}


def main(argv: Optional[list[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_USAGE, end="")
    return 0 if argv else 2
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"curriculum-seg: error: unknown command {command!r} (one of: "
          f"{', '.join(COMMANDS)})", file=sys.stderr)
    return 2
  from data_pipelines import lits  # pylint: disable=g-import-not-at-top
  try:
    return COMMANDS[command](rest)
  except (UsageError, config_loading.ConfigError, lits.CaseError, FileNotFoundError) as e:
    message = str(e).replace("\n", " ")
    print(f"curriculum-seg {command}: error: {message}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"curriculum-seg {command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
