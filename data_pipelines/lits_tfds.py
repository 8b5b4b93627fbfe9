"""The TFDS dataset "lits": LiTS-format cases as per-slice examples with context and tumour parts.

Prepared once from a LiTS folder (the manual download dir). Each case becomes one shard of its
split, written whole by `case_shards.write_case_shard`: in this process, in worker processes on
every core of this host (`case_pool`), or on Apache Beam (`lits_beam`, any runner); the three
give the same files record for record, and the same metadata, which the builder assembles from
the cases' summaries in case order. The builder config's name encodes the preprocessing
parameters and a fingerprint of the folder's files (names and sizes), so preparing the same
config on the same folder again reuses the dataset, and a different folder or parameter set gets
its own. TFDS writes into an `incomplete` temporary folder and renames it after writing the
dataset's info (splits, index), so an interrupted prepare never looks finished; the next prepare
of the same dataset on this host removes what it left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import (case_pool, case_shards, intensity, lits, settings, slices, synthetic,
                            verify)

VERSION = "2.0.0"  # 2.0: slices of any size (target spacing), HU histograms; 1.1: raw bytes
_LOG_EVERY_S = 5.0  # progress lines of a local build at most this often

_INSTRUCTIONS = """\
LiTS 2017 cannot be downloaded automatically (licence CC BY-NC-SA). Download the training batches
from the LiTS challenge (or the Medical Segmentation Decathlon mirror), unpack every
`volume-N.nii` and `segmentation-N.nii` into one folder, and set `config.data.lits_dir` to it.
"""


def grid_name(image_size: Optional[int], spacing_mm: Optional[tuple[float, ...]]) -> str:
  """The stored grid in a dataset's name: `s128` (128 pixels a slice) or `sp1.5` (1.5 mm)."""
  if spacing_mm is None:
    return f"s{image_size}"
  values = sorted(set(spacing_mm)) if len(set(spacing_mm)) == 1 else spacing_mm
  return "sp" + "x".join(f"{v:g}" for v in values)


class LitsConfig(tfds.core.BuilderConfig):
  """Preprocessing parameters of one prepared LiTS dataset."""

  def __init__(self, *, context_slices: int, image_size: Optional[int],
               val_fraction: float, test_fraction: float, split_seed: int, fingerprint: str,
               spacing_mm: Optional[tuple[float, ...]] = None):
    params = dict(context_slices=context_slices, image_size=image_size,
                  val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed,
                  fingerprint=fingerprint)
    if spacing_mm is not None:
      params.update(spacing_mm=list(spacing_mm), image_size=None)
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    super().__init__(name=f"ctx{context_slices}_{grid_name(image_size, spacing_mm)}_{digest}",
                     version=VERSION, description=json.dumps(params, sort_keys=True))
    self.context_slices = context_slices
    self.image_size = None if spacing_mm is not None else image_size
    self.spacing_mm = None if spacing_mm is None else tuple(spacing_mm)
    self.val_fraction = val_fraction
    self.test_fraction = test_fraction
    self.split_seed = split_seed


