"""`curriculum-seg evaluate`: a run's chosen checkpoint scored on whole volumes with LiTS metrics.

Each case is segmented by `inference` in its own geometry, scored against its reference with
`metrics.score_case` (tumour, liver, lesion detection, tumour burden) and forgotten before the
next one, so memory holds one case at a time. Writes, into `workdir/eval/<split>/` by default:
  metrics.json   per-case scores and the aggregate (`metrics.aggregate`), with the checkpoint and
                 inference options used;
  metrics.md     the same as Markdown tables;
  pictures/      PNG overlays (`curriculum_seg.pictures`: CT, reference and predicted contours)
                 of the slices with the smallest and the largest reference tumours and of the
                 worst cases.
Every file is written to a temporary name and renamed, so a killed evaluation leaves the previous
results or none, never half of one.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np
from etils import epath

from curriculum_seg import inference, metrics, rundir, trained_run
from curriculum_seg.pictures import DISPLAY_WINDOW, draw_slice
from data_pipelines import lits, lits_tfds
from data_pipelines.labels import LIVER, TUMOUR

SPLITS = ("train", "validation", "test")
NUM_WORST = 3


def split_cases(config, split: str) -> dict[int, tuple[epath.Path, epath.Path]]:
  """The run's cases of `split`, as the dataset builder assigned them (same seed, same folder)."""
  if split not in SPLITS:
    raise ValueError(f"--split {split!r} is not one of {list(SPLITS)}")
  data = config.data
  cases = lits.find_cases(data.lits_dir)
  numbers = lits_tfds.assign_splits(sorted(cases), float(data.val_fraction),
                                    float(data.test_fraction), int(data.split_seed))[split]
  if not numbers:
    raise ValueError(f"the run has no {split} cases (config.data: val_fraction="
                     f"{data.val_fraction}, test_fraction={data.test_fraction}); pick another "
                     "--split or give --lits_dir")
  return {n: cases[n] for n in numbers}


@dataclasses.dataclass(order=True)
class _Picture:
  """A slice kept for drawing: CT, reference and prediction of one axial slice."""

  key: float
  title: str = dataclasses.field(compare=False)
  name: str = dataclasses.field(compare=False)
  image: np.ndarray = dataclasses.field(compare=False, repr=False)
  reference: np.ndarray = dataclasses.field(compare=False, repr=False)
  prediction: np.ndarray = dataclasses.field(compare=False, repr=False)
  spacing: tuple = dataclasses.field(compare=False, default=(1.0, 1.0))


def _slice_picture(key, title, name, case, ref, pred, z) -> _Picture:
  return _Picture(key=key, title=title, name=name, image=case.image[:, :, z].copy(),
                  reference=ref[:, :, z].copy(), prediction=pred[:, :, z].copy(),
                  spacing=tuple(case.spacing[:2]))


