"""`curriculum-seg score`: LiTS scores of any tool's masks, as nnU-Net's `nnUNetv2_evaluate_folder`.

A reference folder and a prediction folder of {0, 1, 2} label masks are paired by file name, each
pair is read on its own file grid (no resampling, no reorientation) and scored with
`metrics.score_case` at the reference header's voxel size (as the LiTS scorer), and the cases
are aggregated and written as `evaluate` writes them (`metrics.json`, `metrics.md`), so a model
of this project and any other tool are compared by one scorer. Neither input folder is ever
written to.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import numpy as np
from etils import epath
from nibabel import orientations

from curriculum_seg import evaluate, metrics
from data_pipelines import lits

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_CT_PREFIXES = ("volume-", "test-volume-")
_MASK_PREFIXES = ("segmentation-", "test-segmentation-")


class ScoreError(ValueError):
  """A command-line mistake of `score` (the folders asked for cannot be used as given)."""


# --------------------------------------------------------------------------- finding the masks

def case_key(name: str) -> Optional[str]:
  """The pairing key of a file name: the name without `.nii`/`.nii.gz`; None for other files."""
  if name.startswith("."):
    return None
  for ext in NIFTI_EXTENSIONS:
    if name.endswith(ext) and len(name) > len(ext):
      return name[:-len(ext)]
  return None


def list_masks(folder: epath.PathLike, role: str) -> dict[str, epath.Path]:
  """{key: file} of a folder's NIfTI masks. In a folder that also holds `segmentation-N` files,
  the CT volumes `volume-N` are left out, so a LiTS folder can be the reference as it is. Raises
  CaseError for a missing folder or a case stored twice (`x.nii` and `x.nii.gz`)."""
  root = epath.Path(folder)
  if not root.is_dir():
    raise lits.CaseFileNotFoundError(f"{folder}: {role} folder does not exist")
  found: dict[str, epath.Path] = {}
  for path in sorted(root.iterdir(), key=lambda p: p.name):
    key = case_key(path.name)
    if key is None or path.is_dir():
      continue
    if key in found:
      raise lits.CaseError(f"{path}: {role} case {key} is stored twice ({found[key].name} and "
                           f"{path.name})")
    found[key] = path
  if any(k.startswith(_MASK_PREFIXES) for k in found):
    found = {k: p for k, p in found.items() if not k.startswith(_CT_PREFIXES)}
  return found


def _aliases(key: str) -> list[str]:
  """Prediction keys that may answer reference `key`: itself, and the LiTS test naming."""
  if key.startswith("segmentation-"):
    return [key, "test-" + key]
  if key.startswith("test-segmentation-"):
    return [key, key[len("test-"):]]
  return [key]


def pair_masks(references: dict[str, epath.Path], predictions: dict[str, epath.Path]
               ) -> tuple[list[tuple[str, epath.Path, Optional[epath.Path]]], list[str]]:
  """([(key, reference, prediction or None)], names of the predictions without a reference)."""
  pairs, used = [], set()
  for key, ref in references.items():
    hits = [k for k in _aliases(key) if k in predictions]
    if len(hits) > 1:
      raise lits.CaseError(f"{ref}: more than one prediction answers it: "
                           + ", ".join(predictions[k].name for k in hits))
    used.update(hits)
    pairs.append((key, ref, predictions[hits[0]] if hits else None))
  unpaired = [p.name for k, p in predictions.items() if k not in used]
  return pairs, unpaired


# --------------------------------------------------------------------------- reading the masks

def read_mask(path: epath.PathLike, role: str) -> tuple[np.ndarray, Any]:
  """(uint8 labels in the file's own array layout, nibabel image) of a label file, read as
  `lits.load_case` reads segmentations (float-stored and scaled labels accepted, values outside
  {0, 1, 2} a CaseError naming the file)."""
  # pylint: disable=protected-access  (lits's tolerant readers; it has no public per-file one)
  temps: list[str] = []
  try:
    image = lits._open_nifti(path, role, temps)
    shape = lits._shape3(image, path, role)
    slope, inter = lits._scaling(image, path, role)
    labels = lits._to_labels(lits._read_raw(image, shape, path, role), slope, inter, path)
  finally:
    for t in temps:
      os.remove(t)
  return labels, image


def _header_shape(path: epath.Path, role: str) -> tuple[int, ...]:
  image = lits._open_nifti(path, role, [])  # pylint: disable=protected-access  (local: lazy)
  return lits._shape3(image, path, role)  # pylint: disable=protected-access


def _check_shape(pred_path, pred_shape, ref_path, ref_shape) -> None:
  if tuple(pred_shape) != tuple(ref_shape):
    raise lits.CaseError(f"{pred_path}: prediction shape {tuple(pred_shape)} differs from the "
                         f"reference's {tuple(ref_shape)} ({ref_path})")


def check_shapes(pairs) -> None:
  """Refuses, before any scoring, a local prediction whose header shape differs from its
  reference's (reading headers only; remote files are checked as they are scored)."""
  for _, ref_path, pred_path in pairs:
    if pred_path is None or "://" in os.fspath(ref_path) + os.fspath(pred_path):
      continue
    ref_shape = _header_shape(ref_path, "reference segmentation")
    pred_shape = _header_shape(pred_path, "predicted segmentation")
    _check_shape(pred_path, pred_shape, ref_path, ref_shape)


def reference_geometry(image, path) -> tuple[tuple[float, float, float], int]:
  """(spacing in mm per array axis from `header.get_zooms()[:3]`, the array axis that is the
  slice axis), so lesion diameters are measured in-plane whatever the file's orientation."""
  unit = lits._spacing_mm(image, path)  # pylint: disable=protected-access  (checks the zooms)
  spacing = tuple(float(z) * unit for z in image.header.get_zooms()[:3])
  ornt = orientations.io_orientation(image.affine)
  axial = int(np.flatnonzero(ornt[:, 0] == 2)[0])  # the array axis along S/I
  return spacing, axial


# --------------------------------------------------------------------------- scoring

def _is_inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip("/") + "/")


