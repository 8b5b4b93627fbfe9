"""Whole-volume inference: orientation round trips, chunking, flip TTA, post-processing, restoring
a run's checkpoints (any stage/step, onto 8 devices), and clear errors."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from curriculum_seg import inference, sharding, stages
from data_pipelines import intensity, lits, synthetic

LIVER_HU, TUMOUR_HU = 100, 300
WINDOW = (-60.0, 140.0)


class BrightIsTumour(nn.Module):
  """A parameter-free 'network': tumour where the centre channel is brighter than the window's
  top (HU > 140); makes predictions known exactly, so geometry can be checked voxel by voxel."""

  @nn.compact
  def __call__(self, x, train=False):
    centre = x[..., x.shape[-1] // 2]
    tumour = 50.0 * (centre - 0.99)
    return jnp.stack([jnp.zeros_like(tumour), tumour], axis=-1)


def oracle_network(size, context=3, mesh=None):
  return inference.Network(config=None, model=BrightIsTumour(), variables={}, task="tumour",
                           image_size=size, context_slices=context,
                           normaliser=intensity.window(*WINDOW),
                           mesh=mesh or sharding.make_mesh(1), stage="oracle")


def phantom(shape=(36, 36, 12)):
  """RAS HU and labels: liver block, two tumours at asymmetric places (so any flip shows)."""
  hu = np.full(shape, -1000, np.int16)
  labels = np.zeros(shape, np.uint8)
  hu[5:30, 4:26, 2:10] = LIVER_HU
  labels[5:30, 4:26, 2:10] = 1
  for (x0, x1), (y0, y1), (z0, z1) in (((7, 11), (6, 9), (3, 5)), ((20, 27), (15, 22), (6, 9))):
    hu[x0:x1, y0:y1, z0:z1] = TUMOUR_HU
    labels[x0:x1, y0:y1, z0:z1] = 2
  return hu, labels


@pytest.mark.parametrize("axcodes,storage", [
    (("R", "A", "S"), "int16"), (("L", "P", "S"), "float32_scaled"),
    (("A", "R", "S"), "uint16_offset"), (("P", "L", "I"), "int16")])
def test_mask_overlays_the_input_in_its_own_geometry(tmp_path, axcodes, storage):
  hu, labels = phantom()
  spacing = (0.8, 0.7, 2.5)
  vol_path, seg_path = tmp_path / "volume-0.nii.gz", tmp_path / "segmentation-0.nii.gz"
  nib.save(synthetic.to_nifti(hu, spacing, axcodes, storage), vol_path)
  nib.save(synthetic.to_nifti(labels, spacing, axcodes, "uint8", is_label=True), seg_path)
  # The model size equals the slice size: no resampling, so predictions are exact to the voxel.
  predictor = inference.Predictor(oracle_network(36),
                                  inference.InferenceOptions(batch_size=4, chunk_slices=5))
  out = tmp_path / "mask.nii.gz"
  predictor.predict_file(vol_path, out)
  written, source, ref = nib.load(out), nib.load(vol_path), nib.load(seg_path)
  assert written.shape == source.shape
  np.testing.assert_array_equal(written.affine, source.affine)
  assert nib.aff2axcodes(written.affine) == tuple(axcodes)
  assert written.get_data_dtype() == np.uint8
  data = np.asarray(written.dataobj)
  # In the file's own array layout, tumour is exactly where the reference has it.
  np.testing.assert_array_equal(data == 2, np.asarray(ref.dataobj) == 2)
  assert set(np.unique(data)) == {0, 2}


def test_in_plane_resampling_keeps_tumours_in_place(tmp_path):
  """A non-square slice resampled to the model size and back: tumour stays where it is."""
  hu, labels = phantom((64, 48, 10))
  net = oracle_network(32)
  pred = inference.Predictor(net).predict(hu, (1.0, 1.0, 2.0))
  ref = labels == 2
  dice = 2 * np.sum((pred == 2) & ref) / (np.sum(pred == 2) + np.sum(ref))
  assert dice > 0.8
  # No tumour far from a reference tumour (a flipped or shifted axis would put it elsewhere).
  from scipy import ndimage
  near = ndimage.binary_dilation(ref, iterations=2)
  assert not np.any((pred == 2) & ~near)


def test_chunking_does_not_change_the_mask_and_bounds_the_chunks():
  hu, _ = phantom((40, 36, 23))
  rng = np.random.default_rng(0)
  hu = (hu + rng.integers(-150, 150, hu.shape)).astype(np.int16)
  net = oracle_network(40)
  masks = []
  for chunk in (1, 4, 7, 64):
    options = inference.InferenceOptions(batch_size=3, chunk_slices=chunk)
    sizes = [z1 - z0 for z0, z1, _ in net.volume_probabilities(hu, options)]
    assert max(sizes) <= chunk and sum(sizes) == hu.shape[2]
    masks.append(net.label_volume(hu, options))
  for m in masks[1:]:
    np.testing.assert_array_equal(m, masks[0])


def test_slice_stacks_match_the_training_examples():
  """Inference builds each slice's input exactly as the dataset builder and pipelines do."""
  from data_pipelines import slices, transforms
  rng = np.random.default_rng(1)
  hu = rng.integers(-200, 300, (48, 40, 9)).astype(np.int16)
  labels = np.zeros(hu.shape, np.uint8)
  net = oracle_network(32, context=5)
  stacks = net.slice_stacks(hu, 2, 7)
  examples = dict(slices.case_examples(hu, labels, (1.0, 1.0, 1.0), 0, 5, 32))
  for k in range(2, 7):
    expected = np.empty((32, 32, 5), np.float32)
    transforms.window_into(expected, examples[k]["image"], *WINDOW)
    np.testing.assert_array_equal(stacks[k - 2], expected)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
  root = tmp_path_factory.mktemp("infer_run")
  config = tiny_config(root, **{"curriculum": "('whole1', 'patch')",
                                "stages.whole1.steps": "4", "stages.patch.steps": "4",
                                "stages.whole1.eval_every": "2",
                                "stages.whole1.checkpoint_every": "2",
                                "stages.patch.eval_every": "2",
                                "stages.patch.checkpoint_every": "2"})
  workdir = root / "run"
  stages.train(config, workdir, log=lambda m: None)
  return workdir, config


