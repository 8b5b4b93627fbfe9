"""The cascade baseline: a tiny liver-then-tumour run (per-stage task, best checkpoint by each
stage's own Dice on its own view of the validation cases) and the chained predictor."""

import json

import numpy as np
import pytest

from curriculum_seg import (cascade, checkpoints, config_loading, inference, rundir, stages,
                            trained_run)
from data_pipelines import crops, lits, lits_tfds, pipelines

pytestmark = pytest.mark.slow  # trains runs in its fixtures

STEPS = 6


def tiny_cascade_config(root, **extra):
  overrides = {
      "data.lits_dir": f"{root}/lits", "data.tfds_dir": f"{root}/tfds",
      "data.synthetic.num_cases": "4", "data.synthetic.size": "32",
      "data.synthetic.slices": "16", "data.synthetic.storage_variants": "false",
      "data.image_size": "32", "data.spacing_mm": "None", "data.val_fraction": "0.25",
      "model.depth": "2", "model.base_width": "4", "eval.batch_size": "8",
      "stages.tumour.crop_size": "32", "stages.tumour.crop_margin": "2",
      "stages.liver.block_size": "None", "eval.window": "None"}
  for name in ("liver", "tumour"):
    overrides.update({f"stages.{name}.steps": str(STEPS), f"stages.{name}.batch_size": "4",
                      f"stages.{name}.eval_every": "2", f"stages.{name}.checkpoint_every": "2",
                      f"stages.{name}.log_every": "1", f"stages.{name}.schedule.warmup_steps": "0"})
  overrides.update(extra)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  return config_loading.apply_overrides(
      config_loading.load_config_file("configs/synthetic_cascade.py"), overrides.items())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("cascade")
  config = tiny_cascade_config(root)
  lines = []
  results = stages.train(config, root / "run", log=lines.append)
  return root / "run", config, results, lines


