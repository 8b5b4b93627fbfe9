"""Orbax checkpoints of a curriculum's stages: the latest (for resume) and the best (to hand on).

`checkpoints/<stage>/latest/<step>/` and `checkpoints/<stage>/best/<step>/` each hold the train
state (`state`, Orbax StandardSave: sharded arrays, restorable onto any mesh) and JSON metadata
(`meta`: stage, step, global step, data position, scores, and `best_step`).

The commit protocol makes the pair atomic as a whole. The newest `latest` checkpoint is the
commit record: its `best_step` names the stage's best checkpoint, and nothing else counts.
A save writes, in this order,
  1. the new best (when this step is a new best) into `best/<step>`,
  2. the latest, whose metadata records `best_step`, into `latest/<step>`,
  3. then drops the best checkpoints that the newest latest no longer names.
Each write is an Orbax save into a temporary folder renamed into place when complete, and each
deletion is a rename into `.trash/` (then removed), so a kill at any instant leaves whole
checkpoints only, and at most one uncommitted best (a kill between 1 and 2: a best from the
future, which the resumed run recomputes) or one superseded best (between 2 and 3). Opening
the checkpoints for writing (`StageCheckpoints(...)`) reconciles them with the commit record:
it removes uncommitted and superseded bests and any leftovers in `.trash/`, so resume always
continues from a latest checkpoint and a best that agree. Readers (`read_only=True`) change
nothing and see only the committed best.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import multihost

LATEST, BEST = "latest", "best"
TRASH = ".trash"  # deleted steps are renamed here (atomic), then removed


class CheckpointError(RuntimeError):
  """Checkpoints on disk that disagree in a way resume cannot repair (names the folder)."""


def _manager(directory: epath.Path, keep: Optional[int], read_only: bool
             ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=False, read_only=read_only,
      todelete_subdir=None if read_only else TRASH)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _barrier(name: str) -> None:
  """Waits for every process (names must match across hosts: no paths, which may differ)."""
  if jax.process_count() > 1:
    multihost.sync_global_processes(multihost.unique_barrier_key(f"curriculum_seg:{name}"))


class StageCheckpoints:
  """The checkpoints of one stage: `latest` keeps the last `keep_latest`, `best` the committed
  best (see the module docstring for the commit protocol)."""

  def __init__(self, root: epath.PathLike, stage: str, keep_latest: int = 2,
               read_only: bool = False):
    self.stage = stage
    self.read_only = read_only
    root = epath.Path(root)
    if "://" not in os.fspath(root):
      root = epath.Path(os.path.abspath(root))  # Orbax needs absolute paths
    self.directory = root / stage
    if read_only and not self.directory.exists():
      self._managers = {}
      return
    self._managers = {LATEST: _manager(self.directory / LATEST, keep_latest, read_only),
                      BEST: _manager(self.directory / BEST, None, read_only)}
    if not read_only:
      self.reconcile()

  # --- what is on disk ---------------------------------------------------------------------

  def _raw_steps(self, which: str) -> list[int]:
    manager = self._managers.get(which)
    return sorted(manager.all_steps()) if manager is not None else []

  def committed_best_step(self) -> Optional[int]:
    """The best step the newest latest checkpoint records (None: no latest, or no best yet)."""
    meta = self.meta(LATEST)
    return None if meta is None or meta.get("best_step") is None else int(meta["best_step"])

  def steps(self, which: str = LATEST) -> list[int]:
    """The steps of `which`; for BEST only the committed best (a list of at most one)."""
    raw = self._raw_steps(which)
    if which != BEST:
      return raw
    best = self.committed_best_step()
    return [best] if best in raw else []

  def last_step(self, which: str = LATEST) -> Optional[int]:
    steps = self.steps(which)
    return steps[-1] if steps else None

  # --- writing -----------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    """Saves `state` at `step` to `latest` (and first to `best` when `best`).

    `meta['best_step']` is the step of the stage's best checkpoint: set to `step` when `best`,
    carried over from the previous commit when absent; it must name a best checkpoint on disk.
    """
    meta = dict(meta)
    if best:
      meta["best_step"] = step
    elif meta.get("best_step") is None:
      meta["best_step"] = self.committed_best_step()
    recorded = meta["best_step"]
    if not best and recorded is not None and recorded not in self._raw_steps(BEST):
      raise CheckpointError(f"{self.directory}: metadata names best step {recorded}, but "
                            f"{self.directory / BEST} holds steps {self._raw_steps(BEST)}")
    if best:
      self._write(BEST, step, state, meta)
    self._write(LATEST, step, state, meta)  # the commit
    self._drop_bests_except(recorded)
    self._empty_trash()

  def _write(self, which: str, step: int, state: Any, meta: dict) -> None:
    manager = self._managers[which]
    if step in manager.all_steps():  # only a step the commit record does not reach
      manager.delete(step)
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(dict(meta, kind=which))))
    manager.wait_until_finished()

  def _drop_bests_except(self, keep: Optional[int]) -> None:
    manager = self._managers[BEST]
    for step in list(manager.all_steps()):
      if step != keep:
        manager.delete(step)

  def _empty_trash(self) -> None:
    if jax.process_index() == 0:
      for which in (LATEST, BEST):
        trash = self.directory / which / TRASH
        if trash.exists():
          trash.rmtree()
    _barrier(f"{self.stage}:empty_trash")

  def reconcile(self) -> None:
    """Brings the best checkpoints in line with the commit record after a crash.

    Removes bests the newest latest does not name (written by a save that was killed before
    its commit, or superseded by one killed before it pruned) and leftovers in `.trash/`.
    A committed best that is missing (a run written before this protocol, killed between its
    latest and best saves) is restored from the identical latest checkpoint of that step when
    one exists; otherwise it is a CheckpointError.
    """
    for manager in self._managers.values():
      # Orbax removes unfinished temporary folders in the background; finish that first, so
      # a reconciled stage holds whole checkpoints only (orbax 0.12 has no public wait for it).
      wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
      if wait is not None:
        wait()
    self._empty_trash()  # a kill between a drop and its removal
    recorded = self.committed_best_step()
    if recorded is not None and recorded not in self._raw_steps(BEST):
      self._repair_best(recorded)
    self._drop_bests_except(recorded)
    self._empty_trash()

  def _repair_best(self, step: int) -> None:
    source = self.directory / LATEST / str(step)
    if step not in self._raw_steps(LATEST) or "://" in os.fspath(source):
      raise CheckpointError(
          f"{self.directory}: the latest checkpoint records best step {step}, but "
          f"{self.directory / BEST} has no such step and it cannot be rebuilt from "
          f"{self.directory / LATEST} (steps {self._raw_steps(LATEST)}); restart this stage "
          f"by removing {self.directory}")
    if jax.process_index() == 0:
      target = self.directory / BEST / str(step)
      partial = self.directory / BEST / f".repair-{step}"
      if partial.exists():
        shutil.rmtree(os.fspath(partial))
      shutil.copytree(os.fspath(source), os.fspath(partial))
      os.replace(os.fspath(partial), os.fspath(target))
    _barrier(f"{self.stage}:repair_best")
    self._managers[BEST].reload()

  # --- reading -----------------------------------------------------------------------------

  def meta(self, which: str = LATEST, step: Optional[int] = None) -> Optional[dict]:
    """The JSON metadata of a checkpoint (the last one when `step` is None), or None."""
    manager = self._managers.get(which)
    if manager is None:
      return None
    if step is None:
      steps = self._raw_steps(which) if which == LATEST else self.steps(which)
      step = steps[-1] if steps else None
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def _step_of(self, which: str, step: Optional[int]) -> tuple[ocp.CheckpointManager, int]:
    manager = self._managers.get(which)
    step = self.last_step(which) if step is None and manager is not None else step
    if manager is None or step is None:
      raise FileNotFoundError(f"{self.directory / which}: no checkpoint to restore")
    if step not in self.steps(which):
      raise FileNotFoundError(f"{self.directory / which}: no checkpoint at step {step} (steps: "
                              f"{self.steps(which)})")
    return manager, step

  def restore(self, abstract_state: Any, which: str = LATEST,
              step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, meta) onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
    manager, step = self._step_of(which, step)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_variables(self, abstract_variables: dict, which: str = LATEST,
                        step: Optional[int] = None) -> tuple[dict, dict]:
    """Restores only the model variables ({'params', 'batch_stats'}) of a saved train state.

    For inference and notebooks: the optimiser state is never read, and the arrays land on the
    shardings of `abstract_variables` whatever mesh wrote them (8 devices written, 1 read).
    """
    manager, step = self._step_of(which, step)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_variables)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_variables, restore_args=restore_args,
                                     partial_restore=True),
        meta=ocp.args.JsonRestore()))
    return dict(restored["state"]), restored["meta"]

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()


def abstract_like(tree: Any, sharding: Optional[jax.sharding.Sharding] = None) -> Any:
  """ShapeDtypeStructs of a pytree, placed on `sharding` (default: each leaf's own)."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding if sharding is not None else x.sharding)
  return jax.tree.map(leaf, tree)


def stage_names_on_disk(root: epath.PathLike) -> list[str]:
  root = epath.Path(root)
  if not root.exists():
    return []
  return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def checkpoint_bytes(directory: epath.PathLike) -> int:
  """Total size of a checkpoint folder (for logs and benchmarks)."""
  total = 0
  for dirpath, _, files in os.walk(os.fspath(directory)):
    total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
  return total
