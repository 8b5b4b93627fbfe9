"""`curriculum-seg sweep` and `compare` (curriculum_seg/sweep.py, compare.py) through the command
line on a tiny sweep of their own: 2 regimes x 2 seeds, 6 steps each, scored on the held-out
test split; finished runs skipped, a run stopped by SIGTERM resumed, results rebuilt from the
records alone, one-line refusals; and the sweeps the shipped configs declare."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest

from curriculum_seg import compare, config_loading, rundir, stats, sweep
from data_pipelines import lits_tfds

pytestmark = pytest.mark.slow  # trains sweeps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SWEEP = '''
"""A tiny sweep: two regimes x two seeds of the synthetic default, 6 optimiser steps each."""
from configs import synthetic

TINY = {
    "data.lits_dir": "{out}/data/lits", "data.tfds_dir": "{out}/data/tfds",
    "data.synthetic.num_cases": 6, "data.synthetic.size": 32, "data.synthetic.slices": 16,
    "data.synthetic.storage_variants": False, "data.image_size": 32, "data.spacing_mm": None,
    "stages.*.block_size": None, "eval.window": None,
    "data.val_fraction": 1 / 6, "data.test_fraction": 2 / 6,
    "model.depth": 2, "model.base_width": 4, "eval.batch_size": 8,
    "stages.*.patch_size": 16, "stages.*.patch_jitter": 4, "stages.*.crop_size": 32,
    "stages.*.crop_margin": 2, "stages.*.batch_size": 4, "stages.*.eval_every": 0,
    "stages.*.log_every": 1, "stages.*.schedule.warmup_steps": 0,
}


def get_config(arg=None):
  return synthetic.get_config(arg)


def get_sweep(arg=None):
  if arg == "held_out":  # one run, scored on synthetic held-out cases the sweep makes
    return dict(runs=[dict(regime="whole_only", seed=0)], total_steps=2,
                reference="whole_only", overrides=dict(TINY, **{"data.test_fraction": 0.0}),
                held_out=dict(num_cases=3, seed=7, max_tumours=2))
  regimes = tuple(arg.split(",")) if arg else ("whole_only", "cascade")
  return dict(runs=[dict(regime=r, seed=s) for s in (0, 1) for r in regimes], total_steps=6,
              reference=regimes[0], overrides=TINY)
'''
NAMES = ["whole_only-seed0", "cascade-seed0", "whole_only-seed1", "cascade-seed1"]
PAIR = "whole_only - cascade"
# What differs between two records of the same run: where and when it ran, and how long.
CIRCUMSTANCES = ("train_seconds", "eval_seconds", "resumed", "machine", "config")


def run_cli(*args, timeout=600):
  return subprocess.run([sys.executable, "-m", "curriculum_seg.cli", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def one_line_error(result, message):
  assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("config") / "tiny_sweep.py"
  path.write_text(TINY_SWEEP)
  return str(path)


@pytest.fixture(scope="module")
def first(sweep_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep") / "out"
  result = run_cli("sweep", "--config", sweep_file, "--out", str(out))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return out, result


def _json(path):
  return json.loads(path.read_text())


def assert_same_science(got, want, where=""):
  """Equal records up to their circumstances: integers, strings and booleans exactly, floats
  to 1e-6 relative (a resumed run repeats the same steps)."""
  if isinstance(want, dict):
    keys = set(want) - (set(CIRCUMSTANCES) if not where else set())
    assert set(got) - set(CIRCUMSTANCES if not where else ()) == keys, where
    for k in keys:
      assert_same_science(got[k], want[k], f"{where}.{k}")
  elif isinstance(want, list):
    assert len(got) == len(want), where
    for i, (g, w) in enumerate(zip(got, want)):
      assert_same_science(g, w, f"{where}[{i}]")
  elif isinstance(want, float):
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-6, abs=1e-9), where
  else:
    assert type(got) is type(want) and got == want, where


def test_every_run_is_trained_scored_and_recorded_with_results(first):
  out, run = first
  lines = run.stdout.splitlines()
  assert ("4 runs (2 regimes x 2 seeds), 6 optimiser steps each, scored on 2 held-out cases "
          "(the prepared dataset's test split)") in lines[0]
  assert [line for line in lines if " training (" in line] == [
      f"[{i}/4 {n}] training (6 steps) in {out}/runs/{n}" for i, n in enumerate(NAMES, start=1)]
  assert run.stdout.count("partial results of") == 3
  assert run.stdout.count("results of 4 of 4 runs") == 1
  assert "| score | whole_only − cascade |" in run.stdout  # the tables at the end
  plan = _json(out / "sweep.json")
  assert [r["name"] for r in plan["runs"]] == NAMES and plan["reference"] == "whole_only"
  # The held-out cases: the prepared dataset's test split, disjoint from training and validation.
  splits = lits_tfds.assign_splits(list(range(6)), 1 / 6, 2 / 6, 0)
  assert plan["scored_on"] == {"split": "test"} and plan["case_numbers"] == splits["test"]
  assert len(splits["test"]) == 2 and len(splits["validation"]) == 1
  records = {n: _json(out / "records" / f"{n}.json") for n in NAMES}
  assert sorted(os.listdir(out / "records")) == sorted(f"{n}.json" for n in NAMES)
  for name, record in records.items():
    assert (record["regime"], record["seed"]) == (name.split("-")[0], int(name[-1]))
    assert record["total_steps"] == 6, "the same budget for every regime"
    assert record["config_digest"] == next(r["config_digest"] for r in plan["runs"]
                                           if r["name"] == name)
    assert record["config_digest"] == sweep.config_digest(record["config"])
    assert record["config"]["seed"] == record["seed"]
    assert [c["case_number"] for c in record["cases"]] == splits["test"]
    assert all("diameter_mm" in lesion for c in record["cases"] for lesion in
               c["reference_lesions"])
    assert len(json.dumps(record)) < 20_000, "small enough to commit"
    # The record's scores are evaluate's.
    aggregate = _json(out / "runs" / name / "eval" / "sweep" / "metrics.json")["aggregate"]
    scores = stats.point_scores(stats.case_table(record["cases"]))
    assert scores["dice_per_case"] == pytest.approx(aggregate["tumour"]["dice_per_case"])
    assert scores["dice_global"] == pytest.approx(aggregate["tumour"]["dice_global"])
    assert scores["recall_iou"] == pytest.approx(
        float(aggregate["detection"]["iou"]["recall"]), nan_ok=True)
  cascade = records["cascade-seed0"]
  assert [(s["task"], s["steps"]) for s in cascade["stages"]] == [("liver", 3), ("tumour", 3)]
  assert [(p["stage"], p["global_step"]) for p in cascade["curve"]] == [("tumour", 6)]
  assert [(p["stage"], p["global_step"]) for p in records["whole_only-seed1"]["curve"]] == [
      ("whole", 6)]
  result = _json(out / "results.json")
  assert result["complete"] and result["finished_runs"] == result["planned_runs"] == 4
  assert result["regimes"] == ["whole_only", "cascade"] and result["seeds"] == [0, 1]
  assert list(result["comparisons"]) == [PAIR]
  entry = result["comparisons"][PAIR]["dice_per_case"]
  assert entry["seeds"] == [0, 1] and entry["interval"]["n_cases"] == 2
  assert result["data"]["lesions_per_bin"]["all"] > 0
  table = (out / "results.md").read_text()
  assert "tumour Dice per case" in table.splitlines()[0] and "(partial" not in table
  assert f"Command: `curriculum-seg sweep --config {run.args[5]}" in table
  for name in ("results.png", "differences.png", "val_dice.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_invocation_skips_finished_runs_and_a_run_without_record_is_scored(
    first, sweep_file):
  out, _ = first
  before = (out / "results.json").read_text()
  again = run_cli("sweep", "--config", sweep_file, "--out", str(out))
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("finished before: skipped") == 4
  assert "starts from scratch" not in again.stdout and "partial results" not in again.stdout
  assert (out / "results.json").read_text() == before
  # Trained, but stopped before its record was written: the controller finds the run complete
  # and only the scoring runs again.
  record = _json(out / "records" / "cascade-seed1.json")
  os.remove(out / "records" / "cascade-seed1.json")
  scored = run_cli("sweep", "--config", sweep_file, "--out", str(out))
  assert scored.returncode == 0, scored.stderr[-3000:]
  assert "[cascade-seed1] [liver] already complete" in scored.stdout
  assert "[cascade-seed1] [tumour] already complete" in scored.stdout
  assert "starts from scratch" not in scored.stdout
  again = _json(out / "records" / "cascade-seed1.json")
  assert again["resumed"] and again["train_seconds"] is None
  assert_same_science(again, record)


def test_compare_rebuilds_the_same_results_from_the_records_alone(first, tmp_path):
  out, _ = first
  copy = tmp_path / "docs"
  copy.mkdir()
  shutil.copy(out / "sweep.json", copy / "sweep.json")
  shutil.copytree(out / "records", copy / "records")
  result = run_cli("compare", str(copy))
  assert result.returncode == 0, result.stderr[-3000:]
  for name in compare.RESULT_FILES:
    assert (copy / name).read_bytes() == (out / name).read_bytes(), name
  # A known difference written into the records is found; --reference turns it round.
  for regime, dice in (("whole_only", 0.6), ("cascade", 0.35)):
    for seed in (0, 1):
      path = copy / "records" / f"{regime}-seed{seed}.json"
      record = _json(path)
      for i, case in enumerate(record["cases"]):
        case["dice"] = dice + 0.1 * i + 0.01 * seed
      path.write_text(json.dumps(record))
  os.remove(copy / "records" / "cascade-seed1.json")
  partial = run_cli("compare", str(copy))
  assert partial.returncode == 0, partial.stderr[-3000:]
  got = _json(copy / "results.json")
  assert not got["complete"] and got["finished_runs"] == 3
  assert (copy / "results.md").read_text().startswith("(partial: 3 of 4 runs finished")
  entry = got["comparisons"][PAIR]["dice_per_case"]
  assert entry["seeds"] == [0] and entry["estimate"] == pytest.approx(0.25)
  assert entry["interval"]["low"] == pytest.approx(0.25)  # the same shift in every case
  assert not entry["interval"]["seed_variation"]
  flipped = run_cli("compare", str(copy), "--reference", "cascade")
  assert flipped.returncode == 0, flipped.stderr[-3000:]
  assert _json(copy / "results.json")["comparisons"]["cascade - whole_only"]["dice_per_case"][
      "estimate"] == pytest.approx(-0.25)
  one_line_error(run_cli("compare", str(copy), "--reference", "three_stage"),
                 "--reference three_stage: no finished run of that regime (regimes with "
                 "finished runs: whole_only, cascade)")
  one_line_error(run_cli("compare", str(tmp_path / "nothing")), "no such folder")
  (tmp_path / "empty").mkdir()
  one_line_error(run_cli("compare", str(tmp_path / "empty")), "holds no finished run's record")


def test_a_run_stopped_by_sigterm_resumes_at_its_step_and_records_the_same(first, sweep_file,
                                                                            tmp_path):
  """SIGTERM while the first run starts training: it stops at a checkpoint, the command exits
  143 saying how to continue; the same command resumes it at that step, and the records equal
  those of the uninterrupted sweep."""
  out, _ = first
  spec = f"{sweep_file}:whole_only"
  stopped = tmp_path / "stopped"
  args = [sys.executable, "-m", "curriculum_seg.cli", "sweep", "--config", spec, "--out",
          str(stopped)]
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if "[whole_only-seed0] [whole] starts from scratch" in line:
      proc.send_signal(signal.SIGTERM)  # while the first step compiles
  err = proc.stderr.read()
  assert proc.wait(timeout=300) == 143, "".join(seen)[-3000:] + err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  assert lines[0].startswith("curriculum-seg sweep: SIGTERM: stopped during run whole_only-seed0")
  assert lines[0].endswith(f"Run the same command to continue: curriculum-seg sweep --config "
                           f"{spec} --out {stopped}")
  assert not (stopped / "records" / "whole_only-seed0.json").exists()
  resumed = run_cli("sweep", "--config", spec, "--out", str(stopped))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[whole_only-seed0] [whole] resuming at step 1/6" in resumed.stdout
  assert "starts from scratch" in resumed.stdout  # seed 1, not yet begun
  for name in ("whole_only-seed0", "whole_only-seed1"):
    got = _json(stopped / "records" / f"{name}.json")
    want = _json(out / "records" / f"{name}.json")
    assert got["config_digest"] == want["config_digest"]
    assert got["curve"] and math.isfinite(got["curve"][-1]["val_loss"])
    assert_same_science(got, want)
  assert _json(stopped / "records" / "whole_only-seed0.json")["resumed"]


def test_records_of_a_committed_sweep_continue_in_a_new_folder(first, sweep_file, tmp_path):
  """--records DIR: a copy of another folder's records counts as finished runs (checked as
  such and copied into OUT/records), so a new folder continues a committed sweep; a record of
  another run, of another config or differing from OUT's own is refused before any work."""
  out, _ = first
  spec = f"{sweep_file}:whole_only"
  given = tmp_path / "committed"
  given.mkdir()
  for name in ("whole_only-seed0", "whole_only-seed1"):
    shutil.copy(out / "records" / f"{name}.json", given / f"{name}.json")
  new = tmp_path / "new"
  result = run_cli("sweep", "--config", spec, "--out", str(new), "--records", str(given))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stdout.count("finished before: skipped") == 2 and " training (" not in result.stdout
  for name in ("whole_only-seed0", "whole_only-seed1"):
    assert _json(new / "records" / f"{name}.json") == _json(given / f"{name}.json")
  assert _json(new / "results.json")["finished_runs"] == 2
  assert not (new / "runs").exists(), "nothing trained"

  refused = tmp_path / "refused"
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  shutil.copy(out / "records" / "cascade-seed0.json", wrong / "cascade-seed0.json")
  one_line_error(run_cli("sweep", "--config", spec, "--out", str(refused), "--records",
                         str(wrong)),
                 f"--records {wrong}: cascade-seed0.json is not a run of this sweep (its runs: "
                 "whole_only-seed0, whole_only-seed1)")
  os.remove(wrong / "cascade-seed0.json")
  record = _json(given / "whole_only-seed1.json")
  record["config"]["model"]["base_width"] = 8
  (wrong / "whole_only-seed1.json").write_text(json.dumps(record))
  one_line_error(run_cli("sweep", "--config", spec, "--out", str(refused), "--records",
                         str(wrong)),
                 f"{wrong}/whole_only-seed1.json is a finished run of another config "
                 "(differing: model.base_width)")
  assert not refused.exists()
  one_line_error(run_cli("sweep", "--config", spec, "--out", str(new), "--records", str(wrong)),
                 f"--records {wrong}: whole_only-seed1.json differs from "
                 "records/whole_only-seed1.json of --out")
  one_line_error(run_cli("sweep", "--config", spec, "--out", str(refused), "--records",
                         str(tmp_path / "none")), "is not a folder")


