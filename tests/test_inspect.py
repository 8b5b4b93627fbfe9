"""curriculum_seg.inspect: a tiny three-stage run trained on 8 virtual CPU devices and read here
on 1; what the run object lists; the plots' content; the notebook executed against the run; a
read-only workdir that nothing changes, and no training pipeline unless batches are asked for."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.contour import ContourSet  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from curriculum_seg import inference, inspect  # noqa: E402
from data_pipelines import lits, lits_tfds, pipelines  # noqa: E402

pytestmark = pytest.mark.slow  # trains runs in its fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
STAGES = ("whole1", "patch", "whole2")


def inspect_overrides(tiny_overrides, root):
  """The tiny run with batches of 8 (one row per virtual device) and 4 steps a stage."""
  extra = {}
  for name in STAGES:
    extra.update({f"stages.{name}.steps": str(STEPS), f"stages.{name}.batch_size": "8",
                  f"stages.{name}.eval_every": "2", f"stages.{name}.checkpoint_every": "2"})
  return tiny_overrides(root, **extra)


# Trains on 8 virtual CPU devices and, at every checkpoint save, writes the saved parameters as
# numpy (what the 8-device state held) and the number of devices each array lived on.
_TRAIN = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from curriculum_seg import checkpoints, config_loading, stages
    workdir, overrides, dump = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    config = config_loading.apply_overrides(
        config_loading.load_config_file("configs/synthetic.py"), overrides.items())
    original_save = checkpoints.StageCheckpoints.save
    devices = set()
    def save(self, step, state, meta, best=False):
      leaves = jax.tree_util.tree_flatten_with_path(dict(params=state.params,
                                                         batch_stats=state.batch_stats))[0]
      devices.update(len(x.sharding.device_set) for _, x in leaves)
      np.savez(os.path.join(dump, f"{self.stage}-{step}.npz"),
               **{jax.tree_util.keystr(p): np.asarray(jax.device_get(x)) for p, x in leaves})
      original_save(self, step, state, meta, best)
    checkpoints.StageCheckpoints.save = save
    stages.train(config, workdir, log=lambda m: print(m, flush=True))
    print(json.dumps(dict(device_count=jax.device_count(), state_devices=sorted(devices))))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_overrides):
  """(workdir, dump folder, subprocess report) of a tiny run trained on 8 CPU devices."""
  root = tmp_path_factory.mktemp("inspect")
  workdir, dump = root / "run", root / "saved"
  dump.mkdir()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="2")
  overrides = json.dumps(inspect_overrides(tiny_overrides, root))
  result = subprocess.run([sys.executable, "-c", _TRAIN, str(workdir), overrides, str(dump)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, dump, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(trained):
  return inspect.load_run(trained[0])


def snapshot(directory):
  """Every file and folder under `directory` with its size and modification time."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(directory):
    for name in dirnames + filenames:
      path = os.path.join(dirpath, name)
      st = os.lstat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


def flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tumour_case(run):
  """A case of the run's data with tumour (the synthetic cases all have some)."""
  number, volume, segmentation = run.cases("validation")[0]
  case = lits.load_case(volume, segmentation)
  assert (case.labels == 2).any()
  return case


def test_checkpoints_written_on_8_devices_restore_on_1(trained, run):
  _, dump, report = trained
  assert report["device_count"] == 8 and report["state_devices"] == [8]
  assert jax.device_count() == 1
  assert len(run.checkpoints) >= 3 * len(STAGES)
  for c in run.checkpoints:
    saved = np.load(dump / f"{c.stage}-{c.step}.npz")
    variables = run.variables(stage=c.stage, step=c.step, which=c.which)
    got = flat(dict(params=variables["params"], batch_stats=variables.get("batch_stats", {})))
    assert sorted(got) == sorted(saved.files)
    for key, value in got.items():
      assert value.devices() == {jax.local_devices(backend="cpu")[0]}
      np.testing.assert_array_equal(np.asarray(value), saved[key])  # bitwise
  default = flat(run.params())
  stage, which, step = run.chosen
  for key, value in flat(run.params(stage=stage, step=step, which=which)).items():
    np.testing.assert_array_equal(np.asarray(default[key]), np.asarray(value))


