"""Tests of the Flax U-Net: shapes, size checks, config validation, dtypes, its exact layers."""

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from curriculum_seg import rundir
from curriculum_seg.models import build_model, init_variables, level_widths, num_classes
from curriculum_seg.models import unet as unet_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def model_config(**overrides):
  """A tiny U-Net config (depth 2, width 4) built like the experiment configs."""
  base = common.model(depth=2, base_width=4, group_norm_groups=2).to_dict()
  return ml_collections.ConfigDict({**base, **overrides})


_INITIALISED = {}


def init(model, channels):
  """Variables of `model` (compiled once per model in this module: compiling dominates)."""
  if model not in _INITIALISED:
    _INITIALISED[model] = init_variables(model, jax.random.key(0), (1, 16, 16, channels))
  return _INITIALISED[model]


def default_model_and_variables():
  """The default tiny model (3 input channels); dropout and dtype do not change its variables."""
  model = build_model(model_config(), num_input_channels=3)
  return model, init(model, 3)


def init_shapes(model, shape):
  """Shapes and dtypes of the variables, without running anything."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def apply(model, variables, x, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def test_same_parameters_run_on_two_input_sizes():
  model, variables = default_model_and_variables()
  rng = np.random.default_rng(0)
  patch = rng.random((2, 32, 32, 3), np.float32)
  whole = rng.random((1, 64, 48, 3), np.float32)
  out_patch, out_whole = jax.jit(
      lambda v, a, b: (model.apply(v, a), model.apply(v, b)))(variables, patch, whole)
  assert out_patch.shape == (2, 32, 32, 2)
  assert out_whole.shape == (1, 64, 48, 2)
  assert out_patch.dtype == jnp.float32 and out_whole.dtype == jnp.float32
  assert np.all(np.isfinite(out_whole))


@pytest.mark.parametrize('height,width', [(30, 32), (32, 36), (33, 33)])
def test_size_not_divisible_by_two_to_the_depth_is_a_clear_error(height, width):
  model = build_model(model_config(depth=3), num_input_channels=1)
  variables = init_shapes(model, (1, 32, 32, 1))
  with pytest.raises(ValueError, match=rf'{height}x{width}.*2\*\*depth = 8.*depth=3'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, height, width, 1)))


def test_wrong_number_of_input_channels_is_an_error():
  model = build_model(model_config(), num_input_channels=3)
  with pytest.raises(ValueError, match='3 input channels got 5'):
    init_shapes(model, (1, 32, 32, 5))


@pytest.mark.parametrize('task,classes', [('tumour', 2), ('liver', 2), ('three_class', 3)])
def test_output_classes_follow_the_task(task, classes):
  assert num_classes(task) == classes
  model = build_model(model_config(task=task), num_input_channels=1)
  variables = init_shapes(model, (1, 16, 16, 1))
  out = jax.eval_shape(model.apply, variables, jnp.ones((1, 16, 16, 1)))
  assert out.shape == (1, 16, 16, classes) and out.dtype == jnp.float32


def test_level_widths_follow_base_width_and_multiplier():
  assert level_widths(4, 32, 2.0) == (32, 64, 128, 256, 512)
  assert level_widths(3, 8, 1.5) == (8, 12, 18, 27)
  model = build_model(model_config(depth=3, base_width=8, width_multiplier=1.5), 1)
  params = init_shapes(model, (1, 16, 16, 1))['params']
  assert params['down_0']['conv1']['kernel'].shape == (3, 3, 1, 8)
  assert params['down_2']['conv2']['kernel'].shape == (3, 3, 18, 18)
  assert params['bottleneck']['conv1']['kernel'].shape == (3, 3, 18, 27)
  assert params['upsample_2']['kernel'].shape == (2, 2, 27, 18)
  assert params['up_0']['conv1']['kernel'].shape == (3, 3, 16, 8)
  assert params['head']['kernel'].shape == (1, 1, 8, 2)


@pytest.mark.parametrize('key,value,pattern', [
    ('name', 'resnet', 'model.name'),
    ('norm', 'layer', r"model.norm='layer' is not one of \['batch', 'group', 'instance', 'none'\]"),
    ('block', 'dense', 'model.block'),
    ('task', 'kidney', 'model.task'),
    ('compute_dtype', 'float16', 'model.compute_dtype'),
    ('depth', 0, 'model.depth'),
    ('dropout', 1.0, 'model.dropout'),
])
def test_bad_model_config_names_the_key(key, value, pattern):
  with pytest.raises(ValueError, match=pattern):
    build_model(model_config(**{key: value}), num_input_channels=1)


def test_group_norm_groups_must_divide_every_width():
  with pytest.raises(ValueError, match='group_norm_groups=3'):
    build_model(model_config(norm='group', group_norm_groups=3), num_input_channels=1)


@pytest.mark.parametrize('norm', ['batch', 'group', 'instance', 'none'])
@pytest.mark.parametrize('block', ['plain', 'residual'])
def test_every_norm_and_block_has_its_variables(norm, block):
  model = build_model(model_config(norm=norm, block=block), num_input_channels=2)
  variables = init_shapes(model, (2, 16, 16, 2))
  assert ('batch_stats' in variables) == (norm == 'batch')
  down = variables['params']['down_0']
  assert ('bias' in down['conv1']) == (norm == 'none')
  assert ('norm1' in down) == (norm != 'none')
  assert ('shortcut_conv' in down) == (block == 'residual')


@pytest.mark.parametrize('norm,block', [('batch', 'plain'), ('group', 'residual')])
def test_other_norms_and_blocks_train(norm, block):
  # instance + residual (the default) runs in every other test; 'none' only drops the norm
  model = build_model(model_config(norm=norm, block=block), num_input_channels=2)
  variables = init(model, 2)
  x = np.random.default_rng(0).random((2, 16, 16, 2), np.float32)
  out, updates = apply(model, variables, x, train=True, mutable=['batch_stats'])
  assert out.shape == (2, 16, 16, 2) and np.all(np.isfinite(out))
  assert ('batch_stats' in updates) == (norm == 'batch')
  if norm == 'batch':  # running statistics move towards the batch statistics
    before = variables['batch_stats']['down_0']['norm1']['mean']
    after = updates['batch_stats']['down_0']['norm1']['mean']
    assert not np.allclose(before, after)


def test_params_are_float32_and_bfloat16_mode_computes_in_bfloat16():
  x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3), np.float32))
  f32, variables = default_model_and_variables()
  bf16 = build_model(model_config(compute_dtype='bfloat16'), 3)
  assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out_bf16, out_f32 = jax.jit(lambda v: (bf16.apply(v, x), f32.apply(v, x)))(variables)
  assert out_bf16.dtype == jnp.float32
  difference = float(jnp.max(jnp.abs(out_bf16 - out_f32)))
  assert 0 < difference < 0.25  # rounded to bfloat16 inside, yet the same function


def test_dropout_is_active_only_in_training():
  _, variables = default_model_and_variables()
  model = build_model(model_config(dropout=0.5), 3)
  x = jnp.ones((1, 16, 16, 3))

  def run(key_a, key_b):
    apply_with = lambda key, train: model.apply(  # noqa: E731
        variables, x, train=train, rngs={'dropout': key})
    return (apply_with(key_a, False), apply_with(key_b, False), apply_with(key_a, True),
            apply_with(key_b, True))

  eval_a, eval_b, train_a, train_b = jax.jit(run)(jax.random.key(1), jax.random.key(2))
  np.testing.assert_array_equal(eval_a, eval_b)
  assert not np.allclose(train_a, train_b)


def test_fast_layers_equal_the_standard_flax_layers():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((2, 4, 6, 3), np.float32))
  np.testing.assert_array_equal(unet_lib.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
  pointwise = unet_lib.PointwiseConv(5)
  variables = {'params': {'kernel': jnp.asarray(rng.normal(size=(1, 1, 3, 5)), jnp.float32),
                          'bias': jnp.arange(5.0)}}
  np.testing.assert_allclose(pointwise.apply(variables, x),
                             nn.Conv(5, (1, 1)).apply(variables, x), rtol=1e-5, atol=1e-6)
  upsample = unet_lib.Upsample2x(5)
  variables = {'params': {'kernel': jnp.asarray(rng.normal(size=(2, 2, 3, 5)), jnp.float32),
                          'bias': jnp.arange(5.0)}}
  # Upsample2x is a transposed convolution without flipping: flax's uses the flipped kernel.
  flipped = {'params': {'kernel': variables['params']['kernel'][::-1, ::-1],
                        'bias': variables['params']['bias']}}
  expected = nn.ConvTranspose(5, (2, 2), strides=(2, 2)).apply(flipped, x)
  np.testing.assert_allclose(upsample.apply(variables, x), expected, rtol=1e-5, atol=1e-6)
  variables = {'params': {'scale': jnp.asarray(rng.normal(size=3), jnp.float32),
                          'bias': jnp.asarray(rng.normal(size=3), jnp.float32)}}
  x = jnp.asarray(rng.normal(2.0, 3.0, size=(2, 4, 6, 3)), jnp.float32)
  np.testing.assert_allclose(unet_lib.InstanceNorm().apply(variables, x),
                             nn.InstanceNorm(epsilon=unet_lib.NORM_EPSILON).apply(variables, x),
                             rtol=1e-4, atol=1e-5)


def _load_benchmark():
  spec = importlib.util.spec_from_file_location('benchmark_train_step',
                                                REPO / 'benchmarks' / 'train_step.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_pytorch_twin_in_the_benchmark_computes_the_same_function():
  torch = pytest.importorskip('torch')
  bench = _load_benchmark()
  model, variables = default_model_and_variables()  # the paper's residual + instance norm
  x = np.random.default_rng(0).random((2, 32, 32, 3), np.float32)
  net = bench.torch_unet(model_config().to_dict(), 3)
  bench.load_flax_params_into_torch(net, variables)
  net.eval()
  with torch.no_grad():
    got = net(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, apply(model, variables, x), rtol=1e-4, atol=1e-4)


# Cheaper variants and the foreground prior.

def _block(cin, cout, convs=2, projection=True):
  """Expected parameter shapes of one ConvBlock (instance norm, residual)."""
  shapes = {}
  for i in range(1, convs + 1):
    shapes[f'conv{i}/kernel'] = (3, 3, cin if i == 1 else cout, cout)
    shapes[f'norm{i}/bias'] = shapes[f'norm{i}/scale'] = (cout,)
  if projection:
    shapes['shortcut_conv/kernel'] = (1, 1, cin, cout)
    shapes['shortcut_norm/bias'] = shapes['shortcut_norm/scale'] = (cout,)
  return shapes


def _prefixed(prefix, shapes):
  return {f'{prefix}/{k}': v for k, v in shapes.items()}


# The tiny default model's parameters before the variants existed (printed from that code):
# checkpoints of the default network must keep loading.
ORIGINAL_TINY_PARAMS = {
    'bottleneck/conv1/kernel': (3, 3, 8, 16), 'bottleneck/conv2/kernel': (3, 3, 16, 16),
    'bottleneck/norm1/bias': (16,), 'bottleneck/norm1/scale': (16,),
    'bottleneck/norm2/bias': (16,), 'bottleneck/norm2/scale': (16,),
    'bottleneck/shortcut_conv/kernel': (1, 1, 8, 16),
    'bottleneck/shortcut_norm/bias': (16,), 'bottleneck/shortcut_norm/scale': (16,),
    'down_0/conv1/kernel': (3, 3, 3, 4), 'down_0/conv2/kernel': (3, 3, 4, 4),
    'down_0/norm1/bias': (4,), 'down_0/norm1/scale': (4,),
    'down_0/norm2/bias': (4,), 'down_0/norm2/scale': (4,),
    'down_0/shortcut_conv/kernel': (1, 1, 3, 4),
    'down_0/shortcut_norm/bias': (4,), 'down_0/shortcut_norm/scale': (4,),
    'down_1/conv1/kernel': (3, 3, 4, 8), 'down_1/conv2/kernel': (3, 3, 8, 8),
    'down_1/norm1/bias': (8,), 'down_1/norm1/scale': (8,),
    'down_1/norm2/bias': (8,), 'down_1/norm2/scale': (8,),
    'down_1/shortcut_conv/kernel': (1, 1, 4, 8),
    'down_1/shortcut_norm/bias': (8,), 'down_1/shortcut_norm/scale': (8,),
    'head/bias': (2,), 'head/kernel': (1, 1, 4, 2),
    'up_0/conv1/kernel': (3, 3, 8, 4), 'up_0/conv2/kernel': (3, 3, 4, 4),
    'up_0/norm1/bias': (4,), 'up_0/norm1/scale': (4,),
    'up_0/norm2/bias': (4,), 'up_0/norm2/scale': (4,),
    'up_0/shortcut_conv/kernel': (1, 1, 8, 4),
    'up_0/shortcut_norm/bias': (4,), 'up_0/shortcut_norm/scale': (4,),
    'up_1/conv1/kernel': (3, 3, 16, 8), 'up_1/conv2/kernel': (3, 3, 8, 8),
    'up_1/norm1/bias': (8,), 'up_1/norm1/scale': (8,),
    'up_1/norm2/bias': (8,), 'up_1/norm2/scale': (8,),
    'up_1/shortcut_conv/kernel': (1, 1, 16, 8),
    'up_1/shortcut_norm/bias': (8,), 'up_1/shortcut_norm/scale': (8,),
    'upsample_0/bias': (4,), 'upsample_0/kernel': (2, 2, 8, 4),
    'upsample_1/bias': (8,), 'upsample_1/kernel': (2, 2, 16, 8),
}


def param_shapes(model, size=16, channels=3):
  params = init_shapes(model, (1, size, size, channels))['params']
  return {'/'.join(p.key for p in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_default_config_builds_exactly_the_original_parameter_tree():
  assert param_shapes(build_model(model_config(), 3)) == ORIGINAL_TINY_PARAMS
  assert sum(np.prod(s) for s in ORIGINAL_TINY_PARAMS.values()) == 7966
  # A config saved before the variant fields existed, read back by rundir.read_config (which
  # adds them at their old values), builds the same network.
  old = model_config().to_dict()
  for key in unet_lib.VARIANT_FIELDS:
    del old[key]
  read = rundir.with_added_fields(dict(model=old))["model"]
  assert build_model(ml_collections.ConfigDict(read), 3) == build_model(model_config(), 3)
  # common.model's new fields default to the original network.
  original = {k.split('.')[1]: v for k, v in rundir.ADDED_FIELDS.items() if k.startswith('model.')}
  assert {k: common.model()[k] for k in unet_lib.VARIANT_FIELDS} == original


def _variant_params(convs=2, add=False, transposed_head=False):
  """Expected parameter shapes of the tiny model (widths 4, 8, 16) for a variant."""
  shapes = {}
  shapes.update(_prefixed('down_0', _block(3, 4, convs)))
  shapes.update(_prefixed('down_1', _block(4, 8, convs)))
  shapes.update(_prefixed('bottleneck', _block(8, 16, convs)))
  shapes.update(_prefixed('up_1', _block(8 if add else 16, 8, convs, projection=not add)))
  shapes.update(_prefixed('up_0', _block(4 if add else 8, 4, convs, projection=not add)))
  shapes.update({'upsample_1/kernel': (2, 2, 16, 8), 'upsample_1/bias': (8,),
                 'upsample_0/kernel': (2, 2, 8, 4), 'upsample_0/bias': (4,),
                 'head/kernel': (2, 2, 4, 2) if transposed_head else (1, 1, 4, 2),
                 'head/bias': (2,)})
  return shapes


# name -> (config overrides, expected parameter shapes, parameter count by hand)
VARIANTS = {
    # the same parameters as the original: conv1 of levels 1, 2 reads at stride 2 instead
    'strided': (dict(downsample='strided'), _variant_params(), 7966),
    # drops conv2 + norm2 of every block: 7966 - (144+8 + 576+16 + 2304+32 + 576+16 + 144+8)
    'one_conv': (dict(convs_per_level=1), _variant_params(convs=1), 4142),
    # adds conv3 + norm3 to every block
    'three_convs': (dict(convs_per_level=3), _variant_params(convs=3), 11790),
    # decoder conv1 reads C instead of 2C channels and needs no shortcut projection:
    # 7966 - (576 + 128 + 16) - (144 + 32 + 8)
    'add_skips': (dict(skip='add'), _variant_params(add=True), 7062),
    # the head is a 2x2 transposed conv 4 -> 2: 7966 - 8 + 32
    'half_res': (dict(input_stride=2), _variant_params(transposed_head=True), 7990),
    'cheapest': (dict(downsample='strided', convs_per_level=1, skip='add', input_stride=2),
                 _variant_params(convs=1, add=True, transposed_head=True), 3262),
}


@pytest.mark.parametrize('name', list(VARIANTS))
def test_variant_parameters_match_hand_counts(name):
  overrides, shapes, count = VARIANTS[name]
  got = param_shapes(build_model(model_config(**overrides), 3), size=32)
  assert got == shapes
  assert sum(int(np.prod(s)) for s in got.values()) == count


@pytest.mark.parametrize('name', list(VARIANTS))
@pytest.mark.parametrize('norm', ['batch', 'group', 'none'])
@pytest.mark.parametrize('task,classes', [('tumour', 2), ('three_class', 3)])
def test_variants_run_with_every_norm_task_dropout_and_dtype(name, norm, task, classes):
  # Traced only (shapes and dtypes); instance norm and float32 run in the tests below.
  model = build_model(model_config(norm=norm, task=task, dropout=0.1,
                                   compute_dtype='bfloat16', **VARIANTS[name][0]), 2)
  variables = init_shapes(model, (2, 32, 32, 2))
  assert ('batch_stats' in variables) == (norm == 'batch')
  for height, width in ((32, 32), (32, 64)):
    out, _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)},
                                 mutable=['batch_stats']),
        variables, jnp.zeros((2, height, width, 2)))
    assert out.shape == (2, height, width, classes) and out.dtype == jnp.float32


def test_half_resolution_input_needs_a_multiple_of_twice_two_to_the_depth():
  model = build_model(model_config(input_stride=2), 1)  # depth 2: multiples of 8
  variables = init_shapes(model, (1, 16, 16, 1))
  assert jax.eval_shape(model.apply, variables, jnp.zeros((1, 8, 24, 1))).shape == (1, 8, 24, 2)
  with pytest.raises(ValueError, match=r'12x16 is not divisible by input_stride \* 2\*\*depth = '
                                       r'8 \(input_stride=2, depth=2\)'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 12, 16, 1)))


@pytest.mark.parametrize('key,value,pattern', [
    ('downsample', 'avgpool',
     r"model.downsample='avgpool' is not one of \['maxpool', 'strided'\]"),
    ('skip', 'sum', r"model.skip='sum' is not one of \['concat', 'add'\]"),
    ('input_stride', 4, r'model.input_stride=4 is not one of \[1, 2\]'),
    ('convs_per_level', 0, r'model.convs_per_level=0 must be an integer >= 1'),
    ('convs_per_level', 1.5, r'model.convs_per_level=1.5 must be an integer >= 1'),
    ('foreground_prior', 1.0, r'model.foreground_prior=1.0 must be None or in \(0, 1\)'),
    ('foreground_prior', 0, r'model.foreground_prior=0 must be None or in \(0, 1\)'),
])
def test_bad_variant_config_names_the_key(key, value, pattern):
  cfg = model_config()
  with cfg.ignore_type():
    cfg[key] = value
  with pytest.raises(ValueError, match=pattern):
    build_model(cfg, num_input_channels=1)


def test_strided_downsampling_is_a_stride_two_conv_of_the_previous_level():
  model = build_model(model_config(downsample='strided', norm='none', block='plain'), 3)
  variables = init(model, 3)
  x = jnp.asarray(np.random.default_rng(0).random((1, 16, 16, 3)), jnp.float32)
  _, state = jax.jit(lambda v: model.apply(v, x, capture_intermediates=True,
                                           mutable=['intermediates']))(variables)
  inter = state['intermediates']
  down_0 = inter['down_0']['__call__'][0]
  conv = variables['params']['down_1']['conv1']
  expected = jax.lax.conv_general_dilated(
      down_0, conv['kernel'], (2, 2), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + conv['bias']
  got = inter['down_1']['conv1']['__call__'][0]
  assert got.shape == (1, 8, 8, 8)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_the_prior_channel_is_every_tasks_loss_foreground():
  from curriculum_seg import losses  # pylint: disable=import-outside-toplevel
  for task in ('tumour', 'liver', 'three_class'):
    assert num_classes(task) - 1 == losses.foreground_class(task)


@pytest.mark.parametrize('prior,overrides', [
    (None, dict(task='tumour')), (0.01, dict(task='tumour')), (0.01, dict(task='three_class')),
    (0.01, dict(task='tumour', input_stride=2))])
def test_foreground_prior_sets_the_initial_foreground_probability(prior, overrides):
  x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
  model = build_model(model_config(foreground_prior=prior, **overrides), 3)
  variables = init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  foreground = jax.nn.softmax(apply(model, variables, x), axis=-1)[..., -1]
  if prior is None:  # the original head: near 1 / classes, far from a small prior
    assert float(jnp.mean(foreground)) > 0.1
  else:
    assert float(jnp.mean(foreground)) == pytest.approx(prior, rel=0.05)
    assert 0.8 * prior < float(jnp.min(foreground)) <= float(jnp.max(foreground)) < 1.2 * prior


def _fit_one_batch(model, steps=8):
  """Loss (Dice + CE) before and after `steps` Adam steps on one batch."""
  import optax  # pylint: disable=import-outside-toplevel
  from curriculum_seg import losses  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:16, :16]
  targets = np.stack([((yy - c) ** 2 + (xx - c) ** 2 < 9).astype(np.int32) for c in (5, 10)])
  x = rng.normal(0.0, 0.1, (2, 16, 16, 3)).astype(np.float32) + targets[..., None]
  loss_fn = losses.make_loss_fn(ml_collections.ConfigDict(
      dict(name='dice_ce', dice_smooth=1.0, class_weights=None)), 'tumour')
  variables = init_variables(model, jax.random.key(0), (1, 16, 16, 3))
  tx = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def loss(p):
      return loss_fn(model.apply({'params': p}, x, train=True), targets, np.ones(2))

    def step(carry, _):
      p, opt = carry
      value, grads = jax.value_and_grad(loss)(p)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), value

    (p, _), values = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return values, loss(p)

  values, final = train(variables['params'])
  return float(values[0]), float(final)


@pytest.mark.parametrize('overrides', [
    dict(downsample='strided'), dict(convs_per_level=1, skip='add'),
    VARIANTS['cheapest'][0]], ids=['strided', 'one_conv_add', 'cheapest'])
def test_variants_train(overrides):
  model = build_model(model_config(foreground_prior=0.05, **overrides), 3)
  first, last = _fit_one_batch(model)
  assert np.isfinite(last) and last < 0.8 * first


def test_benchmark_variants_are_the_default_model_with_overrides():
  bench = _load_benchmark()
  default, _ = bench.model_config('default')
  for name, (base, overrides) in bench.MODEL_VARIANTS.items():
    cfg, source = bench.model_config(name)
    assert base == 'default' and cfg == dict(default, **overrides) and str(overrides) in source
    build_model(ml_collections.ConfigDict(cfg), 3)  # every variant is a valid config
  assert {name for name, *_ in bench.FULL_CASES} >= set(bench.MODEL_VARIANTS)


def test_variant_fields_take_command_line_overrides():
  from curriculum_seg import config_loading  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'model': model_config()})
  config = config_loading.apply_overrides(config, [
      ('model.downsample', 'strided'), ('model.convs_per_level', '1'), ('model.skip', 'add'),
      ('model.input_stride', '2'), ('model.foreground_prior', '0.01')])
  model = build_model(config.model, 3)
  assert (model.downsample, model.convs_per_level, model.skip, model.input_stride,
          model.foreground_prior) == ('strided', 1, 'add', 2, 0.01)


# 3-D networks (model.spatial_dims=3): one definition, every layer generic over spatial axes.

def model_config_3d(**overrides):
  """The tiny model of model_config() in 3-D (widths 4, 8, 16)."""
  return model_config(spatial_dims=3, **overrides)


def _vjp(fn, *args, seed=0):
  """fn(*args) and the gradients of <fn(*args), g> for a random cotangent g."""
  out, pullback = jax.vjp(fn, *args)
  g = jnp.asarray(np.random.default_rng(seed).normal(size=out.shape), jnp.float32)
  return out, pullback(g)


def _assert_same_function(fn, reference, *args, rtol=1e-5, atol=1e-5):
  got, got_grads = jax.jit(lambda *a: _vjp(fn, *a))(*args)
  want, want_grads = jax.jit(lambda *a: _vjp(reference, *a))(*args)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), got_grads,
               want_grads)


@pytest.mark.parametrize('formulation', ['input_shift', 'output_shift', 'stacked_taps'])
@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('shape', [(2, 5, 6, 4, 3), (1, 4, 8, 8, 1)])
def test_3d_conv_formulations_compute_the_plain_convolution(formulation, stride, shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], 4)), jnp.float32)
  conv = unet_lib.CONV3D_FORMULATIONS[formulation]
  plain = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (stride,) * 3, 'SAME', dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
  # forward and both gradients (input and kernel), odd depths and stride-2 padding included
  _assert_same_function(lambda x, k: conv(x, k, stride), plain, x, kernel, atol=1e-4)


def test_3d_conv_formulation_is_chosen_per_backend_and_input_width():
  assert unet_lib.conv3d_formulation('cpu') == 'output_shift'
  assert unet_lib.conv3d_formulation('cpu', in_channels=8) == 'output_shift'
  assert unet_lib.conv3d_formulation('cpu', in_channels=1) == 'stacked_taps'
  for backend in ('gpu', 'tpu'):
    assert unet_lib.conv3d_formulation(backend) == 'plain'
    assert unet_lib.conv3d_formulation(backend, in_channels=1) == 'plain'
  assert set(unet_lib.CONV3D_FORMULATIONS) == {'plain', 'input_shift', 'output_shift',
                                               'stacked_taps'}


def test_3d_layers_equal_the_standard_layers():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4, 6, 2, 3)), jnp.float32)
  _assert_same_function(unet_lib.max_pool_2x2, lambda x: nn.max_pool(x, (2, 2, 2), (2, 2, 2)), x)
  _assert_same_function(unet_lib.avg_pool_2x2, lambda x: nn.avg_pool(x, (2, 2, 2), (2, 2, 2)), x)
  conv = {'params': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 3, 3, 5)), jnp.float32),
                     'bias': jnp.arange(5.0)}}
  for stride in (1, 2):
    _assert_same_function(
        lambda v, x: unet_lib.Conv(5, strides=stride).apply(v, x),
        lambda v, x: nn.Conv(5, (3, 3, 3), strides=stride).apply(v, x), conv, x, atol=1e-4)
  pointwise = {'params': {'kernel': jnp.asarray(rng.normal(size=(1, 1, 1, 3, 5)), jnp.float32),
                          'bias': jnp.arange(5.0)}}
  _assert_same_function(lambda v, x: unet_lib.PointwiseConv(5).apply(v, x),
                        lambda v, x: nn.Conv(5, (1, 1, 1)).apply(v, x), pointwise, x)
  norm = {'params': {'scale': jnp.asarray(rng.normal(size=3), jnp.float32),
                     'bias': jnp.asarray(rng.normal(size=3), jnp.float32)}}
  _assert_same_function(
      lambda v, x: unet_lib.InstanceNorm().apply(v, x),
      lambda v, x: nn.InstanceNorm(epsilon=unet_lib.NORM_EPSILON).apply(v, x), norm, 2 + 3 * x,
      rtol=1e-4, atol=1e-4)


def test_3d_upsample_is_the_transposed_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 2, 3)), jnp.float32)
  variables = {'params': {'kernel': jnp.asarray(rng.normal(size=(2, 2, 2, 3, 5)), jnp.float32),
                          'bias': jnp.arange(5.0)}}

  def reference(v, x):  # lax.conv_transpose flips the kernel: give it the flipped kernel
    kernel = v['params']['kernel'][::-1, ::-1, ::-1]
    y = jax.lax.conv_transpose(x, kernel, (2, 2, 2), 'VALID',
                               dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
    return y + v['params']['bias']

  _assert_same_function(lambda v, x: unet_lib.Upsample2x(5).apply(v, x), reference, variables, x)
  y = unet_lib.Upsample2x(5).apply(variables, x)
  # the PyTorch definition, one voxel: out[2d + i, 2h + j, 2w + l] = x[d, h, w] @ k[i, j, l] + b
  kernel = variables['params']['kernel']
  np.testing.assert_allclose(y[1, 2 * 2 + 1, 2 * 3 + 0, 2 * 1 + 1],
                             x[1, 2, 3, 1] @ kernel[1, 0, 1] + jnp.arange(5.0), rtol=1e-5)
  assert y.shape == (2, 6, 8, 4, 5)


def _with_window_axis(shapes):
  """A 2-D parameter tree's shapes with one more window axis on every kernel."""
  return {k: (v[0],) + v if len(v) == 4 else v for k, v in shapes.items()}


