"""Run directory: the lock, the saved-config check, the metrics log (checkpoints:
test_checkpoints)."""

import json
import os
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
  (workdir / "checkpoints" / "whole1" / "latest" / "3").mkdir(parents=True)  # Orbax's commit
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


def test_a_workdir_is_claimed_only_by_a_run_that_saved_a_checkpoint(tmp_path):
  """A run that failed before its first checkpoint leaves a workdir the corrected command may
  use; once a checkpoint is committed, the config is the run's."""
  workdir = epath.Path(tmp_path) / "run"
  config = config_loading.load_config_file("configs/synthetic.py")
  assert rundir.check_or_save_config(workdir.parent, config) is False  # tmp_path: empty
  workdir.mkdir()
  rundir.check_or_save_config(workdir, config)
  (workdir / "checkpoints" / "whole1" / "latest").mkdir(parents=True)
  (workdir / "checkpoints" / "whole1" / "latest" / "3.orbax-checkpoint-tmp-17").mkdir()
  assert not rundir.has_checkpoint(workdir), "a save cut before its rename is no checkpoint"
  fixed = config_loading.apply_overrides(config, [("loss.name", "ce")])
  said = []
  assert rundir.check_or_save_config(workdir, fixed, log=said.append) is False
  assert json.loads((workdir / "config.json").read_text())["loss"]["name"] == "ce"
  assert said and "never saved a checkpoint" in said[0]
  (workdir / "checkpoints" / "whole1" / "best" / "3").mkdir(parents=True)
  assert rundir.has_checkpoint(workdir)
  with pytest.raises(rundir.RunDirError, match="loss.name"):
    rundir.check_or_save_config(workdir, config)
  (workdir / "config.json").write_text("{not json")  # a trained run's config cut: refused
  with pytest.raises(rundir.RunDirError, match="not valid JSON"):
    rundir.check_or_save_config(workdir, config)


def test_a_folder_of_other_files_is_never_a_workdir(tmp_path):
  foreign = epath.Path(tmp_path) / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  config = config_loading.load_config_file("configs/synthetic.py")
  with pytest.raises(rundir.RunDirError, match=r"holds files of no curriculum-seg run \(notes"):
    rundir.check_or_save_config(foreign, config)
  assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
  layout = epath.Path(tmp_path) / "stopped"  # a run stopped before writing its config
  (layout / "checkpoints").mkdir(parents=True)
  (layout / rundir.LOCK_FILE).write_text("")
  rundir.check_claimable(layout)
  (layout / "x.nii.gz").write_text("")
  with pytest.raises(rundir.RunDirError, match="x.nii.gz"):
    rundir.check_claimable(layout)


def test_a_saved_config_reads_back_as_the_config_file_gives_it(tmp_path):
  workdir = epath.Path(tmp_path)
  config = config_loading.load_config_file("configs/synthetic.py")
  rundir.check_or_save_config(workdir, config)
  read = rundir.read_config(workdir)
  assert read.to_dict() == config.to_dict()
  assert isinstance(read.data.hu_window, tuple) and isinstance(read.curriculum, tuple)
  # overrides apply to it as to the file's config, by the field's type
  assert config_loading.apply_overrides(read, [("data.hu_window", "(-100, 200)")]
                                        ).data.hu_window == (-100, 200)
  with pytest.raises(rundir.RunDirError, match="no config.json"):
    rundir.read_config(workdir / "nothing")
  # an older run's relative data path is compared as the folder it names from here
  saved = json.loads((workdir / "config.json").read_text())
  saved["data"]["lits_dir"] = os.path.relpath(os.path.abspath("data/x"))
  current = json.loads((workdir / "config.json").read_text())
  current["data"]["lits_dir"] = os.path.abspath("data/x")
  assert rundir.config_differences(saved, current) == []
  current["data"]["lits_dir"] = os.path.abspath("data/y")
  assert rundir.config_differences(saved, current) == ["data.lits_dir"]


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


def test_metrics_log_truncates_to_a_stage_resume_point_or_new_start(tmp_path):
  log = rundir.MetricsLog(epath.Path(tmp_path))
  rows = [dict(stage="a", step=s, global_step=s) for s in (1, 2, 3)] + [
      dict(stage="b", step=s, global_step=3 + s) for s in (0, 1, 2)] + [
      dict(stage="c", step=0, global_step=5)]
  log.append(rows)
  log.truncate_to("b", 1, 4, resumed=True)  # resumed at b's step 1: its step-0 row stays
  assert [(r["stage"], r["step"]) for r in log.read()] == [("a", 1), ("a", 2), ("a", 3),
                                                          ("b", 0), ("b", 1)]
  log.truncate_to("b", 0, 3, resumed=False)  # b starts anew: its step-0 row is logged again
  assert [(r["stage"], r["step"]) for r in log.read()] == [("a", 1), ("a", 2), ("a", 3)]


def test_a_run_saved_before_a_field_existed_resumes_when_the_field_keeps_its_old_default():
  saved = {"model": {"depth": 3}, "loss": {"name": "dice"}}
  same = {"model": {"depth": 3, "input_stride": 1, "foreground_prior": None},
          "loss": {"name": "dice", "dice_weight": 1.0}}
  assert rundir.config_differences(saved, same) == []
  changed = {"model": {"depth": 3, "input_stride": 2}, "loss": {"name": "dice"}}
  assert rundir.config_differences(saved, changed) == ["model.input_stride"]
  assert rundir.config_differences(saved, {"model": {"depth": 3, "extra": 1},
                                           "loss": {"name": "dice"}}) == ["model.extra"]


def test_input_speed_settings_may_change_on_resume_and_runs_saved_before_them_resume():
  """How batches are made (worker processes, read threads, read-ahead) does not change them, so
  a run resumes with other values, and a run saved before `data.worker_count` existed resumes."""
  saved = {"data": {"image_size": 32, "host_threads": 0, "prefetch_batches": 0}}
  current = {"data": {"image_size": 32, "host_threads": 4, "prefetch_batches": 3,
                      "worker_count": 2}}
  assert rundir.config_differences(saved, current) == []
  current["data"]["image_size"] = 64
  assert rundir.config_differences(saved, current) == ["data.image_size"]
