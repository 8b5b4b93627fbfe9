"""A split's index: its cases, slices and tumour parts, from the prepared dataset's metadata.

The builder (lits_tfds) writes each split's examples in (case, slice) order and records, per
split, a row per case ([case_number, first_example, num_slices, liver_z_lo, liver_z_hi]) and a
row per tumour part (one 3-D component's cut through one slice). An example's position in the
split is its random-access index in the ArrayRecord files, so these tables are all the
samplers need to choose slices and patch centres without reading a record.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Sequence

import numpy as np

from data_pipelines import crops

SLICE_SELECTIONS = ("liver", "all")


@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """A split's case and tumour-part tables (from the builder's metadata) as arrays.

  `cases` rows: [case_number, first_example, num_slices, liver_z_lo, liver_z_hi, rows, cols]
  (rows x cols: the case's stored slice size);
  `tumours` rows: [example, component, centre_row, centre_col, diameter_mm, area_mm2,
  stored_pixels, row_min, col_min, row_max, col_max] (the part's box in stored edge
  coordinates, max exclusive), keeping only parts whose tumour survived resampling into the
  stored label (stored_pixels > 0): a patch centred on a lost part would hold no tumour label.
  """

  split: str
  cases: np.ndarray
  tumours: np.ndarray
  num_examples: int

  @classmethod
  def from_builder(cls, builder, split: str) -> "SplitIndex":
    index = builder.info.metadata.get("index", {})
    if split not in index:
      raise ValueError(f"split {split!r} is not in the prepared dataset (it has "
                       f"{sorted(index)}); prepare it again or choose another split")
    cases = np.asarray(index[split]["cases"], dtype=np.int64).reshape(-1, 7)
    tumours = np.asarray(index[split]["tumours"], dtype=np.float64).reshape(-1, 11)
    tumours = tumours[tumours[:, 6] > 0]
    return cls(split=split, cases=cases, tumours=tumours,
               num_examples=int(cases[:, 2].sum()) if len(cases) else 0)

  def tumour_slices(self) -> np.ndarray:
    """Sorted example indices of the slices holding a visible tumour part (stored_pixels > 0)."""
    return np.unique(self.tumours[:, 0].astype(np.int64))

  def case_rows(self, examples) -> np.ndarray:
    """Row in `cases` of each example index."""
    return np.searchsorted(self.cases[:, 1], np.asarray(examples), side="right") - 1

  def slice_shapes(self, examples) -> np.ndarray:
    """[n, 2] stored (rows, cols) of each example's slice."""
    return self.cases[self.case_rows(examples), 5:7]

  def case_and_slice(self, examples) -> tuple[np.ndarray, np.ndarray]:
    examples = np.asarray(examples, dtype=np.int64)
    rows = self.case_rows(examples)
    return (self.cases[rows, 0].astype(np.int32),
            (examples - self.cases[rows, 1]).astype(np.int32))

  def liver_range_slices(self, margin: int = 0) -> np.ndarray:
    """Example indices of the slices within each case's liver z-range widened by `margin`."""
    parts = []
    for first, n, lo, hi in self.cases[:, 1:5]:
      if lo < 0:
        continue
      parts.append(first + np.arange(max(0, lo - margin), min(n, hi + margin + 1)))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)

  def select(self, selection: str, margin: int) -> np.ndarray:
    """Example indices chosen by `data.slice_selection` ('liver' z-range +- margin, or 'all')."""
    if selection == "all":
      return np.arange(self.num_examples, dtype=np.int64)
    if selection == "liver":
      return self.liver_range_slices(margin)
    raise ValueError(f"data.slice_selection must be one of {SLICE_SELECTIONS}, got "
                     f"{selection!r}")


def case_liver_boxes(read_labels: Callable[[Sequence[int]], Sequence[np.ndarray]],
                     index: SplitIndex, margin: int, threads: int = 1) -> np.ndarray:
  """[num_cases, 4] int64 crop boxes (crops.liver_box of each case's reference liver over all
  its slices, in stored pixels), -1 rows for cases without liver.

  `read_labels(examples)` returns the stored label maps of those examples; each case's liver
  z-range from the index bounds the reads (every liver slice's label is read once).
  """
  boxes = np.full((len(index.cases), 4), -1, np.int64)

  def one(row):
    first, lo, hi = index.cases[row, [1, 3, 4]]
    if lo < 0:
      return row, None
    mask = None
    for label in read_labels(first + np.arange(lo, hi + 1)):
      slice_mask = label >= 1
      mask = slice_mask if mask is None else (mask | slice_mask)
    return row, crops.liver_box(mask, margin)

  with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
    for row, box in pool.map(one, range(len(index.cases))):
      if box is not None:
        boxes[row] = box
  return boxes
