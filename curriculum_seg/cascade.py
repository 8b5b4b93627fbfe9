"""The cascade baseline at inference: the liver network, then the tumour network on the liver box.

A cascade run (`config.cascade` names its `liver_stage` and `tumour_stage`) trains two networks:
a liver network on whole slices and a tumour network on slices cropped to the case's liver box
(`pipeline='liver_crop'`, see data_pipelines/crops.py). `CascadePredictor.predict` chains them on
a canonical volume the way training cropped:

1. the liver network segments every slice (whole slices, as it trained); the predicted liver is
   reduced to its largest component (`InferenceOptions.largest_liver_component`), or a liver
   mask the caller gives replaces it;
2. that liver, resampled to the stored in-plane grid exactly as the dataset builder resamples the
   reference labels (`slices.resample_labels`), gives the crop box with the training function
   (`crops.liver_box` with the tumour stage's `crop_margin`);
3. the tumour network segments the slices of the liver's z-range, cropped to the box and resized
   to the stage's `crop_size` by the pipelines' own warp (`crops.crop_slices` on HU, then the
   HU window), and its probabilities are mapped back into the box (`crops.uncrop_probabilities`)
   and on to the volume's grid;
4. tumour is kept inside the liver; `inference.postprocess` applies the remaining options.
"""

from __future__ import annotations

from typing import Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from curriculum_seg import inference, tasks
from data_pipelines import crops, pipelines, slices, transforms
from data_pipelines.labels import LIVER, TUMOUR


class CascadePredictor(inference.Predictor):
  """A cascade run's two networks as one volume -> LiTS mask function."""

  def __init__(self, liver: inference.Network, tumour: inference.Network, crop_size: int,
               crop_margin: int, options: Optional[inference.InferenceOptions] = None):
    options = inference.InferenceOptions() if options is None else options
    if liver.task != "liver":
      raise inference.InferenceError(f"the cascade's liver network (stage {liver.stage!r}) has "
                                     f"task {liver.task!r}, not 'liver'")
    if tumour.task not in tasks.TUMOUR_TASKS:
      raise inference.InferenceError(f"the cascade's tumour network (stage {tumour.stage!r}) "
                                     f"has task {tumour.task!r}, not one of "
                                     f"{sorted(tasks.TUMOUR_TASKS)}")
    super().__init__(tumour, options)
    self.liver_network = liver
    self.tumour_network = tumour
    self.networks = {liver.stage: liver, tumour.stage: tumour}
    self.crop_size = int(crop_size)
    self.crop_margin = int(crop_margin)
    self.task = "cascade"

  @property
  def predicts_liver(self) -> bool:
    return True

  def describe(self) -> str:
    parts = [f"{n.stage} {n.which} checkpoint at step {n.step} (task {n.task})"
             for n in (self.liver_network, self.tumour_network)]
    return ("cascade: " + " -> ".join(parts)
            + f"; tumour network on liver boxes + {self.crop_margin} px resized to "
              f"{self.crop_size}")

  # --- the steps ---------------------------------------------------------------------------

  def predict_liver(self, image: np.ndarray, spacing=None) -> np.ndarray:
    """The liver network's liver (X, Y, Z) bool, reduced to its largest component per options."""
    liver = self.liver_network.label_volume(image, self.options,
                                            spacing=spacing) >= LIVER
    if self.options.largest_liver_component and liver.any():
      liver = inference.largest_component(liver)
    return liver

  def crop_box(self, liver: np.ndarray, spacing=None) -> Optional[crops.Box]:
    """The crop box in stored pixels of a liver mask on the volume's grid (None: no liver)."""
    stored = slices.resample_labels(np.ascontiguousarray(liver, dtype=np.uint8),
                                    self.tumour_network.stored_shape(liver, spacing),
                                    num_classes=2)
    return crops.liver_box(stored >= LIVER, self.crop_margin)

  def tumour_mask(self, image: np.ndarray, liver: np.ndarray, spacing=None) -> np.ndarray:
    """The tumour network's tumour (X, Y, Z) bool within the liver's box and z-range."""
    tumour = np.zeros(image.shape, bool)
    box = self.crop_box(liver, spacing)
    if box is None:
      return tumour
    net, options = self.tumour_network, self.options
    zs = np.flatnonzero(liver.any(axis=(0, 1)))
    size = net.stored_shape(image, spacing)
    tumour_class = tasks.tumour_class(net.task)
    for z0 in range(int(zs[0]), int(zs[-1]) + 1, int(options.chunk_slices)):
      z1 = min(int(zs[-1]) + 1, z0 + int(options.chunk_slices))
      hu, _ = crops.crop_slices(net.slice_stacks(image, z0, z1, normalise=False,
                                                 spacing=spacing), box, self.crop_size)
      stacks = np.empty_like(hu)
      transforms.normalise_into(stacks, hu, net.normaliser)
      probs = net.slice_probabilities(stacks, options)
      probs = crops.uncrop_probabilities(probs, box, size)
      probs = slices.resample_probabilities_back(probs, image.shape[:2])
      tumour[:, :, z0:z1] = np.moveaxis(probs.argmax(-1) == tumour_class, 0, 2)
    return tumour

  def predict(self, image: np.ndarray, spacing, liver: Optional[np.ndarray] = None) -> np.ndarray:
    """LiTS labels (X, Y, Z) uint8 in {0, 1, 2} of a canonical int16 HU volume.

    `liver` (bool, the volume's shape) replaces the liver network's liver (then it is also the
    returned liver).
    """
    image = inference._check_image(image)  # pylint: disable=protected-access
    if liver is not None:
      liver = organ = inference.check_liver_mask(liver, image.shape)
    else:
      organ = self.predict_liver(image, spacing)
    labels = organ.astype(np.uint8) * np.uint8(LIVER)
    tumour = self.tumour_mask(image, organ, spacing)
    labels[tumour & organ] = TUMOUR  # the cascade: tumour only inside the liver
    return inference.postprocess(labels, spacing, predicts_liver=True, options=self.options,
                                 liver=liver)


