"""Orbax checkpoints of a curriculum's stages: the latest (for resume) and the best (to hand on).

`checkpoints/<stage>/latest/<step>/` and `checkpoints/<stage>/best/<step>/` each hold the train
state (`state`, Orbax StandardSave: sharded arrays, restorable onto any mesh) and JSON metadata
(`meta`: stage, step, global step, data position, scores). Orbax writes each checkpoint into a
temporary folder and renames it when complete, so a save killed half-way leaves nothing that
looks like a checkpoint; `cleanup_tmp_directories` removes such leftovers at the next start.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

LATEST, BEST = "latest", "best"


def _manager(directory: epath.Path, keep: int, read_only: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
      enable_async_checkpointing=False, read_only=read_only)
  return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class StageCheckpoints:
  """The checkpoints of one stage: `latest` keeps the last `keep_latest`, `best` keeps one."""

  def __init__(self, root: epath.PathLike, stage: str, keep_latest: int = 2,
               read_only: bool = False):
    self.stage = stage
    root = epath.Path(root)
    if "://" not in os.fspath(root):
      root = epath.Path(os.path.abspath(root))  # Orbax needs absolute paths
    self.directory = root / stage
    if read_only and not self.directory.exists():
      self._managers = {}
      return
    self._managers = {LATEST: _manager(self.directory / LATEST, keep_latest, read_only),
                      BEST: _manager(self.directory / BEST, 1, read_only)}

  def steps(self, which: str = LATEST) -> list[int]:
    manager = self._managers.get(which)
    return sorted(manager.all_steps()) if manager is not None else []

  def last_step(self, which: str = LATEST) -> Optional[int]:
    steps = self.steps(which)
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, meta: dict, best: bool = False) -> None:
    """Saves to `latest` (and to `best` when `best`), replacing a checkpoint of the same step."""
    targets = [LATEST] + ([BEST] if best else [])
    for which in targets:
      manager = self._managers[which]
      if step in manager.all_steps():
        manager.delete(step)
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(dict(meta, kind=which))))
      manager.wait_until_finished()

  def meta(self, which: str = LATEST, step: Optional[int] = None) -> Optional[dict]:
    """The JSON metadata of a checkpoint (the last one when `step` is None), or None."""
    manager = self._managers.get(which)
    step = self.last_step(which) if step is None else step
    if manager is None or step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, abstract_state: Any, which: str = LATEST,
              step: Optional[int] = None) -> tuple[Any, dict]:
    """Restores (state, meta) onto the shardings of `abstract_state` (ShapeDtypeStructs)."""
    manager = self._managers.get(which)
    step = self.last_step(which) if step is None else step
    if manager is None or step is None:
      raise FileNotFoundError(f"{self.directory / which}: no checkpoint to restore")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_variables(self, abstract_variables: dict, which: str = LATEST,
                        step: Optional[int] = None) -> tuple[dict, dict]:
    """Restores only the model variables ({'params', 'batch_stats'}) of a saved train state.

    For inference and notebooks: the optimiser state is never read, and the arrays land on the
    shardings of `abstract_variables` whatever mesh wrote them (8 devices written, 1 read).
    """
    manager = self._managers.get(which)
    step = self.last_step(which) if step is None else step
    if manager is None or step is None:
      raise FileNotFoundError(f"{self.directory / which}: no checkpoint to restore")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"{self.directory / which}: no checkpoint at step {step} (steps: "
                              f"{self.steps(which)})")
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