def test_3d_network_has_the_2d_parameters_with_a_depth_window_axis():
  model = build_model(model_config_3d(), 3)
  params = init_shapes(model, (1, 8, 16, 16, 3))['params']
  got = {'/'.join(p.key for p in path): tuple(leaf.shape)
         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  assert got == _with_window_axis(ORIGINAL_TINY_PARAMS)
  assert got['down_0/conv1/kernel'] == (3, 3, 3, 3, 4)
  assert got['upsample_1/kernel'] == (2, 2, 2, 16, 8)
  assert got['head/kernel'] == (1, 1, 1, 4, 2)
  # The 2-D network is untouched by the new field.
  assert build_model(model_config(spatial_dims=2), 3) == build_model(model_config(), 3)


def test_the_authors_3d_network_output_shape_and_widths():
  # Residual blocks, instance norm, widths 8-16-32-64-128, 2x2x2 transposed up-convolutions.
  model = build_model(common.model(depth=4, base_width=8, spatial_dims=3), 1)
  assert model.widths == (8, 16, 32, 64, 128) and model.spatial_dims == 3
  variables = init_shapes(model, (1, 16, 16, 16, 1))
  params = variables['params']
  assert params['bottleneck']['conv2']['kernel'].shape == (3, 3, 3, 128, 128)
  assert params['upsample_3']['kernel'].shape == (2, 2, 2, 128, 64)
  assert set(params['down_0']) == {'conv1', 'norm1', 'conv2', 'norm2', 'shortcut_conv',
                                   'shortcut_norm'}
  out = jax.eval_shape(model.apply, variables, jnp.zeros((2, 16, 32, 48, 1)))
  assert out.shape == (2, 16, 32, 48, 2) and out.dtype == jnp.float32


def test_3d_network_is_the_same_function_in_every_conv_formulation(monkeypatch):
  # The strided variant exercises stride-2 convs; batch norm the train-mode statistics.
  model = build_model(model_config_3d(depth=1, downsample='strided', norm='batch'), 2)
  x = jnp.asarray(np.random.default_rng(0).random((2, 8, 8, 12, 2)), jnp.float32)
  variables = init_variables(model, jax.random.key(0), (1, 8, 8, 8, 2))

  def loss(params, x):
    out, _ = model.apply({**variables, 'params': params}, x, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(out * jnp.linspace(-1.0, 1.0, out.size).reshape(out.shape)), out

  per_layer_choice = unet_lib.conv3d_formulation

  def run(name):  # None: this backend's per-layer choice (stacked taps for the 2-channel input)
    chosen = per_layer_choice if name is None else lambda backend=None, in_channels=None: name
    monkeypatch.setattr(unet_lib, 'conv3d_formulation', chosen)
    return jax.jit(jax.grad(loss, has_aux=True))(variables['params'], x)

  want_grads, want = run('plain')
  for formulation in ('input_shift', 'output_shift', 'stacked_taps', None):
    grads, out = run(formulation)
    assert out.shape == (2, 8, 8, 12, 2)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4, err_msg=str(formulation))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                 grads, want_grads)