def _umask():
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def test_saved_probabilities_lie_in_the_mask_files_layout(tmp_path):
  """The oracle's softmax, saved beside a mask stored permuted and flipped: shape (K, *file
  shape), sums to 1, its argmax is the written mask, atomically written with umask permissions."""
  hu, labels = phantom()
  axcodes = ("P", "I", "R")  # slices on the middle array axis
  vol_path = tmp_path / "volume-0.nii.gz"
  nib.save(synthetic.to_nifti(hu, (0.8, 0.7, 2.5), axcodes, "int16"), vol_path)
  predictor = inference.Predictor(oracle_network(36),
                                  inference.InferenceOptions(batch_size=4, chunk_slices=5))
  out, npz = tmp_path / "mask.nii.gz", tmp_path / "mask.npz"
  assert inference.probabilities_path_for(out) == str(npz)
  predictor.predict_file(vol_path, out, probabilities_path=npz)
  mask = np.asarray(nib.load(out).dataobj)
  with np.load(npz) as saved:
    probs, classes, names = saved["probabilities"], saved["classes"], saved["class_names"]
  assert probs.dtype == np.float16 and probs.shape == (2,) + nib.load(vol_path).shape
  assert classes.tolist() == [0, 2] and names.tolist() == ["background", "tumour"]
  np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=2e-3)
  np.testing.assert_array_equal(classes[probs.argmax(0)], mask)
  assert (mask == 2).any()
  assert (os.stat(npz).st_mode & 0o777) == 0o666 & ~_umask()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "mask.npz",
                                                        "volume-0.nii.gz"]
  with pytest.raises(inference.InferenceError, match=".npz"):
    predictor.predict_file(vol_path, out, probabilities_path=tmp_path / "p.npy")
  predictor.networks = {"liver": predictor.network, "tumour": predictor.network}  # a cascade
  with pytest.raises(inference.InferenceError, match="no single softmax"):
    predictor.probability_classes()


