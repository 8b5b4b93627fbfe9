"""Running a function over LiTS cases in worker processes on one host: one case per task.

`map_cases` hands each task to a pool of `workers` processes (spawned)
and yields (task, result) as tasks finish; with one worker it runs them here, in order. Largest
cases start first, so the last task to finish is a small one. Memory stays near one case per
worker: tasks and results are small (a worker writes what it makes itself). Workers run
TensorFlow on one thread (a process per core already uses every core; idle TensorFlow threads
only spin) and leave within a second when the process that started them is gone, also after a
kill -9. An error in a task stops the pool and is raised here as it was raised there; a worker
that dies (killed, out of memory) raises `WorkerDiedError` naming the case it held.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import process as futures_process
from typing import Callable, Iterator, Optional, Sequence, TypeVar

from data_pipelines import lits

Task = TypeVar("Task")
Result = TypeVar("Result")
_PARENT_POLL_S = 0.5


class WorkerDiedError(lits.CaseError):
  """A worker process ended without an answer while it held this case."""


def available_cores() -> int:
  """The cores this process may run on."""
  return len(os.sched_getaffinity(0))


def pool_context():
  """spawn: workers start clean and are children of this process, so they can see it go. Not
  fork (a forked TensorFlow or thread pool can deadlock), not forkserver (its workers hold the
  fork server alive and are its children, so neither notices a killed parent)."""
  return multiprocessing.get_context("spawn")


def single_threaded_tensorflow() -> None:
  """Runs TensorFlow's ops on the calling thread's process with one thread each way, if its
  runtime has not started yet (it cannot be changed afterwards)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  except RuntimeError:  # already initialised in this process: keep its threads
    pass


def exit_with_parent(parent: Optional[int] = None) -> None:
  """Ends this process within half a second of its parent's end (a watcher thread): a worker
  whose parent was killed would otherwise wait on its task queue forever."""
  parent = os.getppid() if parent is None else parent

  def watch():
    while os.getppid() == parent:
      time.sleep(_PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _init_worker() -> None:
  exit_with_parent()
  single_threaded_tensorflow()


def map_cases(fn: Callable[[Task], Result], tasks: Sequence[Task], workers: int, *,
              weight: Callable[[Task], float] = lambda t: 0.0,
              name: Callable[[Task], str] = str,
              executor: Optional[concurrent.futures.Executor] = None
              ) -> Iterator[tuple[Task, Result]]:
  """Yields (task, fn(task)) for every task: in task order with one worker, as they finish
  with more (heaviest `weight` first). `executor`: a pool from `worker_pool` to reuse."""
  if not tasks:
    return
  if executor is None and workers <= 1:
    for task in tasks:
      yield task, fn(task)
    return
  order = sorted(tasks, key=weight, reverse=True)
  owned = worker_pool(workers) if executor is None else contextlib.nullcontext(executor)
  with owned as pool:
    futures = {pool.submit(fn, task): task for task in order}
    try:
      for future in concurrent.futures.as_completed(futures):
        task = futures[future]
        try:
          result = future.result()
        except futures_process.BrokenProcessPool as e:
          raise WorkerDiedError(
              f"{name(task)}: a worker process died while preparing this case (killed, or "
              f"out of memory: try fewer workers)") from e
        yield task, result
    finally:
      for future in futures:
        future.cancel()


def worker_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
  """A pool of `workers` processes set up for case tasks (see the module docstring); leaving
  its `with` block cancels the tasks not started and waits for the running ones."""
  return _Pool(workers, mp_context=pool_context(), initializer=_init_worker)


class _Pool(concurrent.futures.ProcessPoolExecutor):
  """Leaving after an error (or an abandoned iteration) ends the running tasks at once."""

  def __exit__(self, exc_type, exc_val, exc_tb):
    if exc_type is not None:
      for process in list((getattr(self, "_processes", None) or {}).values()):
        process.terminate()
    self.shutdown(wait=True, cancel_futures=True)
    return False
