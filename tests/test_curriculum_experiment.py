"""benchmarks/curriculum_experiment.py end to end on a tiny budget: runs, test set, paired
statistics, tables, plots, partial results, resume and --summarise_only."""

import json
import os
import shutil
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))
import curriculum_experiment as ce  # noqa: E402
import paired_stats as ps  # noqa: E402
from curriculum_seg import metrics  # noqa: E402
import count_test_lesions  # noqa: E402

SCRIPT = os.path.join(_ROOT, "benchmarks", "curriculum_experiment.py")
TINY = ["--config.data.synthetic.num_cases=4", "--config.data.synthetic.size=32",
        "--config.data.synthetic.slices=16", "--config.data.synthetic.storage_variants=false",
        "--config.data.spacing_mm=None", "--config.data.image_size=32",
        "--config.stages.*.block_size=None", "--config.eval.window=None", "--config.model.depth=2", "--config.model.base_width=4",
        "--config.eval.batch_size=8", "--config.stages.*.patch_size=16",
        "--config.stages.*.patch_jitter=4", "--config.stages.*.crop_size=32",
        "--config.stages.*.crop_margin=2", "--config.stages.*.batch_size=4",
        "--config.stages.*.eval_every=0", "--config.stages.*.log_every=3",
        "--config.stages.*.schedule.warmup_steps=0"]
# Two regimes keep the test short; whole_only stands in for three_stage as the reference.
REGIMES = ["whole_only", "cascade"]
PAIR = "whole_only - cascade"
TEST_CASES = [4, 5]  # --test_cases 2 after the 4 training-folder cases


def experiment(out, *extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--regimes",
                         ",".join(REGIMES), "--reference", "whole_only", "--seeds", "0,1",
                         "--total_steps", "6", "--test_cases", "2", *TINY, *extra],
                        capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
  out = tmp_path_factory.mktemp("experiment")
  result = experiment(out)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def _results(out):
  return json.loads((out / "results.json").read_text())


