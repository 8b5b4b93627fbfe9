"""benchmarks/curriculum_experiment.py end to end on a tiny budget: runs, table, plot, resume."""

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "curriculum_experiment.py")
TINY = ["--config.data.synthetic.num_cases=4", "--config.data.synthetic.size=32",
        "--config.data.synthetic.slices=16", "--config.data.synthetic.storage_variants=false",
        "--config.data.image_size=32", "--config.model.depth=2", "--config.model.base_width=4",
        "--config.eval.batch_size=8", "--config.stages.*.patch_size=16",
        "--config.stages.*.patch_jitter=4", "--config.stages.*.crop_size=32",
        "--config.stages.*.crop_margin=2", "--config.stages.*.batch_size=4",
        "--config.stages.*.eval_every=0", "--config.stages.*.log_every=3",
        "--config.stages.*.schedule.warmup_steps=0"]
REGIMES = ["whole_only", "cascade"]


def experiment(out, *extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, SCRIPT, "--out", str(out), "--regimes",
                         ",".join(REGIMES), "--seeds", "0,1", "--total_steps", "6", *TINY,
                         *extra], capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
  out = tmp_path_factory.mktemp("experiment")
  result = experiment(out)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, result


def test_every_regime_and_seed_is_trained_evaluated_and_tabled(first):
  out, _ = first
  result = json.loads((out / "results.json").read_text())
  assert result["regimes"] == REGIMES and result["seeds"] == [0, 1]
  assert sorted(result["computed_this_invocation"]) == sorted(
      f"{r}/seed{s}" for r in REGIMES for s in (0, 1))
  assert result["machine"]["cores"] >= 1
  runs = result["runs"]
  assert {(r["regime"], r["seed"]) for r in runs} == {(r, s) for r in REGIMES for s in (0, 1)}
  assert all(r["total_steps"] == 6 for r in runs), "the same step budget for every regime"
  cascade = [r for r in runs if r["regime"] == "cascade"][0]
  assert [(s["task"], s["steps"]) for s in cascade["stages"]] == [("liver", 3), ("tumour", 3)]
  assert [n["stage"] for n in cascade["checkpoint"]["networks"]] == ["liver", "tumour"]
  # The same held-out cases for every run, from one prepared dataset.
  assert len({r["num_cases"] for r in runs}) == 1
  assert len({json.dumps(r["lesions_per_bin"]) for r in runs}) == 1
  assert len([d for d in os.listdir(out / "data" / "tfds" / "lits") if d.startswith("ctx")]) == 1
  for regime in REGIMES:
    entry = result["summary"][regime]
    assert entry["seeds"] == [0, 1]
    for key in ("dice_per_case", "dice_global", "recall_iou_10-20mm", "recall_any_<10mm",
                "assd_mm"):
      assert key in entry
    assert entry["dice_per_case"]["n"] == 2 and 0 <= entry["dice_per_case"]["mean"] <= 1
  table = (out / "results.md").read_text().splitlines()
  rows = [line for line in table if line.startswith("| ") and not line.startswith("| regime")]
  assert [row.split("|")[1].strip() for row in rows] == REGIMES
  assert "tumour Dice per case" in table[0] and "recall <10mm (IoU>0.5)" in table[0]
  assert all("±" in row for row in rows)
  assert any(line.startswith("Command: `python benchmarks/curriculum_experiment.py") for line
             in table)
  assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_invocation_trains_nothing_and_a_partial_run_resumes(first):
  out, _ = first
  scores = lambda summary: {r: {k: v for k, v in e.items() if k != "train_seconds"}  # noqa
                             for r, e in summary.items()}
  before = scores(json.loads((out / "results.json").read_text())["summary"])
  again = experiment(out)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done before: skipped") == 4
  assert "starts from scratch" not in again.stdout and "step 3/3" not in again.stdout
  result = json.loads((out / "results.json").read_text())
  assert result["computed_this_invocation"] == []
  assert scores(result["summary"]) == before
  # A run whose evaluation never finished: the controller finds it trained, evaluate reruns.
  run = out / "runs" / "cascade" / "seed1"
  os.remove(run / "experiment.json")
  shutil.rmtree(run / "eval")
  resumed = experiment(out)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[cascade seed 1] [liver] already complete" in resumed.stdout
  assert "[cascade seed 1] [tumour] already complete" in resumed.stdout
  assert "starts from scratch" not in resumed.stdout
  result = json.loads((out / "results.json").read_text())
  assert result["computed_this_invocation"] == ["cascade/seed1"]
  assert scores(result["summary"]) == before


def test_a_finished_run_of_another_config_is_refused(first):
  out, _ = first
  changed = experiment(out, "--config.model.base_width=6")
  assert changed.returncode == 2
  assert "another config" in changed.stderr and "model.base_width" in changed.stderr
