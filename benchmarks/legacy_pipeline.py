# LEGACY: a frozen copy of data_pipelines/pipelines.py at commit 916f90b, the thread-pool
# pipelines with the hand-written protobuf walker that the Grain pipelines replaced (issue 15).
# Kept only so that benchmarks/pipeline.py and benchmarks/decode.py can measure the old
# pipeline beside the new one in the same run. Nothing in the library or the tests imports it;
# do not fix or extend it.
"""Whole-slice, tumour-patch and liver-crop input pipelines: index-based, stateless, sharded,
resumable.

Like Grain, a stream is a pure function of (seed, position). Global batch `b` holds the examples
at global positions b*B .. b*B+B-1; which example a position gets, where a patch is centred and
how it is augmented are drawn from a counter-based hash of (seed, position), so the global
batches are the same run after run whatever the number of processes, threads or devices.
Process p of P keeps rows [p*B/P, (p+1)*B/P) of every global batch, so processes read disjoint
shares that together cover everything. Resuming is rebuilding the stream at a saved `position`
(global batches consumed).

Records come by random access from the ArrayRecord shards (`read(positions)` decompresses in
C++ without the GIL); the image and label bytes are located in each serialized tf.train.Example
and viewed without copies, then batched by a small thread pool that keeps batches ahead. tf.data
is not used: with the augmentation warp on the device (see augment.py) the host work is reading,
decoding and copying, and TF adds a tf.string copy and its own parse (measured: 0.67 CPU-ms per
256x256x3 record for tf.io.parse_example against ~0.2 ms for the decoding here).

Training batches leave the host as int16 HU (whole slices, or patch footprints cropped with air
padding) plus per-example affine and intensity parameters (for liver crops, the augmentation map
composed with the map into the case's liver box, so crop, resize and augmentation are one
warp); `stream.finish` (a JAX function) turns them into the model's batch: `image` float32
[b, H, W, C] windowed to [0, 1], `label` int32 [b, H, W] (0 background, 1 liver, 2 tumour),
`mask` float32 [b]. The device feed applies it on the accelerator; with
`augment.on_device=False` the pipeline applies it on the host CPU and yields finished batches.
Evaluation batches are finished on the host and also carry `case_number` and `slice_index`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import os
import sys
import threading
import zlib
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from data_pipelines import augment
from data_pipelines import crops

PIPELINES = ("whole", "patch", "liver_crop")
SLICE_SELECTIONS = ("liver", "all")
COMPONENT_SAMPLING = ("component", "voxel")
DEFAULT_HU_WINDOW = (-60.0, 140.0)

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


# ---------------------------------------------------------------------------------------------
# The dataset's index and records
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SplitIndex:
  """A split's case and tumour-part tables (from the builder's metadata) as arrays.

  `cases` rows: [case_number, first_example, num_slices, liver_z_lo, liver_z_hi];
  `tumours` rows: [example, component, centre_row, centre_col, diameter_mm, area_mm2,
  stored_pixels], keeping only parts whose tumour survived resampling into the stored label
  (stored_pixels > 0): a patch centred on a lost part would hold no tumour label.
  """

  split: str
  cases: np.ndarray
  tumours: np.ndarray
  num_examples: int

  @classmethod
  def from_builder(cls, builder, split: str) -> "SplitIndex":
    index = builder.info.metadata.get("index", {})
    if split not in index:
      raise ValueError(f"split {split!r} is not in the prepared dataset (it has "
                       f"{sorted(index)}); prepare it again or choose another split")
    cases = np.asarray(index[split]["cases"], dtype=np.int64).reshape(-1, 5)
    tumours = np.asarray(index[split]["tumours"], dtype=np.float64).reshape(-1, 7)
    tumours = tumours[tumours[:, 6] > 0]
    return cls(split=split, cases=cases, tumours=tumours,
               num_examples=int(cases[:, 2].sum()) if len(cases) else 0)

  def tumour_slices(self) -> np.ndarray:
    """Sorted example indices of the slices holding a visible tumour part (stored_pixels > 0)."""
    return np.unique(self.tumours[:, 0].astype(np.int64))

  def case_rows(self, examples) -> np.ndarray:
    """Row in `cases` of each example index."""
    return np.searchsorted(self.cases[:, 1], np.asarray(examples), side="right") - 1

  def case_and_slice(self, examples) -> tuple[np.ndarray, np.ndarray]:
    examples = np.asarray(examples, dtype=np.int64)
    rows = self.case_rows(examples)
    return (self.cases[rows, 0].astype(np.int32),
            (examples - self.cases[rows, 1]).astype(np.int32))

  def liver_range_slices(self, margin: int = 0) -> np.ndarray:
    """Example indices of the slices within each case's liver z-range widened by `margin`."""
    parts = []
    for _, first, n, lo, hi in self.cases:
      if lo < 0:
        continue
      parts.append(first + np.arange(max(0, lo - margin), min(n, hi + margin + 1)))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)

  def select(self, selection: str, margin: int) -> np.ndarray:
    """Example indices chosen by `data.slice_selection` ('liver' z-range +- margin, or 'all')."""
    if selection == "all":
      return np.arange(self.num_examples, dtype=np.int64)
    if selection == "liver":
      return self.liver_range_slices(margin)
    raise ValueError(f"data.slice_selection must be one of {SLICE_SELECTIONS}, got "
                     f"{selection!r}")


