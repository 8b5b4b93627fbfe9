"""Benchmark of `prepare` on LiTS-sized synthetic cases: slices/s with 1..N worker processes,
CPU-ms per slice by stage, peak memory.

Cases are 512x512 with 100-400 slices (uniform per case), stored as uncompressed .nii like the
LiTS downloads, synthesised once into --data_dir and reused. Each prepare runs in a fresh
subprocess (--repeats times per worker count; medians reported): its wall time, its CPU time
and that of the workers it reaped (os.wait4), its own peak resident memory, and the CPU seconds
the cases' stages took (read and decompress, canonicalise, resample, components, histograms,
context stacks, encode, write; "other" is the rest: the folder check, imports, start-up). The
breakdown of the build before the parallel one (docs/prepare/breakdown_before.json, measured
with docs/prepare/legacy_breakdown.py at that commit) is printed beside it.

  python benchmarks/prepare.py [--counts 10] [--workers 1 2] [--repeats 1]
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

def main():
  config = config_loading.apply_overrides(
      config_loading.load_config_file("configs/synthetic.py"), json.loads(sys.argv[1]))
  start = time.perf_counter()
  builder = lits_tfds.prepare(config.data, log=lambda s: None, workers=int(sys.argv[2]))
  seconds = time.perf_counter() - start
  slices = sum(s.num_examples for s in builder.info.splits.values())
  print(json.dumps(dict(seconds=seconds, slices=slices, stages=builder.build_seconds)))

if __name__ == "__main__":
  main()
"""
STAGES = ("read", "canonicalise", "resample", "components", "histograms", "context", "encode",
          "write")
BEFORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                      "prepare", "breakdown_before.json")


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


def run_prepare(lits_dir: str, tfds_dir: str, image_size: int, workers: int) -> dict:
  overrides = [["data.lits_dir", lits_dir], ["data.tfds_dir", tfds_dir],
               ["data.synthetic.enabled", "false"], ["data.image_size", str(image_size)],
               ["data.spacing_mm", "None"], ["data.val_fraction", "0.2"]]
  # os.wait4 gives this child's own peak RSS and the CPU time of it and the workers it reaped.
  load = os.getloadavg()[0]
  with tempfile.TemporaryFile(mode="w+") as log:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(overrides), str(workers)],
                            stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
      log.seek(0)
      raise RuntimeError(f"prepare failed ({proc.returncode}):\n{log.read()[-3000:]}")
  out = json.loads(stdout.strip().splitlines()[-1])
  out.update(peak_rss_mb=usage.ru_maxrss / 1024, cpu_seconds=usage.ru_utime + usage.ru_stime,
             workers=workers, load_average_before=load, load_average_after=os.getloadavg()[0])
  return out


def breakdown(run: dict) -> dict[str, float]:
  """CPU-ms per slice by stage of one run; "other" is the rest of its CPU time."""
  ms = {k: 1000 * run["stages"].get(k, 0.0) / run["slices"] for k in STAGES}
  ms["other"] = 1000 * run["cpu_seconds"] / run["slices"] - sum(ms.values())
  ms["total"] = 1000 * run["cpu_seconds"] / run["slices"]
  return ms


def print_breakdown(after: dict[str, float]) -> dict:
  """Prints the stage table, before (when its file is there) and after."""
  before = {}
  if os.path.exists(BEFORE):
    with open(BEFORE) as f:
      saved = json.load(f)
    names = {"read": ["read+decompress"], "canonicalise": ["canonicalise"],
             "resample": ["resample"], "components": ["components"],
             "histograms": ["histograms"], "context": ["context stack"],
             "encode": ["encode (TFDS features)", "serialize"],
             "write": ["TFDS buffer/spill", "TFDS sort + ArrayRecord write"]}
    before = {k: sum(saved["stages"][n]["cpu_ms_per_slice"] for n in v) for k, v in names.items()}
    before["total"] = saved["cpu_ms_per_slice"]
  print(f"  {'CPU-ms per slice':18s} {'before':>8s} {'after':>8s}")
  for k in (*STAGES, "other", "total"):
    print(f"  {k:18s} {before.get(k, float('nan')):8.2f} {after[k]:8.2f}")
  return dict(before=before, after=after)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--counts", type=int, nargs="+", default=[10])
  parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--repeats", type=int, default=1)
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

  runs, summary = [], []
  for count in counts:
    lits_dir = os.path.join(args.data_dir, f"lits_{count}")
    shutil.rmtree(lits_dir, ignore_errors=True)
    os.makedirs(lits_dir)
    for i in range(count):  # the first `count` cases, linked rather than copied
      for kind in ("volume", "segmentation"):
        os.symlink(os.path.join(source, f"{kind}-{i}.nii"),
                   os.path.join(lits_dir, f"{kind}-{i}.nii"))
    for workers in args.workers:
      group = []
      for repeat in range(args.repeats):
        tfds_dir = os.path.join(args.data_dir, f"tfds_{count}_{workers}_{repeat}")
        shutil.rmtree(tfds_dir, ignore_errors=True)
        print(f"prepare {count} cases, {workers} worker(s), run {repeat + 1} ...", flush=True)
        r = run_prepare(lits_dir, tfds_dir, args.image_size, workers)
        r.update(cases=count, slices_per_s=r["slices"] / r["seconds"], repeat=repeat)
        print(f"  {r['slices']} slices: {r['seconds']:.1f} s, {r['slices_per_s']:.1f} slices/s, "
              f"{1000 * r['cpu_seconds'] / r['slices']:.1f} CPU-ms per slice, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB (load average {r['load_average_before']:.1f} before, "
              f"{r['load_average_after']:.1f} after)", flush=True)
        group.append(r)
        runs.append(r)
        shutil.rmtree(tfds_dir, ignore_errors=True)
      summary.append(dict(
          cases=count, workers=workers,
          median_slices_per_s=float(np.median([r["slices_per_s"] for r in group])),
          median_cpu_ms_per_slice=float(np.median(
              [1000 * r["cpu_seconds"] / r["slices"] for r in group]))))
  for row in summary:
    base = next(s for s in summary if s["cases"] == row["cases"] and
                s["workers"] == min(args.workers))
    row["speedup"] = row["median_slices_per_s"] / base["median_slices_per_s"]
    print(f"{row['cases']} cases, {row['workers']} worker(s): {row['median_slices_per_s']:.1f} "
          f"slices/s (median of {args.repeats}), {row['median_cpu_ms_per_slice']:.1f} CPU-ms per "
          f"slice, {row['speedup']:.2f}x {min(args.workers)} worker(s)")
  print("where a slice's CPU time goes (the last run with the fewest workers):")
  fewest = [r for r in runs if r["workers"] == min(args.workers)][-1]
  stages = print_breakdown(breakdown(fewest))
  machine = machine_info.describe("tensorflow-cpu", "tensorflow-datasets", "jax", "array-record")
  result = dict(benchmark="prepare", machine=machine, args=vars(args), runs=runs,
                summary=summary, breakdown=stages, largest_volume_slices=largest,
                largest_volume_int16_mb=largest_mb)
  machine_info.write_result(args.out, result)


if __name__ == "__main__":
  main()