class Lits(tfds.core.GeneratorBasedBuilder):
  """LiTS 2017 (or LiTS-format synthetic) CT slices with tumour components, split by case."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  BUILDER_CONFIGS = [LitsConfig(context_slices=3, image_size=256, val_fraction=0.2,
                                test_fraction=0.0, split_seed=0, fingerprint="")]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=case_shards.example_features(self.builder_config.context_slices),
        disable_shuffling=True,  # examples stay in (case, slice) order: pipelines shuffle
        metadata=tfds.core.MetadataDict(),
        homepage="https://competitions.codalab.org/competitions/17094",
    )

  build_options: "BuildOptions"  # set by `prepare` before download_and_prepare

  def _split_generators(self, dl_manager):
    raise NotImplementedError("lits writes one shard per case in _download_and_prepare")

  def _generate_examples(self, **kwargs):
    raise NotImplementedError("lits writes one shard per case in _download_and_prepare")

  def _download_and_prepare(self, dl_manager, download_config) -> None:
    """Writes every case's shard (here, in worker processes or with Beam), then records the
    splits and their index in the info, which TFDS writes last."""
    options = getattr(self, "build_options", None) or BuildOptions()
    cfg = self.builder_config
    lits_dir = os.fspath(dl_manager.manual_dir)
    cases = lits.find_cases(lits_dir)
    splits = assign_splits(sorted(cases), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    templates = {name: self._get_filename_template(split_name=name) for name in splits}
    tasks = []
    for name, numbers in splits.items():
      for rank, number in enumerate(numbers):
        volume, segmentation = cases[number]
        shard = templates[name].sharded_filepath(shard_index=rank, num_shards=len(numbers))
        tasks.append(case_shards.CaseTask(
            split=name, rank=rank, number=int(number), volume=os.fspath(volume),
            segmentation=os.fspath(segmentation), shard=os.fspath(shard),
            size_bytes=int(volume.stat().length)))
    spec = case_shards.ShardSpec(context_slices=cfg.context_slices, image_size=cfg.image_size,
                                 spacing_mm=cfg.spacing_mm, compression=options.compression)
    if download_config.beam_runner is not None or download_config.beam_options is not None:
      summaries = self._write_with_beam(tasks, spec, download_config)
    else:
      summaries = _write_locally(tasks, spec, options)
    self.build_seconds = {}  # CPU seconds by stage over all cases (benchmarks/prepare.py)
    for summary in summaries:
      for stage, seconds in summary.seconds.items():
        self.build_seconds[stage] = self.build_seconds.get(stage, 0.0) + seconds
    metadata, split_infos = assemble(summaries, splits, templates)
    self.info.metadata["splits"] = {k: [int(n) for n in v] for k, v in splits.items()}
    self.info.metadata["lits_dir"] = lits_dir
    self.info.metadata.update(metadata)
    self.info.set_splits(tfds.core.SplitDict(split_infos))

  def _write_with_beam(self, tasks, spec, download_config) -> list[case_shards.CaseSummary]:
    """One pipeline for all cases, created by TFDS's split builder (its runner and options)."""
    from data_pipelines import lits_beam  # pylint: disable=g-import-not-at-top
    from tensorflow_datasets.core import split_builder  # pylint: disable=g-import-not-at-top
    builder = split_builder.SplitBuilder(
        split_dict=self.info.splits, features=self.info.features,
        dataset_size=self.info.dataset_size, beam_options=download_config.beam_options,
        beam_runner=download_config.beam_runner, max_examples_per_split=None,
        example_writer=self._example_writer())
    path = os.path.join(os.fspath(self.data_dir), lits_beam.SUMMARIES_FILE)
    try:
      with builder.maybe_beam_pipeline():
        lits_beam.add_case_shards(builder.beam_pipeline, tasks, spec, path)
    except Exception as e:  # pylint: disable=broad-except  # a runner wraps a worker's error
      error = lits_beam.case_error(e)
      if error is None:
        raise
      raise error from e
    return lits_beam.read_summaries(path, tasks)


@dataclasses.dataclass
class BuildOptions:
  """How `Lits` writes its shards: none of these changes the dataset.

  `workers`: processes writing cases on this host (1: this process); `executor`: a
  `case_pool.worker_pool` to use instead of starting one; `log`: progress lines.
  """

  workers: int = 1
  compression: str = "uncompressed"
  log: Callable[[str], Any] = lambda message: None
  executor: Any = None


def _write_locally(tasks: Sequence[case_shards.CaseTask], spec: case_shards.ShardSpec,
                   options: BuildOptions) -> list[case_shards.CaseSummary]:
  """Writes every task's shard in this process or a pool, logging progress."""
  import functools  # pylint: disable=g-import-not-at-top
  write = functools.partial(case_shards.write_case_shard, spec=spec)
  if options.workers <= 1 and options.executor is None:
    case_pool.single_threaded_tensorflow()  # one process, one core (if not yet started)
  summaries, slices_done, start, last = [], 0, time.monotonic(), float("-inf")
  for _, summary in case_pool.map_cases(write, tasks, options.workers,
                                        weight=lambda t: t.size_bytes, name=lambda t: t.volume,
                                        executor=options.executor):
    summaries.append(summary)
    slices_done += summary.num_slices
    now = time.monotonic()
    if len(summaries) == len(tasks) or now - last >= _LOG_EVERY_S:
      last = now
      options.log(f"prepare: {len(summaries)}/{len(tasks)} cases, {slices_done} slices, "
                  f"{slices_done / max(now - start, 1e-9):.1f} slices/s")
  return summaries


