"""The machine description every benchmark writes next to its figures."""

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
