"""A 2-D or 3-D U-Net in Flax (linen) for slice, block and patch segmentation.

The network is fully convolutional: the same parameters run on patches and on whole slices (or
blocks) of any size divisible by input_stride * 2**depth in every spatial axis. One definition
serves both: `spatial_dims` 2 takes [B, H, W, C] (C = context slices), 3 takes [B, D, H, W, C],
and every layer below is generic over the number of spatial axes. Parameters are always
float32; the compute dtype (float32 or bfloat16) is a config choice, and the logits are returned
in float32 so that losses and softmax are computed in full precision.

The defaults are the paper authors' layout (max-pool, two 3x3 convs per block, concatenated
skips, full-resolution first level). Cheaper variants, each a `config.model` field: `downsample`
('strided': a stride-2 first conv instead of max-pool + conv, as MONAI's UNet), `convs_per_level`
(3x3 convs per block), `skip` ('add' halves the decoder's first conv) and `input_stride` (2 runs
every level at half resolution, as MONAI's UNet, whose first conv already strides the input).

Each layer is written in the form XLA compiles fastest (a matmul for pointwise and transposed
convolutions, a reshape for pooling); 3-D convolutions on CPU are sums of 2-D convolutions over
the kernel's depth taps (`conv3d_formulation`, docs/3d_convolutions.md). Parameters keep nn.Conv's
names and shapes whatever the formulation, so checkpoints do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from curriculum_seg.tasks import num_classes

NORMS = ('batch', 'group', 'instance', 'none')
BLOCKS = ('plain', 'residual')
DOWNSAMPLES = ('maxpool', 'strided')
SKIPS = ('concat', 'add')
INPUT_STRIDES = (1, 2)
SPATIAL_DIMS = (2, 3)
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# `config.model` fields of the cheaper variants and of 3-D (configs/common.py:model).
VARIANT_FIELDS = ('downsample', 'convs_per_level', 'skip', 'input_stride', 'foreground_prior',
                  'spatial_dims')

# Shared by the Flax model and the PyTorch twin in benchmarks/train_step.py so both compute
# the same function.
NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9  # Flax convention: running = m * running + (1 - m) * batch.

_kernel_init = nn.initializers.he_normal()
# Head kernel when a foreground prior is set: small, so the initial logits are the bias
# (RetinaNet's final-layer initialisation).
_PRIOR_HEAD_KERNEL_STDDEV = 0.01

def level_widths(depth: int, base_width: int, width_multiplier: float) -> tuple[int, ...]:
  """Feature widths of the depth + 1 resolution levels: round(base_width * multiplier**i)."""
  return tuple(int(round(base_width * width_multiplier**i)) for i in range(depth + 1))


def prior_bias(n_classes: int, foreground: int, prior: float) -> jax.Array:
  """Head bias whose softmax gives class `foreground` probability `prior`, the others equal.

  Starting near the foreground rate (e.g. 0.01) instead of 1 / n_classes keeps the first
  updates from flooding the image with foreground and the Dice term from then driving it to
  empty (RetinaNet's prior initialisation).
  """
  bias = np.zeros((n_classes,), np.float32)
  bias[foreground] = math.log(prior * (n_classes - 1) / (1.0 - prior))
  return jnp.asarray(bias)


def _pool_2x(x: jax.Array, reduce: Callable[..., jax.Array]) -> jax.Array:
  """`reduce` over non-overlapping 2x2 (2-D) or 2x2x2 (3-D) windows, as a reshape."""
  b, *spatial, c = x.shape
  shape = [b]
  for size in spatial:
    shape += [size // 2, 2]
  return reduce(x.reshape(shape + [c]), axis=tuple(range(2, 2 * len(spatial) + 1, 2)))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 (2-D) or 2x2x2 (3-D) max-pool with stride 2 as a reshape + max.

  Same values as `nn.max_pool(x, (2,) * n, (2,) * n)`; its gradient is elementwise instead of
  XLA's select-and-scatter, which is several times slower on CPU.
  """
  return _pool_2x(x, jnp.max)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 (2x2x2) average pool with stride 2 (a strided residual block's shortcut, as ResNet-D)."""
  return _pool_2x(x, jnp.mean)


def _matmul_channels(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., Cin] @ kernel [Cin, N] as one 2-D matmul.

  XLA:CPU runs a 2-D dot on its fast GEMM path, while the gradient of an equivalent 1x1
  convolution (or a multi-axis einsum) contracts batch and spatial axes at once and is several
  times slower.
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
  return y.reshape(x.shape[:-1] + (kernel.shape[-1],))


_DIMENSION_NUMBERS = {2: ('NHWC', 'HWIO', 'NHWC'), 3: ('NDHWC', 'DHWIO', 'NDHWC')}


def conv_plain(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """'SAME' convolution of x [B, *spatial, Cin] with kernel [*window, Cin, Cout] as one XLA
  convolution: nn.Conv's op, the reference the other formulations are tested against."""
  n = x.ndim - 2
  return jax.lax.conv_general_dilated(x, kernel, (stride,) * n, 'SAME',
                                      dimension_numbers=_DIMENSION_NUMBERS[n])


def _same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
  """XLA's 'SAME' padding (low, high) of one axis."""
  total = max((-(-size // stride) - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def _depth_pad(x: jax.Array, low: int, high: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (low, high)) + ((0, 0),) * (x.ndim - 2))


def _depth_taps(x: jax.Array, window: int, stride: int) -> list[jax.Array]:
  """The input slices each depth tap of a 'SAME' convolution reads: tap i's [B, D_out, ...]."""
  d = x.shape[1]
  low, high = _same_padding(d, window, stride)
  out_d = -(-d // stride)
  padded = _depth_pad(x, low, high)
  return [jax.lax.slice_in_dim(padded, i, i + (out_d - 1) * stride + 1, stride, axis=1)
          for i in range(window)]


def _fold_depth(x: jax.Array) -> jax.Array:
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def conv_input_shift(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """A 3-D 'SAME' convolution as a sum over the kernel's depth taps of 2-D convolutions.

  Depth is folded into the batch: tap i convolves the depth-shifted input (every `stride`-th
  slice) over (H, W) with kernel[i]. Same function as `conv_plain`; XLA:CPU runs 2-D
  convolutions and their gradients far faster than 3-D ones.
  """
  out = None
  for i, taps in enumerate(_depth_taps(x, kernel.shape[0], stride)):
    y = conv_plain(_fold_depth(taps), kernel[i], stride)
    out = y if out is None else out + y
  return out.reshape(taps.shape[:2] + out.shape[1:])


def conv_stacked_taps(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Like `conv_input_shift`, with the depth taps' input slices stacked on channels: one 2-D
  convolution 3 * Cin -> Cout (kernel [3, 3, 3 * Cin, Cout]). It copies the input three times,
  which pays off only for very few input channels (the first layer's image)."""
  taps = _depth_taps(x, kernel.shape[0], stride)
  stacked = jnp.concatenate(taps, axis=-1)
  merged = jnp.moveaxis(kernel, 0, 2).reshape(kernel.shape[1:3] + (-1, kernel.shape[-1]))
  y = conv_plain(_fold_depth(stacked), merged, stride)
  return y.reshape(stacked.shape[:2] + y.shape[1:])


def conv_output_shift(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """Like `conv_input_shift`, but every depth tap convolves the unshifted input (depth folded
  into the batch) and the tap's output is shifted in depth before the sum.

  No shifted copy of the input is made, forward or backward (the shifts move Cout-channel
  outputs and gradients instead). Stride 2 would waste half the taps' work, so it is computed
  as `conv_input_shift`.
  """
  if stride != 1:
    return conv_input_shift(x, kernel, stride)
  window = kernel.shape[0]
  low, _ = _same_padding(x.shape[1], window, 1)
  flat = _fold_depth(x)
  out = None
  for i in range(window):
    y = conv_plain(flat, kernel[i]).reshape(x.shape[:-1] + kernel.shape[-1:])
    shift = i - low  # out[:, j] += y[:, j + shift], zero outside the volume
    if shift > 0:
      y = _depth_pad(y[:, shift:], 0, shift)
    elif shift < 0:
      y = _depth_pad(y[:, :shift], -shift, 0)
    out = y if out is None else out + y
  return out


# 3-D convolution formulations: all the same function of the same [3, 3, 3, Cin, Cout] kernel.
CONV3D_FORMULATIONS = {'plain': conv_plain, 'input_shift': conv_input_shift,
                       'output_shift': conv_output_shift, 'stacked_taps': conv_stacked_taps}
# Up to this many input channels the stacked taps are faster on CPU (the first layer's image).
_STACKED_TAPS_MAX_CHANNELS = 2


def conv3d_formulation(backend: str | None = None, in_channels: int | None = None) -> str:
  """The 3-D convolution formulation used on `backend` (default: JAX's default backend).

  XLA:CPU's 3-D convolution, and above all its gradients, are several times slower than 2-D
  convolutions doing the same work (docs/3d_convolutions.md): CPU gets depth taps of 2-D
  convolutions, stacked on channels for an input of very few channels. GPU and TPU compilers
  have fast native 3-D convolutions, so they get the plain op.
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return 'plain'
  if in_channels is not None and in_channels <= _STACKED_TAPS_MAX_CHANNELS:
    return 'stacked_taps'
  return 'output_shift'


def spatial_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """'SAME' convolution, 2-D or 3-D by x's rank; 3-D in the backend's fastest formulation."""
  if x.ndim == 4:
    return conv_plain(x, kernel, stride)
  formulation = conv3d_formulation(in_channels=x.shape[-1])
  return CONV3D_FORMULATIONS[formulation](x, kernel, stride)


class Conv(nn.Module):
  """k x k (2-D) or k x k x k (3-D) 'SAME' convolution, stride 1 or 2.

  The variables are nn.Conv's (kernel [*window, Cin, Cout], optional bias, same names and
  initialisation), whichever formulation computes it, so checkpoints do not depend on it.
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = _kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = (self.kernel_size,) * (x.ndim - 2)
    kernel = self.param('kernel', self.kernel_init, window + (x.shape[-1], self.features),
                        jnp.float32)
    y = spatial_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(
          self.dtype)
    return y


class PointwiseConv(nn.Module):
  """1x1 (1x1x1) convolution (kernel [1, 1, (1,) Cin, Cout] like nn.Conv) as a 2-D matmul."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = _kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = (1,) * (x.ndim - 2)
    kernel = self.param('kernel', self.kernel_init, window + (x.shape[-1], self.features),
                        jnp.float32)
    y = _matmul_channels(x.astype(self.dtype), kernel.reshape(kernel.shape[-2:]).astype(
        self.dtype))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(
          self.dtype)
    return y


class Upsample2x(nn.Module):
  """2x2 (2x2x2) transposed convolution with stride 2 (kernel [2, 2, (2,) Cin, Cout]) as a matmul.

  out[2h + i, 2w + j] = sum_c x[h, w, c] * kernel[i, j, c] + bias (and likewise with a depth
  tap): the windows do not overlap, so the transposed convolution is a matmul to 2**n * Cout
  channels and a depth-to-space reshape. This avoids XLA:CPU's slow lhs-dilated convolution
  (docs/3d_convolutions.md). It equals PyTorch's ConvTranspose2d / 3d(kernel_size=2,
  stride=2) with weight[c, d, i, j(, l)] = kernel[i, j(, l), c, d]; flax's nn.ConvTranspose
  would use the spatially flipped kernel.
  """

  features: int
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = _kernel_init
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, *spatial, c = x.shape
    n = len(spatial)
    kernel = self.param('kernel', self.kernel_init, (2,) * n + (c, self.features), jnp.float32)
    bias = self.param('bias', self.bias_init, (self.features,), jnp.float32)
    kernel = jnp.moveaxis(kernel, -2, 0).reshape(c, 2**n * self.features)
    y = _matmul_channels(x.astype(self.dtype), kernel.astype(self.dtype))
    # [b, *spatial, *taps, F] -> [b, s1, t1, s2, t2, ..., F]: tap i of axis k lands at 2 s_k + i.
    y = y.reshape([b, *spatial] + [2] * n + [self.features])
    y = y.transpose([0] + [a for k in range(n) for a in (1 + k, 1 + n + k)] + [2 * n + 1])
    return y.reshape([b] + [2 * size for size in spatial] + [self.features]) + bias.astype(
        self.dtype)


class InstanceNorm(nn.Module):
  """Instance norm over all spatial axes per example and channel, with a learned scale and bias.

  Same function and parameters as nn.InstanceNorm (statistics in float32, E[x^2] - E[x]^2), but
  written as one affine map x * a + b per instance, which XLA differentiates into fewer passes
  over the activations (faster forward + backward on CPU).
  """

  epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    x32 = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) - jnp.square(mean), 0.0)
    a = scale * jax.lax.rsqrt(var + self.epsilon)
    return (x32 * a + (bias - mean * a)).astype(self.dtype)


def make_norm(kind: str, groups: int, dtype: Any, train: bool,
              name: str) -> Callable[[jax.Array], jax.Array]:
  """The configured normalisation over the channel axis, as a layer named `name`."""
  if kind == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM,
                        epsilon=NORM_EPSILON, dtype=dtype, name=name)
  if kind == 'group':
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPSILON, dtype=dtype, name=name)
  if kind == 'instance':
    return InstanceNorm(epsilon=NORM_EPSILON, dtype=dtype, name=name)
  return lambda x: x


class ConvBlock(nn.Module):
  """`convs` 3x3 (3x3x3) conv-norm-ReLU layers; 'residual' adds a shortcut before the last ReLU.

  With the default two convs the residual variant is the ResNet basic block (post-activation)
  used by the paper's authors with instance norm; the shortcut is a 1x1 conv + norm when the
  width changes. `stride` 2 makes the first conv a stride-2 conv (learned downsampling, as
  MONAI's residual units) and the shortcut a 2x2 (2x2x2) average pool (then the projection, if
  any). Dropout, when configured, follows the first conv's ReLU, or the block's output when it
  has one conv.
  """

  features: int
  norm: str
  groups: int
  dropout: float
  residual: bool
  dtype: Any
  convs: int = 2
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    use_bias = self.norm == 'none'
    conv = lambda name, stride=1: Conv(  # noqa: E731
        self.features, 3, stride, use_bias, self.dtype, name=name)
    norm = lambda name: make_norm(self.norm, self.groups, self.dtype, train, name)  # noqa: E731
    dropout = lambda y: (  # noqa: E731
        nn.Dropout(self.dropout, deterministic=not train)(y) if self.dropout > 0 else y)

    y = x
    for i in range(1, self.convs + 1):
      y = norm(f'norm{i}')(conv(f'conv{i}', self.stride if i == 1 else 1)(y))
      if i < self.convs:
        y = nn.relu(y)
        y = dropout(y) if i == 1 else y
    if self.residual:
      shortcut = avg_pool_2x2(x) if self.stride == 2 else x
      if x.shape[-1] != self.features:
        projection = PointwiseConv(self.features, use_bias, self.dtype, name='shortcut_conv')
        shortcut = norm('shortcut_norm')(projection(shortcut))
      y = y + shortcut.astype(y.dtype)
    y = nn.relu(y)
    return dropout(y) if self.convs == 1 else y


class UNet(nn.Module):
  """2-D or 3-D U-Net: `depth` 2x downsamplings, 2x transposed-conv upsampling, skip connections.

  Input [B, H, W, C] (C = context slices) with `spatial_dims` 2, [B, D, H, W, C] with 3; output
  float32 logits [B, *spatial, num_classes]. Every spatial size must be divisible by
  input_stride * 2**depth so every skip connection lines up; other sizes raise ValueError. The
  defaults are the original 2-D network; the other field values are the cheaper variants
  described in the module docstring. With `input_stride` 2 the head is a 2x transposed conv from
  the first level's half-resolution features to full-resolution logits. `foreground_prior`
  (None: zero head bias) sets the head's initial bias so that the last class (the foreground of
  every task) starts at that softmax probability. The paper authors' 3-D network is widths
  (8, 16, 32, 64, 128), residual blocks, instance norm, spatial_dims 3.
  """

  widths: Sequence[int]
  num_classes: int
  norm: str = 'instance'
  group_norm_groups: int = 8
  dropout: float = 0.0
  block: str = 'residual'
  compute_dtype: Any = jnp.float32
  num_input_channels: int | None = None
  downsample: str = 'maxpool'
  convs_per_level: int = 2
  skip: str = 'concat'
  input_stride: int = 1
  foreground_prior: float | None = None
  spatial_dims: int = 2

  @property
  def depth(self) -> int:
    return len(self.widths) - 1

  @property
  def size_factor(self) -> int:
    """Every spatial input size must be a multiple of this: input_stride * 2**depth."""
    return self.input_stride * 2**self.depth

  def check_input_shape(self, shape: Sequence[int]) -> None:
    """Raises ValueError unless `shape` is [B, *spatial, C] with `spatial_dims` spatial sizes,
    each divisible by size_factor, and C the built number of input channels."""
    axes = {2: 'height, width', 3: 'depth, height, width'}[self.spatial_dims]
    if len(shape) != self.spatial_dims + 2:
      raise ValueError(
          f'UNet (spatial_dims={self.spatial_dims}) expects input [batch, {axes}, channels], '
          f'got shape {tuple(shape)}')
    factor = self.size_factor
    spatial = tuple(shape[1:-1])
    if any(size % factor for size in spatial):
      what = (f'2**depth = {factor} (depth={self.depth})' if self.input_stride == 1 else
              f'input_stride * 2**depth = {factor} (input_stride={self.input_stride}, '
              f'depth={self.depth})')
      raise ValueError(
          f"UNet input size {'x'.join(str(size) for size in spatial)} is not divisible by "
          f'{what}; pad or crop to a multiple of {factor}')
    if self.num_input_channels is not None and shape[-1] != self.num_input_channels:
      raise ValueError(
          f'UNet built for {self.num_input_channels} input channels got {shape[-1]}')

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    self.check_input_shape(x.shape)
    strided = self.downsample == 'strided'
    block = lambda features, name, stride=1: ConvBlock(  # noqa: E731
        features, self.norm, self.group_norm_groups, self.dropout,
        self.block == 'residual', self.compute_dtype, self.convs_per_level, stride, name=name)

    x = x.astype(self.compute_dtype)
    skips = []
    for level, features in enumerate(self.widths):
      name = 'bottleneck' if level == self.depth else f'down_{level}'
      stride = self.input_stride if level == 0 else 2 if strided else 1
      if level > 0 and not strided:
        x = max_pool_2x2(x)
      x = block(features, name, stride)(x, train)
      skips.append(x)
    for level in reversed(range(self.depth)):
      features = self.widths[level]
      x = Upsample2x(features, self.compute_dtype, name=f'upsample_{level}')(x)
      x = x + skips[level] if self.skip == 'add' else jnp.concatenate([x, skips[level]], axis=-1)
      x = block(features, f'up_{level}')(x, train)

    head_init = {}
    if self.foreground_prior is not None:
      bias = prior_bias(self.num_classes, self.num_classes - 1, self.foreground_prior)
      head_init = dict(kernel_init=nn.initializers.normal(_PRIOR_HEAD_KERNEL_STDDEV),
                       bias_init=lambda *_: bias)
    head = Upsample2x if self.input_stride == 2 else PointwiseConv
    logits = head(self.num_classes, dtype=self.compute_dtype, name='head', **head_init)(x)
    return logits.astype(jnp.float32)


def init_variables(model: nn.Module, rng: jax.Array, input_shape: Sequence[int],
                   out_shardings: Any = None) -> dict[str, Any]:
  """Initial variables (params, and batch_stats for batch norm) for inputs of `input_shape`.

  Compiled as one program; on CPU with XLA's backend optimisation off, because init runs once
  and optimising the random-number code of every layer makes XLA:CPU compile several times longer
  for no gain.
  """
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
  kwargs = {} if out_shardings is None else {'out_shardings': out_shardings}
  init = jax.jit(
      lambda key: model.init(key, jnp.zeros(tuple(input_shape), jnp.float32), train=False),
      compiler_options=options, **kwargs)
  return init(rng)


def _require_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not one of {list(allowed)}')


def build_model(model_cfg: Any, num_input_channels: int) -> UNet:
  """Builds the U-Net from `config.model`; validates every key with a message naming it.

  `num_input_channels` comes from the data (context slices in 2-D). A run saved before a field
  existed reads it at the value of the original network (`rundir.read_config`).
  """
  variant = {key: model_cfg[key] for key in VARIANT_FIELDS}
  _require_choice('model.name', model_cfg.name, ('unet',))
  _require_choice('model.norm', model_cfg.norm, NORMS)
  _require_choice('model.block', model_cfg.block, BLOCKS)
  _require_choice('model.compute_dtype', model_cfg.compute_dtype, tuple(COMPUTE_DTYPES))
  n_classes = num_classes(model_cfg.task)
  depth = int(model_cfg.depth)
  if depth < 1:
    raise ValueError(f'model.depth={depth} must be >= 1')
  if int(model_cfg.base_width) < 1 or float(model_cfg.width_multiplier) <= 0:
    raise ValueError(
        f'model.base_width={model_cfg.base_width} must be >= 1 and '
        f'model.width_multiplier={model_cfg.width_multiplier} must be > 0')
  if not 0.0 <= float(model_cfg.dropout) < 1.0:
    raise ValueError(f'model.dropout={model_cfg.dropout} must be in [0, 1)')
  if int(num_input_channels) < 1:
    raise ValueError(f'num_input_channels={num_input_channels} must be >= 1')
  _require_choice('model.downsample', variant['downsample'], DOWNSAMPLES)
  _require_choice('model.skip', variant['skip'], SKIPS)
  _require_choice('model.input_stride', variant['input_stride'], INPUT_STRIDES)
  convs = variant['convs_per_level']
  if isinstance(convs, bool) or not isinstance(convs, int) or convs < 1:
    raise ValueError(f'model.convs_per_level={convs!r} must be an integer >= 1')
  dims = variant['spatial_dims']
  if isinstance(dims, bool) or not isinstance(dims, int) or dims not in SPATIAL_DIMS:
    raise ValueError(f'model.spatial_dims={dims!r} is not one of {list(SPATIAL_DIMS)}')
  prior = variant['foreground_prior']
  if prior is not None and not (isinstance(prior, (int, float)) and 0.0 < prior < 1.0):
    raise ValueError(f'model.foreground_prior={prior!r} must be None or in (0, 1)')
  widths = level_widths(depth, int(model_cfg.base_width), float(model_cfg.width_multiplier))
  groups = int(model_cfg.group_norm_groups)
  if model_cfg.norm == 'group':
    bad = [w for w in widths if groups < 1 or w % groups]
    if bad:
      raise ValueError(
          f'model.group_norm_groups={groups} does not divide the level widths {bad} '
          f'(widths {list(widths)})')
  return UNet(
      widths=widths,
      num_classes=n_classes,
      norm=model_cfg.norm,
      group_norm_groups=groups,
      dropout=float(model_cfg.dropout),
      block=model_cfg.block,
      compute_dtype=COMPUTE_DTYPES[model_cfg.compute_dtype],
      num_input_channels=int(num_input_channels),
      downsample=variant['downsample'],
      convs_per_level=convs,
      skip=variant['skip'],
      input_stride=variant['input_stride'],
      foreground_prior=None if prior is None else float(prior),
      spatial_dims=dims,
  )
