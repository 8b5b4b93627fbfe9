"""StageCheckpoints: latest and best, restore, and the commit protocol that keeps them in
agreement whatever the instant of a kill (a subprocess SIGKILLs itself at each write boundary
of a save; reopening must leave a latest and a committed best that agree, and saving on from
there must end as an uninterrupted sequence of saves ends)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from curriculum_seg import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state(v):
  return {"w": jnp.full((3, 2), v, jnp.float32), "step": jnp.int32(v)}


def test_checkpoints_keep_latest_and_best_and_restore(tmp_path):
  store = checkpoints.StageCheckpoints(tmp_path, "whole1", keep_latest=2)
  store.save(10, state(1.0), dict(step=10, position={"batch": 10}), best=True)
  store.save(20, state(2.0), dict(step=20))
  store.save(30, state(3.0), dict(step=30))
  assert store.steps() == [20, 30] and store.steps("best") == [10]
  assert store.meta()["best_step"] == 10, "the commit record carries the best over"
  restored, meta = store.restore(checkpoints.abstract_like(state(0.0)), "best")
  np.testing.assert_array_equal(restored["w"], np.full((3, 2), 1.0))
  assert meta == dict(step=10, position={"batch": 10}, best_step=10, kind="best")
  store.save(40, state(4.0), dict(step=40), best=True)
  assert store.steps("best") == [40] and os.listdir(tmp_path / "whole1" / "best") == ["40"]
  store.save(40, state(5.0), dict(step=40, completed=True))  # same step replaced
  restored, meta = store.restore(checkpoints.abstract_like(state(0.0)))
  assert float(restored["w"][0, 0]) == 5.0 and meta["completed"] and meta["best_step"] == 40
  store.close()
  reader = checkpoints.StageCheckpoints(tmp_path, "whole1", read_only=True)
  assert reader.meta()["step"] == 40 and reader.steps("best") == [40]
  assert checkpoints.StageCheckpoints(tmp_path, "absent", read_only=True).meta() is None


def test_a_best_step_that_names_no_best_checkpoint_is_refused(tmp_path):
  store = checkpoints.StageCheckpoints(tmp_path, "s")
  with pytest.raises(checkpoints.CheckpointError, match="best step 5"):
    store.save(10, state(1.0), dict(step=10, best_step=5))
  assert store.steps() == [], "nothing written"


# The uninterrupted sequence: (step, value, best). Step 30 supersedes the best of step 10 (a
# prune), step 50 supersedes 30 and completes.
SAVES = [(10, 1.0, True), (20, 2.0, False), (30, 3.0, True), (40, 4.0, False), (50, 5.0, True)]

# Runs SAVES from the store's resume point (the step after its latest) and SIGKILLs itself at
# a boundary of the save of step KILL_STEP:
#   best_writing    inside the best's Orbax save, before its atomic rename
#   best_written    the best is complete, the latest (the commit) is not
#   latest_writing  inside the latest's save, before its rename
#   latest_written  the latest is complete, the superseded best is not yet dropped
#   dropped         the superseded best is in .trash, which is not yet emptied
_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import jax.numpy as jnp
    from curriculum_seg import checkpoints
    root, saves, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    kill_step = int(sys.argv[4])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    current = {}
    C = checkpoints.StageCheckpoints
    original_write, original_drop = C._write, C._drop_bests_except
    def write(self, which, step, state, meta):
      current.update(which=which, step=step)
      original_write(self, which, step, state, meta)
      if step == kill_step and mode == which + "_written":
        die()
    def drop(self, keep):
      original_drop(self, keep)
      if (current.get("step") == kill_step and current.get("which") == "latest"
          and mode == "dropped"):
        die()
    C._write, C._drop_bests_except = write, drop
    from orbax.checkpoint._src.path import atomicity
    original_finalize = atomicity.AtomicRenameTemporaryPath.finalize
    async def finalize(self, *args, **kwargs):
      if current.get("step") == kill_step and mode == current.get("which") + "_writing":
        die()
      return await original_finalize(self, *args, **kwargs)
    atomicity.AtomicRenameTemporaryPath.finalize = finalize
    store = C(root, "s")
    start = store.last_step() or 0
    for step, value, best in saves:
      if step > start:
        store.save(step, {"w": jnp.full((3, 2), value, jnp.float32), "step": jnp.int32(value)},
                   dict(step=step), best=best)
    print("DONE", flush=True)
""")


