"""Optimisers and learning-rate schedules built from a stage's config with optax.

Each stage builds its own optimiser (`build_optimizer(stage.optimizer, stage.schedule,
stage_steps)`), so a stage boundary can change optimiser, learning rate and schedule. The
learning rate is injected as an optax hyperparameter, so the train step can read the value it
applied from the optimiser state (key 'learning_rate').
"""

from __future__ import annotations

import math

from collections.abc import Callable
from typing import Any

import jax
import optax

OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'poly')

Schedule = Callable[[Any], Any]


def effective_warmup(sched_cfg: Any, total_steps: int) -> int:
  """The warm-up steps a schedule uses: `schedule.warmup_steps`, at most `total_steps - 1`.

  Raises ValueError for a negative warm-up or fewer than one step.
  """
  total_steps = int(total_steps)
  if total_steps < 1:
    raise ValueError(f'steps={total_steps} must be >= 1')
  warmup = sched_cfg.get('warmup_steps', 0)
  if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
    raise ValueError(f'schedule.warmup_steps={warmup!r} must be an integer >= 0')
  return min(warmup, total_steps - 1)


def build_schedule(sched_cfg: Any, peak_lr: float, total_steps: int) -> Schedule:
  """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then constant, cosine or poly decay.

  Decaying schedules reach `end_factor * peak_lr` at `total_steps` and stay there. A warm-up as
  long as the stage or longer is clamped to `total_steps - 1` (`effective_warmup`), so a short
  run of a config made for long ones (`--config.stages.whole1.steps=5`) just works.
  """
  name = sched_cfg.name
  if name not in SCHEDULES:
    raise ValueError(f'schedule.name={name!r} is not one of {list(SCHEDULES)}')
  total_steps = int(total_steps)
  warmup = effective_warmup(sched_cfg, total_steps)
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
  learning_rate = opt_cfg.learning_rate
  if (isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float))
      or not math.isfinite(learning_rate) or learning_rate < 0):
    raise ValueError(f'optimizer.learning_rate={learning_rate!r} must be a number >= 0')
  for key in ('b1', 'b2'):
    value = float(opt_cfg.get(key, 0.9))
    if not 0.0 <= value < 1.0:
      raise ValueError(f'optimizer.{key}={value} must be in [0, 1)')
  schedule = build_schedule(sched_cfg, float(learning_rate), total_steps)
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
