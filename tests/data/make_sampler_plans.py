"""Writes tests/data/sampler_plans_COMMIT.npz: sampler plans as the pipelines before Grain
(data_pipelines/pipelines.py at COMMIT) drew them, for tests/test_samplers.py.

Run once from the repository root (it reads the old module with `git show`):

  .venv/bin/python tests/data/make_sampler_plans.py

The inputs (example ranges, a synthetic index, labels) are built here from fixed seeds, and
test_samplers.py rebuilds them with the same functions (`whole_cases`, `patch_index`,
`negative_labels`), so the file holds only the old code's outputs and its inputs' recipe.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np

COMMIT = "916f90b"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"sampler_plans_{COMMIT}.npz")

# (examples, seed, batch size, tumour examples, tumour fraction) of WholeSliceSampler.
WHOLE_CASES = (
    (np.arange(10, 70), 3, 8, None, 0.0),
    (np.arange(10, 70), 3, 8, np.array([12, 20, 33, 41]), 0.5),
    (np.arange(5, 28), 11, 6, np.array([6, 7, 19]), 1 / 3),
    (np.arange(100, 400), 7, 16, np.array([3, 105, 150, 151, 152, 260, 399, 400]), 0.3),
    (np.arange(0, 50), 9, 12, np.array([4, 5, 6, 20, 44]), 0.25),
    (np.arange(0, 40), 1, 4, np.array([2, 3, 9, 17, 18, 30, 31]), 1.0),
)
# (seed, batch size, positive fraction, component sampling, jitter, patch size) of PatchSampler.
PATCH_CASES = (
    (0, 8, 0.25, "component", 3.0, 16),
    (5, 16, 0.7, "component", 16.0, 128),
    (2, 16, 0.5, "voxel", 8.0, 64),
    (9, 6, 0.0, "component", 0.0, 32),
    (4, 4, 1.0, "voxel", 2.5, 16),
)
BATCHES = 40


def patch_index():
  """A SplitIndex-like (cases, tumours, num_examples) of 5 cases with tumour parts."""
  rng = np.random.default_rng(1234)
  cases, tumours, first = [], [], 0
  for case in range(5):
    n = int(rng.integers(12, 30))
    lo = int(rng.integers(0, 4))
    hi = int(rng.integers(n - 5, n)) if case != 2 else -1
    cases.append([case * 3 + 1, first, n, lo if case != 2 else -1, hi])
    if case != 2:
      for component in range(1, int(rng.integers(1, 4)) + 1):
        z0 = int(rng.integers(lo, hi))
        for z in range(z0, min(hi + 1, z0 + int(rng.integers(1, 5)))):
          tumours.append([first + z, component, float(rng.uniform(20, 230)),
                          float(rng.uniform(20, 230)), float(rng.uniform(2, 40)),
                          float(rng.uniform(1, 300)), int(rng.integers(0, 50))])
    first += n
  tumours = np.asarray(tumours, np.float64).reshape(-1, 7)
  return np.asarray(cases, np.int64), tumours[tumours[:, 6] > 0], first


def negative_labels():
  """Label maps for negative_centre: (labels [k, 48, 48], has_tumour [k], u [k])."""
  rng = np.random.default_rng(99)
  labels = np.zeros((24, 48, 48), np.uint8)
  for k in range(len(labels)):
    r0, c0 = rng.integers(0, 20, 2)
    labels[k, r0:r0 + rng.integers(5, 28), c0:c0 + rng.integers(5, 28)] = 1
    for _ in range(int(rng.integers(0, 4))):
      r, c = rng.integers(0, 44, 2)
      labels[k, r:r + rng.integers(1, 6), c:c + rng.integers(1, 6)] = 2
  labels[3] = 0  # no liver at all
  labels[4] = 2  # all tumour
  labels[4, 20, 30] = 1
  return labels, rng.random(len(labels)) < 0.6, rng.random(len(labels))


def _old_module():
  source = subprocess.run(["git", "show", f"{COMMIT}:data_pipelines/pipelines.py"], check=True,
                          capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), "old_pipelines.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("old_pipelines", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["old_pipelines"] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def main():
  sys.path.insert(0, os.getcwd())
  old = _old_module()
  out = {}
  for i, (examples, seed, b, tumours, fraction) in enumerate(WHOLE_CASES):
    sampler = old.WholeSliceSampler(examples, seed, b, tumours, fraction)
    for key in ("example", "position", "tumour_row"):
      out[f"whole{i}_{key}"] = np.stack([sampler.global_batch(n)[key] for n in range(BATCHES)])
  cases, tumours, num_examples = patch_index()
  index = old.SplitIndex(split="train", cases=cases, tumours=tumours, num_examples=num_examples)
  for i, (seed, b, fraction, sampling, jitter, size) in enumerate(PATCH_CASES):
    sampler = old.PatchSampler(index, seed, b, fraction, sampling, jitter, size)
    for key in ("example", "position", "positive", "part", "centre", "pixel_u"):
      out[f"patch{i}_{key}"] = np.stack([sampler.global_batch(n)[key] for n in range(BATCHES)])
    out[f"patch{i}_negative_pool"] = sampler.negative_pool
  labels, has_tumour, u = negative_labels()
  sampler = old.PatchSampler(index, 0, 4, 0.5, "component", 0, patch_size=12)
  out["negative_centres"] = np.array([sampler.negative_centre(lab, bool(h), float(v))
                                      for lab, h, v in zip(labels, has_tumour, u)])
  np.savez_compressed(OUT, **out)
  print(f"wrote {OUT}: {len(out)} arrays")


if __name__ == "__main__":
  main()
