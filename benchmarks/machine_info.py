"""The machine description every benchmark writes next to its figures."""

import json
import os
import platform
from importlib import metadata


def describe(*packages: str) -> dict:
  """CPU model, cores, Python, platform and the versions of `packages` (distribution names)."""
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
  """Writes a benchmark's result JSON (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
