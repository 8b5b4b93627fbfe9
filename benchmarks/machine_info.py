"""The machine description every benchmark writes next to its figures."""

import json
import os

from curriculum_seg.machine import describe  # noqa: F401  (the benchmarks' import)


def write_result(path: str, result: dict) -> None:
  """Writes a benchmark's result JSON (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
