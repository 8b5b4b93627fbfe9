"""Benchmark of a stage switch on the embedded default, apart from compilation.

A switch is: save the finished stage's checkpoint (latest and best), restore the chosen one for
the next stage, and swap the pipeline (close the old feed, build the next stage's pipeline and
device feed, take its first batch). Every piece is run once to compile and warm caches, then
timed over repeats; medians are reported. Goal: under 5 s on configs/synthetic.py.

  python benchmarks/stage_switch.py [--repeats 5] [--out benchmarks/results/stage_switch.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax

import machine_info  # benchmarks/machine_info.py (run as a script from the repo root)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="benchmarks/results/stage_switch.json")
  args = parser.parse_args()

  from curriculum_seg import checkpoints, config_loading, device_feed, stages, train_step
  from data_pipelines import lits_tfds, pipelines

  config = config_loading.load_config_file(args.config)
  workdir = tempfile.mkdtemp(prefix="stage_switch_")
  controller = stages.Controller(config, workdir, log=lambda s: None)
  controller.builder = lits_tfds.prepare(config.data, log=print)
  first, second = config.curriculum[0], config.curriculum[1]
  s1, s2 = config.stages[first], config.stages[second]
  tx1 = controller._tx(s1)
  state = train_step.create_train_state(jax.random.PRNGKey(0), controller.model, tx1,
                                        controller._input_shape(s1), controller.mesh)
  abstract = controller._abstract_state(s1, tx1)

  def feed_for(stage, seed):
    host = pipelines.make_train_pipeline(controller.builder, config.data, config.augment, stage,
                                         seed, 0, 1, start=0)
    return device_feed.DeviceFeed(host, controller.mesh)

  old_feed = feed_for(s1, 0)
  jax.block_until_ready(next(old_feed))
  times = {"save": [], "restore": [], "pipeline_swap": [], "total": []}
  for repeat in range(args.repeats + 1):  # the first round compiles and warms caches
    store = checkpoints.StageCheckpoints(os.path.join(workdir, "checkpoints"), f"{first}{repeat}")
    t0 = time.perf_counter()
    store.save(s1.steps, state, dict(step=int(s1.steps), completed=True), best=True)
    t1 = time.perf_counter()
    restored, _ = store.restore(abstract, checkpoints.BEST)
    jax.block_until_ready(restored)
    t2 = time.perf_counter()
    old_feed.close()
    new_feed = feed_for(s2, repeat + 1)
    jax.block_until_ready(next(new_feed))
    t3 = time.perf_counter()
    store.close()
    old_feed = new_feed
    if repeat > 0:
      for key, value in (("save", t1 - t0), ("restore", t2 - t1), ("pipeline_swap", t3 - t2),
                         ("total", t3 - t0)):
        times[key].append(value)
  old_feed.close()

  medians = {k: statistics.median(v) for k, v in times.items()}
  size_mb = checkpoints.checkpoint_bytes(workdir) / 2**20 / (args.repeats + 1)
  print(f"stage switch {first} -> {second} on {args.config} (median of {args.repeats}, "
        f"compilation excluded):")
  for key in ("save", "restore", "pipeline_swap", "total"):
    print(f"  {key:<14} {medians[key]:.3f} s")
  print(f"  checkpoint size (latest + best): {size_mb:.1f} MB; goal: total under 5 s -> "
        f"{'met' if medians['total'] < 5 else 'missed'}")
  machine = dict(machine_info.describe("jax", "orbax-checkpoint"),
                 device=str(jax.devices()[0].device_kind), devices=jax.device_count())
  result = dict(benchmark="stage_switch", machine=machine, config=args.config,
                switch=f"{first}->{second}", repeats=args.repeats, medians_s=medians,
                all_s=times, checkpoint_mb=size_mb)
  machine_info.write_result(args.out, result)


if __name__ == "__main__":
  main()
