"""The stage controller: a tiny three-stage run, hand-over between stages, exact resume after
kill -9 at several points, SIGTERM, a refused concurrent run, refused config changes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import optax
import pytest
from etils import epath

from curriculum_seg import checkpoints, config_loading, rundir, stages

pytestmark = pytest.mark.slow  # trains runs in its fixtures

# A training subprocess that can kill itself (SIGKILL) at an exact point, `mode:stage:step`:
#   batch:<stage>:<n>       when the stage's n-th batch is requested (mid-stage, between saves)
#   and at each write boundary of one checkpoint save of <stage> (StageCheckpoints' protocol:
#   best, then latest, then drop superseded bests); <step> '*' is the step of the stage's first
#   best save in this process:
#   best_writing            inside the best's Orbax save, before its atomic rename
#   best_written            the best is complete, the latest (the commit) is not
#   latest_writing          inside the latest's save, before its rename
#   latest_written          the latest is complete, superseded bests are not yet dropped
#   dropped                 superseded bests are in .trash/, not yet removed
_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from curriculum_seg import checkpoints, config_loading, device_feed, stages
    workdir, overrides, kill = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    config = config_loading.apply_overrides(
        config_loading.load_config_file("configs/synthetic.py"), overrides.items())
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    mode, stage_name, number = (kill.split(":") + ["", "", ""])[:3] if kill else ("", "", "0")
    current, first_best = {}, {}
    def at(which_step):
      if number == "*":
        return first_best.get(stage_name) == which_step
      return str(which_step) == number
    C = checkpoints.StageCheckpoints
    original_write, original_drop = C._write, C._drop_bests_except
    def write(self, which, step, state, meta):
      current.update(stage=self.stage, which=which, step=step)
      if which == "best":
        first_best.setdefault(self.stage, step)
      original_write(self, which, step, state, meta)
      if self.stage == stage_name and mode == which + "_written" and at(step):
        die()
    def drop(self, keep):
      original_drop(self, keep)
      if (mode == "dropped" and current.get("which") == "latest" and self.stage == stage_name
          and at(current["step"])):
        die()
    C._write, C._drop_bests_except = write, drop
    from orbax.checkpoint._src.path import atomicity
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
      if (current.get("stage") == stage_name and mode == current["which"] + "_writing"
          and at(current["step"])):
        die()
      return await original_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    if mode == "batch":
      running, count = {}, {}
      original_run_stage = stages.Controller._run_stage
      def run_stage(self, index, name, *args, **kwargs):
        running["stage"] = name
        return original_run_stage(self, index, name, *args, **kwargs)
      stages.Controller._run_stage = run_stage
      original_next = device_feed.DeviceFeed.__next__
      def next_batch(self):
        name = running["stage"]
        count[name] = count.get(name, 0) + 1
        if name == stage_name and count[name] == int(number):
          die()
        return original_next(self)
      device_feed.DeviceFeed.__next__ = next_batch
    stages.train(config, workdir, log=lambda m: print(m, flush=True))
    print("FINISHED", flush=True)
""")


def run_training(workdir, overrides, kill="", timeout=600):
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "-c", _SCRIPT, str(workdir), json.dumps(overrides),
                         kill], capture_output=True, text=True, timeout=timeout, env=env)


def final_params(workdir, config):
  """whole2's completed checkpoint, as numpy arrays."""
  store = checkpoints.StageCheckpoints(epath.Path(workdir) / "checkpoints", "whole2",
                                       read_only=True)
  controller = stages.Controller(config, workdir, log=lambda s: None)
  stage = config.stages.whole2
  state, meta = store.restore(controller._abstract_state(stage, controller._tx(stage)))
  assert meta["completed"] and meta["step"] == stage.steps
  return jax.tree.map(np.asarray, jax.device_get(state))


