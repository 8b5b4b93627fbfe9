"""Iterating a pipeline: this process's batches from a Grain dataset, from a saved position.

`Stream` wraps a batched `grain.MapDataset` whose element k is this process's rows of global
batch k. Iteration starts at `start` by slicing that dataset (stateless resume: the position is
a number saved with each checkpoint, not Grain's per-worker iterator state), makes batches in
`read_threads` threads per process (grain.ReadOptions) and, with `worker_count` > 0, in that
many worker processes (`mp_prefetch`: worker w makes batches w, w + W, ...; Grain interleaves
them back in order), so the batches are the same for any number of threads or workers. Worker
processes start by spawn and receive the dataset by cloudpickle, so everything in it pickles
and nothing in it needs JAX; `host_transforms` (JAX on the host CPU) run in this process after
the workers. Batches from workers arrive in shared memory (Grain's SharedMemoryArray, no copy),
freed when the last reference to them goes.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Callable, Optional, Sequence

import grain


def _allow_grain_flags() -> None:
  """Grain reads its absl flags when it starts worker processes; outside absl.app.run nothing
  parsed them (the CLI uses argparse), so that raises UnparsedFlagAccessError: mark them parsed
  (keeping their defaults) when no one has."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
  """Runs in each worker process: leave when the training process is gone. Grain's workers
  are daemons, so a normal exit stops them, but a killed trainer (kill -9) would leave them
  blocked on a full queue forever; their exit also lets multiprocessing's resource tracker
  remove the shared memory they held."""
  del worker_index, worker_count
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _close(holder: list) -> None:
  """Closes the iterator in `holder` and lets it go, so that its threads, processes and shared
  memory are released now (also at interpreter exit, while the modules they need still exist)."""
  while holder:
    holder.pop().close()


class Stream:
  """An iterator of per-process numpy batches; batch k is element k of `batches`.

  `position` is the number of the next global batch this iterator returns (the number consumed
  so far when started at 0): store it and pass it back as `start` to resume exactly. `finish`
  is None when batches are final, else the JAX function that finishes them on the device (see
  augment.make_finish). `plan(b)` (training streams) gives this process's rows of global batch
  b as the sampler drew them. Iterate from one thread; close it (or use it as a context
  manager) to stop its threads and worker processes.
  """

  def __init__(self, batches: grain.MapDataset, start: int, stop: Optional[int], *,
               read_threads: int, prefetch: int, worker_count: int = 0,
               host_transforms: Sequence[grain.transforms.Map] = (),
               finish: Optional[Callable] = None, info: Optional[dict] = None,
               plan: Optional[Callable[[int], dict]] = None):
    if start < 0:
      raise ValueError(f"start position must be >= 0, got {start}")
    if stop is not None and stop > len(batches):
      raise ValueError(f"stop ({stop}) is past the dataset's {len(batches)} batches")
    self._batches = batches
    self._next = int(start)
    self._stop = stop
    self._read = grain.ReadOptions(num_threads=max(0, int(read_threads)),
                                   prefetch_buffer_size=max(0, int(prefetch)))
    self._workers = int(worker_count)
    self._host_transforms = tuple(host_transforms)
    self._holder: list = []  # the Grain iterator, once iteration starts
    self._finalizer: Optional[weakref.finalize] = None
    self.finish = finish
    self.info = dict(info or {})
    self.plan = plan

  @property
  def position(self) -> int:
    return self._next

  def __len__(self) -> int:
    if self._stop is None:
      raise TypeError("an endless training stream has no length")
    return self._stop

  def __iter__(self) -> "Stream":
    return self

  def dataset(self) -> grain.IterDataset:
    """The Grain pipeline from the current position: slice, read threads, worker processes,
    host transforms."""
    ds = self._batches[self._next:self._stop].to_iter_dataset(self._read)
    if self._workers > 0:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers,
                                                       per_worker_buffer_size=1),
                          worker_init_fn=_exit_with_parent)
    for transform in self._host_transforms:
      ds = ds.map(transform)
    return ds

  def _open(self) -> None:
    if self._workers > 0:
      _allow_grain_flags()
    self._holder = [iter(self.dataset())]
    self._finalizer = weakref.finalize(self, _close, self._holder)

  def __next__(self) -> dict:
    if self._stop is not None and self._next >= self._stop:
      raise StopIteration
    if not self._holder:
      self._open()
    batch = next(self._holder[0])
    self._next += 1
    return batch

  def close(self) -> None:
    """Stops the threads and worker processes; batches made ahead are dropped (the position is
    unchanged, and iterating again restarts there)."""
    if self._finalizer is not None:
      self._finalizer()  # closes the iterator once, now or never again
      self._finalizer = None

  def __enter__(self) -> "Stream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
