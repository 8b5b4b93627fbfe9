"""sliding_window: agreement with a brute-force reference, the per-pixel property, nnU-Net's tiling
and Gaussian, fixed-size batches, bounded memory of the slab stream, argument checks."""

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from curriculum_seg import sliding_window as sw


# --------------------------------------------------------------------------- reference

def _reference_starts(size, window, overlap):
  """nnU-Net's compute_steps_for_sliding_window for one axis (step size = 1 - overlap)."""
  if size <= window:
    return [0]
  target = max(1.0, window * (1 - overlap))
  num = int(np.ceil((size - window) / target)) + 1
  actual = (size - window) / (num - 1)
  return [int(np.round(actual * i)) for i in range(num)]


def _reference_gaussian(window, sigma_scale):
  """The importance map voxel by voxel: exp(-sum ((i - c) / sigma)^2 / 2), max 1, no zeros."""
  g = np.zeros(window, np.float64)
  for idx in np.ndindex(*window):
    g[idx] = math.exp(-0.5 * sum(((i - (w - 1) / 2) / (sigma_scale * w)) ** 2
                                 for i, w in zip(idx, window)))
  g = (g / g.max()).astype(np.float32)
  g[g == 0] = g[g > 0].min()
  return g


def _reference(predict_one, image, window, overlap=0.5, sigma_scale=0.125, pad_value=0.0):
  """Explicit loops over every tile and every voxel of it, on a symmetrically padded image."""
  sizes = image.shape[:-1]
  pads = [(max(w - s, 0) // 2, max(w - s, 0) - max(w - s, 0) // 2)
          for s, w in zip(sizes, window)]
  padded = np.pad(image.astype(np.float32), pads + [(0, 0)], constant_values=pad_value)
  g = _reference_gaussian(window, sigma_scale)
  acc, wsum = None, np.zeros(padded.shape[:-1], np.float64)
  for tile in itertools.product(*[_reference_starts(p, w, overlap)
                                  for p, w in zip(padded.shape[:-1], window)]):
    region = tuple(slice(t, t + w) for t, w in zip(tile, window))
    scores = np.asarray(predict_one(padded[region]), np.float64)
    if acc is None:
      acc = np.zeros(padded.shape[:-1] + scores.shape[-1:], np.float64)
    for idx in np.ndindex(*window):
      at = tuple(t + i for t, i in zip(tile, idx))
      acc[at] += g[idx] * scores[idx]
      wsum[at] += g[idx]
  out = acc / wsum[..., None]
  return out[tuple(slice(b, b + s) for (b, _), s in zip(pads, sizes))]


def _mixing(k=2, seed=0):
  """A window -> scores function that depends on position in the window and on all its content,
  so overlapping windows disagree and only the right weights give the reference."""
  rng = np.random.default_rng(seed)
  a, b, c = rng.normal(size=(3, k))

  def one(x):
    ramp = sum(np.indices(x.shape[:-1])) / sum(x.shape[:-1])
    return (x[..., :1] * a + float(x.mean()) * b + ramp[..., None] * c)

  def batched(xs):
    return np.stack([one(x) for x in xs])

  return one, batched


def _pointwise(x):
  """A per-pixel function of the channels: what any window gives at any voxel."""
  return np.stack([np.sin(x[..., 0]) + x[..., -1], x[..., 0] * x[..., -1], np.cos(x[..., -1])],
                  axis=-1)


CASES = [  # image shape, window, overlap
    ((13, 17, 2), (5, 6), 0.5),        # sizes not multiples of the step
    ((13, 17, 1), (5, 6), 0.0),        # no overlap
    ((4, 17, 1), (6, 6), 0.5),         # H padded (1 before, 1 after)
    ((3, 5, 1), (6, 8), 0.25),         # both padded, odd differences (1/2, 1/2)
    ((12, 9, 1), (4, 4), 0.75),
    ((9, 10, 11, 1), (4, 5, 6), 0.5),
    ((9, 10, 11, 2), (4, 5, 6), 0.0),
    ((3, 10, 7, 1), (4, 5, 8), 0.5),   # D and W padded
    ((6, 10, 11, 1), (1, 5, 6), 0.5),  # a 2-D network slice by slice
    ((7, 4, 4, 1), (3, 4, 4), 0.5),    # in-plane exactly one window
]


# --------------------------------------------------------------------------- agreement

@pytest.mark.parametrize("shape,window,overlap", CASES)
def test_matches_brute_force_reference(shape, window, overlap):
  rng = np.random.default_rng(1)
  image = rng.normal(size=shape).astype(np.float32)
  one, batched = _mixing(k=3)
  want = _reference(one, image, window, overlap, pad_value=-2.0)
  got = sw.sliding_window(batched, image, window, overlap, batch_size=3, pad_value=-2.0)
  assert got.dtype == np.float32 and got.shape == shape[:-1] + (3,)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_reference_is_sensitive_to_weights_and_padding():
  """The comparison above can fail: other sigmas or pad values give other results."""
  rng = np.random.default_rng(2)
  image = rng.normal(size=(3, 10, 7, 1)).astype(np.float32)
  one, batched = _mixing()
  base = sw.sliding_window(batched, image, (4, 5, 8), batch_size=2)
  assert not np.allclose(base, _reference(one, image, (4, 5, 8), sigma_scale=0.5), atol=1e-4)
  assert not np.allclose(base, _reference(one, image, (4, 5, 8), pad_value=1.0), atol=1e-4)
  np.testing.assert_allclose(base, _reference(one, image, (4, 5, 8)), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape,window,overlap", CASES)
def test_pointwise_predict_gives_the_function_of_the_whole_image(shape, window, overlap):
  image = np.random.default_rng(3).normal(size=shape).astype(np.float32)
  got = sw.sliding_window(_pointwise, image, window, overlap, batch_size=4)
  np.testing.assert_allclose(got, _pointwise(image), rtol=1e-5, atol=1e-5)


def test_integer_images_and_jax_predictions():
  jax = pytest.importorskip("jax")
  image = np.arange(7 * 9 * 1, dtype=np.int16).reshape(7, 9, 1)
  traces = []

  @jax.jit
  def predict(x):
    traces.append(x.shape)
    return jax.numpy.concatenate([x, -x], axis=-1) / 10

  got = sw.sliding_window(predict, image, (4, 4), batch_size=4)
  np.testing.assert_allclose(got, np.concatenate([image, -image], -1) / 10, rtol=1e-5)
  assert traces == [(4, 4, 4, 1)]  # one compiled shape


# --------------------------------------------------------------------------- tiling

def test_tile_starts_follow_nnunet():
  for size, window, overlap in itertools.product(range(1, 41), range(1, 13),
                                                 (0.0, 0.25, 0.5, 0.7, 0.9)):
    starts = sw.tile_starts(size, window, overlap)
    assert starts == _reference_starts(size, window, overlap)
    assert starts[0] == 0 and starts[-1] == max(size - window, 0)
    target = max(1.0, window * (1 - overlap))
    if size > window:
      assert len(starts) == math.ceil((size - window) / target) + 1
      assert (starts[-1] - starts[0]) / (len(starts) - 1) <= target  # the even step
      diffs = np.diff(starts)
      assert diffs.min() >= 1 and diffs.max() <= math.ceil(target)  # after rounding
    else:
      assert starts == [0]
  assert sw.tile_starts(100, 32) == [0, 14, 27, 41, 54, 68]
  assert sw.tile_starts(512, 128) == [0, 64, 128, 192, 256, 320, 384]
  assert sw.tile_starts(512, 128, 0.0) == [0, 128, 256, 384]
  assert sw.tile_starts(7, 1) == list(range(7))  # depth-1 windows: every slice


# --------------------------------------------------------------------------- Gaussian

@pytest.mark.parametrize("window", [(5,), (4, 6), (7, 5, 3), (1, 8, 8), (2, 1, 3)])
def test_gaussian_max_one_symmetric_no_zeros(window):
  g = sw.gaussian_importance(window)
  assert g.shape == window and g.dtype == np.float32
  assert g.max() == 1.0 and g.min() > 0
  for axis in range(len(window)):
    np.testing.assert_array_equal(g, np.flip(g, axis))
  np.testing.assert_allclose(g, _reference_gaussian(window, 0.125), rtol=1e-6)


def test_gaussian_shape_and_width():
  g = sw.gaussian_importance((9,), 0.125)
  sigma = 0.125 * 9
  np.testing.assert_allclose(g, np.exp(-0.5 * ((np.arange(9) - 4) / sigma) ** 2), rtol=1e-6)
  wide = sw.gaussian_importance((9, 9), 0.5)
  narrow = sw.gaussian_importance((9, 9), 0.125)
  assert wide[0, 0] > narrow[0, 0] and wide.sum() > narrow.sum()
  np.testing.assert_array_equal(sw.gaussian_importance((1, 6)), sw.gaussian_importance((6,))[None])
  np.testing.assert_array_equal(sw.gaussian_importance((1,)), np.ones(1, np.float32))


def test_gaussian_underflow_replaced_by_smallest_weight():
  g = sw.gaussian_importance((64, 64), 0.01)
  x = (np.arange(64) - 31.5) / 0.64
  raw = np.exp(-0.5 * (x[:, None] ** 2 + x[None] ** 2))
  raw = (raw / raw.max()).astype(np.float32)
  assert (raw == 0).sum() > 1000  # most of the window underflows
  assert g.min() > 0 and np.all(g[raw == 0] == g.min())
  np.testing.assert_allclose(g.min(), raw[raw > 0].min(), rtol=1e-3)
  np.testing.assert_array_equal(g, _reference_gaussian((64, 64), 0.01))


# --------------------------------------------------------------------------- batching

@pytest.mark.parametrize("batch_size", [1, 3, 5, 8, 64])
@pytest.mark.parametrize("shape,window", [((13, 17, 1), (5, 6)), ((9, 10, 11, 1), (4, 5, 6)),
                                          ((6, 10, 11, 1), (1, 5, 6))])
def test_predict_sees_full_batches_only(batch_size, shape, window):
  image = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  calls = []

  def predict(x):
    calls.append(x.shape)
    assert x.dtype == np.float32
    return _pointwise(x)

  got = sw.sliding_window(predict, image, window, batch_size=batch_size)
  tiles = math.prod(len(sw.tile_starts(s, w, 0.5)) for s, w in zip(shape[:-1], window))
  assert calls == [(batch_size,) + window + (1,)] * math.ceil(tiles / batch_size)
  np.testing.assert_allclose(got, _pointwise(image), rtol=1e-5, atol=1e-5)


def test_every_tile_goes_to_predict_once():
  image = np.arange(1, 13 * 17 + 1, dtype=np.float32).reshape(13, 17, 1)
  seen = []

  def predict(x):
    seen.extend(tuple(x[i, 0, 0]) for i in range(len(x)))
    return np.zeros(x.shape[:-1] + (2,), np.float32)

  sw.sliding_window(predict, image, (5, 6), batch_size=4)
  starts = [(y, x) for y in sw.tile_starts(13, 5) for x in sw.tile_starts(17, 6)]
  real = [v for v in seen if v[0] != 0]  # the batch padding is zeros
  assert sorted(real) == sorted((float(image[y, x, 0]),) for y, x in starts)
  assert len(seen) % 4 == 0 and len(seen) - len(real) < 4


# --------------------------------------------------------------------------- slabs

@pytest.mark.parametrize("slab", [None, 1, 3, 4, 7, 100])
@pytest.mark.parametrize("shape,window,overlap", [((23, 6, 7, 1), (4, 5, 6), 0.5),
                                                  ((23, 6, 7, 1), (5, 3, 3), 0.0),
                                                  ((19, 6, 7, 1), (1, 5, 6), 0.5),
                                                  ((3, 6, 7, 1), (5, 5, 6), 0.5)])
def test_slabs_concatenate_to_the_full_result(slab, shape, window, overlap):
  image = np.random.default_rng(5).normal(size=shape).astype(np.float32)
  one, batched = _mixing(seed=6)
  full = sw.sliding_window(batched, image, window, overlap, batch_size=4)
  slabs = list(sw.sliding_window_slabs(batched, image, window, overlap, batch_size=4,
                                       slab=slab))
  bounds = [(z0, z1) for z0, z1, _ in slabs]
  size = max(window[0] // 2, 32) if slab is None else slab
  assert [z0 for z0, _ in bounds] == list(range(0, shape[0], size))
  assert [z1 for _, z1 in bounds] == [min(z + size, shape[0]) for z, _ in bounds]
  np.testing.assert_array_equal(np.concatenate([s for _, _, s in slabs]), full)
  if shape[0] <= 23:
    np.testing.assert_allclose(full, _reference(one, image, window, overlap), rtol=2e-5,
                               atol=2e-5)


def test_default_slab_is_32_rows_or_half_a_window():
  image = np.zeros((70, 3, 3, 1), np.float32)
  bounds = [(z0, z1) for z0, z1, _ in sw.sliding_window_slabs(_pointwise, image, (2, 3, 3))]
  assert bounds == [(0, 32), (32, 64), (64, 70)]
  bounds = [(z0, z1) for z0, z1, _ in sw.sliding_window_slabs(_pointwise, image, (80, 3, 3))]
  assert bounds == [(0, 40), (40, 70)]


def test_slabs_come_out_as_soon_as_final():
  """A slab is handed out before the windows far below it are predicted."""
  image = np.zeros((40, 4, 4, 1), np.float32)
  calls = []

  def predict(x):
    calls.append(len(calls))
    return np.ones(x.shape[:-1] + (1,), np.float32)

  stream = sw.sliding_window_slabs(predict, image, (4, 4, 4), batch_size=1, slab=4)
  z0, z1, _ = next(stream)
  assert (z0, z1) == (0, 4)
  assert len(calls) <= 4  # windows starting at 0, 2, 4 (and the one that triggers it)


def _peak_bytes(depth, slab, window=(4, 8, 8), k=2):
  """Peak bytes allocated (numpy data and Python objects) while a slab stream is consumed;
  the second of two runs, as the first also fills numpy's and Python's one-off caches."""
  image = np.random.default_rng(7).normal(size=(depth, 16, 16, 1)).astype(np.float32)

  def predict(x):
    return np.broadcast_to(x, x.shape[:-1] + (k,))

  peaks = []
  for _ in range(2):
    tracemalloc.start()
    try:
      before = tracemalloc.get_traced_memory()[0]
      for item in sw.sliding_window_slabs(predict, image, window, batch_size=4, slab=slab):
        del item  # a consumer that writes each slab away
      peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
      tracemalloc.stop()
  return peaks[-1]


def test_slab_accumulators_are_bounded_by_window_and_slab_not_volume():
  row = 16 * 16 * (2 + 1) * 4  # bytes of one row of accumulators: K scores and the weight sum
  peak64, peak1024 = _peak_bytes(64, 4), _peak_bytes(1024, 4)
  print(f"peak bytes: depth 64 {peak64}, depth 1024 {peak1024}, one row {row}")
  # (4 + 4) rows of accumulators, one slab, a batch of windows and scores and small objects;
  # accumulators of the whole volume would be 64 rows, and grow by 960 rows for 1024.
  assert peak64 < 32 * row
  assert peak1024 - peak64 < 16 * row  # only the list of tile starts grows with the depth
  # The measure sees the accumulators: 12 more rows of them (and a larger slab) for slab 16.
  assert _peak_bytes(64, 16) - peak64 > 12 * row


# --------------------------------------------------------------------------- arguments

def _ok(x):
  return np.zeros(x.shape[:-1] + (2,), np.float32)


IMAGE = np.zeros((8, 8, 1), np.float32)


@pytest.mark.parametrize("kwargs,name", [
    (dict(overlap=1.0), "overlap"), (dict(overlap=-0.1), "overlap"),
    (dict(overlap="half"), "overlap"), (dict(sigma_scale=0.0), "sigma_scale"),
    (dict(sigma_scale=-1), "sigma_scale"), (dict(sigma_scale=float("nan")), "sigma_scale"),
    (dict(window=(4,)), "window"), (dict(window=(4, 4, 4)), "window"),
    (dict(window=(4, 0)), "window"), (dict(window=(4, 2.5)), "window"),
    (dict(window=4), "window"), (dict(image=np.zeros((8, 8))), "image"),
    (dict(image=np.zeros((2, 2, 2, 2, 1))), "image"), (dict(image=np.zeros((0, 8, 1))), "image"),
    (dict(batch_size=0), "batch_size"), (dict(pad_value="zero"), "pad_value"),
    (dict(predict=None), "predict"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  args = dict(predict=_ok, image=IMAGE, window=(4, 4)) | kwargs
  with pytest.raises(ValueError, match=name):
    sw.sliding_window(**args)


def test_bad_slab_and_helper_arguments():
  with pytest.raises(ValueError, match="slab"):
    sw.sliding_window_slabs(_ok, np.zeros((8, 8, 8, 1)), (4, 4, 4), slab=0)
  with pytest.raises(ValueError, match="overlap"):
    sw.tile_starts(10, 4, 1.5)
  with pytest.raises(ValueError, match="size"):
    sw.tile_starts(0, 4)
  with pytest.raises(ValueError, match="window"):
    sw.tile_starts(10, 0)
  with pytest.raises(ValueError, match="sigma_scale"):
    sw.gaussian_importance((4, 4), 0)
  with pytest.raises(ValueError, match=r"window\[1\]"):
    sw.gaussian_importance((4, -1))


@pytest.mark.parametrize("predict,got", [
    (lambda x: np.zeros(x.shape, np.float32)[:, :3], "(2, 3, 4, 1)"),      # window shape
    (lambda x: np.zeros(x.shape[:-1], np.float32), "(2, 4, 4)"),           # no class axis
    (lambda x: np.zeros((1,) + x.shape[1:-1] + (2,)), "(1, 4, 4, 2)"),     # batch dropped
    (lambda x: np.zeros(x.shape[:-1] + (0,)), "(2, 4, 4, 0)"),             # no classes
])
def test_predict_of_the_wrong_shape_names_both_shapes(predict, got):
  with pytest.raises(ValueError, match=r"\(2, 4, 4, K\).*" + got.replace("(", r"\(")
                     .replace(")", r"\)")):
    sw.sliding_window(predict, IMAGE, (4, 4), batch_size=2)


def test_predict_changing_its_classes_is_refused():
  calls = []

  def predict(x):
    calls.append(1)
    return np.zeros(x.shape[:-1] + (len(calls),), np.float32)

  with pytest.raises(ValueError, match=r"\(2, 4, 4, 1\).*\(2, 4, 4, 2\)"):
    sw.sliding_window(predict, IMAGE, (4, 4), batch_size=2)


def test_public_name_in_inference():
  from curriculum_seg import inference  # pylint: disable=g-import-not-at-top
  assert inference.sliding_window is sw.sliding_window