def test_refusals_are_one_line_with_exit_2_and_write_nothing(sweep_file, tmp_path):
  out = tmp_path / "out"
  one_line_error(run_cli("sweep", "--config", "configs/lits_local.py", "--out", str(out)),
                 "config file configs/lits_local.py declares no sweep: add get_sweep(arg=None)")
  foreign = tmp_path / "mine"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("mine")
  one_line_error(run_cli("sweep", "--config", sweep_file, "--out", str(foreign)),
                 f"--out {foreign} holds files the sweep did not write (notes.txt)")
  assert os.listdir(foreign) == ["notes.txt"]
  one_line_error(run_cli("sweep", "--config", sweep_file, "--out", str(out),
                         "--config.data.test_fraction=0"),
                 "no held-out test split (config.data.test_fraction=0.0)")
  one_line_error(run_cli("sweep", "--config", sweep_file, "--out", str(out),
                         "--config.stages.*.patch_sise=8"),
                 "unknown config key stages.*.patch_sise")
  one_line_error(run_cli("sweep", "--config", sweep_file, "--out", str(out),
                         "--config.model.depht=2"),
                 "run whole_only-seed0: unknown config key model.depht (did you mean "
                 "model.depth?)")
  bad = tmp_path / "bad_sweep.py"
  bad.write_text(TINY_SWEEP.replace("reference=regimes[0]", "reference='three_stage'"))
  one_line_error(run_cli("sweep", "--config", str(bad), "--out", str(out)),
                 "reference 'three_stage' is not a regime of its runs (whole_only, cascade)")
  assert not out.exists()