def losses(workdir):
  rows = rundir.MetricsLog(epath.Path(workdir)).read()
  return [(r["stage"], r["step"], r.get("loss"), r.get("val_dice")) for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_overrides, tiny_config):
  """An uninterrupted tiny three-stage run."""
  root = tmp_path_factory.mktemp("stages")
  overrides = tiny_overrides(root)
  result = run_training(root / "uninterrupted", overrides)
  assert result.returncode == 0 and "FINISHED" in result.stdout, result.stderr[-3000:]
  config = tiny_config(root)
  return root, overrides, config, final_params(root / "uninterrupted", config), losses(
      root / "uninterrupted"), result.stdout


def test_three_stage_run_hands_over_the_chosen_checkpoints(reference):
  root, _, config, params, rows, stdout = reference
  workdir = root / "uninterrupted"
  steps = config.stages.patch.steps
  assert "[patch] starts from whole1's best checkpoint" in stdout
  assert f"[whole2] starts from patch's latest checkpoint (step {steps})" in stdout, \
      "whole2 retrains the patch stage's last weights (configs/common.py:set_regime)"
  summary = json.loads((workdir / "summary.json").read_text())
  assert [s["name"] for s in summary["stages"]] == ["whole1", "patch", "whole2"]
  assert {r[0] for r in rows} == {"whole1", "patch", "whole2"}
  assert [r[1] for r in rows if r[0] == "patch" and r[2] is not None] == list(range(1, steps + 1))
  evaluated = [(r[0], r[1]) for r in rows if r[3] is not None]
  assert evaluated == [("whole1", 3), ("whole1", 6), ("patch", 0), ("patch", 3), ("patch", 6),
                       ("whole2", 0), ("whole2", 3), ("whole2", 6)], \
      "at steps 3 and 6, and at step 0 of the stages that start from a checkpoint"
  assert json.loads((workdir / "config.json").read_text())["stages"]["patch"]["steps"] == steps
  assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))
  for name in ("whole1", "patch", "whole2"):
    store = checkpoints.StageCheckpoints(workdir / "checkpoints", name, read_only=True)
    assert store.meta()["completed"] and store.steps() == [3, 6]
    assert store.meta("best")["step"] in ((3, 6) if name == "whole1" else (0, 3, 6))


