"""The train state and the compiled, sharded train / eval / predict steps.

Steps are pure functions compiled with `jax.jit` with explicit `NamedSharding`s: the state is
replicated, batches are split on 'data' (see `curriculum_seg.sharding`), and the XLA
partitioner inserts the cross-device reductions, so every metric is a global, replicated value.
The state argument of the train step is donated: do not use a state after passing it in.

Batches are dicts of global arrays: `image` float32 [B, *spatial, C], `label` int32 [B, *spatial]
with raw LiTS labels, `mask` float32 [B] (0 marks padding, which counts for nothing), where
spatial is (H, W) for a 2-D network and (D, H, W) for a 3-D one. The step maps labels to the
task's targets itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from curriculum_seg import losses
from curriculum_seg import optim
from curriculum_seg import sharding
from curriculum_seg.models import init_variables

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a train step changes: a pure pytree of arrays (Orbax-checkpointable).

  `step` counts train-step calls, including skipped ones; `skipped` counts the calls whose loss
  or gradients were non-finite and whose update was therefore not applied. The model and the
  optimiser (`tx`) live outside the state, in the step closures.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  skipped: jax.Array


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: Sequence[int], mesh: Mesh | None = None) -> TrainState:
  """Initialises parameters (float32), batch statistics and optimiser state.

  `input_shape` is [B, H, W, C] (2-D) or [B, D, H, W, C] (3-D) of any valid size (the model
  is fully convolutional). With a
  `mesh`, the state is created replicated on it, as the steps expect; every process computes the
  same values from the same `rng`.
  """
  out = None if mesh is None else sharding.replicated(mesh)
  if hasattr(model, 'check_input_shape'):
    model.check_input_shape(input_shape)
  variables = init_variables(model, rng, input_shape, out_shardings=out)
  params = variables['params']

  def rest(params):  # two distinct zero counters: a donated state must not alias buffers
    return tx.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)

  placement = {} if out is None else {'out_shardings': out}
  opt_state, step, skipped = jax.jit(rest, **placement)(params)
  return TrainState(step=step, params=params, batch_stats=variables.get('batch_stats', {}),
                    opt_state=opt_state, skipped=skipped)


def _variables(state: TrainState, params: Any) -> dict[str, Any]:
  variables = {'params': params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def _per_example(mask: jax.Array, like: jax.Array) -> jax.Array:
  """The example mask [B] shaped to broadcast against `like` [B, ...]."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _overlap_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                  foreground: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example hard-prediction foreground intersection, prediction and target pixel (voxel)
  counts, summed over all spatial axes."""
  pred = (jnp.argmax(logits, axis=-1) == foreground).astype(jnp.float32)
  target = (targets == foreground).astype(jnp.float32)
  weight = _per_example(mask.astype(jnp.float32), target)
  axes = tuple(range(1, target.ndim))
  return (jnp.sum(weight * pred * target, axis=axes), jnp.sum(weight * pred, axis=axes),
          jnp.sum(weight * target, axis=axes))


def dice_from_sums(intersection: jax.Array, pred_sum: jax.Array,
                   target_sum: jax.Array) -> jax.Array:
  """Dice = 2I / (P + T), and 1 when prediction and target are both empty (the LiTS rule)."""
  denominator = pred_sum + target_sum
  return jnp.where(denominator > 0,
                   2.0 * intersection / jnp.where(denominator > 0, denominator, 1.0), 1.0)


def _prepare(batch: Batch, task: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Images with padded rows zeroed (so nothing in them, not even NaN, reaches the loss), the
  task's int32 targets and the float32 example mask."""
  mask = batch['mask'].astype(jnp.float32)
  image = jnp.where(_per_example(mask, batch['image']) > 0, batch['image'], 0.0)
  return image, losses.targets_from_labels(batch['label'], task), mask


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, loss_cfg: Any,
                    task: str, mesh: Mesh) -> Callable[[TrainState, Batch, jax.Array],
                                                      tuple[TrainState, Metrics]]:
  """Compiles `(state, batch, rng) -> (state, metrics)` for one optimiser step.

  `rng` is a base key (it may be the same every call): the step folds in `state.step` for
  dropout. Metrics are replicated float32 scalars over the global batch: `loss`, `dice` (hard
  Dice of the task's foreground class, i.e. tumour Dice for 'tumour' and 'three_class', liver
  Dice for 'liver', over the batch's real examples; 1 when both are empty), `grad_norm`
  (before clipping), `lr` (the learning rate applied, when the optimiser injects it) and
  `finite` (1.0, or 0.0 when loss or gradients were non-finite: then params, batch_stats and
  opt_state are returned unchanged, so the schedule does not advance either, while `step`
  advances and `skipped` increases).

  Padded examples (mask 0) are zeroed and weigh nothing in loss and metrics; with batch norm
  they do still enter the batch statistics, so feed full batches when training with it.
  """
  loss_fn = losses.make_loss_fn(loss_cfg, task)
  foreground = losses.foreground_class(task)

  def step_fn(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
    image, targets, mask = _prepare(batch, task)
    dropout_rng = jax.random.fold_in(rng, state.step)
    has_batch_stats = bool(state.batch_stats)

    def objective(params):
      out = model.apply(
          _variables(state, params), image, train=True,
          rngs={'dropout': dropout_rng}, mutable=['batch_stats'] if has_batch_stats else False)
      logits, updates = out if has_batch_stats else (out, {})
      loss = loss_fn(logits, targets, mask)
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    (loss, (logits, new_batch_stats)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        batch_stats=keep(new_batch_stats, state.batch_stats),
        opt_state=keep(new_opt_state, state.opt_state),
        skipped=state.skipped + jnp.where(finite, 0, 1).astype(state.skipped.dtype),
    )

    intersection, pred_sum, target_sum = _overlap_sums(logits, targets, mask, foreground)
    metrics = {
        'loss': loss.astype(jnp.float32),
        'dice': dice_from_sums(intersection.sum(), pred_sum.sum(), target_sum.sum()),
        'grad_norm': grad_norm.astype(jnp.float32),
        'finite': finite.astype(jnp.float32),
    }
    lr = optim.applied_learning_rate(new_opt_state)
    if lr is not None:
      metrics['lr'] = jnp.asarray(lr, jnp.float32)
    return new_state, metrics

  replicated = sharding.replicated(mesh)
  return jax.jit(
      step_fn,
      in_shardings=(replicated, sharding.batch_sharding(mesh), replicated),
      out_shardings=(replicated, replicated),
      donate_argnums=(0,),
  )


def make_eval_step(model: nn.Module, task: str, mesh: Mesh,
                   loss_cfg: Any | None = None) -> Callable[[TrainState, Batch], Metrics]:
  """Compiles `(state, batch) -> sums` to accumulate over a whole validation set.

  Returned replicated float32 sums over the batch's real examples: `loss_sum` (sum of
  per-example losses of `loss_cfg`; default the paper's soft Dice with smooth 1),
  `intersection`, `pred_sum`, `target_sum` (foreground pixel counts of the hard prediction, so a
  global Dice is `dice_from_sums(I, P, T)` over any batching), `dice_sum` (sum of per-example
  Dice, each 1 when both empty) and `count` (number of real examples). Uses running batch
  statistics, no dropout.
  """
  if loss_cfg is None:
    loss_cfg = ml_collections.ConfigDict(
        {'name': 'dice', 'dice_smooth': 1.0, 'class_weights': None})
  loss_fn = losses.make_loss_fn(loss_cfg, task)
  foreground = losses.foreground_class(task)

  def eval_fn(state: TrainState, batch: Batch) -> Metrics:
    image, targets, mask = _prepare(batch, task)
    logits = model.apply(_variables(state, state.params), image, train=False)
    intersection, pred_sum, target_sum = _overlap_sums(logits, targets, mask, foreground)
    sums = {
        'intersection': intersection.sum(),
        'pred_sum': pred_sum.sum(),
        'target_sum': target_sum.sum(),
        'dice_sum': jnp.sum(mask * dice_from_sums(intersection, pred_sum, target_sum)),
        'count': mask.sum(),
        'loss_sum': jnp.sum(mask * loss_fn(logits, targets, mask, per_example=True)),
    }
    return sums

  replicated = sharding.replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(replicated, sharding.batch_sharding(mesh)),
                 out_shardings=replicated)


