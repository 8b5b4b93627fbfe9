"""Benchmarks the input pipelines: whole slices/s and patches/s with 0, 1 and 2 Grain worker
processes, CPU per item and host memory.

Prepares (once, cached under --data_dir) a synthetic dataset of 8 cases of 64 slices stored as
--image_size slices (default 256) with 3 context slices, then times each job in a fresh process
pinned to the given cores (its thread pools and Grain workers inherit the pinning):

  whole_1core      whole-slice host pipeline on 1 core (2 read threads): the per-core figure
  whole_w{0,1,2}   the same on all cores with 0, 1 or 2 worker processes
  patch_w{0,1,2}   128x128 tumour patches (half of them on tumour parts) on all cores
  transfer_1core   a batch of whole slices crossing from a worker process (Grain's shared
                   memory) against a plain copy, per slice

The augmentation warp runs on the device (augment.on_device=True), so these are host figures.
Figures are medians over repeats after warm-up, with CPU seconds per item over the process and
its workers (less sensitive to other load than wall-clock rates), resident memory, the machine
(benchmarks/machine_info.py) and the load average before and after, all in the JSON. --warp
adds the host-side warp alternatives per 256x256x3 slice on 1 core (TF
ImageProjectiveTransformV3 and XLA:CPU).

  python benchmarks/pipeline.py [--data_dir /tmp/curriculum_seg_bench] [--out FILE] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import machine_info  # noqa: E402  pylint: disable=wrong-import-position

GOAL_WHOLE_PER_CORE = 1000.0
GOAL_PATCHES_2_CORES = 2000.0
AUGMENT = dict(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0, scale_range=(0.85, 1.15),
               intensity_shift=0.05, intensity_scale=0.05, on_device=True)
PATCH_STAGE = dict(pipeline="patch", patch_size=128, positive_fraction=0.5,
                   component_sampling="component", patch_jitter=16)


def data_config(data_dir: str, image_size: int = 256):
  """config.data of the benchmark dataset: 8 synthetic cases of 64 slices, 3 context slices."""
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from configs import synthetic  # pylint: disable=import-outside-toplevel
  from data_pipelines import settings  # pylint: disable=import-outside-toplevel
  cfg = synthetic.get_config().data
  suffix = "" if image_size == 256 else f"_{image_size}"
  cfg.lits_dir = os.path.join(data_dir, f"pipeline{suffix}", "lits")
  cfg.tfds_dir = os.path.join(data_dir, f"pipeline{suffix}", "tfds")
  cfg.image_size = image_size
  cfg.context_slices = 3
  cfg.synthetic.update(dict(num_cases=8, size=image_size, slices=64))
  with cfg.unlocked():
    cfg.hu_window = settings.DEFAULT_HU_WINDOW
    cfg.slice_selection = "all"
    cfg.liver_margin = 10
  return cfg


# ---------------------------------------------------------------------------------------------
# Job side (runs pinned, in its own process)
# ---------------------------------------------------------------------------------------------

def _cpu_seconds() -> float:
  """CPU seconds of this process and its live children (Grain's worker processes)."""
  import psutil  # pylint: disable=import-outside-toplevel
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def _rates(step, items_per_step: int, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
  for _ in range(warmup):
    step()
  rates, cpu_per_item = [], []
  for _ in range(repeats):
    c0, t0 = _cpu_seconds(), time.perf_counter()
    for _ in range(steps):
      step()
    t1, c1 = time.perf_counter(), _cpu_seconds()
    rates.append(steps * items_per_step / (t1 - t0))
    cpu_per_item.append((c1 - c0) / (steps * items_per_step))
  return dict(per_s=statistics.median(rates), per_s_repeats=[round(r, 1) for r in rates],
              cpu_ms_per_item=1e3 * statistics.median(cpu_per_item),
              items_per_cpu_s=1.0 / statistics.median(cpu_per_item))


def _memory() -> dict[str, float]:
  import resource  # pylint: disable=import-outside-toplevel
  import psutil  # pylint: disable=import-outside-toplevel
  me = psutil.Process()
  workers = [c for c in me.children(recursive=True)]
  rss = lambda p: p.memory_info().rss / 2**20  # noqa: E731
  return dict(rss_mib=rss(me), workers_rss_mib=sum(rss(c) for c in workers),
              processes=1 + len(workers),
              peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _make(builder, cfg, stage: dict, process_index=0, process_count=1):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from data_pipelines import pipelines  # pylint: disable=import-outside-toplevel
  return pipelines.make_train_pipeline(builder, cfg, ml_collections.ConfigDict(AUGMENT),
                                       ml_collections.ConfigDict(stage), 0, process_index,
                                       process_count)


def _transfer(job: dict[str, Any]) -> dict[str, Any]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=import-outside-toplevel
  n, s = job["batch_size"], job["image_size"]
  batch = dict(image=np.ones((n, s, s, 3), np.int16), label=np.ones((n, s, s), np.uint8))

  def through_shared_memory():
    opened = shared_memory_array.open_from_shm(shared_memory_array.copy_to_shm(batch))
    del opened  # the receiving side unlinks

  def plain_copy():
    return {k: v.copy() for k, v in batch.items()}

  return dict(shared_memory=_rates(through_shared_memory, n, job["warmup"], job["steps"],
                                   job["repeats"]),
              plain_copy=_rates(plain_copy, n, job["warmup"], job["steps"], job["repeats"]))


def _warp(job: dict[str, Any]) -> dict[str, Any]:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from data_pipelines import augment, intensity, settings  # pylint: disable=import-outside-toplevel
  batch, size = job["batch_size"], 256
  rng = np.random.default_rng(0)
  images = rng.integers(-1024, 300, (batch, size, size, 3)).astype(np.int16)
  labels = rng.integers(0, 3, (batch, size, size)).astype(np.uint8)
  spec = augment.AugmentSpec(**AUGMENT)
  params = augment.sample_params(spec, 0, np.arange(batch))
  affine = augment.affine_matrices(params, (size - 1) / 2, (size - 1) / 2)
  if job["kind"] == "warp_tf":
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    m = affine  # TF wants (x, y) = (col, row) maps: swap our (row, col) matrix
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
    finish = jax.jit(augment.make_finish(intensity.window(*settings.DEFAULT_HU_WINDOW), size,
                                         warp=True))
    cpu = jax.local_devices(backend="cpu")[0]
    host_batch = jax.device_put(dict(image=images, label=labels,
                                     mask=np.ones(batch, np.float32), affine=affine,
                                     intensity=augment.intensity_pairs(params)), cpu)
    step = lambda: jax.block_until_ready(finish(host_batch))  # noqa: E731
  return _rates(step, batch, job["warmup"], job["steps"], job["repeats"])


def _job(job: dict[str, Any]) -> dict[str, Any]:
  os.sched_setaffinity(0, set(job["cpus"]))  # before any thread pool or worker exists
  sys.path.insert(0, str(REPO))
  out: dict[str, Any] = dict(kind=job["kind"], cores=len(job["cpus"]))
  if job["kind"] == "transfer":
    return dict(out, **_transfer(job))
  if job["kind"].startswith("warp_"):
    return dict(out, **_warp(job), **_memory())
  from data_pipelines import lits_tfds  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel,unused-import
  from data_pipelines import pipelines  # noqa: F401  (imported before the memory is measured)
  out["rss_before_pipeline_mib"] = _memory()["rss_mib"]  # interpreter + imports
  cfg = data_config(job["data_dir"], job["image_size"])
  with cfg.unlocked():
    cfg.host_threads = job["threads"]
    cfg.worker_count = job["workers"]
  builder = lits_tfds.builder_for(cfg)
  batch = job["batch_size"]
  stage = (dict(PATCH_STAGE, batch_size=batch) if job["kind"] == "patch"
           else dict(pipeline="whole", batch_size=batch))
  host = _make(builder, cfg, stage)
  out.update(workers=job["workers"], threads=job["threads"],
             batch_size=batch, host_info=host.info)
  out.update(_rates(lambda: next(host), batch, job["warmup"], job["steps"], job["repeats"]))
  out.update(_memory())
  host.close()
  return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def _run_job(job: dict[str, Any]) -> dict[str, Any]:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], env=env,
                        capture_output=True, text=True, timeout=1800)
  if proc.returncode != 0:
    raise RuntimeError(f"job {job['name']} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default="/tmp/curriculum_seg_bench")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pipeline.json"))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
  parser.add_argument("--warp", action="store_true", help="also the host-side warp jobs")
  parser.add_argument("--job", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.job:
    print(json.dumps(_job(json.loads(args.job))))
    return 0

  sys.path.insert(0, str(REPO))
  from data_pipelines import lits_tfds  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  builder = lits_tfds.prepare(data_config(args.data_dir, args.image_size), log=print)
  print(f"dataset ready in {time.perf_counter() - t0:.1f} s: {lits_tfds.describe(builder)}")

  cpus = sorted(os.sched_getaffinity(0))
  steps, warmup = (4, 2) if args.quick else (12, 4)
  repeats = 2 if args.quick else args.repeats
  base = dict(data_dir=args.data_dir, image_size=args.image_size, warmup=warmup, steps=steps,
              repeats=repeats)
  jobs = [dict(base, kind="transfer", name="transfer_1core", cpus=cpus[:1], batch_size=32),
          dict(base, kind="whole", workers=0, cpus=cpus[:1], threads=2, batch_size=32,
               name="whole_1core")]
  for kind, batch in (("whole", 32), ("patch", 64)):
    for workers in (0, 1, 2):
      jobs.append(dict(base, kind=kind, workers=workers, cpus=cpus,
                       threads=0, batch_size=batch,  # 0: the cores over the processes
                       name=f"{kind}_w{workers}"))
  if args.warp:
    for kind in ("warp_tf", "warp_xla"):
      jobs.append(dict(base, kind=kind, cpus=cpus[:1], batch_size=16, warmup=1, steps=3,
                       name=f"{kind}_1core"))

  load_before = os.getloadavg()
  results = {}
  for job in jobs:
    result = _run_job(job)
    results[job["name"]] = result
    if job["kind"] == "transfer":
      print(f"{'transfer_1core':22s} per slice: shared memory "
            f"{result['shared_memory']['cpu_ms_per_item']:.3f} CPU-ms, plain copy "
            f"{result['plain_copy']['cpu_ms_per_item']:.3f}")
      continue
    line = (f"{job['name']:22s} {result['per_s']:8.1f} items/s  ({result['cores']} core(s), "
            f"{result['cpu_ms_per_item']:.3f} CPU-ms/item)  RSS {result['rss_mib']:.0f} MiB")
    if result.get("processes", 1) > 1:
      line += f" + workers {result['workers_rss_mib']:.0f} MiB"
    print(line + f"  repeats {result['per_s_repeats']}", flush=True)
  load_after = os.getloadavg()

  r = results
  summary = dict(
      transfer_cpu_ms_per_slice=dict(
          shared_memory=r["transfer_1core"]["shared_memory"]["cpu_ms_per_item"],
          plain_copy=r["transfer_1core"]["plain_copy"]["cpu_ms_per_item"]),
      whole_slices_per_s_1core=r["whole_1core"]["per_s"],
      **{f"{kind}_per_s_{len(cpus)}cores": {name.split("_", 1)[1]: r[name]["per_s"]
                                            for name in r if name.startswith(kind + "_")
                                            and "1core" not in name}
         for kind in ("whole", "patch")},
      **{f"{kind}_cpu_ms_per_item": {name.split("_", 1)[1]: r[name]["cpu_ms_per_item"]
                                     for name in r if name.startswith(kind + "_")}
         for kind in ("whole", "patch")},
      rss_mib={name: dict(process=r[name]["rss_mib"], workers=r[name]["workers_rss_mib"])
               for name in r if "workers_rss_mib" in r[name] and not name.startswith("warp")},
      goal_whole_per_core=GOAL_WHOLE_PER_CORE, goal_patches_2_cores=GOAL_PATCHES_2_CORES)
  if args.warp:
    summary.update(host_warp_ms_per_slice_tf=1e3 / r["warp_tf_1core"]["per_s"],
                   host_warp_ms_per_slice_xla_cpu=1e3 / r["warp_xla_1core"]["per_s"])
  machine = machine_info.describe("numpy", "jax", "jaxlib", "grain", "tensorflow-cpu",
                                  "tensorflow-datasets", "array-record", "protobuf")
  machine.update(cores_available=len(cpus), load_average_before=load_before,
                 load_average_after=load_after)
  report = dict(machine=machine, dataset=dict(
      cases=8, slices_per_case=64, slice=args.image_size, context_slices=3,
      path=str(builder.data_dir), train_slices=builder.info.splits["train"].num_examples),
      augment=AUGMENT, patch_stage=PATCH_STAGE, summary=summary, results=results)
  print("\nsummary")
  print(json.dumps(summary, indent=1))
  print(f"load average before/after: {load_before} / {load_after} on {len(cpus)} cores")
  machine_info.write_result(args.out, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
