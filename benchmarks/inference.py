"""Benchmark of whole-volume inference: seconds to segment and to score one 512x512xN CT volume.

For each N, a LiTS-like case (benchmarks/scoring.py's 512x512xN label map, 0.75 mm pixels, made
into CT: liver ~100 HU, tumours ~40 HU, air elsewhere, noise) is written as a NIfTI file; then in
a fresh subprocess, `Predictor.predict_file` (read, orient, every slice through the network,
resample back, post-process, write the mask) is timed, and so is `metrics.score_case` of a
realistic prediction (scoring.py's: the reference with boundaries moved by about 2 mm, one
lesion missed, one false positive) against the reference read back from the file. Speed does not
depend on the weights, so the network is the config's U-Net with freshly initialised weights,
wrapped in a one-checkpoint run directory (untrained outputs are noise, which would make scoring
their masks a worst case, not a typical one). The subprocess's own peak resident memory, after
predicting (ru_maxrss) and after scoring too (via os.wait4), shows whether memory stays bounded
as N grows (it must not hold all the probabilities: `InferenceOptions.chunk_slices`).

  python benchmarks/inference.py [--config configs/synthetic.py] [--slices 100 300 500]
                                 [--repeats 2] [--flip_tta] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

import machine_info  # benchmarks/machine_info.py (run as a script from the repo root)
import scoring  # benchmarks/scoring.py: the LiTS-like 512x512xN label maps

_CHILD = textwrap.dedent("""
    import json, resource, statistics, sys, time
    import numpy as np
    from curriculum_seg import inference, metrics, trained_run
    from data_pipelines import lits
    args = json.loads(sys.argv[1])
    options = inference.InferenceOptions(batch_size=args["batch_size"],
                                         chunk_slices=args["chunk_slices"],
                                         flip_tta=args["flip_tta"])
    predictor = trained_run.load_predictor(args["workdir"], options=options)
    warm = lits.load_case(args["volume"])
    predictor.predict(warm.image[:, :, :2], warm.spacing)  # compile outside the timing
    del warm
    times, score_times = [], []
    for _ in range(args["repeats"]):
      start = time.perf_counter()
      labels = predictor.predict_file(args["volume"], args["mask"])
      times.append(time.perf_counter() - start)
    rss_predict = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    case = lits.load_case(args["volume"], args["segmentation"])
    realistic = np.load(args["prediction"])  # the reference with perturbed boundaries
    for _ in range(args["repeats"]):
      start = time.perf_counter()
      scores = metrics.score_case(realistic, case.labels, case.spacing)
      score_times.append(time.perf_counter() - start)
    print(json.dumps(dict(seconds_predict=statistics.median(times),
                          seconds_predict_all=times,
                          seconds_score=statistics.median(score_times),
                          peak_rss_predict_mb=rss_predict,
                          tumour_voxels=int((labels == 2).sum()))))
