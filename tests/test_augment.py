"""Augmentation: stateless parameters, exact identities, image/label alignment, patch footprints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import augment, intensity

STRONG = augment.AugmentSpec(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=30.0,
                             scale_range=(0.8, 1.25))
# HU codes of the labels: after the -60..140 window, 0 -> 0.1, 1 -> 0.5, 2 -> 0.9; air (the fill
# outside the slice, 0.0 after windowing) and blends at block edges decode to no code.
CODES_HU = np.array([-40, 40, 120], np.int16)
CODES = np.array([0.1, 0.5, 0.9])


def _blocky_labels(n, size, block, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 3, size=(n, -(-size // block), -(-size // block)))
  return np.repeat(np.repeat(coarse, block, 1), block, 2)[:, :size, :size].astype(np.uint8)


def _finish(spec, images, labels, seed=0, out_size=None, out_centre=None, in_centre=None):
  n, size = images.shape[:2]
  out_size = size if out_size is None else out_size
  out_centre = (size - 1) / 2 if out_centre is None else out_centre
  in_centre = (size - 1) / 2 if in_centre is None else in_centre
  params = augment.sample_params(spec, seed, np.arange(n))
  batch = dict(image=images, label=labels, mask=np.ones(n, np.float32),
               affine=augment.affine_matrices(params, out_centre, in_centre),
               intensity=augment.intensity_pairs(params, lesion=spec.lesion_contrast))
  finish = jax.jit(augment.make_finish(intensity.window(-60.0, 140.0), out_size, warp=True))
  return jax.tree.map(np.asarray, finish(batch)), batch


def _agreement(image, label):
  """Per example: among pixels whose intensity is one label's code (not a bilinear blend at a
  block edge), the share whose label is that code's; and the share of such pixels."""
  distance = np.abs(image[..., :1] - CODES)
  pure = distance.min(-1) < 1e-3
  decoded = distance.argmin(-1)
  agree = ((decoded == label) & pure).sum(axis=(1, 2)) / np.maximum(pure.sum(axis=(1, 2)), 1)
  return agree, pure.mean(axis=(1, 2))


def test_counter_uniform_is_a_pure_function_of_seed_counter_and_stream():
  u = augment.counter_uniform(3, np.arange(10_000), 1)
  np.testing.assert_array_equal(u, augment.counter_uniform(3, np.arange(10_000), 1))
  np.testing.assert_array_equal(u[5000:], augment.counter_uniform(3, np.arange(5000, 10_000), 1))
  assert (u >= 0).all() and (u < 1).all()
  assert abs(u.mean() - 0.5) < 0.01 and abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.03
  assert not np.allclose(u, augment.counter_uniform(4, np.arange(10_000), 1))
  assert not np.allclose(u, augment.counter_uniform(3, np.arange(10_000), 2))


def test_augmentation_keeps_image_and_label_aligned():
  labels = _blocky_labels(16, 64, 8)
  images = np.repeat(CODES_HU[labels][..., None], 3, -1)
  out, batch = _finish(STRONG, images, labels)
  # The transforms did move pixels (rotations, scalings, flips) ...
  moved = (out["label"] != labels).mean(axis=(1, 2))
  assert (moved > 0.2).sum() >= 12
  # ... and moved image and label together: only pixels at block edges may disagree.
  agreement, coverage = _agreement(out["image"], out["label"])
  assert agreement.min() > 0.995 and coverage.min() > 0.5, (agreement, coverage)
  # The check is sensitive: warping the label with another example's map breaks it.
  image_only = jax.vmap(lambda i, a: augment.warp_bilinear(i.astype(jnp.float32), a, 64))(
      batch["image"], batch["affine"])
  label_other = jax.vmap(lambda lb, a: augment.warp_nearest(lb, a, 64))(
      batch["label"], np.roll(batch["affine"], 1, axis=0))
  misaligned, _ = _agreement(np.clip((np.asarray(image_only) + 60) / 200, 0, 1),
                             np.asarray(label_other))
  assert misaligned.mean() < 0.7, misaligned


