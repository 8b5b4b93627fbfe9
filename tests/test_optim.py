"""Optimisers and schedules from config, checked against updates computed by hand."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from curriculum_seg import optim


def opt_config(**overrides):
  cfg = dict(name='adam', learning_rate=0.1, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
             momentum=0.0, nesterov=False, grad_clip_norm=0.0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def sched_config(**overrides):
  cfg = dict(name='constant', warmup_steps=0, end_factor=0.0, power=1.0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def one_update(opt_cfg, params, grads, steps=1, sched_cfg=None):
  tx, _ = optim.build_optimizer(opt_cfg, sched_cfg or sched_config(), 100)
  state = tx.init(params)
  updates = []
  for _ in range(steps):
    update, state = tx.update(grads, state, params)
    updates.append(np.asarray(update['w']))
  return updates, state


def test_constant_schedule_with_warmup():
  schedule = optim.build_schedule(sched_config(warmup_steps=4), 0.2, 10)
  np.testing.assert_allclose([schedule(s) for s in (0, 2, 4, 7, 10, 20)],
                             [0.0, 0.1, 0.2, 0.2, 0.2, 0.2], atol=1e-7)


def test_cosine_schedule_reaches_the_end_factor():
  schedule = optim.build_schedule(sched_config(name='cosine', warmup_steps=2, end_factor=0.1),
                                  1.0, 12)
  # after warm-up: 0.1 + 0.9 * (1 + cos(pi * t / 10)) / 2 for t = step - 2
  for step in (2, 4, 7, 12, 30):
    t = min(step - 2, 10)
    expected = 0.1 + 0.9 * (1 + math.cos(math.pi * t / 10)) / 2
    assert float(schedule(step)) == pytest.approx(expected, abs=1e-6)
  assert float(schedule(1)) == pytest.approx(0.5, abs=1e-6)


def test_poly_schedule_matches_formula():
  schedule = optim.build_schedule(sched_config(name='poly', power=0.9, end_factor=0.0), 0.01, 100)
  for step in (0, 25, 50, 99, 100):
    assert float(schedule(step)) == pytest.approx(0.01 * (1 - step / 100) ** 0.9, abs=1e-8)


def test_first_adam_step_is_learning_rate_times_sign():
  (update,), _ = one_update(opt_config(), {'w': jnp.array([1.0, -2.0])},
                            {'w': jnp.array([0.5, -3.0])})
  np.testing.assert_allclose(update, [-0.1, 0.1], rtol=1e-5)


def test_adam_weight_decay_is_l2_and_adamw_is_decoupled():
  params = {'w': jnp.array([2.0])}
  zero_grad = {'w': jnp.array([0.0])}
  # adam: the decay 0.1 * 2 = 0.2 is the gradient Adam normalises -> update -lr * 1
  (adam,), _ = one_update(opt_config(weight_decay=0.1), params, zero_grad)
  np.testing.assert_allclose(adam, [-0.1], rtol=1e-5)
  # adamw: Adam's step is 0 for a zero gradient; the decay adds -lr * 0.1 * 2
  (adamw,), _ = one_update(opt_config(name='adamw', weight_decay=0.1), params, zero_grad)
  np.testing.assert_allclose(adamw, [-0.1 * 0.2], rtol=1e-5)


def test_sgd_nesterov_matches_hand_computed_steps():
  g, mu, lr = 0.5, 0.9, 0.1
  updates, _ = one_update(opt_config(name='sgd', momentum=mu, nesterov=True), {'w': jnp.zeros(1)},
                          {'w': jnp.array([g])}, steps=2)
  # buffer b1 = g; update g + mu b1. b2 = g + mu b1; update g + mu b2.
  b1 = g
  b2 = g + mu * b1
  np.testing.assert_allclose(updates[0], [-lr * (g + mu * b1)], rtol=1e-6)
  np.testing.assert_allclose(updates[1], [-lr * (g + mu * b2)], rtol=1e-6)


def test_gradient_clipping_by_global_norm():
  (update,), _ = one_update(opt_config(name='sgd', grad_clip_norm=1.0), {'w': jnp.zeros(2)},
                            {'w': jnp.array([3.0, 4.0])})
  np.testing.assert_allclose(update, [-0.1 * 0.6, -0.1 * 0.8], rtol=1e-6)


def test_the_applied_learning_rate_is_readable_from_the_state():
  _, state = one_update(opt_config(), {'w': jnp.ones(1)}, {'w': jnp.ones(1)}, steps=3,
                        sched_cfg=sched_config(warmup_steps=4))
  lr = optim.applied_learning_rate(state)
  assert float(lr) == pytest.approx(0.1 * 2 / 4)  # the rate of the 3rd update (step index 2)


@pytest.mark.parametrize('section,cfg_fn,pattern', [
    ('optimizer', lambda: opt_config(name='rmsprop'),
     r"optimizer.name='rmsprop' is not one of \['adam', 'adamw', 'sgd'\]"),
    ('schedule', lambda: sched_config(name='step'),
     r"schedule.name='step' is not one of \['constant', 'cosine', 'poly'\]"),
])
def test_unknown_names_are_errors_naming_key_and_allowed_values(section, cfg_fn, pattern):
  opt_cfg = cfg_fn() if section == 'optimizer' else opt_config()
  sched_cfg = cfg_fn() if section == 'schedule' else sched_config()
  with pytest.raises(ValueError, match=pattern):
    optim.build_optimizer(opt_cfg, sched_cfg, 10)


def test_a_warmup_longer_than_the_stage_is_clamped_to_steps_minus_one():
  """A config made for long stages runs for 5 steps: warm-up over 4, the peak at step 4."""
  for warmup in (4, 5, 50):
    assert optim.effective_warmup(sched_config(warmup_steps=warmup), 5) == 4
  schedule = optim.build_schedule(sched_config(warmup_steps=50), 0.2, 5)
  np.testing.assert_allclose([float(schedule(i)) for i in range(5)], [0.0, 0.05, 0.1, 0.15, 0.2],
                             rtol=1e-6)
  assert optim.effective_warmup(sched_config(warmup_steps=3), 5) == 3  # shorter: unchanged
  assert optim.effective_warmup(sched_config(warmup_steps=50), 1) == 0
  with pytest.raises(ValueError, match='warmup_steps=-1'):
    optim.build_optimizer(opt_config(), sched_config(warmup_steps=-1), 10)
  with pytest.raises(ValueError, match='steps=0'):
    optim.build_optimizer(opt_config(), sched_config(), 0)
