"""Losses against values computed by hand on small arrays."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from curriculum_seg import losses

LOG3 = math.log(3.0)


def two_class_logits(p_foreground):
  """Logits [.., 2] whose softmax foreground probability is `p_foreground` (logit log(p/(1-p)))."""
  p = np.asarray(p_foreground, np.float64)
  return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=-1).astype(np.float32)


# One example, 2x2 pixels: foreground probabilities and targets.
P = np.array([[[0.75, 0.25], [0.5, 0.5]]])
T = np.array([[[1, 0], [1, 0]]], np.int32)


def loss_config(name, class_weights=None, smooth=1.0):
  return ml_collections.ConfigDict(
      {'name': name, 'class_weights': class_weights, 'dice_smooth': smooth})


def test_soft_dice_matches_hand_value():
  # intersection 0.75 + 0.5 = 1.25; sum p = 2; sum t = 2; smooth 1
  expected = 1 - (2 * 1.25 + 1) / (2 + 2 + 1)  # = 0.3
  got = losses.soft_dice_loss(jnp.asarray(two_class_logits(P)), T, np.ones(1), foreground=1)
  assert float(got) == pytest.approx(expected, abs=1e-6)
  assert float(got) == pytest.approx(0.3, abs=1e-6)


def test_soft_dice_ignores_padded_examples_and_sums_over_the_batch():
  logits = two_class_logits(np.concatenate([P, [[[0.9, 0.9], [0.9, 0.9]]], P[:, ::-1]]))
  targets = np.concatenate([T, [[[1, 1], [1, 1]]], T[:, ::-1]])
  mask = np.array([1.0, 0.0, 1.0])
  # Examples 0 and 2 are the same pixels reordered: batch sums are twice one example's.
  expected = 1 - (2 * 2.5 + 1) / (4 + 4 + 1)
  got = losses.soft_dice_loss(jnp.asarray(logits), targets, mask, foreground=1)
  assert float(got) == pytest.approx(expected, abs=1e-6)
  per_example = losses.soft_dice_loss(jnp.asarray(logits), targets, mask, foreground=1,
                                      per_example=True)
  np.testing.assert_allclose(per_example, [0.3, 0.0, 0.3], atol=1e-6)


def test_soft_dice_without_smoothing_on_empty_masks_is_zero_not_nan():
  logits = np.zeros((1, 2, 2, 2), np.float32)
  logits[..., 0] = 200.0  # foreground probability underflows to exactly 0
  targets = np.zeros((1, 2, 2), np.int32)
  got = losses.soft_dice_loss(jnp.asarray(logits), targets, np.ones(1), 1, smooth=0.0)
  assert np.isfinite(float(got)) and float(got) == pytest.approx(0.0, abs=1e-6)
  all_padding = losses.soft_dice_loss(jnp.asarray(logits), targets, np.zeros(1), 1, smooth=0.0)
  assert float(all_padding) == 0.0


def test_cross_entropy_matches_hand_value():
  # -log p of the target class per pixel: t=1,p=.75 | t=0,p=.25 | t=1,p=.5 | t=0,p=.5
  nll = [-math.log(0.75), -math.log(0.75), math.log(2), math.log(2)]
  got = losses.cross_entropy_loss(jnp.asarray(two_class_logits(P)), T, np.ones(1))
  assert float(got) == pytest.approx(sum(nll) / 4, abs=1e-6)


def test_weighted_cross_entropy_matches_hand_value():
  targets = np.array([[[1, 1], [0, 0]]], np.int32)
  # per-pixel nll: -log .75, -log .25, -log .5, -log .5; weights by target class (1, 3)
  nll = [-math.log(0.75), -math.log(0.25), math.log(2), math.log(2)]
  weights = [3, 3, 1, 1]
  expected = sum(w * v for w, v in zip(weights, nll)) / sum(weights)
  got = losses.cross_entropy_loss(jnp.asarray(two_class_logits(P)), targets, np.ones(1),
                                  class_weights=(1.0, 3.0))
  assert float(got) == pytest.approx(expected, abs=1e-6)


def test_cross_entropy_three_classes_uniform_is_log3_and_padding_counts_nothing():
  logits = np.zeros((2, 2, 2, 3), np.float32)
  logits[1] = np.random.default_rng(0).normal(size=(2, 2, 3)) * 10
  targets = np.array([[[0, 1], [2, 2]], [[1, 1], [0, 2]]], np.int32)
  got = losses.cross_entropy_loss(jnp.asarray(logits), targets, np.array([1.0, 0.0]))
  assert float(got) == pytest.approx(LOG3, abs=1e-6)


def test_wrong_number_of_class_weights_is_an_error():
  with pytest.raises(ValueError, match='class_weights has 3 entries; the task has 2 classes'):
    losses.cross_entropy_loss(jnp.asarray(two_class_logits(P)), T, np.ones(1), (1.0, 2.0, 3.0))


def test_dice_ce_is_the_sum_and_uses_the_task_foreground():
  fn = losses.make_loss_fn(loss_config('dice_ce'), 'tumour')
  expected = 0.3 + (-2 * math.log(0.75) + 2 * math.log(2)) / 4
  assert float(fn(jnp.asarray(two_class_logits(P)), T, np.ones(1))) == pytest.approx(
      expected, abs=1e-6)


def test_three_class_dice_is_on_the_tumour_channel():
  # softmax over 3 classes with logits (0, 0, log 2 * k): tumour channel probability 0.5 where
  # the logits are (0, 0, log 2) and 1/3 where all are 0.
  logits = np.zeros((1, 1, 2, 3), np.float32)
  logits[0, 0, 0, 2] = math.log(2.0)
  targets = np.array([[[2, 1]]], np.int32)
  p = [0.5, 1 / 3]
  expected = 1 - (2 * 0.5 + 1) / (sum(p) + 1 + 1)
  fn = losses.make_loss_fn(loss_config('dice'), 'three_class')
  assert float(fn(jnp.asarray(logits), targets, np.ones(1))) == pytest.approx(expected, abs=1e-6)


def test_losses_are_float32_from_bfloat16_logits():
  logits = jnp.asarray(two_class_logits(P), jnp.bfloat16)
  for name in ('dice', 'ce', 'dice_ce'):
    value = losses.make_loss_fn(loss_config(name), 'tumour')(logits, T, np.ones(1))
    assert value.dtype == jnp.float32


def test_targets_from_labels_by_task():
  labels = np.array([[0, 1, 2]], np.int32)
  np.testing.assert_array_equal(losses.targets_from_labels(labels, 'tumour'), [[0, 0, 1]])
  np.testing.assert_array_equal(losses.targets_from_labels(labels, 'liver'), [[0, 1, 1]])
  np.testing.assert_array_equal(losses.targets_from_labels(labels, 'three_class'), [[0, 1, 2]])
  assert losses.foreground_class('liver') == 1
  assert losses.foreground_class('three_class') == 2
  with pytest.raises(ValueError, match='model.task'):
    losses.targets_from_labels(labels, 'kidney')


def test_unknown_loss_name_is_an_error_naming_the_key():
  message = r"loss.name='focal' is not one of \['dice', 'ce', 'dice_ce'\]"
  with pytest.raises(ValueError, match=message):
    losses.make_loss_fn(loss_config('focal'), 'tumour')


# Dice + cross-entropy: weights, smoothing, and batches without foreground.

def dice_ce_config(smooth=1.0, dice_weight=1.0, ce_weight=1.0, name='dice_ce'):
  return ml_collections.ConfigDict({'name': name, 'class_weights': None, 'dice_smooth': smooth,
                                    'dice_weight': dice_weight, 'ce_weight': ce_weight})


CE_OF_P = (-2 * math.log(0.75) + 2 * math.log(2)) / 4  # cross-entropy of P against T


def test_dice_ce_weights_and_smoothing_match_hand_values():
  logits = jnp.asarray(two_class_logits(P))
  # smooth 0: 1 - 2 * 1.25 / (2 + 2) = 0.375; smooth 1: 0.3 (above)
  fn = losses.make_loss_fn(dice_ce_config(smooth=0.0, dice_weight=2.0, ce_weight=0.5), 'tumour')
  assert float(fn(logits, T, np.ones(1))) == pytest.approx(2 * 0.375 + 0.5 * CE_OF_P, abs=1e-6)
  fn = losses.make_loss_fn(dice_ce_config(smooth=1.0, dice_weight=0.0), 'tumour')
  assert float(fn(logits, T, np.ones(1))) == pytest.approx(CE_OF_P, abs=1e-6)
  # The weights scale the single-term losses too; per-example values are weighted the same way.
  fn = losses.make_loss_fn(dice_ce_config(name='dice', dice_weight=3.0), 'tumour')
  assert float(fn(logits, T, np.ones(1))) == pytest.approx(0.9, abs=1e-6)
  fn = losses.make_loss_fn(dice_ce_config(dice_weight=2.0, ce_weight=0.5), 'tumour')
  per_example = fn(jnp.concatenate([logits, logits]), np.concatenate([T, T]), np.array([1., 0.]),
                   per_example=True)
  np.testing.assert_allclose(per_example, [2 * 0.3 + 0.5 * CE_OF_P, 0.0], atol=1e-6)


def test_configs_saved_without_the_weights_get_one_and_one():
  old = losses.make_loss_fn(loss_config('dice_ce'), 'tumour')  # no dice_weight / ce_weight keys
  new = losses.make_loss_fn(dice_ce_config(), 'tumour')
  logits = jnp.asarray(two_class_logits(P))
  assert float(old(logits, T, np.ones(1))) == float(new(logits, T, np.ones(1)))


@pytest.mark.parametrize('overrides,pattern', [
    (dict(smooth=-1.0), r'loss.dice_smooth=-1.0 must be >= 0'),
    (dict(dice_weight=-1.0), r'loss.dice_weight=-1.0 must be >= 0'),
    (dict(ce_weight=float('nan')), r'loss.ce_weight=nan must be >= 0'),
    (dict(dice_weight=0.0, ce_weight=0.0), r'loss.dice_weight and loss.ce_weight = 0'),
    (dict(name='dice', dice_weight=0.0), r"loss.dice_weight = 0: loss.name='dice'"),
])
def test_bad_loss_weights_are_errors_naming_the_key(overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    losses.make_loss_fn(dice_ce_config(**overrides), 'tumour')


EMPTY = np.zeros_like(T)  # a batch without tumour


def loss_and_foreground_grad(config, targets=EMPTY):
  """Loss of P against `targets`, and its gradient w.r.t. the foreground logits (2x2)."""
  fn = losses.make_loss_fn(config, 'tumour')
  value, grad = jax.value_and_grad(lambda z: fn(z, targets, np.ones(1)))(
      jnp.asarray(two_class_logits(P)))
  np.testing.assert_allclose(grad[..., 0], -grad[..., 1], atol=1e-7)  # softmax: zero-sum
  return float(value), np.asarray(grad[0, ..., 1])


def test_empty_target_dice_with_smoothing_pushes_every_prediction_down():
  # Dice = 1 - s / (sum p + s) = 1 - 1 / 3; d/dz_i = s / (sum p + s)^2 * p_i (1 - p_i)
  value, grad = loss_and_foreground_grad(dice_ce_config(name='dice'))
  assert value == pytest.approx(2 / 3, abs=1e-6)
  np.testing.assert_allclose(grad, P[0] * (1 - P[0]) / 9, rtol=1e-5)
  assert np.all(grad > 0)  # gradient descent lowers every foreground logit: towards empty


def test_empty_target_dice_without_smoothing_is_exactly_one_with_zero_gradient():
  value, grad = loss_and_foreground_grad(dice_ce_config(name='dice', smooth=0.0))
  assert value == 1.0 and np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize('smooth', [0.0, 1.0])
def test_empty_target_cross_entropy_keeps_a_per_pixel_gradient(smooth):
  # CE of an all-background target: mean of -log(1 - p); d/dz_i = p_i / N (N = 4 pixels)
  expected_ce = -np.mean(np.log(1 - P))
  dice_value, dice_grad = loss_and_foreground_grad(dice_ce_config(name='dice', smooth=smooth))
  value, grad = loss_and_foreground_grad(dice_ce_config(smooth=smooth))
  assert value == pytest.approx(dice_value + expected_ce, abs=1e-6)
  np.testing.assert_allclose(grad - dice_grad, P[0] / 4, rtol=1e-5)
  assert np.all(grad - dice_grad >= 0.0625 - 1e-6)  # at least min(p) / N at every pixel


@pytest.mark.parametrize('name', ['dice', 'ce', 'dice_ce'])
def test_3d_volumes_reduce_over_every_spatial_axis(name):
  # Two volumes [2, 2, 2, 2]: example 0 holds P / T as its first depth slice and a copy of them
  # in reverse as its second; example 1 is padding. Per-example values and batch values then
  # equal those of the 2-D batch of the two slices.
  volume_p = np.stack([P[0], P[0, ::-1]])[None]
  volume_t = np.stack([T[0], T[0, ::-1]])[None]
  logits = jnp.asarray(two_class_logits(np.concatenate([volume_p, np.full_like(volume_p, 0.9)])))
  targets = np.concatenate([volume_t, np.ones_like(volume_t)])
  mask = np.array([1.0, 0.0])
  assert logits.shape == (2, 2, 2, 2, 2)
  loss_fn = losses.make_loss_fn(loss_config(name), 'tumour')
  slices = jnp.asarray(two_class_logits(volume_p[0])), volume_t[0], np.ones(2)
  want = float(loss_fn(*slices))  # the batch of the volume's two slices
  got = loss_fn(logits, targets, mask, per_example=True)
  assert got.shape == (2,)
  assert float(got[0]) == pytest.approx(want, abs=1e-6) and float(got[1]) == 0.0
  assert float(loss_fn(logits, targets, mask)) == pytest.approx(want, abs=1e-6)
  if name == 'dice':  # and the hand value: the 2-D batch of P and its mirror doubles every sum
    assert want == pytest.approx(1 - (2 * 2.5 + 1) / (4 + 4 + 1), abs=1e-6)
