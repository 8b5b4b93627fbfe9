"""The authors' 3-D setting (configs/lits_three_stage_3d.py): every regime passes the whole-config
check, its network is the one benchmarks/train_step.py times as '3d_authors', and it builds and
takes a train step with the config's own optimiser, loss and compute dtype (on a small block:
the 64 x 256 x 256 step is the benchmark's, about 20 s and 4 GB on CPU)."""

import importlib.util
import os

import jax
import numpy as np

from configs import common
from curriculum_seg import config_check, config_loading, optim, sharding
from curriculum_seg import train_step as ts
from curriculum_seg.models import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "lits_three_stage_3d.py")


def _benchmark():
  spec = importlib.util.spec_from_file_location(
      "train_step_benchmark", os.path.join(REPO, "benchmarks", "train_step.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_regime_of_the_authors_config_passes_the_whole_check():
  for regime in common.REGIME_NAMES:
    config = config_loading.load_config_file(f"{CONFIG}:{regime}")
    config_check.check_config(config, check_folders=False)
    assert config.model.spatial_dims == 3 and tuple(config.data.spacing_mm) == (1.0, 1.0, 1.0)


def test_the_benchmarked_network_is_the_configs_network():
  model = config_loading.load_config_file(CONFIG).model.to_dict()
  timed = _benchmark().MODELS_3D["3d_authors"]
  # The benchmark times float32 on CPU; the config computes in bfloat16 on accelerators.
  differing = {k for k in set(model) | set(timed) if model.get(k) != timed.get(k)}
  assert differing <= {"compute_dtype", "foreground_prior"}, differing


def test_the_authors_config_takes_a_train_step_on_a_small_block():
  config = config_loading.load_config_file(CONFIG)
  stage = config.stages[config.curriculum[0]]
  mesh = sharding.make_mesh(1)
  model = build_model(config.model, 1)
  tx, _ = optim.build_optimizer(stage.optimizer, stage.schedule, int(stage.steps))
  shape = (1, 16, 32, 32, 1)  # every spatial size a multiple of 2 ** depth
  state = ts.create_train_state(jax.random.key(0), model, tx, shape, mesh=mesh)
  step = ts.make_train_step(model, tx, config.loss, config.model.task, mesh)
  rng = np.random.default_rng(0)
  label = np.zeros(shape[:-1], np.int32)
  label[:, 4:12, 8:24, 8:24] = 1
  label[:, 6:10, 12:20, 12:20] = 2
  batch = dict(image=rng.normal(size=shape).astype(np.float32) + (label[..., None] == 2),
               label=label, mask=np.ones((1,), np.float32))
  before = jax.tree.map(np.array, state.params)
  state, metrics = step(state, sharding.host_to_global(batch, mesh), jax.random.key(1))
  assert float(metrics["finite"]) == 1.0 and np.isfinite(float(metrics["loss"]))
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before)
  assert any(jax.tree.leaves(moved)), "one step with the config's optimiser changes the weights"