def assemble(summaries: Sequence[case_shards.CaseSummary], splits: dict[str, list[int]],
             templates: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
  """The `index` and `intensity` metadata and the SplitInfos of the splits, from the cases'
  summaries (in any order).

  With the cases of a split in rank order, an example's position in the split is its rank in
  (case, slice) order, so the index gives random-access positions: `cases` rows are
  [case_number, first example, num_slices, liver_z_lo, liver_z_hi, rows, cols] (rows x cols: the
  case's stored slice size); `tumours` rows are [example, component, centre_row, centre_col,
  diameter_mm, area_mm2, stored_pixels, row_min, col_min, row_max, col_max], one per tumour
  component part in a slice (its box in stored edge coordinates). The split's summed liver and
  tumour HU histograms go to `intensity` (see data_pipelines.intensity).
  """
  by_split: dict[str, list[case_shards.CaseSummary]] = {}
  for summary in summaries:
    by_split.setdefault(summary.split, []).append(summary)
  index, hists_by_split, split_infos = {}, {}, []
  for name, numbers in splits.items():
    if not numbers:
      continue
    cases = sorted(by_split.get(name, []), key=lambda s: s.rank)
    if [s.number for s in cases] != [int(n) for n in numbers]:
      raise RuntimeError(f"split {name}: cases {[s.number for s in cases]} were written, not "
                         f"{list(numbers)}")
    rows, tumours, position = [], [], 0
    bins = slices.HU_HI - slices.HU_LO + 1
    hists = {k: np.zeros(bins, np.int64) for k in ("liver", "tumour")}
    for s in cases:
      rows.append([int(s.number), position, s.num_slices, *s.liver_z, *s.size])
      tumours.extend([position + int(t[0]), *t[1:]] for t in s.tumours)
      for k in hists:
        hists[k] += intensity.unpack(s.histograms[k])
      position += s.num_slices
    index[name] = {"cases": rows, "tumours": tumours}
    hists_by_split[name] = {k: intensity.pack(v) for k, v in hists.items()}
    split_infos.append(tfds.core.SplitInfo(
        name=name, shard_lengths=[s.num_slices for s in cases],
        num_bytes=sum(s.num_bytes for s in cases), filename_template=templates[name]))
  return {"index": index, "intensity": hists_by_split}, split_infos


def assign_splits(numbers: list[int], val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, list[int]]:
  """Deterministic case-level split: slices of one patient never land in two splits."""
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ValueError(f"data.val_fraction ({val_fraction}) and data.test_fraction "
                     f"({test_fraction}) must be in [0, 1) and sum to less than 1")
  n = len(numbers)
  order = np.random.default_rng(seed).permutation(np.array(sorted(numbers)))
  n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
  n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
  if n - n_val - n_test < 1:
    raise ValueError(f"{n} cases are too few for data.val_fraction={val_fraction} and "
                     f"data.test_fraction={test_fraction}: no training case would be left")
  return {"train": sorted(order[n_val + n_test:].tolist()),
          "validation": sorted(order[:n_val].tolist()),
          "test": sorted(order[n_val:n_val + n_test].tolist())}


def folder_fingerprint(lits_dir: str) -> str:
  """A digest of a LiTS folder's case file names and sizes (cheap on local disks and gs://)."""
  cases = lits.find_cases(lits_dir)
  listing = [(n, v.name, v.stat().length, s.name, s.stat().length) for n, (v, s) in cases.items()]
  return hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16]


def builder_for(data_cfg, fingerprint: Optional[str] = None) -> Lits:
  """The (prepared or not) builder that `config.data` names."""
  if fingerprint is None:
    fingerprint = folder_fingerprint(os.fspath(data_cfg.lits_dir))
  spacing = settings.target_spacing(data_cfg)
  image_size = data_cfg.get("image_size", None)
  config = LitsConfig(context_slices=int(data_cfg.context_slices),
                      image_size=None if image_size is None else int(image_size),
                      spacing_mm=spacing,
                      val_fraction=float(data_cfg.val_fraction),
                      test_fraction=float(data_cfg.test_fraction),
                      split_seed=int(data_cfg.split_seed), fingerprint=fingerprint)
  return Lits(data_dir=os.fspath(data_cfg.tfds_dir), config=config,
              file_format=data_cfg.file_format)


def synth_config(data_cfg) -> synthetic.SynthConfig:
  s = data_cfg.synthetic
  return synthetic.SynthConfig(size=int(s.size), slices=int(s.slices),
                               max_tumours=int(s.max_tumours),
                               storage_variants=bool(s.storage_variants))


