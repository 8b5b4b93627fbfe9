"""Benchmarks the compiled U-Net train step, and the same U-Net in PyTorch, on the same shapes.

For the embedded default model (configs/synthetic.py) and the LiTS-sized model
(configs/lits_three_stage.py) it measures, per shape: step time (median over repeats after
warm-up), slices/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s, and on a GPU/TPU
the MFU against the device's dense bf16 peak (compute in bfloat16 there, float32 on CPU). It
also times the cheaper U-Net variants of the default model (MODEL_VARIANTS, JAX only). On CPU,
when torch is installed, it times the PyTorch twin of the same network (same widths, norm,
blocks; float32; forward + backward + Adam step) interleaved with JAX in the same run and prints
the JAX/PyTorch time ratio. The machine's load average is recorded: on a shared machine torch's
spinning OpenMP threads suffer far more from other processes than XLA's thread pool does.

3-D networks (MODELS_3D: a small one for CPU runs, and the paper authors' network) are timed
the same way on blocks of D x H x W voxels, and their peak memory per sample is recorded: XLA's
memory analysis of the compiled train step and forward pass, and for both frameworks the peak
resident memory a forward pass (and a train step) adds, each measured in a fresh process.

With --layers it times instead each 3-D layer alone (forward + both gradients, XLA:CPU against
PyTorch) in every formulation the model offers and a few rejected ones (LAYER_CANDIDATES), at the
small 3-D network's shapes: the table of docs/3d_convolutions.md.

  python benchmarks/train_step.py [--quick] [--out benchmarks/results/train_step.json]
  python benchmarks/train_step.py --only 3d_small:32x96x96,3d_authors:64x256x256
  python benchmarks/train_step.py --layers [--out benchmarks/results/layers_3d.json]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from curriculum_seg import optim  # noqa: E402
from curriculum_seg import rundir  # noqa: E402
from curriculum_seg import sharding  # noqa: E402
from curriculum_seg import train_step as train_step_lib  # noqa: E402
from curriculum_seg.models import build_model  # noqa: E402
from curriculum_seg.models import unet as unet_lib  # noqa: E402

# The variant fields of the original network (a config saved before them reads these).
ORIGINAL_LAYOUT = {key.split('.', 1)[1]: value for key, value in rundir.ADDED_FIELDS.items()
                   if key.startswith('model.')}
# The models come from the configs; these are used only when a config has no `model` section.
FALLBACK_MODELS = {
    'default': dict(name='unet', depth=3, base_width=8, width_multiplier=2.0, norm='instance',
                    group_norm_groups=8, dropout=0.0, block='residual', task='tumour',
                    compute_dtype='float32', **ORIGINAL_LAYOUT),
    'lits': dict(name='unet', depth=5, base_width=32, width_multiplier=2.0, norm='instance',
                 group_norm_groups=8, dropout=0.0, block='residual', task='tumour',
                 compute_dtype='float32', **ORIGINAL_LAYOUT),
}
MODEL_CONFIGS = {'default': 'synthetic', 'lits': 'lits_three_stage'}
# Cheaper U-Net variants: config.model overrides of a model above. The PyTorch twin
# builds only the original layout, so models with other layouts are timed in JAX alone.
MODEL_VARIANTS = {
    'default+strided': ('default', dict(downsample='strided')),
    'default+1conv_add': ('default', dict(convs_per_level=1, skip='add')),
    'default+half_res': ('default', dict(input_stride=2)),
    'default+half_res_strided': ('default', dict(input_stride=2, downsample='strided')),
    'default+width4': ('default', dict(base_width=4)),
}
TINY_MODEL = dict(FALLBACK_MODELS['default'], depth=1, base_width=4)
# 3-D networks: residual blocks and instance norm, as the paper's authors. '3d_small' is sized
# for a CPU run (widths 8-16-32-64); '3d_authors' is their network (widths 8-16-32-64-128).
MODELS_3D = {
    '3d_small': dict(FALLBACK_MODELS['default'], depth=3, base_width=8, spatial_dims=3),
    '3d_authors': dict(FALLBACK_MODELS['default'], depth=4, base_width=8, spatial_dims=3),
    'tiny3d': dict(TINY_MODEL, spatial_dims=3),
}
INPUT_CHANNELS = 3  # 2-D: context slices
INPUT_CHANNELS_3D = 1
SETTLE_S = 0.5

# (model, kind, size, global batch): batches sized for a 2-core CPU run of a few minutes. The
# size is an int (2-D, size x size) or a tuple (3-D, depth x height x width).
FULL_CASES = [
    ('default', 'whole', 128, 16),
    ('default', 'patch', 64, 32),
    *[(name, 'whole', 128, 16) for name in MODEL_VARIANTS],
    ('lits', 'whole', 512, 1),
    ('lits', 'whole', 256, 2),
    ('lits', 'patch', 128, 8),
    ('3d_small', 'block', (32, 96, 96), 2),
    ('3d_authors', 'block', (64, 256, 256), 1),
]
QUICK_CASES = [('tiny', 'whole', 32, 4), ('tiny3d', 'block', (8, 16, 16), 2)]
# The JAX/PyTorch time ratio the 3-D small network's train step should stay within on CPU.
GOAL_3D_RATIO = 2.0

# Dense bf16 peak FLOP/s by device kind (vendor figures), for MFU.
BF16_PEAK = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12,
    'A10': 125e12, 'V100': 125e12, 'T4': 65e12,
    'TPU v6': 918e12, 'TPU v5p': 459e12, 'TPU v5': 197e12, 'TPU v4': 275e12,
}


def model_config(name: str) -> tuple[dict[str, Any], str]:
  """`config.model` of configs/<MODEL_CONFIGS[name]>.py, or FALLBACK_MODELS[name] without one."""
  if name == 'tiny':
    return dict(TINY_MODEL), 'benchmarks/train_step.py TINY_MODEL'
  if name in MODELS_3D:
    return dict(MODELS_3D[name]), f'benchmarks/train_step.py MODELS_3D[{name!r}]'
  if name in MODEL_VARIANTS:
    base, overrides = MODEL_VARIANTS[name]
    cfg, source = model_config(base)
    return dict(cfg, **overrides), f'{source} + {overrides}'
  module_name = MODEL_CONFIGS[name]
  try:
    module = importlib.import_module(f'configs.{module_name}')
    cfg = module.get_config()
    if 'model' in cfg:
      return dict(cfg.model.to_dict()), f'configs/{module_name}.py'
  except Exception as e:  # noqa: BLE001 - a broken config must not stop the benchmark
    print(f'note: could not read configs/{module_name}.py ({e}); using the built-in model')
  return dict(FALLBACK_MODELS[name]), 'benchmarks/train_step.py FALLBACK_MODELS'


def peak_flops(device: jax.Device) -> float | None:
  kind = device.device_kind
  for name, peak in BF16_PEAK.items():
    if name.lower() in kind.lower():
      return peak
  return None


def machine_details() -> dict[str, Any]:
  cpu = platform.processor()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  import flax  # pylint: disable=import-outside-toplevel
  details = {
      'cpu_model': cpu, 'cpu_cores': os.cpu_count(), 'python': platform.python_version(),
      'jax': jax.__version__, 'flax': flax.__version__, 'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'load_average_start': os.getloadavg(),
  }
  try:
    import torch  # pylint: disable=import-outside-toplevel
    details['torch'] = torch.__version__
    details['torch_threads'] = torch.get_num_threads()
  except ImportError:
    details['torch'] = None
  return details


def time_interleaved(fns: dict[str, Any], warmup: int, repeats: int) -> dict[str, list[float]]:
  """Wall-clock seconds of each blocking callable, run in turn (a, b, a, b, ...) after warm-up.

  Interleaving gives every contender the same share of whatever else the machine is doing. A
  pause before each timed call lets the previous contender's worker threads (XLA's pool, torch's
  OpenMP team), which spin for a while after their work, go idle first.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(SETTLE_S)
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return times


