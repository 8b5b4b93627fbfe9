"""Benchmark of LiTS scoring: seconds to score one 512x512xN case with `metrics.score_case`.

Each case is synthetic but LiTS-like: a liver-sized blob (about 1.8 l, smooth irregular boundary)
with five tumours of 4-45 mm diameter, on a 512x512 grid of 0.75 mm pixels; the N slices span
400 mm, so slices are 4 mm (N=100) to 0.8 mm (N=500) thick and the liver crosses 150 mm of them.
The prediction is the reference perturbed: liver and tumour boundaries moved by a smooth field of
about ±2 mm, one small tumour missed, one false positive. Reported per N: the median over
--repeats of the whole `score_case` (tumour and liver scores, lesion detection, burden) and of its
parts (liver `case_scores`, tumour `case_scores`, `detect_lesions`).

  python benchmarks/scoring.py [--slices 100 300 500] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from curriculum_seg import metrics

import machine_info  # benchmarks/machine_info.py (run as a script from the repo root)

SIZE = 512
PIXEL_MM = 0.75
EXTENT_Z_MM = 400.0


def _smooth_field(rng, coords_mm, amplitude_mm: float, waves: int = 6) -> np.ndarray:
  """A sum of random plane waves (wavelengths 40-150 mm), cheap and smooth, scaled to ±amplitude."""
  field = np.zeros(np.broadcast_shapes(*(c.shape for c in coords_mm)), dtype=np.float32)
  for _ in range(waves):
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    k = 2 * np.pi / rng.uniform(40.0, 150.0)
    phase = rng.uniform(0, 2 * np.pi)
    field += np.cos(k * sum(d * c for d, c in zip(direction, coords_mm)) + phase).astype(
        np.float32)
  return field * np.float32(amplitude_mm / waves ** 0.5)


def make_case(slices: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple]:
  """(prediction labels, reference labels, spacing) for one 512x512x`slices` case."""
  rng = np.random.default_rng(seed)
  spacing = (PIXEL_MM, PIXEL_MM, EXTENT_Z_MM / slices)
  # Work inside a box around the liver only; the rest of the volume is background.
  semi = np.array([95.0, 75.0, 60.0])  # mm: about 1.8 l before the boundary noise
  centre = np.array([SIZE * PIXEL_MM * 0.42, SIZE * PIXEL_MM * 0.45, EXTENT_Z_MM * 0.5])
  lo = np.floor((centre - semi - 15) / spacing).astype(int)
  hi = np.ceil((centre + semi + 15) / spacing).astype(int)
  box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
  coords = [((np.arange(a, b) * s) - c).astype(np.float32).reshape(
      [-1 if i == axis else 1 for i in range(3)])
            for axis, (a, b, s, c) in enumerate(zip(lo, hi, spacing, centre))]
  # Approximate signed distance (mm, positive inside) of the ellipsoid, plus boundary noise.
  radius = np.sqrt(sum((c / r) ** 2 for c, r in zip(coords, semi)))
  inside = (1.0 - radius) * np.float32(semi.min())
  shape_mm = inside + _smooth_field(rng, coords, 8.0)  # the reference liver's irregular shape
  ref_liver = shape_mm > 0
  pred_liver = shape_mm + _smooth_field(rng, coords, 2.0) > 0  # its boundary moved by about ±2 mm

  ref = np.zeros((SIZE, SIZE, slices), dtype=np.uint8)
  pred = np.zeros_like(ref)
  ref_box = np.where(ref_liver, 1, 0).astype(np.uint8)
  pred_box = np.where(pred_liver, 1, 0).astype(np.uint8)
  diameters = [45.0, 25.0, 15.0, 8.0, 4.0, 6.0]  # the last is the false positive
  centres: list = []
  while len(centres) < len(diameters):  # separate tumours: none touches another
    c = rng.uniform(-0.45, 0.45, size=3) * semi
    d = diameters[len(centres)]
    if all(np.linalg.norm(c - o) > (d + e) / 2 + 5 for o, e in zip(centres, diameters)):
      centres.append(c)
  for diameter, offset in zip(diameters[:-1], centres):
    d2 = sum((c - o) ** 2 for c, o in zip(coords, offset))
    ref_box[d2 <= (diameter / 2) ** 2] = 2
    if diameter == 4.0:
      continue  # the smallest tumour is missed
    shift = rng.normal(scale=1.0, size=3)
    d2p = sum((c - o - s) ** 2 for c, o, s in zip(coords, offset, shift))
    r_pred = diameter / 2 + _smooth_field(rng, coords, 1.0)
    pred_box[d2p <= r_pred ** 2] = 2
  pred_box[sum((c - o) ** 2 for c, o in zip(coords, centres[-1])) <= (diameters[-1] / 2) ** 2] = 2
  ref[box] = ref_box
  pred[box] = pred_box
  return pred, ref, spacing


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--slices", type=int, nargs="+", default=[100, 300, 500])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="benchmarks/results/scoring.json")
  args = parser.parse_args()

  info = machine_info.describe("numpy", "scipy")
  print(f"{info['cpu']}, {info['cores']} cores, numpy {info['numpy']}, scipy {info['scipy']}")
  runs = []
  for n in args.slices:
    pred, ref, spacing = make_case(n, args.seed)
    result = metrics.score_case(pred, ref, spacing)
    liver_p, liver_r, tum_p, tum_r = pred >= 1, ref >= 1, pred == 2, ref == 2
    run = dict(
        slices=n, spacing_mm=list(spacing),
        liver_ml=float(np.count_nonzero(liver_r) * np.prod(spacing) / 1000),
        reference_lesions=result["detection"]["num_reference"],
        predicted_lesions=result["detection"]["num_predicted"],
        liver_dice=result["liver"]["dice"], liver_assd_mm=result["liver"]["assd"],
        tumour_dice=result["tumour"]["dice"],
        detection_iou=result["detection"]["iou"],
        seconds_score_case=_median_seconds(lambda: metrics.score_case(pred, ref, spacing),
                                           args.repeats),
        seconds_liver_case_scores=_median_seconds(
            lambda: metrics.case_scores(liver_p, liver_r, spacing), args.repeats),
        seconds_tumour_case_scores=_median_seconds(
            lambda: metrics.case_scores(tum_p, tum_r, spacing), args.repeats),
        seconds_detect_lesions=_median_seconds(
            lambda: metrics.detect_lesions(tum_p, tum_r, spacing), args.repeats))
    runs.append(run)
    print(f"512x512x{n} (slice {spacing[2]:.2f} mm, liver {run['liver_ml']:.0f} ml, "
          f"{run['reference_lesions']} ref / {run['predicted_lesions']} pred lesions, liver Dice "
          f"{run['liver_dice']:.3f}, ASSD {run['liver_assd_mm']:.2f} mm): "
          f"score_case {run['seconds_score_case']:.2f} s "
          f"[liver case_scores {run['seconds_liver_case_scores']:.2f} s, "
          f"tumour case_scores {run['seconds_tumour_case_scores']:.2f} s, "
          f"detect_lesions {run['seconds_detect_lesions']:.2f} s] "
          f"(median of {args.repeats})", flush=True)
  out = dict(benchmark="scoring", machine=info, args=vars(args), runs=metrics.json_safe(runs))
  machine_info.write_result(args.out, out)


if __name__ == "__main__":
  main()
