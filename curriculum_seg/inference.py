"""Whole-volume inference: a trained run's network applied to every axial slice of a CT volume.

A volume (canonical int16 HU, from `data_pipelines.lits.load_case`) is cut into axial slices with
their neighbours as channels, resampled in-plane to the training grid and normalised exactly as
the dataset builder and pipelines do (`data_pipelines.slices`, `transforms.normalise_into`),
predicted whole or by a Gaussian sliding window (`sliding_window`) through a compiled predict
step sharded over the local devices, and the softmax probabilities are resampled back to the
volume's own grid. Slices go through a chunk at a time
(`InferenceOptions.chunk_slices`), so only one chunk's probabilities ever exist: a
512x512x1000 volume needs its int16 image, its uint8 mask and one chunk, never all its logits.

Post-processing (all optional, `InferenceOptions`): keep the largest liver component, keep
tumour only inside the predicted liver (or a liver mask the caller gives), drop tumour
components smaller than a volume in mm^3.

`load_network` restores a run's chosen checkpoint (or the stage/step asked for), only the model
variables, read-only, onto this host's devices, whatever mesh wrote them; `trained_run` opens a
run once and makes its segmenters.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from scipy import ndimage

from curriculum_seg import checkpoints as ckpt_lib
from curriculum_seg import curriculum, metrics, rundir, sharding, tasks, train_step, validation
from curriculum_seg.models import build_model
from curriculum_seg import sliding_window as sw
from curriculum_seg.sliding_window import sliding_window  # noqa: F401  (the public name)
from data_pipelines import augment, intensity, lits, pipelines, settings, slices, transforms
from data_pipelines.labels import LABEL_NAMES, LIVER, TUMOUR

_ORGAN_STRUCTURE = ndimage.generate_binary_structure(3, 3)   # the liver: 26-connected


class InferenceError(ValueError):
  """A run or checkpoint that cannot be used for inference (the message says why)."""


@dataclasses.dataclass(frozen=True)
class InferenceOptions:
  """How volumes are segmented.

  batch_size: slices per predict call (rounded up to a multiple of the local devices).
  chunk_slices: slices resampled and held as probabilities at a time (bounds memory).
  flip_tta: average the probabilities over the four in-plane mirrorings (4x the compute).
  largest_liver_component: keep only the largest 26-connected component of the predicted liver
    (label >= 1), removing everything outside it (tumours included).
  tumour_in_liver: keep tumour only inside the liver: the liver mask given to `predict`, else the
    predicted liver (models that predict one). Models without a liver and no mask: no effect.
  min_tumour_mm3: tumour components (6-connected) smaller than this volume are removed (they
    become liver where a liver is known, background elsewhere); 0 keeps all.
  """

  batch_size: int = 32
  chunk_slices: int = 64
  flip_tta: bool = False
  largest_liver_component: bool = True
  tumour_in_liver: bool = True
  min_tumour_mm3: float = 0.0

  def __post_init__(self):
    for name in ("batch_size", "chunk_slices"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"inference option {name} must be >= 1, got {getattr(self, name)}")
    if not float(self.min_tumour_mm3) >= 0:
      raise ValueError(f"inference option min_tumour_mm3 must be >= 0, got "
                       f"{self.min_tumour_mm3}")


# --------------------------------------------------------------------------- run directories

def read_run_config(workdir: epath.PathLike) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `workdir/config.json` (`rundir.read_config`)."""
  try:
    return rundir.read_config(workdir)
  except rundir.RunDirError as e:
    raise InferenceError(str(e)) from e


def _checkpoints(workdir: epath.PathLike, stage: str) -> ckpt_lib.StageCheckpoints:
  return ckpt_lib.StageCheckpoints(epath.Path(workdir) / "checkpoints", stage, read_only=True)