def test_run_lists_config_stages_checkpoints_and_history(trained, run):
  workdir = trained[0]
  assert list(run.config.curriculum) == list(STAGES)
  assert run.complete and run.summary is not None
  assert run.chosen == inference.chosen_checkpoint(workdir)
  # summary.json names the checkpoint evaluate and predict use, with its path
  (used,) = run.summary["checkpoints"]
  assert (used["stage"], used["which"], used["step"]) == run.chosen
  assert os.path.isdir(used["path"]) and os.path.isabs(used["path"])
  assert run.summary["stages"][-1]["chosen"] == used["which"]
  assert [s.name for s in run.stages] == list(STAGES)
  assert [s.pipeline for s in run.stages] == ["whole", "patch", "whole"]
  assert [s.task for s in run.stages] == ["tumour"] * 3
  assert [s.start for s in run.stages] == [0, STEPS, 2 * STEPS]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert run.history == rows
  for s, summary in zip(run.stages, run.summary["stages"]):
    assert s.completed and s.steps_done == STEPS
    assert (s.best_step, s.best_val_dice) == (summary["best_step"], summary["best_score"])
    assert [c.step for c in s.checkpoints if c.which == "latest"] == [2, STEPS]
    best = [c for c in s.checkpoints if c.which == "best"]
    assert [c.step for c in best] == [s.best_step]
    for c in s.checkpoints:  # each checkpoint's score is the one logged at its step
      logged = [r["val_dice"] for r in rows if r["stage"] == s.name and r["step"] == c.step
                and "val_dice" in r]
      assert c.val_dice == logged[0] and c.global_step == s.start + c.step
    # The stage hands on the checkpoint the next stage's init names (whole1 its best for
    # the patch stage; the patch stage its latest for whole2); the last stage its best, the
    # one the run hands out.
    chosen = [c for c in s.checkpoints if c.chosen]
    assert len(chosen) == 1 and chosen[0] == s.chosen
    nxt = run.stages[s.index + 1].init if s.index + 1 < len(run.stages) else "best"
    assert (chosen[0].which, chosen[0].step) == (
        ("latest", STEPS) if nxt == "last" else ("best", s.best_step))
  assert [s.init for s in run.stages] == ["scratch", "best", "last"]
  assert run.chosen == ("whole2", "best", run.stages[-1].best_step)
  steps, losses = run.series("loss", "patch")
  assert list(steps) == [STEPS + k for k in range(1, STEPS + 1)]
  assert list(losses) == [r["loss"] for r in rows if r["stage"] == "patch" and "loss" in r]
  for s in run.stages:  # stages that start from a checkpoint evaluate it at their step 0
    start = [r["val_dice"] for r in rows if r["stage"] == s.name and r["step"] == 0]
    assert start == ([] if s.init == "scratch" or s.index == 0 else [s.start_val_dice])
  assert run.stages[0].start_val_dice is None and run.stages[1].start_val_dice is not None
  text = repr(run)
  assert "whole1" in text and "<- chosen" in text and "hands out whole2's best" in text


def test_plot_history_has_a_line_per_stage_and_the_boundaries(run):
  fig = run.plot_history()
  ax_loss, ax_val = fig.axes[:2]
  for ax, key in ((ax_loss, "loss"), (ax_val, "val_dice")):
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in STAGES}
    assert sorted(lines) == sorted(STAGES)
    for name, line in lines.items():
      x, y = run.series(key, name)
      np.testing.assert_array_equal(line.get_xdata(), x)
      np.testing.assert_array_equal(line.get_ydata(), y)
    boundaries = [line for line in ax.get_lines() if line.get_gid() == inspect.BOUNDARY_GID]
    assert sorted(line.get_xdata()[0] for line in boundaries) == [STEPS, 2 * STEPS]
  stars = [line for line in ax_val.get_lines() if line.get_label() == "chosen checkpoint"]
  assert len(stars) == 1 and len(stars[0].get_xdata()) == len(STAGES)
  legend = [t.get_text() for t in ax_loss.get_legend().get_texts()]
  assert legend == list(STAGES) + ["stage boundary"]
  plt.close(fig)


def _bbox(points):
  return np.concatenate([points.min(axis=0), points.max(axis=0)])


def test_plot_slice_draws_reference_and_predicted_contours(run):
  case = tumour_case(run)
  shifted = np.roll(case.labels, 3, axis=0)  # a "prediction" 3 voxels off along x
  fig = run.plot_slice(case, prediction=shifted)
  ax = fig.axes[0]
  z = int((case.labels == 2).sum(axis=(0, 1)).argmax())
  assert f"z={z}" in ax.get_title()
  np.testing.assert_array_equal(ax.images[0].get_array(), case.image[:, :, z].T)
  contours = {c.get_label(): c for c in ax.collections if isinstance(c, ContourSet)}
  assert sorted(contours) == ["predicted liver", "predicted tumour", "reference liver",
                              "reference tumour"]
  for name, volume in (("reference", case.labels), ("predicted", shifted)):
    for part, mask in (("liver", volume[:, :, z] >= 1), ("tumour", volume[:, :, z] == 2)):
      xs, ys = np.nonzero(mask)
      vertices = np.concatenate([p.vertices for p in contours[f"{name} {part}"].get_paths()])
      # The 0.5 iso-line runs half a voxel outside the mask's outer voxel centres.
      np.testing.assert_allclose(_bbox(vertices),
                                 [xs.min() - .5, ys.min() - .5, xs.max() + .5, ys.max() + .5],
                                 atol=0.51)
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert legend == ["reference liver", "reference tumour", "predicted liver", "predicted tumour"]
  plt.close(fig)
  fig = run.plot_slice(case, z=3, prediction=False)  # reference only, any slice
  assert "z=3" in fig.axes[0].get_title()
  assert all(c.get_label().startswith("reference") for c in fig.axes[0].collections
             if isinstance(c, ContourSet))
  plt.close(fig)