def test_next_stage_starts_from_exactly_the_chosen_checkpoint(reference, tmp_path):
  root, _, config, _, _, _ = reference
  source = root / "uninterrupted"
  controller = stages.Controller(config, source, log=lambda s: None)
  whole1 = checkpoints.StageCheckpoints(source / "checkpoints", "whole1", read_only=True)
  stage1 = config.stages.whole1
  best, meta = whole1.restore(controller._abstract_state(stage1, controller._tx(stage1)), "best")
  patch = config.stages.patch
  previous = (whole1, stages.StageResult("whole1", stage1.steps, meta["best_score"], meta["step"],
                                         "best"), controller._tx(stage1))
  fresh, scores = controller._initial_state(1, "patch", patch, controller._tx(patch), previous)
  for a, b in zip(jax.tree.leaves(best.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(fresh.step) == 0
  # The starting weights' scores are those whole1 recorded for them (same validation).
  assert scores["val_dice"] == meta["val_dice"] == meta["best_score"]
  moments = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.opt_state)  # noqa: E731
                       if np.asarray(x).ndim > 0]
  assert all(not m.any() for m in moments(fresh)), "optimiser state reset by default"
  carry = config_loading.apply_overrides(config, [("stages.patch.carry_optimizer", "true")])
  carried, _ = controller._initial_state(1, "patch", carry.stages.patch,
                                         controller._tx(patch), previous)
  for a, b in zip(moments(best), moments(carried)):
    np.testing.assert_array_equal(a, b)
  # The moments are carried, the schedule starts again: the stage's own learning-rate schedule
  # runs from its step 0 (not from where the previous stage's left off).
  def nodes(state, kind):
    return [n for n in jax.tree.leaves(state.opt_state, is_leaf=lambda n: isinstance(n, kind))
            if isinstance(n, kind)]

  def schedule_counts(state):  # an injected schedule's position (count, hyperparams_states)
    return [int(c) for n in nodes(state, stages._INJECTED)  # pylint: disable=protected-access
            for c in jax.tree.leaves((n.count, getattr(n, "hyperparams_states", ())))]
  assert schedule_counts(best) and min(schedule_counts(best)) > 0
  assert schedule_counts(carried) == [0] * len(schedule_counts(best)), "the schedule restarts"
  adam = [int(n.count) for n in nodes(best, optax.ScaleByAdamState)]
  assert adam and adam[0] > 0, "Adam's bias correction goes on with its moments"
  assert [int(n.count) for n in nodes(carried, optax.ScaleByAdamState)] == adam
  last = config_loading.apply_overrides(config, [("stages.patch.init", "last")])
  from_last, _ = controller._initial_state(1, "patch", last.stages.patch,
                                           controller._tx(patch), previous)
  latest, _ = whole1.restore(controller._abstract_state(stage1, controller._tx(stage1)))
  for a, b in zip(jax.tree.leaves(latest.params), jax.tree.leaves(from_last.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_stage_that_never_improves_hands_on_the_weights_it_started_from(reference, tmp_path):
  """whole2 at learning rate 0 never beats its start (ties keep the earlier checkpoint), so its
  step-0 evaluation stays its best, and the run hands out the patch stage's chosen weights."""
  from curriculum_seg import inference, inspect  # pylint: disable=g-import-not-at-top
  root, overrides, _, _, _, _ = reference
  flat = dict(overrides, **{"curriculum": "('patch', 'whole2')", "stages.patch.steps": "3",
                            "stages.whole2.steps": "3",
                            "stages.whole2.optimizer.learning_rate": "0.0"})
  config = config_loading.apply_overrides(config_loading.load_config_file(
      "configs/synthetic.py"), flat.items())
  workdir = tmp_path / "run"
  results = stages.train(config, workdir, log=lambda s: None)
  assert [r.best_step for r in results] == [3, 0]
  rows = rundir.MetricsLog(epath.Path(workdir)).read()
  start = [r for r in rows if r["stage"] == "whole2" and r["step"] == 0]
  assert len(start) == 1 and start[0]["global_step"] == 3
  assert start[0]["val_dice"] == results[0].best_score, "the same weights, the same score"
  assert all("elapsed_s" in r for r in rows)
  assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
  assert inference.chosen_checkpoint(workdir, config) == ("whole2", "best", 0)
  run = inspect.load_run(workdir)
  info = {s.name: s for s in run.stages}
  assert info["whole2"].best_step == 0 and info["patch"].start_val_dice is None
  assert info["whole2"].start_val_dice == results[0].best_score
  handed_out = run.params()
  patch = checkpoints.StageCheckpoints(workdir / "checkpoints", "patch", read_only=True)
  patch_best = run.params(stage="patch", which="best", step=patch.steps("best")[0])
  for a, b in zip(jax.tree.leaves(handed_out), jax.tree.leaves(patch_best)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # a restore is a copy


def _assert_checkpoints_agree(workdir, context):
  """Every stage's newest latest checkpoint names a best that a reader can restore."""
  root = epath.Path(workdir) / "checkpoints"
  for name in checkpoints.stage_names_on_disk(root):
    store = checkpoints.StageCheckpoints(root, name, read_only=True)
    meta = store.meta()
    if meta is not None and meta.get("best_step") is not None:
      assert store.steps("best") == [meta["best_step"]], (context, name)
      assert store.meta("best")["best_score"] == meta["best_score"], (context, name)
    store.close()


def _assert_same_end(workdir, config, params, rows, context):
  got = final_params(workdir, config)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=context)  # bitwise: same devices and steps
  assert losses(workdir) == rows, context


# Kills in sequence, each resumed by the next run: mid-stage, then every write boundary of a
# save (the first best save of 'patch' and 'whole2' is their step-0 evaluation's).
BOUNDARY_KILLS = ["batch:whole1:2", "best_written:patch:*", "latest_written:patch:3",
                  "best_writing:whole2:*", "latest_writing:whole2:3", "dropped:whole2:6"]


def test_kill_9_at_every_save_boundary_then_resume_ends_equal_to_an_uninterrupted_run(
    reference, tmp_path):
  root, overrides, config, params, rows, _ = reference
  workdir = tmp_path / "run"
  for kill in BOUNDARY_KILLS:
    killed = run_training(workdir, overrides, kill=kill)
    assert killed.returncode == -signal.SIGKILL, (kill, killed.stderr[-2000:])
    _assert_checkpoints_agree(workdir, kill)
  resumed = run_training(workdir, overrides)
  assert resumed.returncode == 0 and "FINISHED" in resumed.stdout, resumed.stderr[-3000:]
  assert "resuming" in resumed.stdout
  _assert_same_end(workdir, config, params, rows, "boundary kills")


def test_kill_9_at_random_instants_then_resume_ends_equal_to_an_uninterrupted_run(
    reference, tmp_path):
  """SIGKILL at random instants (seeded; CURRICULUM_SEG_KILL_SEED repeats a failure) of a run
  that checkpoints every step, so kills land inside saves as often as between them."""
  root, overrides, config, params, rows, _ = reference
  kills = int(os.environ.get("CURRICULUM_SEG_KILLS", "4"))
  seed = int(os.environ.get("CURRICULUM_SEG_KILL_SEED", str(time.time_ns() % 2**31)))
  rng = np.random.default_rng(seed)
  dense = dict(overrides, **{f"stages.{n}.checkpoint_every": "1"
                            for n in ("whole1", "patch", "whole2")})
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="2")
  args = [sys.executable, "-c", _SCRIPT, str(workdir), json.dumps(dense), ""]
  landed = []
  for k in range(kills):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
      # Kill once training is under way: after the first logged row of this attempt's start.
      start_rows = len(rundir.MetricsLog(epath.Path(workdir)).read()) if workdir.exists() else 0
      deadline = time.time() + 300
      while proc.poll() is None and time.time() < deadline:
        if workdir.exists() and len(rundir.MetricsLog(epath.Path(workdir)).read()) > start_rows:
          break
        time.sleep(0.02)
      time.sleep(float(rng.uniform(0.0, 3.0)))
      if proc.poll() is None:
        proc.kill()
        logged = rundir.MetricsLog(epath.Path(workdir)).read()
        landed.append(f"{logged[-1]['stage']}:{logged[-1]['step']}" if logged else "start")
    finally:
      proc.kill()
      proc.communicate()
    _assert_checkpoints_agree(workdir, f"seed {seed}, kill {k}")
  resumed = run_training(workdir, dense)
  context = f"seed {seed}, kills after {landed}"
  assert resumed.returncode == 0 and "FINISHED" in resumed.stdout, (context,
                                                                     resumed.stderr[-3000:])
  _assert_same_end(workdir, config, params, rows, context)


def test_sigterm_checkpoints_and_exits_and_the_run_resumes(reference, tmp_path):
  root, overrides, config, params, _, _ = reference
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  proc = subprocess.Popen([sys.executable, "-m", "curriculum_seg.cli", "train", "--config",
                           "configs/synthetic.py", "--workdir", str(workdir)] +
                          [f"--config.{k}={v}" for k, v in overrides.items()],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  deadline = time.time() + 300
  while time.time() < deadline:
    rows = rundir.MetricsLog(epath.Path(workdir)).read() if workdir.exists() else []
    if any(r["stage"] == "patch" for r in rows):
      break
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 143, stderr[-2000:]
  assert "SIGTERM: checkpoint saved" in stderr
  store = checkpoints.StageCheckpoints(workdir / "checkpoints", "patch", read_only=True)
  meta = store.meta()
  assert meta is not None and not meta["completed"]
  resumed = run_training(workdir, overrides)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(final_params(workdir, config))):
    np.testing.assert_array_equal(a, b)


def test_concurrent_run_and_changed_config_are_refused(reference, tmp_path):
  root, overrides, config, _, _, _ = reference
  workdir = epath.Path(tmp_path)
  with rundir.RunLock(workdir):
    with pytest.raises(rundir.RunDirError, match="in use by another run"):
      stages.train(config, workdir, log=lambda s: None)
  args = [sys.executable, "-m", "curriculum_seg.cli", "train", "--config", "configs/synthetic.py",
          "--workdir", str(root / "uninterrupted")]
  changed = subprocess.run(args + [f"--config.{k}={v}" for k, v in overrides.items()] +
                           ["--config.stages.patch.optimizer.learning_rate=0.5"],
                           capture_output=True, text=True, timeout=300)
  assert changed.returncode == 2
  assert "stages.patch.optimizer.learning_rate" in changed.stderr
  assert len(changed.stderr.strip().splitlines()) == 1
  wrong = subprocess.run(args + ["--config.stages.patch.stepz=3"], capture_output=True, text=True,
                         timeout=120)
  assert wrong.returncode == 2
  assert wrong.stderr.strip() == ("curriculum-seg train: error: unknown config key "
                                  "stages.patch.stepz (did you mean stages.patch.steps?)")


def test_bad_curricula_name_their_key(tmp_path, tiny_config):
  config = tiny_config(tmp_path)
  with pytest.raises(stages.StageError, match="config.stages.patch.pipeline"):
    stages.validate(config_loading.apply_overrides(config, [("stages.patch.pipeline", "blocks")]))
  with pytest.raises(stages.StageError, match="no such stage"):
    stages.validate(config_loading.apply_overrides(config, [("curriculum", "('whole1', 'x')")]))
  with pytest.raises(stages.StageError, match="carry_optimizer"):
    stages.validate(config_loading.apply_overrides(config, [
        ("stages.patch.carry_optimizer", "true"), ("stages.patch.optimizer.name", "sgd")]))


def test_stage_models_and_cascades_are_validated_naming_their_key(tmp_path, tiny_config):
  config = tiny_config(tmp_path)
  assert stages.stage_model_config(config, "patch").to_dict() == config.model.to_dict()
  liver = config_loading.apply_overrides(config, [])
  liver.stages.whole1.model = dict(task="liver")  # the first stage trains a liver network
  assert stages.stage_model_config(liver, "whole1").task == "liver"
  with pytest.raises(stages.StageError, match=r"config\.stages\.patch\.init='best'.*scratch"):
    stages.validate(liver)  # the patch stage's tumour network cannot start from liver weights
  liver.stages.patch.init = "scratch"
  stages.validate(liver)
  unknown = config_loading.apply_overrides(config, [])
  unknown.stages.patch.model = dict(taks="liver")
  with pytest.raises(stages.StageError, match=r"config\.stages\.patch\.model\.taks"):
    stages.validate(unknown)
  patch_liver = config_loading.apply_overrides(config, [])
  patch_liver.stages.patch.model = dict(task="liver")
  patch_liver.stages.patch.init = "scratch"
  with pytest.raises(stages.StageError, match=r"config\.stages\.patch\.pipeline='patch'"):
    stages.validate(patch_liver)
  cascade = config_loading.load_config_file("configs/synthetic_cascade.py")
  stages.validate(cascade)
  for key, value, match in [
      ("cascade.liver_stage", "whole", r"config\.cascade\.liver_stage='whole'"),
      ("stages.liver.model.task", "tumour", r"config\.stages\.liver\.model\.task='liver'"),
      ("stages.tumour.pipeline", "whole", r"config\.stages\.tumour\.pipeline='liver_crop'"),
      ("stages.tumour.init", "best", r"config\.stages\.tumour\.init='best'")]:
    with pytest.raises(stages.StageError, match=match):
      stages.validate(config_loading.apply_overrides(cascade, [(key, value)]))


@pytest.mark.parametrize("path,regimes", [
    ("configs/synthetic.py", ["three_stage", "whole_only", "whole_patch", "patch_whole",
                              "cascade"]),
    ("configs/lits_three_stage.py", ["three_stage", "whole_only", "whole_patch",
                                     "patch_whole"]),
])
def test_regimes_train_equal_total_steps(path, regimes):
  default = config_loading.load_config_file(path)
  total = sum(int(default.stages[n].steps) for n in default.curriculum)
  curricula = {}
  for regime in regimes:
    config = config_loading.load_config_file(f"{path}:{regime}")
    stages.validate(config)
    assert sum(int(config.stages[n].steps) for n in config.curriculum) == total, regime
    assert config.data.to_dict() == default.data.to_dict(), "same data for every regime"
    curricula[regime] = tuple(config.stages[n].pipeline for n in config.curriculum)
  assert curricula["three_stage"] == ("whole", "patch", "whole")
  assert curricula["whole_only"] == ("whole",)
  assert curricula["whole_patch"] == ("whole", "patch")
  assert curricula["patch_whole"] == ("patch", "whole")
  if "cascade" in regimes:
    assert curricula["cascade"] == ("whole", "liver_crop")
  lits_cascade = config_loading.load_config_file("configs/lits_cascade.py")
  stages.validate(lits_cascade)
  assert sum(int(lits_cascade.stages[n].steps) for n in lits_cascade.curriculum) == 60_000
  with pytest.raises(ValueError, match="unknown regime"):
    config_loading.load_config_file(f"{path}:wholeonly")


def test_a_sigterm_the_run_took_reaches_the_callers_own_handler():
  """A caller with its own SIGTERM handler (a sweep of runs) hears a SIGTERM that arrived while
  a run held the signal, even after the run's last step; without one, nothing more happens."""
  heard = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
  try:
    with stages._SigtermFlag() as flag:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 5
      while not flag.raised and time.time() < deadline:
        time.sleep(0.01)
      assert flag.raised and heard == []
    assert heard == [signal.SIGTERM]
    with stages._SigtermFlag():  # pylint: disable=protected-access
      pass
    assert heard == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_pgps_grows_the_block_and_logs_each_stage_s_block_and_batch(tmp_path, tiny_overrides):
  """configs/synthetic.py:pgps through the ordinary trainer: whole stages on growing blocks,
  each continuing the last one's weights and moments; the metrics log says the input size and
  batch size of every training row."""
  base = {k: v for k, v in tiny_overrides(tmp_path).items() if not k.startswith("stages.")}
  config = config_loading.apply_overrides(
      config_loading.load_config_file("configs/synthetic.py:pgps"), base.items())
  sizes = {"grow64": (8, 8), "grow96": (16, 4), "grow128": (32, 2)}
  overrides = []
  for name, (side, batch) in sizes.items():
    overrides += [(f"stages.{name}.block_size", f"({side}, {side})"),
                  (f"stages.{name}.batch_size", str(batch)), (f"stages.{name}.steps", "3"),
                  (f"stages.{name}.log_every", "1"), (f"stages.{name}.eval_every", "0"),
                  (f"stages.{name}.schedule.warmup_steps", "0")]
  config = config_loading.apply_overrides(config, overrides)
  assert list(config.curriculum) == list(sizes)
  lines = []
  stages.train(config, tmp_path / "run", log=lines.append)
  assert "[grow96] starts from grow64's latest checkpoint (step 3)" in lines
  rows = [r for r in rundir.MetricsLog(epath.Path(tmp_path / "run")).read() if "loss" in r]
  for name, (side, batch) in sizes.items():
    mine = [r for r in rows if r["stage"] == name]
    assert len(mine) == 3 and {(r["input_size"], r["batch_size"]) for r in mine} == {(side,
                                                                                       batch)}
  # Weights, moments and the optimiser's step count go on; each stage's schedule starts at its
  # own step 0: constant 1e-3 in the first two, cosine from 1e-3 in the last (never 0 there).
  lrs = {name: [r["lr"] for r in rows if r["stage"] == name] for name in sizes}
  assert lrs["grow64"] == lrs["grow96"] == [pytest.approx(1e-3)] * 3
  assert lrs["grow128"][0] == pytest.approx(1e-3) and all(lr > 0 for lr in lrs["grow128"])
  assert lrs["grow128"] == sorted(lrs["grow128"], reverse=True)
