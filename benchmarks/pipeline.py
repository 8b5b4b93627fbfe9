"""Benchmarks the input pipelines: whole slices/s per core, patches/s, the device half, memory.

Prepares (once, cached under --data_dir) a synthetic dataset of 8 cases of 256x256x64 stored as
256x256 slices with 3 context slices, then measures, each in a fresh worker process pinned to
the given cores (so TensorFlow, ArrayRecord and XLA thread pools all stay on them):

  whole_host_1core   whole-slice host pipeline (read, decode, batch, augmentation parameters)
                     on 1 core: the per-core figure
  whole_host_all     the same on all cores of this machine
  patch_host_all     128x128 tumour-patch host pipeline on all cores
  whole_feed_all / patch_feed_all
                     host pipeline + DeviceFeed with the augmentation warp on JAX's default
                     device (the CPU here when there is no accelerator: then it competes with
                     the host pipeline for the same cores)
  warp_tf_1core / warp_xla_1core
                     the host-side warp alternatives (TF ImageProjectiveTransformV3, XLA:CPU)
                     per 256x256x3 slice, the measurement behind running the warp on the device

Figures are medians over repeats after warm-up; each worker also reports CPU seconds used per
item (less sensitive to other load on a shared machine than wall-clock rates) and its resident
memory (RSS) at the end and at peak.

  python benchmarks/pipeline.py [--data_dir /tmp/curriculum_seg_bench] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
GOAL_WHOLE_PER_CORE = 1000.0
GOAL_PATCHES_2_CORES = 2000.0


def data_config(data_dir: str):
  """config.data of the benchmark dataset: 8 synthetic cases, 256x256 slices, 3 context."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  cfg = synthetic.get_config().data
  cfg.lits_dir = os.path.join(data_dir, "pipeline", "lits")
  cfg.tfds_dir = os.path.join(data_dir, "pipeline", "tfds")
  cfg.image_size = 256
  cfg.context_slices = 3
  cfg.synthetic.update(dict(num_cases=8, size=256, slices=64))
  with cfg.unlocked():
    cfg.hu_window = (-60.0, 140.0)
    cfg.slice_selection = "all"
    cfg.liver_margin = 10
  return cfg


AUGMENT = dict(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0, scale_range=(0.85, 1.15),
               intensity_shift=0.05, intensity_scale=0.05, on_device=True)


# ---------------------------------------------------------------------------------------------
# Worker side (runs pinned, in its own process)
# ---------------------------------------------------------------------------------------------

