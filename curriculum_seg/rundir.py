"""The run directory (`--workdir`): its lock, its saved config, and its metrics log.

Layout: `config.json` (the resolved config), `metrics.jsonl` (one JSON object per
logged step), `checkpoints/`, `tensorboard/`, `eval/`. Paths may be local or `gs://` (etils.epath);
the lock is an OS file lock where the workdir is local, which the kernel releases when the owner
dies (kill -9 included), so a crashed run never blocks its own restart.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import socket
import time
from typing import Any, Iterable, Optional

import ml_collections
from etils import epath

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
# Keys whose values may change between a run and its resumption: how long stages run and how
# often they log, evaluate and checkpoint. Everything else must match the saved config.
RUN_LENGTH_FIELDS = ("steps", "log_every", "eval_every", "checkpoint_every")
# How the input pipeline makes its batches (Grain worker processes, read threads, read-ahead):
# the batches are the same for any values (tests/test_pipelines.py), so a run may resume with
# others (another machine), and runs saved before `worker_count` existed resume; so may the
# processes that prepared the dataset (`prepare_workers`: the same dataset for any number).
INPUT_SPEED_FIELDS = ("worker_count", "host_threads", "prefetch_batches", "prepare_workers")
# Fields that do not change results either and may differ on resume.
_RESUMABLE_FIELDS = RUN_LENGTH_FIELDS + ("compilation_cache_dir",) + INPUT_SPEED_FIELDS


class RunDirError(RuntimeError):
  """A workdir that cannot be used: locked by another run, or holding another config."""


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


class RunLock:
  """An exclusive lock on a workdir, held for the life of a run.

  Local workdirs use fcntl.flock on `.lock` (released by the kernel when the process dies).
  Remote workdirs (gs://) cannot be flocked: there the lock file is advisory, recording who
  holds it. A multi-process run holds one lock, taken by process 0 (`stages.train`), so its
  other processes are not refused by their own run.
  """

  def __init__(self, workdir: epath.Path):
    self.path = workdir / LOCK_FILE
    self._fd: Optional[int] = None

  def acquire(self) -> None:
    owner = json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), since=time.time()))
    if not _is_local(self.path):
      self.path.write_text(owner)
      return
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
      os.close(fd)
      raise RunDirError(f"{self.path.parent}: workdir is in use by another run ({holder})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  if isinstance(value, (list, tuple)):
    value = list(value)
  return {prefix[:-1]: value}


# Fields added after runs were saved, with the value that gives a run saved without them the
# behaviour it had (for model.*: the original network). `read_config` adds them to a saved
# config, so code reads every current key; `config_differences` counts an absent one as equal
# to that value (matched by the key's last part), so such a run resumes while the current config
# keeps it. A `stages.*` field belongs to the stages of the pipelines in ADDED_STAGE_FIELDS.
ADDED_FIELDS = {
    "model.downsample": "maxpool", "model.convs_per_level": 2, "model.skip": "concat",
    "model.input_stride": 1, "model.foreground_prior": None, "model.spatial_dims": 2,
    "loss.dice_weight": 1.0, "loss.ce_weight": 1.0,
    "augment.lesion_scale": [1.0, 1.0], "augment.lesion_invert": 0.0, "augment.flip_depth": 0.0,
    "data.spacing_mm": None, "data.normalisation": "window", "data.prepare_workers": 0,
    "data.worker_count": 0, "data.host_threads": 0, "data.prefetch_batches": 0,
    "eval.window": None, "eval.overlap": 0.5, "eval.val_overlap": 0.5, "eval.sigma_scale": 0.125,
    "stages.*.tumour_fraction": 0.0, "stages.*.block_size": None,
    "stages.*.block_sampling": "slice",
}
ADDED_STAGE_FIELDS = {"tumour_fraction": ("whole", "liver_crop"), "block_size": ("whole",),
                      "block_sampling": ("whole",)}
_ADDED_BY_FIELD = {key.rsplit(".", 1)[-1]: value for key, value in ADDED_FIELDS.items()}


def with_added_fields(saved: dict) -> dict:
  """`saved` (a config.json dict) with each ADDED_FIELDS key it lacks, at its old value (in the
  sections it has)."""
  saved = copy.deepcopy(saved)
  for key, value in ADDED_FIELDS.items():
    section, *_, field = key.split(".")
    if section == "stages":
      for stage in saved.get("stages", {}).values():
        if isinstance(stage, dict) and stage.get("pipeline") in ADDED_STAGE_FIELDS[field]:
          stage.setdefault(field, copy.deepcopy(value))
    elif isinstance(saved.get(section), dict):
      saved[section].setdefault(field, copy.deepcopy(value))
  return saved


# Config keys holding local folders: saved absolute since config_check.resolve_paths; a saved
# relative value (older runs) is compared as the folder it names from the working directory.
PATH_FIELDS = ("data.lits_dir", "data.tfds_dir")
# What a workdir may hold before its run's config.json: the run's own layout, nothing else.
RUN_LAYOUT = (CONFIG_FILE, METRICS_FILE, LOCK_FILE, "checkpoints", "tensorboard", "eval",
              "summary.json", f".{CONFIG_FILE}.tmp")


def _same_path(a: Any, b: Any) -> bool:
  if isinstance(a, str) and isinstance(b, str) and "://" not in a + b:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
  return a == b


def config_differences(saved: dict, current: dict,
                       ignore: Optional[Iterable[str]] = None) -> list[str]:
  """Dotted keys whose values differ, ignoring run lengths (steps, intervals) and the cache; a
  field the saved config predates counts as equal when the current one has its old default.

  `ignore`: the field names (a key's last part) or full dotted keys to leave out instead of the
  run lengths and the cache (e.g. a sweep compares steps but not where the data lie).
  """
  a, b = _flatten(saved), _flatten(current)
  keys = sorted(set(a) | set(b))
  ignored = set(_RESUMABLE_FIELDS if ignore is None else ignore)

  def differs(k):
    field = k.rsplit(".", 1)[-1]
    if field in ignored or k in ignored:
      return False
    if k not in a and field in _ADDED_BY_FIELD:
      return b[k] != _ADDED_BY_FIELD[field]
    if k in PATH_FIELDS:
      return not _same_path(a.get(k), b.get(k))
    return a.get(k, "<absent>") != b.get(k, "<absent>")
  return [k for k in keys if differs(k)]


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the resolved config (tuples become lists)."""
  return json.loads(config.to_json())


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples config files use, recursively."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def read_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir/config.json`, as a config file would give it (tuples),
  with the fields added since the run was saved at their old values (`with_added_fields`).

  Data folders are saved absolute (config_check.resolve_paths); a relative one, saved by
  earlier versions, is read as relative to the working directory, as those versions did.
  Raises RunDirError for a folder without config.json or an unreadable one.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise RunDirError(f"{workdir}: not a run directory (no {CONFIG_FILE}); train a run there "
                      "first with `curriculum-seg train --config FILE --workdir DIR`")
  try:
    saved = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise RunDirError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(saved, dict):
    raise RunDirError(f"{path}: holds a JSON {type(saved).__name__}, not a config")
  return ml_collections.ConfigDict(_tuples(with_added_fields(saved)))


def relative_path_hint(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> str:
  """A sentence for a missing data folder that the run saved as a relative path, else ''."""
  lits_dir = os.fspath(config.data.get("lits_dir", ""))
  if not lits_dir or os.path.isabs(lits_dir) or "://" in lits_dir:
    return ""
  return (f" (the run in {workdir} saved data.lits_dir as the relative path {lits_dir!r}, "
          f"read from the working directory {os.getcwd()}: run the command from the folder "
          "the run trained in, or give --lits_dir)")


def has_checkpoint(workdir: epath.PathLike) -> bool:
  """Whether any stage of the run in `workdir` has committed a checkpoint.

  Orbax renames a checkpoint's temporary folder to its step number when the save is complete,
  so a folder `checkpoints/<stage>/{latest,best}/<digits>` is a committed checkpoint.
  """
  root = epath.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return False
  for stage in root.iterdir():
    for which in ("latest", "best"):
      folder = stage / which
      if folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir()):
        return True
  return False


def check_claimable(workdir: epath.PathLike) -> None:
  """Refuses a workdir that holds files but no run: the tool writes only into folders it made.

  A missing or empty folder, or one holding a run (config.json), may be used; so may one
  holding only the run layout (a run stopped before saving its config).
  """
  workdir = epath.Path(workdir)
  if not workdir.exists() or (workdir / CONFIG_FILE).exists():
    return
  if not workdir.is_dir():
    raise RunDirError(f"--workdir {workdir} is a file, not a folder")
  foreign = sorted(p.name for p in workdir.iterdir() if p.name not in RUN_LAYOUT)
  if foreign:
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                      else "")
    raise RunDirError(f"--workdir {workdir} holds files of no curriculum-seg run ({shown}); "
                      "name a new or empty folder")


def check_or_save_config(workdir: epath.Path, config: ml_collections.ConfigDict,
                         log: Any = None) -> bool:
  """Writes `config.json` for a new run; for an existing one refuses a different config.

  A run directory belongs to a config once a checkpoint is committed: before that (a run that
  failed or was stopped before its first checkpoint) a different config replaces the saved one,
  and `log` says so. Returns True when the workdir already held a run that trained (this is a
  resumption).
  """
  check_claimable(workdir)
  path = workdir / CONFIG_FILE
  current = config_to_json(config)
  if path.exists():
    trained = has_checkpoint(workdir)
    try:
      saved = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      if trained:
        raise RunDirError(f"{path}: not valid JSON ({e}); the run's config is lost") from e
      saved = {}
    diff = config_differences(saved, current)
    if diff and trained:
      raise RunDirError(f"{workdir}: config differs from the run's saved config.json in "
                        f"{', '.join(diff[:12])}{' ...' if len(diff) > 12 else ''}; use a new "
                        "--workdir, or change only run lengths (steps, intervals)")
    if diff and log is not None:
      log(f"{workdir}: its run never saved a checkpoint; replacing its config.json")
    write_atomically(path, json.dumps(current, indent=1, sort_keys=True))
    return trained
  write_atomically(path, json.dumps(current, indent=1, sort_keys=True))
  return False


def write_atomically(path: epath.PathLike, data: str | bytes) -> None:
  """Writes `path` through a temporary file renamed into place: it is whole or absent."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp"
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.rename(path) if not _is_local(path) else os.replace(tmp, path)


class MetricsLog:
  """`metrics.jsonl`: one JSON object per logged step, appended and flushed as it goes.

  On resume, `truncate_to(stage, step, ...)` drops lines logged after the restored checkpoint, so
  the log of a resumed run equals an uninterrupted run's.
  """

  def __init__(self, workdir: epath.Path):
    self.path = workdir / METRICS_FILE

  def read(self) -> list[dict]:
    if not self.path.exists():
      return []
    rows = []
    for line in self.path.read_text().splitlines():
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a line cut short by a kill: everything before it is good
    return rows

  def truncate_after(self, global_step: int) -> None:
    rows = [r for r in self.read() if r.get("global_step", 0) <= global_step]
    write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in rows))

  def truncate_to(self, stage: str, step: int, global_step: int, resumed: bool) -> None:
    """Keeps the rows logged up to step `step` of `stage`, where a run resumes (`resumed`) or
    starts it anew.

    Drops rows after `global_step`, and rows of `stage` after `step` or, at a new start, all
    of `stage`'s rows: a stage's step-0 evaluation shares `global_step` with the previous
    stage's last row and is logged again.
    """
    def kept(r):
      if r.get("stage") == stage:
        return resumed and r.get("step", 0) <= step
      return r.get("global_step", 0) <= global_step
    rows = self.read()
    write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in rows if kept(r)))

  def append(self, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(_jsonable(r)) + "\n" for r in rows)
    if _is_local(self.path):
      with open(self.path, "a") as f:
        f.write(text)
        f.flush()
    else:  # object stores cannot append: rewrite (logs are small)
      old = self.path.read_text() if self.path.exists() else ""
      self.path.write_text(old + text)


def _jsonable(row: dict) -> dict:
  out = {}
  for k, v in row.items():
    if hasattr(v, "item"):
      v = v.item()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
      v = str(v)
    out[k] = v
  return out
