"""The pipelines as assembled per stage: whole slices, tumour patches, liver crops and evaluation
on a tiny prepared dataset; the same global batches for any process, worker-process or thread
count; resume at a position; sampling as configured; crops; errors."""

import json
import os
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from data_pipelines import crops, lits_tfds, pipelines, samplers
from data_pipelines.index import SplitIndex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGMENT = dict(enabled=True, flip_lr=0.5, flip_ud=0.5, rotate_deg=15.0, scale_range=(0.9, 1.1),
               intensity_shift=0.05, intensity_scale=0.05, on_device=False)


@pytest.fixture(scope="session")
def data(tiny_dataset):
  return tiny_dataset


@pytest.fixture(scope="session")
def tumour_free(tiny_dataset_without_tumours):
  return tiny_dataset_without_tumours


def stage(**kw):
  base = dict(pipeline="whole", batch_size=8, patch_size=16, positive_fraction=0.25,
              component_sampling="component", patch_jitter=3)
  if kw.get("pipeline") == "liver_crop":
    base.update(crop_size=24, crop_margin=2)
  if kw.get("pipeline") == "blocks":  # whole stages on blocks, half of each batch on tumour
    kw = dict(kw, pipeline="whole")
    base.update(block_size=(16, 16), tumour_fraction=0.5, block_sampling="component")
  base.update(kw)
  return ml_collections.ConfigDict(base)


def augment_cfg(**kw):
  return ml_collections.ConfigDict(dict(AUGMENT, **kw))


def take(stream, n):
  out = [next(stream) for _ in range(n)]
  stream.close()
  return out