def test_3d_input_sizes_and_rank_are_checked():
  model = build_model(model_config_3d(), 1)  # depth 2: multiples of 4
  variables = init_shapes(model, (1, 8, 8, 8, 1))
  out = jax.eval_shape(model.apply, variables, jnp.zeros((1, 4, 8, 12, 1)))
  assert out.shape == (1, 4, 8, 12, 2)
  with pytest.raises(ValueError, match=r'UNet input size 8x6x8 is not divisible by 2\*\*depth = '
                                       r'4 \(depth=2\)'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 8, 6, 8, 1)))
  with pytest.raises(ValueError, match=r'spatial_dims=3\) expects input \[batch, depth, height, '
                                       r'width, channels\], got shape \(1, 8, 8, 1\)'):
    model.check_input_shape((1, 8, 8, 1))
  with pytest.raises(ValueError, match='spatial_dims=2'):
    build_model(model_config(), 1).check_input_shape((1, 8, 8, 8, 1))
  strided = build_model(model_config_3d(input_stride=2), 1)
  with pytest.raises(ValueError, match=r'8x8x12 is not divisible by input_stride \* 2\*\*depth = '
                                       r'8 \(input_stride=2, depth=2\)'):
    strided.check_input_shape((1, 8, 8, 12, 1))


@pytest.mark.parametrize('value', [4, 1, '3', 3.0, True, None])
def test_bad_spatial_dims_names_the_key(value):
  cfg = model_config()
  with cfg.ignore_type():
    cfg['spatial_dims'] = value
  with pytest.raises(ValueError, match=rf'^model.spatial_dims={value!r} is not one of \[2, 3\]$'
                     .replace('(', r'\(').replace(')', r'\)')):
    build_model(cfg, num_input_channels=1)


