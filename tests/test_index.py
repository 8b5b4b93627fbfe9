"""The split index: case and tumour-part tables, slice selection, case lookup, liver boxes."""

import numpy as np
import pytest

from data_pipelines import crops
from data_pipelines.index import SplitIndex, case_liver_boxes


class Builder:  # the builder's metadata, as SplitIndex reads it
  class info:  # noqa: N801
    metadata = {"index": {"train": {
        # case_number, first example, slices, liver z-range, stored rows and cols
        "cases": [[0, 0, 10, 2, 8, 40, 40], [3, 10, 6, -1, -1, 30, 52]],
        # example, component, centre row, centre col, diameter, area, stored_pixels, box
        "tumours": [[4, 1, 5, 5, 3, 7, 6, 4, 4, 7, 7], [5, 1, 5, 5, 3, 7, 0, 5, 5, 6, 6],
                    [7, 2, 9, 9, 2, 3, 1, 9, 9, 10, 10], [4, 2, 1, 1, 2, 3, 2, 0, 0, 2, 3],
                    [12, 1, 3, 3, 1, 1, 0, 3, 3, 4, 4]]}}}


def test_split_index_keeps_the_tumour_parts_visible_in_the_stored_labels():
  index = SplitIndex.from_builder(Builder, "train")
  assert index.num_examples == 16 and index.cases.shape == (2, 7)
  assert index.tumours.shape == (3, 11) and (index.tumours[:, 6] > 0).all()
  assert index.tumour_slices().tolist() == [4, 7]  # 5 and 12 lost their tumour when stored
  np.testing.assert_array_equal(index.slice_shapes([0, 9, 10, 15]),
                                [[40, 40], [40, 40], [30, 52], [30, 52]])


def test_a_missing_split_is_a_clear_error():
  with pytest.raises(ValueError, match=r"split 'validation' is not in the prepared dataset"):
    SplitIndex.from_builder(Builder, "validation")


def test_slice_selection_liver_range_with_margin_and_case_lookup():
  index = SplitIndex(split="train", cases=np.array(
      [[0, 0, 20, 5, 10], [3, 20, 10, -1, -1], [7, 30, 10, 0, 9]]), tumours=np.zeros((0, 7)),
      num_examples=40)
  np.testing.assert_array_equal(index.select("liver", 2), np.r_[3:13, 30:40])
  np.testing.assert_array_equal(index.liver_range_slices(0), np.r_[5:11, 30:40])
  np.testing.assert_array_equal(index.select("all", 2), np.arange(40))
  with pytest.raises(ValueError, match=r"data\.slice_selection"):
    index.select("tumour", 2)
  np.testing.assert_array_equal(index.case_rows([0, 19, 20, 39]), [0, 0, 1, 2])
  cases, slices_ = index.case_and_slice([0, 25, 39])
  np.testing.assert_array_equal(cases, [0, 3, 7])
  np.testing.assert_array_equal(slices_, [0, 5, 9])


def test_case_liver_boxes_are_the_liver_boxes_over_each_case_s_liver_slices():
  labels = np.zeros((30, 40, 40), np.uint8)
  labels[2:6, 10:20, 5:30] = 1   # case 0: slices 0..9, liver on 2..5
  labels[4, 12:14, 6:8] = 2
  labels[22:25, 3:9, 30:38] = 1  # case 2: slices 20..29
  index = SplitIndex(split="train", cases=np.array(
      [[0, 0, 10, 2, 5], [1, 10, 10, -1, -1], [2, 20, 10, 2, 4]]), tumours=np.zeros((0, 7)),
      num_examples=30)
  read = []

  def read_labels(examples):
    read.extend(int(e) for e in examples)
    return [labels[e] for e in examples]

  boxes = case_liver_boxes(read_labels, index, margin=2, threads=2)
  assert boxes.shape == (3, 4) and boxes.dtype == np.int64
  assert tuple(boxes[0]) == crops.liver_box(labels[0:10].transpose(1, 2, 0) >= 1, 2)
  assert (boxes[1] == -1).all()  # no liver
  assert tuple(boxes[2]) == crops.liver_box(labels[20:30].transpose(1, 2, 0) >= 1, 2)
  assert sorted(read) == [2, 3, 4, 5, 22, 23, 24]  # only the liver z-ranges are read
