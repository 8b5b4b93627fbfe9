"""A sweep's folder as `compare` reads it: the plan (sweep.json) and the finished runs' records
(records/NAME.json), written by `curriculum_seg.sweep`."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

PLAN_FILE = "sweep.json"
RECORDS_DIR = "records"


class SweepError(Exception):
  """A sweep that cannot run as asked; the one-line message says why."""


def describe_scored_on(source: dict) -> str:
  """Where a sweep's runs were scored, in words."""
  if "held_out" in source:
    h = source["held_out"]
    return (f"{h['num_cases']} synthetic held-out cases (generator seed {h['seed']}, up to "
            f"{h['max_tumours']} tumours a case)")
  if "folder" in source:
    return f"every case of {source['folder']}"
  return "the prepared dataset's test split"


def record_path(out: str, name: str) -> str:
  return os.path.join(out, RECORDS_DIR, f"{name}.json")


def read_plan(out: str) -> Optional[dict]:
  """sweep.json of a sweep folder (None when there is none)."""
  path = os.path.join(out, PLAN_FILE)
  if not os.path.exists(path):
    return None
  return _read_json(path)


def read_records(out: str) -> dict[str, dict]:
  """The finished runs' records of a sweep folder, by run name."""
  return read_record_folder(os.path.join(out, RECORDS_DIR))


def read_record_folder(folder: str) -> dict[str, dict]:
  """The records (NAME.json) in `folder`, by run name ({} when there is no folder)."""
  if not os.path.isdir(folder):
    return {}
  records = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json"):
      record = _read_json(os.path.join(folder, name))
      if not isinstance(record, dict) or "name" not in record or "cases" not in record:
        raise SweepError(f"{folder}/{name}: not a sweep record")
      records[record["name"]] = record
  return records


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SweepError(f"{path}: cannot read it ({e})") from e