def case_liver_boxes(reader: "RecordReader", index: SplitIndex, margin: int,
                     threads: int = 1) -> np.ndarray:
  """[num_cases, 4] int64 crop boxes (crops.liver_box of each case's reference liver over all
  its slices, in stored pixels), -1 rows for cases without liver.

  Reads every liver slice's label once (the liver z-range from the index bounds the reads).
  """
  boxes = np.full((len(index.cases), 4), -1, np.int64)

  def one(row):
    _, first, _, lo, hi = index.cases[row]
    if lo < 0:
      return row, None
    mask = None
    for _, label in reader.read(first + np.arange(lo, hi + 1)):
      slice_mask = label >= 1
      mask = slice_mask if mask is None else (mask | slice_mask)
    return row, crops.liver_box(mask, margin)

  with concurrent.futures.ThreadPoolExecutor(max(1, int(threads))) as pool:
    for row, box in pool.map(one, range(len(index.cases))):
      if box is not None:
        boxes[row] = box
  return boxes


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if byte < 0x80:
      return result, pos
    shift += 7


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
  """(field number, wire type, start, end) of the protobuf fields in buf[pos:end]."""
  while pos < end:
    key, pos = _varint(buf, pos)
    wire = key & 7
    if wire == 2:
      length, pos = _varint(buf, pos)
      yield key >> 3, wire, pos, pos + length
      pos += length
    elif wire == 0:
      start = pos
      _, pos = _varint(buf, pos)
      yield key >> 3, wire, start, pos
    elif wire == 1:
      yield key >> 3, wire, pos, pos + 8
      pos += 8
    elif wire == 5:
      yield key >> 3, wire, pos, pos + 4
      pos += 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")


def _decode_varints(buf: memoryview) -> np.ndarray:
  """Packed protobuf int64 varints -> int64 array (vectorised)."""
  a = np.frombuffer(buf, np.uint8)
  ends = a < 0x80
  starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
  which = np.cumsum(np.concatenate([[0], ends[:-1]]))
  shift = ((np.arange(len(a)) - starts[which]) * 7).astype(np.uint64)
  parts = (a & 0x7F).astype(np.uint64) << shift
  return np.bitwise_or.reduceat(parts, starts).view(np.int64)


class _TensorField:
  """Decodes one fixed-shape tensor feature of a serialized tf.train.Example without TF.

  Handles the TFDS encodings: bytes (raw), zlib, and none (a packed int64 list, read by the
  wire type, so datasets written before a change of encoding still decode).
  """

  def __init__(self, name: str, feature, dtype, shape):
    self.name = name.encode()
    self.dtype = np.dtype(dtype)
    self.shape = tuple(shape)
    encoding = getattr(feature, "_encoding", None)
    self.zlib = str(getattr(encoding, "value", encoding)).lower() == "zlib"

  def decode(self, record: bytes, span: tuple[int, int]) -> np.ndarray:
    for number, _, start, end in _fields(record, *span):  # Feature: oneof kind
      if number == 1:  # bytes_list
        for _, _, vs, ve in _fields(record, start, end):
          if self.zlib:
            return np.frombuffer(zlib.decompress(memoryview(record)[vs:ve]),
                                 self.dtype).reshape(self.shape)
          return np.frombuffer(record, self.dtype, count=(ve - vs) // self.dtype.itemsize,
                               offset=vs).reshape(self.shape)
      if number == 3:  # int64_list
        values = [np.frombuffer(record, np.uint8, count=0)]
        for _, wire, vs, ve in _fields(record, start, end):
          values.append(_decode_varints(memoryview(record)[vs:ve]) if wire == 2
                        else np.array([_varint(record, vs)[0]], np.uint64).view(np.int64))
        return np.concatenate(values[1:]).astype(self.dtype).reshape(self.shape)
    raise ValueError(f"feature {self.name.decode()!r} is neither bytes nor int64")


