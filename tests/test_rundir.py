"""Run directory: the lock, the saved-config check, the metrics log (checkpoints: test_checkpoints)."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from etils import epath

from curriculum_seg import config_loading, rundir


def test_lock_refuses_a_second_holder_and_is_released_on_death(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from etils import epath
      from curriculum_seg import rundir
      lock = rundir.RunLock(epath.Path({str(tmp_path)!r}))
      lock.acquire()
      print("held", flush=True)
      time.sleep(60)
  """)], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(rundir.RunDirError, match="in use by another run"):
    rundir.RunLock(epath.Path(tmp_path)).acquire()
  holder.kill()  # SIGKILL: the kernel releases the lock
  holder.wait()
  lock = rundir.RunLock(epath.Path(tmp_path))
  lock.acquire()
  lock.release()


def test_saved_config_refuses_differences_but_run_lengths(tmp_path):
  workdir = epath.Path(tmp_path)
  config = config_loading.load_config_file("configs/synthetic.py")
  assert rundir.check_or_save_config(workdir, config) is False
  assert rundir.check_or_save_config(workdir, config) is True
  longer = config_loading.apply_overrides(config, [("stages.patch.steps", "999"),
                                                   ("stages.whole1.eval_every", "7")])
  assert rundir.check_or_save_config(workdir, longer) is True
  assert json.loads((workdir / "config.json").read_text())["stages"]["patch"]["steps"] == 999
  other = config_loading.apply_overrides(config, [("stages.patch.optimizer.learning_rate", "0.5"),
                                                  ("data.image_size", "64")])
  with pytest.raises(rundir.RunDirError) as e:
    rundir.check_or_save_config(workdir, other)
  assert "data.image_size" in str(e.value)
  assert "stages.patch.optimizer.learning_rate" in str(e.value)


def test_metrics_log_truncates_after_a_step_and_survives_a_cut_line(tmp_path):
  log = rundir.MetricsLog(epath.Path(tmp_path))
  log.append([dict(global_step=s, loss=np.float32(1.0 / s)) for s in range(1, 6)])
  log.append([dict(global_step=6, loss=float("nan"))])
  assert [r["global_step"] for r in log.read()] == [1, 2, 3, 4, 5, 6]
  assert log.read()[-1]["loss"] == "nan"
  with open(log.path, "a") as f:
    f.write('{"global_step": 7, "lo')  # killed mid-write
  assert len(log.read()) == 6
  log.truncate_after(3)
  assert [r["global_step"] for r in log.read()] == [1, 2, 3]
