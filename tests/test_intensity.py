"""Input normalisation: the paper's window, nnU-Net's CT foreground scheme from exact HU
histograms, what a window clips, and the same map in numpy and JAX."""

import jax
import numpy as np
import pytest

from data_pipelines import intensity, slices, transforms


def _case(rng, n=4000):
  image = rng.normal(110, 25, (20, 20, 10)).round().astype(np.int16)
  labels = np.zeros(image.shape, np.uint8)
  labels[2:18, 2:18, 1:9] = 1
  labels[5:9, 5:9, 3:6] = 2
  image[labels == 2] = rng.normal(60, 10, int((labels == 2).sum())).round().astype(np.int16)
  image[0, 0, 0] = 5000  # outside the histogram's range: counted at its end
  labels[0, 0, 0] = 1
  return image, labels


def test_histograms_give_numpys_percentiles_mean_and_std():
  rng = np.random.default_rng(0)
  cases = [_case(rng) for _ in range(3)]
  hists = [slices.intensity_histograms(image, labels) for image, labels in cases]
  summed = {k: sum(h[k] for h in hists) for k in ("liver", "tumour")}
  fg = np.concatenate([np.clip(image[labels >= 1], slices.HU_LO, slices.HU_HI)
                       for image, labels in cases]).astype(np.float64)
  assert summed["liver"].sum() + summed["tumour"].sum() == len(fg)
  stats = intensity.foreground_stats(summed)
  for q, key in ((0.5, "p0_5"), (50, "p50"), (99.5, "p99_5")):
    assert stats[key] == pytest.approx(np.percentile(fg, q), abs=1e-9)
  assert stats["mean"] == pytest.approx(fg.mean())
  assert stats["std"] == pytest.approx(fg.std())
  # packed as JSON (the dataset's metadata) and back, bin for bin
  for hist in summed.values():
    np.testing.assert_array_equal(intensity.unpack(intensity.pack(hist)), hist)


def test_ct_foreground_normaliser_comes_from_the_training_split():
  rng = np.random.default_rng(1)
  image, labels = _case(rng)
  hists = slices.intensity_histograms(image, labels)
  metadata = {"intensity": {"train": {k: intensity.pack(v) for k, v in hists.items()},
                            "validation": {k: intensity.pack(v * 0) for k, v in hists.items()}}}
  data = dict(normalisation="ct_foreground", hu_window=(-60.0, 140.0))
  norm = intensity.normaliser_for(data, metadata)
  stats = intensity.foreground_stats(hists)
  assert (norm.lo, norm.hi, norm.offset, norm.scale) == (
      stats["p0_5"], stats["p99_5"], stats["mean"], stats["std"])
  hu = np.array([-1000, stats["p0_5"], stats["mean"], 3000], np.float32)
  np.testing.assert_allclose(norm(hu), [(stats["p0_5"] - stats["mean"]) / stats["std"],
                                        (stats["p0_5"] - stats["mean"]) / stats["std"], 0.0,
                                        (stats["p99_5"] - stats["mean"]) / stats["std"]],
                             rtol=1e-6, atol=1e-6)
  assert norm.range == pytest.approx(((norm.lo - norm.offset) / norm.scale,
                                      (norm.hi - norm.offset) / norm.scale))
  with pytest.raises(ValueError, match="lacks"):
    intensity.normaliser_for(data, {})
  with pytest.raises(ValueError, match="data.normalisation='zscore' is not one of"):
    intensity.normaliser_for(dict(data, normalisation="zscore"), metadata)
  empty = {"intensity": {"train": {k: intensity.pack(v * 0) for k, v in hists.items()}}}
  with pytest.raises(ValueError, match="no liver or tumour voxel"):
    intensity.normaliser_for(data, empty)
  assert intensity.Normaliser.from_dict(norm.to_dict()) == norm


def test_the_window_normaliser_is_the_papers_scaling_bit_for_bit_in_numpy_and_jax():
  hu = np.arange(-1024, 3072, 7, dtype=np.int16).reshape(-1, 1)
  norm = intensity.window(-60.0, 140.0)
  expected = np.empty(hu.shape, np.float32)
  transforms.window_into(expected, hu, -60.0, 140.0)
  got = np.empty(hu.shape, np.float32)
  transforms.normalise_into(got, hu, norm)
  np.testing.assert_array_equal(got, expected)
  assert norm.range == (0.0, 1.0)
  from data_pipelines import augment  # pylint: disable=g-import-not-at-top
  on_device = np.asarray(jax.jit(lambda x: augment.normalise(x, norm))(hu))
  np.testing.assert_allclose(on_device, expected, atol=1e-6)
  zscore = intensity.Normaliser(lo=-20.0, hi=200.0, offset=100.0, scale=40.0, name="x")
  np.testing.assert_allclose(np.asarray(jax.jit(lambda x: augment.normalise(x, zscore))(hu)),
                             zscore(hu), atol=1e-6)
  with pytest.raises(ValueError, match="lo < hi"):
    intensity.Normaliser(lo=1.0, hi=0.0, offset=0.0, scale=1.0)


def test_clipping_report_counts_what_a_window_cuts():
  liver = np.zeros(slices.HU_HI - slices.HU_LO + 1, np.int64)
  tumour = liver.copy()
  liver[100 - slices.HU_LO] = 70
  liver[150 - slices.HU_LO] = 30  # bright liver above 140
  tumour[40 - slices.HU_LO] = 1
  tumour[180 - slices.HU_LO] = 3
  assert intensity.clipped_shares(liver, -60, 140) == (0.0, 0.3)
  lines = intensity.clipping_report(dict(liver=liver, tumour=tumour),
                                    {"paper": intensity.window(-60, 140)})
  assert lines == ["paper (-60..140 HU) clips: liver 0.0 % below, 30.0 % above; tumour 0.0 % "
                   "below, 75.0 % above"]
