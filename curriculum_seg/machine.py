"""The machine a result was measured on (CPU, cores, Python, platform, package versions), and
the JSON file a script writes its result to.

Standard library only, so the scripts that run outside the project's environment (the PyTorch
baseline) describe their machine the same way.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata


def describe(*packages: str) -> dict:
  """CPU model, cores, Python, platform, load average and the versions of `packages`
  (distribution names; None for one that is not installed)."""
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  info = dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
              platform=platform.platform(), load_average=os.getloadavg())
  for name in packages:
    try:
      info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      info[name] = None
  return info


def write_result(path: str, result: dict) -> None:
  """Writes a script's result JSON (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
