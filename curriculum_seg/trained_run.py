"""A trained run opened once: its saved config, its checkpoints, its networks and segmenters.

`open_run(workdir)` reads `config.json` once (`rundir.read_config`); `evaluate`, `predict` and
`inspect` hand the opened run along and ask it for a network (`network`: one checkpoint's
variables, `inference.load_network`) or a segmenter (`predictor`: one network, or a cascade
run's liver and tumour networks chained by `curriculum_seg.cascade`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import ml_collections
from etils import epath

from curriculum_seg import cascade, inference


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """A run directory and the config it saved."""

  workdir: epath.Path
  config: ml_collections.ConfigDict

  def chosen_checkpoint(self, stage: Optional[str] = None) -> tuple[str, str, int]:
    """(stage, which, step) of the checkpoint the run (or `stage`) hands out."""
    return inference.chosen_checkpoint(self.workdir, self.config, stage=stage)

  def network(self, *, stage: Optional[str] = None, step: Optional[int] = None,
              which: Optional[str] = None,
              mesh: Optional[jax.sharding.Mesh] = None) -> inference.Network:
    """One checkpoint's network (default: the one the run hands out; see `load_network`)."""
    return inference.load_network(self.workdir, stage=stage, step=step, which=which, mesh=mesh,
                                  config=self.config)

  def predictor(self, *, stage: Optional[str] = None, step: Optional[int] = None,
                which: Optional[str] = None, mesh: Optional[jax.sharding.Mesh] = None,
                options: Optional[inference.InferenceOptions] = None) -> inference.Predictor:
    """The run's segmenter: its chosen checkpoint, or the stage/step/which asked for.

    A cascade run (`config.cascade`) chains its liver and tumour networks' chosen (or `which`)
    checkpoints; every other run is one network.
    """
    options = inference.InferenceOptions() if options is None else options
    if self.config.get("cascade", None):
      if stage is not None or step is not None:
        raise inference.InferenceError(
            "a cascade run is evaluated with its liver and tumour networks' chosen "
            "checkpoints; --stage/--step do not apply")
      return cascade.load_cascade_predictor(self.workdir, self.config, mesh=mesh,
                                            options=options, which=which)
    network = self.network(stage=stage, step=step, which=which, mesh=mesh)
    return inference.Predictor(network, options)


def open_run(workdir: epath.PathLike) -> TrainedRun:
  """Reads a run directory's config (InferenceError for a folder without a run)."""
  return TrainedRun(epath.Path(workdir), inference.read_run_config(workdir))


def load_predictor(workdir: epath.PathLike, *, stage: Optional[str] = None,
                   step: Optional[int] = None, which: Optional[str] = None,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   options: Optional[inference.InferenceOptions] = None) -> inference.Predictor:
  """`open_run(workdir).predictor(...)`."""
  return open_run(workdir).predictor(stage=stage, step=step, which=which, mesh=mesh,
                                     options=options)