def chosen_checkpoint(workdir: epath.PathLike, config: Optional[ml_collections.ConfigDict] = None,
                      stage: Optional[str] = None) -> tuple[str, str, int]:
  """(stage, which, step) of the checkpoint a run hands out: of the last stage of the
  curriculum that has checkpoints (or of `stage`), the one it hands to evaluate and predict
  (`curriculum.handed_on`: its best by validation Dice when it has one, else its latest).
  """
  config = read_run_config(workdir) if config is None else config
  names = [stage] if stage is not None else list(reversed(list(config.curriculum)))
  for name in names:
    if name not in config.stages:
      raise InferenceError(f"stage {name!r} is not in the run's curriculum "
                           f"({', '.join(config.curriculum)})")
    ckpts = _checkpoints(workdir, name)
    which = curriculum.handed_on(curriculum.HANDS_OUT, ckpts.last_step(ckpt_lib.BEST) is not None)
    step = ckpts.last_step(which)
    if step is not None:
      return name, which, step
  raise InferenceError(f"{workdir}: no checkpoint of stage {names[0] if stage else 'any'} "
                       "to restore; has the run trained?")


@dataclasses.dataclass
class Network:
  """One trained network, ready to segment volumes slice by slice on `mesh`.

  The volume is resampled in plane to the run's grid (`image_size` pixels a slice, or
  `spacing_mm` millimetres a pixel), normalised as in training (`normaliser`), and predicted
  whole slice by whole slice (`window` None) or by a Gaussian sliding window of `window`
  pixels at `overlap` (`curriculum_seg.sliding_window`); probabilities are resampled back to
  the volume's own grid.
  """

  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  task: str
  image_size: Optional[int]
  context_slices: int
  normaliser: intensity.Normaliser
  mesh: jax.sharding.Mesh
  stage: str = ""
  which: str = ""
  step: int = -1
  meta: dict = dataclasses.field(default_factory=dict)
  spacing_mm: Optional[tuple[float, ...]] = None
  window: Optional[tuple[int, int]] = None
  overlap: float = 0.5
  sigma_scale: float = 0.125

  def __post_init__(self):
    self._steps: dict[bool, Any] = {}
    if self.image_size is None and self.spacing_mm is None:
      raise InferenceError("a network needs its grid: image_size or spacing_mm")
    if self.spacing_mm is not None and self.window is None:
      raise InferenceError("a network on a target spacing needs a sliding window "
                           "(config.eval.window)")

  @property
  def num_classes(self) -> int:
    return tasks.num_classes(self.task)

  @property
  def hu_window(self) -> tuple[float, float]:
    """The HU range the input is clipped to."""
    return self.normaliser.lo, self.normaliser.hi

  def _predict_step(self, flip_tta: bool):
    if flip_tta not in self._steps:
      self._steps[flip_tta] = train_step.make_predict_step(self.model, self.mesh,
                                                           flip_tta=flip_tta)
    return self._steps[flip_tta]

  def slice_probabilities(self, stacks: np.ndarray,
                          options: InferenceOptions = InferenceOptions()) -> np.ndarray:
    """Softmax probabilities [N, *spatial, K] of normalised inputs [N, *spatial, C] (float32:
    slice stacks, or a 3-D network's blocks), each predicted whole."""
    n = stacks.shape[0]
    devices = self.mesh.size
    batch = int(math.ceil(int(options.batch_size) / devices) * devices)
    step = self._predict_step(bool(options.flip_tta))
    out = np.empty(stacks.shape[:-1] + (self.num_classes,), np.float32)
    data = sharding.batch_sharding(self.mesh)
    for b0 in range(0, n, batch):
      part = stacks[b0:b0 + batch]
      m = part.shape[0]
      if m < batch:  # one compiled shape: pad the last batch and drop the padding
        part = np.concatenate([part, np.zeros((batch - m,) + part.shape[1:], part.dtype)])
      probs = step(self.variables, jax.device_put(part, data))
      out[b0:b0 + m] = np.asarray(jax.device_get(probs))[:m]
    return out

  def stored_shape(self, image: np.ndarray, spacing=None) -> tuple[int, int]:
    """The (rows, cols) the network sees a slice of `image` (spacing in mm per axis) at."""
    if self.spacing_mm is not None and spacing is None:
      raise InferenceError("this network works at a target spacing: give the volume's spacing")
    return slices.stored_shape(image.shape, spacing if spacing is not None else (1, 1, 1),
                               self.image_size, self.spacing_mm)

  def slice_stacks(self, image: np.ndarray, z0: int, z1: int, normalise: bool = True,
                   spacing=None) -> np.ndarray:
    """Model inputs [z1 - z0, H, W, C] of slices z0..z1 of a canonical int16 volume on the
    network's grid: normalised float32, or (`normalise=False`) the resampled int16 HU, for
    callers that warp HU first. `spacing` (mm per axis) is needed on a target spacing."""
    size, context = self.stored_shape(image, spacing), self.context_slices
    neighbours = slices.context_indices(image.shape[2], context)[z0:z1]
    needed = np.unique(neighbours)
    resampled = slices.resample_image(np.ascontiguousarray(image[:, :, needed]), size)
    where = np.searchsorted(needed, neighbours)  # [n, C] into the resampled slices
    hu = np.moveaxis(resampled[:, :, where], 2, 0)
    if not normalise:
      return hu
    stacks = np.empty(hu.shape, np.float32)
    transforms.normalise_into(stacks, hu, self.normaliser)
    return stacks

  def stack_probabilities(self, stacks: np.ndarray,
                          options: InferenceOptions = InferenceOptions()) -> np.ndarray:
    """Probabilities [N, H, W, K] of normalised stacks [N, H, W, C]: each whole, or by the
    network's sliding window (windows of all the stacks batched together)."""
    if self.window is None:
      return self.slice_probabilities(stacks, options)
    pad = float(self.normaliser(np.array([augment.AIR_HU], np.float32))[0])
    predict = lambda w: self.slice_probabilities(w[:, 0], options)[:, None]  # noqa: E731
    return sw.sliding_window(predict, stacks, (1,) + tuple(self.window),
                                         overlap=self.overlap, sigma_scale=self.sigma_scale,
                                         batch_size=int(options.batch_size), pad_value=pad)

  @property
  def spatial_dims(self) -> int:
    return 3 if self.window is not None and len(self.window) == 3 else 2

  def _volume_probabilities_3d(self, image: np.ndarray, options: InferenceOptions, spacing
                               ) -> Iterator[tuple[int, int, np.ndarray]]:
    """A 3-D network's probabilities of a volume: resampled to the network's grid (in plane,
    and along z to spacing_mm's slice spacing when it has one), one 3-D sliding window over all
    of it, and back to the volume's grid chunk by chunk. The network-grid probabilities are held
    as float16 (a LiTS volume at 1 mm: a few hundred MB)."""
    x, y, z = image.shape
    target_z = self.spacing_mm[2] if self.spacing_mm and len(self.spacing_mm) == 3 else None
    if target_z is not None and spacing is None:
      raise InferenceError("this network works at a target spacing: give the volume's spacing")
    depth = slices.stored_depth(z, spacing[2], target_z) if target_z else z
    if depth != z:
      image = slices.resample_depth(image, depth)
      spacing = (spacing[0], spacing[1], spacing[2] * z / depth)
    stacks = self.slice_stacks(image, 0, depth, spacing=spacing)  # [depth, H, W, C]
    pad = float(self.normaliser(np.array([augment.AIR_HU], np.float32))[0])
    grid = np.empty(stacks.shape[:-1] + (self.num_classes,), np.float16)
    for z0, z1, probs in sw.sliding_window_slabs(
        lambda w: self.slice_probabilities(w, options), stacks, tuple(self.window),
        overlap=self.overlap, sigma_scale=self.sigma_scale, batch_size=int(options.batch_size),
        pad_value=pad):
      grid[z0:z1] = probs
    del stacks
    lo, hi, w = slices.z_weights(depth, z)  # the volume's slices on the network's grid
    for k0 in range(0, z, int(options.chunk_slices)):
      k1 = min(z, k0 + int(options.chunk_slices))
      wk = w[k0:k1, None, None, None]
      probs = (grid[lo[k0:k1]].astype(np.float32) * (1 - wk)
               + grid[hi[k0:k1]].astype(np.float32) * wk)
      yield k0, k1, slices.resample_probabilities_back(probs, (x, y))

  def volume_probabilities(self, image: np.ndarray,
                           options: InferenceOptions = InferenceOptions(),
                           z_range: Optional[tuple[int, int]] = None, spacing=None
                           ) -> Iterator[tuple[int, int, np.ndarray]]:
    """(z0, z1, probabilities [z1 - z0, X, Y, K]) chunk by chunk over a canonical volume.

    Probabilities are on the volume's own in-plane grid (bilinear back from the network's).
    Only one chunk exists at a time (a 3-D network: see `_volume_probabilities_3d`); `z_range`
    limits the slices (default: all; 2-D networks); `spacing` (mm per axis) is needed on a
    target spacing.
    """
    if image.ndim != 3:
      raise ValueError(f"expected a 3-D (X, Y, Z) volume, got shape {image.shape}")
    if self.spatial_dims == 3:
      if z_range is not None:
        raise InferenceError("a 3-D network segments whole volumes (no z_range)")
      yield from self._volume_probabilities_3d(image, options, spacing)
      return
    x, y, z = image.shape
    start, stop = (0, z) if z_range is None else (max(0, z_range[0]), min(z, z_range[1]))
    for z0 in range(start, stop, int(options.chunk_slices)):
      z1 = min(stop, z0 + int(options.chunk_slices))
      probs = self.stack_probabilities(self.slice_stacks(image, z0, z1, spacing=spacing),
                                       options)
      yield z0, z1, slices.resample_probabilities_back(probs, (x, y))

  def label_volume(self, image: np.ndarray, options: InferenceOptions = InferenceOptions(),
                   probabilities: Optional[np.ndarray] = None, spacing=None) -> np.ndarray:
    """The raw argmax labels (X, Y, Z) uint8 in LiTS values: 0/2 tumour, 0/1 liver, 0/1/2.

    `probabilities`, an (X, Y, Z, K) array (float16 keeps it at half a float32 copy), is filled
    with the softmax chunk by chunk, classes in the order of `classes()`.
    """
    labels = np.zeros(image.shape, np.uint8)
    to_lits = self.classes()
    if probabilities is not None and probabilities.shape != image.shape + (len(to_lits),):
      raise ValueError(f"probabilities of shape {probabilities.shape} do not fit the volume "
                       f"{image.shape} and {len(to_lits)} classes")
    for z0, z1, probs in self.volume_probabilities(image, options, spacing=spacing):
      labels[:, :, z0:z1] = np.moveaxis(to_lits[probs.argmax(-1)], 0, 2)
      if probabilities is not None:
        probabilities[:, :, z0:z1] = np.moveaxis(probs, 0, 2)
    return labels

  def classes(self) -> np.ndarray:
    """The LiTS label value of each output class of the network (uint8)."""
    return tasks.lits_labels(self.task)