def _entry_value_span(record: bytes, key: bytes) -> Optional[tuple[int, int]]:
  """Fast path: the Feature span of map entry `key`, found by byte search and verified.

  A map entry is `0a len 0a klen key 12 flen Feature`; the hit is accepted only when the
  Feature's nested lengths (bytes_list holding one value) add up exactly, else None (the caller
  walks the record instead), so a look-alike byte sequence inside a payload cannot fool it.
  """
  pattern = b"\x0a" + bytes([len(key)]) + key + b"\x12"
  at = record.find(pattern)
  if at < 0:
    return None
  try:
    flen, fs = _varint(record, at + len(pattern))
    if record[fs] != 0x0A:  # not a bytes_list: let the walker handle it
      return None
    blen, bs = _varint(record, fs + 1)
    if record[bs] != 0x0A or bs + blen != fs + flen:
      return None
    vlen, vs = _varint(record, bs + 1)
    if vs + vlen != fs + flen:
      return None
  except IndexError:
    return None
  return fs, fs + flen


class ExampleDecoder:
  """Decodes `image` int16 [S, S, C] (a view into the record, no copy) and `label` uint8 [S, S]
  from a serialized tf.train.Example, without TensorFlow."""

  def __init__(self, image_feature, label_feature, image_size: int, channels: int):
    s, c = int(image_size), int(channels)
    self.image = _TensorField("image", image_feature, np.int16, (s, s, c))
    self.label = _TensorField("label", label_feature, np.uint8, (s, s))

  def _walk(self, record: bytes) -> dict[bytes, tuple[int, int]]:
    wanted = (self.image.name, self.label.name)
    spans = {}
    for _, _, fs, fe in _fields(record, 0, len(record)):  # Example.features
      for _, _, es, ee in _fields(record, fs, fe):  # Features.feature map entries
        key = value = None
        for number, _, s, e in _fields(record, es, ee):
          if number == 1:
            key = record[s:e]
          elif number == 2:
            value = (s, e)
        if key in wanted:
          spans[key] = value
    return spans

  def __call__(self, record: bytes) -> tuple[np.ndarray, np.ndarray]:
    image_span = _entry_value_span(record, self.image.name)
    label_span = _entry_value_span(record, self.label.name)
    if image_span is not None and label_span is not None:
      try:
        return self.image.decode(record, image_span), self.label.decode(record, label_span)
      except (ValueError, zlib.error):
        pass  # a look-alike that passed the checks: walk the record
    spans = self._walk(record)
    if len(spans) < 2:
      raise ValueError("a record lacks the 'image' or 'label' feature")
    return (self.image.decode(record, spans[self.image.name]),
            self.label.decode(record, spans[self.label.name]))


