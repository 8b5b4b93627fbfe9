"""The slice overlay picture of `evaluate` and `inspect`: one axial CT slice with contours.

One convention everywhere, stated in the legend: the colour says the structure (liver green,
tumour red, as `Run.plot_batches` colours labels), the line says the source (solid: reference,
dashed: prediction). The CT is shown in a display window (stated under the picture) in the
radiological view: the patient's right on the left of the picture, anterior at the top.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from data_pipelines.labels import LIVER, TUMOUR

# The pictures' grey scale: a soft-tissue window wide enough for hyper-dense lesions and
# enhanced liver (the paper's -60..140 HU input window shows both as white).
DISPLAY_WINDOW = (-150.0, 250.0)
STRUCTURE_COLOURS = {"liver": "limegreen", "tumour": "red"}
SOURCE_STYLES = {"reference": "solid", "predicted": "dashed"}


def _masks(labels: np.ndarray, structures) -> dict[str, np.ndarray]:
  masks = {"liver": labels >= LIVER, "tumour": labels == TUMOUR}
  return {name: masks[name] for name in structures}


def draw_slice(ax, image: np.ndarray, reference: Optional[np.ndarray] = None,
               prediction: Optional[np.ndarray] = None, spacing=(1.0, 1.0),
               hu_window: tuple[float, float] = DISPLAY_WINDOW,
               predicts_liver: Optional[bool] = None) -> None:
  """Draws an axial slice `image` (HU, [x, y]) on `ax` with the contours of `reference` and
  `prediction` (LiTS labels [x, y], either may be None) and the legend of the convention.

  Axes are voxels, shown at the slice's `spacing` (mm per voxel along x and y). A prediction's
  liver is drawn when `predicts_liver` (None: when the slice holds predicted liver); each contour
  set is labelled (and its gid set) 'reference liver', 'predicted tumour', ...
  """
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  lo, hi = hu_window
  sx, sy = spacing[0], spacing[1]
  ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=sy / sx,
            interpolation="nearest")
  layers = []
  if reference is not None:
    layers.append(("reference", reference, ("liver", "tumour")))
  if prediction is not None:
    if predicts_liver is None:
      predicts_liver = bool((prediction == LIVER).any())
    layers.append(("predicted", prediction, ("liver", "tumour") if predicts_liver
                   else ("tumour",)))
  handles = []
  for source, labels, structures in layers:
    style = SOURCE_STYLES[source]
    for structure, mask in _masks(labels, structures).items():
      label, colour = f"{source} {structure}", STRUCTURE_COLOURS[structure]
      if mask.any():
        contours = ax.contour(mask.T.astype(np.uint8), levels=[0.5], colors=[colour],
                              linestyles=style, linewidths=1.5)
        contours.set_label(label)
        contours.set_gid(label)
      handles.append(Line2D([], [], color=colour, linestyle=style, label=label))
  ax.invert_xaxis()  # RAS x grows to the patient's right: show it on the viewer's left
  ax.set_xlabel(f"x (patient right on the left); grey scale {lo:g}..{hi:g} HU")
  ax.set_ylabel("y (anterior up)")
  if handles:
    ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.6)