def spatial_shape(size: int | tuple[int, ...]) -> tuple[int, ...]:
  """(size, size) for a 2-D case's int size, the tuple itself for a 3-D case."""
  return (size, size) if isinstance(size, int) else tuple(size)


def size_name(size: int | tuple[int, ...]) -> str:
  return 'x'.join(str(s) for s in spatial_shape(size))


def input_channels(model_cfg: dict[str, Any]) -> int:
  return INPUT_CHANNELS_3D if model_cfg.get('spatial_dims', 2) == 3 else INPUT_CHANNELS


def synthetic_batch(batch: int, size: int | tuple[int, ...], channels: int = INPUT_CHANNELS,
                    seed: int = 0) -> dict[str, np.ndarray]:
  """A LiTS-like batch: a liver disc (ball) with a tumour disc (ball), image brighter in the
  tumour; `size` an int (2-D square) or a (D, H, W) tuple."""
  rng = np.random.default_rng(seed)
  shape = spatial_shape(size)
  grid = np.indices(shape, np.float32) / np.reshape(shape, (-1,) + (1,) * len(shape))
  label = np.zeros((batch,) + shape, np.int32)
  for b in range(batch):
    centre = rng.uniform(0.35, 0.65, len(shape)).reshape((-1,) + (1,) * len(shape))
    distance = np.sum((grid - centre) ** 2, axis=0)
    label[b][distance < 0.3 ** 2] = 1
    label[b][distance < 0.1 ** 2] = 2
  image = rng.normal(0.3, 0.05, (batch,) + shape + (channels,)).astype(np.float32)
  image += 0.2 * (label[..., None] >= 1) + 0.3 * (label[..., None] == 2)
  return {'image': image, 'label': label, 'mask': np.ones((batch,), np.float32)}


