"""experiments/learning.py: recipes resolve to the configs they name, and the summary of known
curves (Dice at steps, plateau, seconds to a Dice) is what the curves say."""

import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import learning  # noqa: E402  pylint: disable=wrong-import-position


def test_recipes_resolve_to_their_settings():
  new = learning.recipe_config("new", 2, 1200, 100, "three_stage", "/tmp/d")
  old = learning.recipe_config("old", 2, 1200, 100, "three_stage", "/tmp/d")
  assert [new.stages[n].steps for n in new.curriculum] == [400, 400, 400]
  assert new.seed == old.seed == 2 and new.data.lits_dir == "/tmp/d/lits"
  assert (new.loss.name, new.model.input_stride, new.stages.whole1.tumour_fraction) == (
      "dice_ce", 1, 0.5)
  config = learning.recipe_config("stride2", 2, 1200, 100, "whole_only", "/tmp/d")
  assert config.model.input_stride == 2
  assert (old.loss.name, old.loss.dice_smooth, old.loss.class_weights) == ("dice", 1.0, None)
  assert (old.model.input_stride, old.model.foreground_prior) == (1, None)
  assert old.stages.whole1.tumour_fraction == old.stages.whole2.tumour_fraction == 0.0
  assert old.stages.patch.schedule.name == "constant"
  assert all(old.stages[n].eval_every == 100 for n in old.curriculum)
  with pytest.raises(learning.LearningError, match="unknown recipe"):
    learning.recipe_config("newest", 0, 10, 5, "whole_only", None)


def _curve(values, seconds_per_step=0.5, every=100):
  return [dict(step=every * (k + 1), stage="whole", seconds=every * (k + 1) * seconds_per_step,
               val_dice=v) for k, v in enumerate(values)]


def test_summary_reads_the_curves():
  runs = {"a": {0: dict(curve=_curve([0.1, 0.4, 0.6, 0.8, 0.8]), steps_per_s=2.0, steps=500),
                1: dict(curve=_curve([0.0, 0.2, 0.6, 0.7, 0.9]), steps_per_s=4.0, steps=500)},
          "b": {0: dict(curve=_curve([0.0] * 5), steps_per_s=1.0, steps=500)}}
  summary = learning.summarise(runs)
  a, b = summary["a"], summary["b"]
  assert a["dice_at_250"]["values"] == pytest.approx([0.5, 0.4])  # interpolated
  assert math.isnan(a["dice_at_1000"]["mean"]), "beyond the runs' last step"
  assert a["best_dice"]["values"] == [0.8, 0.9]
  assert a["final_dice"]["mean"] == pytest.approx(0.85)
  # mean curve 0.05, 0.3, 0.6, 0.75, 0.85: 95 % of 0.85 is 0.8075, first reached at step 500
  assert a["plateau_step"] == 500
  assert a["seconds_to_0.5"]["values"] == [150.0, 150.0]
  assert a["steps_per_s"]["mean"] == 3.0
  assert b["plateau_step"] is None
  assert all(math.isnan(v) for v in b["seconds_to_0.3"]["values"]), "never reached: NaN"
  table = learning.markdown_table(summary, 500, "cmd", dict(cpu="X", cores=2,
                                                             load_average=(1.0, 1.0, 1.0)))
  assert "| a | 2 | 0.450 ± 0.071 |" in table and "n/a" in table


def test_a_finished_run_is_reused_only_at_the_length_asked(tmp_path, monkeypatch):
  import json  # pylint: disable=g-import-not-at-top
  from curriculum_seg import rundir, stages  # pylint: disable=g-import-not-at-top

  def no_training(*args, **kwargs):
    raise AssertionError("a finished run of the asked length must not be retrained")
  monkeypatch.setattr(stages, "train", no_training)
  finished = learning.recipe_config("new", 0, 300, 100, "whole_only", str(tmp_path / "d"))
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(rundir.config_to_json(finished)))
  (workdir / "summary.json").write_text("{}")
  (workdir / "metrics.jsonl").write_text(
      json.dumps(dict(global_step=100, stage="whole", elapsed_s=5.0, val_dice=0.5)) + "\n")
  again = learning.train_one(finished, str(workdir), print)
  assert again["steps"] == 300 and [p["val_dice"] for p in again["curve"]] == [0.5]
  longer = learning.recipe_config("new", 0, 1200, 100, "whole_only", str(tmp_path / "d"))
  with pytest.raises(learning.LearningError, match=r"other stage lengths \(\{'whole': 300\}\).*"
                                                   r"\{'whole': 1200\}"):
    learning.train_one(longer, str(workdir), print)