def default_mesh() -> jax.sharding.Mesh:
  """A 1-D 'data' mesh over this process's devices (inference is per host)."""
  if jax.process_count() == 1:
    return sharding.make_mesh()
  return jax.make_mesh((jax.local_device_count(),), (sharding.DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=jax.local_devices())


def load_network(workdir: epath.PathLike, *, stage: Optional[str] = None,
                 step: Optional[int] = None, which: Optional[str] = None,
                 mesh: Optional[jax.sharding.Mesh] = None,
                 config: Optional[ml_collections.ConfigDict] = None) -> Network:
  """Restores one checkpoint's model variables (read-only) onto `mesh` (default: local devices).

  Default: the run's chosen checkpoint (`chosen_checkpoint`). `stage` alone: that stage's best
  (else latest); `step`: that step of `which` (default: latest, else best).
  """
  config = read_run_config(workdir) if config is None else config
  if which not in (None, ckpt_lib.BEST, ckpt_lib.LATEST):
    raise InferenceError(f"checkpoint kind {which!r} is not 'best' or 'latest'")
  if stage is None and step is None and which is None:
    stage, which, step = chosen_checkpoint(workdir, config)
  else:
    if stage is None:
      stage = chosen_checkpoint(workdir, config)[0]
    elif stage not in config.stages:
      raise InferenceError(f"stage {stage!r} is not in the run's curriculum "
                           f"({', '.join(config.curriculum)})")
    ckpts = _checkpoints(workdir, stage)
    if which is None:
      kinds = (ckpt_lib.LATEST, ckpt_lib.BEST) if step is not None else (ckpt_lib.BEST,
                                                                           ckpt_lib.LATEST)
      which = next((k for k in kinds if (step in ckpts.steps(k) if step is not None
                                         else ckpts.steps(k))), None)
      if which is None:
        raise InferenceError(f"{workdir}: stage {stage!r} has no checkpoint"
                             + (f" at step {step}" if step is not None else "")
                             + f" (latest: {ckpts.steps(ckpt_lib.LATEST)}, best: "
                               f"{ckpts.steps(ckpt_lib.BEST)})")
    if step is None:
      step = ckpts.last_step(which)
      if step is None:
        raise InferenceError(f"{workdir}: stage {stage!r} has no {which} checkpoint")
    elif step not in ckpts.steps(which):
      raise InferenceError(f"{workdir}: stage {stage!r} has no {which} checkpoint at step {step} "
                           f"(its {which} steps: {ckpts.steps(which)})")
  mesh = default_mesh() if mesh is None else mesh
  model_cfg = curriculum.stage_model_config(config, stage)
  context = int(config.data.context_slices)
  model = build_model(model_cfg, context)
  size = config.data.get("image_size", None)
  size = None if size is None else int(size)
  window = validation.eval_window(config)
  init_shape = (1,) + tuple(window or (size, size)) + (context,)
  shapes = jax.eval_shape(
      lambda rng: model.init(rng, jnp.zeros(init_shape, jnp.float32), train=False),
      jax.random.PRNGKey(0))
  abstract = ckpt_lib.abstract_like(
      dict(params=shapes["params"], batch_stats=shapes.get("batch_stats", {})),
      sharding.replicated(mesh))
  variables, meta = _checkpoints(workdir, stage).restore_variables(abstract, which, step)
  if not variables.get("batch_stats"):
    variables.pop("batch_stats", None)
  # Checkpoints record the input normalisation; those of older runs used the config's window.
  normaliser = (intensity.Normaliser.from_dict(meta["normaliser"]) if meta.get("normaliser")
                else intensity.window(*pipelines.hu_window(config.data)))
  return Network(config=config, model=model, variables=variables, task=str(model_cfg.task),
                 image_size=size, context_slices=context, normaliser=normaliser, mesh=mesh,
                 stage=stage, which=which, step=int(step), meta=meta,
                 spacing_mm=settings.target_spacing(config.data), window=window,
                 overlap=float(config.eval.overlap),
                 sigma_scale=float(config.eval.sigma_scale))


# --------------------------------------------------------------------------- post-processing

def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 26-connected component of a boolean 3-D mask (empty stays empty)."""
  components, n = ndimage.label(mask, structure=_ORGAN_STRUCTURE)
  if n <= 1:
    return mask.astype(bool)
  sizes = np.bincount(components.ravel())
  sizes[0] = 0
  return components == int(sizes.argmax())


def check_liver_mask(liver: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A given liver mask as booleans; ValueError unless it has the volume's `shape`."""
  liver = np.asarray(liver).astype(bool)
  if liver.shape != tuple(shape):
    raise ValueError(f"liver mask of shape {liver.shape} does not match the volume "
                     f"{tuple(shape)}")
  return liver


def postprocess(labels: np.ndarray, spacing, *, predicts_liver: bool,
                options: InferenceOptions = InferenceOptions(),
                liver: Optional[np.ndarray] = None) -> np.ndarray:
  """Applies `options`' post-processing to a LiTS label map in place and returns it.

  `liver` (boolean, same shape) is a given liver mask: it bounds the tumour and is written as
  label 1 where no tumour is predicted. Without it, a model that predicts liver (`predicts_liver`)
  bounds its own tumour.
  """
  if liver is not None:
    liver = check_liver_mask(liver, labels.shape)
  elif predicts_liver and options.largest_liver_component:
    organ = labels >= LIVER
    if organ.any():
      labels[~largest_component(organ)] = 0
  bound = liver if liver is not None else (labels >= LIVER if predicts_liver else None)
  if options.tumour_in_liver and bound is not None:
    labels[(labels == TUMOUR) & ~bound] = 0
  if options.min_tumour_mm3 > 0:
    components, n = ndimage.label(labels == TUMOUR, structure=metrics.LESION_STRUCTURE)
    if n:
      voxel_mm3 = float(np.prod(np.asarray(spacing, np.float64)))
      sizes = np.bincount(components.ravel()) * voxel_mm3
      small = sizes < float(options.min_tumour_mm3)
      small[0] = False
      drop = small[components]
      replacement = np.uint8(LIVER) if (predicts_liver or liver is not None) else np.uint8(0)
      labels[drop] = replacement
      if liver is not None:
        labels[drop & ~liver] = 0
  if liver is not None:
    labels[(labels == 0) & liver] = LIVER
  return labels


# --------------------------------------------------------------------------- predictors

class Predictor:
  """A run's network(s) as a volume -> LiTS mask function (`predict`, `predict_case`, files)."""

  def __init__(self, network: Network, options: InferenceOptions = InferenceOptions()):
    self.network = network
    self.networks = {network.stage: network}
    self.config = network.config
    self.task = network.task
    self.options = options

  @property
  def predicts_liver(self) -> bool:
    return self.task in tasks.LIVER_TASKS

  def describe(self) -> str:
    n = self.network
    return f"stage {n.stage} {n.which} checkpoint at step {n.step} (task {n.task})"

  def predict(self, image: np.ndarray, spacing, liver: Optional[np.ndarray] = None,
              probabilities: Optional[np.ndarray] = None) -> np.ndarray:
    """LiTS labels (X, Y, Z) uint8 of a canonical int16 HU volume (see `postprocess`).

    `probabilities` ((X, Y, Z, K), see `Network.label_volume`) receives the network's softmax,
    before post-processing (as nnU-Net's saved probabilities).
    """
    labels = self.network.label_volume(_check_image(image), self.options, probabilities,
                                       spacing=spacing)
    return postprocess(labels, spacing, predicts_liver=self.predicts_liver,
                       options=self.options, liver=liver)

  def predict_case(self, case: lits.Case, liver: Optional[np.ndarray] = None,
                   probabilities: Optional[np.ndarray] = None) -> np.ndarray:
    """Canonical LiTS labels of a loaded case (`case.save_mask` writes them in its geometry)."""
    if probabilities is None:  # subclasses (the cascade) have no `probabilities` to fill
      return self.predict(case.image, case.spacing, liver=liver)
    return self.predict(case.image, case.spacing, liver=liver, probabilities=probabilities)

  def probability_classes(self) -> np.ndarray:
    """The LiTS label of each softmax class; InferenceError where no single softmax exists."""
    if len(self.networks) != 1:
      raise InferenceError(f"{self.describe()}: chains several networks, so it has no single "
                           "softmax to save as probabilities")
    return self.network.classes()

  def predict_file(self, volume_path: epath.PathLike, output_path: epath.PathLike,
                   liver_path: Optional[epath.PathLike] = None,
                   probabilities_path: Optional[epath.PathLike] = None) -> np.ndarray:
    """Segments one NIfTI volume and writes the mask with the input's shape, affine, orientation.

    Returns the canonical labels. With `probabilities_path` (`.npz`) the network's softmax is
    written too (`save_probabilities`). Outputs are written atomically (never half-written).
    """
    check_output_path(output_path)
    classes = None
    if probabilities_path is not None:
      check_probabilities_path(probabilities_path)
      classes = self.probability_classes()
    case = lits.load_case(volume_path)
    liver = load_liver_mask(liver_path, case) if liver_path is not None else None
    # float16, on the canonical grid and then (briefly both) in the file's layout: at most the
    # bytes of one float32 copy of the K x volume softmax.
    probabilities = None if classes is None else np.empty(case.image.shape + (len(classes),),
                                                          np.float16)
    labels = self.predict_case(case, liver=liver, probabilities=probabilities)
    if probabilities is not None:
      probabilities = case.to_original(probabilities)  # drops the canonical copy
      save_probabilities(probabilities_path, np.moveaxis(probabilities, -1, 0), classes)
      del probabilities
    case.save_mask(labels, output_path)
    return labels


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"expected a 3-D (X, Y, Z) HU volume, got shape {image.shape}")
  if image.dtype != np.int16:
    if not np.issubdtype(image.dtype, np.number):
      raise ValueError(f"expected HU values, got dtype {image.dtype}")
    image = np.clip(np.rint(image), lits.HU_MIN, lits.HU_MAX).astype(np.int16)
  return image


