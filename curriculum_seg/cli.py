"""The `curriculum-seg` command line: thin wrappers that parse flags and call one function each.

Bad input (a wrong config key or type, a missing or malformed file) is one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from typing import Callable, Optional

from curriculum_seg import config_loading
from data_pipelines.labels import LIVER, TUMOUR

_USAGE = """\
usage: curriculum-seg COMMAND [options]        (curriculum-seg --version)

commands:
  synth    --out_dir DIR --num_cases N [--seed S] write synthetic LiTS-format cases
  check    --config FILE [--config.KEY=VALUE ...] check the config and every case of its data
  prepare  --config FILE [--config.KEY=VALUE ...] build the TFDS dataset the config names
  train    --config FILE --workdir DIR [...]      run the config's curriculum in a new workdir
  train    --workdir DIR [--config.KEY=VALUE ...] resume or extend the run saved in DIR
           [--coordinator_address H:P --num_processes N --process_id I]  (one process of N)
  evaluate --workdir DIR [--split validation]     score the run's chosen checkpoint on volumes
  predict  --workdir DIR --input CT --output MASK segment CT volumes (a file or a folder)
  score    --reference DIR --prediction DIR       LiTS scores of any tool's masks
  sweep    --config FILE --out DIR [...]          train and score every run of the config's
           [--score_dir DIR]                      declared ablation sweep (resumes)
  compare  DIR [--reference REGIME]               a sweep's results from its runs' records

FILE may be FILE:REGIME (configs/synthetic.py:whole_only); --config.KEY=VALUE overrides any key
of the config (--config.stages.whole1.steps=5). `curriculum-seg COMMAND --help` describes a
command's options, with their defaults.
"""

CONFIG_EPILOG = """\
config:
  --config FILE[:ARG]     a config file; ARG goes to its get_config(ARG), in the shipped configs
                          a regime: three_stage (default), whole_only, whole_patch, patch_whole
                          (and cascade in configs/synthetic.py),
                          e.g. configs/synthetic.py:whole_only
  --config.KEY=VALUE      overrides one key (the field's type is kept), repeatable, e.g.
                          --config.stages.whole1.steps=5 --config.data.lits_dir=/data/lits
                          --config.model.base_width=16 --config.loss.class_weights=None
  The whole config is checked before any work; a mistake names its full key (exit 2).
"""


SWEEP_EPILOG = """\
config:
  --config FILE[:ARG]     a config file with get_sweep(arg=None) beside get_config; ARG goes to
                          get_sweep (configs/synthetic.py: a comma-separated subset of regimes)
  --config.KEY=VALUE      overrides one key of every run's config, repeatable;
                          --config.stages.*.FIELD=VALUE sets FIELD of every stage that has it
  Every run's config is checked before any work; a mistake names the run and the key (exit 2).
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Shows each option's default (where it has one the help does not already give) and keeps
  the epilog's layout."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS))
        or "default" in text or not action.option_strings):
      return text + (" (required)" if action.required else "")
    return f"{text} (default: {action.default})"


