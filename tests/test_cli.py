"""The console script: synth and prepare end to end, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from curriculum_seg import cli, config_loading


def run_cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "curriculum_seg.cli", *args], capture_output=True,
                        text=True, cwd=cwd, timeout=300)


def test_synth_writes_cases_and_manifest(tmp_path):
  out = tmp_path / "lits"
  result = run_cli("synth", "--out_dir", str(out), "--num_cases", "2", "--seed", "4",
                   "--size", "64", "--slices", "12")
  assert result.returncode == 0, result.stderr
  assert "wrote 2 cases" in result.stdout
  manifest = json.loads((out / "manifest.json").read_text())
  assert [c["volume"] for c in manifest["cases"]] == ["volume-0.nii.gz", "volume-1.nii.gz"]
  assert (out / "segmentation-1.nii.gz").exists()


@pytest.mark.slow
def test_prepare_synthesises_then_reuses(tmp_path):
  args = ["prepare", "--config", "configs/synthetic.py",
          f"--config.data.lits_dir={tmp_path / 'lits'}", f"--config.data.tfds_dir={tmp_path / 't'}",
          "--config.data.synthetic.num_cases=3", "--config.data.synthetic.size=64",
          "--config.data.synthetic.slices", "10", "--config.data.spacing_mm=(16.0, 16.0)",
          "--config.stages.whole1.block_size=16", "--config.stages.whole2.block_size=16",
          "--config.eval.window=16",
          "--config.stages.patch.patch_size=16", "--config.stages.patch.patch_jitter=4"]
  first = run_cli(*args)
  assert first.returncode == 0, first.stderr
  assert "synthesising 3" in first.stdout and "train: " in first.stdout
  second = run_cli(*args)
  assert second.returncode == 0 and "reused" in second.stdout


@pytest.mark.parametrize("args,message", [
    (["prepare", "--config", "configs/synthetic.py", "--config.data.imagesize=3"],
     "unknown config key data.imagesize (did you mean data.image_size?)"),
    (["prepare", "--config", "configs/synthetic.py", "--config.data.context_slices=big"],
     "config key data.context_slices expects an int"),
    (["prepare", "--config", "configs/missing.py"],
     "config file configs/missing.py does not exist"),
    (["prepare"], "the following arguments are required: --config"),
    (["prepare", "--config", "configs/synthetic.py", "--config.data.synthetic.enabled=false",
      "--config.data.lits_dir=/no/such/dir"], "/no/such/dir: LiTS folder does not exist"),
    (["synth", "--out_dir", "/tmp/x"], "required: --num_cases"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
  result = run_cli(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert message in lines[0]
  assert "Traceback" not in result.stderr


def test_overrides_parse_to_the_fields_type():
  config = config_loading.load_config_file("configs/synthetic.py")
  out = config_loading.apply_overrides(config, [("data.val_fraction", "0.5"),
                                                ("data.synthetic.enabled", "False"),
                                                ("data.lits_dir", "gs://bucket/lits")])
  assert out.data.val_fraction == 0.5 and out.data.synthetic.enabled is False
  assert out.data.lits_dir == "gs://bucket/lits"
  assert config.data.val_fraction == 0.17, "the original is untouched"
  prior = config_loading.apply_overrides(config, [("model.foreground_prior", "0.01")])
  assert prior.model.foreground_prior == 0.01
  cleared = config_loading.apply_overrides(prior, [("model.foreground_prior", "None")])
  assert cleared.model.foreground_prior is None, "'None' clears an optional number"
  weights = config_loading.apply_overrides(config, [("loss.class_weights", "None")])
  assert weights.loss.class_weights is None and config.loss.class_weights == (1.0, 10.0)
  with pytest.raises(config_loading.ConfigError, match="expects an int"):
    config_loading.apply_overrides(config, [("model.depth", "None")])
  with pytest.raises(config_loading.ConfigError, match="group of settings"):
    config_loading.apply_overrides(config, [("data", "1")])
  assert cli.main(["--help"]) == 0


@pytest.mark.parametrize("args,env,message", [
    (["--coordinator_address", "127.0.0.1:1234", "--num_processes", "2"], {},
     "JAX_PROCESS_ID (or --process_id) is not set"),
    ([], {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES (or --num_processes) is not set"),
    (["--process_id", "3"], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"},
     "--process_id=3 must be in [0, 2)"),
])
def test_half_specified_multiprocess_train_is_one_line_and_exit_2(args, env, message, tmp_path,
                                                                   monkeypatch, capsys):
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  code = cli.main(["train", "--config", "configs/synthetic.py", "--workdir",
                   str(tmp_path / "run"), *args])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and message in lines[0], lines
  assert lines[0].startswith("curriculum-seg train: error: ")
  assert not (tmp_path / "run").exists(), "refused before any work"