def check_output_path(path: epath.PathLike) -> None:
  """Refuses output names that are not NIfTI or whose folder does not exist, before any work."""
  path = epath.Path(path)
  if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
    raise InferenceError(f"{path}: the output mask must be a .nii or .nii.gz file")
  if "://" not in os.fspath(path) and not path.parent.is_dir():
    raise InferenceError(f"{path}: the output folder {path.parent} does not exist")
  if path.is_dir():
    raise InferenceError(f"{path}: is a folder, expected a mask file name")


def probabilities_path_for(mask_path: epath.PathLike) -> str:
  """`X.npz` beside a mask `X.nii.gz` or `X.nii`."""
  text = os.fspath(mask_path)
  for ext in (".nii.gz", ".nii"):
    if text.endswith(ext):
      return text[:-len(ext)] + ".npz"
  return text + ".npz"


def check_probabilities_path(path: epath.PathLike) -> None:
  """Refuses a probabilities name that is not `.npz` or whose folder does not exist."""
  path = epath.Path(path)
  if not path.name.endswith(".npz"):
    raise InferenceError(f"{path}: the probabilities file must be a .npz file")
  if "://" not in os.fspath(path) and not path.parent.is_dir():
    raise InferenceError(f"{path}: the output folder {path.parent} does not exist")
  if path.is_dir():
    raise InferenceError(f"{path}: is a folder, expected a .npz file name")


def save_probabilities(path: epath.PathLike, probabilities: np.ndarray,
                       classes: np.ndarray) -> None:
  """Writes `path` (.npz, zip-deflated as nnU-Net's): `probabilities` float16 (K, *the mask
  file's array shape*), `classes` (uint8 LiTS label of each class) and `class_names`.

  Atomic (lits.write_atomically), with the permissions the process umask gives a new file.
  `probabilities` may be a strided view: numpy writes it in buffered pieces, without a copy.
  """
  def write(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
      np.savez_compressed(f, probabilities=probabilities.astype(np.float16, copy=False),
                          classes=np.asarray(classes, np.uint8),
                          class_names=np.array([LABEL_NAMES[int(c)] for c in classes]))

  lits.write_atomically(path, write, ".npz")


def load_liver_mask(path: epath.PathLike, case: lits.Case) -> np.ndarray:
  """A liver mask file (non-zero = liver, e.g. a LiTS segmentation) on `case`'s canonical grid."""
  mask_case = lits.load_case(case.volume_path, path)
  return mask_case.labels >= LIVER