def prepare(data_cfg, log: Callable[[str], Any] = print, build: bool = True, *,
            workers: Optional[int] = None, beam_runner: Optional[str] = None,
            beam_options: str = "") -> Lits:
  """Builds the dataset `config.data` names unless it exists; synthesises data first if asked.

  Args:
    data_cfg: `config.data`.
    log: called with progress lines.
    build: False only opens a dataset that another process prepared (multi-process runs:
      process 0 builds while the others wait, then they open it) and raises FileNotFoundError
      when there is none.
    workers: processes writing cases on this host (None: `data.prepare_workers`; 0: the
      available cores, or this process alone for a folder too small to gain from more).
    beam_runner: build with Apache Beam on this runner instead ('local' or 'DirectRunner':
      Beam's multi-process local runner with `workers` processes; else the runner's name, e.g.
      'DataflowRunner'); `beam_options`: Beam's own flags as one string.

  Returns the prepared builder. Raises `lits.CaseError` naming the file for bad input, leaving
  no dataset that looks complete. Whichever way it is built, the dataset is the same.
  """
  lits_dir = os.fspath(data_cfg.lits_dir)
  if not build:
    builder = builder_for(data_cfg)
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"{data_cfg.tfds_dir}: dataset lits/{builder.builder_config.name} is not prepared "
          "here after process 0 prepared it; every process must see the same data.lits_dir and "
          "data.tfds_dir (a shared folder or gs://)")
    return builder
  compression = data_cfg.get("record_compression", "uncompressed")
  if compression not in RECORD_COMPRESSIONS:
    raise ValueError(f"data.record_compression={compression!r} is not one of "
                     f"{list(RECORD_COMPRESSIONS)}")
  requested = settings.prepare_workers(data_cfg) if workers is None else int(workers)
  if requested < 0:
    raise ValueError(f"prepare workers must be >= 0 (0: the available cores), got {requested}")
  if data_cfg.synthetic.enabled:
    _synthesise(data_cfg, log)
  builder = builder_for(data_cfg)
  if builder.is_prepared():
    log(f"dataset reused: {builder.data_dir}")
    return builder
  with _build_lock(builder, log):
    builder = builder_for(data_cfg)  # another process may have finished it meanwhile
    if builder.is_prepared():
      log(f"dataset reused: {builder.data_dir}")
      return builder
    n = build_workers(requested, lits_dir)
    options = BuildOptions(workers=n, compression=compression, log=log)
    config = dict(manual_dir=lits_dir)
    if beam_runner:
      from data_pipelines import lits_beam  # pylint: disable=g-import-not-at-top
      runner, beam_flags = lits_beam.pipeline_settings(beam_runner, beam_options, requested)
      config.update(beam_runner=runner, beam_options=beam_flags)
      log(f"preparing dataset lits/{builder.builder_config.name} in {data_cfg.tfds_dir} with "
          f"Apache Beam ({beam_runner}); each worker checks its cases")
      _download_and_prepare(builder, options, config, data_cfg)
      return builder
    pool = case_pool.worker_pool(n) if n > 1 else contextlib.nullcontext()
    with pool as executor:
      # Every case is opened before the long build, so every bad file is named at once.
      verify.verify_folder(lits_dir, workers=0, executor=executor, log=log).raise_if_bad()
      log(f"preparing dataset lits/{builder.builder_config.name} in {data_cfg.tfds_dir} "
          f"({n} {'process' if n == 1 else 'worker processes'})")
      options.executor = executor
      _download_and_prepare(builder, options, config, data_cfg)
  return builder


def _download_and_prepare(builder: Lits, options: BuildOptions, config: dict, data_cfg) -> None:
  builder.build_options = options
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**config),
                               file_format=data_cfg.file_format)


def _synthesise(data_cfg, log: Callable[[str], Any]) -> None:
  lits_dir = os.fspath(data_cfg.lits_dir)
  s = data_cfg.synthetic
  synthetic.check_writable(lits_dir, "config.data.lits_dir")  # never into a user's folder
  manifest = synthetic.read_manifest(lits_dir)
  if manifest is None:
    log(f"synthesising {s.num_cases} LiTS-format cases into {lits_dir}")
  manifest = synthetic.ensure_synthetic(
      lits_dir, int(s.num_cases), int(s.seed), synth_config(data_cfg),
      progress=lambda r: log(f"  volume-{r['case']}.nii.gz {tuple(r['shape'])} "
                             f"{r['num_tumours']} tumours"), key="config.data.lits_dir")
  sizes = [t["diameter_mm"] for c in manifest["cases"] for t in c["tumours"]]
  log(f"synthetic data: {len(manifest['cases'])} cases, {len(sizes)} tumours "
      f"({sum(d < 10 for d in sizes)} under 10 mm) in {lits_dir}")


