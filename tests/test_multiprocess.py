"""Two local processes (jax.distributed, 2 CPU devices each, gloo collectives) train one tiny run
in one workdir: the same parameters as one process with 4 devices and the same global batch;
logs from process 0 only; after both are killed mid-stage they resume to the same end."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from curriculum_seg import checkpoints, config_loading, rundir, stages

pytestmark = pytest.mark.slow  # trains runs in its fixtures

STAGES = ("whole1", "patch", "whole2")
STEPS = 5  # per stage: patch is killed after its step 3 (checkpointed at 2)
TIMEOUT_S = 300  # per launch; a hang fails the test instead of hanging CI
# Cuts XLA:CPU compile time by a quarter (optimisation level 0 halved it but gave non-finite
# losses when tried). On CPU only process 0 hits the persistent compilation cache (jax writes
# entries from process 0 and keys them on each process's devices), so process 1 compiles at
# every launch.
FAST_COMPILE = "--xla_llvm_disable_expensive_passes=true"
STEP_LINE = re.compile(r"\[(whole1|patch|whole2)\] step \d+")


@pytest.fixture(scope="module")
def overrides(tiny_overrides):
  """overrides(root): the tiny run (global batch 4), 5 steps a stage, with a smaller network and
  one compiled step for all stages (same input size, optimiser and length): compiling is most of
  the cost, and process 1 compiles at every launch."""
  extra = {"model.block": "plain", "model.norm": "none", "model.convs_per_level": "1",
           "stages.patch.patch_size": "32"}
  for name in STAGES:
    extra.update({f"stages.{name}.{key}": value for key, value in (
        ("steps", str(STEPS)), ("eval_every", "2"), ("checkpoint_every", "2"),
        ("optimizer.learning_rate", "0.001"), ("schedule.name", "constant"),
        ("schedule.warmup_steps", "0"))})
  return lambda root: tiny_overrides(root, **extra)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(overrides, root, workdir, name, num_processes, devices_per_process, via_flags=False):
  """Starts `curriculum-seg train` as `num_processes` processes; stdout/stderr go to files."""
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("JAX_", "XLA_", "TPU_", "SLURM_", "OMPI_"))}
  base.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process),
              TF_CPP_MIN_LOG_LEVEL="2", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              XLA_FLAGS=FAST_COMPILE)
  args = [sys.executable, "-m", "curriculum_seg.cli", "train", "--config", "configs/synthetic.py",
          "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides(root).items()]
  address = f"127.0.0.1:{free_port()}"
  procs = []
  for pid in range(num_processes):
    env, flags = dict(base), []
    if num_processes > 1:
      env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
      if via_flags:
        flags = ["--coordinator_address", address, "--num_processes", str(num_processes),
                 "--process_id", str(pid)]
      else:
        env.update(JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
                   JAX_PROCESS_ID=str(pid))
    out = open(root / f"{name}.p{pid}.out", "w")
    err = open(root / f"{name}.p{pid}.err", "w")
    procs.append(subprocess.Popen(args + flags, stdout=out, stderr=err, env=env, text=True))
    out.close()
    err.close()
  return procs


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def finish(procs):
  """Waits for every process until the deadline, then kills any left; their exit codes."""
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    kill_all(procs)
  return [p.returncode for p in procs]


def run(overrides, root, workdir, name, num_processes, devices_per_process, via_flags=False):
  """Launches, asserts every process exited 0, returns their stdouts."""
  procs = launch(overrides, root, workdir, name, num_processes, devices_per_process, via_flags)
  for pid, code in enumerate(finish(procs)):
    assert code == 0, (name, pid, code, (root / f"{name}.p{pid}.err").read_text()[-3000:])
  return [(root / f"{name}.p{pid}.out").read_text() for pid in range(num_processes)]


def final_state(overrides, workdir, root):
  """whole2's completed checkpoint (the whole train state), as numpy arrays on this process."""
  config = config_loading.apply_overrides(
      config_loading.load_config_file("configs/synthetic.py"), overrides(root).items())
  store = checkpoints.StageCheckpoints(epath.Path(workdir) / "checkpoints", "whole2",
                                       read_only=True)
  controller = stages.Controller(config, workdir, log=lambda s: None)
  stage = config.stages.whole2
  state, meta = store.restore(controller._abstract_state(stage, controller._tx(stage)))
  store.close()
  assert meta["completed"] and meta["step"] == STEPS
  return jax.tree.map(np.asarray, jax.device_get(state))


def assert_close(a, b, context):
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b), context
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5,
                               err_msg=f"{context}: {jax.tree_util.keystr(path)}")