class _PictureChooser:
  """Keeps, over all cases, the slices worth drawing, holding only a few 2-D slices at a time."""

  def __init__(self, num_worst: int = NUM_WORST):
    self.smallest: Optional[_Picture] = None
    self.largest: Optional[_Picture] = None
    self.worst: list = []  # heap of (-dice, picture): the lowest tumour Dice cases
    self.num_worst = num_worst

  def add(self, case_id: str, case: lits.Case, pred: np.ndarray, scores: dict) -> None:
    ref = case.labels
    # Reference lesions in `detect_lesions` order: label i + 1 of the 6-connected components.
    lesions = list(enumerate(scores["detection"]["reference_lesions"], start=1))
    if lesions:
      components, _ = _lesion_components(ref == TUMOUR)
      for (label, rec), keep in ((min(lesions, key=lambda t: t[1]["volume_mm3"]), "smallest"),
                                 (max(lesions, key=lambda t: t[1]["volume_mm3"]), "largest")):
        current = getattr(self, keep)
        volume = float(rec["volume_mm3"])
        better = current is None or (volume < current.key if keep == "smallest"
                                     else volume > current.key)
        if better:
          z = _widest_slice(components == label)
          found = "detected" if rec["detected_iou"] else (
              "found (IoU <= 0.5)" if rec["detected_any"] else "missed")
          title = f"{keep} tumour: {case_id} slice {z}, {rec['diameter_mm']:.1f} mm, {found}"
          setattr(self, keep, _slice_picture(volume, title, f"{keep}_tumour", case, ref, pred,
                                             z))
    dice = float(scores["tumour"]["dice"])
    if dice >= 1.0:  # perfect (both empty, or exact): nothing to see
      return
    if len(self.worst) < self.num_worst or -dice > self.worst[0][0]:
      error = (ref == TUMOUR) != (pred == TUMOUR)
      per_slice = error.sum(axis=(0, 1))
      z = int(per_slice.argmax()) if per_slice.any() else ref.shape[2] // 2
      title = f"worst: {case_id} slice {z}, tumour Dice {dice:.3f}"
      item = (-dice, case_id, _slice_picture(dice, title, f"worst_{case_id}", case, ref, pred, z))
      if len(self.worst) < self.num_worst:
        heapq.heappush(self.worst, item)
      else:
        heapq.heapreplace(self.worst, item)

  def pictures(self) -> list[_Picture]:
    out = [p for p in (self.smallest, self.largest) if p is not None]
    return out + [item[2] for item in sorted(self.worst, reverse=True)]


def _lesion_components(mask: np.ndarray):
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  return ndimage.label(mask, structure=metrics.LESION_STRUCTURE)


def _widest_slice(component: np.ndarray) -> int:
  return int(component.sum(axis=(0, 1)).argmax())


