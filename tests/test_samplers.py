"""Samplers: the plans of the pipelines before Grain, bit for bit; rows by position; tumour
oversampling of whole slices; patch centres; negative centres; pickling; errors."""

import pickle

import numpy as np
import pytest

from data_pipelines import samplers
from data_pipelines.index import SplitIndex
from tests.data import make_sampler_plans as recorded

PLANS = np.load(recorded.OUT)  # recorded from the pipelines before Grain


def _patch_index():
  cases, tumours, num_examples = recorded.patch_index()
  return SplitIndex(split="train", cases=cases, tumours=tumours, num_examples=num_examples)


# ---- the plans of the pipelines before Grain -------------------------------------------

@pytest.mark.parametrize("case", range(len(recorded.WHOLE_CASES)))
def test_whole_slice_plans_are_those_of_the_pipelines_before_grain(case):
  examples, seed, b, tumours, fraction = recorded.WHOLE_CASES[case]
  sampler = samplers.WholeSliceSampler(examples, seed, b, tumours, fraction)
  for key in ("example", "position", "tumour_row"):
    got = np.stack([sampler.global_batch(n)[key] for n in range(recorded.BATCHES)])
    np.testing.assert_array_equal(got, PLANS[f"whole{case}_{key}"], err_msg=key)


@pytest.mark.parametrize("case", range(len(recorded.PATCH_CASES)))
def test_patch_plans_are_those_of_the_pipelines_before_grain(case):
  seed, b, fraction, sampling, jitter, size = recorded.PATCH_CASES[case]
  sampler = samplers.PatchSampler(_patch_index(), seed, b, fraction, sampling, jitter, size)
  for key in ("example", "position", "positive", "part", "centre", "pixel_u"):
    got = np.stack([sampler.global_batch(n)[key] for n in range(recorded.BATCHES)])
    np.testing.assert_array_equal(got, PLANS[f"patch{case}_{key}"], err_msg=key)
  np.testing.assert_array_equal(sampler.negative_pool, PLANS[f"patch{case}_negative_pool"])


def test_negative_centres_are_those_of_the_pipelines_before_grain():
  labels, has_tumour, u = recorded.negative_labels()
  sampler = samplers.PatchSampler(_patch_index(), 0, 4, 0.5, "component", 0, patch_size=12)
  got = [sampler.negative_centre(lab, bool(h), float(v)) for lab, h, v in zip(labels, has_tumour,
                                                                               u)]
  np.testing.assert_array_equal(got, PLANS["negative_centres"])


# ---- rows by position, pickling -----------------------------------------------------------------

def test_rows_by_position_are_the_rows_of_the_global_batches_in_any_order():
  whole = samplers.WholeSliceSampler(np.arange(10, 70), 3, 8, np.array([12, 20, 33]), 0.5)
  patch = samplers.PatchSampler(_patch_index(), 5, 16, 0.7, "component", 16.0, 128)
  rng = np.random.default_rng(0)
  for sampler in (whole, patch):
    b = sampler.batch_size
    positions = rng.permutation(np.arange(90 * b))[:400]  # far more batches than are cached
    for position in positions:
      want = sampler.global_batch(position // b)
      got = sampler.row(position)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key][position % b], err_msg=key)


def test_samplers_pickle_into_worker_processes_with_the_same_plans():
  whole = samplers.WholeSliceSampler(np.arange(50), 9, 12, np.array([4, 5, 6, 20, 44]), 0.25)
  patch = samplers.PatchSampler(_patch_index(), 2, 16, 0.5, "voxel", 8.0, 64)
  evaluation = samplers.EvalSampler(np.array([4, 9, 2]))
  for sampler in (whole, patch):
    sampler.row(5)  # fill the caches: they do not travel
    copy = pickle.loads(pickle.dumps(sampler))
    for position in (0, 5, 200, 17):
      for key, value in sampler.row(position).items():
        np.testing.assert_array_equal(copy.row(position)[key], value, err_msg=key)
  copy = pickle.loads(pickle.dumps(evaluation))
  assert [int(copy.row(p)["example"]) for p in range(5)] == [4, 9, 2, -1, -1]
  assert [bool(copy.row(p)["real"]) for p in range(5)] == [True, True, True, False, False]


# ---- whole slices: tumour oversampling -----------------------------------------------------------

