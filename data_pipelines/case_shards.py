"""One LiTS case as one shard of the TFDS dataset "lits": its slices as serialized records.

Every way of preparing the dataset (one process, worker processes, Apache Beam) runs
`write_case_shard` once per case: it loads the case, makes its per-slice examples
(data_pipelines.slices), encodes and serializes them with the dataset's own features, writes
them in slice order to the case's ArrayRecord shard, and returns a small `CaseSummary` (slice
count, liver range, slice size, tumour parts, HU histograms) from which the builder assembles
the split's index. A shard is written under a temporary name and renamed when complete, so a
retried or interrupted task never leaves half a shard under the final name. The result depends
only on the case and the `ShardSpec`, not on where it runs, so the builds agree record for
record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
import uuid
from typing import Any, Optional

import numpy as np
from etils import epath

from data_pipelines import intensity, lits, slices

# The writer's options before the compression (TFDS's ArrayRecord default: one record per
# group, so a random read decodes one record).
_GROUP = "group_size:1"
INCOMPLETE_PREFIX = "incomplete."  # TFDS removes leftover files of this prefix after a build


@dataclasses.dataclass(frozen=True)
class ShardSpec:
  """What every shard of one dataset shares: the stored grid and the record encoding."""

  context_slices: int
  image_size: Optional[int]
  spacing_mm: Optional[tuple[float, ...]]
  compression: str = "uncompressed"


@dataclasses.dataclass(frozen=True)
class CaseTask:
  """One case to write: `rank` is its place in its split, `shard` the final shard path."""

  split: str
  rank: int
  number: int
  volume: str
  segmentation: str
  shard: str
  size_bytes: int = 0  # the volume file's size: larger cases are started first

  @property
  def name(self) -> str:
    return os.path.basename(self.volume)


@dataclasses.dataclass
class CaseSummary:
  """What the split's index needs of a written case (JSON-able, small).

  `tumours` rows are the index's tumour rows with the slice index in the case in place of the
  example's position in the split; `histograms` are `intensity.pack`ed.
  """

  split: str
  rank: int
  number: int
  num_slices: int
  liver_z: tuple[int, int]
  size: tuple[int, int]
  tumours: list[list[Any]]
  histograms: dict[str, dict[str, Any]]
  num_bytes: int
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # CPU seconds by stage

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "CaseSummary":
    return cls(**{**d, "liver_z": tuple(d["liver_z"]), "size": tuple(d["size"])})


def example_features(context_slices: int):
  """The dataset's features: one example per axial slice (the builder's `_info` uses these)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  f = tfds.features
  return f.FeaturesDict({
      "image": f.Tensor(shape=(None, None, context_slices), dtype=np.int16,
                        encoding=f.Encoding.BYTES,
                        doc="HU [rows, cols, context]; channel c//2 is the slice"),
      "label": f.Tensor(shape=(None, None), dtype=np.uint8, encoding=f.Encoding.ZLIB,
                        doc="0 background, 1 liver, 2 tumour"),
      "case_number": f.Scalar(dtype=np.int32, doc="N of volume-N"),
      "slice_index": f.Scalar(dtype=np.int32),
      "num_slices": f.Scalar(dtype=np.int32),
      "spacing": f.Tensor(shape=(3,), dtype=np.float32, doc="mm per stored axis"),
      "liver_z_range": f.Tensor(shape=(2,), dtype=np.int32, doc="(-1, -1) without liver"),
      "tumours": f.Sequence({
          "component": f.Scalar(dtype=np.int32),
          "bbox": f.Tensor(shape=(4,), dtype=np.float32),
          "centre": f.Tensor(shape=(2,), dtype=np.float32),
          "area_mm2": f.Scalar(dtype=np.float32),
          "diameter_mm": f.Scalar(dtype=np.float32),
          "num_voxels": f.Scalar(dtype=np.int32),
          "stored_pixels": f.Scalar(dtype=np.int32),
      }),
  })


class Stopwatch:
  """Process CPU seconds by stage (`with stopwatch("resample"): ...`), for the benchmark."""

  def __init__(self):
    self.seconds: dict[str, float] = {}

  @contextlib.contextmanager
  def __call__(self, stage: str):
    start = time.process_time()
    try:
      yield
    finally:
      self.seconds[stage] = self.seconds.get(stage, 0.0) + time.process_time() - start


