"""The stage controller: runs a curriculum (an ordered list of stages from the config).

`train` checks the config and the workdir and hands them to a `Controller`, whose `run` goes
through the stages in order. Each stage (`_run_stage`) is found complete, or resumed from its
latest checkpoint, or started (from scratch or from the checkpoint the previous stage hands on,
`curriculum.handed_on`); then trained, validated and checkpointed to its last step
(`_StageRun`); then it hands on. Progress lives in the checkpoints alone (state + JSON metadata:
stage, step, data position, best score), so a rerun resumes at the exact stage, step and data
position and ends with the parameters of an uninterrupted run. SIGTERM (a Cloud TPU
preemption) checkpoints and exits; SIGKILL loses at most the steps since the last checkpoint.

A stage may train its own network (`config.stages.<name>.model` overrides of `config.model`, as
the cascade's liver and tumour stages); such a stage starts from scratch and is validated on
its own task and pipeline's view of the validation cases.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from curriculum_seg import checkpoints as ckpt_lib
from curriculum_seg import curriculum, device_feed, optim, rundir, sharding, tasks, train_step
from curriculum_seg import validation
from curriculum_seg.curriculum import (  # noqa: F401  (their names here, as callers know them)
    INITS, PIPELINES, StageError, check_run_lengths, input_shape, input_size, stage_model_config,
    validate)
from curriculum_seg.models import build_model
from data_pipelines import intensity, lits_tfds, pipelines

# A finished run's summary: {"stages": [StageResult as a dict, ...], "checkpoints": [{network,
# stage, which, step, path}, ...]}, the latter the checkpoints evaluate and predict use.
SUMMARY_FILE = "summary.json"


def _absolute(path: epath.Path) -> str:
  text = os.fspath(path)
  return text if "://" in text else os.path.abspath(text)


def read_summary(workdir: epath.PathLike) -> Optional[dict]:
  """A finished run's summary.json (None before the run finished); a list of stage dicts,
  as runs of earlier versions wrote it, is returned as {"stages": [...]}."""
  path = epath.Path(workdir) / SUMMARY_FILE
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  return dict(stages=summary) if isinstance(summary, list) else summary


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient; the last good checkpoint is kept."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


@dataclasses.dataclass
class StageResult:
  name: str
  steps: int
  best_score: Optional[float]
  best_step: Optional[int]
  # The checkpoint the stage hands on ('best' or 'latest', `curriculum.handed_on`): what the
  # next stage starts from, or for the last stage what evaluate and predict use.
  chosen: str
  task: str = "tumour"  # the stage network's task: best_score is that task's validation Dice


def _every(step: int, interval: int, last: int) -> bool:
  return step == last or (interval > 0 and step % interval == 0)


_INJECTED = tuple(getattr(optax, name) for name in (
    "InjectHyperparamsState", "InjectStatefulHyperparamsState") if hasattr(optax, name))


def _restart_schedules(carried: Any, fresh: Any) -> Any:
  """The carried optimiser state with its injected schedules started again (taken from the new
  stage's `fresh` state) and everything else kept: moment estimates and Adam's own count.

  optax.inject_hyperparams keeps a schedule's position in its state's `count` and, in current
  optax (InjectStatefulHyperparamsState), also in `hyperparams_states`: both restart. A
  carried state with no injected schedule is an error rather than a stage trained on at the
  previous stage's schedule position.
  """
  found = []

  def restart(old, new):
    if isinstance(old, _INJECTED):
      found.append(old)
      return new._replace(inner_state=old.inner_state)
    return old
  out = jax.tree.map(restart, carried, fresh, is_leaf=lambda n: isinstance(n, _INJECTED))
  if not found:
    raise StageError("carry_optimizer: the carried optimiser state has no injected schedule "
                     f"to restart (optax {optax.__version__}); the stage would go on at the "
                     "previous stage's schedule position")
  return out


class _SigtermFlag:
  """Turns SIGTERM into a flag the training loop polls (main thread only).

  With several processes the signal reaches them at different steps (a Cloud TPU preemption),
  and a process that stops alone leaves the others waiting in a collective: `stop(step)` is
  the agreed decision, taken every SYNC_EVERY steps by all processes together (one tiny host
  all-gather), so they save the same step and exit together. One process: the flag itself.
  """

  SYNC_EVERY = 10

  def __init__(self):
    self.raised = False
    self._previous = None
    self._agreed = False

  def stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.raised
    if not self._agreed and step % self.SYNC_EVERY == 0:
      self._agreed = bool(sharding.process_failures(self.raised))
    return self._agreed

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      if self.raised and callable(self._previous):
        # A caller's own handler (a sweep of runs) still hears the SIGTERM this run took, even
        # one that came after the last step; the default action (train alone) is not re-run.
        self._previous(signal.SIGTERM, None)


class _RunClock:
  """Wall seconds of a run, training and evaluation, continued across resumptions (each
  checkpoint records them as `elapsed_s`; the metrics log's rows carry them)."""

  def __init__(self):
    self._base, self._start = 0.0, time.perf_counter()

  def restart(self, seconds: Optional[float]) -> None:
    """Continues from `seconds` (a checkpoint's `elapsed_s`; None keeps the current count)."""
    if seconds is not None:
      self._base, self._start = float(seconds), time.perf_counter()

  def seconds(self) -> float:
    return self._base + time.perf_counter() - self._start


class Controller:
  """Composes data, model, steps and checkpoints to run one config's curriculum in a workdir."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: epath.PathLike,
               log: Callable[[str], Any] = print, mesh: Optional[jax.sharding.Mesh] = None):
    validate(config)
    self.config = config
    self.workdir = epath.Path(workdir)
    self.log = log if jax.process_index() == 0 else (lambda s: None)
    self.mesh = mesh if mesh is not None else sharding.make_mesh()
    self.model = build_model(config.model, int(config.data.context_slices))  # config.model's
    self._models: dict[str, Any] = {curriculum.model_key(config.model): self.model}
    self.metrics_log = rundir.MetricsLog(self.workdir)
    self._clock = _RunClock()
    self._compiled: dict[str, Any] = {}
    self.builder = None
    self.writer = None
    self.normaliser: Optional[intensity.Normaliser] = None
    self.validator: Optional[validation.Validator] = None

  # --- building blocks -------------------------------------------------------------------

  def _model_cfg(self, stage: Optional[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    return self.config.model if stage is None else stage_model_config(self.config, stage)

  def model_for(self, stage: Optional[ml_collections.ConfigDict]):
    """The network a stage trains (config.model with the stage's overrides)."""
    cfg = self._model_cfg(stage)
    key = curriculum.model_key(cfg)
    if key not in self._models:
      self._models[key] = build_model(cfg, int(self.config.data.context_slices))
    return self._models[key]

  def _tx(self, stage: ml_collections.ConfigDict) -> optax.GradientTransformation:
    tx, _ = optim.build_optimizer(stage.optimizer, stage.schedule, int(stage.steps))
    return tx

  def _train_step(self, name: str, stage: ml_collections.ConfigDict, tx):
    """The compiled step, shared by stages whose optimiser, schedule and length match."""
    model_cfg = self._model_cfg(stage)
    key = json.dumps(dict(opt=stage.optimizer.to_dict(), sched=stage.schedule.to_dict(),
                          steps=int(stage.steps), model=curriculum.model_key(model_cfg)),
                     sort_keys=True)
    if key not in self._compiled:
      self._compiled[key] = (tx, train_step.make_train_step(
          self.model_for(stage), tx, self.config.loss, model_cfg.task, self.mesh))
    return self._compiled[key]

  def _input_shape(self, stage: ml_collections.ConfigDict) -> tuple[int, ...]:
    return ((int(stage.batch_size),) + input_shape(self.config, stage)
            + (int(self.config.data.context_slices),))

  def _abstract_state(self, stage, tx):
    """Shapes, dtypes and (replicated) shardings of a stage's train state, computing nothing."""
    shape = self._input_shape(stage)
    model = self.model_for(stage)

    def build(rng):
      variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
      zero = jnp.zeros((), jnp.int32)
      return train_step.TrainState(step=zero, params=variables["params"],
                                   batch_stats=variables.get("batch_stats", {}),
                                   opt_state=tx.init(variables["params"]), skipped=zero)

    shapes = jax.eval_shape(build, jax.random.PRNGKey(0))
    return ckpt_lib.abstract_like(shapes, sharding.replicated(self.mesh))

  def _stage_checkpoints(self, name: str) -> ckpt_lib.StageCheckpoints:
    return ckpt_lib.StageCheckpoints(self.workdir / "checkpoints", name)

  def evaluate(self, state, stage: Optional[ml_collections.ConfigDict] = None
               ) -> dict[str, float]:
    """Scores `state` on the validation split (`curriculum_seg.validation`): global and mean
    per-slice Dice of the stage's task (tumour Dice, or liver Dice for a liver network), and
    the loss. `stage` None: config.model on whole slices."""
    model_cfg = self._model_cfg(stage)
    return self.validator.scores(state, self.model_for(stage), model_cfg, stage,
                                 curriculum.model_key(model_cfg))

  # --- the run ---------------------------------------------------------------------------

  def run(self) -> list[StageResult]:
    """Runs (or resumes) every stage in order; returns what each stage hands on."""
    self._open_data()
    self._open_outputs()
    results: list[StageResult] = []
    previous: Optional[tuple[ckpt_lib.StageCheckpoints, StageResult, Any]] = None
    global_offset = 0
    with _SigtermFlag() as sigterm:
      for index, name in enumerate(self.config.curriculum):
        stage = self.config.stages[name]
        result, state_ckpts, tx = self._run_stage(index, name, stage, previous, global_offset,
                                                  sigterm)
        results.append(result)
        previous = (state_ckpts, result, tx)
        global_offset += int(stage.steps)
    self._write_summary(results)
    return results

  def _open_data(self) -> None:
    """The prepared dataset (prepared first where needed), its input normaliser, validation."""
    lead = jax.process_index() == 0
    # Process 0 synthesises and prepares the data while the others wait; then they open it
    # (a folder that only process 0 sees stops every process, not just the others).
    with sharding.all_or_none("to prepare the dataset"):
      if lead:
        self.builder = lits_tfds.prepare(self.config.data, log=self.log)
    with sharding.all_or_none("to open the prepared dataset"):
      if not lead:
        self.builder = lits_tfds.prepare(self.config.data, log=self.log, build=False)
    self.normaliser = intensity.normaliser_for(self.config.data, self.builder.info.metadata)
    self.log(f"input: {self.normaliser.describe()}")
    self.validator = validation.Validator(self.config, self.builder, self.mesh, self.normaliser)

  def _open_outputs(self) -> None:
    """Process 0's TensorBoard writer; a finished run's summary goes while the run runs."""
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      self.writer = metric_writers.SummaryWriter(os.fspath(self.workdir / "tensorboard"))
      # A finished run's summary stays only while the run is finished (it may be extended).
      if (self.workdir / SUMMARY_FILE).exists():
        (self.workdir / SUMMARY_FILE).unlink()

  def _write_summary(self, results: list[StageResult]) -> None:
    if self.writer is not None:
      self.writer.flush()
    # Every process opens the checkpoints (Orbax's managers synchronise the processes).
    used = self.used_checkpoints()
    if jax.process_index() == 0:
      summary = dict(stages=[dataclasses.asdict(r) for r in results], checkpoints=used)
      rundir.write_atomically(self.workdir / SUMMARY_FILE, json.dumps(summary, indent=1))

  def used_checkpoints(self) -> list[dict]:
    """The checkpoints `evaluate` and `predict` use by default (`inference.chosen_checkpoint`):
    the last stage's best, else its latest; a cascade's liver and tumour stages'."""
    from curriculum_seg import inference  # pylint: disable=g-import-not-at-top
    cascade = self.config.get("cascade", None)
    wanted = ([("liver", cascade.liver_stage), ("tumour", cascade.tumour_stage)] if cascade
              else [(None, None)])
    used = []
    for network, stage in wanted:
      name, which, step = inference.chosen_checkpoint(self.workdir, self.config, stage=stage)
      used.append(dict(network=network or str(self._model_cfg(self.config.stages[name]).task),
                       stage=name, which=which, step=int(step),
                       path=_absolute(self.workdir / "checkpoints" / name / which / str(step))))
    return used

  def _initial_state(self, index, name, stage, tx, previous):
    """A new stage's starting state: from scratch, or the previous stage's chosen checkpoint.

    Also returns the validation scores of the starting weights when the previous stage
    recorded them for this stage's view of the validation data (same network, both validated
    alike), else None.
    """
    rng = jax.random.PRNGKey(int(self.config.seed))
    fresh = train_step.create_train_state(rng, self.model_for(stage), tx,
                                          self._input_shape(stage),
                                          self.mesh)
    if index == 0 or stage.init == "scratch":
      self.log(f"[{name}] starts from scratch")
      return fresh, None
    prev_ckpts, prev_result, prev_tx = previous
    which = curriculum.handed_on(stage.init, bool(prev_ckpts.steps(ckpt_lib.BEST)))
    prev_stage = self.config.stages[prev_result.name]
    restored, meta = prev_ckpts.restore(self._abstract_state(prev_stage, prev_tx), which)
    self.log(f"[{name}] starts from {prev_result.name}'s {which} checkpoint (step {meta['step']}"
             + (f", val dice {meta['best_score']:.4f})" if which == ckpt_lib.BEST else ")"))
    opt_state = fresh.opt_state
    if stage.carry_optimizer:
      opt_state = _restart_schedules(restored.opt_state, fresh.opt_state)
    scores = None
    if "val_dice" in meta and curriculum.same_validation(prev_stage, stage):
      scores = {k: meta[k] for k in ("val_dice", "val_dice_mean", "val_loss", "val_slices")
                if k in meta}
    return fresh.replace(params=restored.params, batch_stats=restored.batch_stats,
                         opt_state=opt_state), scores

  def _run_stage(self, index, name, stage, previous, global_offset, sigterm):
    """One stage: found complete, or resumed, or started; trained to its last step; and what it
    hands on. Returns (its StageResult, its checkpoints, its optimiser) for the next stage."""
    ckpts = self._stage_checkpoints(name)
    tx, step_fn = self._train_step(name, stage, self._tx(stage))
    saved = ckpts.meta()  # the stage's latest checkpoint's metadata (None before the first)
    if self._complete(name, stage, saved):
      return self._result(name, stage, saved), ckpts, tx
    if saved is not None:
      progress, start_scores = self._resume(name, stage, tx, ckpts), None
    else:
      progress, start_scores = self._start(index, name, stage, tx, previous)
    run = _StageRun(self, index, name, stage, ckpts, progress, global_offset,
                    resumed=saved is not None)
    try:
      if progress.from_checkpoint:
        run.score_start(start_scores)
      run.train(step_fn, sigterm)
    finally:
      run.close()
    run.log_done()
    return self._result(name, stage, progress.meta()), ckpts, tx

  def _complete(self, name, stage, saved: Optional[dict]) -> bool:
    """Whether the stage finished at its configured length; a finished stage given more steps
    is extended (when `check_run_lengths` allows) and is not complete."""
    if saved is None or not saved.get("completed"):
      return False
    done, steps = int(saved["step"]), int(stage.steps)
    if done == steps:
      self.log(f"[{name}] already complete ({done} steps, best val dice "
               f"{_fmt(saved.get('best_score'))})")
      self._clock.restart(saved.get("elapsed_s"))
      return True
    check_run_lengths(self.config, self.workdir)
    self.log(f"[{name}] extending the finished stage from {done} to {steps} steps (its "
             "schedule is now that of the longer stage)")
    return False

  def _resume(self, name, stage, tx, ckpts) -> "_Progress":
    """The stage's progress at its latest checkpoint."""
    state, meta = ckpts.restore(self._abstract_state(stage, tx), ckpt_lib.LATEST)
    self._clock.restart(meta.get("elapsed_s"))
    self.log(f"[{name}] resuming at step {int(meta['step'])}/{int(stage.steps)}")
    return _Progress(state=state, step=int(meta["step"]), position=meta["position"],
                     best_score=meta.get("best_score"), best_step=meta.get("best_step"))

  def _start(self, index, name, stage, tx, previous) -> tuple["_Progress", Optional[dict]]:
    """A new stage's progress at step 0 (`_initial_state`), and the starting weights' scores
    when the previous stage recorded them."""
    state, start_scores = self._initial_state(index, name, stage, tx, previous)
    steps, warmup = int(stage.steps), int(stage.schedule.get("warmup_steps", 0))
    if optim.effective_warmup(stage.schedule, steps) < warmup:
      self.log(f"[{name}] warm-up of {warmup} steps clamped to {steps - 1} (the stage has "
               f"{steps} steps)")
    return _Progress(state=state, step=0, position=0,
                     from_checkpoint=index > 0 and stage.init != "scratch"), start_scores

  def _result(self, name, stage, meta) -> StageResult:
    """What stage `name` hands on, given its last checkpoint's metadata."""
    chosen = curriculum.handed_on(curriculum.taker_wants(self.config, name),
                                  meta.get("best_score") is not None)
    return StageResult(name=name, steps=int(meta["step"]), best_score=meta.get("best_score"),
                       best_step=meta.get("best_step"), chosen=chosen,
                       task=str(self._model_cfg(stage).task))

  def _log_row(self, row: dict, steps: int) -> None:
    if jax.process_index() != 0:
      return
    self.metrics_log.append([row])
    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in (
        "step", "global_step")}
    self.writer.write_scalars(row["global_step"], {f"{row['stage']}/{k}": v
                                                   for k, v in scalars.items()})
    parts = [f"[{row['stage']}] step {row['step']}/{steps}"]
    if "loss" in row:
      eta = (steps - row["step"]) / max(row["steps_per_s"], 1e-9)
      parts.append(f"loss {row['loss']:.4f} dice {row['dice']:.3f} "
                   f"{row['steps_per_s']:.1f} steps/s ETA {eta:.0f}s")
    if "val_dice" in row:
      task = self._model_cfg(self.config.stages[row["stage"]]).task
      label = "val dice" if task in tasks.TUMOUR_TASKS else f"val {task} dice"
      parts.append(f"{label} {row['val_dice']:.4f} (best {row['best_val_dice']:.4f})")
    self.log("  ".join(parts))


@dataclasses.dataclass
class _Progress:
  """Where a stage is: its train state, its step and data position, its best validation Dice
  and that step; `from_checkpoint` for a new stage that starts from the previous one's."""

  state: Any
  step: int
  position: int
  best_score: Optional[float] = None
  best_step: Optional[int] = None
  from_checkpoint: bool = False

  def record(self, score: float) -> bool:
    """Takes a validation Dice; whether it is a new best (ties keep the earlier step)."""
    if self.best_score is None or score > self.best_score:
      self.best_score, self.best_step = score, self.step
      return True
    return False

  def meta(self) -> dict:
    return dict(step=self.step, best_score=self.best_score, best_step=self.best_step)


class _StageRun:
  """One stage's training from its start or resume point to its last step: the batches and
  steps, the log rows, validation and the best score, the checkpoints."""

  def __init__(self, controller: Controller, index: int, name: str,
               stage: ml_collections.ConfigDict, ckpts: ckpt_lib.StageCheckpoints,
               progress: _Progress, global_offset: int, resumed: bool):
    self.c, self.index, self.name, self.stage, self.ckpts = controller, index, name, stage, ckpts
    self.progress, self.offset, self.steps = progress, global_offset, int(stage.steps)
    config = controller.config
    if jax.process_index() == 0:
      controller.metrics_log.truncate_to(name, progress.step, global_offset + progress.step,
                                         resumed=resumed)
    host = pipelines.make_train_pipeline(
        controller.builder, config.data, config.augment, stage, int(config.seed) + index,
        jax.process_index(), jax.process_count(), start=progress.position)
    self.feed = device_feed.DeviceFeed(host, controller.mesh)
    self.rng = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), index)
    self.skipped_before = int(jax.device_get(progress.state.skipped))
    self.t_last, self.step_last = time.perf_counter(), progress.step
    self.t_stage = time.perf_counter()

  def _due(self, interval) -> bool:
    return _every(self.progress.step, int(interval), self.steps)

  def _row(self) -> dict:
    step = self.progress.step
    return dict(stage=self.name, step=step, global_step=self.offset + step)

  def score_start(self, scores: Optional[dict]) -> None:
    """The starting weights (the previous stage's checkpoint) are a candidate: a stage that only
    gets worse hands on (and a run hands out) the weights it started from, not its best bad
    checkpoint. Their scores are those the previous stage recorded where it validated alike."""
    if scores is None:
      scores = self.c.evaluate(self.progress.state, self.stage)
    self.progress.record(scores["val_dice"])
    self.c._log_row(dict(self._row(), **scores, best_val_dice=self.progress.best_score,
                         elapsed_s=self.c._clock.seconds()), self.steps)
    self.checkpoint(best=True, scores=scores)

  def train(self, step_fn, sigterm: "_SigtermFlag") -> None:
    """Steps to the stage's end: logs, validates and checkpoints at their intervals; stops
    with Preempted after checkpointing when SIGTERM arrived."""
    progress = self.progress
    while progress.step < self.steps:
      progress.state, metrics = step_fn(progress.state, next(self.feed), self.rng)
      progress.step += 1
      row = self._train_row(metrics) if self._due(self.stage.log_every) else None
      best, scores = False, None
      if self._due(self.stage.eval_every):
        scores = self.c.evaluate(progress.state, self.stage)
        best = progress.record(scores["val_dice"])
        row = dict(row or self._row(), **scores, best_val_dice=progress.best_score)
      if row is not None:
        self.c._log_row(dict(row, elapsed_s=self.c._clock.seconds()), self.steps)
      stop = sigterm.stop(progress.step)
      if progress.step == self.steps:
        self.checkpoint(completed=True, best=best, scores=scores)
      elif best or self._due(self.stage.checkpoint_every) or stop:
        self.checkpoint(best=best, scores=scores)
      if stop and progress.step < self.steps:
        raise Preempted(f"[{self.name}] SIGTERM: checkpoint saved at step {progress.step}/"
                        f"{self.steps}; run the same command to resume")

  def _train_row(self, metrics) -> dict:
    """The metrics log's row of this step; NonFiniteLossError where the step was skipped."""
    step = self.progress.step
    metrics = jax.device_get(metrics)
    skipped = int(jax.device_get(self.progress.state.skipped))
    if skipped > self.skipped_before or not math.isfinite(float(metrics["loss"])):
      raise NonFiniteLossError(
          f"[{self.name}] non-finite loss or gradient at step {step} (stage {self.name}); the "
          f"update was not applied and the last good checkpoint is kept. Lower "
          f"config.stages.{self.name}.optimizer.learning_rate or check the data.")
    now = time.perf_counter()
    rate = (step - self.step_last) / max(now - self.t_last, 1e-9)
    self.t_last, self.step_last = now, step
    return dict(self._row(), loss=float(metrics["loss"]), dice=float(metrics["dice"]),
                grad_norm=float(metrics["grad_norm"]), lr=float(metrics.get("lr", np.nan)),
                steps_per_s=rate, batch_size=int(self.stage.batch_size),
                input_size=input_size(self.c.config, self.stage))

  def checkpoint(self, completed: bool = False, best: bool = False,
                 scores: Optional[dict] = None) -> None:
    progress = self.progress
    meta = dict(stage=self.name, stage_index=self.index, step=progress.step,
                global_step=self.offset + progress.step, position=self.feed.position,
                best_score=progress.best_score, best_step=progress.best_step,
                completed=completed, elapsed_s=self.c._clock.seconds(),
                normaliser=self.c.normaliser.to_dict(), **(scores or {}))
    self.ckpts.save(progress.step, progress.state, meta, best=best)

  def close(self) -> None:
    self.feed.close()
    self.ckpts.close()

  def log_done(self) -> None:
    task = self.c._model_cfg(self.stage).task
    self.c.log(f"[{self.name}] done: {self.steps} steps in "
               f"{time.perf_counter() - self.t_stage:.1f} s, best val "
               f"{'' if task in tasks.TUMOUR_TASKS else task + ' '}dice "
               f"{_fmt(self.progress.best_score)} at step {self.progress.best_step}")