def draw_overlay(picture: _Picture,
                 hu_window: tuple[float, float] = DISPLAY_WINDOW):
  """A matplotlib figure of a kept slice: `pictures.draw_slice` with the picture's title."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.5, 5.8), dpi=100)
  ax = fig.add_subplot()
  draw_slice(ax, picture.image, picture.reference, picture.prediction, picture.spacing, hu_window)
  ax.set_title(picture.title, fontsize=9)
  fig.tight_layout()
  return fig


def _fmt(value: Any, digits: int = 3) -> str:
  if isinstance(value, str):  # json_safe's "nan"/"inf"
    return "n/a" if value == "nan" else value
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if isinstance(value, float) and math.isinf(value):
    return "inf"
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return str(int(value))
  return f"{float(value):.{digits}f}"


def _mean_std(entry: dict) -> str:
  if entry.get("n", 0) == 0:
    return "n/a"
  text = f"{_fmt(entry['mean'])} ± {_fmt(entry['std'])}"
  if entry.get("n_infinite"):
    text += f" ({entry['n_infinite']} inf)"
  return text


RVD_NOTE = ("- RVD = (|B| - |A|) / |A|, A the reference (the paper's sign); surface distances "
            "in mm, mean ± std over cases with both or neither mask empty.")


def markdown_report(result: dict) -> str:
  """The aggregate and per-case scores as Markdown tables."""
  ck = result["checkpoint"]
  lines = [f"# Evaluation of {result['workdir']}", "",
           f"- checkpoint: {ck['description']}",
           f"- cases: {result['aggregate']['num_cases']} ({result['source']})",
           f"- inference: {json.dumps(result['options'])}", RVD_NOTE, ""]
  return "\n".join(lines + report_tables(result)) + "\n"


def report_tables(result: dict) -> list[str]:
  """The Markdown lines of the score tables (segmentation, lesions, burden, cases, pictures) of
  a result holding `aggregate` and `cases`; shared by `evaluate` and `score`."""
  agg, cases = result["aggregate"], result["cases"]
  lines = ["## Segmentation", "",
           "| structure | Dice per case | Dice global | Jaccard | VOE | RVD | ASSD | MSD | RMSD |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name in ("tumour", "liver"):
    if name in agg:
      s = agg[name]
      lines.append(f"| {name} | {_fmt(s['dice_per_case'])} | {_fmt(s['dice_global'])} | "
                   + " | ".join(_mean_std(s[k]) for k in ("jaccard", "voe", "rvd", "assd", "msd",
                                                         "rmsd")) + " |")
  det = agg["detection"]
  lines += ["", "## Lesion detection", "",
            f"{det['num_reference_lesions']} reference lesions, {det['num_predicted_lesions']} "
            f"predicted; merge errors {det['merge_errors']}, split errors {det['split_errors']}.",
            "", "| criterion | lesions | TP | FP | FN | precision | recall | F1 |",
            "|---|---|---|---|---|---|---|---|"]
  for crit, title in (("iou", f"IoU > {det['iou_threshold']}"), ("any", "any overlap")):
    rows = [("all", det[crit], det["num_reference_lesions"])]
    rows += [(b, e, e["num_reference_lesions"]) for b, e in det[crit]["by_diameter"].items()]
    for label, e, n in rows:
      lines.append(f"| {title}, {label} | {n} | {e['tp']} | {e['fp']} | {e['fn']} | "
                   f"{_fmt(e['precision'])} | {_fmt(e['recall'])} | {_fmt(e['f1'])} |")
  b = agg["burden"]
  lines += ["", f"Tumour burden: RMSE {_fmt(b['rmse'], 4)}, max error {_fmt(b['max_error'], 4)} "
                f"over {b['n']} cases" + (" (reference liver: the model predicts tumour only)"
                                          if result.get("burden_uses_reference_liver") else "")
            + ".", "", "## Cases", "",
            "| case | tumour Dice | ASSD (mm) | RVD | lesions (ref/pred/detected) | liver Dice |"
            " seconds |", "|---|---|---|---|---|---|---|"]
  for c in cases:
    d = c["detection"]
    liver = _fmt(c["liver"]["dice"]) if "liver" in c else "n/a"
    lines.append(f"| {c['case_id']} | {_fmt(c['tumour']['dice'])} | {_fmt(c['tumour']['assd'])} | "
                 f"{_fmt(c['tumour']['rvd'])} | {d['num_reference']}/{d['num_predicted']}/"
                 f"{d['iou']['tp']} | {liver} | {_fmt(c['seconds'], 1)} |")
  if result.get("pictures"):
    lines += ["", "## Pictures", ""] + [f"![{p}](pictures/{p})" for p in result["pictures"]]
  return lines


def case_line(case_id: str, scores: dict) -> str:
  """One case's progress line: tumour Dice, lesions detected, seconds."""
  return (f"  {case_id}: tumour Dice {_fmt(scores['tumour']['dice'])}, lesions "
          f"{scores['detection']['iou']['tp']}/{scores['detection']['num_reference']} detected, "
          f"{scores['seconds']:.1f} s")


def write_report(output: epath.Path, result: dict, markdown: str) -> None:
  """Writes `metrics.json` (the result, `metrics.json_safe`) and `metrics.md`, each atomically."""
  rundir.write_atomically(output / "metrics.json", json.dumps(metrics.json_safe(result), indent=1,
                                                    allow_nan=False).encode())
  rundir.write_atomically(output / "metrics.md", markdown.encode())


def default_output(workdir: epath.PathLike, split: str, lits_dir: Optional[str],
                   network_tag: str) -> epath.Path:
  name = split if lits_dir is None else "folder-" + epath.Path(lits_dir).name
  return epath.Path(workdir) / "eval" / (name + network_tag)


