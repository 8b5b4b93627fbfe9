"""The named transforms: per-process rows, reading, patch crops, augmentation draws, liver-box
maps, evaluation rows, windowing; each on small arrays, and each picklable for Grain's workers."""

import cloudpickle
import numpy as np
import pytest

from data_pipelines import augment, crops, intensity, samplers
from data_pipelines import transforms as T
from data_pipelines.index import SplitIndex

SPEC = augment.AugmentSpec(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0,
                           scale_range=(0.9, 1.1), intensity_shift=0.05, intensity_scale=0.05)
INDEX = SplitIndex(split="train", cases=np.array([[4, 0, 3, 0, 2], [9, 3, 3, 0, 1]]),
                   tumours=np.array([[1, 1, 10.0, 12.0, 5.0, 9.0, 4]]), num_examples=6)


class FakeRecords:
  """Slices whose pixels say where they are: image[..., c] = 100 * example + row + c."""

  image_size, channels = 24, 3

  def __getitem__(self, example):
    rows = np.arange(24)[:, None, None] + np.zeros((1, 24, 3), np.int16)
    image = (100 * example + rows + np.arange(3)).astype(np.int16)
    label = np.zeros((24, 24), np.uint8)
    label[4:20, 4:20] = 1
    label[8:12, 10:14] = 2 if example == 1 else 1
    return image, label


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_rows_are_disjoint_shares_of_every_global_batch(count):
  b = 8 // count
  shares = [[T.ProcessRows(8, p * b, b).map(k) for k in range(5 * b)] for p in range(count)]
  for batch in range(5):
    rows = np.concatenate([share[batch * b:(batch + 1) * b] for share in shares])
    np.testing.assert_array_equal(rows, batch * 8 + np.arange(8))  # process order = row order


def test_read_slice_reads_the_planned_example_and_pads_with_zeros():
  read = T.ReadSlice(FakeRecords())
  row = read.map(dict(example=np.int64(2), position=np.int64(7)))
  assert row["position"] == 7 and row["image"][5, 0, 1] == 206 and row["label"].shape == (24, 24)
  pad = read.map(dict(example=np.int64(-1), position=np.int64(8), real=np.bool_(False)))
  assert pad["image"].shape == (24, 24, 3) and not pad["image"].any() and not pad["label"].any()


def test_crop_patch_cuts_the_footprint_around_the_centre_with_air_outside():
  sampler = samplers.PatchSampler(INDEX, 0, 4, 0.5, "component", 0.0, 8)
  crop = T.CropPatch(12)
  image, label = FakeRecords()[1]
  row = crop.map(dict(example=np.int64(1), positive=np.bool_(True), centre=np.array([10, 12]),
                      pixel_u=0.5, image=image, label=label))
  np.testing.assert_array_equal(row["image"], image[4:16, 6:18])
  np.testing.assert_array_equal(row["label"], label[4:16, 6:18])
  row = crop.map(dict(example=np.int64(1), positive=np.bool_(True), centre=np.array([2, 22]),
                      pixel_u=0.5, image=image, label=label))
  assert (row["image"][:4] == augment.AIR_HU).all() and (row["image"][:, 8:] == -1024).all()
  np.testing.assert_array_equal(row["image"][4:, :8], image[:8, 16:])
  assert not row["label"][:4].any() and not row["label"][:, 8:].any()
  # A negative row is centred on a tumour-free liver pixel that the label decides.
  row = crop.map(T.PlacePatch(sampler).map(dict(
      example=np.int64(1), positive=np.bool_(False), centre=np.array([-1, -1]), pixel_u=0.3,
      image=image, label=label)))
  r, c = sampler.negative_centre(label, True, 0.3)
  np.testing.assert_array_equal(row["label"], np.pad(label, 6)[r:r + 12, c:c + 12])


def test_augmentation_draws_are_a_pure_function_of_the_positions():
  draw = T.DrawAugmentation(SPEC, 5, 7.5, 11.5)
  positions = np.arange(40, 48)
  batch = draw.map(dict(position=positions, image=np.zeros((8, 2, 2, 1))))
  params = augment.sample_params(SPEC, 5, positions)
  np.testing.assert_array_equal(batch["affine"], augment.affine_matrices(params, 7.5, 11.5))
  np.testing.assert_array_equal(batch["intensity"], augment.intensity_pairs(params))
  assert batch["affine"].dtype == np.float32 and batch["affine"].shape == (8, 2, 3)
  # A process's share of the rows draws exactly the rows' parameters of the whole batch.
  for rows in (slice(0, 4), slice(4, 8), slice(6, 8)):
    share = draw.map(dict(position=positions[rows]))
    np.testing.assert_array_equal(share["affine"], batch["affine"][rows])
    np.testing.assert_array_equal(share["intensity"], batch["intensity"][rows])
  off = T.DrawAugmentation(augment.AugmentSpec(), 5, 7.5, 7.5).map(dict(position=positions))
  np.testing.assert_array_equal(off["affine"], np.broadcast_to([[1, 0, 0], [0, 1, 0]], (8, 2, 3)))
  np.testing.assert_array_equal(off["intensity"], np.broadcast_to([1, 0], (8, 2)))