""")


def make_volume(labels: np.ndarray, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  hu = np.full(labels.shape, -1000, np.int16)
  hu[labels == 1] = 100
  hu[labels == 2] = 40
  body = np.zeros(labels.shape[:2], bool)
  yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
  body[((yy - 256) / 220.0) ** 2 + ((xx - 256) / 170.0) ** 2 < 1] = True
  hu[body[:, :, None] & (labels == 0)] = 30
  for z in range(0, labels.shape[2], 64):  # noise a chunk at a time
    chunk = hu[:, :, z:z + 64]
    chunk += rng.normal(0, 12, chunk.shape).astype(np.int16)
  return hu


def make_run(workdir: str, config_path: str, overrides: list[str]) -> dict:
  """A run directory holding one checkpoint of freshly initialised weights of the config's model."""
  import jax  # pylint: disable=g-import-not-at-top
  from curriculum_seg import (checkpoints, config_loading, optim, rundir,  # pylint: disable=g-import-not-at-top
                              sharding, train_step)
  from curriculum_seg.models import build_model  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config_file(config_path)
  config = config_loading.apply_overrides(config, [o.split("=", 1) for o in overrides])
  name = config.curriculum[-1]
  stage = config.stages[name]
  model = build_model(config.model, int(config.data.context_slices))
  tx, _ = optim.build_optimizer(stage.optimizer, stage.schedule, int(stage.steps))
  size = int(config.data.image_size)
  mesh = sharding.make_mesh()
  state = train_step.create_train_state(jax.random.PRNGKey(0), model, tx,
                                        (1, size, size, int(config.data.context_slices)), mesh)
  path = epath.Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  rundir.check_or_save_config(path, config)
  ckpts = checkpoints.StageCheckpoints(path / "checkpoints", name)
  ckpts.save(1, state, dict(stage=name, step=1, completed=True))
  ckpts.close()
  params = sum(x.size for x in jax.tree.leaves(state.params))
  return dict(model=config.model.to_dict(), image_size=size,
              context_slices=int(config.data.context_slices), parameters=int(params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/synthetic.py")
  parser.add_argument("--override", nargs="*", default=[],
                      help="config overrides key=value, e.g. data.image_size=256")
  parser.add_argument("--slices", type=int, nargs="+", default=[100, 300, 500])
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--chunk_slices", type=int, default=64)
  parser.add_argument("--flip_tta", action="store_true")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="benchmarks/results/inference.json")
  args = parser.parse_args()

  info = machine_info.describe("jax", "jaxlib", "numpy", "scipy", "nibabel")
  try:
    import jax  # pylint: disable=g-import-not-at-top
    info["devices"] = [str(d) for d in jax.devices()]
  except Exception:  # pylint: disable=broad-except
    pass
  print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}, devices {info.get('devices')}")
  runs = []
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  from data_pipelines import synthetic  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
    model_info = make_run(os.path.join(tmp, "run"), args.config, args.override)
    print(f"model {model_info['model']['depth']} levels, width {model_info['model']['base_width']}"
          f", {model_info['parameters']:,} parameters, slices resampled to "
          f"{model_info['image_size']}^2 x {model_info['context_slices']} channels")
    for n in args.slices:
      pred, ref, spacing = scoring.make_case(n, args.seed)
      prediction = os.path.join(tmp, f"prediction-{n}.npy")
      np.save(prediction, pred)
      del pred
      hu = make_volume(ref, args.seed)
      volume = os.path.join(tmp, f"volume-{n}.nii")
      segmentation = os.path.join(tmp, f"segmentation-{n}.nii")
      nib.save(synthetic.to_nifti(hu, spacing, ("L", "P", "S"), "int16"), volume)
      nib.save(synthetic.to_nifti(ref, spacing, ("L", "P", "S"), "uint8", is_label=True),
               segmentation)
      del hu, ref
      child = dict(workdir=os.path.join(tmp, "run"), volume=volume, segmentation=segmentation,
                   prediction=prediction,
                   mask=os.path.join(tmp, f"mask-{n}.nii.gz"), repeats=args.repeats,
                   batch_size=args.batch_size, chunk_slices=args.chunk_slices,
                   flip_tta=args.flip_tta)
      start = time.perf_counter()
      out_path, err_path = os.path.join(tmp, "child.out"), os.path.join(tmp, "child.err")
      with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(child)], stdout=out_f,
                                stderr=err_f, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        # os.wait4 returns this child's own resource usage: its own peak RSS.
        _, status, usage = os.wait4(proc.pid, 0)
      out, err = open(out_path).read(), open(err_path).read()
      if status != 0:
        raise SystemExit(f"child for N={n} failed:\n{err[-3000:]}")
      result = json.loads(out.strip().splitlines()[-1])
      run = dict(slices=n, volume_mb_int16=512 * 512 * n * 2 / 2 ** 20, **result,
                 peak_rss_mb=usage.ru_maxrss / 1024,
                 slices_per_s=n / result["seconds_predict"],
                 wall_s=time.perf_counter() - start)
      runs.append(run)
      print(f"512x512x{n}: predict_file {run['seconds_predict']:.1f} s "
            f"({run['slices_per_s']:.1f} slices/s), score_case {run['seconds_score']:.2f} s "
            f"(median of {args.repeats}); peak RSS {run['peak_rss_predict_mb']:.0f} MB after "
            f"predicting, {run['peak_rss_mb']:.0f} MB after scoring too", flush=True)
      for p in (volume, segmentation, prediction, child["mask"]):
        os.remove(p)
  result = dict(benchmark="inference", machine=info, args=vars(args), model=model_info,
                runs=runs)
  machine_info.write_result(args.out, result)


if __name__ == "__main__":
  main()