# Below this many bytes of case files, `workers=0` builds in this process: starting worker
# processes (their imports) would cost more than they save.
_SMALL_FOLDER_BYTES = 256 << 20


def build_workers(requested: int, lits_dir: str) -> int:
  """Processes for a local build: `requested` (0: the available cores, or 1 for a small
  folder), at most one per case."""
  cases = lits.find_cases(lits_dir)
  if requested == 0:
    total = sum(v.stat().length + s.stat().length for v, s in cases.values())
    requested = case_pool.available_cores() if total >= _SMALL_FOLDER_BYTES else 1
  return max(1, min(requested, len(cases)))


@contextlib.contextmanager
def _build_lock(builder: Lits, log: Callable[[str], Any]):
  """Holds this dataset's build lock (local folders: one build at a time on this host) and
  removes what killed builds left (TFDS's `incomplete.*` folders beside the dataset)."""
  parent = os.path.dirname(os.path.normpath(os.fspath(builder.data_dir)))
  if "://" in parent:
    yield
    return
  os.makedirs(parent, exist_ok=True)
  fd = os.open(os.path.join(parent, ".prepare.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      log(f"waiting for another prepare of {parent} on this host")
      fcntl.flock(fd, fcntl.LOCK_EX)
    version = os.path.basename(os.path.normpath(os.fspath(builder.data_dir)))
    for name in sorted(os.listdir(parent)):
      if name.startswith(case_shards.INCOMPLETE_PREFIX) and name.endswith(f"_{version}"):
        log(f"removing {os.path.join(parent, name)} (an interrupted prepare)")
        epath.Path(parent, name).rmtree(missing_ok=True)
    yield
  finally:
    os.close(fd)  # releases the lock


def verify_workers(lits_dir: str) -> int:
  """Processes for `verify.verify_folder`: one per core for more cases than cores, else none
  (starting a process costs about a second of imports, a small case less)."""
  cores = len(os.sched_getaffinity(0))
  try:
    cases = len(lits.list_case_files(lits_dir))
  except lits.CaseFileNotFoundError:
    return 0
  return cores if cores > 1 and cases > 2 * cores else 0


RECORD_COMPRESSIONS = settings.RECORD_COMPRESSIONS


def describe(builder: Lits, data_cfg=None) -> str:
  """A few lines on a prepared dataset: the grid, splits, slice sizes, and the training split's
  foreground intensities with what the paper's window (and `data_cfg`'s normalisation) clips."""
  info, cfg = builder.info, builder.builder_config
  grid = (f"{cfg.image_size} x {cfg.image_size} pixels a slice" if cfg.spacing_mm is None else
          f"{' x '.join(f'{v:g}' for v in cfg.spacing_mm)} mm a pixel")
  lines = [f"dataset {builder.data_dir} ({grid})"]
  index = info.metadata.get("index", {})
  for name, split in sorted(info.splits.items()):
    cases = info.metadata.get("splits", {}).get(name, [])
    sizes = [tuple(row[5:7]) for row in index.get(name, {}).get("cases", []) if len(row) >= 7]
    extent = ""
    if sizes and cfg.spacing_mm is not None:
      extent = (f", slices {min(r for r, _ in sizes)}-{max(r for r, _ in sizes)} x "
                f"{min(c for _, c in sizes)}-{max(c for _, c in sizes)} pixels")
    lines.append(f"  {name}: {split.num_examples} slices from {len(cases)} cases{extent}")
  hists = intensity.split_histograms(info.metadata, "train")
  if hists is not None and (hists["liver"].sum() + hists["tumour"].sum()) > 0:
    stats = intensity.foreground_stats(hists)
    lines.append(f"  training foreground HU: percentiles 0.5/50/99.5 {stats['p0_5']:.0f}/"
                 f"{stats['p50']:.0f}/{stats['p99_5']:.0f}, mean {stats['mean']:.1f}, std "
                 f"{stats['std']:.1f}")
    normalisers = {"the paper's window": intensity.window(*settings.DEFAULT_HU_WINDOW)}
    if data_cfg is not None:
      normalisers["data.normalisation"] = intensity.normaliser_for(data_cfg, info.metadata)
    lines += ["  " + line for line in intensity.clipping_report(hists, normalisers)]
  return "\n".join(lines)
