"""A user's own data and runs, as a new user meets them on the command line: foreign folders are
never written, a run that never trained does not lock its workdir, runs resume from their saved
config and evaluate from any folder, files are written with the umask's permissions."""

import hashlib
import json
import os
import stat
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains runs in its fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the tool quiets TensorFlow's start-up itself
  return subprocess.run([sys.executable, "-m", "curriculum_seg.cli", *args], capture_output=True,
                        text=True, cwd=cwd, timeout=600, env=env)


def checksums(folder):
  return {p: hashlib.sha256(open(os.path.join(folder, p), "rb").read()).hexdigest()
          for p in sorted(os.listdir(folder))}


def one_error_line(result, command, listing=False):
  """The error line (with `listing`, the error and its indented list of bad files)."""
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert lines[0].startswith(f"curriculum-seg {command}: error: "), result.stderr
  assert len(lines) == 1 or (listing and all(x.startswith("  ") for x in lines[1:])), \
      result.stderr
  return "\n".join(lines)


@pytest.fixture(scope="module")
def tiny_args(tiny_overrides):
  """tiny_args(root, steps=2, **extra): command-line overrides of a one-stage tiny run."""
  def args(root, steps=2, **extra):
    values = tiny_overrides(root, **{"curriculum": "('whole1',)",
                                     "stages.whole1.steps": str(steps),
                                     "data.synthetic.num_cases": "3", **extra})
    return [f"--config.{k}={v}" for k, v in values.items()]
  return args


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_a_users_lits_folder_is_never_written(tmp_path, ext):
  """The issue's data loss: prepare and train with the synthetic default pointed at a folder of
  the user's own cases exit 2 naming the setting, and every file keeps its bytes."""
  mine = tmp_path / "my_lits"
  mine.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    image = rng.integers(-1000, 400, (16, 16, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(mine / f"volume-{i}{ext}"))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint8), np.eye(4)),
             str(mine / f"segmentation-{i}{ext}"))
  before = checksums(mine)
  for command, extra in (("prepare", []), ("train", ["--workdir", str(tmp_path / "run")]),
                         ("check", [])):
    result = cli(command, "--config", "configs/synthetic.py", f"--config.data.lits_dir={mine}",
                 f"--config.data.tfds_dir={tmp_path / 'tfds'}", *extra)
    line = one_error_line(result, command)
    assert f"config.data.lits_dir={mine}" in line and "synthetic.enabled=false" in line, line
    assert checksums(mine) == before
  result = cli("synth", "--out_dir", str(mine), "--num_cases", "2")
  assert "--out_dir" in one_error_line(result, "synth")
  assert checksums(mine) == before
  assert sorted(os.listdir(tmp_path)) == ["my_lits"], "no dataset, no workdir"


def test_synthesis_rewrites_only_its_own_folder_and_files(tmp_path):
  out = tmp_path / "synth"
  first = cli("synth", "--out_dir", str(out), "--num_cases", "3", "--size", "32", "--slices", "8")
  assert first.returncode == 0, first.stderr
  second = cli("synth", "--out_dir", str(out), "--num_cases", "2", "--size", "32", "--slices", "8")
  assert second.returncode == 0, second.stderr
  names = sorted(n for n in os.listdir(out) if not n.startswith("."))
  assert names == ["manifest.json", "segmentation-0.nii.gz", "segmentation-1.nii.gz",
                   "volume-0.nii.gz", "volume-1.nii.gz"], "case 2 of its own earlier run removed"
  mode = stat.S_IMODE(os.stat(out / "volume-0.nii.gz").st_mode)
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o666 & ~umask, oct(mode)