def assert_batches_equal(a, b, image_atol=0.0):
  """Bitwise, except `image` within `image_atol` (conftest.WARP_ATOL when another program made
  it)."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      if key == "image" and image_atol:
        np.testing.assert_allclose(x[key], y[key], rtol=0, atol=image_atol, err_msg=key)
      else:
        np.testing.assert_array_equal(x[key], y[key], err_msg=key)


@pytest.mark.parametrize("pipeline", ["whole", "patch", "liver_crop", "blocks"])
def test_process_shards_are_disjoint_cover_the_data_and_form_the_same_global_batches(
    data, pipeline, warp_atol):
  builder, data_cfg = data
  num_examples = SplitIndex.from_builder(builder, "train").num_examples
  reference = None
  for count in (1, 2, 4):
    streams = [pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(), stage(
        pipeline=pipeline), 0, p, count) for p in range(count)]
    positions, examples = [], []
    for s in streams:
      rows = [s.plan(b) for b in range(12)]
      positions.append(np.concatenate([r["position"] for r in rows]))
      examples.append(np.concatenate([r["example"] for r in rows]))
    # Disjoint shares that together are every position of the first 12 global batches.
    every = np.concatenate(positions)
    assert len(set(every.tolist())) == len(every) == 12 * 8
    assert sorted(every.tolist()) == list(range(12 * 8))
    if pipeline == "whole":  # every slice once per epoch
      by_position = np.empty(12 * 8, np.int64)
      by_position[every] = np.concatenate(examples)
      assert sorted(by_position[:num_examples].tolist()) == list(range(num_examples))
    # The processes' batches, concatenated in process order, are the one-process batches (each
    # process warps its own rows in a program of its shape: images to conftest.WARP_ATOL).
    batches = [take(s, 2) for s in streams]
    merged = [{k: np.concatenate([b[i][k] for b in batches]) for k in batches[0][i]}
              for i in range(2)]
    assert merged[0]["image"].shape[0] == 8
    if reference is None:
      reference = merged
    else:
      assert_batches_equal(merged, reference, image_atol=warp_atol)


def test_eval_shards_cover_each_slice_once_with_a_padded_last_batch(data):
  builder, data_cfg = data
  index = SplitIndex.from_builder(builder, "validation")
  expected = {(int(c), k) for c, _, n, _, _ in index.cases[:, :5] for k in range(n)}
  for count in (1, 2, 4):
    seen, lengths, padding = [], set(), 0
    for p in range(count):
      stream = pipelines.make_eval_pipeline(builder, data_cfg, "validation", 12, p, count)
      batches = list(stream)
      lengths.add(len(batches))
      for b in batches:
        real = b["mask"] == 1
        padding += int((~real).sum())
        assert (b["case_number"][~real] == -1).all() and (b["image"][~real] == 0).all()
        seen += list(zip(b["case_number"][real].tolist(), b["slice_index"][real].tolist()))
        assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
        assert 0 <= b["image"].min() and b["image"].max() <= 1
    assert len(lengths) == 1  # every process runs the same number of steps
    assert len(seen) == len(set(seen)) and set(seen) == expected
    assert padding == 12 * lengths.pop() - len(expected) > 0


def test_eval_batches_hold_the_stored_slices(data):
  builder, data_cfg = data
  source = builder.as_data_source("validation")
  batch = next(pipelines.make_eval_pipeline(builder, data_cfg, "validation", 4, 0, 1))
  for k in range(4):
    example = source[k]
    assert (example["case_number"], example["slice_index"]) == (
        batch["case_number"][k], batch["slice_index"][k])
    np.testing.assert_array_equal(batch["label"][k], example["label"])
    np.testing.assert_allclose(batch["image"][k], np.clip((example["image"] + 60.0) / 200, 0, 1),
                               atol=1e-6)


@pytest.mark.parametrize("pipeline", ["whole", "patch", "liver_crop", "blocks"])
def test_same_seed_same_batches_other_seed_other_batches(data, pipeline):
  builder, data_cfg = data
  make = lambda seed: pipelines.make_train_pipeline(  # noqa: E731
      builder, data_cfg, augment_cfg(), stage(pipeline=pipeline), seed, 0, 1)
  first = take(make(7), 3)
  assert_batches_equal(first, take(make(7), 3))
  other = take(make(8), 3)
  assert not np.array_equal(first[0]["image"], other[0]["image"])
  size = dict(whole=32, patch=16, liver_crop=24, blocks=16)[pipeline]
  assert first[0]["image"].shape == (8, size, size, 3) and first[0]["label"].shape == (8, size,
                                                                                      size)
  assert first[0]["image"].dtype == np.float32 and first[0]["label"].dtype == np.int32
  assert set(np.unique(first[0]["label"])) <= {0, 1, 2} and (first[0]["mask"] == 1).all()


def test_threads_do_not_change_the_batches(data):
  builder, data_cfg = data
  results = []
  for threads in (1, 3):
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.host_threads = threads
    results.append(take(pipelines.make_train_pipeline(
        builder, cfg, augment_cfg(), stage(pipeline="patch"), 0, 0, 1), 4))
  assert_batches_equal(*results)


@pytest.mark.slow
def test_worker_processes_do_not_change_the_batches(data):
  """Batches made in 1 or 2 Grain worker processes (spawned; the pipeline pickled into them)
  are those made in the training process, bitwise, and a stream with workers resumes at a
  position. Tested once, on the patch pipeline (the most transforms): workers take seconds to
  start."""
  builder, data_cfg = data

  def make(workers, start=0, pipeline="patch", **kw):
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.worker_count, cfg.host_threads = workers, 1
    return pipelines.make_train_pipeline(builder, cfg, augment_cfg(on_device=True), stage(
        pipeline=pipeline, **kw), 4, 0, 1, start=start)

  reference = take(make(0), 5)
  with make(1) as one:
    assert one.info["workers"] == 1
    assert_batches_equal([next(one) for _ in range(5)], reference)
  with make(2, start=2) as two:  # batches 2, 3, 4: workers make batches 2 + w, 2 + w + 2, ...
    assert_batches_equal([next(two) for _ in range(3)], reference[2:])
    assert two.position == 5
  # Blocks (placed once the label is read, in the worker) and 3-D blocks alike.
  for block in ((16, 16), (4, 16, 16)):
    reference = take(make(0, pipeline="blocks", block_size=block), 3)
    with make(2, pipeline="blocks", block_size=block) as two:
      assert_batches_equal([next(two) for _ in range(3)], reference)


_KILLED_TRAINER = textwrap.dedent("""
    import json, multiprocessing, sys, time
    import ml_collections
    from data_pipelines import lits_tfds, pipelines
    data = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    stage = ml_collections.ConfigDict(dict(pipeline="whole", batch_size=4))
    stream = pipelines.make_train_pipeline(lits_tfds.builder_for(data), data, None, stage, 0, 0, 1)
    next(stream)
    print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
    time.sleep(120)
    """)


@pytest.mark.slow
def test_worker_processes_leave_when_the_trainer_is_killed(data):
  """kill -9 of the training process does not leave its worker processes behind."""
  _, data_cfg = data
  cfg = dict(data_cfg.to_dict(), worker_count=1, host_threads=1)
  trainer = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINER, json.dumps(cfg)],
                             stdout=subprocess.PIPE, text=True, cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"))
  children = json.loads(trainer.stdout.readline())
  assert children, "no worker process was started"
  trainer.kill()
  trainer.wait()
  deadline = time.time() + 20
  while time.time() < deadline and any(_alive(pid) for pid in children):
    time.sleep(0.2)
  assert not any(_alive(pid) for pid in children)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is gone too
    return f.read().split(")")[-1].split()[0] != "Z"


def test_a_closed_stream_goes_on_at_its_position(data):
  builder, data_cfg = data
  make = lambda: pipelines.make_train_pipeline(  # noqa: E731
      builder, data_cfg, augment_cfg(), stage(pipeline="whole", batch_size=4), 3, 0, 1)
  reference = take(make(), 4)
  stream = make()
  first = [next(stream), next(stream)]
  stream.close()  # drops the batches made ahead
  assert stream.position == 2
  assert_batches_equal(first + take(stream, 2), reference)


@pytest.mark.parametrize("pipeline", ["whole", "patch", "liver_crop", "blocks"])
def test_resumed_stream_equals_the_uninterrupted_one(data, pipeline):
  builder, data_cfg = data
  make = lambda start=0: pipelines.make_train_pipeline(  # noqa: E731
      builder, data_cfg, augment_cfg(), stage(pipeline=pipeline, batch_size=4), 3, 0, 1,
      start=start)
  uninterrupted = take(make(), 9)  # crosses an epoch boundary of the 48 training slices
  interrupted = make()
  for _ in range(5):
    next(interrupted)
  saved = interrupted.position
  interrupted.close()
  assert saved == 5
  resumed = make(start=saved)
  assert resumed.position == 5
  assert_batches_equal(take(resumed, 4), uninterrupted[5:])


def test_patch_batches_hold_tumour_at_the_configured_fraction(data):
  builder, data_cfg = data
  stream = pipelines.make_train_pipeline(
      builder, data_cfg, augment_cfg(enabled=False), stage(
          pipeline="patch", batch_size=16, positive_fraction=0.25), 0, 0, 1)
  for b in range(6):
    plan = stream.plan(b)
    batch = next(stream)
    has_tumour = (batch["label"] == 2).any(axis=(1, 2))
    assert plan["positive"].sum() == 4
    np.testing.assert_array_equal(has_tumour, plan["positive"])
  stream.close()


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.3, 2), (1.0, 8)])
def test_positive_count_per_global_batch(data, fraction, expected):
  builder, data_cfg = data
  stream = pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(), stage(
      pipeline="patch", positive_fraction=fraction), 0, 0, 1)
  assert all(stream.plan(b)["positive"].sum() == expected for b in range(20))


def test_patches_are_centred_on_components_within_the_jitter(data):
  builder, data_cfg = data
  jitter = 3
  stream = pipelines.make_train_pipeline(
      builder, data_cfg, augment_cfg(enabled=False), stage(
          pipeline="patch", batch_size=16, positive_fraction=0.5, patch_jitter=jitter), 0, 0, 1)
  index = SplitIndex.from_builder(builder, "train")
  source = builder.as_data_source("train")
  offsets = []
  for b in range(4):
    plan, batch = stream.plan(b), next(stream)
    for k in np.flatnonzero(plan["positive"]):
      part = index.tumours[plan["part"][k]]
      assert part[0] == plan["example"][k]
      offset = plan["centre"][k] - part[2:4]
      assert np.abs(offset).max() <= jitter + 0.5
      offsets.append(offset)
      # The patch is the slice around that centre (pixel 8 of 16 is the centre).
      r, c = plan["centre"][k]
      label = np.pad(source[int(plan["example"][k])]["label"], 16)
      np.testing.assert_array_equal(batch["label"][k], label[r + 8:r + 24, c + 8:c + 24])
  offsets = np.array(offsets)
  assert np.abs(offsets).max() > 1.5  # the jitter is used, not zero
  stream.close()


def test_patches_crossing_the_border_are_padded_with_air(data):
  builder, data_cfg = data
  stream = pipelines.make_train_pipeline(
      builder, data_cfg, augment_cfg(enabled=False), stage(
          pipeline="patch", batch_size=16, patch_size=32, positive_fraction=1.0,
          patch_jitter=0), 0, 0, 1)
  batch, plan = next(stream), stream.plan(0)
  stream.close()
  for k in range(16):
    r, c = plan["centre"][k]
    outside = np.zeros((32, 32), bool)
    rows, cols = np.arange(32) + r - 16, np.arange(32) + c - 16
    outside[(rows < 0) | (rows >= 32)] = True
    outside[:, (cols < 0) | (cols >= 32)] = True
    assert outside.any()  # a 32-pixel patch of a 32-pixel slice always crosses the border
    assert (batch["image"][k][outside] == 0).all() and (batch["label"][k][outside] == 0).all()


def test_whole_pipeline_uses_the_selected_slices(data):
  builder, data_cfg = data
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  cfg.slice_selection, cfg.liver_margin = "liver", 0
  index = SplitIndex.from_builder(builder, "train")
  stream = pipelines.make_train_pipeline(builder, cfg, augment_cfg(), stage(), 0, 0, 1)
  selected = set(index.liver_range_slices(0).tolist())
  assert stream.info["examples"] == len(selected)
  assert {int(e) for b in range(10) for e in stream.plan(b)["example"]} <= selected


@pytest.mark.parametrize("fraction,batch_size", [(0.5, 8), (0.3, 8), (1.0, 4), (0.25, 12)])
def test_whole_batches_hold_the_configured_share_of_tumour_slices(data, fraction, batch_size):
  builder, data_cfg = data
  index = SplitIndex.from_builder(builder, "train")
  tumour_slices = set(np.unique(index.tumours[:, 0]).astype(int).tolist())
  stream = pipelines.make_train_pipeline(
      builder, data_cfg, augment_cfg(enabled=False),
      stage(batch_size=batch_size, tumour_fraction=fraction), 5, 0, 1)
  want = int(round(fraction * batch_size))
  assert stream.info["tumour_rows_per_batch"] == want
  rows_seen = np.zeros(batch_size, int)
  for b in range(4):
    plan = stream.plan(b)
    batch = next(stream)
    assert plan["tumour_row"].sum() == want
    rows_seen += plan["tumour_row"]
    forced = plan["example"][plan["tumour_row"]]
    assert set(forced.tolist()) <= tumour_slices
    assert (batch["label"][plan["tumour_row"]] == 2).any(axis=(1, 2)).all(), "whole slices"
    assert batch["image"].shape[1:3] == (32, 32)
  stream.close()
  if want < batch_size:
    assert (rows_seen > 0).sum() > want, "tumour rows move around the batch"
  # Every tumour slice comes once per tumour epoch.
  sampler = samplers.WholeSliceSampler(np.arange(index.num_examples), 5, batch_size,
                                        np.array(sorted(tumour_slices)), fraction)
  n = len(tumour_slices)
  epochs = [sampler.global_batch(b) for b in range(-(-3 * n // want))]
  forced = np.concatenate([g["example"][g["tumour_row"]] for g in epochs])
  for e in range(3):
    assert sorted(forced[e * n:(e + 1) * n].tolist()) == sorted(tumour_slices)


def test_oversampled_whole_batches_resume_and_split_over_processes(data, warp_atol):
  builder, data_cfg = data
  make = lambda p=0, n=1, start=0: pipelines.make_train_pipeline(  # noqa: E731
      builder, data_cfg, augment_cfg(), stage(batch_size=8, tumour_fraction=0.5), 2, p, n,
      start=start)
  reference = take(make(), 6)
  assert_batches_equal(take(make(start=3), 3), reference[3:])  # resume: same program, bitwise
  for count in (2, 4):
    shares = [take(make(p, count), 6) for p in range(count)]
    merged = [{k: np.concatenate([s[i][k] for s in shares]) for k in shares[0][i]}
              for i in range(6)]
    assert_batches_equal(merged, reference, image_atol=warp_atol)


def test_liver_crop_batches_hold_the_configured_share_of_tumour_slices(data, warp_atol):
  builder, data_cfg = data
  index = SplitIndex.from_builder(builder, "train")
  make = lambda p=0, n=1, start=0: pipelines.make_train_pipeline(  # noqa: E731
      builder, data_cfg, augment_cfg(), stage(pipeline="liver_crop", tumour_fraction=0.5), 4,
      p, n, start=start)
  stream = make()
  assert stream.info["tumour_fraction"] == 0.5 and stream.info["tumour_rows_per_batch"] == 4
  visible = set(index.tumour_slices().tolist())
  assert stream.info["tumour_slices"] == len(visible) > 0
  for b in range(20):
    plan = stream.plan(b)
    assert plan["tumour_row"].sum() == 4
    assert set(plan["example"][plan["tumour_row"]].tolist()) <= visible
  reference = take(stream, 4)
  assert_batches_equal(take(make(start=2), 2), reference[2:])
  shares = [take(make(p, 2), 4) for p in range(2)]
  merged = [{k: np.concatenate([s[i][k] for s in shares]) for k in shares[0][i]}
            for i in range(4)]
  assert_batches_equal(merged, reference, image_atol=warp_atol)


def test_liver_crop_tumour_oversampling_over_tumour_free_data_is_a_clear_error(tumour_free):
  builder, data_cfg = tumour_free
  with pytest.raises(ValueError, match=r"stage\.tumour_fraction=1\.0.*no\s+visible tumour"):
    pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(), stage(
        pipeline="liver_crop", tumour_fraction=1.0), 0, 0, 1)


def test_patch_pipeline_over_tumour_free_data_is_a_clear_error(tumour_free):
  builder, data_cfg = tumour_free
  assert SplitIndex.from_builder(builder, "train").tumours.shape == (0, 11)
  with pytest.raises(ValueError, match="no tumour.*positive_fraction"):
    pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(), stage(pipeline="patch"),
                                  0, 0, 1)
  with pytest.raises(ValueError, match=r"stage\.tumour_fraction=0\.5.*no\s+visible tumour"):
    pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(), stage(tumour_fraction=0.5),
                                  0, 0, 1)
  # Negatives only is a valid request.
  batch = take(pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(), stage(
      pipeline="patch", positive_fraction=0.0), 0, 0, 1), 1)[0]
  assert not (batch["label"] == 2).any()


@pytest.mark.parametrize("override,where,key", [
    (dict(pipeline="blocks"), "stage", "stage.pipeline"),
    (dict(batch_size=6), "stage", "stage.batch_size"),
    (dict(pipeline="patch", patch_size=64), "stage", "stage.patch_size"),
    (dict(pipeline="patch", patch_jitter=8), "stage", "stage.patch_jitter"),
    (dict(pipeline="patch", positive_fraction=1.5), "stage", "stage.positive_fraction"),
    (dict(pipeline="patch", component_sampling="lesion"), "stage", "stage.component_sampling"),
    (dict(hu_window=(140.0, -60.0)), "data", "data.hu_window"),
    (dict(slice_selection="tumour"), "data", "data.slice_selection"),
    (dict(liver_margin=-1), "data", "data.liver_margin"),
    (dict(flip_lr=2.0), "augment", "augment.flip_lr"),
    (dict(pipeline="liver_crop", crop_size=0), "stage", "stage.crop_size"),
    (dict(pipeline="liver_crop", crop_margin=-1), "stage", "stage.crop_margin"),
    (dict(tumour_fraction=1.2), "stage", "stage.tumour_fraction"),
    (dict(tumour_fraction=-0.1), "stage", "stage.tumour_fraction"),
    (dict(pipeline="liver_crop", tumour_fraction=1.5), "stage", "stage.tumour_fraction"),
    (dict(pipeline="patch", tumour_fraction=0.5), "stage", "stage.tumour_fraction"),
    (dict(worker_count=-1), "data", "data.worker_count"),
    (dict(host_threads=-2), "data", "data.host_threads"),
    (dict(prefetch_batches=-1), "data", "data.prefetch_batches"),
])
def test_bad_configs_name_their_key(data, override, where, key):
  builder, data_cfg = data
  data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  aug, st = augment_cfg(), stage()
  {"stage": st, "data": data_cfg, "augment": aug}[where].update(override)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    pipelines.make_train_pipeline(builder, data_cfg, aug, st, 0, 0, 4)


def test_eval_batch_not_divisible_by_processes(data):
  builder, data_cfg = data
  with pytest.raises(ValueError, match="divisible"):
    pipelines.make_eval_pipeline(builder, data_cfg, "validation", 6, 0, 4)


# ---- the cascade's liver crops ----------------------------------------------------------------

def test_liver_box_is_the_square_liver_box_with_margin():
  rng = np.random.default_rng(0)
  for _ in range(50):
    mask = np.zeros((40, 40, 5), bool)
    r0, c0 = rng.integers(0, 30, 2)
    r1, c1 = r0 + rng.integers(1, 10), c0 + rng.integers(1, 10)
    mask[r0:r1, c0:c1, rng.integers(0, 5)] = True
    mask[rng.integers(r0, r1), rng.integers(c0, c1), rng.integers(0, 5)] = True
    margin = int(rng.integers(0, 4))
    box = crops.liver_box(mask, margin)
    assert box == crops.liver_box(mask.any(axis=2), margin)  # 3-D: the box over all slices
    b0, b1, b2, b3 = box
    assert b2 - b0 == b3 - b1  # square
    assert b0 <= r0 - margin and b1 <= c0 - margin and b2 >= r1 + margin and b3 >= c1 + margin
    assert max(b2 - b0, b3 - b1) == max(r1 - r0, c1 - c0) + 2 * margin  # only the short side grows
  assert crops.liver_box(np.zeros((8, 8), bool), 2) is None
  assert crops.liver_box(np.pad(np.ones((2, 4), bool), 3), 1) == (1, 2, 7, 8)  # odd: extra after
  with pytest.raises(ValueError, match="margin"):
    crops.liver_box(np.ones((4, 4), bool), -1)


def test_crop_then_uncrop_returns_the_box():
  rng = np.random.default_rng(1)
  image = rng.integers(-200, 300, (2, 32, 32, 3)).astype(np.int16)
  whole, _ = crops.crop_slices(image, (0, 0, 32, 32), 32)
  np.testing.assert_array_equal(whole, image)  # the identity box is the identity
  labels = np.zeros((2, 32, 32), np.uint8)
  labels[:, 8:20, 10:22] = 1
  labels[:, 12:15, 13:16] = 2
  box = crops.liver_box(labels[0] >= 1, 2)
  assert box == (6, 8, 22, 24)
  _, cropped = crops.crop_slices(image, box, 48, labels=labels)  # upsampled x3
  assert cropped.shape == (2, 48, 48) and set(np.unique(cropped)) == {0, 1, 2}
  onehot = (cropped[..., None] == np.arange(3)).astype(np.float32)
  back = crops.uncrop_probabilities(onehot, box, 32)
  np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_array_equal(back.argmax(-1), labels)
  outside = np.ones((32, 32), bool)
  outside[box[0]:box[2], box[1]:box[3]] = False
  assert (back[:, outside, 0] == 1).all()


@pytest.fixture(scope="session")
def reference_boxes(data):
  """Each training case's liver box from the stored labels, and its slices (example ids)."""
  builder, _ = data
  source = builder.as_data_source("train")
  index = SplitIndex.from_builder(builder, "train")
  boxes = {}
  for row, (case, first, n, lo, hi) in enumerate(index.cases[:, :5]):
    labels = np.stack([source[int(first + k)]["label"] for k in range(n)], axis=-1)
    boxes[row] = crops.liver_box(labels >= 1, 2)
    assert [lo, hi] == (labels >= 1).any(axis=(0, 1)).nonzero()[0][[0, -1]].tolist()
  return boxes, source, index


