"""DeviceFeed: global sharded batches, exact positions, resume, finite streams, errors, and the
same global batches on 1, 2 and 4 devices."""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from curriculum_seg import sharding
from curriculum_seg.device_feed import DeviceFeed
from data_pipelines import pipelines

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGMENT = dict(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0, scale_range=(0.9, 1.1),
               intensity_shift=0.05, intensity_scale=0.05)


@pytest.fixture(scope="session")
def data(tiny_dataset):
  return tiny_dataset


def stage(**kw):
  return ml_collections.ConfigDict(dict(dict(
      pipeline="whole", batch_size=4, patch_size=16, positive_fraction=0.5,
      component_sampling="component", patch_jitter=2), **kw))


def stream(data, on_device=True, start=0, **kw):
  builder, data_cfg = data
  augment = ml_collections.ConfigDict(dict(AUGMENT, on_device=on_device))
  return pipelines.make_train_pipeline(builder, data_cfg, augment, stage(**kw), 1, 0, 1,
                                       start=start)


def to_numpy(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("pipeline", ["whole", "patch"])
def test_feed_gives_sharded_global_arrays_equal_to_the_host_finished_batches(data, pipeline,
                                                                            warp_atol):
  mesh = sharding.make_mesh(1)
  with DeviceFeed(stream(data, pipeline=pipeline), mesh) as feed:
    on_device = [next(feed) for _ in range(3)]
  host = stream(data, on_device=False, pipeline=pipeline)
  on_host = [next(host) for _ in range(3)]
  host.close()
  for got, want in zip(on_device, on_host):
    assert set(got) == {"image", "label", "mask"}
    for key, value in got.items():
      assert isinstance(value, jax.Array)
      assert value.sharding.is_equivalent_to(sharding.batch_sharding(mesh), value.ndim)
    # The warp compiled for the mesh and for the host CPU: two programs (see conftest.WARP_ATOL).
    np.testing.assert_allclose(np.asarray(got["image"]), want["image"], rtol=0, atol=warp_atol)
    np.testing.assert_array_equal(np.asarray(got["label"]), want["label"])
    np.testing.assert_array_equal(np.asarray(got["mask"]), want["mask"])


def test_position_is_the_next_consumed_batch_and_resuming_there_is_exact(data):
  mesh = sharding.make_mesh(1)
  with DeviceFeed(stream(data), mesh, buffer_size=3) as feed:
    reference = [to_numpy(next(feed)) for _ in range(6)]
  host = stream(data)
  feed = DeviceFeed(host, mesh, buffer_size=3)
  assert feed.position == 0
  next(feed), next(feed)
  deadline = time.time() + 20
  while host.position < 5 and time.time() < deadline:  # the thread runs ahead ...
    time.sleep(0.05)
  assert host.position >= 5
  assert feed.position == 2  # ... but the position is that of what the consumer has seen
  saved = feed.position
  feed.close()
  with DeviceFeed(stream(data, start=saved), mesh) as resumed:
    assert resumed.position == 2
    rest = [to_numpy(next(resumed)) for _ in range(4)]
    assert resumed.position == 6
  for got, want in zip(rest, reference[2:]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_eval_feed_is_finite_and_keeps_the_metadata(data):
  builder, data_cfg = data
  host = pipelines.make_eval_pipeline(builder, data_cfg, "validation", 6, 0, 1)
  with DeviceFeed(host, sharding.make_mesh(1)) as feed:
    batches = list(feed)
    with pytest.raises(StopIteration):
      next(feed)
  assert len(batches) == len(host) == 3
  assert set(batches[0]) == {"image", "label", "mask", "case_number", "slice_index"}
  assert float(np.asarray(batches[-1]["mask"]).sum()) < 6


class _Failing:
  position = 0
  finish = None

  def __next__(self):
    if self.position == 1:
      raise OSError("disk gone")
    self.position += 1
    return dict(image=np.zeros((2, 4, 4, 1), np.float32), mask=np.ones(2, np.float32))


def test_errors_in_the_host_stream_reach_the_consumer():
  feed = DeviceFeed(_Failing(), sharding.make_mesh(1))
  next(feed)
  with pytest.raises(OSError, match="disk gone"):
    next(feed)
  feed.close()


_MULTI_DEVICE = textwrap.dedent("""
    import json, sys
    import ml_collections, numpy as np
    from configs import synthetic
    from curriculum_seg import sharding
    from curriculum_seg.device_feed import DeviceFeed
    from data_pipelines import lits_tfds, pipelines
    args = json.loads(sys.argv[1])
    cfg = synthetic.get_config().data
    cfg.update(args["data"])
    builder = lits_tfds.builder_for(cfg)
    for n in (1, 2, 4):
      for pipeline in ("whole", "patch"):
        host = pipelines.make_train_pipeline(
            builder, cfg, ml_collections.ConfigDict(args["augment"]),
            ml_collections.ConfigDict(dict(args["stage"], pipeline=pipeline)), 5, 0, 1)
        with DeviceFeed(host, sharding.make_mesh(n)) as feed:
          batches = [next(feed) for _ in range(2)]
        assert len(batches[0]["image"].sharding.device_set) == n
        np.savez(f"{args['out']}/{pipeline}_{n}.npz",
                 **{f"{k}{i}": np.asarray(v) for i, b in enumerate(batches) for k, v in b.items()})
    """)


def test_global_batches_are_the_same_on_1_2_and_4_devices(data, tmp_path, warp_atol):
  _, data_cfg = data
  args = dict(data={k: data_cfg[k] for k in ("lits_dir", "tfds_dir", "image_size", "spacing_mm",
                                             "val_fraction")} | dict(
      synthetic=data_cfg.synthetic.to_dict(), hu_window=list(data_cfg.hu_window),
      slice_selection="all", host_threads=2), augment=dict(AUGMENT, on_device=True),
      stage=stage().to_dict(), out=str(tmp_path))
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="4", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  code = "import ml_collections\n" + _MULTI_DEVICE
  result = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for pipeline in ("whole", "patch"):
    one = np.load(tmp_path / f"{pipeline}_1.npz")
    for n in (2, 4):
      other = np.load(tmp_path / f"{pipeline}_{n}.npz")
      assert sorted(other.files) == sorted(one.files)
      for key in one.files:
        message = f"{pipeline} {n} {key}"
        if key.startswith("image"):  # the warp compiled per shard shape: see conftest.WARP_ATOL
          np.testing.assert_allclose(other[key], one[key], rtol=0, atol=warp_atol,
                                     err_msg=message)
        else:  # labels and masks: bitwise
          np.testing.assert_array_equal(other[key], one[key], err_msg=message)