def test_spatial_dims_takes_a_command_line_override():
  from curriculum_seg import config_loading  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'model': model_config()})
  config = config_loading.apply_overrides(config, [('model.spatial_dims', '3')])
  assert build_model(config.model, 1).spatial_dims == 3


@pytest.mark.parametrize('overrides', [dict(), dict(input_stride=2, downsample='strided',
                                                    convs_per_level=1, skip='add')],
                         ids=['original', 'cheapest'])
def test_3d_network_trains(overrides):
  import optax  # pylint: disable=import-outside-toplevel
  from curriculum_seg import losses  # pylint: disable=import-outside-toplevel
  model = build_model(model_config_3d(depth=1, foreground_prior=0.05, **overrides), 1)
  rng = np.random.default_rng(0)
  zz, yy, xx = np.mgrid[:8, :16, :16]
  targets = np.stack([((zz - 4) ** 2 + (yy - c) ** 2 + (xx - c) ** 2 < 9).astype(np.int32)
                      for c in (5, 10)])
  x = rng.normal(0.0, 0.1, targets.shape + (1,)).astype(np.float32) + targets[..., None]
  loss_fn = losses.make_loss_fn(ml_collections.ConfigDict(
      dict(name='dice_ce', dice_smooth=1.0, class_weights=None)), 'tumour')
  params = init_variables(model, jax.random.key(0), (1, 8, 16, 16, 1))['params']
  tx = optax.adam(1e-2)

  @jax.jit
  def train(params):
    def loss(p):
      return loss_fn(model.apply({'params': p}, x, train=True), targets, np.ones(2))

    def step(carry, _):
      p, opt = carry
      value, grads = jax.value_and_grad(loss)(p)
      updates, opt = tx.update(grads, opt, p)
      return (optax.apply_updates(p, updates), opt), value

    (p, _), values = jax.lax.scan(step, (params, tx.init(params)), None, length=8)
    return values[0], loss(p)

  first, last = train(params)
  assert np.isfinite(float(last)) and float(last) < 0.8 * float(first)


def test_pytorch_twin_in_the_benchmark_computes_the_same_3d_function():
  torch = pytest.importorskip('torch')
  bench = _load_benchmark()
  model = build_model(model_config_3d(), 1)  # residual + instance norm, as the authors'
  variables = init_variables(model, jax.random.key(0), (1, 8, 8, 8, 1))
  x = np.random.default_rng(0).random((2, 8, 16, 12, 1), np.float32)
  net = bench.torch_unet(model_config_3d().to_dict(), 1)
  bench.load_flax_params_into_torch(net, variables)
  net.eval()
  with torch.no_grad():
    got = net(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
  np.testing.assert_allclose(got, apply(model, variables, x), rtol=1e-4, atol=1e-4)