def cascade_stages(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(liver stage, tumour stage) of a cascade config."""
  cascade = config.get("cascade", None)
  if not cascade:
    raise inference.InferenceError("the run's config has no `cascade` section: not a cascade run")
  liver, tumour = cascade.get("liver_stage", None), cascade.get("tumour_stage", None)
  for key, name in (("liver_stage", liver), ("tumour_stage", tumour)):
    if name not in config.stages:
      raise inference.InferenceError(f"config.cascade.{key}={name!r} is not a stage of the run "
                                     f"({', '.join(config.curriculum)})")
  return liver, tumour


def load_cascade_predictor(workdir: epath.PathLike,
                           config: Optional[ml_collections.ConfigDict] = None, *,
                           mesh: Optional[jax.sharding.Mesh] = None,
                           options: Optional[inference.InferenceOptions] = None,
                           which: Optional[str] = None) -> CascadePredictor:
  """A cascade run's predictor: each network's best checkpoint by its own validation Dice (else
  its latest), or each network's `which` ('best' / 'latest') checkpoint."""
  config = inference.read_run_config(workdir) if config is None else config
  options = inference.InferenceOptions() if options is None else options
  liver_stage, tumour_stage = cascade_stages(config)
  liver = inference.load_network(workdir, stage=liver_stage, which=which, mesh=mesh,
                                 config=config)
  tumour = inference.load_network(workdir, stage=tumour_stage, which=which, mesh=liver.mesh,
                                  config=config)
  stage = config.stages[tumour_stage]
  size, margin = pipelines.crop_settings(stage, config.data.get("image_size", None))
  return CascadePredictor(liver, tumour, size, margin, options)