def test_every_regime_and_seed_is_trained_evaluated_and_tabled(first):
  out, run = first
  result = _results(out)
  assert result["regimes"] == REGIMES and result["seeds"] == [0, 1]
  assert result["complete"] and result["finished_runs"] == result["planned_runs"] == 4
  # Seed by seed; partial results after each of the first three runs, then the final ones.
  assert result["computed_this_invocation"] == [
      "whole_only/seed0", "whole_only/seed1", "cascade/seed0", "cascade/seed1"]  # sorted
  assert [line.split("]")[0] for line in run.stdout.splitlines()
          if line.endswith("done before: skipped") or "] [" in line and "done:" in line] == [
              "[whole_only seed 0", "[cascade seed 0", "[cascade seed 0", "[whole_only seed 1",
              "[cascade seed 1", "[cascade seed 1"]
  assert run.stdout.count("partial results of") == 3
  assert run.stdout.count("results of 4 of 4 runs") == 1
  assert result["machine"]["cores"] >= 1
  runs = result["runs"]
  assert {(r["regime"], r["seed"]) for r in runs} == {(r, s) for r in REGIMES for s in (0, 1)}
  assert all(r["total_steps"] == 6 for r in runs), "the same step budget for every regime"
  cascade = [r for r in runs if r["regime"] == "cascade"][0]
  assert [(s["task"], s["steps"]) for s in cascade["stages"]] == [("liver", 3), ("tumour", 3)]
  assert [n["stage"] for n in cascade["checkpoint"]["networks"]] == ["liver", "tumour"]
  # Curves: tumour validation Dice against the global step; the cascade's tumour network only.
  assert [(p["stage"], p["global_step"]) for p in cascade["curve"]] == [("tumour", 6)]
  whole = [r for r in runs if r["regime"] == "whole_only"][0]
  assert [(p["stage"], p["global_step"]) for p in whole["curve"]] == [("whole", 6)]
  # The data: the default's split of the training folder; the test cases after it.
  data = result["data"]
  assert data["test"] == TEST_CASES
  assert sorted(data["train"] + data["validation"]) == [0, 1, 2, 3]
  assert len(data["validation"]) == 1  # round(0.3 * 4): configs/synthetic.py's val_fraction
  assert all(r["scored_cases"] == TEST_CASES for r in runs)
  assert all([c["case_number"] for c in r["cases"]] == TEST_CASES for r in runs)
  test_dir = out / "data" / "test_lits"
  assert sorted(os.listdir(test_dir)) == sorted(
      [f"volume-{n}.nii.gz" for n in TEST_CASES] + [f"segmentation-{n}.nii.gz" for n in TEST_CASES]
      + ["test_manifest.json"])
  assert data["test_lesions_per_bin"] == data["scored_lesions_per_bin"]
  assert all(r["lesions_per_bin"] == data["scored_lesions_per_bin"] for r in runs)
  assert data["scored_lesions_per_bin"]["all"] > 0
  assert len([d for d in os.listdir(out / "data" / "tfds" / "lits") if d.startswith("ctx")]) == 1
  for regime in REGIMES:
    entry = result["summary"][regime]
    assert entry["seeds"] == [0, 1]
    for key in ps.METRIC_KEYS:
      assert key in entry
    assert entry["dice_per_case"]["n"] == 2 and 0 <= entry["dice_per_case"]["mean"] <= 1
  assert list(result["comparisons"]) == [PAIR]
  comparison = result["comparisons"][PAIR]
  assert comparison["seeds"] == [0, 1] and comparison["n_resamples"] == ps.N_RESAMPLES
  assert comparison["dice_per_case"]["over_cases"]["n_cases"] == 2
  table = (out / "results.md").read_text()
  lines = table.splitlines()
  rows = [line for line in lines if line.startswith("| ") and line.split("|")[1].strip()
          in REGIMES]
  assert [row.split("|")[1].strip() for row in rows] == REGIMES
  assert "tumour Dice per case" in lines[0] and "recall <10mm (IoU>0.5)" in lines[0]
  assert all("±" in row for row in rows)
  assert "Paired differences, over seeds" in table and "Paired differences, over test" in table
  assert table.count("| score | whole_only − cascade |") == 2
  assert "(partial" not in table
  assert any(line.startswith("Command: `python benchmarks/curriculum_experiment.py") for line
             in lines)
  for name in ("results.png", "val_dice.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scores_and_differences_are_computed_from_the_runs_per_case_scores(first):
  """Each run's scores are its per-case records' (and equal evaluate's aggregate); the paired
  differences are paired_stats.compare of those records."""
  out, _ = first
  result = _results(out)
  tables = {}
  for run in result["runs"]:
    table = ps.case_table(run["cases"])
    tables.setdefault(run["regime"], {})[run["seed"]] = table
    assert metrics.json_safe(ps.point_scores(table)) == run["scores"]
    aggregate = json.loads((out / "runs" / run["regime"] / f"seed{run['seed']}" / "eval" /
                            "experiment" / "metrics.json").read_text())["aggregate"]
    scores = {k: float(v) for k, v in run["scores"].items()}
    assert scores["dice_per_case"] == pytest.approx(aggregate["tumour"]["dice_per_case"])
    assert scores["dice_global"] == pytest.approx(aggregate["tumour"]["dice_global"])
    for crit in ps.CRITERIA:
      assert scores[f"recall_{crit}"] == pytest.approx(
          float(aggregate["detection"][crit]["recall"]), nan_ok=True)
      for b in ps.BINS:
        assert scores[f"recall_{crit}_{b}"] == pytest.approx(
            float(aggregate["detection"][crit]["by_diameter"][b]["recall"]), nan_ok=True)
  again = metrics.json_safe(ps.compare(tables["whole_only"], tables["cascade"]))
  assert dict(again, a="whole_only", b="cascade") == result["comparisons"][PAIR]


def test_count_test_lesions_counts_the_test_set_as_the_experiment_does(first):
  out, _ = first
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  _, overrides = config_loading.split_override_args(TINY)
  config = ce.regime_config("whole_only", 0, 6, str(out / "data"), overrides)
  measured = count_test_lesions.measure(config, 2, log=lambda m: None)
  manifest = json.loads((out / "data" / "test_lits" / "test_manifest.json").read_text())
  assert [c["case"] for c in measured] == TEST_CASES
  assert [c["diameters_mm"] for c in measured] == [c["diameters_mm"] for c in manifest["cases"]]
  rows = count_test_lesions.cumulative(measured)
  assert rows[-1]["all"] == manifest["lesions_per_bin"]["all"]


def test_summarise_only_rebuilds_the_statistics_from_the_finished_runs(first, tmp_path):
  """A copy of the runs with a known per-case Dice difference written into their records:
  --summarise_only trains nothing and finds that difference; a missing run gives partial
  results."""
  out, _ = first
  copy = tmp_path / "copy"
  shutil.copytree(out / "runs", copy / "runs")
  for regime, dice in (("whole_only", 0.6), ("cascade", 0.35)):
    for seed in (0, 1):
      path = copy / "runs" / regime / f"seed{seed}" / "experiment.json"
      record = json.loads(path.read_text())
      for i, case in enumerate(record["cases"]):
        case["dice"] = dice + 0.1 * i + 0.01 * seed
      path.write_text(json.dumps(record))
  os.remove(copy / "runs" / "cascade" / "seed1" / "experiment.json")
  run = experiment(copy, "--data_dir", str(out / "data"), "--summarise_only")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "[cascade seed 1] not finished: left out" in run.stdout
  assert "starts from scratch" not in run.stdout and "done:" not in run.stdout
  result = _results(copy)
  assert result["computed_this_invocation"] == [] and not result["complete"]
  assert result["finished_runs"] == 3
  assert (copy / "results.md").read_text().startswith("(partial: 3 of 4 runs finished")
  entry = result["comparisons"][PAIR]["dice_per_case"]
  assert entry["seeds"] == [0]
  assert entry["estimate"] == pytest.approx(0.25)
  assert entry["over_cases"]["excludes_zero"] and entry["over_seeds"]["excludes_zero"]
  assert entry["over_cases"]["low"] == pytest.approx(0.25)  # the same shift in every case
  assert result["summary"]["whole_only"]["dice_per_case"]["values"] == pytest.approx(
      [0.65, 0.66])


def test_a_second_invocation_trains_nothing_and_a_partial_run_resumes(first):
  out, _ = first
  keep = lambda result: (  # noqa: E731
      {r: {k: v for k, v in e.items() if k != "train_seconds"}
       for r, e in result["summary"].items()}, result["comparisons"])
  before = keep(_results(out))
  again = experiment(out)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done before: skipped") == 4
  assert "starts from scratch" not in again.stdout and "step 3/3" not in again.stdout
  assert "partial results of" not in again.stdout and "synthesising" not in again.stdout
  result = _results(out)
  assert result["computed_this_invocation"] == []
  assert keep(result) == before
  # A run whose evaluation never finished: the controller finds it trained, evaluate reruns.
  run = out / "runs" / "cascade" / "seed1"
  os.remove(run / "experiment.json")
  shutil.rmtree(run / "eval")
  resumed = experiment(out)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[cascade seed 1] [liver] already complete" in resumed.stdout
  assert "[cascade seed 1] [tumour] already complete" in resumed.stdout
  assert "starts from scratch" not in resumed.stdout
  result = _results(out)
  assert result["computed_this_invocation"] == ["cascade/seed1"]
  assert keep(result) == before


def test_a_finished_run_of_another_config_or_test_set_is_refused(first):
  out, _ = first
  changed = experiment(out, "--config.model.base_width=6")
  assert changed.returncode == 2
  assert "another config" in changed.stderr and "model.base_width" in changed.stderr
  summarised = experiment(out, "--summarise_only", "--config.model.base_width=6")
  assert summarised.returncode == 2 and "model.base_width" in summarised.stderr


def test_the_default_experiment_data_and_budget():
  """No training: the default experiment keeps configs/synthetic.py's training and validation
  cases, adds 40 test cases after them, and gives every regime the same steps."""
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  default = config_loading.load_config_file(os.path.join(_ROOT, "configs", "synthetic.py"))
  assert len(ce.DEFAULT_SEEDS) >= 5 and ce.DEFAULT_TEST_CASES == 40
  configs = {r: ce.regime_config(r, 3, ce.DEFAULT_TOTAL_STEPS, "/nonexistent/data")
             for r in ce.REGIMES}
  for regime, config in configs.items():
    data = config.data.to_dict()
    assert data.pop("lits_dir") == "/nonexistent/data/lits"
    assert data.pop("tfds_dir") == "/nonexistent/data/tfds"
    want = default.data.to_dict()
    want.pop("lits_dir"), want.pop("tfds_dir")
    assert data == want, regime
    assert config.seed == 3
    assert sum(config.stages[n].steps for n in config.curriculum) == ce.DEFAULT_TOTAL_STEPS
  cascade = configs["cascade"]
  assert [cascade.stages[n].steps for n in cascade.curriculum] == [
      ce.DEFAULT_TOTAL_STEPS // 2, ce.DEFAULT_TOTAL_STEPS - ce.DEFAULT_TOTAL_STEPS // 2]
  numbers = ce.numbers_of_test_cases(configs["three_stage"], ce.DEFAULT_TEST_CASES)
  splits = ce.data_splits(configs["three_stage"], numbers)
  validation = [2, 4, 11, 18, 20, 21, 34, 43]
  assert splits["validation"] == validation
  assert splits["train"] == [n for n in range(48) if n not in validation]
  assert splits["test"] == list(range(48, 88))


def test_a_record_saved_before_a_config_field_existed_still_matches():
  saved = {"augment": {"enabled": True, "flip_lr": 0.5}, "stages": {"whole": {"steps": 1200}}}
  current = {"augment": {"enabled": True, "flip_lr": 0.5, "lesion_scale": [1.0, 1.0],
                         "lesion_invert": 0.0}, "stages": {"whole": {"steps": 1200}}}
  assert ce._differences(saved, current) == []  # pylint: disable=protected-access
  current["augment"]["lesion_invert"] = 0.3
  current["stages"]["whole"]["steps"] = 600
  assert ce._differences(saved, current) == [  # pylint: disable=protected-access
      "augment.lesion_invert", "stages.whole.steps"]