def test_the_shipped_configs_declare_their_sweeps(tmp_path):
  """No training: configs/synthetic.py's sweep is every regime x seeds 0-4 at one budget on the
  demo's data in a folder of its own, scored on 64 synthetic held-out cases;
  configs/lits_three_stage.py's adds the cascade from configs/lits_cascade.py."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top
  declared = sweep.load_sweep("configs/synthetic.py")
  assert declared.regimes == list(synthetic.SWEEP_REGIMES) and declared.reference == "three_stage"
  assert declared.seeds == list(synthetic.SWEEP_SEEDS) == [0, 1, 2, 3, 4]
  assert len(declared.runs) == len(synthetic.SWEEP_REGIMES) * 5
  assert [r.name for r in declared.runs[:2]] == ["three_stage-seed0", "whole_only-seed0"]
  out = str(tmp_path / "experiment")
  configs = {r.name: sweep.run_config(declared, r, out) for r in declared.runs}
  datas = {json.dumps(c.data.to_dict(), sort_keys=True) for c in configs.values()}
  assert len(datas) == 1
  config = configs["three_stage-seed3"]
  assert config.seed == 3 and config.data.lits_dir == f"{out}/data/lits"
  default = config_loading.load_config_file("configs/synthetic.py")
  for key in ("synthetic", "spacing_mm", "val_fraction", "test_fraction", "normalisation"):
    assert config.data[key] == default.data[key], "the demo's data, in the sweep's folder"
  assert declared.held_out == tuple(sorted(synthetic.SWEEP_HELD_OUT.items()))
  held_out = sweep.held_out_settings(declared, config, out)
  assert held_out["folder"] == f"{out}/data/held_out" and held_out["seed"] != 0
  assert held_out["generator"]["size"] == config.data.synthetic.size
  assert held_out["generator"]["max_tumours"] == 16
  for name, c in configs.items():
    assert sum(c.stages[n].steps for n in c.curriculum) == synthetic.SWEEP_STEPS, name
  cascade = configs["cascade-seed0"]
  assert [cascade.stages[n].steps for n in cascade.curriculum] == [
      synthetic.SWEEP_STEPS // 2, synthetic.SWEEP_STEPS - synthetic.SWEEP_STEPS // 2]
  assert [configs["three_stage-seed0"].stages[n].steps for n in ("whole1", "patch", "whole2")
          ] == [synthetic.SWEEP_STEPS // 3] * 3

  from configs import lits_three_stage  # pylint: disable=g-import-not-at-top
  lits = sweep.load_sweep("configs/lits_three_stage.py")
  assert lits.regimes == list(lits_three_stage.SWEEP_REGIMES) and "cascade" in lits.regimes
  assert lits.seeds == list(lits_three_stage.SWEEP_SEEDS)
  (tmp_path / "lits").mkdir()
  overrides = [("data.lits_dir", str(tmp_path / "lits")), ("data.tfds_dir", str(tmp_path))]
  configs = {r.name: sweep.run_config(lits, r, out, overrides) for r in lits.runs}
  assert configs["cascade-seed0"].cascade.tumour_stage == "tumour"
  assert all(sum(c.stages[n].steps for n in c.curriculum) == lits_three_stage.SWEEP_STEPS
             for c in configs.values())
  assert {c.data.test_fraction for c in configs.values()} == {
      lits_three_stage.SWEEP_TEST_FRACTION}


def test_scale_steps_and_finished_run_checks():
  config = config_loading.load_config_file("configs/synthetic.py:whole_patch")
  sweep.scale_steps(config, 7)
  assert [config.stages[n].steps for n in config.curriculum] == [3, 4]
  with pytest.raises(sweep.SweepError, match="fewer than the 2 stages"):
    sweep.scale_steps(config, 1)
  # A record saved before a config field existed still matches; data folders never count.
  saved = {"augment": {"enabled": True}, "stages": {"whole": {"steps": 1200}},
           "data": {"lits_dir": "/a", "worker_count": 0}}
  current = {"augment": {"enabled": True, "lesion_scale": [1.0, 1.0], "lesion_invert": 0.0},
             "stages": {"whole": {"steps": 1200}}, "data": {"lits_dir": "/b", "worker_count": 4}}
  assert rundir.config_differences(saved, current, ignore=sweep.NOT_RESULTS) == []
  assert sweep.config_digest(current) == sweep.config_digest(dict(current, data={}))
  current["augment"]["lesion_invert"] = 0.3
  current["stages"]["whole"]["steps"] = 600
  assert rundir.config_differences(saved, current, ignore=sweep.NOT_RESULTS) == [
      "augment.lesion_invert", "stages.whole.steps"]


def test_count_test_lesions_counts_the_cases_the_sweep_scores(first, sweep_file):
  """experiments/count_test_lesions.py, before any training, counts the reference lesions of
  the held-out cases as the sweep's records hold them."""
  sys.path.insert(0, os.path.join(REPO, "experiments"))
  import count_test_lesions  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  out, _ = first
  cases = count_test_lesions.measure(sweep_file, log=lambda m: None)
  record = _json(out / "records" / "whole_only-seed0.json")
  assert [c["case"] for c in cases] == record["case_numbers"]
  assert [c["diameters_mm"] for c in cases] == [
      [lesion["diameter_mm"] for lesion in c["reference_lesions"]] for c in record["cases"]]
  total = count_test_lesions.cumulative(cases)[-1]
  assert {k: total[k] for k in (*stats.BINS, "all")} == stats.lesion_counts(
      stats.case_table(record["cases"]))


