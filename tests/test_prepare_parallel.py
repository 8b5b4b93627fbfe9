"""Preparing the dataset in one process, in worker processes and with Apache Beam's local runner:
the same files, byte for byte; kill -9 at any time leaves nothing that looks complete and a
rerun finishes; a bad case is named from inside a worker; workers end with a killed parent.

The Beam tests need the `beam` extra (pip install -e ".[test,beam]") and are skipped without it.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import psutil
import pytest

from curriculum_seg import config_loading
from data_pipelines import lits, lits_tfds, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = {"size": {"data.image_size": "32", "data.spacing_mm": "None"},
         "spacing": {"data.image_size": "None", "data.spacing_mm": "(5.0, 6.0)"}}


def _config(lits_dir, tfds_dir, grid="size", **overrides):
  values = {"data.lits_dir": str(lits_dir), "data.tfds_dir": str(tfds_dir),
            "data.synthetic.enabled": "false", "data.val_fraction": "0.4", **GRIDS[grid],
            **overrides}
  return config_loading.apply_overrides(config_loading.load_config_file("configs/synthetic.py"),
                                        values.items())


@pytest.fixture(scope="module")
def lits_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("lits")
  synthetic.synthesise(str(folder), 5, 0, synthetic.SynthConfig(size=64, slices=12))
  return folder


def _files(builder) -> dict[str, bytes]:
  """Every file of a prepared dataset, by name."""
  return {os.path.basename(p): open(p, "rb").read()
          for p in sorted(glob.glob(os.path.join(builder.data_dir, "*")))}


def _prepare(lits_dir, tfds_dir, grid, **kwargs):
  return lits_tfds.prepare(_config(lits_dir, tfds_dir, grid).data, log=lambda s: None, **kwargs)


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_worker_processes_write_the_one_process_dataset(lits_dir, tmp_path, grid):
  one = _prepare(lits_dir, tmp_path / "one", grid, workers=1)
  two = _prepare(lits_dir, tmp_path / "two", grid, workers=2)
  assert os.path.basename(one.data_dir) == os.path.basename(two.data_dir)
  files = _files(one)
  assert any(".array_record-" in f for f in files) and "metadata.json" in files
  assert files == _files(two)
  assert one.info.metadata == two.info.metadata


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_beam_local_runner_writes_the_one_process_dataset(lits_dir, tmp_path, grid):
  pytest.importorskip("apache_beam")
  one = _prepare(lits_dir, tmp_path / "one", grid, workers=1)
  beam = _prepare(lits_dir, tmp_path / "beam", grid, workers=2, beam_runner="local")
  assert _files(one) == _files(beam)
  assert one.info.metadata == beam.info.metadata


def _bad_labels(lits_dir, tmp_path, number=3):
  """A copy of `lits_dir` whose segmentation-`number` holds a label 7."""
  bad_dir = tmp_path / "bad"
  bad_dir.mkdir()
  for name in os.listdir(lits_dir):
    if name.endswith(".nii.gz"):
      os.symlink(os.path.join(lits_dir, name), bad_dir / name)
  path = bad_dir / f"segmentation-{number}.nii.gz"
  os.remove(path)
  image = nib.load(os.path.join(lits_dir, path.name))
  data = np.asarray(image.dataobj).copy()
  data.flat[0] = 7
  nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
  return bad_dir, path


def _build_without_checks(config, **options):
  """Builds through the builder alone (no folder check first), so the worker meets the case."""
  builder = lits_tfds.builder_for(config.data)
  lits_tfds._download_and_prepare(  # pylint: disable=protected-access
      builder, lits_tfds.BuildOptions(**options), dict(manual_dir=config.data.lits_dir),
      config.data)
  return builder


@pytest.mark.slow
def test_a_bad_case_is_named_from_a_worker_process(lits_dir, tmp_path):
  bad_dir, path = _bad_labels(lits_dir, tmp_path)
  config = _config(bad_dir, tmp_path / "tfds")
  with pytest.raises(lits.CaseError, match=f"{path}: segmentation has label values \\[7"):
    _build_without_checks(config, workers=2)
  assert not lits_tfds.builder_for(config.data).is_prepared()
  assert not glob.glob(str(tmp_path / "tfds" / "lits" / "*" / "incomplete*"))
  # A truncated volume, the same way.
  os.remove(path)
  os.symlink(os.path.join(lits_dir, path.name), path)
  volume = bad_dir / "volume-1.nii.gz"
  data = open(os.path.join(lits_dir, volume.name), "rb").read()
  os.remove(volume)
  volume.write_bytes(data[:len(data) // 2])
  with pytest.raises(lits.CaseError, match=f"{volume}: .*truncated"):
    _build_without_checks(config, workers=2)


def test_a_bad_case_is_named_from_a_beam_worker(lits_dir, tmp_path):
  pytest.importorskip("apache_beam")
  from data_pipelines import lits_beam
  bad_dir, path = _bad_labels(lits_dir, tmp_path)
  config = _config(bad_dir, tmp_path / "tfds")
  runner, flags = lits_beam.pipeline_settings("local", "", 2)
  builder = lits_tfds.builder_for(config.data)
  with pytest.raises(lits.CaseError, match=f"{path}: segmentation has label values \\[7"):
    lits_tfds._download_and_prepare(  # pylint: disable=protected-access
        builder, lits_tfds.BuildOptions(), dict(manual_dir=str(bad_dir), beam_runner=runner,
                                                beam_options=flags), config.data)
  assert not lits_tfds.builder_for(config.data).is_prepared()


def test_cli_refuses_beam_without_apache_beam(tmp_path):
  try:
    import apache_beam  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    pytest.skip("apache_beam is installed")
  except ImportError:
    pass
  proc = subprocess.run(
      [sys.executable, "-m", "curriculum_seg.cli", "prepare", "--config", "configs/synthetic.py",
       "--beam_runner=local", f"--config.data.lits_dir={tmp_path / 'lits'}",
       f"--config.data.tfds_dir={tmp_path / 'tfds'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "pip install 'curriculum-seg[beam]'" in proc.stderr.strip().splitlines()[-1]


def _kill_during_build(lits_dir, tfds_dir, extra_args):
  """Starts `curriculum-seg prepare`, kills it with SIGKILL once a case's shard is written,
  and returns the pids of the processes it had started."""
  args = [sys.executable, "-m", "curriculum_seg.cli", "prepare", "--config",
          "configs/synthetic.py", f"--config.data.lits_dir={lits_dir}",
          f"--config.data.tfds_dir={tfds_dir}", "--config.data.synthetic.enabled=false",
          "--config.data.image_size=64", "--config.data.spacing_mm=None",
          "--config.data.val_fraction=0.4", *extra_args]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  children: set[int] = set()
  deadline = time.time() + 180
  try:
    while time.time() < deadline:
      assert proc.poll() is None, proc.stdout.read()
      try:
        children |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
      except psutil.NoSuchProcess:
        pass
      if glob.glob(os.path.join(tfds_dir, "lits", "*", "incomplete.*", "lits-*.array_record-*")):
        break
      time.sleep(0.02)
    else:
      pytest.fail("no shard was written in time")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  return children


def _assert_gone(pids, seconds=15.0):
  deadline = time.time() + seconds
  alive = list(pids)
  while alive and time.time() < deadline:
    alive = [p for p in alive if psutil.pid_exists(p) and
             psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    time.sleep(0.1)
  assert not alive, f"processes {alive} outlived their killed parent"


@pytest.fixture(scope="module")
def bigger_lits_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp("lits_bigger")
  synthetic.synthesise(str(folder), 8, 0, synthetic.SynthConfig(size=96, slices=32))
  return folder


@pytest.mark.slow
@pytest.mark.parametrize("how", ["workers", "beam"])
def test_kill_9_leaves_nothing_complete_and_a_rerun_finishes(bigger_lits_dir, tmp_path, how):
  extra = ["--workers=2"]
  if how == "beam":
    pytest.importorskip("apache_beam")
    extra.append("--beam_runner=local")
  tfds_dir = str(tmp_path / "tfds")
  children = _kill_during_build(bigger_lits_dir, tfds_dir, extra)
  assert children, "the build ran in worker processes"
  _assert_gone(children)
  config = _config(bigger_lits_dir, tfds_dir, **{"data.image_size": "64"})
  builder = lits_tfds.builder_for(config.data)
  assert not builder.is_prepared()
  assert not os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
  assert glob.glob(os.path.join(tfds_dir, "lits", "*", "incomplete.*"))
  # The rerun removes the killed build's folder and writes the whole dataset.
  messages = []
  again = lits_tfds.prepare(config.data, log=messages.append, workers=2)
  assert any("interrupted prepare" in m for m in messages)
  assert not glob.glob(os.path.join(tfds_dir, "lits", "*", "incomplete.*"))
  assert sum(s.num_examples for s in again.info.splits.values()) == 8 * 32
  reference = lits_tfds.prepare(_config(bigger_lits_dir, tmp_path / "ref",
                                        **{"data.image_size": "64"}).data,
                                log=lambda s: None, workers=1)
  assert _files(again) == _files(reference)