def test_liver_box_map_composes_the_crop_of_each_row_s_case():
  boxes = np.array([[2, 3, 18, 19], [-4, 0, 28, 32]])
  identity = T.DrawAugmentation(augment.AugmentSpec(), 0, 7.5, 7.5).map(
      dict(position=np.arange(4), example=np.array([0, 4, 2, 3])))
  batch = T.MapIntoLiverBox(INDEX, boxes, 16).map(identity)
  for k, case_row in enumerate([0, 1, 0, 1]):
    np.testing.assert_allclose(batch["affine"][k], crops.crop_affine(boxes[case_row], 16),
                               atol=1e-6)
  assert batch["affine"].dtype == np.float32


def test_train_rows_keep_the_batch_keys():
  batch = dict(image=np.zeros((2, 4, 4, 3), np.int16), label=np.zeros((2, 4, 4), np.uint8),
               affine=np.zeros((2, 2, 3), np.float32), intensity=np.ones((2, 2), np.float32),
               example=np.array([1, 2]), position=np.array([5, 6]))
  out = T.TrainRows().map(batch)
  assert set(out) == {"image", "label", "mask", "affine", "intensity"}
  assert out["mask"].dtype == np.float32 and (out["mask"] == 1).all()


def test_eval_rows_and_window_mark_padding_and_scale_intensities():
  hu = np.array([-100, -60, 40, 140, 500], np.int16).reshape(1, 5, 1, 1).repeat(3, 0)
  batch = dict(image=np.broadcast_to(hu, (3, 5, 5, 1)).copy(),
               label=np.ones((3, 5, 5), np.uint8), example=np.array([4, 0, -1]),
               real=np.array([True, True, False]), position=np.arange(3))
  rows = T.EvalRows(INDEX).map(batch)
  np.testing.assert_array_equal(rows["mask"], [1, 1, 0])
  np.testing.assert_array_equal(rows["case_number"], [9, 4, -1])
  np.testing.assert_array_equal(rows["slice_index"], [1, 0, -1])
  out = T.Normalise(intensity.window(-60.0, 140.0)).map(rows)
  assert set(out) == {"image", "label", "mask", "case_number", "slice_index"}
  assert out["image"].dtype == np.float32 and out["label"].dtype == np.int32
  np.testing.assert_allclose(out["image"][0, :, 0, 0], [0, 0, 0.5, 1, 1])
  assert (out["image"][2] == 0).all()  # padding: zeros, not the window of 0 HU
  dst = np.empty((5,), np.float32)
  T.window_into(dst, hu[0, :, 0, 0], -60.0, 140.0)
  np.testing.assert_array_equal(dst, out["image"][0, :, 0, 0])


def test_eval_crops_are_the_training_crops_of_each_case():
  boxes = np.array([[2, 3, 18, 19], [4, 4, 20, 20]])
  records = FakeRecords()
  slices_ = [records[e] for e in (0, 4, 1)]
  batch = dict(image=np.stack([s[0] for s in slices_] + [np.zeros((24, 24, 3), np.int16)]),
               label=np.stack([s[1] for s in slices_] + [np.zeros((24, 24), np.uint8)]),
               mask=np.array([1, 1, 1, 0], np.float32), example=np.array([0, 4, 1, -1]),
               case_number=np.zeros(4, np.int32), slice_index=np.zeros(4, np.int32))
  out = T.CropToLiverBox(INDEX, boxes, 8, intensity.window(-60.0, 140.0)).map(batch)
  assert out["image"].shape == (4, 8, 8, 3) and out["label"].dtype == np.int32
  for k, case_row in ((0, 0), (1, 1), (2, 0)):
    hu, label = crops.crop_slices(batch["image"][k:k + 1], tuple(boxes[case_row]), 8,
                                  labels=batch["label"][k:k + 1])
    np.testing.assert_allclose(out["image"][k], np.clip((hu[0] + 60) / 200, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(out["label"][k], label[0])
  assert not out["image"][3].any() and not out["label"][3].any()


def test_worker_side_transforms_pickle():
  sampler = samplers.PatchSampler(INDEX, 0, 4, 0.5, "component", 0.0, 8)
  for transform in (T.ProcessRows(8, 4, 4), T.SelectSlice(sampler), T.ReadSlice(FakeRecords()),
                    T.CropPatch(12), T.PlacePatch(sampler), T.DrawAugmentation(SPEC, 1, 3.5, 5.5),
                    T.MapIntoLiverBox(INDEX, np.zeros((2, 4)), 8), T.TrainRows(),
                    T.EvalRows(INDEX), T.Normalise(intensity.window(-60.0, 140.0))):
    copy = cloudpickle.loads(cloudpickle.dumps(transform))
    assert type(copy) is type(transform)
  row = cloudpickle.loads(cloudpickle.dumps(T.SelectSlice(sampler))).map(6)
  for key, value in sampler.row(6).items():
    np.testing.assert_array_equal(row[key], value)