def test_runs_scored_on_every_case_of_a_folder(sweep_file, tmp_path):
  """--score_dir: every case of a LiTS folder scores the runs; a finished sweep refuses other
  cases, and the training folder is no held-out folder."""
  held_out = tmp_path / "held_out"
  synth = run_cli("synth", "--out_dir", str(held_out), "--num_cases", "2", "--seed", "7",
                  "--size", "32", "--slices", "16", "--plain_storage")
  assert synth.returncode == 0, synth.stderr
  out = tmp_path / "out"
  spec = f"{sweep_file}:whole_only"
  result = run_cli("sweep", "--config", spec, "--out", str(out), "--score_dir", str(held_out))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert f"scored on 2 held-out cases (every case of {held_out})" in result.stdout
  record = _json(out / "records" / "whole_only-seed1.json")
  assert record["scored_on"] == {"folder": str(held_out)} and record["case_numbers"] == [0, 1]
  assert f"(every case of {held_out})" in (out / "results.md").read_text()
  other = tmp_path / "other"
  assert run_cli("synth", "--out_dir", str(other), "--num_cases", "3", "--size", "32",
                 "--slices", "16", "--plain_storage").returncode == 0
  one_line_error(run_cli("sweep", "--config", spec, "--out", str(out), "--score_dir", str(other)),
                 "whole_only-seed0.json was scored on other cases")
  one_line_error(run_cli("sweep", "--config", spec, "--out", str(out), "--score_dir",
                         str(out / "data" / "lits")), "is the training data folder")


def test_a_declared_held_out_set_is_synthesised_and_scored(sweep_file, tmp_path):
  """held_out=dict(num_cases, seed, max_tumours): the sweep synthesises those cases with the
  runs' generator (another seed) into OUT/data/held_out and scores every run on them."""
  out = tmp_path / "out"
  result = run_cli("sweep", "--config", f"{sweep_file}:held_out", "--out", str(out))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  manifest = _json(out / "data" / "held_out" / "manifest.json")
  assert manifest["seed"] == 7 and manifest["num_cases"] == 3
  assert all(len(c["tumours"]) <= 2 for c in manifest["cases"])
  record = _json(out / "records" / "whole_only-seed0.json")
  assert record["scored_on"] == dict(held_out=dict(num_cases=3, seed=7, max_tumours=2))
  assert record["case_numbers"] == [0, 1, 2]
  assert "3 synthetic held-out cases (generator seed 7" in (out / "results.md").read_text()
  again = run_cli("sweep", "--config", f"{sweep_file}:held_out", "--out", str(out))
  assert again.returncode == 0 and "finished before: skipped" in again.stdout
