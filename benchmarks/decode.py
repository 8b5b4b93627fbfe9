"""Measures the cost per record of reading and decoding a prepared slice, option by option.

Prepares (once, cached under --data_dir) the synthetic benchmark dataset of benchmarks/
pipeline.py (8 cases of 64 slices, 3 context slices) at each --sizes in-plane size, then times
in this process, as CPU milliseconds per record (median over repeats; CPU time is less
sensitive than wall time to other jobs on a shared machine):

  read                      Grain's ArrayRecordDataSource[i] (one random-access record)
  decode options, each on records already read:
    records.SliceDecoder    the pipelines' decoder: tf.train.Example parsed with TFDS's
                            TF-free message, image and label decoded by the dataset's features
    tfds_parser_2_features  TFDS's ExampleParserNp restricted to image and label, then the
                            features' decode_example_np
    tfds_all_features       TFDS's features.deserialize_example_np (what
                            builder.as_data_source does: every feature, the tumour table too)
    tf_parse_single_example TensorFlow's tf.io.parse_single_example of the two features
    zlib_label_only         zlib.decompress of the stored label alone (inside every option)
  raw_layout                a layout with no parser: the image and label bytes as they are
                            in memory, one ArrayRecord record each (written to a temporary
                            file here): read + np.frombuffer, with the record sizes

  python benchmarks/decode.py [--sizes 256 512] [--out benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import machine_info  # noqa: E402  pylint: disable=wrong-import-position
import pipeline as pipeline_bench  # noqa: E402  pylint: disable=wrong-import-position


def _cpu_ms(fn, items, repeats: int) -> dict:
  fn(items[0])  # warm
  per = []
  for _ in range(repeats):
    t0 = time.process_time()
    for item in items:
      fn(item)
    per.append(1e3 * (time.process_time() - t0) / len(items))
  return dict(cpu_ms_per_record=statistics.median(per), repeats=[round(p, 4) for p in per])


def measure(size: int, data_dir: str, repeats: int) -> dict:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.core import example_parser  # pylint: disable=import-outside-toplevel
  from data_pipelines import lits_tfds, records  # pylint: disable=import-outside-toplevel

  builder = lits_tfds.prepare(pipeline_bench.data_config(data_dir, size), log=print)
  split = records.SplitRecords(builder, "train")
  indices = list(range(0, len(split), 3))
  raw = [split.source[i] for i in indices]
  features = builder.info.features
  c = split.channels
  out = dict(image_size=size, channels=c, records=len(indices),
             record_bytes=int(np.median([len(r) for r in raw])))

  out["read"] = _cpu_ms(lambda i: split.source[i], indices, repeats)
  ours = records.SliceDecoder(features)
  serialized = features.get_serialized_info()
  parser = example_parser.ExampleParserNp({k: serialized[k] for k in ("image", "label")})

  def tfds_parser(record):
    parsed = parser.parse_example(record)
    return (features["image"].decode_example_np(parsed["image"]),
            features["label"].decode_example_np(parsed["label"]))

  spec = {k: tf.io.FixedLenFeature([], tf.string) for k in ("image", "label")}

  def tf_parse(record):
    parsed = tf.io.parse_single_example(record, spec)
    return (np.frombuffer(parsed["image"].numpy(), np.int16).reshape(size, size, c),
            np.frombuffer(zlib.decompress(parsed["label"].numpy()), np.uint8).reshape(size,
                                                                                      size))

  labels = [ours(r)[1] for r in raw]
  stored_labels = [zlib.compress(label.tobytes()) for label in labels]  # as TFDS stores them
  out["decode"] = {
      "records.SliceDecoder": _cpu_ms(ours, raw, repeats),
      "tfds_parser_2_features": _cpu_ms(tfds_parser, raw, repeats),
      "tfds_all_features": _cpu_ms(features.deserialize_example_np, raw, repeats),
      "tf_parse_single_example": _cpu_ms(tf_parse, raw, repeats),
      "zlib_label_only": _cpu_ms(zlib.decompress, stored_labels, repeats),
  }
  for name in out["decode"]:  # every option gives the same arrays
    if name != "zlib_label_only":
      fn = dict(tfds_parser_2_features=tfds_parser, tf_parse_single_example=tf_parse,
                tfds_all_features=features.deserialize_example_np).get(name, ours)
      got = fn(raw[1])
      got = (got["image"], got["label"]) if isinstance(got, dict) else got
      want = ours(raw[1])
      assert all(np.array_equal(a, b) for a, b in zip(got, want)), name
  out["label_stored_bytes"] = int(np.median([len(z) for z in stored_labels]))

  # A layout with no parser: the arrays' bytes, image then label, in one record.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "raw.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    for record in raw:
      image, label = ours(record)
      writer.write(image.tobytes() + label.tobytes())
    writer.close()
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    image_bytes = size * size * c * 2

    def raw_read(k):
      record = reader.read([k])[0]
      return (np.frombuffer(record, np.int16, size * size * c).reshape(size, size, c),
              np.frombuffer(record, np.uint8, offset=image_bytes).reshape(size, size))

    out["raw_layout"] = dict(_cpu_ms(raw_read, list(range(len(raw))), repeats),
                             record_bytes=image_bytes + size * size)
    reader.close()
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default="/tmp/curriculum_seg_bench")
  parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "decode.json"))
  args = parser.parse_args(argv)
  load_before = os.getloadavg()
  results = [measure(size, args.data_dir, args.repeats) for size in args.sizes]
  machine = machine_info.describe("numpy", "grain", "array-record", "tensorflow-datasets",
                                  "tensorflow-cpu", "protobuf")
  machine["load_average_before"] = load_before
  for r in results:
    total = r["read"]["cpu_ms_per_record"] + r["decode"]["records.SliceDecoder"][
        "cpu_ms_per_record"]
    print(f"\n{r['image_size']}x{r['image_size']}x{r['channels']} slices: record "
          f"{r['record_bytes']} bytes (label stored in {r['label_stored_bytes']} bytes); "
          f"CPU-ms per record, medians of {args.repeats}")
    print(f"  {'read (ArrayRecord)':28s} {r['read']['cpu_ms_per_record']:8.3f}")
    for name, v in r["decode"].items():
      print(f"  decode {name:21s} {v['cpu_ms_per_record']:8.3f}")
    print(f"  {'read + SliceDecoder':28s} {total:8.3f}")
    print(f"  {'raw layout: read + view':28s} {r['raw_layout']['cpu_ms_per_record']:8.3f}  "
          f"(record {r['raw_layout']['record_bytes']} bytes)")
  print(f"load average before/after: {load_before} / {os.getloadavg()} on "
        f"{machine['cores']} cores")
  machine_info.write_result(args.out, dict(machine=machine, results=results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