def _stage_configs() -> tuple[ml_collections.ConfigDict, ...]:
  opt = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=1e-4, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.0, nesterov=False, grad_clip_norm=0.0))
  sched = ml_collections.ConfigDict(dict(name='constant', warmup_steps=0, end_factor=1.0,
                                         power=1.0))
  loss = ml_collections.ConfigDict(dict(name='dice', class_weights=None, dice_smooth=1.0))
  return opt, sched, loss


def peak_bytes(compiled: Any) -> int | None:
  """XLA's estimate of a compiled program's peak memory: arguments + outputs - aliased + temps."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def _jax_train_step(model_cfg: dict[str, Any], size: int | tuple[int, ...], batch: int):
  """(compiled train step, state, batch on the mesh, rng) for a model config and shape."""
  cfg = ml_collections.ConfigDict(model_cfg)
  channels = input_channels(model_cfg)
  model = build_model(cfg, channels)
  opt, sched, loss = _stage_configs()
  tx, _ = optim.build_optimizer(opt, sched, 1000)
  mesh = sharding.make_mesh()
  state = train_step_lib.create_train_state(
      jax.random.key(0), model, tx, (1,) + spatial_shape(size) + (channels,), mesh=mesh)
  step = train_step_lib.make_train_step(model, tx, loss, cfg.task, mesh)
  data = sharding.host_to_global(synthetic_batch(batch, size, channels), mesh)
  rng = jax.random.key(1)
  return step.lower(state, data, rng).compile(), state, data, rng


def _jax_forward(model_cfg: dict[str, Any], size: int | tuple[int, ...], batch: int):
  """(compiled inference forward pass, variables, images) for a model config and shape."""
  channels = input_channels(model_cfg)
  model = build_model(ml_collections.ConfigDict(model_cfg), channels)
  shape = (batch,) + spatial_shape(size) + (channels,)
  variables = unet_lib.init_variables(model, jax.random.key(0), (1,) + shape[1:])
  images = jnp.asarray(synthetic_batch(batch, size, channels)['image'])
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return forward.lower(variables, images).compile(), variables, images


def jax_runner(model_cfg: dict[str, Any], size: int | tuple[int, ...],
               batch: int) -> tuple[Any, dict[str, Any]]:
  """A blocking callable running the jitted, sharded train step, and its compile figures."""
  start = time.perf_counter()
  compiled, state, data, rng = _jax_train_step(model_cfg, size, batch)
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  holder = {'state': state}

  def run():
    holder['state'], metrics = compiled(holder['state'], data, rng)
    jax.block_until_ready(metrics)

  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  initial = {'params': jax.device_get(state.params)}  # before the first step donates the state
  return run, {'compile_s': compile_s, 'flops': flops, 'params': int(n_params),
               'xla_peak_bytes': peak_bytes(compiled)}, initial


def torch_runner(model_cfg: dict[str, Any], size: int | tuple[int, ...], batch: int,
                 channels_last: bool, variables: dict[str, Any] | None = None):
  """A callable running the PyTorch twin's step: float32 on CPU, forward, backward, Adam.

  PyTorch's default NCHW (NCDHW) memory format, or channels-last (NHWC / NDHWC, XLA's layout)
  if asked. With `variables` (the Flax model's), the twin starts from the same weights.
  """
  import torch  # pylint: disable=import-outside-toplevel
  channels = input_channels(model_cfg)
  net = torch_unet(model_cfg, channels)
  if variables is not None:
    load_flax_params_into_torch(net, variables)
  host = synthetic_batch(batch, size, channels)
  n = len(spatial_shape(size))
  image = torch.from_numpy(host['image']).permute(0, n + 1, *range(1, n + 1)).contiguous()
  if channels_last:
    memory_format = torch.channels_last if n == 2 else torch.channels_last_3d
    net = net.to(memory_format=memory_format)
    image = image.contiguous(memory_format=memory_format)
  opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-4)
  target = torch.from_numpy((host['label'] == 2).astype(np.float32))
  net.train()

  def run():
    opt.zero_grad(set_to_none=True)
    probs = torch.softmax(net(image), dim=1)[:, 1]
    inter = (probs * target).sum()
    loss = 1 - (2 * inter + 1) / (probs.sum() + target.sum() + 1)
    loss.backward()
    opt.step()

  run.net, run.image = net, image
  return run


def twin_difference(model_cfg: dict[str, Any], size: int | tuple[int, ...], batch: int,
                    variables: dict[str, Any], net: Any, image: Any) -> dict[str, float]:
  """Max |JAX logits - PyTorch logits| of the two networks holding the same weights, on the
  benchmark's batch (inference mode), and the largest logit for scale."""
  import torch  # pylint: disable=import-outside-toplevel
  channels = input_channels(model_cfg)
  model = build_model(ml_collections.ConfigDict(model_cfg), channels)
  images = synthetic_batch(batch, size, channels)['image']
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
  net.eval()
  with torch.no_grad():
    got = net(image).float().numpy()
  net.train()
  got = np.moveaxis(got, 1, -1)
  return {'max_abs_difference': float(np.max(np.abs(got - want))),
          'max_abs_logit': float(np.max(np.abs(want)))}


def _rss_bytes(field: str) -> int:
  for line in pathlib.Path('/proc/self/status').read_text().splitlines():
    if line.startswith(field + ':'):
      return int(line.split()[1]) * 1024
  raise RuntimeError(f'no {field} in /proc/self/status')


def memory_probe(framework: str, mode: str, model_name: str, size: tuple[int, ...],
                 batch: int) -> dict[str, Any]:
  """Peak resident memory that one forward pass ('forward', inference) or one train step
  ('train') adds to a process holding the built network and its input: the process's peak RSS
  is reset just before the call (Linux /proc/self/clear_refs) and read after it. Run in a fresh
  process (see measure_memory), so no other work's freed memory is reused."""
  model_cfg = dict(model_config(model_name)[0], compute_dtype='float32')
  xla_peak = None
  if framework == 'jax':
    if mode == 'forward':
      compiled, variables, images = _jax_forward(model_cfg, size, batch)
      call = lambda: jax.block_until_ready(compiled(variables, images))  # noqa: E731
    else:
      compiled, state, data, rng = _jax_train_step(model_cfg, size, batch)
      call = lambda: jax.block_until_ready(compiled(state, data, rng))  # noqa: E731
    xla_peak = peak_bytes(compiled)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    if mode == 'forward':
      net = torch_unet(model_cfg, input_channels(model_cfg)).eval()
      n = len(size)
      image = torch.from_numpy(synthetic_batch(batch, size, input_channels(model_cfg))['image'])
      image = image.permute(0, n + 1, *range(1, n + 1)).contiguous()

      def call():
        with torch.no_grad():
          return net(image)
    else:
      call = torch_runner(model_cfg, size, batch, channels_last=False)
  baseline = _rss_bytes('VmRSS')
  pathlib.Path('/proc/self/clear_refs').write_text('5')  # peak RSS := current RSS
  result = call()
  added = _rss_bytes('VmHWM') - baseline
  del result
  return {'rss_added_bytes': added, 'rss_added_bytes_per_sample': added / batch,
          'xla_peak_bytes': xla_peak,
          'xla_peak_bytes_per_sample': None if xla_peak is None else xla_peak / batch}


def measure_memory(model_name: str, size: tuple[int, ...], batch: int,
                   frameworks: tuple[str, ...]) -> dict[str, Any]:
  """memory_probe of each framework and mode, each in a fresh process of this script."""
  out = {}
  for framework in frameworks:
    for mode in ('forward', 'train'):
      spec = f'{framework}:{mode}:{model_name}:{size_name(size)}:{batch}'
      proc = subprocess.run([sys.executable, __file__, '--memory_probe', spec],
                            capture_output=True, text=True, check=False, cwd=REPO)
      if proc.returncode != 0:
        print(f'note: memory probe {spec} failed: {proc.stderr.strip()[-500:]}')
        continue
      out[f'{framework}_{mode}'] = json.loads(proc.stdout.strip().splitlines()[-1])
  return out


def torch_unet(model_cfg: dict[str, Any], in_channels: int):
  """The PyTorch twin of curriculum_seg.models.unet.UNet (NCHW, or NCDHW for spatial_dims 3):
  same layers, widths, order."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel

  widths = unet_lib.level_widths(model_cfg['depth'], model_cfg['base_width'],
                                 model_cfg['width_multiplier'])
  norm_kind = model_cfg['norm']
  groups = model_cfg['group_norm_groups']
  residual = model_cfg['block'] == 'residual'
  n_classes = unet_lib.num_classes(model_cfg['task'])
  eps = unet_lib.NORM_EPSILON
  dims = model_cfg.get('spatial_dims', 2)
  conv_nd = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
  up_nd = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
  pool = {2: torch.nn.functional.max_pool2d, 3: torch.nn.functional.max_pool3d}[dims]

  def norm(c):
    if norm_kind == 'batch':
      return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](
          c, eps=eps, momentum=1 - unet_lib.BATCH_NORM_MOMENTUM)
    if norm_kind == 'group':
      return nn.GroupNorm(groups, c, eps=eps)
    if norm_kind == 'instance':
      return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](c, eps=eps, affine=True)
    return nn.Identity()

  class Block(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      bias = norm_kind == 'none'
      self.conv1 = conv_nd(cin, cout, 3, padding=1, bias=bias)
      self.norm1 = norm(cout)
      self.drop = nn.Dropout(model_cfg['dropout']) if model_cfg['dropout'] > 0 else nn.Identity()
      self.conv2 = conv_nd(cout, cout, 3, padding=1, bias=bias)
      self.norm2 = norm(cout)
      self.shortcut = None
      if residual and cin != cout:
        self.shortcut = nn.Sequential(conv_nd(cin, cout, 1, bias=bias), norm(cout))

    def forward(self, x):
      y = self.drop(torch.relu(self.norm1(self.conv1(x))))
      y = self.norm2(self.conv2(y))
      if residual:
        y = y + (x if self.shortcut is None else self.shortcut(x))
      return torch.relu(y)

  class UNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.down = nn.ModuleList()
      cin = in_channels
      for w in widths[:-1]:
        self.down.append(Block(cin, w))
        cin = w
      self.bottleneck = Block(widths[-2], widths[-1])
      self.upsample = nn.ModuleList(
          [up_nd(widths[i + 1], widths[i], 2, stride=2)
           for i in range(len(widths) - 1)])
      self.up = nn.ModuleList([Block(2 * widths[i], widths[i]) for i in range(len(widths) - 1)])
      self.head = conv_nd(widths[0], n_classes, 1)

    def forward(self, x):
      skips = []
      for block in self.down:
        x = block(x)
        skips.append(x)
        x = pool(x, 2)
      x = self.bottleneck(x)
      for level in reversed(range(len(self.up))):
        x = torch.cat([self.upsample[level](x), skips[level]], dim=1)
        x = self.up[level](x)
      return self.head(x)

  return UNet()


def load_flax_params_into_torch(net, variables: dict[str, Any]) -> None:
  """Copies Flax U-Net variables into its PyTorch twin, so tests can check both compute the same."""
  import torch  # pylint: disable=import-outside-toplevel

  params = variables['params']
  stats = variables.get('batch_stats', {})

  def put(tensor, array, perm=None):
    array = np.asarray(array, np.float32)
    if perm is not None:
      array = array.transpose(perm)
    with torch.no_grad():
      tensor.copy_(torch.from_numpy(np.array(array, copy=True, order='C')))

  def conv(module, p):  # [*window, I, O] -> [O, I, *window]
    n = p['kernel'].ndim - 2
    put(module.weight, p['kernel'], (n + 1, n) + tuple(range(n)))
    if 'bias' in p:
      put(module.bias, p['bias'])

  def norm(module, p, s):
    if hasattr(module, 'weight') and module.weight is not None:
      put(module.weight, p['scale'])
      put(module.bias, p['bias'])
    if s:
      put(module.running_mean, s['mean'])
      put(module.running_var, s['var'])

  def block(module, name):
    p, s = params[name], stats.get(name, {})
    conv(module.conv1, p['conv1'])
    conv(module.conv2, p['conv2'])
    for key in ('norm1', 'norm2'):
      if key in p:
        norm(getattr(module, key), p[key], s.get(key))
    if module.shortcut is not None:
      conv(module.shortcut[0], p['shortcut_conv'])
      if 'shortcut_norm' in p:
        norm(module.shortcut[1], p['shortcut_norm'], s.get('shortcut_norm'))

  for i, module in enumerate(net.down):
    block(module, f'down_{i}')
  block(net.bottleneck, 'bottleneck')
  for i, module in enumerate(net.up):
    block(module, f'up_{i}')
    kernel = params[f'upsample_{i}']['kernel']  # [*window, I, O] -> [I, O, *window]
    n = kernel.ndim - 2
    put(net.upsample[i].weight, kernel, (n, n + 1) + tuple(range(n)))
    put(net.upsample[i].bias, params[f'upsample_{i}']['bias'])
  conv(net.head, params['head'])


def _conv_one_conv_depth_mix(x, kernel):
  """Rejected: one 2-D conv of the depth-folded input to 3 * Cout channels, then a depth mix."""
  b, d, h, w, c = x.shape
  cout = kernel.shape[-1]
  merged = jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(3, 3, c, 3 * cout)
  y = unet_lib.conv_plain(x.reshape(b * d, h, w, c), merged).reshape(b, d, h, w, 3, cout)
  y = jnp.pad(y, ((0, 0), (1, 1)) + ((0, 0),) * 4)
  return y[:, :d, ..., 0, :] + y[:, 1:d + 1, ..., 1, :] + y[:, 2:, ..., 2, :]


def _conv_im2col(x, kernel):
  """Rejected: the 27 shifted copies of the input on channels, one matmul."""
  b, d, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([padded[:, i:i + d, j:j + h, k:k + w] for i in range(3)
                          for j in range(3) for k in range(3)], axis=-1)
  return jnp.dot(cols.reshape(-1, 27 * c), kernel.reshape(27 * c, -1)).reshape(b, d, h, w, -1)


# 3-D conv formulations timed by --layers besides the model's own (unet_lib.CONV3D_FORMULATIONS).
LAYER_CANDIDATES = {'one_conv_depth_mix': _conv_one_conv_depth_mix, 'im2col': _conv_im2col}
# (batch, depth, height, width, Cin, Cout): the small 3-D network's level-0 and level-1 convs,
# and a colleague's reference shape (16 -> 16 on 1x32x96x96).
CONV_LAYER_CASES = [(1, 32, 96, 96, 16, 16), (2, 32, 96, 96, 1, 8), (2, 32, 96, 96, 8, 8),
                    (2, 32, 96, 96, 16, 8), (2, 16, 48, 48, 16, 16)]
QUICK_CONV_LAYER_CASES = [(1, 4, 8, 8, 2, 3)]


def _jax_layer(fn, *args):
  """A blocking callable computing fn(*args) and the gradients of <fn(*args), g> w.r.t. every
  argument (forward + backward, as in training)."""
  out_shape = jax.eval_shape(fn, *args)
  cotangent = jnp.ones(out_shape.shape, out_shape.dtype)

  def full(cotangent, *args):
    out, pullback = jax.vjp(fn, *args)
    return out, pullback(cotangent)

  compiled = jax.jit(full).lower(cotangent, *args).compile()
  return lambda: jax.block_until_ready(compiled(cotangent, *args))


def _torch_layer(module_or_fn, x):
  """The same for PyTorch: forward, then backward to the input and the module's weights."""
  import torch  # pylint: disable=import-outside-toplevel
  x = x.detach().requires_grad_(True)

  def run():
    x.grad = None
    if isinstance(module_or_fn, torch.nn.Module):
      module_or_fn.zero_grad(set_to_none=True)
    out = module_or_fn(x)
    out.backward(torch.ones_like(out))

  return run


def _record(results, name, shape, times):
  row = {'layer': name, 'shape': shape,
         'ms': {k: 1e3 * statistics.median(v) for k, v in times.items()},
         'times_s': times}
  results.append(row)
  print(f'{name:26s} {shape:28s} ' + '  '.join(
      f'{k} {v:8.1f}' for k, v in row['ms'].items()) + '  (ms, forward + backward)', flush=True)


def run_layers(warmup: int, repeats: int, use_torch: bool, quick: bool) -> list[dict[str, Any]]:
  """Times each 3-D layer formulation (forward + backward) against PyTorch's layer."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  torch = None
  if use_torch and importlib.util.find_spec('torch') is not None:
    import torch  # pylint: disable=import-outside-toplevel,redefined-outer-name
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  to_torch = lambda a: torch.from_numpy(np.moveaxis(np.asarray(a), -1, 1).copy())  # noqa: E731
  results = []
  for b, d, h, w, cin, cout in QUICK_CONV_LAYER_CASES if quick else CONV_LAYER_CASES:
    x, kernel = normal(b, d, h, w, cin), normal(3, 3, 3, cin, cout) * 0.1
    reference = unet_lib.conv_plain(x, kernel)
    runners = {}
    for name, fn in {**unet_lib.CONV3D_FORMULATIONS, **LAYER_CANDIDATES}.items():
      def conv(x, k, fn=fn):
        return fn(x, k)
      np.testing.assert_allclose(jax.jit(conv)(x, kernel), reference, rtol=1e-4, atol=1e-3)
      runners[name] = _jax_layer(conv, x, kernel)
    if torch is not None:
      runners['torch'] = _torch_layer(torch.nn.Conv3d(cin, cout, 3, padding=1, bias=False),
                                      to_torch(x))
    _record(results, f'conv 3x3x3 {cin}->{cout}', f'{b}x{d}x{h}x{w}',
            time_interleaved(runners, warmup, repeats))

  b, d, h, w = (1, 2, 4, 4) if quick else (2, 16, 48, 48)
  x, half = normal(b, d, h, w, 16), normal(b, 2 * d, 2 * h, 2 * w, 8)
  upsample = {'params': {'kernel': normal(2, 2, 2, 16, 8), 'bias': normal(8)}}
  layers = {
      'up-conv 2x2x2 16->8': (
          lambda v, x: unet_lib.Upsample2x(8).apply(v, x),
          lambda v, x: nn.ConvTranspose(8, (2, 2, 2), strides=(2, 2, 2)).apply(  # flips
              {'params': {'kernel': v['params']['kernel'][::-1, ::-1, ::-1],
                          'bias': v['params']['bias']}}, x),
          upsample, x, 'transposed_conv',
          lambda: torch.nn.ConvTranspose3d(16, 8, 2, stride=2)),
      'max-pool 2x2x2': (
          lambda v, x: unet_lib.max_pool_2x2(x),
          lambda v, x: nn.max_pool(x, (2, 2, 2), (2, 2, 2)), {}, half[..., :8],
          'reduce_window', lambda: (lambda t: torch.nn.functional.max_pool3d(t, 2))),
      'instance norm': (
          lambda v, x: unet_lib.InstanceNorm().apply(v, x),
          lambda v, x: nn.InstanceNorm(epsilon=unet_lib.NORM_EPSILON).apply(v, x),
          {'params': {'scale': normal(8), 'bias': normal(8)}}, half, 'flax',
          lambda: torch.nn.InstanceNorm3d(8, eps=unet_lib.NORM_EPSILON, affine=True)),
  }
  for name, (ours, standard, variables, x, standard_name, torch_layer) in layers.items():
    np.testing.assert_allclose(jax.jit(ours)(variables, x), jax.jit(standard)(variables, x),
                               rtol=1e-4, atol=1e-4)
    runners = {'model': _jax_layer(ours, variables, x),
               standard_name: _jax_layer(standard, variables, x)}
    if torch is not None:
      runners['torch'] = _torch_layer(torch_layer(), to_torch(x))
    _record(results, name, 'x'.join(str(s) for s in x.shape[:-1]) + f' C={x.shape[-1]}',
            time_interleaved(runners, warmup, repeats))
  return results


def run_cases(cases, warmup: int, repeats: int, skip_torch: bool, channels_last: bool,
              memory: bool = True) -> list[dict[str, Any]]:
  """Benchmarks each (model, kind, size, batch) case; prints one line per case (and, for 3-D
  cases with `memory`, one line of peak memory per sample)."""
  on_cpu = jax.default_backend() == 'cpu'
  compute_dtype = 'float32' if on_cpu else 'bfloat16'
  peak = None if on_cpu else peak_flops(jax.devices()[0])
  use_torch = not skip_torch
  if use_torch and not on_cpu:
    use_torch = False
    print('note: the PyTorch comparison runs on CPU only; skipped on this accelerator')
  if use_torch and importlib.util.find_spec('torch') is None:
    use_torch = False
    print('torch is not installed: skipping the PyTorch comparison '
          '(pip install torch==2.13.0 to enable it)')
  results = []
  for model_name, kind, size, batch in cases:
    base_cfg, source = model_config(model_name)
    model_cfg = dict(base_cfg, compute_dtype=compute_dtype)
    widths = unet_lib.level_widths(model_cfg['depth'], model_cfg['base_width'],
                                   model_cfg['width_multiplier'])
    three_d = model_cfg.get('spatial_dims', 2) == 3
    row: dict[str, Any] = {
        'model': model_name, 'model_source': source, 'kind': kind,
        'size': size if isinstance(size, int) else list(size), 'input_channels':
        input_channels(model_cfg),
        'batch': batch, 'depth': model_cfg['depth'], 'widths': list(widths),
        'norm': model_cfg['norm'], 'block': model_cfg['block'], 'compute_dtype': compute_dtype,
        **{k: model_cfg.get(k, v) for k, v in ORIGINAL_LAYOUT.items()},
    }
    if three_d:
      row['conv3d_formulation'] = {
          'first_layer': unet_lib.conv3d_formulation(in_channels=input_channels(model_cfg)),
          'other_layers': unet_lib.conv3d_formulation(in_channels=model_cfg['base_width'])}
    run_jax, compiled, variables = jax_runner(model_cfg, size, batch)
    runners = {'jax': run_jax}
    original_layout = all(row[k] == v for k, v in ORIGINAL_LAYOUT.items()
                          if k != 'spatial_dims')
    if use_torch and original_layout:  # the twin builds only the original layout
      torch_cfg = dict(model_cfg, compute_dtype='float32')
      runners['torch'] = torch_runner(torch_cfg, size, batch, channels_last, variables)
      row['same_weights_check'] = twin_difference(
          torch_cfg, size, batch, variables, runners['torch'].net, runners['torch'].image)
    times = time_interleaved(runners, warmup, repeats)
    step_s = statistics.median(times['jax'])
    row['jax'] = dict(compiled, step_s=step_s, times_s=times['jax'])
    unit = 'blocks' if three_d else 'slices'
    row[f'{unit}_per_s'] = batch / step_s
    row['achieved_flops_per_s'] = compiled['flops'] / step_s
    row['mfu'] = None if peak is None else row['achieved_flops_per_s'] / peak
    line = (f'{model_name:7s} {kind:5s} {size_name(size):>9s} B={batch:<3d} widths '
            f'{widths[0]}..{widths[-1]}  params {compiled["params"]:,}  '
            f'step {step_s * 1e3:9.1f} ms  '
            f'{row[f"{unit}_per_s"]:7.2f} {unit}/s  {compiled["flops"] / 1e9:8.2f} GFLOP/step  '
            f'{row["achieved_flops_per_s"] / 1e9:7.2f} GFLOP/s  '
            f'compile {compiled["compile_s"]:.0f} s')
    if row['mfu'] is not None:
      line += f'  MFU {100 * row["mfu"]:.1f}%'
    if 'torch' in times:
      torch_s = statistics.median(times['torch'])
      row['torch'] = {'step_s': torch_s, 'times_s': times['torch'],
                      'memory_format': 'channels_last' if channels_last else 'NCHW'}
      row['jax_over_torch'] = step_s / torch_s
      line += (f'  | torch {torch_s * 1e3:9.1f} ms  JAX/PyTorch {row["jax_over_torch"]:.2f}  '
               f'(same weights: max |logit difference| '
               f'{row["same_weights_check"]["max_abs_difference"]:.1e})')
    print(line, flush=True)
    if three_d and memory:
      frameworks = ('jax', 'torch') if 'torch' in runners else ('jax',)
      row['memory'] = measure_memory(model_name, spatial_shape(size), batch, frameworks)
      mib = lambda b: 'n/a' if b is None else f'{b / 2**20:,.1f} MiB'  # noqa: E731
      print('        peak memory per sample: ' + '  '.join(
          f'{name} +{mib(m["rss_added_bytes_per_sample"])} RSS'
          + (f' (XLA {mib(m["xla_peak_bytes_per_sample"])})' if m['xla_peak_bytes'] else '')
          for name, m in row['memory'].items()), flush=True)
    results.append(row)
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='tiny shapes, seconds')
  parser.add_argument('--out', default=str(REPO / 'benchmarks/results/train_step.json'))
  parser.add_argument('--warmup', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--no_torch', action='store_true', help='skip the PyTorch comparison')
  parser.add_argument('--torch_channels_last', action='store_true',
                      help="run PyTorch in channels-last memory format instead of its NCHW default")
  parser.add_argument('--only', default=None,
                      help='comma-separated model:size filters, e.g. lits:512,default:128,'
                      '3d_small:32x96x96')
  parser.add_argument('--no_memory', action='store_true',
                      help='skip the peak-memory probes of 3-D cases')
  parser.add_argument('--memory_probe', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--layers', action='store_true',
                      help='time each 3-D layer formulation alone (docs/3d_convolutions.md)')
  args = parser.parse_args(argv)
  if args.memory_probe:  # FRAMEWORK:MODE:MODEL:DxHxW:BATCH, in a fresh process
    framework, mode, name, size, batch = args.memory_probe.split(':')
    shape = tuple(int(s) for s in size.split('x'))
    print(json.dumps(memory_probe(framework, mode, name, shape, int(batch))))
    return 0

  cases = QUICK_CASES if args.quick else FULL_CASES
  if args.only:
    wanted = {tuple(item.split(':')) for item in args.only.split(',')}
    cases = [c for c in cases
             if (c[0], str(c[2])) in wanted or (c[0], size_name(c[2])) in wanted]
  warmup = args.warmup if args.warmup is not None else 1
  repeats = args.repeats if args.repeats is not None else 3

  details = machine_details()
  print('machine: ' + ', '.join(f'{k}={v}' for k, v in details.items()), flush=True)
  if details['load_average_start'][0] > 0.5 * (os.cpu_count() or 1):
    print(f'warning: load average {details["load_average_start"][0]:.1f} on '
          f'{os.cpu_count()} cores: other processes share this machine, timings are noisy')
  if args.layers:
    results = run_layers(warmup, args.repeats or 5, not args.no_torch, args.quick)
    details['load_average_end'] = os.getloadavg()
    print(f'load average {details["load_average_start"][0]:.1f} -> '
          f'{details["load_average_end"][0]:.1f}')
    out = pathlib.Path(args.out if args.out != parser.get_default('out') else
                       REPO / 'benchmarks/results/layers_3d.json')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'machine': details, 'warmup': warmup, 'repeats': args.repeats or 5,
                               'results': results}, indent=2))
    print(f'wrote {out}')
    return 0
  results = run_cases(cases, warmup, repeats, args.no_torch, args.torch_channels_last,
                      memory=not args.no_memory)
  details['load_average_end'] = os.getloadavg()
  ratios = [r['jax_over_torch'] for r in results if 'jax_over_torch' in r]
  summary = {}
  if ratios:
    total_jax = sum(r['jax']['step_s'] for r in results if 'jax_over_torch' in r)
    total_torch = sum(r['torch']['step_s'] for r in results if 'jax_over_torch' in r)
    summary = {'jax_over_torch_geomean': float(np.exp(np.mean(np.log(ratios)))),
               'jax_over_torch_total_time': total_jax / total_torch}
    print(f'JAX/PyTorch time ratio: geometric mean {summary["jax_over_torch_geomean"]:.2f}, '
          f'total time {summary["jax_over_torch_total_time"]:.2f} (goal on CPU: <= 0.9); '
          f'load average {details["load_average_start"][0]:.1f} -> '
          f'{details["load_average_end"][0]:.1f}')
  for r in results:
    if r['model'] == '3d_small' and 'jax_over_torch' in r:
      summary['3d_small_jax_over_torch'] = r['jax_over_torch']
      print(f'3-D small network: JAX/PyTorch train-step time {r["jax_over_torch"]:.2f} '
            f'(goal on CPU: <= {GOAL_3D_RATIO:.0f})')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'machine': details, 'warmup': warmup, 'repeats': repeats,
                             'results': results, 'summary': summary}, indent=2))
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
