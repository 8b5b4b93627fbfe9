"""Random access to a prepared split's slices: the ArrayRecord source and the record decoder.

The source is Grain's `ArrayRecordDataSource` over the split's shards (TFDS writes them with
group_size:1, so a record is one seek and one read; the readers are thread-safe and open lazily,
so the source pickles into Grain's worker processes). Records are the serialized
tf.train.Example that TFDS writes; `SliceDecoder` parses them as that message and decodes
`image` and `label` with the dataset's own TFDS features, so the stored encodings (raw bytes for
the image, zlib for the label) come from the dataset's description rather than from code here.
benchmarks/decode.py measures it against the alternatives (TFDS's full decoder, TensorFlow's
parser, and the hand-written protobuf walker this replaced).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

DECODED = ("image", "label")


def _split_shards(builder, split: str) -> tuple[list[str], int]:
  """The split's shards as 'path[start:stop]' read instructions, and its number of records."""
  try:
    instructions = builder.info.splits[split].file_instructions
  except Exception as e:  # noqa: BLE001 - TFDS raises several types here
    raise ValueError(f"split {split!r} is not in the prepared dataset {builder.data_dir} "
                     f"({e})") from e
  paths = [os.fspath(i.filename) for i in instructions]
  if not paths or not all(".array_record" in os.path.basename(p) for p in paths):
    raise ValueError(f"split {split!r} of {builder.data_dir} is not stored as ArrayRecord; "
                     f"the pipelines need data.file_format='array_record' (random access)")
  shards = [f"{p}[{i.skip}:{i.skip + i.take}]" for p, i in zip(paths, instructions)]
  return shards, sum(int(i.take) for i in instructions)


class SliceDecoder:
  """A serialized example -> (`image` int16 [H, W, C], `label` uint8 [H, W]).

  Parses the record as the tf.train.Example that TFDS wrote (TFDS's TensorFlow-free copy of
  the message, `tensorflow_datasets.proto.tf_example_pb2`) and decodes the two features with
  the dataset's own feature objects (`Tensor.decode_example_np`: raw bytes, zlib, or a plain
  int64 list), so the stored encodings come from the dataset's description. Other features
  are left unparsed: TFDS's full `deserialize_example_np` also decodes the tumour table and
  costs about twice as much (benchmarks/decode.py).
  """

  def __init__(self, features):
    self._features = {name: features[name] for name in DECODED}

  def __call__(self, record: bytes) -> tuple[np.ndarray, np.ndarray]:
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top
    stored = tf_example_pb2.Example.FromString(record).features.feature
    out = []
    for name in DECODED:
      # A tensor of dynamic shape (slices of any size) is stored as `name/value` + `name/shape`.
      dynamic = f"{name}/value" in stored
      key = f"{name}/value" if dynamic else name
      if key not in stored:
        raise ValueError(f"a record lacks the {name!r} feature")
      feature = stored[key]
      kind = feature.WhichOneof("kind")
      if kind == "bytes_list" and len(feature.bytes_list.value) == 1:
        value = feature.bytes_list.value[0]
      elif kind in ("int64_list", "float_list"):
        value = np.asarray(getattr(feature, kind).value, self._features[name].np_dtype)
      else:
        raise ValueError(f"feature {name!r} is stored as {kind}, not as one tensor")
      if dynamic:
        value = dict(value=value, shape=np.asarray(stored[f"{name}/shape"].int64_list.value))
      out.append(self._features[name].decode_example_np(value))
    return out[0], out[1]


class SplitRecords:
  """A split's slices by example index: `records[i]` -> (image, label); `read(indices)` reads
  several. `image_size` is the square slice size, None when sizes differ per case (a target
  spacing). Picklable (readers reopen lazily in the process that reads)."""

  def __init__(self, builder, split: str):
    import grain  # pylint: disable=g-import-not-at-top
    shards, count = _split_shards(builder, split)
    self.split = split
    self.source = grain.sources.ArrayRecordDataSource(shards)
    self.decode = SliceDecoder(builder.info.features)
    size = builder.builder_config.image_size
    self.image_size = None if size is None else int(size)  # None: sizes differ per case
    self.channels = int(builder.builder_config.context_slices)
    self.num_examples = count
    if len(self.source) != count:
      raise ValueError(f"split {split!r}: the shards hold {len(self.source)} records but the "
                       f"dataset info lists {count}: prepare the dataset again")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, example: int) -> tuple[np.ndarray, np.ndarray]:
    example = int(example)
    if not 0 <= example < self.num_examples:
      raise IndexError(f"example index {example} is not in [0, {self.num_examples})")
    return self.decode(self.source[example])

  def read(self, examples: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [self[e] for e in np.asarray(examples, dtype=np.int64).tolist()]

  def labels(self, examples: Sequence[int]) -> list[np.ndarray]:
    return [label for _, label in self.read(examples)]