def test_cli_predict_saves_probabilities_of_a_trained_run(tiny_run, tmp_path, capsys):
  from curriculum_seg import cli
  workdir, config = tiny_run
  volume = lits.find_cases(config.data.lits_dir)[0][0]
  out = tmp_path / "segmentation-0.nii.gz"
  code = cli.main(["predict", "--workdir", str(workdir), "--input", str(volume), "--output",
                   str(out), "--save_probabilities"])
  assert code == 0, capsys.readouterr().err
  mask = np.asarray(nib.load(out).dataobj)
  with np.load(tmp_path / "segmentation-0.npz") as saved:
    probs, classes = saved["probabilities"].astype(np.float32), saved["classes"]
  assert probs.shape == (len(classes),) + nib.load(volume).shape
  np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-3)
  # A tumour-only model without a liver: post-processing keeps the argmax; float16 may only
  # flip near-ties.
  top = np.sort(probs, axis=0)
  clear = top[-1] - top[-2] > 1e-2
  np.testing.assert_array_equal(classes[probs.argmax(0)][clear], mask[clear])


def test_flip_tta_averages_the_four_mirrorings(tiny_run):
  workdir, _ = tiny_run
  net = inference.load_network(workdir)
  rng = np.random.default_rng(2)
  stacks = rng.uniform(0, 1, (5, 32, 32, 3)).astype(np.float32)
  plain = inference.InferenceOptions(batch_size=4)
  tta = inference.InferenceOptions(batch_size=4, flip_tta=True)
  expected = sum(np.flip(net.slice_probabilities(np.flip(stacks, axes).copy(), plain), axes)
                 for axes in ((), (1,), (2,), (1, 2))) / 4
  np.testing.assert_allclose(net.slice_probabilities(stacks, tta), expected, atol=1e-5)
  assert not np.allclose(net.slice_probabilities(stacks, plain), expected, atol=1e-4)


def test_chosen_and_named_checkpoints(tiny_run):
  workdir, config = tiny_run
  stage, which, step = inference.chosen_checkpoint(workdir)
  assert stage == "patch" and which == "best"
  best = inference.load_network(workdir)
  assert (best.stage, best.which, best.step) == (stage, which, step)
  assert best.meta["stage"] == "patch" and best.meta["kind"] == "best"
  first = inference.load_network(workdir, stage="whole1", step=2)
  assert (first.stage, first.step, first.which) == ("whole1", 2, "latest")
  leaves_a = jax.tree.leaves(first.variables)
  leaves_b = jax.tree.leaves(inference.load_network(workdir, stage="whole1", step=4).variables)
  assert any(not np.array_equal(a, b) for a, b in zip(leaves_a, leaves_b))
  with pytest.raises(inference.InferenceError, match="no latest checkpoint at step 3"):
    inference.load_network(workdir, stage="whole1", step=3, which="latest")
  with pytest.raises(inference.InferenceError, match="'nope' is not in the run's curriculum"):
    inference.load_network(workdir, stage="nope")
  with pytest.raises(inference.InferenceError, match="no config.json"):
    inference.load_network(workdir / "checkpoints")