def rows(workdir):
  return rundir.MetricsLog(epath.Path(workdir)).read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, overrides):
  """One process with 4 devices (it also prepares the shared dataset), then two processes with
  2 devices each, uninterrupted, launched through the JAX_* environment variables."""
  root = tmp_path_factory.mktemp("multiprocess")
  run(overrides, root, root / "one", "one", 1, 4)
  outs = run(overrides, root, root / "two", "two", 2, 2)
  return root, outs


def test_two_processes_train_what_one_process_trains(runs, overrides):
  root, _ = runs
  assert_close(final_state(overrides, root / "two", root),
               final_state(overrides, root / "one", root),
               "two processes vs one")
  two, one = rows(root / "two"), rows(root / "one")
  assert [(r["stage"], r["step"]) for r in two] == [(r["stage"], r["step"]) for r in one]
  np.testing.assert_allclose([r.get("loss", 0.0) for r in two], [r.get("loss", 0.0) for r in one],
                             rtol=1e-5, atol=1e-5)


def test_only_process_0_writes_logs(runs):
  root, (out0, out1) = runs
  workdir = root / "two"
  logged = [(r["stage"], r["step"]) for r in rows(workdir)]
  assert len(logged) == len(set(logged)), "every row once: a single writer"
  assert {s for s, _ in logged} == set(STAGES)
  assert json.loads((workdir / "config.json").read_text())["stages"]["patch"]["steps"] == STEPS
  summary = json.loads((workdir / "summary.json").read_text())
  assert [s["name"] for s in summary["stages"]] == list(STAGES)
  events = os.listdir(workdir / "tensorboard")
  assert len(events) == 1 and events[0].startswith("events"), events
  assert len(STEP_LINE.findall(out0)) >= len(STAGES) * STEPS
  assert "trained 3 stages" in out0
  assert not STEP_LINE.findall(out1) and "trained" not in out1, out1[-2000:]
  assert not (workdir / ".lock.1").exists()


def test_both_processes_killed_mid_stage_resume_to_the_same_end(runs, overrides):
  root, _ = runs
  workdir = root / "resumed"
  procs = launch(overrides, root, workdir, "killed", 2, 2, via_flags=True)
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while not any(r["stage"] == "patch" and r["step"] >= 3 for r in rows(workdir)):
      assert all(p.poll() is None for p in procs), (root / "killed.p0.err").read_text()[-3000:]
      assert time.monotonic() < deadline, "no patch row before the deadline"
      time.sleep(0.05)
    for p in procs:
      p.send_signal(signal.SIGKILL)
  finally:
    kill_all(procs)
  assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2
  patch = checkpoints.StageCheckpoints(workdir / "checkpoints", "patch", read_only=True)
  assert not patch.meta()["completed"], "killed inside the patch stage"
  patch.close()
  assert not (workdir / "summary.json").exists()

  out0, out1 = run(overrides, root, workdir, "resume", 2, 2, via_flags=True)
  assert "resuming the run" in out0 and "[patch] resuming at step" in out0
  assert not STEP_LINE.findall(out1)
  assert_close(final_state(overrides, workdir, root), final_state(overrides, root / "two", root),
               "resumed vs uninterrupted")
  resumed, uninterrupted = rows(workdir), rows(root / "two")
  assert ([(r["stage"], r["step"]) for r in resumed]
          == [(r["stage"], r["step"]) for r in uninterrupted])
  np.testing.assert_allclose([r.get("loss", 0.0) for r in resumed],
                             [r.get("loss", 0.0) for r in uninterrupted], rtol=1e-5, atol=1e-5)


def test_a_workdir_in_use_refuses_both_processes(tmp_path, overrides):
  """Process 0 takes the run lock; its refusal stops process 1 too instead of leaving it
  waiting for a peer that has gone."""
  workdir = tmp_path / "busy"
  workdir.mkdir()
  lock = rundir.RunLock(epath.Path(workdir))
  lock.acquire()  # another run holds the workdir
  try:
    codes = finish(launch(overrides, tmp_path, workdir, "busy", 2, 2))
  finally:
    lock.release()
  last_line = lambda pid: (  # noqa: E731
      tmp_path / f"busy.p{pid}.err").read_text().strip().splitlines()[-1]
  assert codes == [2, 1], [last_line(0), last_line(1)]
  assert "workdir is in use by another run" in last_line(0)
  assert "process 0 of 2 failed to take the workdir" in last_line(1)
  assert not (workdir / "config.json").exists()
