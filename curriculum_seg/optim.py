"""Optimisers and learning-rate schedules built from a stage's config with optax.

Each stage builds its own optimiser (`build_optimizer(stage.optimizer, stage.schedule,
stage_steps)`), so a stage boundary can change optimiser, learning rate and schedule. The
learning rate is injected as an optax hyperparameter, so the train step can read the value it
applied from the optimiser state (key 'learning_rate').
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'poly')

Schedule = Callable[[Any], Any]


def build_schedule(sched_cfg: Any, peak_lr: float, total_steps: int) -> Schedule:
  """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then constant, cosine or poly decay.

  Decaying schedules reach `end_factor * peak_lr` at `total_steps` and stay there.
  """
  name = sched_cfg.name
  if name not in SCHEDULES:
    raise ValueError(f'schedule.name={name!r} is not one of {list(SCHEDULES)}')
  total_steps = int(total_steps)
  warmup = int(sched_cfg.get('warmup_steps', 0))
  if total_steps < 1:
    raise ValueError(f'total_steps={total_steps} must be >= 1')
  if not 0 <= warmup < total_steps:
    raise ValueError(
        f'schedule.warmup_steps={warmup} must be >= 0 and < total_steps={total_steps}')
  peak_lr = float(peak_lr)
  end_lr = peak_lr * float(sched_cfg.get('end_factor', 0.0))

  if name == 'constant':
    main = optax.constant_schedule(peak_lr)
  elif name == 'cosine':
    main = optax.cosine_decay_schedule(
        peak_lr, total_steps - warmup, alpha=float(sched_cfg.get('end_factor', 0.0)))
  else:
    main = optax.polynomial_schedule(
        peak_lr, end_lr, float(sched_cfg.get('power', 0.9)), total_steps - warmup)
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, warmup), main], boundaries=[warmup])


def build_optimizer(opt_cfg: Any, sched_cfg: Any,
                    total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """Returns (optax transformation, schedule) for one stage.

  Gradient clipping by global norm comes first when `grad_clip_norm` > 0. 'adam' and 'sgd' use
  coupled L2 weight decay (added to the gradient before the update, like PyTorch's Adam/SGD
  `weight_decay` and the paper's Adam with weight decay 1e-4); 'adamw' uses decoupled weight
  decay scaled by the learning rate (optax.adamw). Weight decay applies to all parameters.
  """
  name = opt_cfg.name
  if name not in OPTIMIZERS:
    raise ValueError(f'optimizer.name={name!r} is not one of {list(OPTIMIZERS)}')
  schedule = build_schedule(sched_cfg, float(opt_cfg.learning_rate), total_steps)
  weight_decay = float(opt_cfg.get('weight_decay', 0.0))
  clip = float(opt_cfg.get('grad_clip_norm', 0.0))
  if clip < 0 or weight_decay < 0:
    raise ValueError(
        f'optimizer.grad_clip_norm={clip} and optimizer.weight_decay={weight_decay} must be >= 0')

  parts = []
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if name in ('adam', 'sgd') and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  if name in ('adam', 'adamw'):
    parts.append(optax.scale_by_adam(
        b1=float(opt_cfg.get('b1', 0.9)), b2=float(opt_cfg.get('b2', 0.999)),
        eps=float(opt_cfg.get('eps', 1e-8))))
  if name == 'adamw' and weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  if name == 'sgd':
    momentum = float(opt_cfg.get('momentum', 0.0))
    nesterov = bool(opt_cfg.get('nesterov', False))
    if nesterov and momentum <= 0:
      raise ValueError('optimizer.nesterov=True needs optimizer.momentum > 0')
    if momentum > 0:
      parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=schedule))
  return optax.chain(*parts), schedule


def applied_learning_rate(opt_state: Any) -> jax.Array | None:
  """The learning rate of the latest update, read from a `build_optimizer` state (else None)."""
  return optax.tree_utils.tree_get(
      opt_state, 'learning_rate', default=None,
      filtering=lambda _, value: isinstance(value, jax.Array))