class RecordReader:
  """Random access to a split's examples: `read(indices)` -> [(image, label)].

  Opens the split's ArrayRecord shards itself (TFDS lists them with their lengths), so a read
  is one GIL-free `ArrayRecordReader.read(positions)` per shard touched, with no Python thread
  pool per call. ArrayRecordReader is thread-compatible, not thread-safe: each thread that
  reads gets its own readers, opened on first use.
  """

  def __init__(self, builder, split: str):
    try:
      info = builder.info.splits[split]
      paths = [os.fspath(p) for p in info.filepaths]
      lengths = [int(n) for n in info.shard_lengths]
    except Exception as e:  # noqa: BLE001 - TFDS raises several types here
      raise ValueError(f"split {split!r} is not in the prepared dataset {builder.data_dir} "
                       f"({e})") from e
    if not paths or not all(".array_record" in os.path.basename(p) for p in paths):
      raise ValueError(f"split {split!r} of {builder.data_dir} is not stored as ArrayRecord; "
                       f"the pipelines need data.file_format='array_record' (random access)")
    self._paths = paths
    self._local = threading.local()
    self._starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    features = builder.info.features
    self.image_size = int(builder.builder_config.image_size)
    self.channels = int(builder.builder_config.context_slices)
    self.decode = ExampleDecoder(features["image"], features["label"], self.image_size,
                                 self.channels)
    self.num_examples = int(self._starts[-1])

  def _reader(self, shard: int):
    readers = getattr(self._local, "readers", None)
    if readers is None:
      readers = self._local.readers = [None] * len(self._paths)
    if readers[shard] is None:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      readers[shard] = array_record_module.ArrayRecordReader(self._paths[shard],
                                                             "readahead_buffer_size:0")
    return readers[shard]

  def read_records(self, indices: Sequence[int]) -> list[bytes]:
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= self.num_examples):
      raise IndexError(f"example indices must be in [0, {self.num_examples})")
    shards = np.searchsorted(self._starts, indices, side="right") - 1
    records: list[bytes] = [b""] * len(indices)
    for shard in np.unique(shards):
      rows = np.flatnonzero(shards == shard)
      got = self._reader(shard).read((indices[rows] - self._starts[shard]).tolist())
      for row, record in zip(rows, got):
        records[row] = record
    return records

  def read(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [self.decode(r) for r in self.read_records(indices)]


# ---------------------------------------------------------------------------------------------
# Samplers: global batch number -> the examples (and patch centres) of its rows
# ---------------------------------------------------------------------------------------------

class _EpochShuffle:
  """An endless stream over `items`: epoch-wise permutations (from the counter hash of
  `(seed, epoch * n + i)` on `stream`) concatenated; `at(positions)` is a pure function."""

  def __init__(self, items: np.ndarray, seed: int, stream: int):
    self.items = np.asarray(items, dtype=np.int64)
    self.seed, self.stream = int(seed), int(stream)
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


class WholeSliceSampler:
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


class PatchSampler:
  """Rows of patch batches: round(f*B) positives per global batch, the rest negatives.

  Positives are centred on a tumour part (one 3-D component's cut through one slice) from the
  split's index plus uniform jitter: with 'component' sampling every 3-D component is equally
  likely (then one of its slices), with 'voxel' sampling parts are weighted by their area.
  Negatives come from liver slices without any tumour part (or, if every liver slice has one,
  from all liver slices) and are centred on a liver pixel chosen on the host from the label.
  """

  def __init__(self, index: SplitIndex, seed: int, batch_size: int, positive_fraction: float,
               component_sampling: str, jitter: float, patch_size: int):
    self.seed, self.batch_size = int(seed), int(batch_size)
    self.jitter, self.patch_size = float(jitter), int(patch_size)
    self.num_positive = int(round(positive_fraction * batch_size))
    parts = index.tumours
    if self.num_positive > 0 and len(parts) == 0:
      raise ValueError(
          f"split {index.split!r} holds no tumour, so a patch pipeline with "
          f"stage.positive_fraction={positive_fraction} cannot draw positive patches; use "
          f"pipeline='whole' or positive_fraction=0 for tumour-free data")
    self.parts = parts
    self.component_sampling = component_sampling
    if len(parts):
      case_rows = index.case_rows(parts[:, 0].astype(np.int64))
      keys = case_rows * 1_000_000 + parts[:, 1].astype(np.int64)
      _, inverse = np.unique(keys, return_inverse=True)
      order = np.argsort(inverse, kind="stable")
      self._component_parts = order  # part rows grouped by component
      counts = np.bincount(inverse)
      self._component_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
      self._component_count = counts
      weights = np.maximum(parts[:, 5], 0.0)
      self._area_cdf = np.cumsum(weights) / max(weights.sum(), 1e-12)
      self.tumour_examples = np.unique(parts[:, 0].astype(np.int64))
    else:
      self.tumour_examples = np.zeros(0, np.int64)
    liver = index.liver_range_slices(0)
    free = np.setdiff1d(liver, self.tumour_examples)
    self.negative_pool = free if len(free) else liver
    if self.num_positive < batch_size and len(self.negative_pool) == 0:
      raise ValueError(
          f"split {index.split!r} has no liver slice to draw negative patches from; set "
          f"stage.positive_fraction=1 or use data with liver labels")

  @property
  def num_components(self) -> int:
    return len(self._component_count) if len(self.parts) else 0

  def _pick_parts(self, positions: np.ndarray) -> np.ndarray:
    u1 = augment.counter_uniform(self.seed, positions, STREAM_PICK_COMPONENT)
    if self.component_sampling == "voxel":
      return np.minimum(np.searchsorted(self._area_cdf, u1, side="right"), len(self.parts) - 1)
    u2 = augment.counter_uniform(self.seed, positions, STREAM_PICK_PART)
    comp = np.minimum((u1 * len(self._component_count)).astype(np.int64),
                      len(self._component_count) - 1)
    within = np.minimum((u2 * self._component_count[comp]).astype(np.int64),
                        self._component_count[comp] - 1)
    return self._component_parts[self._component_start[comp] + within]

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
      picked = self._pick_parts(pos)
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
    return dict(example=example, position=positions, positive=positive, part=part,
                centre=centre, pixel_u=pixel_u)

  def negative_centre(self, label: np.ndarray, has_tumour: bool, u: float) -> tuple[int, int]:
    """A liver pixel (label 1) whose unaugmented patch holds no tumour when one exists, else
    any liver pixel, else the slice centre; `u` in [0, 1) picks among the candidates."""
    s = label.shape[0]
    candidates = label == 1
    if has_tumour:
      p, h = self.patch_size, self.patch_size // 2
      integral = np.zeros((s + 1, s + 1), np.int32)
      integral[1:, 1:] = (label == 2).cumsum(0).cumsum(1)
      lo = np.clip(np.arange(s) - h, 0, s)
      hi = np.clip(np.arange(s) - h + p, 0, s)
      counts = (integral[np.ix_(hi, hi)] - integral[np.ix_(lo, hi)] - integral[np.ix_(hi, lo)]
                + integral[np.ix_(lo, lo)])
      clean = candidates & (counts == 0)
      if clean.any():
        candidates = clean
    flat = np.flatnonzero(candidates)
    if len(flat) == 0:
      return s // 2, s // 2
    k = flat[min(int(u * len(flat)), len(flat) - 1)]
    return int(k // s), int(k % s)


# ---------------------------------------------------------------------------------------------
# The stream: batches made by a thread pool, in order, ahead of the consumer
# ---------------------------------------------------------------------------------------------

class HostStream:
  """An iterator of per-process numpy batches; batch k is `make_batch(k)`, a pure function.

  `position` is the number of the next global batch this iterator will return (the number
  consumed so far when started at 0): store it and pass it back as `start` to resume exactly.
  `finish` is None when batches are final, else the JAX function that finishes them on the
  device (see augment.make_finish). `plan(b)` (training streams) gives this process's rows of
  global batch b as the sampler drew them: examples, positions, patch centres. Iterate from one
  thread.
  """

  def __init__(self, make_batch: Callable[[int], dict[str, np.ndarray]], start: int,
               stop: Optional[int], threads: int, prefetch: int,
               finish: Optional[Callable] = None, info: Optional[dict] = None,
               plan: Optional[Callable[[int], dict[str, np.ndarray]]] = None):
    if start < 0:
      raise ValueError(f"start position must be >= 0, got {start}")
    self._make = make_batch
    self._next = int(start)
    self._submitted = int(start)
    self._stop = stop
    self._threads = max(1, int(threads))
    self._prefetch = max(1, int(prefetch))
    self._pending: collections.deque = collections.deque()
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
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

  def __iter__(self) -> "HostStream":
    return self

  def _fill(self) -> None:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(
          self._threads, thread_name_prefix="host_stream")
    while len(self._pending) < self._prefetch and (
        self._stop is None or self._submitted < self._stop):
      self._pending.append(self._pool.submit(self._make, self._submitted))
      self._submitted += 1

  def __next__(self) -> dict[str, np.ndarray]:
    if self._stop is not None and self._next >= self._stop:
      raise StopIteration
    self._fill()
    batch = self._pending.popleft().result()
    self._next += 1
    self._fill()
    return batch

  def close(self, wait: bool = True) -> None:
    """Stops the workers; batches not yet returned are dropped (position is unchanged)."""
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._submitted = self._next
    if self._pool is not None:
      self._pool.shutdown(wait=wait, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "HostStream":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close(wait=False)
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

def _keep_tensorflow_off_accelerators() -> None:
  """The accelerator belongs to JAX: hide GPUs from TensorFlow if it is loaded (TFDS loads it)."""
  tf = sys.modules.get("tensorflow")
  if tf is None:
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError, AttributeError):
    pass  # already initialised or no GPU support: nothing to hide


def hu_window(data_cfg) -> tuple[float, float]:
  window = tuple(data_cfg.get("hu_window", DEFAULT_HU_WINDOW))
  if len(window) != 2 or not float(window[0]) < float(window[1]):
    raise ValueError(f"data.hu_window must be (lo, hi) with lo < hi, got {window!r}")
  return float(window[0]), float(window[1])


def host_threads(data_cfg) -> int:
  threads = int(data_cfg.get("host_threads", 0))
  if threads < 0:
    raise ValueError(f"data.host_threads must be >= 0 (0: one per available core), got "
                     f"{threads}")
  return threads or len(os.sched_getaffinity(0))


def _prefetch(data_cfg, threads: int) -> int:
  prefetch = int(data_cfg.get("prefetch_batches", 0))
  if prefetch < 0:
    raise ValueError(f"data.prefetch_batches must be >= 0 (0: automatic), got {prefetch}")
  return prefetch or max(2, 2 * threads)


def _process_rows(batch_size: int, process_index: int, process_count: int,
                  key: str) -> tuple[int, int]:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index ({process_index}) must be in [0, process_count "
                     f"({process_count}))")
  if batch_size < 1:
    raise ValueError(f"{key} must be >= 1, got {batch_size}")
  if batch_size % process_count:
    raise ValueError(f"{key} ({batch_size}) must be divisible by the number of processes "
                     f"({process_count}): each process feeds an equal share of a global batch")
  per = batch_size // process_count
  return process_index * per, (process_index + 1) * per


def window_into(dst: np.ndarray, hu: np.ndarray, lo: float, hi: float) -> None:
  np.subtract(hu, np.float32(lo), out=dst, dtype=np.float32)
  np.multiply(dst, np.float32(1.0 / (hi - lo)), out=dst)
  np.clip(dst, 0.0, 1.0, out=dst)


def _crop_into(dst: np.ndarray, src: np.ndarray, top: int, left: int, fill) -> None:
  """dst[:] = src[top:top+F, left:left+F] with `fill` where that leaves src."""
  f = dst.shape[0]
  h, w = src.shape[:2]
  r0, c0, r1, c1 = max(top, 0), max(left, 0), min(top + f, h), min(left + f, w)
  if r0 != top or c0 != left or r1 != top + f or c1 != left + f:
    dst[...] = fill
  if r1 > r0 and c1 > c0:
    dst[r0 - top:r1 - top, c0 - left:c1 - left] = src[r0:r1, c0:c1]


def _cpu_finisher(finish: Callable) -> Callable[[dict], dict]:
  """Runs a finish function with XLA on this host's CPU, numpy in and out."""
  import jax  # pylint: disable=g-import-not-at-top
  cpu = jax.local_devices(backend="cpu")[0]
  jitted = jax.jit(finish)

  def run(batch):
    return jax.tree.map(np.asarray, jitted(jax.device_put(batch, cpu)))

  return run


class _TrainBatches:
  """make_batch(b) for training streams: this process's rows of global batch b."""

  def __init__(self, reader: RecordReader, sampler, spec: augment.AugmentSpec, seed: int,
               rows: tuple[int, int], pipeline: str, out_size: int,
               crop: Optional[tuple[SplitIndex, np.ndarray]] = None):
    self.reader, self.sampler, self.spec, self.seed = reader, sampler, spec, int(seed)
    self.rows, self.pipeline, self.out_size = rows, pipeline, int(out_size)
    self.crop = crop  # liver_crop: (index, per-case boxes)
    s = reader.image_size
    if pipeline == "whole":
      self.in_size = s
      self.out_centre = self.in_centre = (s - 1) / 2.0
    elif pipeline == "liver_crop":  # augment in the crop's frame, then map it into the box
      self.in_size = s
      self.out_centre = self.in_centre = (out_size - 1) / 2.0
    else:
      self.in_size = spec.footprint(out_size)
      self.out_centre, self.in_centre = float(out_size // 2), float(self.in_size // 2)
    self.on_host_finish: Optional[Callable] = None

  def plan(self, b: int) -> dict[str, np.ndarray]:
    """This process's rows of the sampler's global batch b."""
    rows = slice(*self.rows)
    return {k: v[rows] for k, v in self.sampler.global_batch(b).items()}

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    plan = self.plan(b)
    n = len(plan["example"])
    f, c = self.in_size, self.reader.channels
    images = np.empty((n, f, f, c), np.int16)
    labels = np.empty((n, f, f), np.uint8)
    decoded = self.reader.read(plan["example"])
    if self.pipeline in ("whole", "liver_crop"):
      for k, (image, label) in enumerate(decoded):
        images[k] = image
        labels[k] = label
    else:
      tumour_slices = self.sampler.tumour_examples
      for k, (image, label) in enumerate(decoded):
        if plan["positive"][k]:
          r, col = plan["centre"][k]
        else:
          has_tumour = bool(np.isin(plan["example"][k], tumour_slices))
          r, col = self.sampler.negative_centre(label, has_tumour, float(plan["pixel_u"][k]))
        top, left = int(r) - f // 2, int(col) - f // 2
        _crop_into(images[k], image, top, left, np.int16(augment.AIR_HU))
        _crop_into(labels[k], label, top, left, 0)
    params = augment.sample_params(self.spec, self.seed, plan["position"])
    affine = augment.affine_matrices(params, self.out_centre, self.in_centre)
    if self.pipeline == "liver_crop":
      index, boxes = self.crop
      box_maps = np.stack([crops.crop_affine(boxes[r], self.out_size)
                           for r in index.case_rows(plan["example"])])
      affine = crops.compose(box_maps, affine).astype(np.float32)
    batch = dict(image=images, label=labels, mask=np.ones(n, np.float32), affine=affine,
                 intensity=augment.intensity_pairs(params))
    if self.on_host_finish is not None:
      batch = self.on_host_finish(batch)
    return batch


def _stage_get(stage_cfg, key: str, default=None):
  value = stage_cfg.get(key, default) if hasattr(stage_cfg, "get") else getattr(
      stage_cfg, key, default)
  return default if value is None else value


def crop_settings(stage_cfg, image_size: int) -> tuple[int, int]:
  """(crop_size, crop_margin) of a 'liver_crop' stage, validated (defaults: the stored slice
  size and 0)."""
  size = int(_stage_get(stage_cfg, "crop_size", image_size))
  margin = int(_stage_get(stage_cfg, "crop_margin", 0))
  if size < 1:
    raise ValueError(f"stage.crop_size must be >= 1, got {size}")
  if margin < 0:
    raise ValueError(f"stage.crop_margin must be >= 0 (stored pixels), got {margin}")
  return size, margin


def make_train_pipeline(builder, data_cfg, augment_cfg, stage_cfg, seed: int,
                        process_index: int, process_count: int, start: int = 0) -> HostStream:
  """An endless stream of this process's training batches for one stage.

  `stage_cfg.pipeline` picks 'whole' (slices chosen by data.slice_selection, with
  stage.tumour_fraction of every batch tumour-bearing slices), 'patch'
  (stage.patch_size patches, stage.positive_fraction of them on tumour parts sampled per
  stage.component_sampling with +-stage.patch_jitter pixels of jitter) or 'liver_crop' (the
  cascade's tumour network: the slices within each case's liver z-range, cropped to the case's
  reference liver box widened by stage.crop_margin stored pixels (see data_pipelines.crops)
  and resized to stage.crop_size; augmentation acts in the crop's frame). `stage_cfg.batch_size`
  is the global batch; this process gets rows [p*B/P, (p+1)*B/P). `start` is a saved
  `position`. The stream's `finish` is the device half of the batch (None when
  augment.on_device is False: the batches are then finished here).
  """
  _keep_tensorflow_off_accelerators()
  pipeline = _stage_get(stage_cfg, "pipeline", "whole")
  if pipeline not in PIPELINES:
    raise ValueError(f"stage.pipeline must be one of {PIPELINES}, got {pipeline!r}")
  batch_size = int(_stage_get(stage_cfg, "batch_size", 0))
  rows = _process_rows(batch_size, process_index, process_count, "stage.batch_size")
  spec = augment.AugmentSpec.from_config(augment_cfg)
  window = hu_window(data_cfg)
  index = SplitIndex.from_builder(builder, "train")
  reader = RecordReader(builder, "train")
  if reader.num_examples != index.num_examples:
    raise ValueError(f"the dataset index lists {index.num_examples} training slices but the "
                     f"files hold {reader.num_examples}: prepare the dataset again")
  s = reader.image_size
  crop = None
  tumour_fraction = float(_stage_get(stage_cfg, "tumour_fraction", 0.0))
  if not 0.0 <= tumour_fraction <= 1.0:
    raise ValueError(f"stage.tumour_fraction must be in [0, 1], got {tumour_fraction}")
  tumour_slices = index.tumour_slices()
  if pipeline == "whole":
    margin = int(data_cfg.get("liver_margin", 10))
    if margin < 0:
      raise ValueError(f"data.liver_margin must be >= 0, got {margin}")
    selection = data_cfg.get("slice_selection", "liver")
    examples = index.select(selection, margin)
    if len(examples) == 0:
      raise ValueError(f"data.slice_selection={selection!r} selects no training slice (no "
                       f"case has liver); use slice_selection='all'")
    sampler = WholeSliceSampler(examples, seed, batch_size, tumour_slices, tumour_fraction)
    out_size = s
    info = dict(pipeline="whole", examples=len(examples), selection=selection,
                tumour_fraction=tumour_fraction, tumour_slices=len(sampler.tumour_examples),
                tumour_rows_per_batch=sampler.num_tumour)
  elif pipeline == "liver_crop":
    out_size, margin = crop_settings(stage_cfg, s)
    boxes = case_liver_boxes(reader, index, margin, host_threads(data_cfg))
    examples = index.liver_range_slices(0)
    if len(examples) == 0:
      raise ValueError("stage.pipeline='liver_crop' needs liver labels, but no training case "
                       "has liver")
    sampler = WholeSliceSampler(examples, seed, batch_size, tumour_slices, tumour_fraction)
    crop = (index, boxes)
    info = dict(pipeline="liver_crop", examples=len(examples), crop_size=out_size,
                crop_margin=margin, tumour_fraction=tumour_fraction,
                tumour_slices=len(sampler.tumour_examples),
                tumour_rows_per_batch=sampler.num_tumour)
  else:
    if tumour_fraction:
      raise ValueError(f"stage.tumour_fraction ({tumour_fraction}) applies to 'whole' and "
                       f"'liver_crop' stages; a patch stage's tumour share is "
                       f"stage.positive_fraction")
    out_size = int(_stage_get(stage_cfg, "patch_size", 0))
    if not 1 <= out_size <= s:
      raise ValueError(f"stage.patch_size ({out_size}) must be in [1, data.image_size={s}]")
    fraction = float(_stage_get(stage_cfg, "positive_fraction", 0.5))
    if not 0.0 <= fraction <= 1.0:
      raise ValueError(f"stage.positive_fraction must be in [0, 1], got {fraction}")
    sampling = _stage_get(stage_cfg, "component_sampling", "component")
    if sampling not in COMPONENT_SAMPLING:
      raise ValueError(f"stage.component_sampling must be one of {COMPONENT_SAMPLING}, got "
                       f"{sampling!r}")
    jitter = float(_stage_get(stage_cfg, "patch_jitter", 0))
    if not 0.0 <= jitter < out_size / 2:
      raise ValueError(f"stage.patch_jitter ({jitter}) must be in [0, patch_size/2 = "
                       f"{out_size / 2}): the tumour must stay in the patch")
    sampler = PatchSampler(index, seed, batch_size, fraction, sampling, jitter, out_size)
    info = dict(pipeline="patch", parts=len(index.tumours), components=sampler.num_components,
                positives_per_batch=sampler.num_positive,
                negative_slices=len(sampler.negative_pool))
  make_batch = _TrainBatches(reader, sampler, spec, seed, rows, pipeline, out_size,
                             crop=crop)
  finish = augment.make_finish(window, out_size,
                               warp=(spec.geometric or make_batch.in_size != out_size
                                     or pipeline == "liver_crop"))
  threads = host_threads(data_cfg)
  if not spec.on_device:
    make_batch.on_host_finish = _cpu_finisher(finish)
    finish = None
  info.update(batch_size=batch_size, rows=rows, out_size=out_size, in_size=make_batch.in_size,
              threads=threads)
  return HostStream(make_batch, start, None, threads, _prefetch(data_cfg, threads),
                    finish=finish, info=info, plan=make_batch.plan)


def make_eval_pipeline(builder, data_cfg, split: str, batch_size: int, process_index: int,
                       process_count: int, *, slice_selection: str = "all",
                       stage_cfg=None, liver_boxes: Optional[np.ndarray] = None) -> HostStream:
  """A finite stream over every slice of `split` once (by default), in (case, slice) order.

  `batch_size` is global; all processes yield the same number of batches; the last global
  batch is padded (mask 0, case_number and slice_index -1) instead of dropped. Batches are
  finished: `image` float32 windowed, `label` int32, `mask`, `case_number`, `slice_index`.

  With a 'liver_crop' `stage_cfg` the stream holds what that stage's network sees: the slices
  within each case's liver z-range, cropped to the case's reference liver box and resized to
  stage.crop_size exactly as training crops them (no augmentation); `slice_selection` is
  ignored. `liver_boxes` (from `case_liver_boxes` for this split and the stage's margin) saves
  reading every liver slice's label again when a caller evaluates repeatedly.
  """
  _keep_tensorflow_off_accelerators()
  r0, r1 = _process_rows(int(batch_size), process_index, process_count, "eval batch_size")
  lo, hi = hu_window(data_cfg)
  index = SplitIndex.from_builder(builder, split)
  reader = RecordReader(builder, split)
  s, c = reader.image_size, reader.channels
  threads = host_threads(data_cfg)
  cropped = stage_cfg is not None and _stage_get(stage_cfg, "pipeline", "whole") == "liver_crop"
  if cropped:
    out, margin = crop_settings(stage_cfg, s)
    boxes = (case_liver_boxes(reader, index, margin, threads) if liver_boxes is None
             else np.asarray(liver_boxes))
    if boxes.shape != (len(index.cases), 4):
      raise ValueError(f"liver_boxes must be [{len(index.cases)}, 4] (one per case of split "
                       f"{split!r}), got {boxes.shape}")
    examples = index.liver_range_slices(0)
  else:
    out, boxes = s, None
    examples = index.select(slice_selection, int(data_cfg.get("liver_margin", 10)))
  num_batches = math.ceil(len(examples) / batch_size)

  def make_batch(b: int) -> dict[str, np.ndarray]:
    positions = b * batch_size + np.arange(r0, r1)
    real = positions < len(examples)
    n = r1 - r0
    batch = dict(image=np.zeros((n, out, out, c), np.float32),
                 label=np.zeros((n, out, out), np.int32),
                 mask=real.astype(np.float32), case_number=np.full(n, -1, np.int32),
                 slice_index=np.full(n, -1, np.int32))
    chosen = examples[positions[real]]
    case_number, slice_index = index.case_and_slice(chosen)
    batch["case_number"][real] = case_number
    batch["slice_index"][real] = slice_index
    rows = np.flatnonzero(real)
    decoded = reader.read(chosen)
    if not cropped:
      for k, (image, label) in zip(rows, decoded):
        window_into(batch["image"][k], image, lo, hi)
        batch["label"][k] = label
      return batch
    case_rows = index.case_rows(chosen)
    for case_row in np.unique(case_rows):
      which = np.flatnonzero(case_rows == case_row)
      hu, labels = crops.crop_slices(np.stack([decoded[j][0] for j in which]),
                                     tuple(boxes[case_row]), out,
                                     labels=np.stack([decoded[j][1] for j in which]))
      for j, k in enumerate(rows[which]):
        window_into(batch["image"][k], hu[j], lo, hi)
        batch["label"][k] = labels[j]
    return batch

  return HostStream(make_batch, 0, num_batches, threads, _prefetch(data_cfg, threads),
                    info=dict(pipeline="eval_liver_crop" if cropped else "eval", split=split,
                              examples=len(examples), batches=num_batches,
                              batch_size=batch_size, rows=(r0, r1), out_size=out))
