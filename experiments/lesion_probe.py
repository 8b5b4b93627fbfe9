"""Which reference lesions a trained run misses, and whether a lower tumour threshold finds them.

For a run's chosen checkpoint (or `--stage`), segments every case of a split (as `evaluate`
does: same inference options and post-processing, tumour-only models scored over the reference
liver) and reports

  per reference lesion   case, voxels, diameter_mm (as `evaluate` measures it), contrast_hu (its
                         mean HU minus the mean HU of the liver within 2 voxels of it: negative
                         hypo-dense, positive hyper-dense), the largest and mean tumour
                         probability inside it, and its IoU at the argmax prediction
  per tumour threshold   tumour Dice (global, per case), lesion precision, and recall of the
                         lesions of 10 mm and more at IoU > 0.5 and at any overlap, when tumour
                         is every voxel with probability above the threshold (`argmax`: the
                         network's argmax, what `evaluate` reports)

A lesion whose largest tumour probability is near 0 cannot be found by any threshold: the
network does not see it. Writes OUT (JSON) with the machine and the command. Run from the
repository root:

  .venv/bin/python experiments/lesion_probe.py --workdir runs/demo --out /tmp/probe.json
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from curriculum_seg import machine as machine_info  # noqa: E402

THRESHOLDS = ("argmax", 0.5, 0.3, 0.2, 0.1, 0.05)
LARGE_MM = 10.0
SHELL_VOXELS = 2


class ProbeError(RuntimeError):
  """A run this probe cannot score (the message says why)."""


def lesion_rows(tumour_prob: np.ndarray, ref_labels: np.ndarray, image: np.ndarray,
                case: str) -> list[dict]:
  """Per 6-connected reference tumour component (label 2), in `metrics.detect_lesions`' order:
  voxels, contrast_hu (mean HU minus the mean HU of the liver voxels, label 1, within
  SHELL_VOXELS of it; nan when none), max_prob and mean_prob of `tumour_prob` inside it."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from curriculum_seg import metrics  # pylint: disable=g-import-not-at-top
  if not tumour_prob.shape == ref_labels.shape == image.shape:
    raise ValueError(f"{case}: probability {tumour_prob.shape}, label {ref_labels.shape} and "
                     f"image {image.shape} shapes differ")
  comps, n = ndimage.label(ref_labels == 2, structure=metrics.LESION_STRUCTURE)
  liver = ref_labels == 1
  rows = []
  for k, box in enumerate(ndimage.find_objects(comps), start=1):
    grown = tuple(slice(max(0, s.start - SHELL_VOXELS), s.stop + SHELL_VOXELS) for s in box)
    lesion = comps[grown] == k
    shell = ndimage.binary_dilation(lesion, iterations=SHELL_VOXELS) & liver[grown]
    hu = image[grown].astype(np.float64)
    prob = tumour_prob[grown][lesion]
    rows.append(dict(case=case, voxels=int(lesion.sum()),
                     contrast_hu=float(hu[lesion].mean() - hu[shell].mean()) if shell.any()
                     else float("nan"),
                     max_prob=float(prob.max()), mean_prob=float(prob.mean())))
  return rows


def thresholded(argmax_labels: np.ndarray, tumour_prob: np.ndarray, threshold,
                predicts_liver: bool) -> np.ndarray:
  """LiTS labels with tumour where tumour_prob > threshold ('argmax': the labels as they are);
  voxels that lose their tumour label become liver (models that predict one) or background."""
  if threshold == "argmax":
    return argmax_labels.copy()
  labels = argmax_labels.copy()
  labels[labels == 2] = 1 if predicts_liver else 0
  labels[tumour_prob > float(threshold)] = 2
  return labels


def sweep_summary(per_threshold: dict, large_mm: float = LARGE_MM) -> list[dict]:
  """Per threshold: global and per-case tumour Dice, lesion precision (IoU > 0.5) over all
  lesions, and recall of the lesions of `large_mm` and more at IoU > 0.5 and at any overlap."""
  from curriculum_seg import metrics  # pylint: disable=g-import-not-at-top
  out = []
  for threshold, cases in per_threshold.items():
    agg = metrics.aggregate(cases)
    large = [lesion for c in cases for lesion in c["detection"]["reference_lesions"]
             if lesion["diameter_mm"] >= large_mm]
    out.append(dict(threshold=threshold, dice_global=agg["tumour"]["dice_global"],
                    dice_per_case=agg["tumour"]["dice_per_case"],
                    precision_iou=agg["detection"]["iou"]["precision"],
                    large=len(large), large_found_iou=sum(r["detected_iou"] for r in large),
                    large_found_any=sum(r["detected_any"] for r in large)))
  return out


