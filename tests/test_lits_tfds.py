"""The TFDS "lits" dataset: slices, context, tumour components, case splits, reuse, atomicity."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from curriculum_seg import config_loading
from data_pipelines import intensity, lits, lits_tfds, slices

SIX = ndimage.generate_binary_structure(3, 1)


def tiny_config(root, **overrides):
  config = config_loading.load_config_file("configs/synthetic.py")
  values = {"data.lits_dir": str(root / "lits"), "data.tfds_dir": str(root / "tfds"),
            "data.synthetic.num_cases": "5", "data.synthetic.size": "64",
            "data.synthetic.slices": "12", "data.image_size": "32", "data.spacing_mm": "None",
            "data.val_fraction": "0.4"}
  values.update(overrides)
  return config_loading.apply_overrides(config, values.items())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  config = tiny_config(root)
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  return config, builder


def _all(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def test_splits_are_by_case_disjoint_and_complete(prepared):
  config, builder = prepared
  splits = builder.info.metadata["splits"]
  assert sorted(splits["train"] + splits["validation"]) == list(range(5))
  assert not set(splits["train"]) & set(splits["validation"])
  assert len(splits["validation"]) == 2
  for split in ("train", "validation"):
    examples = _all(builder, split)
    assert {int(e["case_number"]) for e in examples} == set(splits[split])
    assert len(examples) == 12 * len(splits[split])
    keys = [(int(e["case_number"]), int(e["slice_index"])) for e in examples]
    assert keys == sorted(keys), "stored in (case, slice) order"
  # Deterministic: the same seed gives the same split, another seed another.
  assert lits_tfds.assign_splits(list(range(5)), 0.4, 0.0, 0) == lits_tfds.assign_splits(
      list(range(5)), 0.4, 0.0, 0)
  assert any(lits_tfds.assign_splits(list(range(20)), 0.2, 0.0, s)["validation"] !=
             lits_tfds.assign_splits(list(range(20)), 0.2, 0.0, 0)["validation"]
             for s in range(1, 4))


def test_examples_hold_resampled_slices_with_context_and_components(prepared):
  config, builder = prepared
  lits_dir = config.data.lits_dir
  examples = {(int(e["case_number"]), int(e["slice_index"])): e for e in _all(builder, "train")}
  index = builder.info.metadata["index"]["train"]
  for number in builder.info.metadata["splits"]["train"]:
    case = lits.load_case(os.path.join(lits_dir, f"volume-{number}.nii.gz"),
                          os.path.join(lits_dir, f"segmentation-{number}.nii.gz"))
    image = slices.resample_image(case.image, 32)
    labels = slices.resample_labels(case.labels, 32)
    comps, n = ndimage.label(case.labels == 2, structure=SIX)
    z = case.image.shape[2]
    seen_components = set()
    for k in range(z):
      e = examples[(number, k)]
      assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.int16
      for c, kk in enumerate((max(k - 1, 0), k, min(k + 1, z - 1))):
        np.testing.assert_array_equal(e["image"][:, :, c], image[:, :, kk])
      np.testing.assert_array_equal(e["label"], labels[:, :, k])
      assert int(e["num_slices"]) == z
      np.testing.assert_allclose(e["spacing"], [case.spacing[0] * 2, case.spacing[1] * 2,
                                                case.spacing[2]], rtol=1e-5)
      parts = {int(cid) for cid in np.unique(comps[:, :, k]) if cid}
      assert {int(c) for c in e["tumours"]["component"]} == parts
      seen_components |= parts
      for cid, centre, diameter in zip(e["tumours"]["component"], e["tumours"]["centre"],
                                       e["tumours"]["diameter_mm"]):
        rows, cols = np.nonzero(comps[:, :, k] == cid)
        np.testing.assert_allclose(centre, [(rows.mean() + 0.5) / 2 - 0.5,
                                            (cols.mean() + 0.5) / 2 - 0.5], atol=1e-4)
        voxels = (comps == cid).sum()
        assert diameter == pytest.approx((6 * voxels * np.prod(case.spacing) / np.pi) ** (1 / 3),
                                         rel=1e-4)
    assert seen_components == set(range(1, n + 1))
    liver_z = np.flatnonzero((case.labels >= 1).any((0, 1)))
    row = [r for r in index["cases"] if r[0] == number][0]
    assert row[3:] == [int(liver_z[0]), int(liver_z[-1]), 32, 32]  # + stored rows, cols
    np.testing.assert_array_equal(examples[(number, 0)]["liver_z_range"], row[3:5])
  # The tumour index points at the examples that hold those parts.
  source = builder.as_data_source("train")
  for position, component, r, c, *_ in index["tumours"]:
    e = source[position]
    i = [int(c) for c in e["tumours"]["component"]].index(component)
    np.testing.assert_allclose(e["tumours"]["centre"][i], [r, c], atol=1e-3)


def test_second_prepare_reuses_the_dataset(prepared):
  config, builder = prepared
  info = os.path.join(builder.data_dir, "dataset_info.json")
  mtime = os.path.getmtime(info)
  messages = []
  start = time.perf_counter()
  again = lits_tfds.prepare(config.data, log=messages.append)
  assert time.perf_counter() - start < 5
  assert again.data_dir == builder.data_dir
  assert os.path.getmtime(info) == mtime
  assert any("reused" in m for m in messages)


def test_other_parameters_get_their_own_dataset(prepared, tmp_path):
  config, builder = prepared
  other = config_loading.apply_overrides(config, [("data.context_slices", "5")])
  assert lits_tfds.builder_for(other.data).data_dir != builder.data_dir
  assert not lits_tfds.builder_for(other.data).is_prepared()


def test_bad_case_fails_prepare_and_leaves_no_dataset(tmp_path):
  config = tiny_config(tmp_path, **{"data.synthetic.num_cases": "3"})
  lits_dir = config.data.lits_dir
  from data_pipelines import synthetic
  synthetic.ensure_synthetic(lits_dir, 3, 0, lits_tfds.synth_config(config.data))
  bad = os.path.join(lits_dir, "segmentation-2.nii.gz")
  img = nib.load(bad)
  data = np.asarray(img.dataobj).copy()
  data.flat[0] = 7
  nib.save(nib.Nifti1Image(data, img.affine, img.header), bad)
  with pytest.raises(lits.CaseError, match="segmentation-2.nii.gz.*outside"):
    lits_tfds.prepare(config.data, log=lambda s: None)
  assert not lits_tfds.builder_for(config.data).is_prepared()


_PREPARE_SCRIPT = textwrap.dedent("""
    import sys
    from curriculum_seg import config_loading
    from data_pipelines import lits_tfds
    config = config_loading.apply_overrides(
        config_loading.load_config_file("configs/synthetic.py"),
        [a.split("=", 1) for a in sys.argv[1:]])
    lits_tfds.prepare(config.data, log=lambda s: print(s, flush=True))
    print("PREPARED", flush=True)
