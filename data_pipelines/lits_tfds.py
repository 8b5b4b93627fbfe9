"""The TFDS dataset "lits": LiTS-format cases as per-slice examples with context and tumour parts.

Prepared once from a LiTS folder (the manual download dir); one case is in memory at a time. The
builder config's name encodes the preprocessing parameters and a fingerprint of the folder's files
(names and sizes), so preparing the same config on the same folder again reuses the dataset, and a
different folder or parameter set gets its own. TFDS writes into an `incomplete` temporary folder
and renames it at the end, so an interrupted prepare never looks finished.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
from typing import Any, Callable, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import intensity, lits, settings, slices, synthetic, verify

VERSION = "2.0.0"  # 2.0: slices of any size (target spacing), HU histograms; 1.1: raw bytes
_MAX_SLICES = 1 << 16
_KEY_SPACE = 1 << 128  # TFDS's key space (128-bit hashes)


def example_key(rank: int, slice_index: int, num_cases: int) -> int:
  """An integer key that sorts as (case rank, slice) and spreads the cases evenly over TFDS's
  128-bit key space.

  With shuffling disabled TFDS orders examples by key and spills them into 1000 buckets by key
  range, reading each bucket whole to sort it. Small keys would all land in bucket 0, so memory
  would grow with the dataset; spread keys put about one case in each bucket.
  """
  if not 0 <= slice_index < _MAX_SLICES:
    raise ValueError(f"slice index {slice_index} outside [0, {_MAX_SLICES})")
  return (rank * _MAX_SLICES + slice_index) * (_KEY_SPACE // (num_cases * _MAX_SLICES))

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
    c = self.builder_config.context_slices
    f = tfds.features
    return self.dataset_info_from_configs(
        features=f.FeaturesDict({
            "image": f.Tensor(shape=(None, None, c), dtype=np.int16, encoding=f.Encoding.BYTES,
                              doc="HU [rows, cols, context]; channel c//2 is the slice"),
            "label": f.Tensor(shape=(None, None), dtype=np.uint8, encoding=f.Encoding.ZLIB,
                              doc="0 background, 1 liver, 2 tumour"),
            "case_number": f.Scalar(dtype=np.int32, doc="N of volume-N"),
            "slice_index": f.Scalar(dtype=np.int32),
            "num_slices": f.Scalar(dtype=np.int32),
            "spacing": f.Tensor(shape=(3,), dtype=np.float32, doc="mm per stored axis"),
            "liver_z_range": f.Tensor(shape=(2,), dtype=np.int32, doc="(-1, -1) without liver"),
            "tumours": f.Sequence({
                "component": f.Scalar(dtype=np.int32),
                "bbox": f.Tensor(shape=(4,), dtype=np.float32),
                "centre": f.Tensor(shape=(2,), dtype=np.float32),
                "area_mm2": f.Scalar(dtype=np.float32),
                "diameter_mm": f.Scalar(dtype=np.float32),
                "num_voxels": f.Scalar(dtype=np.int32),
                "stored_pixels": f.Scalar(dtype=np.int32),
            }),
        }),
        disable_shuffling=True,  # examples stay in (case, slice) order: pipelines shuffle
        metadata=tfds.core.MetadataDict(),
        homepage="https://competitions.codalab.org/competitions/17094",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cases = lits.find_cases(dl_manager.manual_dir)
    cfg = self.builder_config
    splits = assign_splits(sorted(cases), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    self.info.metadata["splits"] = {k: [int(n) for n in v] for k, v in splits.items()}
    self.info.metadata["lits_dir"] = os.fspath(dl_manager.manual_dir)
    self.info.metadata["index"] = {}
    self.info.metadata["intensity"] = {}
    return {name: self._generate_examples(name, {n: cases[n] for n in numbers})
            for name, numbers in splits.items() if numbers}

  def _generate_examples(self, split: str, cases: dict[int, tuple[epath.Path, epath.Path]]):
    """Yields a split's slices in (case, slice) order and records its index in the metadata.

    With shuffling disabled, an example's position in the split is its rank in that order, so
    the index below gives random-access positions: `cases` rows are [case_number, first example,
    num_slices, liver_z_lo, liver_z_hi, rows, cols] (rows x cols: the case's stored slice size);
    `tumours` rows are [example, component, centre_row, centre_col, diameter_mm, area_mm2,
    stored_pixels, row_min, col_min, row_max, col_max], one per tumour component part in a
    slice (its box in stored edge coordinates). The split's summed liver and
    tumour HU histograms go to `intensity` (see data_pipelines.intensity).
    """
    cfg = self.builder_config
    index = {"cases": [], "tumours": []}
    self.info.metadata["index"][split] = index
    hists = {k: np.zeros(slices.HU_HI - slices.HU_LO + 1, np.int64) for k in ("liver", "tumour")}
    position = 0

    def load(number):
      volume, segmentation = cases[number]
      case = lits.load_case(volume, segmentation)
      logging.info("prepare: case %d %s", number, case.image.shape)
      hists = slices.intensity_histograms(case.image, case.labels)  # at the case's resolution
      target_z = cfg.spacing_mm[2] if cfg.spacing_mm and len(cfg.spacing_mm) == 3 else None
      image, labels, spacing = slices.resample_case_depth(case.image, case.labels,
                                                          case.spacing, target_z)
      size = slices.stored_shape(image.shape, spacing, cfg.image_size, cfg.spacing_mm)
      examples = slices.case_examples(image, labels, spacing, number, cfg.context_slices, size)
      return examples, size, hists

    # The next case is read and resampled in a background thread while this one is written:
    # at most two cases are in memory.
    numbers = sorted(cases)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      upcoming = pool.submit(load, numbers[0])
      for i, number in enumerate(numbers):
        examples, size, case_hists = upcoming.result()
        for k in hists:
          hists[k] += case_hists[k]
        if i + 1 < len(numbers):
          upcoming = pool.submit(load, numbers[i + 1])
        first = position
        for k, example in examples:
          key = example_key(i, k, len(numbers))
          for t in example["tumours"]:
            index["tumours"].append([position, int(t["component"]),
                                     round(float(t["centre"][0]), 3),
                                     round(float(t["centre"][1]), 3),
                                     round(float(t["diameter_mm"]), 3),
                                     round(float(t["area_mm2"]), 3), int(t["stored_pixels"]),
                                     *[round(float(v), 3) for v in t["bbox"]]])
          position += 1
          yield key, example
        lo, hi = example["liver_z_range"].tolist()
        index["cases"].append([int(number), first, position - first, lo, hi, *size])
    self.info.metadata["intensity"][split] = {k: intensity.pack(v) for k, v in hists.items()}


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


def prepare(data_cfg, log: Callable[[str], Any] = print, build: bool = True) -> Lits:
  """Builds the dataset `config.data` names unless it exists; synthesises data first if asked.

  Returns the prepared builder. Raises `lits.CaseError` naming the file for bad input, leaving
  no dataset that looks complete. `build=False` only opens a dataset that another process
  prepared (multi-process runs: process 0 builds while the others wait, then they open it) and
  raises FileNotFoundError when there is none.
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
  if data_cfg.synthetic.enabled:
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
  builder = builder_for(data_cfg)
  if builder.is_prepared():
    log(f"dataset reused: {builder.data_dir}")
    return builder
  # Every case is opened before the long build, so every bad file is named at once.
  verify.verify_folder(lits_dir, workers=verify_workers(lits_dir), log=log).raise_if_bad()
  log(f"preparing dataset lits/{builder.builder_config.name} in {data_cfg.tfds_dir}")
  with _writer_buffer_limit(_WRITER_BUFFER_BYTES), \
      _array_record_options(data_cfg.get("record_compression", "uncompressed")):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=lits_dir),
        file_format=data_cfg.file_format)
  return builder


