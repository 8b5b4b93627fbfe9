"""Host batches -> global jax.Arrays on the mesh, kept ahead of the training loop.

`DeviceFeed` wraps a host stream (data_pipelines.stream.Stream, from data_pipelines.pipelines):
a background thread turns each per-process batch into global arrays sharded on the mesh's
'data' axis (`sharding.host_to_global`), applies the stream's `finish` (the augmentation warp,
windowing and jitter, jitted with the batch sharding so every device works on its own rows),
and keeps up to `buffer_size` batches ready. `position` is the position of the next batch the
consumer will get, not of what is buffered, so a checkpoint that stores it resumes exactly.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

import jax
from jax.sharding import Mesh

from curriculum_seg import sharding

_END = object()


class DeviceFeed:
  """An iterator of global batches (dicts of jax.Array) over `mesh`, prepared in a thread."""

  def __init__(self, host_stream, mesh: Mesh, buffer_size: int = 2,
               finish: Optional[Callable[[dict], dict]] = None):
    """`finish` defaults to `host_stream.finish` (None: batches are used as they come)."""
    if buffer_size < 1:
      raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    self._host = host_stream
    self._mesh = mesh
    self._position = int(host_stream.position)
    finish = finish if finish is not None else getattr(host_stream, "finish", None)
    if finish is not None:
      batch_sharding = sharding.batch_sharding(mesh)
      finish = jax.jit(finish, in_shardings=batch_sharding, out_shardings=batch_sharding)
    self._finish = finish
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=self._produce, name="device_feed", daemon=True)
    self._thread.start()

  @property
  def position(self) -> int:
    """Position of the next batch `next()` returns: store it in checkpoints."""
    return self._position

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      while not self._stop.is_set():
        try:
          batch = next(self._host)
        except StopIteration:
          break
        position = self._host.position
        arrays = sharding.host_to_global(batch, self._mesh)
        if self._finish is not None:
          arrays = self._finish(arrays)
        if not self._put((position, arrays)):
          return
      self._put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
      self._put(e)

  def __iter__(self) -> "DeviceFeed":
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._done:
      raise StopIteration
    while True:
      try:
        item = self._queue.get(timeout=0.1)
        break
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          self._done = True
          raise StopIteration from None
    if item is _END:
      self._done = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._done = True
      raise item
    self._position, arrays = item
    return arrays

  def close(self) -> None:
    """Stops the thread and the host stream; buffered batches are dropped."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=10)
    close = getattr(self._host, "close", None)
    if close is not None:
      close()
    self._done = True

  def __enter__(self) -> "DeviceFeed":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