@pytest.mark.parametrize("fraction,batch_size", [
    (0.5, 8), (1 / 3, 6), (0.3, 16), (0.61, 32), (0.125, 8), (1.0, 4), (0.5, 2)])
def test_whole_sampler_fills_exactly_round_f_b_rows_with_visible_tumour_slices(fraction,
                                                                               batch_size):
  examples = np.arange(100, 400)
  tumours = np.array([3, 105, 150, 151, 152, 260, 399, 400])  # 3 and 400 are not selected
  visible = {105, 150, 151, 152, 260, 399}
  sampler = samplers.WholeSliceSampler(examples, 7, batch_size, tumours, fraction)
  want = int(round(fraction * batch_size))
  assert sampler.num_tumour == want
  assert sampler.tumour_examples.tolist() == sorted(visible)
  at_row = np.zeros(batch_size, int)
  batches = 300
  for b in range(batches):
    g = sampler.global_batch(b)
    np.testing.assert_array_equal(g["position"], b * batch_size + np.arange(batch_size))
    assert g["tumour_row"].sum() == want
    assert set(g["example"][g["tumour_row"]].tolist()) <= visible
    assert set(g["example"].tolist()) <= set(examples.tolist())
    at_row += g["tumour_row"]
  if want < batch_size:
    # Tumour rows move around the batch, so every process's share gets its part of them.
    assert (at_row > 0).all(), at_row
    half = batch_size // 2
    assert abs(at_row[:half].sum() / (batches * half) - want / batch_size) < 0.15