def test_predict_takes_a_path_a_case_or_an_array_and_plot_slice_uses_it(run):
  number, volume, segmentation = run.cases("validation")[0]
  case = lits.load_case(volume, segmentation)
  from_path = run.predict(volume)
  assert from_path.shape == case.image.shape and from_path.dtype == np.uint8
  assert set(np.unique(from_path)) <= {0, 1, 2}
  np.testing.assert_array_equal(run.predict(case), from_path)
  np.testing.assert_array_equal(run.predict(case.image, case.spacing), from_path)
  with pytest.raises(ValueError, match="spacing"):
    run.predict(case.image)
  fig = run.plot_slice(volume)  # finds segmentation-N beside volume-N; predicts
  ax = fig.axes[0]
  stage, which, step = run.chosen
  assert f"prediction: stage {stage} {which} checkpoint at step {step}" in ax.get_title()
  labels = {c.get_label() for c in ax.collections if isinstance(c, ContourSet)}
  assert {"reference liver", "reference tumour"} <= labels
  assert ("predicted tumour" in labels) == bool((from_path == 2).any())
  plt.close(fig)


def test_plot_batches_shows_whole_and_patch_batches(run):
  fig = run.plot_batches(examples=3)
  axes = np.array(fig.axes).reshape(2, 3)
  lo, hi = run.network().normaliser.range  # batches are in the run's normalised units
  for row, (stage, size) in enumerate((("whole1", 32), ("patch", 16))):
    assert axes[row, 0].get_ylabel().startswith(stage)
    batch = run.batch(stage)
    assert batch["image"].shape == (8, size, size, 3) and batch["label"].shape == (8, size, size)
    assert lo <= batch["image"].min() < batch["image"].max() <= hi
    for col in range(3):
      image, overlay = axes[row, col].images
      np.testing.assert_array_equal(image.get_array(), batch["image"][col, :, :, 1].T)
      np.testing.assert_array_equal(np.ma.filled(overlay.get_array(), 0), batch["label"][col].T)
  patch = run.batch("patch")
  assert (patch["label"] == 2).any(axis=(1, 2)).sum() >= 4, "positive_fraction 0.7 of 8 rows"
  plt.close(fig)
  fig = run.plot_batches("whole2", examples=2, position=1)
  assert len(fig.axes) == 2 and fig.axes[0].get_ylabel().startswith("whole2")
  plt.close(fig)


def test_without_the_prepared_dataset_batches_are_a_clear_error(trained, tmp_path):
  config = json.loads((trained[0] / "config.json").read_text())
  config["data"]["tfds_dir"] = str(tmp_path / "empty")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(config))
  fresh = inspect.load_run(workdir)  # a run that has not trained yet
  assert fresh.chosen is None and fresh.history == []
  assert all(not s.checkpoints and s.steps_done == 0 for s in fresh.stages)
  with pytest.raises(FileNotFoundError, match="not prepared.*curriculum-seg prepare"):
    fresh.plot_batches()
  with pytest.raises(KeyError, match="not in the run's curriculum"):
    fresh.stage("whole3")
  with pytest.raises(inference.InferenceError, match="no config.json"):
    inspect.load_run(tmp_path / "nothing")


def test_reading_a_read_only_workdir_changes_nothing_and_builds_no_pipeline(trained,
                                                                            monkeypatch):
  workdir = trained[0]
  before = snapshot(workdir)
  subprocess.run(["chmod", "-R", "a-w", str(workdir)], check=True)
  try:
    def refuse(*args, **kwargs):
      raise AssertionError("inspect built a pipeline or prepared data")
    for module, name in ((pipelines, "make_train_pipeline"), (pipelines, "make_eval_pipeline"),
                         (lits_tfds, "prepare"), (lits_tfds, "builder_for")):
      monkeypatch.setattr(module, name, refuse)
    fresh = inspect.load_run(workdir)
    fresh.describe()
    fresh.params()
    for c in fresh.stage("patch").checkpoints:  # (test 1 restores every checkpoint)
      fresh.params(stage=c.stage, step=c.step, which=c.which)
    case = tumour_case(fresh)
    plt.close(fresh.plot_history())
    plt.close(fresh.plot_slice(case))
    monkeypatch.undo()
    plt.close(fresh.plot_batches())  # reads the dataset, not the workdir
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(workdir)], check=True)
  assert snapshot(workdir) == before


def test_notebook_executes_against_a_tiny_run(trained, monkeypatch):
  import nbclient  # pylint: disable=g-import-not-at-top  (the 'test' extra; a skip would hide rot)
  import nbformat  # pylint: disable=g-import-not-at-top
  workdir = trained[0]
  before = snapshot(workdir)
  monkeypatch.setenv("CURRICULUM_SEG_RUN", str(workdir))
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
  notebook = nbformat.read(REPO / "notebooks" / "inspect_run.ipynb", as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()  # raises CellExecutionError on any failing cell
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert f"run {workdir}: 3 stages" in text
  assert "parameters on ['cpu:0']" in text and "tumour Dice" in text
  pictures = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pictures) == 3, "history, slice, batches"
  assert snapshot(workdir) == before
