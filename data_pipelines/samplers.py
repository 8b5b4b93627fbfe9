"""Samplers: a global position -> which slice (or tumour part) its batch row reads, and where.

Global batch b holds global positions b*B .. b*B+B-1. A sampler's `global_batch(b)` is the
plan of those B rows, drawn from a counter-based hash of (seed, position) (augment.
counter_uniform), so it is a pure function of (seed, b) whatever the number of processes,
workers, threads or devices, and a resumed run draws the plan it would have drawn. Some draws
are per batch (which rows of a batch are tumour rows is a ranking of the batch's positions),
so `row(position)` takes its row from the plan of its global batch (cached per process).

The plans are those of the pipelines before Grain, bit for bit (tests/test_samplers.py compares
them with plans recorded from that code by tests/data/make_sampler_plans.py).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Optional

import numpy as np

from data_pipelines import augment
from data_pipelines.index import SplitIndex
from data_pipelines.labels import LIVER, TUMOUR

COMPONENT_SAMPLING = ("component", "voxel")
BLOCK_SAMPLING = ("slice", "component")

# Hash streams of the samplers (augment.py owns 1..9).
STREAM_PERMUTATION = 20
STREAM_ROW_ORDER = 21
STREAM_PICK_COMPONENT = 22
STREAM_PICK_PART = 23
STREAM_JITTER_ROW = 24
STREAM_JITTER_COL = 25
STREAM_NEGATIVE_SLICE = 26
STREAM_NEGATIVE_PIXEL = 27
STREAM_TUMOUR_ROWS = 28
STREAM_TUMOUR_PERMUTATION = 29
STREAM_BLOCK_PIXEL = 30
STREAM_BLOCK_ROW = 31
STREAM_BLOCK_COL = 32
STREAM_BLOCK_COMPONENT = 33
STREAM_BLOCK_PART = 34
STREAM_BLOCK_DEPTH = 35
STREAM_PATCH_DEPTH_JITTER = 36


class _Unlocked:
  """Pickles without its lock and caches (Grain sends pipelines to worker processes)."""

  _transient: tuple[str, ...] = ()

  def __getstate__(self):
    state = self.__dict__.copy()
    for key in self._transient:
      state.pop(key, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_transient()

  def _init_transient(self) -> None:
    raise NotImplementedError


class _RowsOfGlobalBatches(_Unlocked):
  """`row(position)`: one row of `global_batch(position // batch_size)`, with the last few
  global batches' plans cached (thread-safe)."""

  _transient = ("_rows_lock", "_rows_cache")
  _CACHED_BATCHES = 64

  def _init_transient(self) -> None:
    self._rows_lock = threading.Lock()
    self._rows_cache: collections.OrderedDict[int, dict] = collections.OrderedDict()

  def global_batch(self, b: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def row(self, position: int) -> dict[str, np.ndarray]:
    """The plan of global position `position`: each field of its row, as 0-d or 1-d arrays."""
    b, k = divmod(int(position), self.batch_size)
    with self._rows_lock:
      plan = self._rows_cache.get(b)
      if plan is not None:
        self._rows_cache.move_to_end(b)
    if plan is None:
      plan = self.global_batch(b)
      with self._rows_lock:
        self._rows_cache[b] = plan
        while len(self._rows_cache) > self._CACHED_BATCHES:
          self._rows_cache.popitem(last=False)
    return {key: value[k] for key, value in plan.items()}


class _EpochShuffle(_Unlocked):
  """An endless stream over `items`: epoch-wise permutations (from the counter hash of
  `(seed, epoch * n + i)` on `stream`) concatenated; `at(positions)` is a pure function."""

  _transient = ("_orders", "_lock")

  def __init__(self, items: np.ndarray, seed: int, stream: int):
    self.items = np.asarray(items, dtype=np.int64)
    self.seed, self.stream = int(seed), int(stream)
    self._init_transient()

  def _init_transient(self) -> None:
    self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._orders:
        n = len(self.items)
        keys = augment.counter_uniform(self.seed, epoch * n + np.arange(n), self.stream)
        self._orders[epoch] = np.argsort(keys, kind="stable")
        while len(self._orders) > 3:
          self._orders.popitem(last=False)
      return self._orders[epoch]

  def at(self, positions: np.ndarray) -> np.ndarray:
    n = len(self.items)
    out = np.empty(len(positions), np.int64)
    for epoch in np.unique(positions // n):
      rows = positions // n == epoch
      out[rows] = self.items[self._order(int(epoch))[positions[rows] % n]]
    return out


class WholeSliceSampler(_RowsOfGlobalBatches):
  """Whole slices: epoch-wise shuffles of the selected slices, with a share of tumour slices.

  `tumour_fraction` f puts exactly round(f*B) tumour-bearing slices (`tumour_examples`: the
  selected slices with a visible tumour part) in every global batch, at rows that a hash of
  the row's position shuffles (so process shares get their part of them); they come from
  epoch-wise shuffles of the tumour slices, so every tumour slice is seen once per tumour
  epoch, whatever the size of its tumour part. Slices rather than components: a whole-slice
  row is a slice, so the slice is the unit that the batch should cover evenly, and an epoch
  covers every tumour slice without the repeats and gaps of independent draws (per-component
  sampling, the small-lesion emphasis, is the patch stage's job: see PatchSampler). The other
  rows continue the stream over all selected slices, drawn as with f = 0, at a counter that
  advances by B - round(f*B) per batch; f = 0 gives exactly the batches of the sampler before
  oversampling existed.
  """

  def __init__(self, examples: np.ndarray, seed: int, batch_size: int,
               tumour_examples: Optional[np.ndarray] = None, tumour_fraction: float = 0.0):
    self._init_transient()
    self.examples = np.asarray(examples, dtype=np.int64)
    self.seed = int(seed)
    self.batch_size = int(batch_size)
    if not 0.0 <= float(tumour_fraction) <= 1.0:
      raise ValueError(f"stage.tumour_fraction must be in [0, 1], got {tumour_fraction}")
    self.num_tumour = int(round(float(tumour_fraction) * self.batch_size))
    self._all = _EpochShuffle(self.examples, seed, STREAM_PERMUTATION)
    self.tumour_examples = np.zeros(0, np.int64)
    if self.num_tumour:
      tumour = np.intersect1d(np.asarray(tumour_examples if tumour_examples is not None else [],
                                         dtype=np.int64), self.examples)
      if len(tumour) == 0:
        raise ValueError(
            f"stage.tumour_fraction={tumour_fraction}: the selected training slices hold no "
            f"visible tumour, so no batch row can be a tumour slice; set "
            f"stage.tumour_fraction=0 for tumour-free data")
      self.tumour_examples = tumour
      self._tumour = _EpochShuffle(tumour, seed, STREAM_TUMOUR_PERMUTATION)

  def global_batch(self, b: int) -> dict[str, np.ndarray]:
    """`example`, `position` and `tumour_row` (rows forced to a tumour slice) of batch b."""
    B, t = self.batch_size, self.num_tumour
    positions = b * B + np.arange(B, dtype=np.int64)
    if not t:
      return dict(example=self._all.at(positions), position=positions,
                  tumour_row=np.zeros(B, bool))
    rank = np.argsort(np.argsort(
        augment.counter_uniform(self.seed, positions, STREAM_TUMOUR_ROWS), kind="stable"))
    tumour_row = rank < t
    examples = np.empty(B, np.int64)
    examples[tumour_row] = self._tumour.at(b * t + np.arange(t, dtype=np.int64))
    examples[~tumour_row] = self._all.at(b * (B - t) + np.arange(B - t, dtype=np.int64))
    return dict(example=examples, position=positions, tumour_row=tumour_row)


class _ComponentPicker:
  """Tumour parts (rows of a split's index) drawn per position: with 'component' sampling
  every 3-D component is equally likely, then one of its slices; with 'voxel' sampling parts
  are weighted by their area. `streams` are the hash streams of the two draws."""

  def __init__(self, index: SplitIndex, seed: int, sampling: str, streams: tuple[int, int]):
    self.parts, self.seed, self.sampling, self.streams = index.tumours, int(seed), sampling, streams
    parts = self.parts
    case_rows = index.case_rows(parts[:, 0].astype(np.int64))
    keys = case_rows * 1_000_000 + parts[:, 1].astype(np.int64)
    _, inverse = np.unique(keys, return_inverse=True)
    self.component_parts = np.argsort(inverse, kind="stable")  # part rows grouped by component
    self.counts = np.bincount(inverse)
    self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
    weights = np.maximum(parts[:, 5], 0.0)
    self.area_cdf = np.cumsum(weights) / max(weights.sum(), 1e-12)

  def pick(self, positions: np.ndarray) -> np.ndarray:
    u1 = augment.counter_uniform(self.seed, positions, self.streams[0])
    if self.sampling == "voxel":
      return np.minimum(np.searchsorted(self.area_cdf, u1, side="right"), len(self.parts) - 1)
    u2 = augment.counter_uniform(self.seed, positions, self.streams[1])
    comp = np.minimum((u1 * len(self.counts)).astype(np.int64), len(self.counts) - 1)
    within = np.minimum((u2 * self.counts[comp]).astype(np.int64), self.counts[comp] - 1)
    return self.component_parts[self.starts[comp] + within]


def block_offsets(extent, block, anchor, u) -> np.ndarray:
  """Per axis, the first index of a block of `block` pixels in a slice of `extent` pixels.

  Where the slice is at least as large as the block, the offset is drawn (by `u` in [0, 1))
  uniformly among those that keep the `anchor` pixel inside the block and the block inside the
  slice; where it is smaller, the slice sits centred in the block (air around it). Works for any
  number of axes (2-D blocks now, 3-D blocks alike).
  """
  extent, block, anchor = (np.asarray(v, np.int64) for v in (extent, block, anchor))
  lo = np.clip(anchor - block + 1, 0, np.maximum(extent - block, 0))
  hi = np.clip(anchor, 0, np.maximum(extent - block, 0))
  drawn = lo + np.minimum((np.asarray(u) * (hi - lo + 1)).astype(np.int64), hi - lo)
  return np.where(extent >= block, drawn, -((block - extent) // 2))


class BlockSampler(_RowsOfGlobalBatches):
  """Whole-stage blocks: fixed-size windows of the selected slices, on liver and, in
  round(f*B) rows of every global batch, on tumour.

  Slices come as whole slices do (`WholeSliceSampler`: epoch-wise shuffles, tumour rows at
  hashed rows), except that with `sampling='component'` a tumour row picks a 3-D tumour
  component first (each equally likely, so small lesions as often as large ones) and then one
  of its slices. Where the block sits is chosen once the label is read (`place`): an anchor
  pixel (a tumour pixel of the planned part or, for 'slice' sampling, of the slice, in tumour
  rows; a liver pixel in the others; any pixel of a slice without liver) and `block_offsets`
  around it, every draw from the row's position.
  """

  def __init__(self, index: SplitIndex, examples: np.ndarray, seed: int, batch_size: int,
               block: tuple[int, ...], tumour_fraction: float = 0.0, sampling: str = "slice"):
    self._init_transient()
    if sampling not in BLOCK_SAMPLING:
      raise ValueError(f"stage.block_sampling must be one of {BLOCK_SAMPLING}, got {sampling!r}")
    self.seed, self.batch_size = int(seed), int(batch_size)
    self.block, self.sampling, self.parts = tuple(int(b) for b in block), sampling, index.tumours
    self.cases = index.cases  # a 3-D block's depth is placed within its case's slices
    self.slices = WholeSliceSampler(examples, seed, batch_size, index.tumour_slices(),
                                    tumour_fraction)
    self.num_tumour = self.slices.num_tumour
    self.tumour_examples = self.slices.tumour_examples
    self._picker = None
    if self.num_tumour and sampling == "component":
      selected = np.isin(self.parts[:, 0].astype(np.int64), self.slices.examples)
      self.parts = self.parts[selected]
      self._picker = _ComponentPicker(dataclasses.replace(index, tumours=self.parts), seed,
                                      "component", (STREAM_BLOCK_COMPONENT, STREAM_BLOCK_PART))

  @property
  def num_components(self) -> int:
    return len(self._picker.counts) if self._picker is not None else 0

  def global_batch(self, b: int) -> dict[str, np.ndarray]:
    """`example`, `position`, `tumour_row`, `part` (index row of a component-sampled tumour
    row, else -1) and the uniforms `pixel_u`, `offset_u` [B, 2] ([B, 3], depth first, for 3-D
    blocks) that place the block."""
    plan = dict(self.slices.global_batch(b))
    positions = plan["position"]
    part = np.full(self.batch_size, -1, np.int64)
    if self._picker is not None and plan["tumour_row"].any():
      picked = self._picker.pick(positions[plan["tumour_row"]])
      part[plan["tumour_row"]] = picked
      plan["example"] = plan["example"].copy()
      plan["example"][plan["tumour_row"]] = self.parts[picked, 0].astype(np.int64)
    streams = (STREAM_BLOCK_ROW, STREAM_BLOCK_COL)
    if len(self.block) == 3:
      streams = (STREAM_BLOCK_DEPTH,) + streams
    offset_u = np.stack([augment.counter_uniform(self.seed, positions, stream)
                         for stream in streams], -1)
    return dict(plan, part=part, pixel_u=augment.counter_uniform(self.seed, positions,
                                                                  STREAM_BLOCK_PIXEL),
                offset_u=offset_u)

  def place(self, label: np.ndarray, row: dict[str, np.ndarray]) -> tuple[int, ...]:
    """The centre (row, col) of the row's block in its slice, so that a crop of the block's
    size around it (top = centre - size // 2) is the placed block; for a 3-D block (slice,
    row, col), the slice placed among its case's slices around the planned one."""
    candidates = None
    if row["tumour_row"]:
      tumour = label == TUMOUR
      part = int(row["part"])
      if part >= 0:  # the planned component's tumour pixels: those inside its box
        r0, c0 = np.floor(self.parts[part, 7:9]).astype(int)
        r1, c1 = np.ceil(self.parts[part, 9:11]).astype(int)
        inside = np.zeros(label.shape, bool)
        inside[max(r0, 0):r1, max(c0, 0):c1] = True
        tumour = tumour & inside
      candidates = tumour if tumour.any() else None
    if candidates is None:
      liver = label >= LIVER
      candidates = liver if liver.any() else np.ones(label.shape, bool)
    flat = np.flatnonzero(candidates)
    k = flat[min(int(float(row["pixel_u"]) * len(flat)), len(flat) - 1)]
    anchor = np.unravel_index(k, label.shape)
    extent = label.shape
    if len(self.block) == 3:
      case = np.searchsorted(self.cases[:, 1], int(row["example"]), side="right") - 1
      first, num_slices = int(self.cases[case, 1]), int(self.cases[case, 2])
      anchor, extent = (int(row["example"]) - first,) + tuple(anchor), (num_slices,) + extent
    offsets = block_offsets(extent, self.block, anchor, row["offset_u"])
    return tuple(int(o + b // 2) for o, b in zip(offsets, self.block))


class PatchSampler(_RowsOfGlobalBatches):
  """Rows of patch batches: round(f*B) positives per global batch, the rest negatives.

  Positives are centred on a tumour part (one 3-D component's cut through one slice) from the
  split's index plus uniform jitter: with 'component' sampling every 3-D component is equally
  likely (then one of its slices), with 'voxel' sampling parts are weighted by their area.
  Negatives come from liver slices without any tumour part (or, if every liver slice has one,
  from all liver slices) and are centred on a liver pixel chosen on the host from the label.
  """

  def __init__(self, index: SplitIndex, seed: int, batch_size: int, positive_fraction: float,
               component_sampling: str, jitter: float, patch_size: int, depth: int = 0):
    self._init_transient()
    self.seed, self.batch_size = int(seed), int(batch_size)
    self.jitter, self.patch_size = float(jitter), int(patch_size)
    self.depth = int(depth)  # a 3-D patch's slices (0: 2-D patches)
    self.cases = index.cases
    self.num_positive = int(round(positive_fraction * batch_size))
    parts = index.tumours
    if self.num_positive > 0 and len(parts) == 0:
      raise ValueError(
          f"split {index.split!r} holds no tumour, so a patch pipeline with "
          f"stage.positive_fraction={positive_fraction} cannot draw positive patches; use "
          f"pipeline='whole' or positive_fraction=0 for tumour-free data")
    self.parts = parts
    self.component_sampling = component_sampling
    self._picker = None
    if len(parts):
      self._picker = _ComponentPicker(index, seed, component_sampling,
                                      (STREAM_PICK_COMPONENT, STREAM_PICK_PART))
      self.tumour_examples = np.unique(parts[:, 0].astype(np.int64))
    else:
      self.tumour_examples = np.zeros(0, np.int64)
    self._tumour_set = frozenset(self.tumour_examples.tolist())
    liver = index.liver_range_slices(0)
    free = np.setdiff1d(liver, self.tumour_examples)
    self.negative_pool = free if len(free) else liver
    if self.num_positive < batch_size and len(self.negative_pool) == 0:
      raise ValueError(
          f"split {index.split!r} has no liver slice to draw negative patches from; set "
          f"stage.positive_fraction=1 or use data with liver labels")

  def has_tumour(self, example: int) -> bool:
    """Whether the slice holds a visible tumour part (a negative patch then avoids it)."""
    return int(example) in self._tumour_set

  @property
  def num_components(self) -> int:
    return len(self._picker.counts) if self._picker is not None else 0

  def global_batch(self, b: int) -> dict[str, np.ndarray]:
    """Per row of global batch b: `example`, `position`, `positive`, `part` (row in the index,
    -1 for negatives), `centre` (int [row, col]; -1 for negatives, chosen once the label is
    read) and `pixel_u` (the uniform that picks a negative's liver pixel)."""
    B = self.batch_size
    positions = b * B + np.arange(B, dtype=np.int64)
    rank = np.argsort(np.argsort(
        augment.counter_uniform(self.seed, positions, STREAM_ROW_ORDER), kind="stable"))
    positive = rank < self.num_positive
    example = np.empty(B, np.int64)
    part = np.full(B, -1, np.int64)
    centre = np.full((B, 2), -1, np.int64)
    if positive.any():
      pos = positions[positive]
      picked = self._picker.pick(pos)
      part[positive] = picked
      example[positive] = self.parts[picked, 0].astype(np.int64)
      jr = (2 * augment.counter_uniform(self.seed, pos, STREAM_JITTER_ROW) - 1) * self.jitter
      jc = (2 * augment.counter_uniform(self.seed, pos, STREAM_JITTER_COL) - 1) * self.jitter
      centre[positive, 0] = np.floor(self.parts[picked, 2] + jr + 0.5).astype(np.int64)
      centre[positive, 1] = np.floor(self.parts[picked, 3] + jc + 0.5).astype(np.int64)
    if (~positive).any():
      u = augment.counter_uniform(self.seed, positions[~positive], STREAM_NEGATIVE_SLICE)
      pool = self.negative_pool
      example[~positive] = pool[np.minimum((u * len(pool)).astype(np.int64), len(pool) - 1)]
    pixel_u = augment.counter_uniform(self.seed, positions, STREAM_NEGATIVE_PIXEL)
    plan = dict(example=example, position=positions, positive=positive, part=part,
                centre=centre, pixel_u=pixel_u)
    if self.depth:  # the patch's centre slice: the planned slice, positives jittered in depth
      rows = np.searchsorted(self.cases[:, 1], example, side="right") - 1
      jz = np.where(positive, np.floor((2 * augment.counter_uniform(
          self.seed, positions, STREAM_PATCH_DEPTH_JITTER) - 1) * self.jitter + 0.5), 0)
      plan["centre_z"] = np.clip(example - self.cases[rows, 1] + jz.astype(np.int64), 0,
                                 self.cases[rows, 2] - 1)
    return plan

  def negative_centre(self, label: np.ndarray, has_tumour: bool, u: float) -> tuple[int, int]:
    """A liver pixel (label 1) whose unaugmented patch holds no tumour when one exists, else
    any liver pixel, else the slice centre; `u` in [0, 1) picks among the candidates."""
    h, w = label.shape
    candidates = label == 1
    if has_tumour:
      p, half = self.patch_size, self.patch_size // 2
      integral = np.zeros((h + 1, w + 1), np.int32)
      integral[1:, 1:] = (label == 2).cumsum(0).cumsum(1)
      lo_r, hi_r = np.clip(np.arange(h) - half, 0, h), np.clip(np.arange(h) - half + p, 0, h)
      lo_c, hi_c = np.clip(np.arange(w) - half, 0, w), np.clip(np.arange(w) - half + p, 0, w)
      counts = (integral[np.ix_(hi_r, hi_c)] - integral[np.ix_(lo_r, hi_c)]
                - integral[np.ix_(hi_r, lo_c)] + integral[np.ix_(lo_r, lo_c)])
      clean = candidates & (counts == 0)
      if clean.any():
        candidates = clean
    flat = np.flatnonzero(candidates)
    if len(flat) == 0:
      return h // 2, w // 2
    k = flat[min(int(u * len(flat)), len(flat) - 1)]
    return int(k // w), int(k % w)



class EvalSampler(_Unlocked):
  """Evaluation: position i reads `examples[i]`, every example once in order; positions past
  the end (padding of the last global batch) read nothing (`example` -1, `real` False)."""

  _transient = ()

  def __init__(self, examples: np.ndarray):
    self.examples = np.asarray(examples, dtype=np.int64)

  def _init_transient(self) -> None:
    pass

  def row(self, position: int) -> dict[str, np.ndarray]:
    real = 0 <= int(position) < len(self.examples)
    return dict(example=np.int64(self.examples[position] if real else -1),
                position=np.int64(position), real=np.bool_(real))