def test_restored_network_matches_training_state(tiny_run):
  """Variables restored for inference are those the controller saved (params, not the moments)."""
  workdir, config = tiny_run
  from curriculum_seg import checkpoints
  ckpts = checkpoints.StageCheckpoints(workdir / "checkpoints", "patch", read_only=True)
  controller = stages.Controller(config, workdir, log=lambda m: None)
  stage_cfg = config.stages.patch
  state, _ = ckpts.restore(controller._abstract_state(stage_cfg, controller._tx(stage_cfg)),
                           "latest", 4)
  net = inference.load_network(workdir, stage="patch", step=4, which="latest")
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(net.variables["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predictions_on_eight_devices_match_one(tiny_run, tmp_path):
  workdir, _ = tiny_run
  rng = np.random.default_rng(3)
  stacks = rng.uniform(0, 1, (5, 32, 32, 3)).astype(np.float32)
  np.save(tmp_path / "stacks.npy", stacks)
  code = textwrap.dedent(f"""
      import json, numpy as np, jax
      from curriculum_seg import inference
      net = inference.load_network({str(workdir)!r})
      assert net.mesh.size == 8, net.mesh
      probs = net.slice_probabilities(np.load({str(tmp_path / 'stacks.npy')!r}),
                                      inference.InferenceOptions(batch_size=3))
      np.save({str(tmp_path / 'probs8.npy')!r}, probs)
      print(json.dumps(dict(devices=jax.device_count())))
      """)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.getcwd())
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["devices"] == 8
  one = inference.load_network(workdir).slice_probabilities(stacks)
  # One row per device against three rows on one device: two programs, whose logits may differ
  # by several ULPs of their magnitude (up to 1.5e-5 seen on these tiny networks) and the two-class
  # probabilities by at most half that (measured here: 2.5e-6). A sharding mistake is far larger.
  np.testing.assert_allclose(np.load(tmp_path / "probs8.npy"), one, rtol=0, atol=5e-5)


# --------------------------------------------------------------------------- post-processing

def test_largest_liver_component_removes_islands_and_their_tumours():
  labels = np.zeros((20, 20, 6), np.uint8)
  labels[2:12, 2:12, 1:5] = 1
  labels[4:6, 4:6, 2:3] = 2
  labels[15:18, 15:18, 1:3] = 1   # a separate liver island with a tumour
  labels[16, 16, 1] = 2
  out = inference.postprocess(labels.copy(), (1, 1, 1), predicts_liver=True)
  assert out[16, 16, 1] == 0 and not out[15:18, 15:18, 1:3].any()
  assert (out[4:6, 4:6, 2:3] == 2).all() and out[3, 3, 2] == 1
  kept = inference.postprocess(labels.copy(), (1, 1, 1), predicts_liver=True,
                               options=inference.InferenceOptions(largest_liver_component=False))
  np.testing.assert_array_equal(kept, labels)


def test_given_liver_bounds_tumour_and_is_written_as_liver():
  labels = np.zeros((10, 10, 4), np.uint8)
  labels[1:3, 1:3, 1] = 2   # inside the given liver
  labels[8, 8, 2] = 2       # outside it
  liver = np.zeros(labels.shape, bool)
  liver[0:5, 0:5, 0:3] = True
  out = inference.postprocess(labels.copy(), (1, 1, 1), predicts_liver=False, liver=liver)
  assert out[8, 8, 2] == 0
  assert (out[1:3, 1:3, 1] == 2).all()
  assert (out[liver & (labels != 2)] == 1).all() and not out[~liver].any()
  loose = inference.postprocess(labels.copy(), (1, 1, 1), predicts_liver=False, liver=liver,
                                options=inference.InferenceOptions(tumour_in_liver=False))
  assert loose[8, 8, 2] == 2
  with pytest.raises(ValueError, match="does not match"):
    inference.postprocess(labels.copy(), (1, 1, 1), predicts_liver=False, liver=liver[:5])


def test_small_tumour_components_are_removed_by_volume_in_mm3():
  labels = np.zeros((12, 12, 6), np.uint8)
  labels[:, :, :] = 1
  labels[1:3, 1:3, 1:2] = 2     # 4 voxels
  labels[6:9, 6:9, 2:4] = 2     # 18 voxels
  spacing = (1.0, 1.0, 2.0)     # 2 mm^3 per voxel: 8 and 36 mm^3
  out = inference.postprocess(labels.copy(), spacing, predicts_liver=True,
                              options=inference.InferenceOptions(min_tumour_mm3=10.0))
  assert (out[1:3, 1:3, 1] == 1).all()   # a removed tumour inside the liver becomes liver
  assert (out[6:9, 6:9, 2:4] == 2).all()
  tumour_only = np.where(labels == 2, 2, 0).astype(np.uint8)
  out = inference.postprocess(tumour_only, spacing, predicts_liver=False,
                              options=inference.InferenceOptions(min_tumour_mm3=10.0))
  assert out[1, 1, 1] == 0 and out[7, 7, 3] == 2


def test_bad_options_and_inputs_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="chunk_slices must be >= 1"):
    inference.InferenceOptions(chunk_slices=0)
  with pytest.raises(ValueError, match="min_tumour_mm3"):
    inference.InferenceOptions(min_tumour_mm3=-1)
  predictor = inference.Predictor(oracle_network(16))
  with pytest.raises(ValueError, match="3-D"):
    predictor.predict(np.zeros((16, 16), np.int16), (1, 1, 1))
  with pytest.raises(inference.InferenceError, match=".nii or .nii.gz"):
    inference.check_output_path(tmp_path / "mask.png")
  with pytest.raises(inference.InferenceError, match="does not exist"):
    inference.check_output_path(tmp_path / "missing" / "mask.nii.gz")
  with pytest.raises(lits.CaseError, match="volume.nii"):
    (tmp_path / "volume.nii").write_bytes(b"not a nifti file at all")
    predictor.predict_file(tmp_path / "volume.nii", tmp_path / "mask.nii.gz")
  assert not (tmp_path / "mask.nii.gz").exists()
