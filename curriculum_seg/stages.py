"""The stage controller: runs a curriculum (an ordered list of stages from the config).

For each stage it builds the stage's pipeline, model and optimiser, starts from scratch or from
the previous stage's best or last checkpoint, trains, evaluates on validation slices, and
checkpoints with Orbax (state + JSON metadata: stage, step, data position, best score). Progress
lives in the checkpoints alone, so `run` on an existing workdir resumes at the exact stage, step
and data position; with the same seed and devices it ends with the same parameters as an
uninterrupted run. SIGTERM (a Cloud TPU preemption) checkpoints and exits; SIGKILL loses at most
the steps since the last checkpoint.

A stage may override fields of `config.model` (`config.stages.<name>.model`, e.g. task='liver'),
so one run can train different networks in turn, as the cascade baseline does (a liver network,
then a tumour network on liver crops; `config.cascade` names the two stages). A stage whose
network differs from the previous stage's starts from scratch, and its validation Dice (which
picks its best checkpoint) is that of its own task, on its own pipeline's view of the validation
cases (whole slices, or liver crops for a 'liver_crop' stage).
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
from curriculum_seg import device_feed, optim, rundir, sharding, tasks, train_step, validation
from curriculum_seg.models import build_model
from data_pipelines import intensity, lits_tfds, pipelines

PIPELINES = pipelines.PIPELINES  # 'whole', 'patch', 'liver_crop'
TUMOUR_TASKS = tasks.TUMOUR_TASKS
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
INITS = ("scratch", "best", "last")


class StageError(RuntimeError):
  """A curriculum that cannot run as configured (the message names the config key)."""


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
  # Which checkpoint the next stage starts from, 'best' or 'last'; for the final stage, the one
  # evaluate and predict use (its best when validation saved one).
  chosen: str
  task: str = "tumour"  # the stage network's task: best_score is that task's validation Dice


def stage_model_config(config: ml_collections.ConfigDict,
                       stage: str | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` with the stage's `model` overrides (if any) applied; `stage` is a stage
  name or a stage ConfigDict. Unknown override keys are a StageError."""
  if isinstance(stage, str):
    name, stage = stage, config.stages[stage]
  else:
    name = next((n for n in config.stages.keys() if config.stages[n] is stage), "<stage>")
  model = ml_collections.ConfigDict(config.model.to_dict())
  overrides = stage.get("model", None)
  if overrides:
    for key, value in overrides.items():
      if key not in model:
        raise StageError(f"config.stages.{name}.model.{key} is not a field of config.model "
                         f"(fields: {', '.join(model.keys())})")
      with model.ignore_type():
        model[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return model


def _model_key(model_cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(model_cfg.to_dict(), sort_keys=True, default=str)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the curriculum part of a config, naming the offending key."""
  if not config.get("curriculum"):
    raise StageError("config.curriculum must name at least one stage")
  for name in config.curriculum:
    if name not in config.stages:
      raise StageError(f"config.curriculum names stage {name!r}, but config.stages has no such "
                       f"stage (stages: {', '.join(config.stages.keys())})")
  if len(set(config.curriculum)) != len(config.curriculum):
    raise StageError(f"config.curriculum repeats a stage name: {list(config.curriculum)}")
  for k, name in enumerate(config.curriculum):
    s = config.stages[name]
    key = f"config.stages.{name}"
    if s.pipeline not in PIPELINES:
      raise StageError(f"{key}.pipeline={s.pipeline!r} is not one of {list(PIPELINES)}")
    if s.init not in INITS:
      raise StageError(f"{key}.init={s.init!r} is not one of {list(INITS)}")
    if int(s.steps) < 1:
      raise StageError(f"{key}.steps={s.steps} must be >= 1")
    if int(s.batch_size) < 1:
      raise StageError(f"{key}.batch_size={s.batch_size} must be >= 1")
    for field in ("eval_every", "checkpoint_every", "log_every"):
      if int(s[field]) < 0:
        raise StageError(f"{key}.{field}={s[field]} must be >= 0")
    model = stage_model_config(config, name)
    if model.task not in tasks.TASKS:
      raise StageError(f"{key}.model.task (or config.model.task)={model.task!r} is not one of "
                       f"{list(tasks.TASKS)}")
    if s.pipeline == "patch" and model.task == "liver":
      raise StageError(f"{key}.pipeline='patch' (tumour-centred patches) cannot train a liver "
                       f"network (model.task='liver'): use pipeline='whole'")
    if k > 0:
      prev_name = config.curriculum[k - 1]
      prev = config.stages[prev_name]
      if s.init != "scratch" and _model_key(model) != _model_key(
          stage_model_config(config, prev_name)):
        raise StageError(
            f"{key}.init={s.init!r}: stage {name!r} trains a different network than stage "
            f"{prev_name!r} (config.stages.{name}.model differs), so it cannot start from "
            f"{prev_name!r}'s weights; set {key}.init='scratch'")
      if s.carry_optimizer and prev.optimizer.name != s.optimizer.name:
        raise StageError(f"{key}.carry_optimizer needs the previous stage's optimiser type, "
                         f"got {prev.optimizer.name!r} then {s.optimizer.name!r}")
  _validate_cascade(config)


def _validate_cascade(config: ml_collections.ConfigDict) -> None:
  """`config.cascade` (liver_stage, tumour_stage) names a liver stage and a liver-crop stage."""
  cascade = config.get("cascade", None)
  if not cascade:
    return
  for field in ("liver_stage", "tumour_stage"):
    name = cascade.get(field, None)
    if name not in config.curriculum:
      raise StageError(f"config.cascade.{field}={name!r} is not a stage of config.curriculum "
                       f"({', '.join(config.curriculum)})")
  liver, tumour = cascade.liver_stage, cascade.tumour_stage
  if stage_model_config(config, liver).task != "liver":
    raise StageError(f"config.cascade.liver_stage={liver!r} must train a liver network: set "
                     f"config.stages.{liver}.model.task='liver'")
  if config.stages[tumour].pipeline != "liver_crop":
    raise StageError(f"config.cascade.tumour_stage={tumour!r} must train on liver crops: set "
                     f"config.stages.{tumour}.pipeline='liver_crop'")
  if stage_model_config(config, tumour).task not in TUMOUR_TASKS:
    raise StageError(f"config.cascade.tumour_stage={tumour!r} must train a tumour network: "
                     f"config.stages.{tumour}.model.task must be one of {list(TUMOUR_TASKS)}")


def _every(step: int, interval: int, last: int) -> bool:
  return step == last or (interval > 0 and step % interval == 0)


def _reset_schedule_counts(opt_state: Any) -> Any:
  """Restarts injected schedules (their `count`) while keeping moment estimates."""
  def reset(node):
    if isinstance(node, optax.InjectHyperparamsState):
      return node._replace(count=jnp.zeros_like(node.count))
    return node
  return jax.tree.map(reset, opt_state,
                      is_leaf=lambda n: isinstance(n, optax.InjectHyperparamsState))


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
    self._models: dict[str, Any] = {_model_key(config.model): self.model}
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
    key = _model_key(cfg)
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
                          steps=int(stage.steps), model=_model_key(model_cfg)), sort_keys=True)
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
                                 _model_key(model_cfg))

  # --- the run ---------------------------------------------------------------------------

  def run(self) -> list[StageResult]:
    """Runs (or resumes) every stage in order; returns what each stage chose."""
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
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
    if lead:
      self.writer = metric_writers.SummaryWriter(os.fspath(self.workdir / "tensorboard"))
      # A finished run's summary stays only while the run is finished (it may be extended).
      if (self.workdir / SUMMARY_FILE).exists():
        (self.workdir / SUMMARY_FILE).unlink()
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
    if self.writer is not None:
      self.writer.flush()
    # Every process opens the checkpoints (Orbax's managers synchronise the processes).
    used = self.used_checkpoints()
    if lead:
      summary = dict(stages=[dataclasses.asdict(r) for r in results], checkpoints=used)
      rundir.write_atomically(self.workdir / SUMMARY_FILE, json.dumps(summary, indent=1))
    return results

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
    which = ckpt_lib.BEST if (stage.init == "best" and prev_ckpts.steps(ckpt_lib.BEST)) \
        else ckpt_lib.LATEST
    prev_stage = self.config.stages[prev_result.name]
    restored, meta = prev_ckpts.restore(self._abstract_state(prev_stage, prev_tx), which)
    self.log(f"[{name}] starts from {prev_result.name}'s {which} checkpoint (step {meta['step']}"
             + (f", val dice {meta['best_score']:.4f})" if which == ckpt_lib.BEST else ")"))
    opt_state = fresh.opt_state
    if stage.carry_optimizer:
      opt_state = _reset_schedule_counts(restored.opt_state)
    scores = None
    if "val_dice" in meta and _same_validation(prev_stage, stage):
      scores = {k: meta[k] for k in ("val_dice", "val_dice_mean", "val_loss", "val_slices")
                if k in meta}
    return fresh.replace(params=restored.params, batch_stats=restored.batch_stats,
                         opt_state=opt_state), scores

  def _run_stage(self, index, name, stage, previous, global_offset, sigterm):
    steps = int(stage.steps)
    ckpts = self._stage_checkpoints(name)
    tx, step_fn = self._train_step(name, stage, self._tx(stage))
    last_meta = ckpts.meta()
    if last_meta is not None and last_meta.get("completed"):
      done = int(last_meta["step"])
      if done == steps:
        self.log(f"[{name}] already complete ({done} steps, best val dice "
                 f"{_fmt(last_meta.get('best_score'))})")
        self._clock.restart(last_meta.get("elapsed_s"))
        return self._result(name, stage, last_meta), ckpts, tx
      check_run_lengths(self.config, self.workdir)
      self.log(f"[{name}] extending the finished stage from {done} to {steps} steps (its "
               "schedule is now that of the longer stage)")

    from_checkpoint = False
    if last_meta is not None:  # resume mid-stage
      state, meta = ckpts.restore(self._abstract_state(stage, tx), ckpt_lib.LATEST)
      step, position = int(meta["step"]), meta["position"]
      best_score, best_step = meta.get("best_score"), meta.get("best_step")
      self._clock.restart(meta.get("elapsed_s"))
      self.log(f"[{name}] resuming at step {step}/{steps}")
    else:
      state, start_scores = self._initial_state(index, name, stage, tx, previous)
      step, position, best_score, best_step = 0, 0, None, None
      from_checkpoint = index > 0 and stage.init != "scratch"
      warmup = int(stage.schedule.get("warmup_steps", 0))
      if optim.effective_warmup(stage.schedule, steps) < warmup:
        self.log(f"[{name}] warm-up of {warmup} steps clamped to {steps - 1} (the stage has "
                 f"{steps} steps)")
    if jax.process_index() == 0:
      self.metrics_log.truncate_to(name, step, global_offset + step,
                                   resumed=last_meta is not None)

    host = pipelines.make_train_pipeline(
        self.builder, self.config.data, self.config.augment, stage, int(self.config.seed) + index,
        jax.process_index(), jax.process_count(), start=position)
    feed = device_feed.DeviceFeed(host, self.mesh)
    rng = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), index)
    skipped_before = int(jax.device_get(state.skipped))
    t_last, step_last = time.perf_counter(), step
    t_stage = time.perf_counter()

    def checkpoint(completed=False, best=False, scores=None):
      meta = dict(stage=name, stage_index=index, step=step, global_step=global_offset + step,
                  position=feed.position, best_score=best_score, best_step=best_step,
                  completed=completed, elapsed_s=self._clock.seconds(),
                  normaliser=self.normaliser.to_dict(), **(scores or {}))
      ckpts.save(step, state, meta, best=best)

    try:
      if from_checkpoint:
        # The starting point is a candidate: a stage that only gets worse hands on (and a run
        # hands out) the weights it started from, not its best bad checkpoint. Its scores are
        # those the previous stage recorded for these weights where it validated alike.
        scores = start_scores if start_scores is not None else self.evaluate(state, stage)
        best_score, best_step = scores["val_dice"], 0
        self._log_row(dict(stage=name, step=0, global_step=global_offset, **scores,
                           best_val_dice=best_score, elapsed_s=self._clock.seconds()), steps)
        checkpoint(best=True, scores=scores)
      while step < steps:
        batch = next(feed)
        state, metrics = step_fn(state, batch, rng)
        step += 1
        row = None
        if _every(step, int(stage.log_every), steps):
          metrics = jax.device_get(metrics)
          skipped = int(jax.device_get(state.skipped))
          if skipped > skipped_before or not math.isfinite(float(metrics["loss"])):
            raise NonFiniteLossError(
                f"[{name}] non-finite loss or gradient at step {step} (stage {name}); the "
                f"update was not applied and the last good checkpoint is kept. Lower "
                f"config.stages.{name}.optimizer.learning_rate or check the data.")
          now = time.perf_counter()
          rate = (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          row = dict(stage=name, step=step, global_step=global_offset + step,
                     loss=float(metrics["loss"]), dice=float(metrics["dice"]),
                     grad_norm=float(metrics["grad_norm"]), lr=float(metrics.get("lr", np.nan)),
                     steps_per_s=rate, batch_size=int(stage.batch_size),
                     input_size=input_size(self.config, stage))
        best = False
        scores = None
        if _every(step, int(stage.eval_every), steps):
          scores = self.evaluate(state, stage)
          if best_score is None or scores["val_dice"] > best_score:
            best_score, best_step, best = scores["val_dice"], step, True
          row = dict(row or dict(stage=name, step=step, global_step=global_offset + step),
                     **scores, best_val_dice=best_score)
        if row is not None:
          self._log_row(dict(row, elapsed_s=self._clock.seconds()), steps)
        stop = sigterm.stop(step)
        if step == steps:
          checkpoint(completed=True, best=best, scores=scores)
        elif best or _every(step, int(stage.checkpoint_every), steps) or stop:
          checkpoint(best=best, scores=scores)
        if stop and step < steps:
          raise Preempted(f"[{name}] SIGTERM: checkpoint saved at step {step}/{steps}; run the "
                          "same command to resume")
    finally:
      feed.close()
      ckpts.close()
    task = self._model_cfg(stage).task
    self.log(f"[{name}] done: {steps} steps in {time.perf_counter() - t_stage:.1f} s, best val "
             f"{'' if task in TUMOUR_TASKS else task + ' '}dice {_fmt(best_score)} at step "
             f"{best_step}")
    return self._result(name, stage, dict(step=steps, best_score=best_score,
                                          best_step=best_step)), ckpts, tx

  def _result(self, name, stage, meta) -> StageResult:
    next_index = list(self.config.curriculum).index(name) + 1
    if next_index < len(self.config.curriculum):  # what the next stage starts from
      nxt = self.config.stages[self.config.curriculum[next_index]]
      chosen = "best" if nxt.init == "best" and meta.get("best_score") is not None else "last"
    else:  # what evaluate and predict use: the best checkpoint when one was saved
      chosen = "best" if meta.get("best_score") is not None else "last"
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
      label = "val dice" if task in TUMOUR_TASKS else f"val {task} dice"
      parts.append(f"{label} {row['val_dice']:.4f} (best {row['best_val_dice']:.4f})")
    self.log("  ".join(parts))


def _same_validation(a: ml_collections.ConfigDict, b: ml_collections.ConfigDict) -> bool:
  """Whether two stages of one network are validated on the same view of the data (liver-crop
  stages on their crops, every other stage alike)."""
  if "liver_crop" not in (a.pipeline, b.pipeline):
    return True
  return (a.pipeline == b.pipeline and a.get("crop_size") == b.get("crop_size")
          and a.get("crop_margin") == b.get("crop_margin"))


def input_shape(config: ml_collections.ConfigDict,
                stage: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The spatial shape of a stage's inputs: its patch, crop or block shape ((rows, cols), or
  (slices, rows, cols) for 3-D), or the dataset's slice size (whole slices)."""
  if stage.pipeline == "patch":
    return pipelines.patch_shape(stage)
  if stage.pipeline == "liver_crop":
    size = pipelines.crop_settings(stage, config.data.get("image_size", None))[0]
    return (size, size)
  block = pipelines.block_size(stage)
  if block is not None:
    return block
  size = config.data.get("image_size", None)
  if size is None:
    raise StageError("a whole stage needs stage.block_size when data.spacing_mm is set")
  return (int(size), int(size))


def input_size(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict):
  """What the metrics log says of a stage's inputs: the side of its square inputs, or the
  [slices, rows, cols] of 3-D ones."""
  shape = input_shape(config, stage)
  return shape[-1] if len(shape) == 2 else list(shape)


def check_run_lengths(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> None:
  """Refuses steps that a run's finished stages cannot take: fewer than a finished stage
  trained, or more for a finished stage that a later stage already trained from (only the last
  trained stage can be extended). Raises StageError naming the key."""
  root = epath.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return
  names = list(config.curriculum)
  metas = {}
  for name in names:
    ckpts = ckpt_lib.StageCheckpoints(root, name, read_only=True)
    metas[name] = ckpts.meta()
    ckpts.close()
  for index, name in enumerate(names):
    meta, steps = metas[name], int(config.stages[name].steps)
    if meta is None or not meta.get("completed") or int(meta["step"]) == steps:
      continue
    done, key = int(meta["step"]), f"config.stages.{name}.steps"
    if steps < done:
      raise StageError(f"{key}={steps}, but the stage already trained {done} steps in "
                       f"{workdir}; give {key}={done} or more, or use a new --workdir")
    for later in names[index + 1:]:
      if metas[later] is not None:
        raise StageError(f"{key}={steps} extends stage {name} ({done} steps), but stage "
                         f"{later} already trained from it; only the last trained stage can "
                         "be extended: use a new --workdir")


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