def _fmt(value: Optional[float]) -> str:
  return "n/a" if value is None else f"{value:.4f}"


def enable_compilation_cache(config: ml_collections.ConfigDict) -> None:
  """Keeps compiled steps on disk, so a resumed or repeated run skips most compilation.

  `config.compilation_cache_dir` (default `~/.cache/curriculum_seg/jax`; "" disables; may be
  gs:// on Cloud TPU). The cache holds XLA executables only: results are unchanged.
  """
  path = config.get("compilation_cache_dir", None)
  if path is None:
    path = os.path.join(os.path.expanduser("~"), ".cache", "curriculum_seg", "jax")
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.fspath(path))


def train(config: ml_collections.ConfigDict, workdir: epath.PathLike,
          log: Callable[[str], Any] = print,
          distributed: Optional[dict[str, Any]] = None) -> list[StageResult]:
  """Runs or resumes `config`'s curriculum in `workdir` (the `curriculum-seg train` command).

  `distributed`: explicit multi-process settings (coordinator_address, num_processes,
  process_id) over the JAX_* environment variables; see `sharding.distributed_settings`.
  In a multi-process run every process calls this; only process 0 locks the workdir, writes
  config.json, the logs and summary.json, and a refusal on process 0 stops every process.
  """
  from curriculum_seg import config_check  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  # The whole config, the data folder and the workdir are checked before any work: a mistake
  # is one ConfigError (or RunDirError) naming its key, and nothing is written.
  config_check.check_config(config)
  config = config_check.resolve_paths(config)  # config.json finds the data from any folder
  rundir.check_claimable(workdir)
  sharding.maybe_initialize_distributed(**(distributed or {}))
  enable_compilation_cache(config)
  lead = jax.process_index() == 0
  if not lead:
    log = lambda message: None  # noqa: E731
  controller = Controller(config, workdir, log=log)
  lock = rundir.RunLock(workdir)
  try:
    # Every process reads the checkpoints (Orbax's managers synchronise the processes), before
    # config.json takes the new lengths.
    with sharding.all_or_none("to check the run's stage lengths"):
      if rundir.has_checkpoint(workdir):
        check_run_lengths(config, workdir)
    with sharding.all_or_none("to take the workdir"):
      if lead:
        workdir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        if rundir.check_or_save_config(workdir, config, log=log):
          log(f"resuming the run in {workdir}")
    return controller.run()
  finally:
    lock.release()