def test_liver_crop_batches_are_the_liver_boxes_of_liver_slices(data, reference_boxes):
  builder, data_cfg = data
  boxes, source, index = reference_boxes
  stream = pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(enabled=False), stage(
      pipeline="liver_crop", batch_size=8, crop_size=24, crop_margin=2), 0, 0, 1)
  liver_slices = set(index.liver_range_slices(0).tolist())
  assert stream.info["examples"] == len(liver_slices) <= index.num_examples
  for b in range(4):
    plan, batch = stream.plan(b), next(stream)
    for k, example in enumerate(plan["example"]):
      assert int(example) in liver_slices
      stored = source[int(example)]
      box = boxes[int(index.case_rows([example])[0])]
      liver = stored["label"] >= 1  # the whole slice's liver lies inside the box
      inside = np.zeros_like(liver)
      inside[max(box[0], 0):box[2], max(box[1], 0):box[3]] = True
      assert not (liver & ~inside).any()
      image, label = crops.crop_slices(stored["image"][None], box, 24,
                                       labels=stored["label"][None])
      np.testing.assert_array_equal(batch["label"][k], label[0])  # image and label aligned
      np.testing.assert_allclose(batch["image"][k], np.clip((image[0] + 60.0) / 200, 0, 1),
                                 atol=1e-5)
  stream.close()