def probe(workdir: str, split: str = "validation", stage: Optional[str] = None,
          thresholds: Sequence = THRESHOLDS, flip_tta: bool = False, log=print) -> dict:
  # pylint: disable-next=g-import-not-at-top
  from curriculum_seg import evaluate, inference, metrics, tasks, trained_run
  from data_pipelines import lits  # pylint: disable=g-import-not-at-top
  run = trained_run.open_run(workdir)
  config = run.config
  if config.get("cascade", None):
    raise ProbeError(f"{workdir}: a cascade run chains two networks; this probe reads one "
                     "network's tumour probabilities")
  options = inference.InferenceOptions(flip_tta=flip_tta)
  predictor = run.predictor(stage=stage, options=options)
  network = predictor.network
  if network.task == "liver":
    raise ProbeError(f"{workdir}: stage {network.stage!r} segments the liver, not tumours")
  to_lits = tasks.lits_labels(network.task)
  lesions, per_threshold = [], {t: [] for t in thresholds}
  for n, (volume, segmentation) in evaluate.split_cases(config, split).items():
    case = lits.load_case(volume, segmentation)
    argmax = np.zeros(case.image.shape, np.uint8)
    tumour_prob = np.zeros(case.image.shape, np.float32)
    for z0, z1, probs in network.volume_probabilities(case.image, options, spacing=case.spacing):
      argmax[:, :, z0:z1] = np.moveaxis(to_lits[probs.argmax(-1)], 0, 2)
      tumour_prob[:, :, z0:z1] = np.moveaxis(probs[..., -1], 0, 2)
    rows = lesion_rows(tumour_prob, case.labels, case.image, f"case-{n}")
    for t in thresholds:
      labels = inference.postprocess(
          thresholded(argmax, tumour_prob, t, predictor.predicts_liver), case.spacing,
          predicts_liver=predictor.predicts_liver, options=options)
      if not predictor.predicts_liver:  # as evaluate: tumour over the reference liver
        labels = np.where(labels == 2, 2, np.where(case.labels >= 1, 1, 0)).astype(np.uint8)
      scores = metrics.json_safe(metrics.score_case(labels, case.labels, case.spacing,
                                                    case_id=f"case-{n}"))
      per_threshold[t].append(scores)
      if t == "argmax":
        for row, ref in zip(rows, scores["detection"]["reference_lesions"]):
          row.update(diameter_mm=ref["diameter_mm"], iou=ref["iou"])
    lesions += rows
    log(f"case-{n}: {len(rows)} lesions")
  return dict(workdir=os.path.abspath(workdir), split=split,
              checkpoint=predictor.describe(), flip_tta=flip_tta, lesions=lesions,
              thresholds=sweep_summary(per_threshold))


def report(result: dict) -> str:
  lines = [f"{result['checkpoint']} on the {result['split']} split"
           + (" (flip TTA)" if result["flip_tta"] else ""), "",
           "| case | voxels | diameter mm | contrast HU | max p | mean p | IoU (argmax) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in sorted(result["lesions"], key=lambda r: -r.get("diameter_mm", 0.0)):
    lines.append(f"| {r['case']} | {r['voxels']} | {r.get('diameter_mm', float('nan')):.1f} | "
                 f"{r['contrast_hu']:+.0f} | {r['max_prob']:.3f} | {r['mean_prob']:.3f} | "
                 f"{r.get('iou', float('nan')):.2f} |")
  lines += ["", f"| threshold | Dice global | Dice per case | precision (IoU > 0.5) | "
                f">= {LARGE_MM:g} mm at IoU > 0.5 | >= {LARGE_MM:g} mm any overlap |",
            "| --- | --- | --- | --- | --- | --- |"]
  for t in result["thresholds"]:
    lines.append(f"| {t['threshold']} | {t['dice_global']:.3f} | {t['dice_per_case']:.3f} | "
                 f"{t['precision_iou']:.2f} | {t['large_found_iou']} / {t['large']} | "
                 f"{t['large_found_any']} / {t['large']} |")
  return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True, help="a trained run's folder")
  p.add_argument("--split", default="validation", help="the run's split to score")
  p.add_argument("--stage", default=None, help="a stage's best checkpoint (default: the run's)")
  p.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS),
                 help="comma-separated tumour probabilities, or 'argmax'")
  p.add_argument("--flip_tta", action="store_true", help="average the four in-plane flips")
  p.add_argument("--out", default=None, help="JSON file for the results")
  args = p.parse_args(argv)
  thresholds = []
  for t in args.thresholds.split(","):
    if t.strip() == "argmax":
      thresholds.append("argmax")
      continue
    try:
      value = float(t)
    except ValueError:
      p.error(f"--thresholds: {t!r} is not a probability or 'argmax'")
    if not 0.0 <= value < 1.0:
      p.error(f"--thresholds: {value} is not in [0, 1)")
    thresholds.append(value)
  args.thresholds = thresholds
  return args


def main(argv: Optional[list[str]] = None) -> int:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  raw = sys.argv[1:] if argv is None else argv
  args = parse_args(raw)
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    result = probe(args.workdir, args.split, args.stage, args.thresholds, args.flip_tta)
  except (ProbeError, FileNotFoundError) as e:
    print(f"lesion_probe: {e}", file=sys.stderr)
    return 2
  print(report(result))
  if args.out:
    from curriculum_seg import metrics  # pylint: disable=g-import-not-at-top
    result.update(machine=machine_info.describe("jax", "flax"),
                  command=["experiments/lesion_probe.py"] + raw)
    machine_info.write_result(args.out, metrics.json_safe(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