class UsageError(Exception):
  """A command-line mistake, reported as one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
  def __init__(self, *args, **kwargs):
    kwargs.setdefault("formatter_class", _HelpFormatter)
    if kwargs.get("description"):
      kwargs["description"] = textwrap.fill(kwargs["description"], 96)
    super().__init__(*args, **kwargs)

  def error(self, message):  # one line instead of argparse's usage dump
    raise UsageError(message)


def _quiet_start() -> None:
  """No TensorFlow, oneDNN or absl start-up lines (set before anything imports TensorFlow).

  TensorFlow only reads and writes records here, so its oneDNN kernels (whose banner goes to
  stderr whatever TF_CPP_MIN_LOG_LEVEL says) are off; a user's own settings win.
  """
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _quiet_tensorflow(progress_bars: bool = False) -> None:
  """Quiet start-up, absl warnings off; with `progress_bars`, TFDS's bars only on a terminal
  (in a log file they are lines of control characters)."""
  _quiet_start()
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  if progress_bars and not sys.stderr.isatty():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()


def _load_config(args, overrides):
  if not args.config:
    raise UsageError("--config FILE is required")
  config = config_loading.load_config_file(args.config)
  return config_loading.apply_overrides(config, overrides)


def _checked_config(args, overrides, check_folders: bool = True):
  """The config of --config and the overrides, checked whole (`config_check`) before any work,
  with absolute data paths."""
  from curriculum_seg import config_check  # pylint: disable=g-import-not-at-top
  config = _load_config(args, overrides)
  config_check.check_config(config, check_folders=check_folders)
  return config_check.resolve_paths(config)


def cmd_synth(argv: list[str]) -> int:
  parser = _Parser(prog="curriculum-seg synth",
                   description="Write synthetic LiTS-format cases and a manifest.")
  parser.add_argument("--out_dir", required=True,
                      help="a new or empty folder (or one synth made: it is rewritten)")
  parser.add_argument("--num_cases", type=int, required=True, help="cases to write")
  parser.add_argument("--seed", type=int, default=0, help="the seed of every case")
  parser.add_argument("--size", type=int, default=256, help="in-plane pixels")
  parser.add_argument("--slices", type=int, default=64, help="axial slices")
  parser.add_argument("--max_tumours", type=int, default=8, help="tumours per case at most")
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
    spacing = tuple(round(s, 2) for s in r["spacing"])
    print(f"  {r['volume']}  {tuple(r['shape'])}  spacing {spacing}"
          f"  {r['orientation']} {r['ct_storage']}/{r['label_storage']}  tumours (mm): {diameters}")

  manifest = synthetic.synthesise(args.out_dir, args.num_cases, args.seed, cfg, progress,
                                  key="--out_dir")
  diameters = [t["diameter_mm"] for c in manifest["cases"] for t in c["tumours"]]
  print(f"wrote {args.num_cases} cases ({len(diameters)} tumours, "
        f"{sum(d < 10 for d in diameters)} under 10 mm) and manifest.json to {args.out_dir} "
        f"in {time.perf_counter() - start:.1f} s")
  return 0


def cmd_check(argv: list[str]) -> int:
  argv, overrides = config_loading.split_override_args(argv)
  parser = _Parser(prog="curriculum-seg check", epilog=CONFIG_EPILOG,
                   description="Check the whole config, then open every case of "
                               "config.data.lits_dir (headers, full data, labels, grids, "
                               "duplicates) and list every bad file; writes nothing. Exit 0 when "
                               "all is usable, 2 otherwise. prepare runs the same checks.")
  parser.add_argument("--config", required=True, help="config file, e.g. configs/lits_local.py")
  parser.add_argument("--workers", type=int, default=None,
                      help="processes opening cases (default: one per core for large folders)")
  args = parser.parse_args(argv)
  config = _checked_config(args, overrides)
  print(f"config {args.config}: ok", flush=True)
  if config.data.synthetic.enabled:
    from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
    if synthetic.read_manifest(config.data.lits_dir) is None:
      print(f"{config.data.lits_dir}: synthetic data, made by prepare or train", flush=True)
      return 0
  from data_pipelines import lits_tfds, verify  # pylint: disable=g-import-not-at-top
  workers = lits_tfds.verify_workers(config.data.lits_dir) if args.workers is None else args.workers
  if workers < 0:
    raise UsageError(f"--workers must be >= 0, got {workers}")
  verify.verify_folder(config.data.lits_dir, workers=workers,
                       log=lambda m: print(m, flush=True)).raise_if_bad()
  return 0


def cmd_prepare(argv: list[str]) -> int:
  argv, overrides = config_loading.split_override_args(argv)
  parser = _Parser(prog="curriculum-seg prepare", epilog=CONFIG_EPILOG + PREPARE_EPILOG,
                   description="Build the TFDS dataset from config.data.lits_dir into "
                               "config.data.tfds_dir (synthesising the data first when "
                               "config.data.synthetic.enabled). Every case is checked first. "
                               "The dataset is the same however many processes build it.")
  parser.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py")
  parser.add_argument("--workers", type=int, default=None,
                      help="processes writing cases on this host (default: "
                           "config.data.prepare_workers, whose 0 means the available cores)")
  parser.add_argument("--beam_runner", default=None,
                      help="build with Apache Beam (the [beam] extra) on this runner: local "
                           "(this host's cores) or a Beam runner's name, e.g. DataflowRunner")
  parser.add_argument("--beam_options", default="",
                      help="Beam pipeline options as one string, e.g. \"--project=P "
                           "--region=R --temp_location=gs://B/tmp\"")
  args = parser.parse_args(argv)
  if args.workers is not None and args.workers < 0:
    raise UsageError(f"--workers must be >= 0 (0: the available cores), got {args.workers}")
  if args.beam_options and not args.beam_runner:
    raise UsageError("--beam_options needs --beam_runner (local, DataflowRunner, ...)")
  config = _checked_config(args, overrides)
  _quiet_tensorflow(progress_bars=True)
  if args.beam_runner:
    try:
      import apache_beam  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      raise UsageError("--beam_runner needs Apache Beam: pip install 'curriculum-seg[beam]'") from e
  from data_pipelines import lits_tfds  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    builder = lits_tfds.prepare(config.data, log=lambda m: print(m, flush=True),
                                workers=args.workers, beam_runner=args.beam_runner,
                                beam_options=args.beam_options)
  except ValueError as e:
    if type(e) is not ValueError:  # a CaseError or another specific error: as it is
      raise
    raise UsageError(str(e)) from e
  print(lits_tfds.describe(builder, config.data))
  print(f"prepare done in {time.perf_counter() - start:.1f} s")
  return 0


PREPARE_EPILOG = """
building:
  --workers N             processes on this host, one case each at a time (about one LiTS case
                          in memory per worker); 1 builds in this process
  --beam_runner=local     Apache Beam's local runner with --workers processes
  --beam_runner=DataflowRunner --beam_options="--project=P --region=R
      --temp_location=gs://B/tmp --extra_packages=dist/curriculum_seg-0.1.0-py3-none-any.whl"
                          Google Cloud Dataflow, data.lits_dir and data.tfds_dir on gs://
                          (README: "Preparing LiTS with Apache Beam")