def _absolute(path: epath.PathLike) -> str:
  text = os.fspath(path)
  return text.rstrip("/") if "://" in text else os.path.realpath(text)


def default_output(prediction_dir: epath.PathLike) -> epath.Path:
  """`score-<prediction folder>` beside the prediction folder (never inside an input folder)."""
  pred = epath.Path(_absolute(prediction_dir))
  return pred.parent / f"score-{pred.name}"


def check_output(output: epath.PathLike, reference_dir, prediction_dir, given: bool) -> None:
  """Refuses an output folder that is an input folder, or (by default) lies inside one."""
  out = _absolute(output)
  for role, folder in (("reference", reference_dir), ("prediction", prediction_dir)):
    folder = _absolute(folder)
    if out == folder:
      raise ScoreError(f"--output {output} is the {role} folder; choose another folder")
    if not given and _is_inside(out, folder):
      raise ScoreError(f"the default output {output} lies inside the {role} folder {folder}; "
                       "give --output")


def score_pair(key: str, ref_path: epath.Path, pred_path: Optional[epath.Path]) -> dict:
  """`metrics.score_case` of one pair (an absent prediction scores as an empty mask)."""
  start = time.perf_counter()
  ref, ref_image = read_mask(ref_path, "reference segmentation")
  spacing, axial = reference_geometry(ref_image, ref_path)
  if pred_path is None:
    pred = np.zeros_like(ref)
  else:
    pred, pred_image = read_mask(pred_path, "predicted segmentation")
    _check_shape(pred_path, pred.shape, ref_path, ref.shape)
  scores = metrics.score_case(pred, ref, spacing, case_id=key, axial_axis=axial)
  scores.update(reference=os.fspath(ref_path),
                prediction=None if pred_path is None else os.fspath(pred_path),
                affine_differs=bool(pred_path is not None and not np.allclose(
                    pred_image.affine, ref_image.affine, rtol=0, atol=1e-3)),
                seconds=time.perf_counter() - start)
  return metrics.json_safe(scores)


