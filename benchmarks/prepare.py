"""Benchmark of `prepare` on LiTS-sized synthetic cases: cases/s and peak memory at 10 and 40 cases.

Cases are 512x512 with 100-400 slices (uniform per case), stored as uncompressed .nii like the
LiTS downloads, synthesised once into --data_dir and reused. Each prepare runs in a fresh
subprocess, whose own peak resident memory (ru_maxrss from os.wait4) is reported. Peak memory must stay flat as the
case count grows: prepare streams one case at a time.

  python benchmarks/prepare.py [--counts 10 40] [--data_dir /tmp/curriculum_seg_bench/prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import machine_info  # benchmarks/machine_info.py (run as a script from the repo root)

_CHILD = """
import json, sys, time
from curriculum_seg import config_loading
from data_pipelines import lits_tfds

config = config_loading.apply_overrides(
    config_loading.load_config_file("configs/synthetic.py"), json.loads(sys.argv[1]))
start = time.perf_counter()
builder = lits_tfds.prepare(config.data, log=lambda s: None)
seconds = time.perf_counter() - start
slices = sum(s.num_examples for s in builder.info.splits.values())
print(json.dumps(dict(seconds=seconds, slices=slices)))
"""


def synthesise(data_dir: str, count: int, seed: int, size: int, slices_range) -> list[dict]:
  """Writes (or reuses) `count` LiTS-sized cases; returns their records."""
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  records = []
  rng = np.random.default_rng(seed)
  nslices = rng.integers(slices_range[0], slices_range[1] + 1, size=count)
  for i in range(count):
    cfg = synthetic.SynthConfig(size=size, slices=int(nslices[i]), compress=False)
    done = os.path.join(data_dir, f"segmentation-{i}.nii")
    if os.path.exists(done) and os.path.exists(os.path.join(data_dir, f"volume-{i}.nii")):
      records.append(dict(case=i, slices=int(nslices[i]), reused=True))
      continue
    start = time.perf_counter()
    synthetic.write_case(data_dir, seed, i, cfg)
    records.append(dict(case=i, slices=int(nslices[i]), seconds=time.perf_counter() - start))
    print(f"  synthesised case {i} ({size}x{size}x{nslices[i]}) in "
          f"{records[-1]['seconds']:.1f} s", flush=True)
  return records


def run_prepare(lits_dir: str, tfds_dir: str, image_size: int) -> dict:
  overrides = [["data.lits_dir", lits_dir], ["data.tfds_dir", tfds_dir],
               ["data.synthetic.enabled", "false"], ["data.image_size", str(image_size)],
               ["data.val_fraction", "0.2"]]
  # os.wait4 returns this child's own resource usage, so its peak RSS is its own.
  with tempfile.TemporaryFile(mode="w+") as log:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(overrides)],
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
      log.seek(0)
      raise RuntimeError(f"prepare failed ({proc.returncode}):\n{log.read()[-3000:]}")
  peak_kb = usage.ru_maxrss
  out = json.loads(stdout.strip().splitlines()[-1])
  out["peak_rss_mb"] = peak_kb / 1024
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--counts", type=int, nargs="+", default=[10, 40])
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--slices", type=int, nargs=2, default=[100, 400])
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default="/tmp/curriculum_seg_bench/prepare")
  parser.add_argument("--out", default="benchmarks/results/prepare.json")
  args = parser.parse_args()

  counts = sorted(args.counts)
  source = os.path.join(args.data_dir, "lits_all")
  print(f"synthesising up to {counts[-1]} cases of {args.size}x{args.size}x"
        f"{args.slices[0]}-{args.slices[1]} into {source}", flush=True)
  synth = synthesise(source, counts[-1], args.seed, args.size, args.slices)
  largest = max(r["slices"] for r in synth[:counts[-1]])
  largest_mb = args.size * args.size * largest * 2 / 2**20

  runs = []
  for count in counts:
    lits_dir = os.path.join(args.data_dir, f"lits_{count}")
    tfds_dir = os.path.join(args.data_dir, f"tfds_{count}")
    shutil.rmtree(lits_dir, ignore_errors=True)
    shutil.rmtree(tfds_dir, ignore_errors=True)
    os.makedirs(lits_dir)
    for i in range(count):  # the first `count` cases, linked rather than copied
      for kind in ("volume", "segmentation"):
        os.symlink(os.path.join(source, f"{kind}-{i}.nii"),
                   os.path.join(lits_dir, f"{kind}-{i}.nii"))
    print(f"prepare {count} cases ...", flush=True)
    r = run_prepare(lits_dir, tfds_dir, args.image_size)
    r.update(cases=count, cases_per_s=count / r["seconds"], slices_per_s=r["slices"] / r["seconds"])
    runs.append(r)
    print(f"  {count} cases, {r['slices']} slices: {r['seconds']:.1f} s, "
          f"{r['cases_per_s']:.3f} cases/s, {r['slices_per_s']:.1f} slices/s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    shutil.rmtree(tfds_dir, ignore_errors=True)

  ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
  print(f"largest volume: {largest} slices = {largest_mb:.0f} MB as int16; peak RSS ratio "
        f"{counts[-1]} vs {counts[0]} cases: {ratio:.2f}")
  machine = machine_info.describe("tensorflow-cpu", "tensorflow-datasets", "jax", "array-record")
  result = dict(benchmark="prepare", machine=machine, args=vars(args), runs=runs,
                largest_volume_slices=largest, largest_volume_int16_mb=largest_mb,
                peak_rss_ratio=ratio)
  machine_info.write_result(args.out, result)


if __name__ == "__main__":
  main()
