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