"""


def _train_config(args, overrides):
  """--config with overrides; without --config, the run's saved config.json with overrides."""
  if args.config:
    return _checked_config(args, overrides)
  from curriculum_seg import config_check, rundir  # pylint: disable=g-import-not-at-top
  try:
    config = rundir.read_config(args.workdir)
  except rundir.RunDirError as e:
    raise UsageError(f"--config FILE is required for a new run: {e}") from e
  config = config_loading.apply_overrides(config, overrides)
  config_check.check_config(config)
  return config_check.resolve_paths(config)


def cmd_train(argv: list[str]) -> int:
  argv, overrides = config_loading.split_override_args(argv)
  parser = _Parser(prog="curriculum-seg train", epilog=CONFIG_EPILOG,
                   description="Run (or resume) every stage of the config's curriculum in "
                               "--workdir. Without --config, resume or extend the run saved in "
                               "--workdir (its config.json, with any --config.KEY=VALUE; only "
                               "run lengths and intervals may change once it has a checkpoint).")
  parser.add_argument("--config", default=None,
                      help="config file, e.g. configs/synthetic.py (required for a new run)")
  parser.add_argument("--workdir", required=True,
                      help="run directory (local or gs://): new, empty, or holding this run")
  group = parser.add_argument_group(
      "multi-process launch (each default: the JAX_* variable named; on Cloud TPU, SLURM and "
      "Open MPI jax detects them)")
  group.add_argument("--coordinator_address", default=None,
                     help="HOST:PORT of process 0's coordinator (JAX_COORDINATOR_ADDRESS)")
  group.add_argument("--num_processes", type=int, default=None,
                     help="number of processes (JAX_NUM_PROCESSES)")
  group.add_argument("--process_id", type=int, default=None,
                     help="this process's id, 0 .. num_processes-1 (JAX_PROCESS_ID)")
  args = parser.parse_args(argv)
  config = _train_config(args, overrides)
  from curriculum_seg import rundir  # pylint: disable=g-import-not-at-top
  try:
    rundir.check_claimable(args.workdir)
  except rundir.RunDirError as e:
    raise UsageError(str(e)) from e
  from curriculum_seg import sharding  # pylint: disable=g-import-not-at-top
  distributed = dict(coordinator_address=args.coordinator_address,
                     num_processes=args.num_processes, process_id=args.process_id)
  try:
    sharding.distributed_settings(**distributed)  # a half-specified launch fails before any work
  except sharding.DistributedConfigError as e:
    raise UsageError(str(e)) from e
  _quiet_tensorflow(progress_bars=True)
  from curriculum_seg import rundir, stages  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  try:
    results = stages.train(config, args.workdir, log=lambda m: print(m, flush=True),
                           distributed=distributed)
  except (stages.StageError, rundir.RunDirError) as e:
    raise UsageError(str(e)) from e
  except stages.Preempted as e:
    print(f"curriculum-seg train: {e}", file=sys.stderr)
    return 143
  except (stages.NonFiniteLossError, sharding.OtherProcessFailed) as e:
    print(f"curriculum-seg train: error: {e}", file=sys.stderr)
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:  # process 0 reports for the run
    return 0
  print(f"trained {len(results)} stages in {time.perf_counter() - start:.1f} s "
        f"(workdir {args.workdir})")
  for r in results:
    score = "n/a" if r.best_score is None else f"{r.best_score:.4f}"
    structure = "liver" if r.task == "liver" else "tumour"
    print(f"  {r.name:<12} {r.steps:>6} steps  best validation {structure} Dice {score}"
          + ("" if r.best_step is None else f" (step {r.best_step})"))
  return 0


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", required=True, help="a run directory (local or gs://)")
  parser.add_argument("--stage", default=None,
                      help="use this stage's checkpoint (default: the run's chosen one: the "
                           "last stage's best by validation Dice)")
  parser.add_argument("--step", type=int, default=None, help="use the checkpoint of this step")
  parser.add_argument("--checkpoint", choices=("best", "latest"), default=None,
                      help="which of the stage's checkpoints (default: best, else latest)")
  parser.add_argument("--batch_size", type=int, default=32, help="slices per predict call")
  parser.add_argument("--chunk_slices", type=int, default=64,
                      help="slices held in memory as probabilities at a time")
  parser.add_argument("--flip_tta", action="store_true",
                      help="average over the four in-plane mirrorings (4x slower)")
  parser.add_argument("--min_tumour_mm3", type=float, default=0.0,
                      help="remove predicted tumour components smaller than this (mm^3)")
  parser.add_argument("--keep_all_liver_components", action="store_true",
                      help="do not reduce the predicted liver to its largest component")
  parser.add_argument("--tumour_outside_liver", action="store_true",
                      help="keep tumour predicted outside the (predicted or given) liver")


def _inference_options(args):
  from curriculum_seg import inference  # pylint: disable=g-import-not-at-top
  try:
    return inference.InferenceOptions(
        batch_size=args.batch_size, chunk_slices=args.chunk_slices, flip_tta=args.flip_tta,
        largest_liver_component=not args.keep_all_liver_components,
        tumour_in_liver=not args.tumour_outside_liver, min_tumour_mm3=args.min_tumour_mm3)
  except ValueError as e:
    raise UsageError(str(e).replace("inference option ", "--")) from e


def cmd_evaluate(argv: list[str]) -> int:
  parser = _Parser(prog="curriculum-seg evaluate",
                   description="Score a run's checkpoint on whole volumes with the LiTS metrics; "
                               "writes metrics.json, metrics.md and pictures/.")
  _add_checkpoint_args(parser)
  parser.add_argument("--split", default="validation", choices=("train", "validation", "test"),
                      help="the run's cases to score (default: validation)")
  parser.add_argument("--lits_dir", default=None,
                      help="score every case of this LiTS folder instead of a split")
  parser.add_argument("--output", default=None,
                      help="output folder (default: WORKDIR/eval/<split>)")
  parser.add_argument("--no_pictures", action="store_true", help="skip the PNG overlays")
  args = parser.parse_args(argv)
  options = _inference_options(args)
  _quiet_tensorflow()
  from curriculum_seg import evaluate, inference  # pylint: disable=g-import-not-at-top
  try:
    evaluate.evaluate_run(args.workdir, split=args.split, lits_dir=args.lits_dir,
                          output=args.output, stage=args.stage, step=args.step,
                          which=args.checkpoint, options=options,
                          pictures=not args.no_pictures, log=lambda m: print(m, flush=True))
  except inference.InferenceError as e:
    raise UsageError(str(e)) from e
  except ValueError as e:  # a split without cases, a bad option value
    raise UsageError(str(e)) from e
  return 0


def _output_name(volume_name: str) -> str:
  """LiTS naming: volume-N -> segmentation-N, test-volume-N -> test-segmentation-N."""
  if "volume-" in volume_name:
    return volume_name.replace("volume-", "segmentation-", 1)
  for ext in (".nii.gz", ".nii"):
    if volume_name.endswith(ext):
      return volume_name[:-len(ext)] + "_mask" + ext
  return volume_name + "_mask.nii.gz"


def predict_jobs(input_path: str, output_path: str) -> list[tuple[str, str]]:
  """(volume, mask) pairs for a file or a folder input; refuses bad paths before any work."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from curriculum_seg import inference  # pylint: disable=g-import-not-at-top
  source = epath.Path(input_path)
  if not source.exists():
    raise UsageError(f"--input {input_path}: no such file or folder")
  if source.is_dir():
    volumes = sorted(p for p in source.iterdir()
                     if (p.name.endswith(".nii") or p.name.endswith(".nii.gz"))
                     and not p.name.startswith(("segmentation-", "test-segmentation-"))
                     and not p.is_dir())
    if not volumes:
      raise UsageError(f"--input {input_path}: the folder holds no .nii or .nii.gz volume")
    target = epath.Path(output_path)
    if target.exists() and not target.is_dir():
      raise UsageError(f"--output {output_path}: with a folder --input, --output must be a "
                       "folder")
    if target.name.endswith((".nii", ".nii.gz")):
      raise UsageError(f"--output {output_path}: with a folder --input, --output must be a "
                       "folder, not a NIfTI file name")
    target.mkdir(parents=True, exist_ok=True)
    jobs = [(os.fspath(v), os.fspath(target / _output_name(v.name))) for v in volumes]
    if source.resolve() == target.resolve():
      clash = [m for _, m in jobs if epath.Path(m).exists()]
      if clash:
        raise UsageError(f"--output {output_path}: would overwrite {clash[0]} next to the "
                         "inputs; choose another folder")
    return jobs
  if not source.name.endswith((".nii", ".nii.gz")):
    raise UsageError(f"--input {input_path}: not a .nii or .nii.gz file")
  try:
    inference.check_output_path(output_path)
  except inference.InferenceError as e:
    raise UsageError(f"--output {e}") from e
  if epath.Path(output_path).resolve() == source.resolve():
    raise UsageError(f"--output {output_path}: is the input volume itself")
  return [(os.fspath(source), output_path)]


def cmd_predict(argv: list[str]) -> int:
  parser = _Parser(prog="curriculum-seg predict",
                   description="Segment CT volumes with a run's checkpoint: LiTS-style masks "
                               "(0 background, 1 liver, 2 tumour; 0/2 for tumour-only models) "
                               "with each input's shape, affine and orientation.")
  _add_checkpoint_args(parser)
  parser.add_argument("--input", required=True, help="a CT volume (.nii/.nii.gz) or a folder")
  parser.add_argument("--output", required=True,
                      help="the mask file (.nii/.nii.gz), or a folder for a folder --input "
                           "(volume-N -> segmentation-N)")
  parser.add_argument("--liver", default=None,
                      help="a liver mask for a single --input (non-zero = liver): tumour is "
                           "kept inside it and it is written as label 1")
  parser.add_argument("--save_probabilities", action="store_true",
                      help="also write the network's softmax beside each mask X.nii[.gz] as "
                           "X.npz (as nnU-Net): 'probabilities' float16 of shape (K, *the "
                           "mask's array shape), in the mask file's array order, before "
                           "post-processing; 'classes' the LiTS label of each of the K classes "
                           "and 'class_names'. Not for cascade runs (two networks)")
  args = parser.parse_args(argv)
  options = _inference_options(args)
  jobs = predict_jobs(args.input, args.output)
  if args.liver is not None and len(jobs) != 1:
    raise UsageError("--liver needs a single --input volume, not a folder")
  if args.liver is not None and not os.path.exists(args.liver) and "://" not in args.liver:
    raise UsageError(f"--liver {args.liver}: no such file")
  _quiet_tensorflow()
  from curriculum_seg import inference, trained_run  # pylint: disable=g-import-not-at-top
  try:
    predictor = trained_run.load_predictor(args.workdir, stage=args.stage, step=args.step,
                                           which=args.checkpoint, options=options)
    if args.save_probabilities:
      predictor.probability_classes()  # refuses a cascade before any work
  except inference.InferenceError as e:
    raise UsageError(str(e)) from e
  print(f"segmenting {len(jobs)} volume(s) with {predictor.describe()}", flush=True)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  failed = []
  bar = tqdm(jobs, unit="volume", disable=len(jobs) == 1 or not sys.stderr.isatty())
  for volume, mask in bar:
    t0 = time.perf_counter()
    bar.set_postfix_str(os.path.basename(volume))
    try:
      labels = predictor.predict_file(
          volume, mask, liver_path=args.liver,
          probabilities_path=(inference.probabilities_path_for(mask)
                              if args.save_probabilities else None))
    except (ValueError, FileNotFoundError) as e:  # one bad file does not stop a folder
      if len(jobs) == 1:
        raise
      failed.append(volume)
      print(f"curriculum-seg predict: error: {str(e).splitlines()[0]}", file=sys.stderr)
      continue
    counts = {v: int((labels == v).sum()) for v in (LIVER, TUMOUR)}
    bar.write(f"  {mask}  liver {counts[LIVER]} voxels, tumour {counts[TUMOUR]} voxels "
              f"({time.perf_counter() - t0:.1f} s)")
  print(f"wrote {len(jobs) - len(failed)} mask(s) in {time.perf_counter() - start:.1f} s"
        + (f"; {len(failed)} volume(s) failed" if failed else ""))
  return 1 if failed else 0


def cmd_score(argv: list[str]) -> int:
  parser = _Parser(prog="curriculum-seg score",
                   description="Score any tool's LiTS-format masks (0/1/2) against reference "
                               "masks with the LiTS metrics; writes metrics.json and metrics.md.")
  parser.add_argument("--reference", required=True,
                      help="folder of reference masks (segmentation-N.nii[.gz] or any *.nii[.gz])")
  parser.add_argument("--prediction", required=True,
                      help="folder of predicted masks, paired by name without .nii/.nii.gz "
                           "(test-segmentation-N also answers segmentation-N)")
  parser.add_argument("--output", default=None,
                      help="output folder (default: score-<prediction folder> beside it)")
  parser.add_argument("--allow_missing", action="store_true",
                      help="score a reference without prediction as an empty prediction")
  args = parser.parse_args(argv)
  from curriculum_seg import score  # pylint: disable=g-import-not-at-top
  try:
    score.score_folders(args.reference, args.prediction, output_dir=args.output,
                        allow_missing=args.allow_missing, log=lambda m: print(m, flush=True))
  except score.ScoreError as e:
    raise UsageError(str(e)) from e
  return 0


def cmd_sweep(argv: list[str]) -> int:
  raw = list(argv)
  argv, overrides = config_loading.split_override_args(argv)
  parser = _Parser(prog="curriculum-seg sweep", epilog=SWEEP_EPILOG,
                   description="Train every run of the sweep the config file declares "
                               "(get_sweep beside get_config: regimes x seeds at equal "
                               "optimiser steps), score each run's chosen checkpoint on held-out "
                               "cases, and write one record per run and the paired results "
                               "(results.json, .md, .png, differences.png, val_dice.png) after "
                               "every finished run. Finished runs are skipped and an interrupted "
                               "one resumes at its exact step: run the same command again.")
  parser.add_argument("--config", required=True,
                      help="config file declaring a sweep, e.g. configs/synthetic.py")
  parser.add_argument("--out", required=True,
                      help="the sweep's folder: new, empty, or one this command made")
  parser.add_argument("--score_dir", default=None,
                      help="score the runs on every case of this LiTS folder (default: the "
                           "prepared dataset's test split, config.data.test_fraction > 0)")
  parser.add_argument("--records", default=None, metavar="DIR",
                      help="take the finished runs in DIR (a copy of a sweep's records/, e.g. "
                           "docs/experiment/records) as finished, each checked against its "
                           "run's config and scored cases, and continue with the rest")
  args = parser.parse_args(argv)
  _quiet_tensorflow(progress_bars=True)
  import shlex  # pylint: disable=g-import-not-at-top
  from curriculum_seg import compare, stages, sweep  # pylint: disable=g-import-not-at-top
  command = "curriculum-seg sweep " + " ".join(shlex.quote(a) for a in raw)
  try:
    results = sweep.run_sweep(args.config, args.out, score_dir=args.score_dir,
                              overrides=overrides, command=command, records_from=args.records,
                              log=lambda m: print(m, flush=True))
  except (sweep.SweepError, compare.CompareError, stages.StageError) as e:
    raise UsageError(str(e)) from e
  except sweep.SweepStopped as e:
    _close_progress_bars()
    print(f"curriculum-seg sweep: {e}", file=sys.stderr, flush=True)
    return 143
  except stages.NonFiniteLossError as e:
    print(f"curriculum-seg sweep: error: {e}", file=sys.stderr)
    return 1
  print(compare.markdown(results), end="")
  return 0


def cmd_compare(argv: list[str]) -> int:
  parser = _Parser(prog="curriculum-seg compare",
                   description="Rebuild a sweep's results (results.json, .md, .png, "
                               "differences.png, val_dice.png) in DIR from its finished runs' "
                               "records alone (DIR/records/*.json and DIR/sweep.json): scores "
                               "per regime and "
                               "the paired differences of the reference regime against every "
                               "other one, with intervals over seeds and test cases.")
  parser.add_argument("dir", metavar="DIR", help="a sweep's --out folder, or a copy of its "
                                                  "sweep.json and records/")
  parser.add_argument("--reference", default=None,
                      help="the regime compared with every other one (default: the sweep's)")
  args = parser.parse_args(argv)
  from curriculum_seg import compare  # pylint: disable=g-import-not-at-top
  try:
    results = compare.compare_dir(args.dir, args.reference, log=lambda m: print(m, flush=True))
  except compare.CompareError as e:
    raise UsageError(str(e)) from e
  print(compare.markdown(results), end="")
  return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "synth": cmd_synth,
    "check": cmd_check,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "score": cmd_score,
    "sweep": cmd_sweep,
    "compare": cmd_compare,
}


def _close_progress_bars() -> None:
  """Ends any live tqdm bar (TFDS's, predict's) so that an error starts on a line of its own."""
  tqdm = sys.modules.get("tqdm")
  if tqdm is None:
    return
  for bar in list(getattr(tqdm.tqdm, "_instances", ())):
    try:
      bar.close()
    except Exception:  # pylint: disable=broad-except  # a bar half torn down: ignore it
      pass
  sys.stderr.flush()


def _error_text(error: BaseException) -> str:
  """The message on one line; a list of problems (indented lines after the first) stays a list."""
  lines = str(error).strip().split("\n")
  if len(lines) > 1 and all(line.startswith("  ") for line in lines[1:]):
    return "\n".join(lines)
  return " ".join(line.strip() for line in lines)


def _version() -> str:
  import curriculum_seg  # pylint: disable=g-import-not-at-top
  return curriculum_seg.__version__


def main(argv: Optional[list[str]] = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  _quiet_start()
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(_USAGE, end="")
    return 0 if argv else 2
  if argv[0] in ("--version", "-V", "version"):
    print(f"curriculum-seg {_version()}")
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS:
    print(f"curriculum-seg: error: unknown command {command!r} (one of: "
          f"{', '.join(COMMANDS)})", file=sys.stderr)
    return 2
  from data_pipelines import lits, synthetic  # pylint: disable=g-import-not-at-top
  from curriculum_seg import rundir  # pylint: disable=g-import-not-at-top
  try:
    return COMMANDS[command](rest)
  except (UsageError, config_loading.ConfigError, lits.CaseError, FileNotFoundError,
          synthetic.ForeignFolderError, rundir.RunDirError) as e:
    _close_progress_bars()
    print(f"curriculum-seg {command}: error: {_error_text(e)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    _close_progress_bars()
    print(f"curriculum-seg {command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
