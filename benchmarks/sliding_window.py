"""Host cost and memory of Gaussian sliding-window inference over a LiTS-sized volume.

`curriculum_seg.sliding_window.sliding_window_slabs` with a free `predict` (a broadcast view of
the input, no network), so the figures are the host's own work: cutting windows, weighting and
accumulating scores, finishing slabs. Per layout: windows, CPU seconds in all and per window,
voxels per CPU second, and the peak bytes numpy allocated while the slabs were consumed (traced
with tracemalloc) beside the bytes whole-volume accumulators would need.

  python benchmarks/sliding_window.py [--depth 64] [--classes 3] \\
      [--out benchmarks/results/sliding_window.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import machine_info  # noqa: E402  pylint: disable=wrong-import-position
from curriculum_seg import sliding_window as sw  # noqa: E402  pylint: disable=wrong-import-position

LAYOUTS = {  # name: (window, channels)
    "2d_slices_256": ((1, 256, 256), 3),   # a 2-D network on 256^2 crops, slice by slice
    "3d_96x160x160": ((96, 160, 160), 1),  # nnU-Net-like 3-D patches
    "3d_64x128x128": ((64, 128, 128), 1),
}


def measure(name: str, depth: int, size: int, classes: int, batch_size: int) -> dict:
  window, channels = LAYOUTS[name]
  image = np.random.default_rng(0).normal(size=(depth, size, size, channels)).astype(np.float32)

  def predict(x):
    return np.broadcast_to(x[..., :1], x.shape[:-1] + (classes,))

  windows = int(np.prod([len(sw.tile_starts(max(s, w), w, 0.5))
                         for s, w in zip(image.shape[:-1], window)]))
  tracemalloc.start()
  before = tracemalloc.get_traced_memory()[0]
  wall, cpu = time.perf_counter(), time.process_time()
  slabs = 0
  for item in sw.sliding_window_slabs(predict, image, window, batch_size=batch_size):
    slabs += 1
    del item
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  peak = tracemalloc.get_traced_memory()[1] - before
  tracemalloc.stop()
  return dict(layout=name, window=window, image=list(image.shape), classes=classes,
              batch_size=batch_size, windows=windows, slabs=slabs, cpu_s=round(cpu, 3),
              wall_s=round(wall, 3), cpu_ms_per_window=round(1e3 * cpu / windows, 3),
              mvoxels_per_cpu_s=round(image[..., 0].size / cpu / 1e6, 2),
              peak_traced_bytes=peak,
              whole_volume_accumulator_bytes=image[..., 0].size * (classes + 1) * 4)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--depth", type=int, default=64, help="slices (LiTS: up to ~1000)")
  parser.add_argument("--size", type=int, default=512, help="in-plane size")
  parser.add_argument("--classes", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "sliding_window.json"))
  args = parser.parse_args(argv)
  results = []
  for name in args.layouts:
    r = measure(name, args.depth, args.size, args.classes, args.batch_size)
    results.append(r)
    print(f"{name:15s} {r['windows']:5d} windows  {r['cpu_s']:7.2f} CPU s  "
          f"{r['cpu_ms_per_window']:8.2f} ms/window  {r['mvoxels_per_cpu_s']:6.2f} Mvox/s  "
          f"peak {r['peak_traced_bytes'] / 2**20:7.1f} MiB (whole-volume accumulators "
          f"{r['whole_volume_accumulator_bytes'] / 2**20:.1f} MiB)")
  machine = machine_info.describe("numpy")
  machine_info.write_result(args.out, dict(machine=machine, results=results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
