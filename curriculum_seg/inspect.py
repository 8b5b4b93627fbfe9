"""A run directory for notebooks: config, stages and checkpoints, history, weights, pictures.

`load_run(workdir)` reads what a `curriculum-seg train` run left behind (`config.json`,
`metrics.jsonl`, the checkpoints' JSON metadata) and nothing else: no training pipeline is built
and nothing is written, so a read-only workdir (a colleague's, a mounted bucket) is fine. Weights
are restored on demand, model variables only, onto one local CPU device by default whatever
mesh wrote them (`curriculum_seg.inference.load_network`); the training pipelines are built only
by `Run.plot_batches`, from the run's prepared dataset.

    run = load_run("runs/synthetic")
    print(run)                                # stages, checkpoints, the chosen one
    run.plot_history()                        # loss and validation Dice, stage boundaries
    params = run.params(stage="patch")        # any stage's (or step's) weights on the CPU
    labels = run.predict("volume-3.nii.gz")   # canonical uint8 LiTS labels
    run.plot_slice("volume-3.nii.gz")         # CT with reference and predicted contours
    run.plot_batches()                        # whole and patch batches as training saw them
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
from etils import epath

from curriculum_seg import checkpoints as ckpt_lib
from curriculum_seg import curriculum, inference, pictures, rundir, trained_run
from curriculum_seg import stages as stages_lib
from data_pipelines.labels import LIVER, TUMOUR

BOUNDARY_GID = "stage-boundary"


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
  """One saved checkpoint of a stage, from its JSON metadata.

  `which` is 'latest' (kept for resume) or 'best' (by validation Dice); `val_dice` is the
  validation Dice measured at this step (None when the step was not evaluated); `chosen` marks
  the checkpoint the stage hands on: the one the next stage started from, or for the run's
  last stage the one the run hands out (`curriculum.handed_on`).
  """

  stage: str
  which: str
  step: int
  global_step: Optional[int]
  val_dice: Optional[float]
  completed: bool
  chosen: bool
  path: str


@dataclasses.dataclass(frozen=True)
class StageInfo:
  """One stage of the curriculum: its settings, how far it ran, and its checkpoints."""

  name: str
  index: int
  pipeline: str
  task: str                     # what the stage's network segments: tumour, liver, three_class
  init: str
  steps: int                    # as configured
  start: int                    # global step before the stage's first step
  steps_done: int               # the last checkpointed step (0: none yet)
  completed: bool
  best_step: Optional[int]       # 0: the stage's starting point (a checkpoint) stayed best
  best_val_dice: Optional[float]
  checkpoints: tuple[CheckpointInfo, ...]
  # Validation Dice of the weights the stage started from (its step-0 evaluation), for stages
  # that start from the previous stage's checkpoint; None for stages started from scratch.
  start_val_dice: Optional[float] = None

  @property
  def chosen(self) -> Optional[CheckpointInfo]:
    return next((c for c in self.checkpoints if c.chosen), None)


def cpu_mesh():
  """A one-device 'data' mesh on this host's first CPU device (where notebooks restore)."""
  import jax  # pylint: disable=g-import-not-at-top
  from curriculum_seg import sharding  # pylint: disable=g-import-not-at-top
  return jax.make_mesh((1,), (sharding.DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.local_devices(backend="cpu")[:1])


@contextlib.contextmanager
def _quiet_absl_warnings():
  """Orbax warns (through absl) each time a checkpoint folder is opened read-only, which is all
  this module does, and TFDS each time a builder is made from a config; those lines are noise
  in a notebook, so they are hidden meanwhile."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(max(level, logging.ERROR))
  try:
    yield
  finally:
    logger.setLevel(level)


def _float(value: Any) -> Any:
  """metrics.jsonl stores non-finite floats as strings ('nan', 'inf'): back to floats."""
  if isinstance(value, str) and value in ("nan", "inf", "-inf"):
    return float(value)
  return value


class Run:
  """A trained (or training) run, read-only. Build it with `load_run(workdir)`.

  Attributes:
    workdir: the run directory.
    config: the run's resolved config (`config.json`).
    stages: a `StageInfo` per stage of the curriculum, in order, with its checkpoints.
    history: the rows of `metrics.jsonl` (dicts: stage, step, global_step, loss, dice, lr,
      steps_per_s, and val_dice etc. where the step was evaluated).
    summary: `summary.json` once the run has completed ({"stages": one dict per stage,
      "checkpoints": those evaluate and predict use}), else None.
    chosen: (stage, which, step) of the checkpoint the run hands out, or None before any.
  """

  def __init__(self, workdir: epath.PathLike, mesh=None):
    self.workdir = epath.Path(workdir)
    self._run = trained_run.open_run(self.workdir)
    self.config = self._run.config
    self.history = [{k: _float(v) for k, v in row.items()}
                    for row in rundir.MetricsLog(self.workdir).read()]
    self.summary = stages_lib.read_summary(self.workdir)
    with _quiet_absl_warnings():
      try:
        self.chosen = self._run.chosen_checkpoint()
      except inference.InferenceError:
        self.chosen = None
      self.stages = self._read_stages()
    self._mesh = mesh
    self._networks: dict[tuple, Any] = {}
    self._predictors: dict[tuple, Any] = {}

  # --- what the run holds ----------------------------------------------------------------

  @property
  def curriculum(self) -> list[str]:
    return list(self.config.curriculum)

  @property
  def complete(self) -> bool:
    return all(s.completed for s in self.stages)

  def stage(self, name: str) -> StageInfo:
    for s in self.stages:
      if s.name == name:
        return s
    raise KeyError(f"stage {name!r} is not in the run's curriculum "
                   f"({', '.join(self.curriculum)})")

  @property
  def checkpoints(self) -> list[CheckpointInfo]:
    """Every checkpoint of every stage, in curriculum order."""
    return [c for s in self.stages for c in s.checkpoints]

  def _read_stages(self) -> list[StageInfo]:
    names = self.curriculum
    starts, offset = {}, 0
    for name in names:  # a stage's start: from its logged rows, else the configured lengths
      logged = [r["global_step"] - r["step"] for r in self.history
                if r.get("stage") == name and "global_step" in r and "step" in r]
      starts[name] = logged[0] if logged else offset
      offset = starts[name] + int(self.config.stages[name].steps)
    stages = []
    for index, name in enumerate(names):
      cfg = self.config.stages[name]
      store = ckpt_lib.StageCheckpoints(self.workdir / "checkpoints", name, read_only=True)
      try:
        found = []
        for which in (ckpt_lib.LATEST, ckpt_lib.BEST):
          for step in store.steps(which):
            found.append((which, step, store.meta(which, step) or {}))
      finally:
        store.close()
      latest = [m for w, _, m in found if w == ckpt_lib.LATEST]
      last_meta = latest[-1] if latest else {}
      chosen = self._chosen_of(index, name, found, bool(last_meta.get("completed")))
      records = tuple(CheckpointInfo(
          stage=name, which=which, step=int(step), global_step=meta.get("global_step"),
          val_dice=meta.get("val_dice"), completed=bool(meta.get("completed")),
          chosen=(which, step) == chosen,
          path=os.fspath(store.directory / which / str(step))) for which, step, meta in found)
      stages.append(StageInfo(
          name=name, index=index, pipeline=str(cfg.pipeline),
          task=str(curriculum.stage_model_config(self.config, name).task), init=str(cfg.init),
          steps=int(cfg.steps), start=int(starts[name]),
          steps_done=int(last_meta.get("step", 0)), completed=bool(last_meta.get("completed")),
          best_step=last_meta.get("best_step"), best_val_dice=last_meta.get("best_score"),
          checkpoints=records, start_val_dice=next(
              (r["val_dice"] for r in self.history if r.get("stage") == name
               and r.get("step") == 0 and "val_dice" in r), None)))
    return stages

  def _chosen_of(self, index: int, name: str, found: list, completed: bool) -> Optional[tuple]:
    """(which, step) of the checkpoint stage `name` hands on, as the stage controller picks it."""
    if self.chosen is not None and self.chosen[0] == name:
      return self.chosen[1], self.chosen[2]
    wants = curriculum.taker_wants(self.config, name)
    if not completed or index + 1 >= len(self.curriculum) or wants is None:
      return None
    steps = {which: [s for w, s, _ in found if w == which]
             for which in (ckpt_lib.BEST, ckpt_lib.LATEST)}
    which = curriculum.handed_on(wants, bool(steps[ckpt_lib.BEST]))
    return (which, steps[which][-1]) if steps[which] else None

  def series(self, key: str, stage: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """(global steps, values) of one logged quantity (e.g. 'loss', 'val_dice'), optionally of
    one stage; rows without it are skipped."""
    rows = [r for r in self.history if key in r and (stage is None or r.get("stage") == stage)]
    return (np.array([r["global_step"] for r in rows], np.int64),
            np.array([float(r[key]) for r in rows], np.float64))

  def describe(self) -> str:
    """A few lines: each stage, how far it ran, its best validation Dice and its checkpoints."""
    state = "complete" if self.complete else "incomplete"
    lines = [f"run {self.workdir}: {len(self.stages)} stages ({' -> '.join(self.curriculum)}), "
             f"{state}"]
    for s in self.stages:
      best = ("n/a" if s.best_val_dice is None
              else f"{s.best_val_dice:.4f} at step {s.best_step}")
      lines.append(f"  {s.name:<10} {s.pipeline:<10} {s.steps_done:>6}/{s.steps:<6} "
                   f"init {s.init:<7} best val dice {best}")
      for c in s.checkpoints:
        dice = "" if c.val_dice is None else f" val dice {c.val_dice:.4f}"
        mark = "  <- chosen" if c.chosen else ""
        lines.append(f"      {c.which:<6} step {c.step:>6}{dice}{mark}")
    if self.chosen is not None:
      lines.append(f"  the run hands out {self.chosen[0]}'s {self.chosen[1]} checkpoint "
                   f"(step {self.chosen[2]})")
    return "\n".join(lines)

  def __repr__(self) -> str:
    return self.describe()

  # --- weights and predictions -----------------------------------------------------------

  @property
  def mesh(self):
    if self._mesh is None:
      self._mesh = cpu_mesh()
    return self._mesh

  def network(self, stage: Optional[str] = None, step: Optional[int] = None,
              which: Optional[str] = None):
    """The `inference.Network` of one checkpoint, restored (read-only) onto the run's mesh.

    Default: the checkpoint the run hands out; `stage` alone: that stage's best (else latest);
    `step`: that step of `which` (default latest, else best). Cached.
    """
    key = (stage, step, which)
    if key not in self._networks:
      with _quiet_absl_warnings():
        self._networks[key] = self._run.network(stage=stage, step=step, which=which,
                                                mesh=self.mesh)
    return self._networks[key]

  def variables(self, stage: Optional[str] = None, step: Optional[int] = None,
                which: Optional[str] = None) -> dict:
    """A checkpoint's model variables ({'params', maybe 'batch_stats'}) on the run's mesh (one
    local CPU device by default), whatever mesh wrote them. See `network` for the defaults."""
    return self.network(stage, step, which).variables

  def params(self, stage: Optional[str] = None, step: Optional[int] = None,
             which: Optional[str] = None) -> dict:
    """A checkpoint's parameters on the run's mesh (one local CPU device by default)."""
    return self.variables(stage, step, which)["params"]

  def predictor(self, stage: Optional[str] = None, step: Optional[int] = None,
                which: Optional[str] = None, options=None):
    """An `inference.Predictor` of one checkpoint (post-processing per `options`). Cached."""
    key = (stage, step, which, options)
    if key not in self._predictors:
      if self.config.get("cascade", None):
        with _quiet_absl_warnings():
          self._predictors[key] = self._run.predictor(stage=stage, step=step, which=which,
                                                      mesh=self.mesh, options=options)
      else:
        self._predictors[key] = inference.Predictor(
            self.network(stage, step, which),
            inference.InferenceOptions() if options is None else options)
    return self._predictors[key]

  def predict(self, volume, spacing: Optional[Sequence[float]] = None, *,
              stage: Optional[str] = None, step: Optional[int] = None,
              which: Optional[str] = None, liver: Optional[np.ndarray] = None,
              options=None) -> np.ndarray:
    """Segments a CT volume: canonical uint8 LiTS labels (X, Y, Z) in {0, 1, 2}.

    `volume` is a NIfTI path (loaded with `data_pipelines.lits.load_case`), a loaded `Case`, or
    a canonical HU array (X, Y, Z) with its `spacing` in mm. Default checkpoint: the run's
    chosen one (see `network`).
    """
    from data_pipelines import lits  # pylint: disable=g-import-not-at-top
    if isinstance(volume, (str, os.PathLike)):
      volume = lits.load_case(volume)
    if isinstance(volume, lits.Case):
      image, spacing = volume.image, volume.spacing
    else:
      if spacing is None:
        raise ValueError("predict(array) needs the volume's spacing (mm per axis)")
      image = np.asarray(volume)
    return self.predictor(stage, step, which, options).predict(image, spacing, liver=liver)

  def cases(self, split: str = "validation") -> list[tuple[int, str, str]]:
    """(case number, volume path, segmentation path) of a split's cases, as the dataset splits
    the run's `data.lits_dir` (the same rule as `prepare`; the dataset need not exist)."""
    from data_pipelines import lits, lits_tfds  # pylint: disable=g-import-not-at-top
    data = self.config.data
    found = lits.find_cases(os.fspath(data.lits_dir))
    splits = lits_tfds.assign_splits(sorted(found), float(data.val_fraction),
                                     float(data.test_fraction), int(data.split_seed))
    if split not in splits:
      raise ValueError(f"split {split!r} is not one of {sorted(splits)}")
    return [(n, os.fspath(found[n][0]), os.fspath(found[n][1])) for n in splits[split]]

  # --- pictures --------------------------------------------------------------------------

  def plot_history(self, figsize=(9, 6)):
    """Training loss and validation Dice against the global step: a line per stage, dashed
    vertical lines at the stage boundaries, a star on each stage's chosen checkpoint."""
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    fig, (ax_loss, ax_val) = plt.subplots(2, 1, sharex=True, figsize=figsize)
    for k, s in enumerate(self.stages):
      colour = f"C{k % 10}"
      x, y = self.series("loss", s.name)
      ax_loss.plot(x, y, color=colour, label=s.name)
      x, y = self.series("val_dice", s.name)
      ax_val.plot(x, y, "o-", color=colour, label=s.name)
    stars = [(s.start + c.step, c.val_dice) for s in self.stages for c in s.checkpoints
             if c.chosen and c.val_dice is not None]
    if stars:
      ax_val.plot(*zip(*stars), "*", color="black", markersize=12, linestyle="none",
                  label="chosen checkpoint")
    for ax in (ax_loss, ax_val):
      for k, s in enumerate(self.stages[1:]):
        line = ax.axvline(s.start, color="0.4", linestyle="--", linewidth=1,
                          label="stage boundary" if k == 0 else "_nolegend_")
        line.set_gid(BOUNDARY_GID)
      ax.grid(alpha=0.3)
    for s in self.stages:  # stage names along the top
      ax_loss.text(s.start + s.steps / 2, 1.01, s.name, ha="center", va="bottom",
                   transform=ax_loss.get_xaxis_transform(), fontsize=9)
    ax_loss.set_ylabel("training loss")
    ax_val.set_ylabel("validation Dice")
    ax_val.set_xlabel("global step")
    ax_loss.legend(loc="upper right", fontsize=8)
    ax_val.legend(loc="lower right", fontsize=8)
    fig.suptitle(os.fspath(self.workdir))
    fig.tight_layout()
    return fig

  def plot_slice(self, case, z: Optional[int] = None, *, prediction=None,
                 stage: Optional[str] = None, step: Optional[int] = None,
                 which: Optional[str] = None, ax=None, figsize=(6, 6)):
    """One axial slice with reference and predicted contours (`pictures.draw_slice`).

    `case`: a `Case`, a volume path (its `segmentation-N` file beside it is the reference when
    it exists) or a (volume, segmentation) pair. `prediction`: canonical labels, None to predict
    with the checkpoint (`stage`, `step`, `which`; default the chosen one), or False for none.
    `z`: default the slice with the most reference tumour (else liver, else predicted tumour).
    Patient right is on the left of the picture, anterior at the top.
    """
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    case = _load_case(case)
    predicts_liver = None  # a given prediction's liver is drawn where it has one
    if prediction is None:
      prediction = self.predict(case, stage=stage, step=step, which=which)
      predictor = self.predictor(stage, step, which)
      source, predicts_liver = predictor.describe(), predictor.predicts_liver
    elif prediction is False:
      prediction, source = None, ""
    else:
      prediction, source = np.asarray(prediction), "given prediction"
      if prediction.shape != case.image.shape:
        raise ValueError(f"prediction of shape {prediction.shape} does not match the volume "
                         f"{case.image.shape}")
    if z is None:
      z = _default_slice(case.labels, prediction, case.image.shape[2])
    if not 0 <= z < case.image.shape[2]:
      raise ValueError(f"z={z} is outside the volume's {case.image.shape[2]} slices")
    if ax is None:
      fig, ax = plt.subplots(figsize=figsize)
    else:
      fig = ax.figure
    pictures.draw_slice(
        ax, case.image[:, :, z], None if case.labels is None else case.labels[:, :, z],
        None if prediction is None else prediction[:, :, z], case.spacing,
        predicts_liver=predicts_liver)
    name = os.path.basename(getattr(case, "volume_path", "") or "") or "volume"
    ax.set_title(f"{name}  z={z}" + (f"\nprediction: {source}" if source else ""), fontsize=10)
    return fig

  def plot_batches(self, stages: Union[None, str, Iterable[str]] = None, examples: int = 4,
                   position: int = 0, figsize_per_image: float = 2.2):
    """Training batches as the pipelines produce them (augmented, windowed, from the prepared
    dataset): a row per stage, `examples` rows of global batch `position`, the image's centre
    channel with the labels over it (liver green, tumour red). A stage with
    stage.tumour_fraction > 0 says so under its name (that share of every batch is tumour
    slices); rows holding tumour say '(tumour)'.

    Default stages: the first stage of each pipeline kind in the curriculum (e.g. whole, patch).
    Builds the pipelines here and only here; needs the run's dataset (`curriculum-seg prepare`).
    """
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    from matplotlib.colors import ListedColormap  # pylint: disable=g-import-not-at-top
    if stages is None:
      kinds, names = set(), []
      for s in self.stages:
        if s.pipeline not in kinds:
          kinds.add(s.pipeline)
          names.append(s.name)
    else:
      names = [stages] if isinstance(stages, str) else list(stages)
    for name in names:
      self.stage(name)  # a clear KeyError for an unknown stage
    batches = {name: self.batch(name, position) for name in names}
    cols = max(1, min(int(examples), max(len(b["image"]) for b in batches.values())))
    fig, axes = plt.subplots(len(names), cols, squeeze=False,
                             figsize=(figsize_per_image * cols,
                                      figsize_per_image * len(names) + 0.4))
    overlay = ListedColormap([pictures.STRUCTURE_COLOURS["liver"],
                              pictures.STRUCTURE_COLOURS["tumour"]])
    for r, name in enumerate(names):
      batch = batches[name]
      image, label = batch["image"], batch["label"]
      size = "x".join(str(n) for n in image.shape[1:-1])
      if image.ndim == 5:  # 3-D rows: their middle slice
        image, label = image[:, image.shape[1] // 2], label[:, label.shape[1] // 2]
      centre = image.shape[-1] // 2
      vmin, vmax = (float(v) for v in np.percentile(image, [1, 99]))
      for c in range(cols):
        ax = axes[r, c]
        ax.set_xticks([])
        ax.set_yticks([])
        if c >= len(image):
          ax.set_axis_off()
          continue
        # Stored slices are [x, y]: shown as plot_slice shows them (patient right on the left).
        ax.imshow(image[c, :, :, centre].T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                  interpolation="nearest")
        ax.imshow(np.ma.masked_equal(label[c].T, 0), cmap=overlay, vmin=LIVER, vmax=TUMOUR,
                  alpha=0.4, origin="lower", interpolation="nearest")
        ax.invert_xaxis()
        ax.set_title(f"row {c}" + (" (tumour)" if (label[c] == TUMOUR).any() else ""),
                     fontsize=8)
      fraction = float(self.config.stages[name].get("tumour_fraction", None) or 0.0)
      share = f"\ntumour_fraction {fraction:g}" if fraction else ""
      axes[r, 0].set_ylabel(f"{name}\n{self.stage(name).pipeline} {size}{share}", fontsize=9)
    fig.suptitle(f"training batch {position} of each stage (augmented)", fontsize=10)
    fig.tight_layout()
    return fig

  def batch(self, stage: str, position: int = 0) -> dict[str, np.ndarray]:
    """Global batch `position` of a stage's training pipeline, finished (augmented, windowed)
    on the local CPU: `image` float32 [B, (D,) H, W, C] normalised, `label` int32, `mask`."""
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    from data_pipelines import pipelines  # pylint: disable=g-import-not-at-top
    info = self.stage(stage)
    with _quiet_absl_warnings():
      builder = self._prepared_builder()
    data = ml_collections.ConfigDict(self.config.data.to_dict())
    # One batch is wanted: no read-ahead, no worker processes.
    data.host_threads, data.prefetch_batches, data.worker_count = 1, 1, 0
    with pipelines.make_train_pipeline(
        builder, data, self.config.augment, self.config.stages[stage],
        int(self.config.seed) + info.index, 0, 1, start=int(position)) as stream:
      batch = next(stream)
    if stream.finish is not None:
      cpu = jax.local_devices(backend="cpu")[0]
      batch = jax.jit(stream.finish)(jax.device_put(batch, cpu))
    return {k: np.asarray(v) for k, v in batch.items()}

  def _prepared_builder(self):
    from data_pipelines import lits, lits_tfds  # pylint: disable=g-import-not-at-top
    data = self.config.data
    try:
      builder = lits_tfds.builder_for(data)
    except lits.CaseError as e:
      raise FileNotFoundError(f"cannot find the run's data ({e}); plot_batches reads the "
                              "prepared dataset of config.data") from e
    if not builder.is_prepared():
      raise FileNotFoundError(
          f"the run's dataset lits/{builder.builder_config.name} is not prepared in "
          f"{data.tfds_dir}; prepare it with `curriculum-seg prepare --config "
          f"{os.fspath(self.workdir / rundir.CONFIG_FILE)}` or the run's config file and "
          "overrides (relative paths in the config are relative to where the run trained)")
    return builder


def load_run(workdir: epath.PathLike, mesh=None) -> Run:
  """Reads a run directory (read-only). `mesh`: where weights are restored (default: one
  local CPU device; e.g. `curriculum_seg.sharding.make_mesh()` for the local accelerators)."""
  return Run(workdir, mesh=mesh)


def _load_case(case):
  from data_pipelines import lits  # pylint: disable=g-import-not-at-top
  if isinstance(case, lits.Case):
    return case
  if isinstance(case, (tuple, list)):
    return lits.load_case(*case)
  path = os.fspath(case)
  folder, name = os.path.split(path)
  segmentation = None
  if name.startswith("volume-"):
    candidate = os.path.join(folder, "segmentation-" + name[len("volume-"):])
    if epath.Path(candidate).exists():
      segmentation = candidate
  return lits.load_case(path, segmentation)


def _default_slice(reference: Optional[np.ndarray], prediction: Optional[np.ndarray],
                   num_slices: int) -> int:
  for volume, value in ((reference, TUMOUR), (reference, LIVER), (prediction, TUMOUR),
                        (prediction, LIVER)):
    if volume is None:
      continue
    mask = volume == value if value == TUMOUR else volume >= value
    counts = mask.sum(axis=(0, 1))
    if counts.any():
      return int(counts.argmax())
  return num_slices // 2