def summary_lines(aggregate: dict) -> list[str]:
  """The headline scores, one per line."""
  fmt = evaluate._fmt  # pylint: disable=protected-access
  t, liver, det = aggregate["tumour"], aggregate["liver"], aggregate["detection"]
  lines = [f"tumour Dice per case {fmt(t['dice_per_case'])}, global {fmt(t['dice_global'])}",
           f"liver Dice per case {fmt(liver['dice_per_case'])}, global "
           f"{fmt(liver['dice_global'])}"]
  for crit, title in (("iou", f"IoU > {det['iou_threshold']}"), ("any", "any overlap")):
    e = det[crit]
    lines.append(f"lesions ({title}): recall {fmt(e['recall'])}, precision "
                 f"{fmt(e['precision'])}, F1 {fmt(e['f1'])} ({e['tp']} of "
                 f"{det['num_reference_lesions']} detected, {e['fp']} false positive(s))")
  return lines


def markdown_report(result: dict) -> str:
  """`metrics.md`: what was scored, then `evaluate`'s tables."""
  lines = [f"# Scores of {result['prediction']}", "",
           f"- reference: {result['reference']}",
           f"- cases: {result['aggregate']['num_cases']} ({result['source']})",
           "- spacing: each reference file's header zooms; masks on their own file grids"]
  if result["missing_predictions"]:
    lines.append(f"- scored as empty (no prediction): {', '.join(result['missing_predictions'])}")
  if result["unpaired_predictions"]:
    lines.append(f"- predictions without a reference (not scored): "
                 f"{', '.join(result['unpaired_predictions'])}")
  lines += [evaluate.RVD_NOTE, ""]
  return "\n".join(lines + evaluate.report_tables(result)) + "\n"


def score_folders(reference_dir: epath.PathLike, prediction_dir: epath.PathLike,
                  output_dir: Optional[epath.PathLike] = None, allow_missing: bool = False,
                  log: Callable[[str], Any] = print) -> dict:
  """Scores every reference mask against its prediction; writes metrics.json and metrics.md.

  Files pair by name without `.nii`/`.nii.gz` (a prediction may also be `test-segmentation-N`
  for `segmentation-N`). A reference without prediction is a CaseError listing them all, unless
  `allow_missing` (then it scores as an empty mask, as the LiTS scorer gave missing submissions).
  Output: `output_dir`, default `default_output(prediction_dir)`. Returns the result written to
  metrics.json (reference, prediction, source, aggregate, cases, missing/unpaired, output).
  """
  if _absolute(reference_dir) == _absolute(prediction_dir):
    raise ScoreError(f"--reference and --prediction are the same folder ({reference_dir})")
  references = list_masks(reference_dir, "reference")
  if not references:
    raise lits.CaseError(f"{reference_dir}: no .nii or .nii.gz masks in the reference folder")
  pairs, unpaired = pair_masks(references, list_masks(prediction_dir, "prediction"))
  missing = [ref.name for _, ref, pred in pairs if pred is None]
  if missing and not allow_missing:
    raise lits.CaseError(f"{prediction_dir}: no prediction for {len(missing)} reference mask(s): "
                         f"{', '.join(missing)} (--allow_missing scores them as empty masks)")
  output = epath.Path(output_dir if output_dir is not None else default_output(prediction_dir))
  check_output(output, reference_dir, prediction_dir, given=output_dir is not None)
  check_shapes(pairs)
  log(f"scoring {len(pairs)} masks of {prediction_dir} against {reference_dir}"
      + (f" ({len(missing)} missing, scored as empty)" if missing else "")
      + (f"; {len(unpaired)} prediction(s) without a reference ignored" if unpaired else ""))
  cases = []
  for key, ref_path, pred_path in pairs:
    scores = score_pair(key, ref_path, pred_path)
    if scores["affine_differs"]:
      log(f"  warning: {pred_path} has another affine than {ref_path}; scored voxel by voxel")
    log(evaluate.case_line(key, scores))
    cases.append(scores)
  result = dict(reference=os.fspath(reference_dir), prediction=os.fspath(prediction_dir),
                source=f"the masks of {reference_dir} paired by file name",
                aggregate=metrics.aggregate(cases), cases=cases, missing_predictions=missing,
                unpaired_predictions=unpaired, burden_uses_reference_liver=False,
                output=os.fspath(output))
  output.mkdir(parents=True, exist_ok=True)
  evaluate.write_report(output, result, markdown_report(result))
  for line in summary_lines(result["aggregate"]):
    log(line)
  log(f"wrote {output}/metrics.json, metrics.md")
  return result