def _run(root, mode="", kill_step=-1):
  return subprocess.run([sys.executable, "-c", _SCRIPT, str(root), json.dumps(SAVES), mode,
                         str(kill_step)], capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _disk(root):
  """What a reader sees: latest steps with their metadata, the committed best and its value."""
  store = checkpoints.StageCheckpoints(root, "s", read_only=True)
  latest = {s: store.meta(checkpoints.LATEST, s) for s in store.steps()}
  best = store.steps(checkpoints.BEST)
  value = None
  if best:
    restored, _ = store.restore(checkpoints.abstract_like(state(0.0)), checkpoints.BEST)
    value = float(restored["w"][0, 0])
  return latest, best, value


def _raw(root, which):
  path = root / "s" / which
  return sorted(p for p in os.listdir(path) if not p.startswith(".")) if path.exists() else []


@pytest.mark.parametrize("mode,kill_step", [
    ("best_writing", 30), ("best_written", 30), ("latest_writing", 30), ("latest_written", 30),
    ("dropped", 30), ("best_written", 10), ("latest_writing", 20), ("best_written", 50)])
def test_kill_at_each_write_boundary_leaves_agreeing_checkpoints(tmp_path, mode, kill_step):
  reference = tmp_path / "reference"
  assert "DONE" in _run(reference).stdout
  root = tmp_path / "killed"
  killed = _run(root, mode, kill_step)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  # A reader of the killed run sees a latest and a best that agree, without changing anything.
  latest, best, value = _disk(root)
  if latest:
    newest = latest[max(latest)]
    recorded = newest["best_step"]
    assert best == ([recorded] if recorded is not None else [])
    if recorded is not None:
      assert value == dict((s, v) for s, v, _ in SAVES)[recorded]
  else:
    assert best == []
  if mode == "best_written":
    assert str(kill_step) in _raw(root, "best"), "the uncommitted best is on disk"
  # Reopening for writing reconciles, and saving on ends as the uninterrupted run ends.
  store = checkpoints.StageCheckpoints(root, "s")
  recorded = store.committed_best_step()
  assert _raw(root, "best") == ([str(recorded)] if recorded is not None else [])
  assert not (root / "s" / "best" / ".trash").exists()
  store.close()
  resumed = _run(root)
  assert "DONE" in resumed.stdout, resumed.stderr[-2000:]
  assert _disk(root) == _disk(reference)
  assert _raw(root, "best") == _raw(reference, "best") == ["50"]
  assert _raw(root, "latest") == _raw(reference, "latest") == ["40", "50"]


def test_a_run_of_the_old_protocol_killed_before_its_best_is_repaired_from_latest(tmp_path):
  """The reported bug: latest step 7 records best_step 7, best/ has no step 7."""
  store = checkpoints.StageCheckpoints(tmp_path, "patch")
  store.save(5, state(5.0), dict(step=5))
  store.save(7, state(7.0), dict(step=7), best=True)
  store.close()
  best_dir = tmp_path / "patch" / "best" / "7"
  import shutil
  shutil.rmtree(best_dir)
  reopened = checkpoints.StageCheckpoints(tmp_path, "patch")
  assert reopened.steps("best") == [7]
  restored, meta = reopened.restore(checkpoints.abstract_like(state(0.0)), "best")
  assert float(restored["w"][0, 0]) == 7.0 and meta["step"] == 7
  reopened.close()
  shutil.rmtree(tmp_path / "patch" / "best" / "7")
  shutil.rmtree(tmp_path / "patch" / "latest" / "7")
  store = checkpoints.StageCheckpoints(tmp_path, "patch")
  store.save(7, state(7.0), dict(step=7, best_step=None))
  store.close()
  # latest 7 names no best: fine. Now a latest naming a best that exists nowhere:
  meta_file = tmp_path / "patch" / "latest" / "7" / "meta" / "metadata"
  meta = json.loads(meta_file.read_text())
  meta_file.write_text(json.dumps(dict(meta, best_step=3)))
  with pytest.raises(checkpoints.CheckpointError, match="best step 3"):
    checkpoints.StageCheckpoints(tmp_path, "patch")
