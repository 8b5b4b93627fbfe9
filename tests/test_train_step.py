"""The compiled train / eval / predict steps: learning, sharding invariance, safety, bf16."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from curriculum_seg import optim
from curriculum_seg import sharding
from curriculum_seg import train_step as ts
from curriculum_seg.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]


def model_config(**overrides):
  """A tiny U-Net config (depth 2, width 4) built like the experiment configs."""
  base = common.model(depth=2, base_width=4, group_norm_groups=2).to_dict()
  return ml_collections.ConfigDict({**base, **overrides})


def build_tx(lr=1e-2, steps=100, schedule=None, **overrides):
  opt = dict(name='adam', learning_rate=lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
             momentum=0.0, nesterov=False, grad_clip_norm=0.0)
  opt.update(overrides)
  sched = dict(name='constant', warmup_steps=0, end_factor=1.0, power=1.0)
  sched.update(schedule or {})
  return optim.build_optimizer(ml_collections.ConfigDict(opt), ml_collections.ConfigDict(sched),
                               steps)


def loss_config(name='dice'):
  return ml_collections.ConfigDict({'name': name, 'class_weights': None, 'dice_smooth': 1.0})


def make_batch(batch=4, size=32, seed=0):
  """Images with a bright tumour disc inside a liver disc; labels {0, 1, 2}."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  label = np.zeros((batch, size, size), np.int32)
  for b in range(batch):
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    radius = rng.uniform(0.08, 0.15) * size
    label[b][(yy - cy) ** 2 + (xx - cx) ** 2 < (2.5 * radius) ** 2] = 1
    label[b][(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = 2
  image = rng.normal(0.3, 0.05, (batch, size, size, 3)).astype(np.float32)
  image += 0.2 * (label[..., None] >= 1) + 0.3 * (label[..., None] == 2)
  return {'image': image, 'label': label, 'mask': np.ones((batch,), np.float32)}


# Hard predictions are argmaxes of float logits. Another program (another device count or batch
# shape) rounds the logits differently by a few ULPs, so a pixel whose two logits are within that
# of a tie may land in the other class: counts of such pixels may differ by one per flip.
FLIPS = 2  # flips allowed where the test cannot see the logits


def dice_flip_bound(flips, target_sum):
  """How far `flips` pixels moved to the other class can move a hard Dice 2I / (P + T): each
  changes P by 1 and I by at most 1, so by at most 3 / (T - flips) (1 when T <= flips)."""
  return 3.0 * flips / (target_sum - flips) if target_sum > flips else 1.0


def setup(cfg=None, lr=1e-2, loss='dice', mesh=None, size=32, shape=None, **opt):
  cfg = cfg or model_config()
  mesh = mesh or sharding.make_mesh(1)
  shape = shape or (1, size, size, 3)
  model = build_model(cfg, shape[-1])
  tx, schedule = build_tx(lr, **opt)
  state = ts.create_train_state(jax.random.key(0), model, tx, shape, mesh=mesh)
  step = ts.make_train_step(model, tx, loss_config(loss), cfg.task, mesh)
  return model, tx, schedule, state, step, mesh


def host_copy(tree):
  return jax.tree.map(np.array, tree)


# Compiling is most of the cost of these tests: the configurations below are compiled once per
# module, each test gets a fresh copy of the initial state (the train step donates it), and all
# but the overfitting test use depth 1, which compiles in half the time.
CONFIGS = {
    'adam': dict(cfg=dict(), lr=2e-2, loss='dice'),
    'sgd': dict(cfg=dict(depth=1), lr=0.1, loss='dice_ce', name='sgd', momentum=0.9, nesterov=True,
                grad_clip_norm=1.0, schedule=dict(name='cosine', warmup_steps=2, end_factor=0.0),
                steps=10),
    'bf16': dict(cfg=dict(depth=1, compute_dtype='bfloat16'), lr=2e-2, loss='dice'),
}
_COMPILED = {}


def compiled(name):
  """(model, schedule, fresh initial state, train step, eval step, mesh) for CONFIGS[name]."""
  if name not in _COMPILED:
    spec = dict(CONFIGS[name])
    cfg = model_config(**spec.pop('cfg'))
    lr, loss = spec.pop('lr'), spec.pop('loss')
    model, tx, schedule, state, step, mesh = setup(cfg, lr=lr, loss=loss, **spec)
    evaluate = ts.make_eval_step(model, cfg.task, mesh, loss_cfg=loss_config(loss))
    _COMPILED[name] = (model, schedule, host_copy(state), step, evaluate, mesh)
  model, schedule, initial, step, evaluate, mesh = _COMPILED[name]
  state = jax.device_put(initial, sharding.replicated(mesh))
  return model, schedule, state, step, evaluate, mesh


def test_tiny_model_overfits_one_batch():
  _, _, state, step, evaluate, mesh = compiled('adam')
  batch = sharding.host_to_global(make_batch(), mesh)
  rng = jax.random.key(1)
  for _ in range(80):
    state, metrics = step(state, batch, rng)
  sums = evaluate(state, batch)
  dice = float(ts.dice_from_sums(sums['intersection'], sums['pred_sum'], sums['target_sum']))
  assert float(metrics['dice']) > 0.9
  assert dice > 0.9
  assert int(state.step) == 80 and int(state.skipped) == 0


@pytest.mark.slow
def test_eight_devices_give_the_same_trajectory_as_one():
  # Batch norm (statistics over the global batch) and dropout (random bits independent of the
  # sharding) are the parts most likely to differ across device counts. SGD with momentum keeps
  # the comparison tight: Adam turns float noise in near-zero gradients into full-size steps.
  out = subprocess.run(
      [sys.executable, '-c', textwrap.dedent("""
          import json, sys
          sys.path.insert(0, 'tests')
          import jax, numpy as np
          import test_train_step as t
          from curriculum_seg import sharding, train_step as ts
          cfg = t.model_config(norm='batch', dropout=0.2, depth=1)  # depth 1 compiles faster
          model = t.build_model(cfg, 3)
          tx, _ = t.build_tx(0.05, name='sgd', momentum=0.9, nesterov=True)
          initial = t.host_copy(
              ts.create_train_state(jax.random.key(0), model, tx, (1, 32, 32, 3)))
          runs = {}
          for n in (8, 1):
            mesh = sharding.make_mesh(n)
            state = jax.device_put(initial, sharding.replicated(mesh))
            step = ts.make_train_step(model, tx, t.loss_config('dice_ce'), 'tumour', mesh)
            batch = sharding.host_to_global(t.make_batch(batch=8), mesh)
            history = []
            for _ in range(5):
              state, m = step(state, batch, jax.random.key(3))
              history.append([float(m[k]) for k in ('loss', 'dice', 'grad_norm')])
            sums = ts.make_eval_step(model, 'tumour', mesh)(state, batch)
            runs[n] = {'history': history,
                       'eval': {k: float(v) for k, v in sums.items()},
                       'params': [np.asarray(x).ravel().tolist()
                                  for x in jax.tree.leaves(state.params)],
                       'stats': [np.asarray(x).ravel().tolist()
                                 for x in jax.tree.leaves(state.batch_stats)]}
          print(json.dumps(runs))
      """)],
      env=dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu'), cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  runs = json.loads(out.stdout.strip().splitlines()[-1])
  eight, one = runs['8'], runs['1']
  history = np.array(one['history'])
  assert history[-1, 0] < history[0, 0]  # it trains
  eight_history = np.array(eight['history'])
  # Floats: the 8-device step sums partial results in another order; that noise grows over the
  # steps (measured: 4e-7 relative on the loss, 5e-7 absolute on the parameters).
  np.testing.assert_allclose(eight_history[:, (0, 2)], history[:, (0, 2)], rtol=1e-5)
  for a, b in zip(eight['params'] + eight['stats'], one['params'] + one['stats']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Hard Dice and pixel counts: up to FLIPS pixels on a tie may flip.
  tumour = make_batch(batch=8)['label'] == 2  # the batch both runs trained and evaluated on
  np.testing.assert_allclose(eight_history[:, 1], history[:, 1], rtol=0,
                             atol=dice_flip_bound(FLIPS, tumour.sum()))
  want, got = one['eval'], eight['eval']
  assert set(got) == set(want)
  assert got['count'] == want['count'] == 8 and got['target_sum'] == want['target_sum']
  for key in ('intersection', 'pred_sum'):
    assert abs(got[key] - want[key]) <= FLIPS, key
  assert got['dice_sum'] == pytest.approx(want['dice_sum'], rel=1e-5,
                                          abs=dice_flip_bound(FLIPS, tumour.sum(axis=(1, 2)).min()))
  assert got['loss_sum'] == pytest.approx(want['loss_sum'], rel=1e-5)


def test_non_finite_loss_is_reported_and_not_applied():
  _, _, state, step, _, mesh = compiled('adam')
  good = sharding.host_to_global(make_batch(), mesh)
  state, _ = step(state, good, jax.random.key(0))
  before = host_copy(state)  # the step donates its input state
  bad_host = make_batch()
  bad_host['image'][0, 3, 3, 0] = np.nan
  state, metrics = step(state, sharding.host_to_global(bad_host, mesh), jax.random.key(0))
  assert float(metrics['finite']) == 0.0
  assert not np.isfinite(float(metrics['loss']))
  jax.tree.map(np.testing.assert_array_equal, host_copy(state.params), before.params)
  jax.tree.map(np.testing.assert_array_equal, host_copy(state.opt_state), before.opt_state)
  assert int(state.step) == int(before.step) + 1
  assert int(state.skipped) == 1
  state, metrics = step(state, good, jax.random.key(0))
  assert float(metrics['finite']) == 1.0 and int(state.skipped) == 1


def test_bfloat16_compute_trains_with_float32_params():
  _, _, state, step, _, mesh = compiled('bf16')
  batch = sharding.host_to_global(make_batch(), mesh)
  losses = []
  for _ in range(25):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
    assert float(metrics['finite']) == 1.0
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  assert metrics['loss'].dtype == jnp.float32
  assert losses[-1] < 0.8 * losses[0]


def test_padded_examples_count_for_nothing():
  real = make_batch(batch=4)
  padded = make_batch(batch=8, seed=5)
  for key in real:
    padded[key][:4] = real[key]
  padded['mask'][4:] = 0.0
  padded['image'][4:] = np.nan  # garbage that would poison loss and gradients if counted
  results = []
  for host in (real, padded):
    # SGD: Adam would turn float noise in near-zero gradients into visible parameter changes.
    _, _, state, step, _, mesh = compiled('sgd')
    for _ in range(3):  # the first step has learning rate 0 (warm-up)
      state, metrics = step(state, sharding.host_to_global(host, mesh), jax.random.key(0))
    results.append((host_copy(metrics), host_copy(state.params)))
  (m_real, p_real), (m_pad, p_pad) = results
  assert m_pad['finite'] == 1.0
  # Batches of 4 and 8 are two programs: floats to a few ULPs, the hard Dice to FLIPS pixels.
  for key in ('loss', 'grad_norm'):
    assert m_pad[key] == pytest.approx(m_real[key], rel=1e-5), key
  tumour = (real['label'] == 2).sum()
  assert m_pad['dice'] == pytest.approx(m_real['dice'], rel=1e-5,
                                        abs=dice_flip_bound(FLIPS, tumour))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p_pad, p_real)


def test_eval_sums_give_the_exact_global_dice_over_any_batching():
  model, _, state, step, evaluate, mesh = compiled('sgd')
  host = make_batch(batch=8)
  for _ in range(3):
    state, _ = step(state, sharding.host_to_global(host, mesh), jax.random.key(0))
  whole = {k: float(v) for k, v in evaluate(state, sharding.host_to_global(host, mesh)).items()}
  halves = [evaluate(state, sharding.host_to_global({k: v[i:i + 4] for k, v in host.items()},
                                                    mesh)) for i in (0, 4)]
  summed = {k: sum(float(h[k]) for h in halves) for k in whole}
  # The predicted probabilities, counted in numpy. The eval steps (batches of 8 and 4) and the
  # predict step are three programs: a pixel whose two class probabilities are under 1e-4 apart
  # (a tie up to float noise, with a wide margin) may be counted in either class; every other
  # pixel is counted exactly alike.
  probs = np.asarray(ts.make_predict_step(model, mesh)(state, jnp.asarray(host['image'])))
  pred = probs.argmax(-1) == 1
  target = host['label'] == 2
  ties = int(np.sum(np.abs(probs[..., 1] - probs[..., 0]) < 1e-4))
  dice_atol = dice_flip_bound(ties, target.sum(axis=(1, 2)).min()) if ties else 0.0
  counts = dict(intersection=np.sum(pred & target), pred_sum=np.sum(pred),
                target_sum=np.sum(target), count=8)
  per_example = [2 * np.sum(p & t) / (np.sum(p) + np.sum(t)) for p, t in zip(pred, target)]
  assert whole['intersection'] > 0
  for sums in (whole, summed):
    for key, value in counts.items():
      assert abs(sums[key] - value) <= (ties if key in ('intersection', 'pred_sum') else 0), key
    assert sums['dice_sum'] == pytest.approx(sum(per_example), rel=1e-5, abs=dice_atol)
  assert whole['loss_sum'] == pytest.approx(summed['loss_sum'], rel=1e-5)


def test_predict_returns_probabilities_on_another_size():
  model, _, state, _, _, mesh = compiled('adam')
  images = jnp.asarray(make_batch(batch=2, size=64)['image'])  # trained on 32x32
  probs = ts.make_predict_step(model, mesh)(state, images)
  assert probs.shape == (2, 64, 64, 2) and probs.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_metrics_report_the_scheduled_learning_rate_and_state_is_plain_arrays():
  _, schedule, state, step, _, mesh = compiled('sgd')
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert state.batch_stats == {}  # instance norm keeps no running statistics
  batch = sharding.host_to_global(make_batch(), mesh)
  for i in range(4):
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics['lr']) == pytest.approx(float(schedule(i)), abs=1e-7)
    assert float(metrics['grad_norm']) > 0
  assert float(metrics['lr']) > 0
  assert int(state.step) == 4


@pytest.mark.slow
def test_benchmark_quick_run_writes_its_figures(tmp_path):
  out = tmp_path / 'train_step.json'
  result = subprocess.run(
      [sys.executable, str(REPO / 'benchmarks' / 'train_step.py'), '--quick', '--repeats', '1',
       '--out', str(out)], capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(out.read_text())
  assert report['machine']['jax'] == jax.__version__ and report['machine']['cpu_cores'] >= 1
  row = report['results'][0]
  assert row['jax']['step_s'] > 0 and row['jax']['flops'] > 0
  assert row['achieved_flops_per_s'] > 0 and row['slices_per_s'] > 0
  assert 'slices/s' in result.stdout and 'GFLOP/step' in result.stdout
  # The 3-D case: timed, counted, and its peak memory measured in fresh processes.
  row_3d = report['results'][1]
  assert row_3d['spatial_dims'] == 3 and row_3d['size'] == [8, 16, 16]
  assert row_3d['blocks_per_s'] > 0 and row_3d['jax']['flops'] > 0
  assert row_3d['conv3d_formulation'] == {'first_layer': 'stacked_taps',
                                          'other_layers': 'output_shift'}
  for mode in ('forward', 'train'):
    memory = row_3d['memory'][f'jax_{mode}']
    assert memory['rss_added_bytes'] > 0 and memory['xla_peak_bytes'] > 0, mode
  assert 'blocks/s' in result.stdout and 'peak memory per sample' in result.stdout


def test_benchmark_knows_accelerator_peaks_for_mfu():
  spec = importlib.util.spec_from_file_location('benchmark_train_step',
                                                REPO / 'benchmarks' / 'train_step.py')
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  device = lambda kind: types.SimpleNamespace(device_kind=kind)  # noqa: E731
  assert bench.peak_flops(device('NVIDIA H200')) == 989e12
  assert bench.peak_flops(device('TPU v5 lite')) == 197e12
  assert bench.peak_flops(device('cpu')) is None


# 3-D batches: image [B, D, H, W, C], label [B, D, H, W], mask [B].

def model_config_3d(**overrides):
  """A tiny 3-D U-Net (depth 1, width 4; one input channel)."""
  return model_config(spatial_dims=3, depth=1, **overrides)


def make_batch_3d(batch=4, shape=(8, 16, 16), seed=0):
  """Volumes with a bright tumour ball inside a liver ball; labels {0, 1, 2}."""
  rng = np.random.default_rng(seed)
  zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
  label = np.zeros((batch,) + shape, np.int32)
  for b in range(batch):
    cz, cy, cx = rng.uniform(0.35, 0.65, 3) * np.array(shape)
    radius = rng.uniform(0.15, 0.25) * shape[0]
    distance = (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2
    label[b][distance < (2.0 * radius) ** 2] = 1
    label[b][distance < radius ** 2] = 2
  image = rng.normal(0.3, 0.05, label.shape + (1,)).astype(np.float32)
  image += 0.2 * (label[..., None] >= 1) + 0.3 * (label[..., None] == 2)
  return {'image': image, 'label': label, 'mask': np.ones((batch,), np.float32)}


@pytest.mark.slow
def test_3d_steps_on_eight_devices_match_one_device():
  # As the 2-D test: batch norm and dropout are the parts most likely to differ.
  out = subprocess.run(
      [sys.executable, '-c', textwrap.dedent("""
          import json, sys
          sys.path.insert(0, 'tests')
          import jax, numpy as np
          import test_train_step as t
          from curriculum_seg import sharding, train_step as ts
          cfg = t.model_config_3d(norm='batch', dropout=0.2)
          model = t.build_model(cfg, 1)
          tx, _ = t.build_tx(0.05, name='sgd', momentum=0.9, nesterov=True)
          initial = t.host_copy(
              ts.create_train_state(jax.random.key(0), model, tx, (1, 8, 16, 16, 1)))
          runs = {}
          for n in (8, 1):
            mesh = sharding.make_mesh(n)
            state = jax.device_put(initial, sharding.replicated(mesh))
            step = ts.make_train_step(model, tx, t.loss_config('dice_ce'), 'tumour', mesh)
            batch = sharding.host_to_global(t.make_batch_3d(batch=8), mesh)
            assert batch['image'].sharding.spec[0] == 'data'
            history = []
            for _ in range(4):
              state, m = step(state, batch, jax.random.key(3))
              history.append([float(m[k]) for k in ('loss', 'dice', 'grad_norm')])
            sums = ts.make_eval_step(model, 'tumour', mesh)(state, batch)
            probs = ts.make_predict_step(model, mesh)(state, batch['image'])
            runs[n] = {'history': history,
                       'eval': {k: float(v) for k, v in sums.items()},
                       'probs_shape': list(probs.shape),
                       'params': [np.asarray(x).ravel().tolist()
                                  for x in jax.tree.leaves(state.params)],
                       'stats': [np.asarray(x).ravel().tolist()
                                 for x in jax.tree.leaves(state.batch_stats)]}
          print(json.dumps(runs))
      """)],
      env=dict(os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu'), cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  runs = json.loads(out.stdout.strip().splitlines()[-1])
  eight, one = runs['8'], runs['1']
  history = np.array(one['history'])
  assert history[-1, 0] < history[0, 0]  # it trains
  assert eight['probs_shape'] == one['probs_shape'] == [8, 8, 16, 16, 2]
  eight_history = np.array(eight['history'])
  np.testing.assert_allclose(eight_history[:, (0, 2)], history[:, (0, 2)], rtol=1e-5)
  for a, b in zip(eight['params'] + eight['stats'], one['params'] + one['stats']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  tumour = make_batch_3d(batch=8)['label'] == 2
  np.testing.assert_allclose(eight_history[:, 1], history[:, 1], rtol=0,
                             atol=dice_flip_bound(FLIPS, tumour.sum()))
  want, got = one['eval'], eight['eval']
  assert set(got) == set(want)
  assert got['count'] == want['count'] == 8
  assert got['target_sum'] == want['target_sum'] == tumour.sum()
  for key in ('intersection', 'pred_sum'):
    assert abs(got[key] - want[key]) <= FLIPS, key
  assert got['dice_sum'] == pytest.approx(
      want['dice_sum'], rel=1e-5, abs=dice_flip_bound(FLIPS, tumour.sum(axis=(1, 2, 3)).min()))
  assert got['loss_sum'] == pytest.approx(want['loss_sum'], rel=1e-5)


_COMPILED_3D = {}


def compiled_3d():
  """(model, initial host state, train step, eval step, predict step, mesh) of the tiny 3-D net."""
  if not _COMPILED_3D:
    model, _, _, state, step, mesh = setup(model_config_3d(), lr=2e-2, shape=(1, 8, 16, 16, 1))
    _COMPILED_3D['v'] = (model, host_copy(state), step, ts.make_eval_step(model, 'tumour', mesh),
                         mesh)
  model, initial, step, evaluate, mesh = _COMPILED_3D['v']
  return model, jax.device_put(initial, sharding.replicated(mesh)), step, evaluate, mesh


def test_3d_train_step_learns_and_eval_counts_voxels_over_all_spatial_axes():
  model, state, step, evaluate, mesh = compiled_3d()
  host = make_batch_3d()
  batch = sharding.host_to_global(host, mesh)
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.8 * losses[0] and float(metrics['finite']) == 1.0
  sums = {k: float(v) for k, v in evaluate(state, batch).items()}
  probs = np.asarray(ts.make_predict_step(model, mesh)(state, batch['image']))
  assert probs.shape == (4, 8, 16, 16, 2)
  pred, target = probs.argmax(-1) == 1, host['label'] == 2
  ties = int(np.sum(np.abs(probs[..., 1] - probs[..., 0]) < 1e-4))
  assert sums['target_sum'] == target.sum() and sums['count'] == 4
  assert abs(sums['intersection'] - np.sum(pred & target)) <= ties
  assert abs(sums['pred_sum'] - np.sum(pred)) <= ties
  per_example = [2 * np.sum(p & t) / (np.sum(p) + np.sum(t)) for p, t in zip(pred, target)]
  assert sums['dice_sum'] == pytest.approx(
      sum(per_example), rel=1e-5,
      abs=dice_flip_bound(ties, target.sum(axis=(1, 2, 3)).min()) if ties else 0.0)
  # A padded example (mask 0, NaN image) counts for nothing in 3-D too.
  padded = {k: np.concatenate([v, v[:1]]) for k, v in host.items()}
  padded['mask'][-1], padded['image'][-1] = 0.0, np.nan
  padded_sums = evaluate(state, sharding.host_to_global(padded, mesh))
  assert float(padded_sums['count']) == 4.0
  assert float(padded_sums['loss_sum']) == pytest.approx(sums['loss_sum'], rel=1e-5)


def test_flip_axes_are_the_in_plane_mirrorings_and_optionally_depth():
  assert ts.flip_axes(2) == ((), (1,), (2,), (1, 2))
  assert ts.flip_axes(3) == ((), (2,), (3,), (2, 3))
  assert ts.flip_axes(3, flip_depth=True) == (
      (), (2,), (3,), (2, 3), (1,), (1, 2), (1, 3), (1, 2, 3))


@pytest.mark.parametrize('flip_depth', [False, True])
def test_3d_flip_tta_averages_the_mirrored_predictions(flip_depth):
  model, state, step, _, mesh = compiled_3d()
  state, _ = step(state, sharding.host_to_global(make_batch_3d(), mesh), jax.random.key(0))
  images = jnp.asarray(make_batch_3d(batch=2, seed=3)['image'])
  plain = ts.make_predict_step(model, mesh)
  mirrorings = ts.flip_axes(3, flip_depth)
  want = sum(np.flip(np.asarray(plain(state, jnp.flip(images, axes))), axes)
             for axes in mirrorings) / len(mirrorings)
  got = ts.make_predict_step(model, mesh, flip_tta=True, flip_depth=flip_depth)(state, images)
  assert got.shape == (2, 8, 16, 16, 2)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The model is not mirror-symmetric, so which flips are averaged matters.
  other = ts.make_predict_step(model, mesh, flip_tta=True, flip_depth=not flip_depth)
  assert not np.allclose(other(state, images), got, atol=1e-5)
