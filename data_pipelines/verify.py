"""Checks every case of a LiTS folder up front and lists every unusable file at once.

Building the TFDS dataset reads cases one by one, so a truncated file or a stray label found by
`lits.load_case` stops the build only when it gets there, on real LiTS up to an hour in. Like
nnU-Net's `--verify_dataset_integrity`, `verify_folder` opens every case first (in parallel if
asked), collects each problem as one line naming its file, and adds what `load_case` does not
check: pairing problems of the folder and gzip streams cut after the last array byte.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import multiprocessing
import os
import time
import zlib
from typing import Callable, Optional

import numpy as np
from etils import epath

from data_pipelines import lits
from data_pipelines.labels import LIVER, TUMOUR

_GZIP_CHUNK = 16 << 20
_LOG_EVERY_S = 2.0  # progress lines at most this often (and always the last one)


@dataclasses.dataclass
class VerifyReport:
  """What `verify_folder` found: every problem (one line naming its file) and usable-case stats.

  `num_cases` counts the case numbers found (any volume-N or segmentation-N file); the stats
  count usable cases only.
  """

  lits_dir: str
  num_cases: int = 0
  num_bad_cases: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)
  slices: int = 0
  voxels: int = 0
  cases_without_tumour: int = 0
  cases_without_liver: int = 0

  @property
  def ok(self) -> bool:
    return not self.problems

  def summary(self) -> str:
    usable = self.num_cases - self.num_bad_cases
    return (f"verify: {usable} of {self.num_cases} cases usable in {self.lits_dir} "
            f"({self.slices} slices, {self.voxels} voxels, {self.cases_without_tumour} without "
            f"tumour, {self.cases_without_liver} without liver); {len(self.problems)} problems")

  def raise_if_bad(self) -> None:
    """Raises lits.CaseError listing every problem, one per line after a summary line."""
    if not self.problems:
      return
    head = f"{self.num_bad_cases} of {self.num_cases} cases in {self.lits_dir} are unusable:"
    if self.num_cases == 0:  # one problem, the folder's: say it on the first line
      raise lits.CaseError(f"{head} {self.problems[0]}")
    raise lits.CaseError("\n  ".join([head] + self.problems))


@dataclasses.dataclass
class _CaseResult:
  """One case's verdict; small, so workers send back no arrays."""

  number: int
  problems: list[str]
  slices: int = 0
  voxels: int = 0
  has_tumour: bool = False
  has_liver: bool = False


def verify_folder(lits_dir: str | os.PathLike, *, workers: int = 0,
                  log: Optional[Callable[[str], None]] = print,
                  executor: Optional[concurrent.futures.Executor] = None) -> VerifyReport:
  """Opens every case of a LiTS folder and reports every problem, in case order.

  Args:
    lits_dir: folder of `volume-N.nii[.gz]` and `segmentation-N.nii[.gz]` (local or gs://).
    workers: processes checking cases in parallel (spawn/forkserver, never fork); 0 checks them
      in this process. About one case is in memory per worker.
    log: called with progress lines (`verify: 12/131 cases, 1 unusable`); None for silence.
    executor: a process pool to check cases in instead of `workers` new processes (prepare
      shares its pool with the build).

  Returns:
    A `VerifyReport`; call `raise_if_bad()` on it to refuse a folder with any problem.

  Raises:
    lits.CaseFileNotFoundError: if `lits_dir` does not exist.
  """
  lits_dir = os.fspath(lits_dir)
  files = lits.list_case_files(lits_dir)
  report = VerifyReport(lits_dir=lits_dir, num_cases=len(files))
  if not files:
    report.problems.append(f"{lits_dir}: no volume-N.nii[.gz] files in the LiTS folder")
    return report
  jobs = [(n, [os.fspath(p) for p in v], [os.fspath(p) for p in s])
          for n, (v, s) in files.items()]
  progress = _Progress(len(jobs), log)
  for result in _run(jobs, workers, executor):
    _add(report, result)
    progress.step(report.num_bad_cases)
  if log is not None:
    log(report.summary())
  return report


def _run(jobs: list[tuple[int, list[str], list[str]]], workers: int,
         executor: Optional[concurrent.futures.Executor] = None):
  """Yields each job's `_CaseResult` in job order, in this process or a process pool."""
  if executor is not None:
    yield from executor.map(_check_case, jobs)
    return
  if workers <= 0:
    yield from map(_check_case, jobs)
    return
  methods = multiprocessing.get_all_start_methods()
  context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    yield from pool.map(_check_case, jobs)