def flip_axes(spatial_dims: int, flip_depth: bool = False) -> tuple[tuple[int, ...], ...]:
  """The mirrorings of flip TTA as tuples of image axes, the identity first.

  Images are [B, *spatial, C]: the in-plane axes are the last two spatial axes (rows, columns),
  so 2-D gives 4 mirrorings; 3-D gives the same 4 in-plane ones, or 8 with `flip_depth`.
  """
  rows, cols = spatial_dims - 1, spatial_dims
  axes = [(), (rows,), (cols,), (rows, cols)]
  if flip_depth and spatial_dims == 3:
    axes += [(1,) + a for a in axes]
  return tuple(axes)


def make_predict_step(model: nn.Module, mesh: Mesh, flip_tta: bool = False,
                      flip_depth: bool = False, gather: bool = False
                      ) -> Callable[[Any, jax.Array], jax.Array]:
  """Compiles `(state, images) -> softmax probabilities` float32 [B, *spatial, K], split on
  'data' (with `gather`, replicated: every device, so every process, holds all of them).

  `state` is a TrainState or a variables dict ({'params': ..., 'batch_stats': ...}). With
  `flip_tta` the probabilities are averaged over the four in-plane mirrorings (none, rows,
  columns, both), each mapped back before averaging; for 3-D images `flip_depth` adds the depth
  mirror of each (eight in all). B must be divisible by the number of mesh devices (pad and drop
  the extra rows).
  """

  def predict_fn(state: Any, images: jax.Array) -> jax.Array:
    variables = state if isinstance(state, Mapping) else _variables(state, state.params)

    def probs(x):
      logits = model.apply(variables, x, train=False)
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    if not flip_tta:
      return probs(images)
    mirrorings = flip_axes(images.ndim - 2, flip_depth)
    total = probs(images)
    for axes in mirrorings[1:]:
      total = total + jnp.flip(probs(jnp.flip(images, axes)), axes)
    return total / float(len(mirrorings))

  data = sharding.batch_sharding(mesh)
  out = sharding.replicated(mesh) if gather else data
  return jax.jit(predict_fn, in_shardings=(sharding.replicated(mesh), data), out_shardings=out)
