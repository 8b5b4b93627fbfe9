"""Segmentation losses (soft Dice, cross-entropy, both) computed in float32 with example masks.

Labels arrive as raw LiTS labels {0 background, 1 liver, 2 tumour}; `targets_from_labels` maps
them to class indices for a task. Every loss takes a per-example `mask` (1 real, 0 padding) so
padded examples contribute nothing. Losses are batch-global by default (one Dice over all real
pixels of the batch, as in V-Net style training: tumour-free slices then do not produce a
degenerate per-slice Dice); `per_example=True` gives one value per example, which the eval step
sums so a validation loss is exact whatever the batching.

'dice_ce' is Dice + cross-entropy as nnU-Net trains (DC_and_CE_loss with batch Dice, background
excluded; MONAI's DiceCELoss with batch=True, include_background=False): the soft Dice loss of
the foreground channel over the whole batch plus the mean pixel cross-entropy, weighted by
`loss.dice_weight` and `loss.ce_weight` (for 'three_class' the Dice is the tumour channel's
alone, where nnU-Net would average liver and tumour). On a batch without foreground in the
target the Dice term can only push the foreground probabilities down (smooth > 0) or is a
constant (smooth = 0), while the cross-entropy keeps its per-pixel gradient p_fg / N on every
real pixel: on tumour-free batches Dice alone (the paper's loss) only pulls predictions towards
empty, while with CE every pixel keeps a calibrated signal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from curriculum_seg import tasks
from curriculum_seg.tasks import foreground_class

LOSS_NAMES = ('dice', 'ce', 'dice_ce')

LossFn = Callable[..., jax.Array]


def targets_from_labels(labels: jax.Array, task: str) -> jax.Array:
  """Raw LiTS labels as int32 class targets of `task` (`tasks.class_targets`)."""
  return tasks.class_targets(jnp.asarray(labels), task)


def _pixel_mask(mask: jax.Array, like: jax.Array) -> jax.Array:
  """Per-example mask [B] broadcast to the shape of `like` [B, *spatial] (2-D or 3-D)."""
  mask = jnp.asarray(mask, jnp.float32)
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (like.ndim - 1)), like.shape)


def _reduce_axes(ndim: int, per_example: bool) -> tuple[int, ...]:
  return tuple(range(1 if per_example else 0, ndim))


def soft_dice_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, foreground: int,
                   smooth: float = 1.0, per_example: bool = False) -> jax.Array:
  """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) on the softmax channel `foreground`.

  Sums run over the real examples' pixels (and the batch unless `per_example`). A target
  without foreground gives 1 - s / (sum(p) + s): with s > 0 its gradient lowers every p (the
  pull towards empty predictions), with s = 0 it is exactly 1 with zero gradient (no overlap is
  possible; the Dice term then trains nothing). The one exception is an exactly empty
  denominator (s = 0, target empty and every p exactly 0, which only underflow gives, or no
  real pixels): the loss is 0, a perfect match, never NaN.
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., foreground]
  target = (targets == foreground).astype(jnp.float32)
  weight = _pixel_mask(mask, target)
  axes = _reduce_axes(target.ndim, per_example)
  intersection = jnp.sum(weight * probs * target, axis=axes)
  denominator = jnp.sum(weight * probs, axis=axes) + jnp.sum(weight * target, axis=axes)
  numerator = 2.0 * intersection + smooth
  denominator = denominator + smooth
  # Only an exactly empty denominator is special-cased: NaN must propagate to be reported.
  empty = denominator == 0
  return jnp.where(empty, 0.0, 1.0 - numerator / jnp.where(empty, 1.0, denominator))


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                       class_weights: Sequence[float] | None = None,
                       per_example: bool = False) -> jax.Array:
  """Pixel softmax cross-entropy, averaged as sum(w_y * nll) / sum(w_y) over real pixels.

  With class weights w this is PyTorch's weighted-mean convention; without, a plain mean.
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  weight = _pixel_mask(mask, nll)
  if class_weights is not None:
    weights = jnp.asarray(class_weights, jnp.float32)
    if weights.shape != (logits.shape[-1],):
      raise ValueError(
          f'loss.class_weights has {weights.shape[0] if weights.ndim else 0} entries; the task '
          f'has {logits.shape[-1]} classes')
    weight = weight * weights[targets]
  axes = _reduce_axes(nll.ndim, per_example)
  total = jnp.sum(weight * nll, axis=axes)
  norm = jnp.sum(weight, axis=axes)
  empty = norm == 0
  return jnp.where(empty, 0.0, total / jnp.where(empty, 1.0, norm))


def make_loss_fn(loss_cfg: Any, task: str) -> LossFn:
  """Returns `loss(logits, targets, mask, per_example=False)` for `config.loss` and the task.

  'dice' is the paper's loss (soft Dice of the task's foreground channel), 'ce' cross-entropy
  with optional `class_weights`, 'dice_ce' `dice_weight` * Dice + `ce_weight` * CE (each term
  of 'dice' and 'ce' is scaled by its weight too; both default to 1). Fields missing from
  `loss_cfg` (configs saved before they existed) take their defaults.
  """
  name = loss_cfg.name
  if name not in LOSS_NAMES:
    raise ValueError(f'loss.name={name!r} is not one of {list(LOSS_NAMES)}')
  foreground = foreground_class(task)
  smooth = float(loss_cfg.get('dice_smooth', 1.0))
  dice_weight = float(loss_cfg.get('dice_weight', 1.0))
  ce_weight = float(loss_cfg.get('ce_weight', 1.0))
  for key, value in (('dice_smooth', smooth), ('dice_weight', dice_weight),
                     ('ce_weight', ce_weight)):
    if not value >= 0.0:  # also rejects NaN
      raise ValueError(f'loss.{key}={value} must be >= 0')
  weights = {'dice': dict(dice_weight=dice_weight), 'ce': dict(ce_weight=ce_weight),
             'dice_ce': dict(dice_weight=dice_weight, ce_weight=ce_weight)}[name]
  if not any(weights.values()):
    raise ValueError(f"{' and '.join(f'loss.{k}' for k in weights)} = 0: loss.name={name!r} "
                     'would train nothing')
  class_weights = loss_cfg.get('class_weights', None)
  class_weights = None if class_weights is None else tuple(float(w) for w in class_weights)

  def loss_fn(logits, targets, mask, per_example=False):
    total = 0.0
    if name in ('dice', 'dice_ce'):
      total = total + dice_weight * soft_dice_loss(logits, targets, mask, foreground, smooth,
                                                   per_example)
    if name in ('ce', 'dice_ce'):
      total = total + ce_weight * cross_entropy_loss(logits, targets, mask, class_weights,
                                                     per_example)
    return total

  return loss_fn