def test_liver_crop_eval_holds_the_training_crops(data):
  """Without augmentation a training row equals the evaluation stream's crop of that slice."""
  builder, data_cfg = data
  st = stage(pipeline="liver_crop", batch_size=4, crop_size=24, crop_margin=2)
  evaluation = list(pipelines.make_eval_pipeline(builder, data_cfg, "train", 8, 0, 1,
                                                 stage_cfg=st))
  index = SplitIndex.from_builder(builder, "train")
  assert sum(int(b["mask"].sum()) for b in evaluation) == len(index.liver_range_slices(0))
  by_slice = {}
  for b in evaluation:
    for k in np.flatnonzero(b["mask"]):
      by_slice[(int(b["case_number"][k]), int(b["slice_index"][k]))] = (b["image"][k],
                                                                          b["label"][k])
  stream = pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(enabled=False), st,
                                         0, 0, 1)
  for b in range(3):
    plan, batch = stream.plan(b), next(stream)
    cases, slices_ = index.case_and_slice(plan["example"])
    for k in range(4):
      image, label = by_slice[(int(cases[k]), int(slices_[k]))]
      np.testing.assert_array_equal(batch["label"][k], label)
      np.testing.assert_allclose(batch["image"][k], image, atol=1e-5)
  stream.close()