class _Encoder:
  """Encodes and serializes examples with the dataset's features (built once per process).

  Serialization is deterministic (map entries sorted by key): the protobuf runtime otherwise
  writes a tf.train.Example's feature map in an order that changes from process to process, so
  the same example would give different bytes in two workers.
  """

  _cache: dict[int, "_Encoder"] = {}

  def __init__(self, context_slices: int):
    from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
    self.features = example_features(context_slices)
    self.serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

  @classmethod
  def get(cls, context_slices: int) -> "_Encoder":
    if context_slices not in cls._cache:
      cls._cache[context_slices] = cls(context_slices)
    return cls._cache[context_slices]

  def __call__(self, example: dict) -> bytes:
    encoded = self.features.encode_example(example)
    return self.serializer.get_tf_example(encoded).SerializeToString(deterministic=True)


def write_case_shard(task: CaseTask, spec: ShardSpec) -> CaseSummary:
  """Writes `task`'s case as its shard and returns its summary.

  Raises lits.CaseError naming the file for a case that cannot be used.
  """
  watch = Stopwatch()
  case = lits.load_case(task.volume, task.segmentation, stages=watch)
  logging.info("prepare: case %d %s", task.number, case.image.shape)
  with watch("histograms"):  # at the case's own resolution
    hists = slices.intensity_histograms(case.image, case.labels)
  target_z = spec.spacing_mm[2] if spec.spacing_mm and len(spec.spacing_mm) == 3 else None
  with watch("resample"):  # along z first, when the grid has a slice spacing
    image, labels, spacing = slices.resample_case_depth(case.image, case.labels, case.spacing,
                                                        target_z)
  del case
  size = slices.stored_shape(image.shape, spacing, spec.image_size, spec.spacing_mm)
  examples = slices.case_examples(image, labels, spacing, task.number, spec.context_slices,
                                  size, stages=watch)
  del image, labels
  encode = _Encoder.get(spec.context_slices)
  tumours, num_bytes, num_slices, liver_z = [], 0, 0, (-1, -1)

  def records():
    nonlocal num_bytes, num_slices, liver_z
    for k, example in examples:
      for t in example["tumours"]:
        tumours.append([k, int(t["component"]), round(float(t["centre"][0]), 3),
                        round(float(t["centre"][1]), 3), round(float(t["diameter_mm"]), 3),
                        round(float(t["area_mm2"]), 3), int(t["stored_pixels"]),
                        *[round(float(v), 3) for v in t["bbox"]]])
      liver_z = tuple(int(v) for v in example["liver_z_range"])
      with watch("encode"):
        record = encode(example)
      num_bytes += len(record)
      num_slices += 1
      yield record

  write_records(task.shard, records(), spec.compression, watch)
  return CaseSummary(split=task.split, rank=task.rank, number=task.number,
                     num_slices=num_slices, liver_z=liver_z, size=tuple(int(s) for s in size),
                     tumours=tumours, histograms={k: intensity.pack(v) for k, v in hists.items()},
                     num_bytes=num_bytes, seconds=watch.seconds)


def write_records(path: str, records, compression: str, watch: Optional[Stopwatch] = None) -> None:
  """Writes `records` to the ArrayRecord file `path` atomically: under a temporary name in the
  same folder, renamed when complete (a remote path gets a local file copied up whole)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  watch = watch or Stopwatch()
  final = epath.Path(path)
  remote = "://" in os.fspath(path)
  if remote:
    fd, tmp = tempfile.mkstemp(suffix=".array_record")
    os.close(fd)
  else:
    tmp = os.path.join(os.path.dirname(path),
                       f"{INCOMPLETE_PREFIX}{uuid.uuid4().hex}.{final.name}")
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, f"{_GROUP},{compression}")
    try:
      for record in records:
        with watch("write"):
          writer.write(record)
    finally:
      with watch("write"):
        writer.close()
    with watch("write"):
      if remote:
        epath.Path(tmp).copy(final, overwrite=True)
      else:
        os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
