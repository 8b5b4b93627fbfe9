"""What a network segments (`config.model.task`) and how its output classes map to LiTS labels.

  tumour       2 classes: background (liver included), tumour
  liver        2 classes: background, liver (tumour included)
  three_class  3 classes: background, liver, tumour

A network's Dice (loss, validation, the best checkpoint) is that of its foreground class: tumour
where the task has one, else liver.
"""

from __future__ import annotations

import numpy as np

from data_pipelines.labels import BACKGROUND, LIVER, TUMOUR

# The LiTS label of each output class, per task.
TASK_LABELS = {"tumour": (BACKGROUND, TUMOUR), "liver": (BACKGROUND, LIVER),
               "three_class": (BACKGROUND, LIVER, TUMOUR)}
TASKS = tuple(TASK_LABELS)
TUMOUR_TASKS = tuple(t for t in TASKS if TUMOUR in TASK_LABELS[t])  # Dice: tumour Dice
LIVER_TASKS = tuple(t for t in TASKS if LIVER in TASK_LABELS[t])  # they predict the liver


def check_task(task: str) -> str:
  """`task`, or a ValueError naming `model.task`."""
  if task not in TASK_LABELS:
    raise ValueError(f"model.task={task!r} is not one of {sorted(TASK_LABELS)}")
  return task


def num_classes(task: str) -> int:
  """Output channels of a task's network: tumour 2, liver 2, three_class 3."""
  return len(TASK_LABELS[check_task(task)])


def lits_labels(task: str) -> np.ndarray:
  """The LiTS label of each output class (uint8), to turn an argmax into a label map."""
  return np.array(TASK_LABELS[check_task(task)], np.uint8)


def foreground_class(task: str) -> int:
  """Index of the class whose Dice the loss and validation use: tumour, else liver."""
  labels = TASK_LABELS[check_task(task)]
  return labels.index(TUMOUR if TUMOUR in labels else LIVER)


def tumour_class(task: str) -> int:
  """Index of the tumour class of a tumour task's output."""
  if task not in TUMOUR_TASKS:
    raise ValueError(f"model.task={task!r} has no tumour class (tasks: {list(TUMOUR_TASKS)})")
  return TASK_LABELS[task].index(TUMOUR)


def class_targets(labels, task: str):
  """int32 class indices of a LiTS label map for `task` (numpy or jax arrays alike)."""
  check_task(task)
  if task == "tumour":
    return (labels == TUMOUR).astype(np.int32)
  if task == "liver":
    return (labels >= LIVER).astype(np.int32)
  return labels.astype(np.int32)