def verify_workers(lits_dir: str) -> int:
  """Processes for `verify.verify_folder`: one per core for more cases than cores, else none
  (starting a process costs about a second of imports, a small case less)."""
  cores = len(os.sched_getaffinity(0))
  try:
    cases = len(lits.list_case_files(lits_dir))
  except lits.CaseFileNotFoundError:
    return 0
  return cores if cores > 1 and cases > 2 * cores else 0


# TFDS's writer keeps up to 1 GB of serialised examples in memory before spilling them to disk
# (even with shuffling disabled). LiTS slices are large, so prepare lowers that to keep its peak
# memory near a few volumes; the constant is read at each add, so patching it takes effect.
_WRITER_BUFFER_BYTES = 256 << 20


RECORD_COMPRESSIONS = settings.RECORD_COMPRESSIONS


class _ArrayRecordWithOptions:
  """Stands in for the array_record module inside TFDS, adding options to every writer."""

  def __init__(self, module, extra: str):
    self._module, self._extra = module, extra

  def __getattr__(self, name):
    return getattr(self._module, name)

  def ArrayRecordWriter(self, path, options="", *args, **kwargs):  # pylint: disable=invalid-name
    options = ",".join(o for o in (options, self._extra) if o)
    return self._module.ArrayRecordWriter(path, options, *args, **kwargs)


@contextlib.contextmanager
def _array_record_options(compression: str):
  """Writes ArrayRecord shards with `compression` instead of TFDS's fixed zstd:3 default.

  Reading a 256x256x3 slice costs about 1.2-1.6 CPU-ms with zstd:3 against about 0.3 ms
  uncompressed (measured by benchmarks/pipeline.py), which decides whether a host core feeds
  1,000 slices/s; uncompressed costs about twice the disk. Readers detect the compression.
  """
  if compression not in RECORD_COMPRESSIONS:
    raise ValueError(f"data.record_compression={compression!r} is not one of "
                     f"{list(RECORD_COMPRESSIONS)}")
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  previous = file_adapters.array_record_module
  file_adapters.array_record_module = _ArrayRecordWithOptions(previous, compression)
  try:
    yield
  finally:
    file_adapters.array_record_module = previous


@contextlib.contextmanager
def _writer_buffer_limit(limit: int):
  from tensorflow_datasets.core import shuffle  # pylint: disable=g-import-not-at-top
  previous = shuffle.MAX_MEM_BUFFER_SIZE
  shuffle.MAX_MEM_BUFFER_SIZE = min(previous, limit)
  try:
    yield
  finally:
    shuffle.MAX_MEM_BUFFER_SIZE = previous


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