def test_a_cascade_run_trains_a_liver_network_then_a_tumour_network(run):
  workdir, _, results, lines = run
  assert [(r.name, r.task) for r in results] == [("liver", "liver"), ("tumour", "tumour")]
  assert "[tumour] starts from scratch" in lines
  assert any("val liver dice" in line for line in lines)
  summary = json.loads((workdir / "summary.json").read_text())
  assert [s["task"] for s in summary["stages"]] == ["liver", "tumour"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["stages"]["liver"]["model"] == {"task": "liver"}
  assert saved["cascade"] == {"liver_stage": "liver", "tumour_stage": "tumour"}


def _restore(workdir, config, name, which):
  controller = stages.Controller(config, workdir, log=lambda s: None)
  stage = config.stages[name]
  store = checkpoints.StageCheckpoints(workdir / "checkpoints", name, read_only=True)
  state, meta = store.restore(controller._abstract_state(stage, controller._tx(stage)), which)
  return controller, state, meta


def _dice(inter, pred_sum, target_sum):
  return 2 * inter / (pred_sum + target_sum) if pred_sum + target_sum else 1.0


def _global_dice_range(controller, state, stage, foreground, stream):
  """Hard global Dice of `foreground(label)` over a stream, computed here, not by the step: the
  lowest and the highest it can be. The step's compiled program rounds the logits otherwise than
  this one (by up to 1.5e-5 on these tiny networks), so a pixel whose two logits are under 1e-4
  apart may fall in either class: the range spans every way such pixels can fall."""
  model = controller.model_for(stage)
  inter = pred_sum = target_sum = tie_in = tie_out = 0
  for batch in stream:
    logits = np.asarray(model.apply({"params": state.params}, batch["image"], train=False))
    real = batch["mask"][:, None, None] > 0
    tie = (np.abs(logits[..., 1] - logits[..., 0]) < 1e-4) & real
    pred = (logits.argmax(-1) == 1) & real & ~tie
    target = foreground(batch["label"]) & real
    inter += int((pred & target).sum())
    pred_sum += int(pred.sum())
    target_sum += int(target.sum())
    tie_in += int((tie & target).sum())
    tie_out += int((tie & ~target).sum())
  # Predicting a target pixel raises the Dice, predicting any other pixel lowers it.
  return (_dice(inter, pred_sum + tie_out, target_sum),
          _dice(inter + tie_in, pred_sum + tie_in, target_sum))


def test_each_stage_keeps_its_best_by_its_own_task_dice(run):
  workdir, config, _, _ = run
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  rows = rundir.MetricsLog(workdir).read()
  for name, foreground in (("liver", lambda lb: lb >= 1), ("tumour", lambda lb: lb == 2)):
    stage = config.stages[name]
    scores = [r["val_dice"] for r in rows if r["stage"] == name and "val_dice" in r]
    assert len(scores) == STEPS // 2
    controller, state, meta = _restore(workdir, config, name, "best")
    assert meta["best_score"] == max(scores)
    stream = pipelines.make_eval_pipeline(
        builder, config.data, "validation", 8, 0, 1,
        stage_cfg=stage if stage.pipeline == "liver_crop" else None)
    if name == "tumour":
      assert stream.info["pipeline"] == "eval_liver_crop" and stream.info["out_size"] == 32
    lowest, highest = _global_dice_range(controller, state, stage, foreground, stream)
    # The step's Dice (float32) for one of the ways the tie pixels can fall.
    assert lowest - 1e-6 <= meta["best_score"] <= highest + 1e-6, (lowest, highest, meta)


@pytest.fixture(scope="module")
def case(run):
  workdir, config, _, _ = run
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  number = builder.info.metadata["splits"]["validation"][0]
  return lits.load_case(f"{config.data.lits_dir}/volume-{number}.nii.gz",
                        f"{config.data.lits_dir}/segmentation-{number}.nii.gz")


def test_the_cascade_predictor_segments_a_case(run, case):
  workdir, _, _, _ = run
  predictor = trained_run.load_predictor(workdir)
  assert isinstance(predictor, cascade.CascadePredictor)
  assert predictor.predicts_liver and set(predictor.networks) == {"liver", "tumour"}
  assert predictor.liver_network.task == "liver" and predictor.tumour_network.task == "tumour"
  assert (predictor.crop_size, predictor.crop_margin) == (32, 2)
  assert "cascade" in predictor.describe()
  labels = predictor.predict_case(case)
  assert labels.shape == case.image.shape and labels.dtype == np.uint8
  assert set(np.unique(labels)) <= {0, 1, 2}
  liver = case.labels >= 1
  given = predictor.predict_case(case, liver=liver)  # a given liver bounds the tumour
  assert ((given >= 1) == liver).all()
  latest = cascade.load_cascade_predictor(workdir, which="latest")
  assert {n.which for n in latest.networks.values()} == {"latest"}


def test_the_tumour_network_sees_the_liver_box_and_maps_back_into_it(run, case):
  """With stand-in tumour networks, the cascade's crop and un-crop land on the right voxels."""
  workdir, _, _, _ = run
  predictor = cascade.load_cascade_predictor(workdir)
  net = predictor.tumour_network
  liver = case.labels >= 1
  box = predictor.crop_box(liver)
  assert box == crops.liver_box(liver, 2)  # stored grid = the case's grid here (32 x 32)

  def constant(p):
    def fake(stacks, options=None):
      probs = np.zeros(stacks.shape[:3] + (2,), np.float32)
      probs[..., 1] = p
      probs[..., 0] = 1 - p
      return probs
    return fake

  net.slice_probabilities = constant(1.0)  # tumour everywhere in the crop: the whole liver
  labels = predictor.predict_case(case, liver=liver)
  np.testing.assert_array_equal(labels, np.where(liver, 2, 0))
  net.slice_probabilities = constant(0.0)
  np.testing.assert_array_equal(predictor.predict_case(case, liver=liver), liver.astype(np.uint8))

  # "tumour" wherever the crop is brighter than 100 HU, in the network's own input units
  threshold = float(net.normaliser(np.array([100.0], np.float32))[0])

  def echo(stacks, options=None):
    bright = (stacks[..., stacks.shape[-1] // 2] > threshold).astype(np.float32)
    return np.stack([1 - bright, bright], -1)

  net.slice_probabilities = echo
  got = predictor.predict_case(case, liver=liver) == 2
  expected = (case.image > 100) & liver
  assert expected.sum() > 50
  dice = 2 * (got & expected).sum() / (got.sum() + expected.sum())
  assert dice > 0.9, dice


def test_cascade_errors_are_clear(run):
  workdir, config, _, _ = run
  broken = config_loading.apply_overrides(config, [("cascade.tumour_stage", "tumor")])
  with pytest.raises(inference.InferenceError, match=r"config\.cascade\.tumour_stage='tumor'"):
    cascade.load_cascade_predictor(workdir, broken)
  with pytest.raises(inference.InferenceError, match="--stage"):
    trained_run.load_predictor(workdir, stage="liver")


def test_a_cascade_on_a_target_spacing_trains_validates_and_segments(tmp_path):
  """The same cascade with slices resampled to a spacing (sizes differ per case): the liver
  network trains on blocks, the tumour network on liver crops of padded slices, both are
  validated by sliding window, and the predictor segments a volume on its own grid."""
  config = tiny_cascade_config(tmp_path, **{
      "data.image_size": None, "data.spacing_mm": "(12.0, 12.0)",
      "stages.liver.block_size": "(16, 16)", "eval.window": "(16, 16)",
      "stages.liver.steps": "2", "stages.tumour.steps": "2"})
  lines = []
  stages.train(config, tmp_path / "run", log=lines.append)
  rows = rundir.MetricsLog(tmp_path / "run").read()
  assert {r["stage"] for r in rows if "val_dice" in r} == {"liver", "tumour"}
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  sizes = {tuple(r[5:7]) for r in builder.info.metadata["index"]["train"]["cases"]}
  assert len(sizes) > 1, "slices of several sizes"
  number = builder.info.metadata["splits"]["validation"][0]
  case = lits.load_case(f"{config.data.lits_dir}/volume-{number}.nii.gz")
  predictor = trained_run.load_predictor(tmp_path / "run")
  labels = predictor.predict_case(case)
  assert labels.shape == case.image.shape and set(np.unique(labels)) <= {0, 1, 2}
  liver = case.labels >= 1 if case.labels is not None else predictor.predict_liver(case.image,
                                                                                   case.spacing)
  box = predictor.crop_box(liver, case.spacing)
  assert box is None or box[2] > box[0]
