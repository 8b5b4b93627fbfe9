"""Records: random access to a prepared split's slices, the decoder, pickling, errors."""

import pickle
import types
import zlib

import numpy as np
import pytest

from data_pipelines import records


@pytest.fixture(scope="session")
def data(tiny_dataset):
  return tiny_dataset


def test_records_are_the_stored_slices(data):
  builder, _ = data
  split = records.SplitRecords(builder, "train")
  source = builder.as_data_source("train")
  assert len(split) == split.num_examples == len(source) == 48
  assert (split.image_size, split.channels) == (32, 3)
  for k in (0, 17, 47):
    image, label = split[k]
    assert image.dtype == np.int16 and image.shape == (32, 32, 3)
    assert label.dtype == np.uint8 and label.shape == (32, 32)
    np.testing.assert_array_equal(image, source[k]["image"])
    np.testing.assert_array_equal(label, source[k]["label"])
  read = split.read([47, 0, 47])
  np.testing.assert_array_equal(read[0][1], source[47]["label"])
  np.testing.assert_array_equal(read[1][0], source[0]["image"])
  np.testing.assert_array_equal(split.labels([17])[0], source[17]["label"])
  with pytest.raises(IndexError):
    split[48]
  with pytest.raises(IndexError):
    split[-1]


def test_records_pickle_into_worker_processes(data):
  builder, _ = data
  split = records.SplitRecords(builder, "validation")
  first = split[3]
  copy = pickle.loads(pickle.dumps(split))  # readers are reopened where the copy reads
  for got, want in zip(copy[3], first):
    np.testing.assert_array_equal(got, want)


def test_a_missing_split_or_another_file_format_is_a_clear_error(data):
  builder, _ = data
  with pytest.raises(ValueError, match="split 'test' is not in the prepared dataset"):
    records.SplitRecords(builder, "test")
  instruction = types.SimpleNamespace(filename="/data/lits-train.tfrecord-00000-of-00001",
                                      skip=0, take=4)
  tfrecord = types.SimpleNamespace(data_dir="/data", info=types.SimpleNamespace(
      splits={"train": types.SimpleNamespace(file_instructions=[instruction])}))
  with pytest.raises(ValueError, match="file_format='array_record'"):
    records.SplitRecords(tfrecord, "train")


def _example(features):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  def feature(v):
    if isinstance(v, bytes):
      return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=v))
  return tf.train.Example(features=tf.train.Features(
      feature={k: feature(v) for k, v in features.items()})).SerializeToString()


def test_decoder_follows_the_features_encodings():
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  f = tfds.features
  rng = np.random.default_rng(0)
  image = rng.integers(-1024, 2000, (6, 6, 3)).astype(np.int16)
  label = rng.integers(0, 3, (6, 6)).astype(np.uint8)
  decode = records.SliceDecoder(f.FeaturesDict({
      "image": f.Tensor(shape=(6, 6, 3), dtype=np.int16, encoding=f.Encoding.BYTES),
      "label": f.Tensor(shape=(6, 6), dtype=np.uint8, encoding=f.Encoding.ZLIB)}))
  zlabel = zlib.compress(label.tobytes())
  for record in (_example(dict(image=image.tobytes(), label=zlabel, case_number=[3])),
                 _example(dict(aaa=b"\x0a\x05image", image=image.tobytes(), label=zlabel))):
    got_image, got_label = decode(record)
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)
    assert got_image.dtype == np.int16 and got_label.dtype == np.uint8
  # A dataset whose image was stored without encoding (an int64 list) decodes too.
  plain = records.SliceDecoder(f.FeaturesDict({
      "image": f.Tensor(shape=(6, 6, 3), dtype=np.int16, encoding=f.Encoding.NONE),
      "label": f.Tensor(shape=(6, 6), dtype=np.uint8, encoding=f.Encoding.ZLIB)}))
  got_image, _ = plain(_example(dict(image=image.ravel().astype(np.int64).tolist(),
                                     label=zlabel)))
  np.testing.assert_array_equal(got_image, image)
  with pytest.raises(ValueError, match="lacks the 'label' feature"):
    decode(_example(dict(image=image.tobytes())))