def _rates(step, items_per_step: int, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
  for _ in range(warmup):
    step()
  rates, cpu_per_item = [], []
  for _ in range(repeats):
    c0, t0 = os.times(), time.perf_counter()
    for _ in range(steps):
      step()
    t1, c1 = time.perf_counter(), os.times()
    rates.append(steps * items_per_step / (t1 - t0))
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    cpu_per_item.append(cpu / (steps * items_per_step))
  return dict(per_s=statistics.median(rates), per_s_repeats=[round(r, 1) for r in rates],
              cpu_ms_per_item=1e3 * statistics.median(cpu_per_item),
              items_per_cpu_s=1.0 / statistics.median(cpu_per_item))


def _memory() -> dict[str, float]:
  import resource  # pylint: disable=import-outside-toplevel
  import psutil  # pylint: disable=import-outside-toplevel
  return dict(rss_mib=psutil.Process().memory_info().rss / 2**20,
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _worker(job: dict[str, Any]) -> dict[str, Any]:
  os.sched_setaffinity(0, set(job["cpus"]))  # before any thread pool exists
  sys.path.insert(0, str(REPO))
  import ml_collections  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  kind, batch = job["kind"], job["batch_size"]
  out: dict[str, Any] = dict(kind=kind, cores=len(job["cpus"]), batch_size=batch)
  if kind.startswith("warp_"):
    size = 256
    rng = np.random.default_rng(0)
    images = rng.integers(-1024, 300, (batch, size, size, 3)).astype(np.int16)
    labels = rng.integers(0, 3, (batch, size, size)).astype(np.uint8)
    from data_pipelines import augment  # pylint: disable=import-outside-toplevel
    spec = augment.AugmentSpec(**AUGMENT)
    params = augment.sample_params(spec, 0, np.arange(batch))
    affine = augment.affine_matrices(params, (size - 1) / 2, (size - 1) / 2)
    if kind == "warp_tf":
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.threading.set_intra_op_parallelism_threads(1)
      tf.config.threading.set_inter_op_parallelism_threads(1)
      # TF wants (x, y) = (col, row) maps: swap our (row, col) matrix.
      m = affine
      tf_maps = np.stack([m[:, 1, 1], m[:, 1, 0], m[:, 1, 2], m[:, 0, 1], m[:, 0, 0], m[:, 0, 2],
                          np.zeros(batch), np.zeros(batch)], -1).astype(np.float32)

      @tf.function
      def step_fn(im, lb, maps):
        x = tf.clip_by_value((tf.cast(im, tf.float32) + 60.0) / 200.0, 0.0, 1.0)
        a = tf.raw_ops.ImageProjectiveTransformV3(
            images=x, transforms=maps, output_shape=[size, size], fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")
        b = tf.raw_ops.ImageProjectiveTransformV3(
            images=lb[..., None], transforms=maps, output_shape=[size, size], fill_value=0.0,
            interpolation="NEAREST", fill_mode="CONSTANT")
        return a, b

      args = (tf.constant(images), tf.constant(labels), tf.constant(tf_maps))
      step = lambda: [t.numpy() for t in step_fn(*args)]  # noqa: E731
    else:
      import jax  # pylint: disable=import-outside-toplevel
      finish = jax.jit(augment.make_finish((-60.0, 140.0), size, warp=True))
      cpu = jax.local_devices(backend="cpu")[0]
      host_batch = jax.device_put(dict(image=images, label=labels,
                                       mask=np.ones(batch, np.float32), affine=affine,
                                       intensity=augment.intensity_pairs(params)), cpu)
      step = lambda: jax.block_until_ready(finish(host_batch))  # noqa: E731
    out.update(_rates(step, batch, job["warmup"], job["steps"], job["repeats"]))
    out.update(_memory())
    return out

  import jax  # noqa: F401 pylint: disable=import-outside-toplevel,unused-import
  from data_pipelines import lits_tfds, pipelines  # pylint: disable=import-outside-toplevel
  out["rss_before_pipeline_mib"] = _memory()["rss_mib"]  # interpreter + TF/TFDS/JAX imports
  cfg = data_config(job["data_dir"])
  with cfg.unlocked():
    cfg.host_threads = job["threads"]
  builder = lits_tfds.builder_for(cfg)
  pipeline = "patch" if kind.startswith("patch") else "whole"
  stage = ml_collections.ConfigDict(dict(
      pipeline=pipeline, batch_size=batch, patch_size=128, positive_fraction=0.5,
      component_sampling="component", patch_jitter=16))
  host = pipelines.make_train_pipeline(builder, cfg, ml_collections.ConfigDict(AUGMENT), stage,
                                       0, 0, 1)
  out.update(threads=job["threads"], host_info=host.info)
  if kind.endswith("_feed"):
    import jax  # pylint: disable=import-outside-toplevel
    from curriculum_seg import sharding  # pylint: disable=import-outside-toplevel
    from curriculum_seg.device_feed import DeviceFeed  # pylint: disable=import-outside-toplevel
    feed = DeviceFeed(host, sharding.make_mesh(1), buffer_size=2)
    out["device"] = str(jax.devices()[0])
    step = lambda: jax.block_until_ready(next(feed))  # noqa: E731
  else:
    step = lambda: next(host)  # noqa: E731
  out.update(_rates(step, batch, job["warmup"], job["steps"], job["repeats"]))
  out.update(_memory())
  return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  out = dict(python=platform.python_version())
  for name in ("numpy", "jax", "jaxlib", "tensorflow-cpu", "tensorflow", "tensorflow-datasets",
               "array-record"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _run_worker(job: dict[str, Any]) -> dict[str, Any]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                        capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    raise RuntimeError(f"worker {job['kind']} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default="/tmp/curriculum_seg_bench")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(_worker(json.loads(args.worker))))
    return 0

  sys.path.insert(0, str(REPO))
  from data_pipelines import lits_tfds  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  builder = lits_tfds.prepare(data_config(args.data_dir), log=print)
  print(f"dataset ready in {time.perf_counter() - t0:.1f} s: {lits_tfds.describe(builder)}")

  cpus = sorted(os.sched_getaffinity(0))
  all_threads = max(2, len(cpus))
  steps, warmup = (4, 2) if args.quick else (12, 4)
  repeats = 2 if args.quick else args.repeats
  base = dict(data_dir=args.data_dir, warmup=warmup, steps=steps, repeats=repeats)
  jobs = [
      dict(base, kind="whole_host", cpus=cpus[:1], threads=2, batch_size=32, name="whole_host_1core"),
      dict(base, kind="whole_host", cpus=cpus, threads=all_threads, batch_size=32,
           name="whole_host_all"),
      dict(base, kind="patch_host", cpus=cpus, threads=all_threads, batch_size=64,
           name="patch_host_all"),
      dict(base, kind="whole_feed", cpus=cpus, threads=all_threads, batch_size=32,
           name="whole_feed_all"),
      dict(base, kind="patch_feed", cpus=cpus, threads=all_threads, batch_size=64,
           name="patch_feed_all"),
      dict(base, kind="warp_tf", cpus=cpus[:1], batch_size=16, warmup=1, steps=3,
           name="warp_tf_1core"),
      dict(base, kind="warp_xla", cpus=cpus[:1], batch_size=16, warmup=1, steps=3,
           name="warp_xla_1core"),
  ]
  load_before = os.getloadavg()
  results = {}
  for job in jobs:
    result = _run_worker(job)
    results[job["name"]] = result
    print(f"{job['name']:18s} {result['per_s']:9.1f} items/s  ({result['cores']} core(s), "
          f"{result['cpu_ms_per_item']:.3f} CPU ms/item = {result['items_per_cpu_s']:.0f} "
          f"items per CPU-second)  RSS {result['rss_mib']:.0f} MiB (peak "
          f"{result['peak_rss_mib']:.0f})  repeats {result['per_s_repeats']}")
  load_after = os.getloadavg()

  summary = dict(
      whole_slices_per_s_per_core=results["whole_host_1core"]["per_s"],
      whole_slices_per_s_all_cores=results["whole_host_all"]["per_s"],
      patches_per_s_all_cores=results["patch_host_all"]["per_s"],
      whole_slices_per_s_with_warp_on_this_device=results["whole_feed_all"]["per_s"],
      patches_per_s_with_warp_on_this_device=results["patch_feed_all"]["per_s"],
      host_warp_ms_per_slice_tf=1e3 / results["warp_tf_1core"]["per_s"],
      host_warp_ms_per_slice_xla_cpu=1e3 / results["warp_xla_1core"]["per_s"],
      host_rss_mib_whole=results["whole_host_all"]["rss_mib"],
      host_rss_mib_patch=results["patch_host_all"]["rss_mib"],
      host_rss_mib_held_by_whole_pipeline=(results["whole_host_all"]["rss_mib"]
                                           - results["whole_host_all"]["rss_before_pipeline_mib"]),
      host_rss_mib_held_by_patch_pipeline=(results["patch_host_all"]["rss_mib"]
                                           - results["patch_host_all"]["rss_before_pipeline_mib"]),
      goal_whole_per_core=GOAL_WHOLE_PER_CORE,
      goal_patches_2_cores=GOAL_PATCHES_2_CORES,
  )
  machine = dict(cpu_model=_cpu_model(), cores=os.cpu_count(), cores_available=len(cpus),
                 platform=platform.platform(), load_average_before=load_before,
                 load_average_after=load_after, versions=_versions())
  report = dict(machine=machine, dataset=dict(
      cases=8, shape="256x256x64", slice=256, context_slices=3, path=str(builder.data_dir),
      train_slices=builder.info.splits["train"].num_examples), augment=AUGMENT,
      summary=summary, results=results)
  print("\nsummary")
  for key, value in summary.items():
    print(f"  {key:45s} {value:10.1f}")
  print(f"  load average before/after: {load_before} / {load_after} on {len(cpus)} cores")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