def test_lesion_contrast_changes_tumour_pixels_only(data):
  builder, data_cfg = data
  still = dict(enabled=True, flip_lr=0.0, flip_ud=0.0, rotate_deg=0.0, scale_range=(1.0, 1.0),
               intensity_shift=0.0, intensity_scale=0.0)

  def batches(**lesion):
    return take(pipelines.make_train_pipeline(
        builder, data_cfg, augment_cfg(**still, **lesion), stage(
            pipeline="patch", batch_size=16, positive_fraction=0.5), 0, 0, 1), 3)
  plain, inverted = batches(), batches(lesion_invert=1.0)
  changed = 0
  for a, b in zip(plain, inverted):
    np.testing.assert_array_equal(a["label"], b["label"])
    tumour = np.broadcast_to((a["label"] == 2)[..., None], a["image"].shape)
    np.testing.assert_array_equal(a["image"][~tumour], b["image"][~tumour])
    changed += int((np.abs(a["image"] - b["image"])[tumour] > 0.05).sum())
  assert changed > 0, "inverted lesions must look different"


# ---- whole-stage blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["slice", "component"])
def test_blocks_sit_on_liver_and_on_tumour_in_the_tumour_rows(data, sampling):
  """Unaugmented blocks are the stored slice around the planned centre (air outside); exactly
  round(f*B) rows of every global batch hold tumour, of the planned component with 'component'
  sampling; the other rows hold liver wherever their slice has some."""
  builder, data_cfg = data
  index = SplitIndex.from_builder(builder, "train")
  source = builder.as_data_source("train")
  stream = pipelines.make_train_pipeline(
      builder, data_cfg, augment_cfg(enabled=False),
      stage(pipeline="blocks", batch_size=8, block_sampling=sampling), 0, 0, 1)
  assert stream.info["block_size"] == [16, 16] and stream.info["tumour_rows_per_batch"] == 4
  picked = set()
  for b in range(6):
    plan, batch = stream.plan(b), next(stream)
    assert plan["tumour_row"].sum() == 4
    for k in range(8):
      label = source[int(plan["example"][k])]["label"]
      block = batch["label"][k]
      # the stored label around the block (centre - 8 .. centre + 8), background outside
      r, c = (int(v) for v in stream_centre(stream, plan, k, label))
      padded = np.pad(label, 16)
      np.testing.assert_array_equal(block, padded[r + 8:r + 24, c + 8:c + 24])
      if plan["tumour_row"][k]:
        assert (block == 2).any()
        if sampling == "component":
          part = index.tumours[plan["part"][k]]
          assert part[0] == plan["example"][k]
          r0, c0, r1, c1 = part[7:11]
          rows, cols = np.nonzero(block == 2)
          rows, cols = rows + r - 8, cols + c - 8
          assert ((rows >= np.floor(r0)) & (rows < np.ceil(r1)) & (cols >= np.floor(c0))
                  & (cols < np.ceil(c1))).any(), "the planned component is in the block"
          picked.add(int(plan["part"][k]))
        else:
          assert plan["part"][k] == -1
      elif (label >= 1).any():
        assert (block >= 1).any()
  stream.close()
  if sampling == "component":
    assert len(picked) > 3