@pytest.mark.parametrize("fraction,batch_size", [(0.3, 16), (0.5, 8), (1.0, 4)])
def test_whole_sampler_shows_every_tumour_slice_once_per_tumour_epoch(fraction, batch_size):
  examples = np.arange(40)
  tumours = np.array([2, 3, 9, 17, 18, 30, 31])
  sampler = samplers.WholeSliceSampler(examples, 1, batch_size, tumours, fraction)
  want, n = sampler.num_tumour, len(tumours)
  batches = [sampler.global_batch(b) for b in range(-(-10 * n // want))]
  forced = np.concatenate([g["example"][g["tumour_row"]] for g in batches])
  epochs = [forced[e * n:(e + 1) * n] for e in range(10)]
  for epoch in epochs:
    assert sorted(epoch.tolist()) == tumours.tolist()
  assert len({tuple(e.tolist()) for e in epochs}) > 1, "each tumour epoch is shuffled anew"
  # The other rows are the uniform stream over all slices (f = 0's), B - round(f*B) a batch.
  rest = np.concatenate([g["example"][~g["tumour_row"]] for g in batches])
  plain = samplers.WholeSliceSampler(examples, 1, 1)
  np.testing.assert_array_equal(
      rest, [plain.global_batch(i)["example"][0] for i in range(len(rest))])


def test_whole_sampler_without_oversampling_is_unchanged_and_the_rest_keeps_that_stream():
  examples = np.arange(10, 70)
  tumours = np.array([12, 20, 33, 41])
  plain = samplers.WholeSliceSampler(examples, 3, 8)
  zero = samplers.WholeSliceSampler(examples, 3, 8, tumours, 0.0)
  half = samplers.WholeSliceSampler(examples, 3, 8, tumours, 0.5)
  stream = np.concatenate([plain.global_batch(b)["example"] for b in range(40)])
  for b in range(40):  # f = 0: epoch-wise permutations of the selected slices
    np.testing.assert_array_equal(zero.global_batch(b)["example"], stream[b * 8:(b + 1) * 8])
    assert not zero.global_batch(b)["tumour_row"].any()
  assert all(sorted(stream[e * 60:(e + 1) * 60].tolist()) == examples.tolist()
             for e in range(5))
  rest = np.concatenate([g["example"][~g["tumour_row"]]  # f = 0.5: the rest keeps that stream
                         for g in (half.global_batch(b) for b in range(40))])
  np.testing.assert_array_equal(rest, stream[:160])
  again = samplers.WholeSliceSampler(examples, 3, 8, tumours, 0.5)
  for b in (17, 3, 39, 0):  # a fresh sampler (a resumed run), batches in any order
    for key, value in half.global_batch(b).items():
      np.testing.assert_array_equal(again.global_batch(b)[key], value)
  other = samplers.WholeSliceSampler(examples, 4, 8, tumours, 0.5)
  assert any((other.global_batch(b)["example"] != half.global_batch(b)["example"]).any()
             for b in range(5))


@pytest.mark.parametrize("fraction", [-0.1, 1.01, float("nan")])
def test_whole_sampler_rejects_a_fraction_outside_0_1(fraction):
  with pytest.raises(ValueError, match=r"stage\.tumour_fraction must be in \[0, 1\]"):
    samplers.WholeSliceSampler(np.arange(10), 0, 4, np.array([1]), fraction)


def test_whole_sampler_without_selected_tumour_slices_is_a_clear_error():
  with pytest.raises(ValueError, match=r"stage\.tumour_fraction=0\.25.*no\s+visible tumour"):
    samplers.WholeSliceSampler(np.arange(10), 0, 4, np.array([20, 31]), 0.25)
  samplers.WholeSliceSampler(np.arange(10), 0, 4, np.array([20, 31]), 0.0)  # 0: fine


# ---- patches -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["component", "voxel"])
def test_component_sampling_modes(mode):
  index = _patch_index()
  sampler = samplers.PatchSampler(index, 0, 32, 1.0, mode, 0.0, 16)
  parts = np.concatenate([sampler.global_batch(b)["part"] for b in range(150)])
  keys = index.case_rows(index.tumours[:, 0].astype(int)) * 1000 + index.tumours[:, 1]
  components, inverse = np.unique(keys, return_inverse=True)
  assert len(components) >= 3 and sampler.num_components == len(components)
  share = np.bincount(inverse[parts], minlength=len(components)) / len(parts)
  if mode == "component":
    expected = np.full(len(components), 1 / len(components))
  else:
    area = np.bincount(inverse, weights=index.tumours[:, 5], minlength=len(components))
    expected = area / area.sum()
  np.testing.assert_allclose(share, expected, atol=0.03)


def test_positives_are_tumour_parts_within_the_jitter_and_negatives_come_from_the_pool():
  index = _patch_index()
  sampler = samplers.PatchSampler(index, 3, 16, 0.5, "component", 3.0, 32)
  assert sampler.num_positive == 8
  offsets = []
  for b in range(20):
    g = sampler.global_batch(b)
    assert g["positive"].sum() == 8
    pos = g["positive"]
    parts = index.tumours[g["part"][pos]]
    np.testing.assert_array_equal(parts[:, 0], g["example"][pos])
    offsets.append(g["centre"][pos] - parts[:, 2:4])
    assert (g["part"][~pos] == -1).all() and (g["centre"][~pos] == -1).all()
    assert set(g["example"][~pos].tolist()) <= set(sampler.negative_pool.tolist())
    assert not any(sampler.has_tumour(e) for e in g["example"][~pos])
  offsets = np.concatenate(offsets)
  assert np.abs(offsets).max() <= 3.5 and np.abs(offsets).max() > 1.5


def test_negative_centre_avoids_tumour_and_falls_back():
  index = SplitIndex(split="train", cases=np.array([[0, 0, 1, 0, 0]]),
                     tumours=np.array([[0, 1, 5.0, 5.0, 5.0, 1.0, 9]]), num_examples=1)
  sampler = samplers.PatchSampler(index, 0, 4, 0.5, "component", 0, patch_size=8)
  label = np.zeros((24, 24), np.uint8)
  label[2:22, 2:22] = 1
  label[4:7, 4:7] = 2
  for u in np.linspace(0, 0.999, 25):
    r, c = sampler.negative_centre(label, True, u)
    assert label[r, c] == 1 and not (label[max(r - 4, 0):r + 4, max(c - 4, 0):c + 4] == 2).any()
  label[2:22, 2:22] = 2
  label[12, 12] = 1  # only one liver pixel, next to tumour: the fallback picks it
  assert sampler.negative_centre(label, True, 0.5) == (12, 12)
  assert sampler.negative_centre(np.zeros((24, 24), np.uint8), False, 0.5) == (12, 12)


def test_patch_sampler_over_tumour_free_data_is_a_clear_error():
  index = SplitIndex(split="train", cases=np.array([[0, 0, 10, 2, 8]]),
                     tumours=np.zeros((0, 7)), num_examples=10)
  with pytest.raises(ValueError, match="no tumour.*positive_fraction"):
    samplers.PatchSampler(index, 0, 4, 0.5, "component", 0, 8)
  sampler = samplers.PatchSampler(index, 0, 4, 0.0, "component", 0, 8)  # negatives only
  assert not sampler.global_batch(0)["positive"].any()