def _add(report: VerifyReport, result: _CaseResult) -> None:
  if result.problems:
    report.num_bad_cases += 1
    report.problems.extend(result.problems)
    return
  report.slices += result.slices
  report.voxels += result.voxels
  report.cases_without_tumour += not result.has_tumour
  report.cases_without_liver += not result.has_liver


class _Progress:
  """Logs `verify: i/n cases` at most every few seconds, and always after the last case."""

  def __init__(self, total: int, log: Optional[Callable[[str], None]]):
    self.total, self.log, self.done, self.last = total, log, 0, float("-inf")

  def step(self, bad: int) -> None:
    self.done += 1
    now = time.monotonic()
    if self.log is not None and (self.done == self.total or now - self.last >= _LOG_EVERY_S):
      self.last = now
      self.log(f"verify: {self.done}/{self.total} cases, {bad} unusable")


def _check_case(job: tuple[int, list[str], list[str]]) -> _CaseResult:
  """Checks one case number's files; a top-level function so that worker processes can run it."""
  number, volumes, segmentations = job
  try:
    return _check_files(number, volumes, segmentations)
  except Exception as e:  # pylint: disable=broad-except  # e.g. MemoryError: list it, go on
    return _CaseResult(number, [f"{', '.join(volumes + segmentations)}: cannot be checked "
                                f"({type(e).__name__}: {_one_line(e)})"])


def _check_files(number: int, volumes: list[str], segmentations: list[str]) -> _CaseResult:
  if len(volumes) == 1 and len(segmentations) == 1:
    return _check_pair(number, volumes[0], segmentations[0])
  problems = _pairing_problems(number, volumes, segmentations)
  for path in volumes:  # still check each file, so the user knows which copy to keep
    problems += _file_problems(path, _check_volume)
  for path in segmentations:
    problems += _file_problems(path, lits.check_segmentation)
  return _CaseResult(number, problems)


def _pairing_problems(number: int, volumes: list[str], segmentations: list[str]) -> list[str]:
  problems = []
  for role, paths in (("volume", volumes), ("segmentation", segmentations)):
    if len(paths) > 1:
      problems.append(f"{', '.join(paths)}: case {number} has {len(paths)} {role} files "
                      f"(keep one)")
  if not segmentations:
    problems.append(f"{volumes[0]}: volume without a segmentation-{number}.nii[.gz] file")
  if not volumes:
    problems.append(f"{segmentations[0]}: segmentation without a volume-{number}.nii[.gz] file")
  return problems


def _check_pair(number: int, volume: str, segmentation: str) -> _CaseResult:
  """`load_case` on the pair, plus the gzip trailers; names the segmentation too if bad alone."""
  try:
    case = lits.load_case(volume, segmentation)
  except lits.CaseError as e:
    problems = [_one_line(e)]
    if not str(e).startswith(f"{segmentation}:"):  # the volume failed: the segmentation unread
      problems += _file_problems(segmentation, lits.check_segmentation)
    return _CaseResult(number, problems)
  problems = [p for p in (_gzip_problem(volume), _gzip_problem(segmentation)) if p]
  labels = case.labels
  return _CaseResult(number, problems, slices=int(case.image.shape[2]),
                     voxels=int(case.image.size), has_tumour=bool(np.any(labels == TUMOUR)),
                     has_liver=bool(np.any(labels >= LIVER)))


def _check_volume(path: str) -> None:
  lits.load_case(path)


def _file_problems(path: str, check: Callable[[str], None]) -> list[str]:
  try:
    check(path)
  except lits.CaseError as e:
    return [_one_line(e)]
  problem = _gzip_problem(path)
  return [problem] if problem else []


def _gzip_problem(path: str) -> Optional[str]:
  """Reads a .gz file to its end: nibabel stops at the last array byte, so a cut trailer passes."""
  if not path.endswith(".gz"):
    return None
  try:
    with epath.Path(path).open("rb") as raw, gzip.GzipFile(fileobj=raw) as f:
      while f.read(_GZIP_CHUNK):
        pass
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    return f"{path}: the gzip stream is truncated or corrupt ({type(e).__name__}: {e})"
  return None


def _one_line(error: Exception) -> str:
  """A CaseError's message on one line (the grid mismatch one prints two affines)."""
  return " ".join(str(error).split())