def stream_centre(stream, plan, k, label):
  """The centre the block sampler places row k of a plan at (its public `place`)."""
  sampler = stream.sampler
  return sampler.place(label, {key: value[k] for key, value in plan.items()})


def test_block_offsets_keep_the_anchor_inside_and_the_block_inside_the_slice():
  rng = np.random.default_rng(0)
  for _ in range(2000):
    extent, block = rng.integers(1, 60), rng.integers(1, 40)
    anchor, u = rng.integers(0, extent), rng.random()
    offset = int(samplers.block_offsets([extent], [block], [anchor], [u])[0])
    if extent >= block:
      assert 0 <= offset <= extent - block and offset <= anchor < offset + block
    else:
      assert offset == -((block - extent) // 2)  # the slice centred in the block
  # u spans every allowed offset, lowest at 0 and highest near 1
  got = {int(samplers.block_offsets([50], [10], [20], [u])[0]) for u in np.linspace(0, 0.999, 99)}
  assert got == set(range(11, 21))


def test_blocks_larger_than_the_slice_hold_it_centred_in_air(data):
  builder, data_cfg = data
  stream = pipelines.make_train_pipeline(
      builder, data_cfg, augment_cfg(enabled=False),
      stage(pipeline="blocks", block_size=(48, 48), batch_size=4), 0, 0, 1)
  source = builder.as_data_source("train")
  batch, plan = next(stream), stream.plan(0)
  stream.close()
  for k in range(4):
    stored = source[int(plan["example"][k])]
    np.testing.assert_array_equal(batch["label"][k][8:40, 8:40], stored["label"])
    assert not batch["label"][k][:8].any() and (batch["image"][k][:8] == 0).all()


def test_blocks_over_slices_of_different_sizes(prepare_tiny, warp_atol):
  """A target-spacing dataset: slices differ in size per case; blocks, patches and liver crops
  batch, and the same global batches come from 1 or 2 processes."""
  builder, data_cfg = prepare_tiny("pipelines_spacing", size=48)
  cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  with cfg.unlocked():
    cfg.image_size, cfg.spacing_mm = None, (9.0, 9.0)
  builder = lits_tfds.prepare(cfg, log=lambda _: None)
  sizes = {tuple(r[5:7]) for r in builder.info.metadata["index"]["train"]["cases"]}
  assert len(sizes) > 1
  for kw in (dict(pipeline="blocks"), dict(pipeline="patch"), dict(pipeline="liver_crop")):
    one = take(pipelines.make_train_pipeline(builder, cfg, augment_cfg(), stage(**kw), 0, 0, 1), 2)
    two = [take(pipelines.make_train_pipeline(builder, cfg, augment_cfg(), stage(**kw), 0, p, 2),
                2) for p in range(2)]
    merged = [{k: np.concatenate([t[i][k] for t in two]) for k in two[0][i]} for i in range(2)]
    assert_batches_equal(merged, one, image_atol=warp_atol)
  with pytest.raises(ValueError, match="stage.block_size must be set"):
    pipelines.make_train_pipeline(builder, cfg, augment_cfg(), stage(), 0, 0, 1)


# ---- 3-D blocks and patches -------------------------------------------------------------------

def test_3d_blocks_are_consecutive_slices_of_a_case_placed_around_liver_and_tumour(data,
                                                                                   warp_atol):
  """A (D, H, W) block: D consecutive slices of one case around the planned slice (air past
  the case's ends), each cropped in plane alike; tumour rows hold tumour; the same global
  batches from 1 or 2 processes, and resumable."""
  builder, data_cfg = data
  index = SplitIndex.from_builder(builder, "train")
  source = builder.as_data_source("train")
  blocks = stage(pipeline="blocks", block_size=(6, 16, 16), batch_size=4)
  stream = pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(enabled=False), blocks,
                                         0, 0, 1)
  for b in range(3):
    plan, batch = stream.plan(b), next(stream)
    assert batch["image"].shape == (4, 6, 16, 16, 3) and batch["label"].shape == (4, 6, 16, 16)
    for k in range(4):
      label = source[int(plan["example"][k])]["label"]
      z, r, c = stream.sampler.place(label, {key: v[k] for key, v in plan.items()})
      case = int(index.case_rows([plan["example"][k]])[0])
      first, n = index.cases[case, 1:3]
      planned = int(plan["example"][k]) - first
      assert z - 3 <= planned < z + 3, "the planned slice is in the block"
      assert 0 <= z - 3 and z + 3 <= n, "a block fits inside its case when the case is deeper"
      for d in range(6):
        stored = np.pad(source[int(first + z - 3 + d)]["label"], 16)
        np.testing.assert_array_equal(batch["label"][k, d], stored[r + 8:r + 24, c + 8:c + 24])
      if plan["tumour_row"][k]:
        assert (batch["label"][k] == 2).any()
  stream.close()
  one = take(pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(flip_depth=0.5),
                                           blocks, 0, 0, 1), 3)
  two = [take(pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(flip_depth=0.5),
                                            blocks, 0, p, 2), 3) for p in range(2)]
  merged = [{key: np.concatenate([t[i][key] for t in two]) for key in two[0][i]}
            for i in range(3)]
  assert_batches_equal(merged, one, image_atol=warp_atol)
  resumed = pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(flip_depth=0.5),
                                          blocks, 0, 0, 1, start=2)
  assert_batches_equal(take(resumed, 1), one[2:])


def test_3d_patches_centre_on_tumour_in_depth_and_flip_in_depth(data):
  builder, data_cfg = data
  patch = stage(pipeline="patch", patch_size=(4, 16, 16), positive_fraction=1.0,
                patch_jitter=1, batch_size=4)
  plain = take(pipelines.make_train_pipeline(builder, data_cfg, augment_cfg(enabled=False),
                                             patch, 0, 0, 1), 3)
  for batch in plain:
    assert batch["image"].shape == (4, 4, 16, 16, 3)
    assert all((batch["label"][k] == 2).any() for k in range(4)), "positives hold tumour"
  flips = augment_cfg(enabled=True, flip_lr=0.0, flip_ud=0.0, rotate_deg=0.0,
                      scale_range=(1.0, 1.0), intensity_shift=0.0, intensity_scale=0.0,
                      flip_depth=1.0)
  flipped = take(pipelines.make_train_pipeline(builder, data_cfg, flips, patch, 0, 0, 1), 3)
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(b["label"], a["label"][:, ::-1])
    np.testing.assert_allclose(b["image"], a["image"][:, ::-1], atol=1e-6)