def evaluate_run(workdir: epath.PathLike, *, split: str = "validation",
                 lits_dir: Optional[str] = None, output: Optional[epath.PathLike] = None,
                 stage: Optional[str] = None, step: Optional[int] = None,
                 which: Optional[str] = None,
                 options: Optional[inference.InferenceOptions] = None, pictures: bool = True,
                 log: Callable[[str], Any] = print, mesh=None, progress: bool = False) -> dict:
  """Scores a run's checkpoint on whole volumes; writes metrics.json, metrics.md, pictures/.

  Cases: the run's `split` (as its dataset builder assigned them), or every case of `lits_dir`
  (a LiTS folder with segmentations). Returns dict(workdir, checkpoint, source, options,
  aggregate, cases, output, pictures).
  """
  options = inference.InferenceOptions() if options is None else options
  run = trained_run.open_run(workdir)
  config = run.config
  if lits_dir is not None:
    cases = lits.find_cases(lits_dir)
    source = f"every case of {lits_dir}"
  else:
    try:
      cases = split_cases(config, split)
    except lits.CaseFileNotFoundError as e:
      raise lits.CaseFileNotFoundError(f"{e}{rundir.relative_path_hint(config, workdir)}") from e
    source = f"the run's {split} split of {config.data.lits_dir}"
  predictor = run.predictor(stage=stage, step=step, which=which, mesh=mesh, options=options)
  tag = "" if stage is None and step is None and which is None else (
      "-" + "-".join(str(v) for v in (stage, which, step) if v is not None))
  output = epath.Path(output) if output is not None else default_output(workdir, split, lits_dir,
                                                                          tag)
  output.mkdir(parents=True, exist_ok=True)
  log(f"evaluating {predictor.describe()} on {len(cases)} cases ({source})")
  chooser = _PictureChooser()
  results = []
  reference_liver = not predictor.predicts_liver
  numbers = list(cases)
  bar = _progress(numbers, "evaluate") if progress else numbers
  for n in bar:
    volume, segmentation = cases[n]
    start = time.perf_counter()
    case = lits.load_case(volume, segmentation)
    pred = predictor.predict_case(case)
    seconds_predict = time.perf_counter() - start
    scored = pred
    if reference_liver:  # tumour-only model: score tumour; burden over the reference liver
      scored = np.where(pred == TUMOUR, TUMOUR,
                        np.where(case.labels >= LIVER, LIVER, 0)).astype(np.uint8)
    scores = metrics.score_case(scored, case.labels, case.spacing, case_id=f"case-{n}")
    if reference_liver:
      del scores["liver"]
    scores["case_number"] = int(n)
    scores["volume"] = os.fspath(volume)
    scores["seconds_predict"] = seconds_predict
    scores["seconds"] = time.perf_counter() - start
    if pictures:
      chooser.add(f"case-{n}", case, pred, scores)
    results.append(metrics.json_safe(scores))
    if not progress:
      log(case_line(f"case-{n}", scores))
    del case, pred, scored
  aggregate = metrics.aggregate(results)
  names = []
  if pictures:
    pic_dir = output / "pictures"
    pic_dir.mkdir(exist_ok=True)
    import io  # pylint: disable=g-import-not-at-top
    for picture in chooser.pictures():
      fig = draw_overlay(picture)
      buffer = io.BytesIO()
      fig.savefig(buffer, format="png")
      rundir.write_atomically(pic_dir / f"{picture.name}.png", buffer.getvalue())
      names.append(f"{picture.name}.png")
  result = dict(workdir=os.fspath(workdir), checkpoint=_checkpoint_record(predictor),
                source=source, split=split if lits_dir is None else None,
                options=dataclasses.asdict(options), aggregate=aggregate, cases=results,
                burden_uses_reference_liver=reference_liver, output=os.fspath(output),
                pictures=names)
  write_report(output, result, markdown_report(result))
  t = aggregate["tumour"]
  log(f"tumour Dice per case {_fmt(t['dice_per_case'])}, global {_fmt(t['dice_global'])}; "
      f"lesion recall (IoU > 0.5) {_fmt(aggregate['detection']['iou']['recall'])}; "
      f"wrote {output}/metrics.json, metrics.md" + (f" and {len(names)} pictures" if names else ""))
  return result


def _checkpoint_record(predictor) -> dict:
  nets = getattr(predictor, "networks", {})
  return dict(description=predictor.describe(),
              networks=[dict(stage=n.stage, which=n.which, step=n.step, task=n.task)
                        for n in nets.values()])


def _progress(items, desc):
  try:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return items
  return tqdm(items, desc=desc, unit="case")