def test_patch_alignment_with_footprint_crop_and_air_padding():
  patch = 16
  f = STRONG.footprint(patch)
  labels = _blocky_labels(12, f, 8, seed=1)
  images = np.repeat(CODES_HU[labels][..., None], 2, -1)
  out, _ = _finish(STRONG, images, labels, out_size=patch, out_centre=patch // 2,
                   in_centre=f // 2)
  assert out["image"].shape == (12, patch, patch, 2) and out["label"].shape == (12, patch, patch)
  agreement, coverage = _agreement(out["image"], out["label"])
  assert agreement.min() > 0.995 and coverage.min() > 0.4, (agreement, coverage)


def test_footprint_holds_every_sampled_patch():
  for spec in (STRONG, augment.AugmentSpec(enabled=True, rotate_deg=60.0, scale_range=(0.5, 1.0)),
               augment.AugmentSpec(enabled=True, flip_lr=1.0)):
    for patch in (16, 17, 128):
      f = spec.footprint(patch)
      params = augment.sample_params(spec, 0, np.arange(2000))
      affine = augment.affine_matrices(params, patch // 2, f // 2)
      corners = np.array([[0, 0, 1], [0, patch - 1, 1], [patch - 1, 0, 1],
                          [patch - 1, patch - 1, 1]], np.float32)
      mapped = np.einsum("nij,kj->nki", affine, corners)
      # Bilinear taps reach floor(x) and floor(x) + 1: all inside the footprint.
      assert mapped.min() >= 0 and mapped.max() < f - 1, (spec, patch, f)


def test_identity_parameters_are_exact_windowing():
  rng = np.random.default_rng(0)
  images = rng.integers(-1024, 400, size=(4, 20, 20, 3)).astype(np.int16)
  labels = rng.integers(0, 3, size=(4, 20, 20)).astype(np.uint8)
  out, _ = _finish(augment.AugmentSpec(), images, labels)
  np.testing.assert_array_equal(out["label"], labels)
  np.testing.assert_allclose(out["image"], np.clip((images + 60.0) / 200.0, 0, 1), atol=1e-6)
  # A patch of the identity map is the integer crop around in_centre.
  out, _ = _finish(augment.AugmentSpec(), images, labels, out_size=8, out_centre=4, in_centre=9)
  np.testing.assert_array_equal(out["label"], labels[:, 5:13, 5:13])


def test_flips_mirror_exactly():
  rng = np.random.default_rng(1)
  images = rng.integers(-100, 200, size=(3, 10, 10, 1)).astype(np.int16)
  labels = rng.integers(0, 3, size=(3, 10, 10)).astype(np.uint8)
  out, _ = _finish(augment.AugmentSpec(enabled=True, flip_lr=1.0), images, labels)
  np.testing.assert_array_equal(out["label"], labels[:, :, ::-1])
  np.testing.assert_allclose(out["image"], np.clip((images[:, :, ::-1] + 60) / 200, 0, 1),
                             atol=1e-6)
  out, _ = _finish(augment.AugmentSpec(enabled=True, flip_ud=1.0), images, labels)
  np.testing.assert_array_equal(out["label"], labels[:, ::-1])


def test_outside_the_slice_is_air_and_background():
  images = np.full((1, 8, 8, 1), 100, np.int16)
  labels = np.ones((1, 8, 8), np.uint8)
  out, _ = _finish(augment.AugmentSpec(), images, labels, out_size=8, out_centre=4, in_centre=0)
  assert (out["label"][0, :4] == 0).all() and (out["label"][0, 4:, 4:] == 1).all()
  assert (out["image"][0, :4] == 0).all() and np.allclose(out["image"][0, 4:, 4:], 0.8)


def test_intensity_jitter_scales_and_shifts_windowed_values():
  spec = augment.AugmentSpec(enabled=True, intensity_shift=0.1, intensity_scale=0.2)
  params = augment.sample_params(spec, 5, np.arange(500))
  assert np.abs(params["intensity_shift"]).max() <= 0.1 and params["intensity_shift"].std() > 0.03
  assert np.abs(params["intensity_scale"] - 1).max() <= 0.2
  images = np.full((6, 4, 4, 1), 40, np.int16)  # 0.5 after windowing
  out, batch = _finish(spec, images, np.zeros((6, 4, 4), np.uint8), seed=5)
  expected = np.clip(0.5 * batch["intensity"][:, 0] + batch["intensity"][:, 1], 0, 1)
  np.testing.assert_allclose(out["image"][:, 0, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("key,value", [("flip_lr", 1.5), ("flip_ud", -0.1), ("rotate_deg", -1),
                                       ("scale_range", (1.2, 0.8)), ("intensity_shift", 2.0),
                                       ("intensity_scale", 1.0), ("lesion_scale", (1.5, 0.5)),
                                       ("lesion_scale", (-0.5, 1.0)), ("lesion_scale", (1.0,)),
                                       ("lesion_invert", 1.2)])
def test_bad_augment_values_name_their_key(key, value):
  cfg = dict(enabled=True)
  cfg[key] = value
  with pytest.raises(ValueError, match=f"augment.{key}"):
    augment.AugmentSpec.from_config(cfg)


LESION = augment.AugmentSpec(enabled=True, lesion_scale=(0.5, 1.5), lesion_invert=0.25)


def test_lesion_contrast_factors_are_drawn_as_asked_and_leave_the_rest_alone():
  params = augment.sample_params(LESION, 7, np.arange(4000))
  f = params["lesion_factor"]
  assert (np.abs(f) >= 0.5).all() and (np.abs(f) <= 1.5).all() and np.abs(f).std() > 0.2
  assert abs((f < 0).mean() - 0.25) < 0.03
  plain = augment.sample_params(augment.AugmentSpec(enabled=True), 7, np.arange(4000))
  assert (plain["lesion_factor"] == 1).all()
  for key in ("angle", "scale", "flip_lr", "flip_ud", "intensity_scale", "intensity_shift"):
    np.testing.assert_array_equal(params[key], plain[key])  # its own hash streams
  assert LESION.lesion_contrast and not augment.AugmentSpec(enabled=True).lesion_contrast
  assert not augment.AugmentSpec(lesion_invert=1.0).lesion_contrast, "augmentation off"
  assert augment.intensity_pairs(params, lesion=True).shape == (4000, 3)
  assert augment.intensity_pairs(params).shape == (4000, 2)
  spec = augment.AugmentSpec.from_config(dict(enabled=True, lesion_scale=[0.5, 1.5],
                                              lesion_invert=0.25))
  assert spec == LESION


def _liver_with_lesion(n=1):
  """Liver at 100 HU (slice 0: 90 / 100 / 110 over the context channels), a 60 HU lesion."""
  label = np.zeros((n, 8, 8), np.uint8)
  label[:, 1:7, 1:7] = 1
  label[:, 3:5, 3:5] = 2
  image = np.full((n, 8, 8, 3), -200, np.int16)
  image[:, 1:7, 1:7] = np.array([90, 100, 110], np.int16)
  image[:, 3:5, 3:5] = np.array([50, 60, 70], np.int16)
  return image, label


def test_lesion_contrast_moves_only_tumour_voxels_about_the_liver_mean():
  image, label = _liver_with_lesion()
  ref = 100.0  # the centre channel's mean over liver voxels (label 1 only)
  for factor, centre in ((-1.0, 140.0), (0.5, 80.0), (1.0, 60.0), (0.0, 100.0)):
    out = np.asarray(augment.scale_lesion_contrast(image[0], label[0], factor))
    np.testing.assert_allclose(out[3, 3], ref + factor * (image[0, 3, 3] - ref))
    assert out[3, 3, 1] == pytest.approx(centre)
    np.testing.assert_array_equal(out[label[0] != 2], image[0][label[0] != 2])
  no_liver = np.where(label[0] == 1, 0, label[0])
  np.testing.assert_array_equal(
      np.asarray(augment.scale_lesion_contrast(image[0], no_liver, -1.0)), image[0])


def test_the_device_finish_applies_the_drawn_lesion_factor():
  image, label = _liver_with_lesion(64)
  out, batch = _finish(LESION, image, label, seed=3)
  assert batch["intensity"].shape == (64, 3)
  f = batch["intensity"][:, 2]
  expected = np.clip((100 + f * (60 - 100) + 60) / 200, 0, 1)  # windowed -60..140
  np.testing.assert_allclose(out["image"][:, 3, 3, 1], expected, atol=1e-5)
  np.testing.assert_allclose(out["image"][:, 2, 2, 1], 160 / 200, atol=1e-6)
  assert (f < 0).any() and (out["image"][f < 0, 3, 3, 1] > 0.8).all(), "inverted: brighter"
  plain, _ = _finish(augment.AugmentSpec(), image, label, seed=3)
  np.testing.assert_allclose(plain["image"][:, 3, 3, 1], 0.6, atol=1e-6)