def test_runs_travel_resume_from_their_saved_config_and_a_failed_start_frees_the_workdir(
    tmp_path, tiny_args):
  """A workdir whose run failed before training takes the corrected command; `train --workdir`
  alone extends a run; evaluate and predict work from another folder with relative paths."""
  here, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
  here.mkdir()
  elsewhere.mkdir()
  bad = here / "bad_lits"
  bad.mkdir()
  (bad / "volume-0.nii").write_bytes(b"not nifti")
  (bad / "segmentation-0.nii").write_bytes(b"not nifti")
  failed = cli("train", "--config", os.path.join(REPO, "configs/synthetic.py"), "--workdir", "run",
               *tiny_args("."), "--config.data.synthetic.enabled=false",
               "--config.data.lits_dir=bad_lits", cwd=here)
  listed = one_error_line(failed, "train", listing=True)
  assert "bad_lits/volume-0.nii: not a readable NIfTI" in listed
  assert "bad_lits/segmentation-0.nii: not a readable NIfTI" in listed
  trained = cli("train", "--config", os.path.join(REPO, "configs/synthetic.py"), "--workdir", "run",
                *tiny_args("."), cwd=here)
  assert trained.returncode == 0, trained.stderr[-2000:]
  saved = json.loads((here / "run" / "config.json").read_text())
  assert saved["data"]["lits_dir"] == str(here / "lits"), "data paths saved absolute"
  summary = json.loads((here / "run" / "summary.json").read_text())
  (used,) = summary["checkpoints"]
  assert (used["stage"], used["which"]) == ("whole1", "best")

  extended = cli("train", "--workdir", str(here / "run"), "--config.stages.whole1.steps=3",
                 cwd=elsewhere)
  assert extended.returncode == 0, extended.stderr[-2000:]
  rows = [json.loads(r) for r in (here / "run" / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows if r.get("loss") is not None) == 3
  changed = cli("train", "--workdir", str(here / "run"), "--config.loss.name=ce", cwd=elsewhere)
  assert "loss.name" in one_error_line(changed, "train")
  fresh = cli("train", "--workdir", str(elsewhere / "nothing"), cwd=elsewhere)
  assert "--config FILE is required for a new run" in one_error_line(fresh, "train")

  evaluated = cli("evaluate", "--workdir", str(here / "run"), "--output", "eval", cwd=elsewhere)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert (elsewhere / "eval" / "metrics.json").exists()
  volume = sorted((here / "lits").glob("volume-*.nii.gz"))[0]
  predicted = cli("predict", "--workdir", str(here / "run"), "--input", str(volume), "--output",
                  "mask.nii.gz", cwd=elsewhere)
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(elsewhere / "mask.nii.gz").st_mode) == 0o666 & ~umask


def test_a_folder_of_other_files_is_refused_as_a_workdir(tmp_path, tiny_args):
  mine = tmp_path / "results"
  mine.mkdir()
  (mine / "paper.tex").write_text("mine")
  result = cli("train", "--config", "configs/synthetic.py", "--workdir", str(mine),
               *tiny_args(tmp_path))
  assert "paper.tex" in one_error_line(result, "train")
  assert sorted(os.listdir(mine)) == ["paper.tex"]
  assert sorted(os.listdir(tmp_path)) == ["results"], "refused before synthesising"


def test_version_help_and_quiet_start():
  version = cli("--version")
  assert version.returncode == 0 and version.stdout.startswith("curriculum-seg ")
  for command in ("train", "prepare"):
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "--config.KEY=VALUE" in result.stdout and "FILE[:ARG]" in result.stdout
  helped = cli("train", "--help").stdout
  assert "(required)" in helped and "--workdir" in helped
  assert "default:" in cli("synth", "--help").stdout
  result = cli("check", "--config", "configs/synthetic.py", "--config.data.lits_dir=/nowhere/new")
  assert result.returncode == 0, result.stderr
  assert result.stderr == "", "no TensorFlow, oneDNN or absl start-up lines"


def test_a_run_made_before_target_spacing_evaluates_and_resumes(tmp_path, tiny_args):
  """A run on a fixed slice size whose config.json and checkpoints predate data.spacing_mm,
  blocks, normalisers and sliding windows (their keys absent, its dataset of an older format)
  still evaluates, predicts and resumes: the absent keys mean the behaviour it had."""
  args = tiny_args(tmp_path, **{"data.spacing_mm": "None", "data.image_size": "32",
                                "stages.whole1.block_size": "None", "eval.window": "None"})
  trained = cli("train", "--config", "configs/synthetic.py", "--workdir", str(tmp_path / "run"),
                *args)
  assert trained.returncode == 0, trained.stderr[-2000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  for section, key in (("data", "spacing_mm"), ("data", "normalisation"), ("eval", "window"),
                       ("eval", "overlap"), ("eval", "val_overlap"), ("eval", "sigma_scale")):
    del saved[section][key]
  for stage in saved["stages"].values():
    stage.pop("block_size", None), stage.pop("block_sampling", None)
  (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
  for meta in (tmp_path / "run" / "checkpoints").glob("*/*/*/meta/metadata"):
    record = json.loads(meta.read_text())
    record.pop("normaliser")
    meta.write_text(json.dumps(record))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / "tfds")  # its dataset format is gone: prepared again
  evaluated = cli("evaluate", "--workdir", str(tmp_path / "run"))
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  extended = cli("train", "--workdir", str(tmp_path / "run"), "--config.stages.whole1.steps=3")
  assert extended.returncode == 0, extended.stderr[-2000:]
  assert "extending the finished stage from 2 to 3 steps" in extended.stdout