""")


def test_interrupted_prepare_is_not_taken_for_a_finished_one(tmp_path):
  overrides = {"data.synthetic.num_cases": "8", "data.synthetic.size": "96",
               "data.synthetic.slices": "32"}
  config = tiny_config(tmp_path, **overrides)
  from data_pipelines import synthetic
  synthetic.ensure_synthetic(config.data.lits_dir, 8, 0, lits_tfds.synth_config(config.data))
  args = [f"{k}={v}" for k, v in {
      "data.lits_dir": config.data.lits_dir, "data.tfds_dir": config.data.tfds_dir,
      "data.image_size": "32", "data.spacing_mm": "None", "data.val_fraction": "0.4",
      **overrides}.items()]
  proc = subprocess.Popen([sys.executable, "-c", _PREPARE_SCRIPT, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  dataset_root = os.path.join(config.data.tfds_dir, "lits")
  deadline = time.time() + 120
  while time.time() < deadline:  # kill -9 once examples are being written
    incomplete = [d for _, dirs, _ in os.walk(dataset_root) for d in dirs if "incomplete" in d]
    if incomplete and any(f.startswith("lits-train") for r, _, fs in os.walk(dataset_root)
                          for f in fs):
      break
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  builder = lits_tfds.builder_for(config.data)
  assert not builder.is_prepared()
  assert not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
  # A new prepare finishes and holds every slice.
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  total = sum(s.num_examples for s in builder.info.splits.values())
  assert total == 8 * 32


def test_each_case_is_one_shard_of_its_split_in_case_order(prepared):
  config, builder = prepared
  for name, split in builder.info.splits.items():
    cases = builder.info.metadata["splits"][name]
    assert split.shard_lengths == [12] * len(cases)
    for rank, (number, instruction) in enumerate(zip(cases, split.file_instructions)):
      assert instruction.filename.endswith(f"-{rank:05d}-of-{len(cases):05d}")
      source = builder.as_data_source(f"{name}[{rank * 12}:{rank * 12 + 12}]")
      assert [(int(e["case_number"]), int(e["slice_index"])) for e in source] == [
          (number, k) for k in range(12)]
  leftovers = [f for f in os.listdir(builder.data_dir) if "incomplete" in f]
  assert not leftovers


def test_shards_are_written_with_the_configured_compression(prepared, tmp_path):
  from array_record.python import array_record_module
  config, builder = prepared
  shards = [os.path.join(builder.data_dir, f) for f in os.listdir(builder.data_dir)
            if ".array_record-" in f]
  assert shards
  for shard in shards:
    reader = array_record_module.ArrayRecordReader(shard)
    assert "uncompressed" in reader.writer_options_string()
    # One record per group: a random read decodes one record (Grain's ArrayRecord source).
    assert "group_size:1," in reader.writer_options_string()
    reader.close()
  bad = config_loading.apply_overrides(config, [("data.record_compression", "lz4"),
                                                ("data.tfds_dir", str(tmp_path))])
  with pytest.raises(ValueError, match="data.record_compression"):
    lits_tfds.prepare(bad.data, log=lambda s: None)


def test_index_records_the_stored_pixels_of_each_tumour_part(prepared):
  config, builder = prepared
  source = builder.as_data_source("train")
  for position, component, *_, stored, r0, c0, r1, c1 in (
      builder.info.metadata["index"]["train"]["tumours"]):
    e = source[position]
    i = [int(c) for c in e["tumours"]["component"]].index(component)
    assert int(e["tumours"]["stored_pixels"][i]) == stored
    np.testing.assert_allclose(e["tumours"]["bbox"][i], [r0, c0, r1, c1], atol=1e-3)
    r0, c0, r1, c1 = e["tumours"]["bbox"][i]
    box = e["label"][int(np.floor(r0)):int(np.ceil(r1)), int(np.floor(c0)):int(np.ceil(c1))]
    assert stored == int((box == 2).sum())


def test_a_target_spacing_keeps_each_case_s_field_of_view(tmp_path):
  """data.spacing_mm: each case resampled in plane to the same mm a pixel, so slices keep their
  field of view and differ in size; the spacing, the components' centres, the index and the
  training split's HU histograms follow."""
  config = config_loading.apply_overrides(config_loading.load_config_file("configs/synthetic.py"),
                                          {"data.lits_dir": str(tmp_path / "lits"),
                                           "data.tfds_dir": str(tmp_path / "tfds"),
                                           "data.synthetic.num_cases": "4",
                                           "data.synthetic.size": "64",
                                           "data.synthetic.slices": "10",
                                           "data.spacing_mm": "(5.0, 6.0)",
                                           "data.val_fraction": "0.25"}.items())
  builder = lits_tfds.prepare(config.data, log=lambda s: None)
  assert builder.builder_config.name.startswith("ctx3_sp5x6_")
  examples = {(int(e["case_number"]), int(e["slice_index"])): e for e in _all(builder, "train")}
  index = builder.info.metadata["index"]["train"]
  hists = {k: 0 for k in ("liver", "tumour")}
  shapes = set()
  for number in builder.info.metadata["splits"]["train"]:
    case = lits.load_case(os.path.join(config.data.lits_dir, f"volume-{number}.nii.gz"),
                          os.path.join(config.data.lits_dir, f"segmentation-{number}.nii.gz"))
    x, y, z = case.image.shape
    rows, cols = round(x * case.spacing[0] / 5.0), round(y * case.spacing[1] / 6.0)
    shapes.add((rows, cols))
    image = slices.resample_image(case.image, (rows, cols))
    comps, _ = ndimage.label(case.labels == 2, structure=SIX)
    for k in range(z):
      e = examples[(number, k)]
      assert e["image"].shape == (rows, cols, 3) and e["label"].shape == (rows, cols)
      np.testing.assert_array_equal(e["image"][:, :, 1], image[:, :, k])
      np.testing.assert_allclose(e["spacing"], [x * case.spacing[0] / rows,
                                                y * case.spacing[1] / cols, case.spacing[2]],
                                 rtol=1e-5)
      for cid, centre in zip(e["tumours"]["component"], e["tumours"]["centre"]):
        r, c = np.nonzero(comps[:, :, k] == cid)
        np.testing.assert_allclose(centre, [(r.mean() + 0.5) * rows / x - 0.5,
                                            (c.mean() + 0.5) * cols / y - 0.5], atol=1e-3)
    row = [r for r in index["cases"] if r[0] == number][0]
    assert row[5:7] == [rows, cols]
    for key, hist in slices.intensity_histograms(case.image, case.labels).items():
      hists[key] = hists[key] + hist
  assert len(shapes) > 1, "cases of different fields of view give slices of different sizes"
  stored = builder.info.metadata["intensity"]["train"]
  for key in ("liver", "tumour"):
    np.testing.assert_array_equal(intensity.unpack(stored[key]), hists[key])
  assert "training foreground HU" in lits_tfds.describe(builder, config.data)
