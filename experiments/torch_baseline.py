"""An independent PyTorch/MONAI baseline trained on our prepared data, for a wall-time budget.

The training recipe is checked against an independent implementation trained on the same cases
for the same wall time: this script. It shares with the JAX side only the data access and the
yardstick (the prepared dataset, the HU window, the training and validation slices, global
tumour Dice) and nothing of the model, loss, optimiser or samplers (`train` lists both). It runs
in two steps, because torch lives in its own virtualenv (never in .venv):

  # 1. export (the project's .venv): the prepared dataset's slices as .npy + index.json;
  #    prepares the TFDS dataset first if `config.data` names one that is not prepared yet
  .venv/bin/python experiments/torch_baseline.py export --config configs/synthetic.py \
      [--config.data.lits_dir=DIR --config.data.tfds_dir=DIR ...] --out EXPORT_DIR

  # 2. train (a torch virtualenv TORCH_VENV: python3 -m venv TORCH_VENV &&
  #    TORCH_VENV/bin/pip install torch==2.13.0 monai==1.6.1 numpy scipy)
  TORCH_VENV/bin/python experiments/torch_baseline.py train --data EXPORT_DIR \
      --seconds 300 --seed 0 [--eval_every_s 30 | --eval_every_steps N] \
      --out experiments/results/torch_baseline.json

`train` writes the curve (step, train seconds, validation Dice, mean per-slice Dice, predicted
and reference tumour pixels, training loss and batch Dice, load average) and the machine as
JSON and prints a table. The budget is training wall time (evaluation is timed apart); the
machine is usually shared, so read the steps per second with the recorded load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:  # the torch virtualenv does not install the project
  sys.path.insert(0, _ROOT)

from curriculum_seg import machine as machine_info  # noqa: E402  stdlib only: both venvs

FILES = ("train_images.npy", "train_labels.npy", "val_images.npy", "val_labels.npy")
INDEX = "index.json"
FORMAT = 1


# ---------------------------------------------------------------------------------------------
# export (the project's .venv): prepared TFDS dataset -> .npy slices + index.json
# ---------------------------------------------------------------------------------------------

def _read_windowed(reader, examples: np.ndarray, lo: float, hi: float, chunk: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Images [N, C, S, S] float32 windowed to [0, 1] and labels [N, S, S] uint8 of `examples`."""
  from data_pipelines import transforms  # pylint: disable=import-outside-toplevel
  s, c = reader.image_size, reader.channels
  images = np.empty((len(examples), c, s, s), np.float32)
  labels = np.empty((len(examples), s, s), np.uint8)
  hwc = np.empty((s, s, c), np.float32)
  for start in range(0, len(examples), chunk):
    for k, (image, label) in enumerate(reader.read(examples[start:start + chunk]), start):
      transforms.window_into(hwc, image, lo, hi)
      images[k] = hwc.transpose(2, 0, 1)
      labels[k] = label
  return images, labels


def export(config_spec: str, overrides: list[tuple[str, str]], out: str) -> dict:
  """Writes the training and validation slices of the dataset `config.data` names to `out`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from curriculum_seg import config_loading  # pylint: disable=import-outside-toplevel
  from data_pipelines import index as index_lib  # pylint: disable=import-outside-toplevel
  from data_pipelines import lits_tfds, pipelines, records  # pylint: disable=import-outside-toplevel

  config = config_loading.apply_overrides(config_loading.load_config_file(config_spec),
                                          overrides)
  data = config.data
  if data.get("spacing_mm", None) is not None or data.get("image_size", None) is None:
    raise SystemExit("torch_baseline.py trains on whole slices of one size: give "
                     "--config.data.spacing_mm=None --config.data.image_size=N")
  start = time.perf_counter()
  builder = lits_tfds.prepare(data)
  lo, hi = pipelines.hu_window(data)
  selection = data.get("slice_selection", "liver")
  margin = int(data.get("liver_margin", 10))

  splits = {}
  for split, name, how in (("train", "train", selection), ("validation", "val", "all")):
    index = index_lib.SplitIndex.from_builder(builder, split)
    reader = records.SplitRecords(builder, split)
    if reader.num_examples != index.num_examples:
      raise SystemExit(f"{split}: the index lists {index.num_examples} slices but the files "
                       f"hold {reader.num_examples}: prepare the dataset again")
    examples = index.select(how, margin)
    images, labels = _read_windowed(reader, examples, lo, hi)
    os.makedirs(out, exist_ok=True)
    np.save(os.path.join(out, f"{name}_images.npy"), images)
    np.save(os.path.join(out, f"{name}_labels.npy"), labels)
    case_number, slice_index = index.case_and_slice(examples)
    tumour_pixels = (labels == 2).sum(axis=(1, 2))
    entry = dict(examples=examples.tolist(), case_number=case_number.tolist(),
                 slice_index=slice_index.tolist(), tumour_pixels=tumour_pixels.tolist(),
                 cases=sorted({int(c) for c in index.cases[:, 0]}),
                 num_slices=len(examples), split_slices=int(index.num_examples),
                 selection=how)
    if split == "train":
      # Which selected slices hold a visible tumour part, as the JAX sampler's tumour_fraction
      # sees them (the index's parts with stored_pixels > 0).
      tumour = np.isin(examples, index.tumour_slices())
      entry["tumour_rows"] = np.flatnonzero(tumour).tolist()
      entry["tumour_rows_without_label_2"] = int((tumour & (tumour_pixels == 0)).sum())
      entry["label_2_rows_not_in_index"] = int((~tumour & (tumour_pixels > 0)).sum())
    splits[name] = entry

  info = dict(format=FORMAT, config=config_spec,
              overrides=[f"--config.{k}={v}" for k, v in overrides],
              lits_dir=os.fspath(data.lits_dir), tfds_dir=os.fspath(data.tfds_dir),
              dataset=os.fspath(builder.data_dir), image_size=int(data.image_size),
              context_slices=int(data.context_slices), hu_window=[lo, hi],
              slice_selection=selection, liver_margin=margin, train=splits["train"],
              val=splits["val"], export_seconds=round(time.perf_counter() - start, 1))
  with open(os.path.join(out, INDEX + ".tmp"), "w") as f:  # index.json last: export complete
    json.dump(info, f)
  os.replace(os.path.join(out, INDEX + ".tmp"), os.path.join(out, INDEX))
  train, val = splits["train"], splits["val"]
  print(f"exported to {out} from {builder.data_dir} in {info['export_seconds']} s")
  print(f"  train: {train['num_slices']} of {train['split_slices']} slices "
        f"(selection {selection!r}, margin {margin}) from cases {train['cases']}; "
        f"{len(train['tumour_rows'])} with tumour, {sum(train['tumour_pixels'])} tumour pixels")
  print(f"  validation: {val['num_slices']} slices (all) from cases {val['cases']}; "
        f"{sum(p > 0 for p in val['tumour_pixels'])} with tumour, "
        f"{sum(val['tumour_pixels'])} tumour pixels")
  if train["tumour_rows_without_label_2"] or train["label_2_rows_not_in_index"]:
    print(f"  note: {train['tumour_rows_without_label_2']} indexed tumour slices without label "
          f"2, {train['label_2_rows_not_in_index']} label-2 slices not in the index")
  return info


# ---------------------------------------------------------------------------------------------
# train (the torch virtualenv)
# ---------------------------------------------------------------------------------------------

class EpochShuffle:
  """An endless stream over `items`: a fresh permutation every epoch."""

  def __init__(self, items, rng: np.random.Generator):
    self.items = np.asarray(items, np.int64)
    self.rng = rng
    self.order = np.zeros(0, np.int64)
    self.at = 0

  def take(self, n: int) -> np.ndarray:
    out = []
    while n > 0:
      if self.at == len(self.order):
        self.order, self.at = self.items[self.rng.permutation(len(self.items))], 0
      got = self.order[self.at:self.at + n]
      out.append(got)
      self.at += len(got)
      n -= len(got)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class Sampler:
  """Rows of each batch: round(f * B) tumour-bearing slices, the rest from all slices."""

  def __init__(self, num_slices: int, tumour_rows, batch_size: int, tumour_fraction: float,
               seed: int):
    rng = np.random.default_rng(seed)
    self.num_tumour = int(round(tumour_fraction * batch_size)) if len(tumour_rows) else 0
    self.batch_size = batch_size
    self.all = EpochShuffle(np.arange(num_slices), rng)
    self.tumour = EpochShuffle(tumour_rows, rng)

  def next(self) -> np.ndarray:
    return np.concatenate([self.tumour.take(self.num_tumour),
                           self.all.take(self.batch_size - self.num_tumour)])


def _load(data: str):
  path = os.path.join(data, INDEX)
  if not os.path.exists(path):
    raise SystemExit(f"{path} does not exist: run `torch_baseline.py export` first")
  with open(path) as f:
    index = json.load(f)
  if index.get("format") != FORMAT:
    raise SystemExit(f"{path}: export format {index.get('format')}, expected {FORMAT}")
  arrays = [np.load(os.path.join(data, name)) for name in FILES]
  return index, arrays


def _load_averages() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def evaluate(model, images, targets, batch_size: int = 32) -> dict:
  """Global and mean per-slice tumour Dice of the argmax prediction over every slice."""
  import torch  # pylint: disable=import-outside-toplevel
  model.eval()
  inter = pred_sum = target_sum = 0
  dice_sum = 0.0
  with torch.no_grad():
    for start in range(0, len(images), batch_size):
      pred = model(images[start:start + batch_size]).argmax(dim=1) == 1
      ref = targets[start:start + batch_size]
      i = (pred & ref).sum(dim=(1, 2)).double()
      p, t = pred.sum(dim=(1, 2)).double(), ref.sum(dim=(1, 2)).double()
      dice_sum += float(torch.where(p + t > 0, 2 * i / (p + t).clamp(min=1), 1.0).sum())
      inter, pred_sum, target_sum = inter + int(i.sum()), pred_sum + int(p.sum()), \
          target_sum + int(t.sum())
  model.train()
  total = pred_sum + target_sum
  return dict(val_dice=2 * inter / total if total else 1.0,
              val_dice_mean=dice_sum / max(len(images), 1),
              val_pred_pixels=pred_sum, val_target_pixels=target_sum)


def train(args) -> dict:
  """Trains the baseline on an export for `args.seconds` of training wall time.

  Shared with the JAX side (data access and the yardstick, not the recipe): the export's cases,
  splits, in-plane size and context slices; the HU window (transforms.window_into); the training
  slices (SplitIndex.select) and which hold tumour; every validation slice; global tumour Dice
  over the validation slices (1 when both masks are empty), as the eval step computes it.

  Independent (PyTorch/MONAI): monai UNet(spatial_dims=2, channels=(8, 16, 32, 64), strides
  (2, 2, 2), num_res_units=2, instance norm), our default model's widths in MONAI's layout;
  DiceCELoss(softmax, to_onehot_y, batch=True), tumour vs everything else; Adam at 1e-3 without
  decay, schedule or clipping; batches of 8 slices, round(--tumour_fraction * 8) from shuffles
  of the tumour slices; random flips only; seeds via monai.utils.set_determinism. torch uses
  one thread per available core (--threads).
  """
  # OpenMP's worker threads spin while they wait (libgomp's default): on a shared machine a
  # spinning thread starves a descheduled sibling. Passive waiting (set OMP_WAIT_POLICY=ACTIVE
  # to measure the default) must be set before torch loads.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import monai  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from monai.losses import DiceCELoss  # pylint: disable=import-outside-toplevel
  from monai.networks.layers import Norm  # pylint: disable=import-outside-toplevel
  from monai.networks.nets import UNet  # pylint: disable=import-outside-toplevel

  cores = len(os.sched_getaffinity(0))
  torch.set_num_threads(args.threads or cores)
  monai.utils.set_determinism(seed=args.seed)
  index, (train_x, train_y, val_x, val_y) = _load(args.data)
  train_x = torch.from_numpy(train_x)
  train_t = torch.from_numpy((train_y == 2).astype(np.int64))  # tumour vs everything else
  val_x = torch.from_numpy(val_x)
  val_t = torch.from_numpy(val_y == 2)
  tumour_rows = index["train"]["tumour_rows"]

  model = UNet(spatial_dims=2, in_channels=train_x.shape[1], out_channels=2,
               channels=tuple(args.channels), strides=(2,) * (len(args.channels) - 1),
               num_res_units=2, norm=Norm.INSTANCE)
  loss_fn = DiceCELoss(softmax=True, to_onehot_y=True, batch=True)
  opt = torch.optim.Adam(model.parameters(), lr=args.lr)
  sampler = Sampler(len(train_x), tumour_rows, args.batch_size, args.tumour_fraction, args.seed)
  flip_gen = torch.Generator().manual_seed(args.seed + 1)

  def batch():
    rows = torch.from_numpy(sampler.next())
    x, t = train_x[rows], train_t[rows]
    flips = torch.rand(len(rows), 2, generator=flip_gen) < 0.5
    for dim, col in ((-1, 0), (-2, 1)):  # left-right, up-down
      m = flips[:, col]
      x = torch.where(m[:, None, None, None], x.flip(dim), x)
      t = torch.where(m[:, None, None], t.flip(dim), t)
    return x, t[:, None]

  machine = machine_info.describe("torch", "monai", "numpy")
  machine.update(omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                 torch_threads=torch.get_num_threads(),
                 torch_interop_threads=torch.get_num_interop_threads(), available_cores=cores)
  params = sum(p.numel() for p in model.parameters())
  print(f"torch {torch.__version__}, monai {monai.__version__}, {torch.get_num_threads()} "
        f"threads, {machine['cpu']}; load average {machine['load_average']}")
  print(f"data {args.data}: {len(train_x)} train slices ({len(tumour_rows)} with tumour), "
        f"{len(val_x)} validation slices ({int(val_t.any(dim=(1, 2)).sum())} with tumour); "
        f"UNet {tuple(args.channels)}, {params} parameters")

  curve = []
  losses: list[float] = []
  train_sums = np.zeros(3, np.int64)  # hard tumour I, P, T of training batches since last eval
  train_seconds = eval_seconds = 0.0
  step = 0

  def record():
    nonlocal eval_seconds
    t0 = time.perf_counter()
    scores = evaluate(model, val_x, val_t, args.eval_batch_size)
    seconds = time.perf_counter() - t0
    eval_seconds += seconds
    row = dict(step=step, train_seconds=round(train_seconds, 2), **scores,
               train_loss=round(float(np.mean(losses)), 5) if losses else None,
               train_dice=round(2 * int(train_sums[0]) / int(train_sums[1:].sum()), 5)
               if train_sums[1:].sum() else None,
               eval_seconds=round(seconds, 2), load_average=_load_averages())
    losses.clear()
    train_sums[:] = 0
    curve.append(row)
    print(f"step {step:6d}  train {train_seconds:7.1f} s  val Dice {row['val_dice']:.4f} "
          f"(per slice {row['val_dice_mean']:.4f}, {row['val_pred_pixels']} predicted / "
          f"{row['val_target_pixels']} tumour px)  train loss {row['train_loss']} Dice "
          f"{row['train_dice']}  "
          f"load {row['load_average'][0]}", flush=True)

  record()
  next_eval_s = args.eval_every_s
  model.train()
  stopped = "budget"
  while train_seconds < args.seconds and (not args.max_steps or step < args.max_steps):
    t0 = time.perf_counter()
    x, t = batch()
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = loss_fn(logits, t)
    loss.backward()
    opt.step()
    value = float(loss.detach())
    with torch.no_grad():
      pred, ref = logits.argmax(dim=1) == 1, t[:, 0] == 1
      train_sums += np.array([int((pred & ref).sum()), int(pred.sum()), int(ref.sum())])
    train_seconds += time.perf_counter() - t0
    step += 1
    losses.append(value)
    if not math.isfinite(value):
      stopped = "non-finite loss"
      break
    if args.eval_every_steps:
      due = step % args.eval_every_steps == 0
    else:
      due = train_seconds >= next_eval_s
      while next_eval_s <= train_seconds:
        next_eval_s += args.eval_every_s
    if due:
      record()
  if args.max_steps and step >= args.max_steps:
    stopped = "max_steps"
  if curve[-1]["step"] != step:
    record()

  marks = [m for m in range(args.mark_every, int(args.seconds) + 1, args.mark_every)]
  dice_at = {}
  for mark in marks:  # the first evaluation at or after each mark of training time
    row = next((r for r in curve if r["train_seconds"] >= mark - 1e-6), None)
    if row is not None:
      dice_at[str(mark)] = dict(step=row["step"], train_seconds=row["train_seconds"],
                                val_dice=row["val_dice"])
  best = max(curve, key=lambda r: r["val_dice"])
  loads = [r["load_average"][0] for r in curve]
  result = dict(
      benchmark="torch_baseline", data=os.path.abspath(args.data),
      export=dict((k, index[k]) for k in ("config", "overrides", "dataset", "image_size",
                                          "context_slices", "hu_window", "slice_selection",
                                          "liver_margin")),
      train_slices=len(train_x), train_tumour_slices=len(tumour_rows),
      val_slices=len(val_x), val_cases=index["val"]["cases"],
      settings=dict(seconds=args.seconds, seed=args.seed, batch_size=args.batch_size,
                    tumour_fraction=args.tumour_fraction, lr=args.lr,
                    channels=list(args.channels), strides=[2] * (len(args.channels) - 1),
                    num_res_units=2, norm="instance", loss="DiceCELoss(softmax=True, "
                    "to_onehot_y=True, batch=True)", optimizer="Adam", augmentation="flips",
                    eval_every_s=None if args.eval_every_steps else args.eval_every_s,
                    eval_every_steps=args.eval_every_steps or None, max_steps=args.max_steps),
      parameters=params, steps=step, train_seconds=round(train_seconds, 2),
      eval_seconds=round(eval_seconds, 2), steps_per_second=round(step / train_seconds, 3)
      if train_seconds else None, stopped=stopped, final_val_dice=curve[-1]["val_dice"],
      best=dict(step=best["step"], train_seconds=best["train_seconds"],
                val_dice=best["val_dice"]), dice_at_seconds=dice_at,
      load_average_during=dict(min=min(loads), max=max(loads), mean=round(
          float(np.mean(loads)), 2)),
      machine=machine, machine_end=dict(load_average=_load_averages()), curve=curve,
      command=" ".join([os.path.basename(sys.executable)] + sys.argv))
  machine_info.write_result(args.out, result)
  print()
  print("| train s | step | val tumour Dice (global) | per slice | train Dice | load 1 min |")
  print("|---|---|---|---|---|---|")
  for row in curve:
    train_dice = "" if row["train_dice"] is None else f"{row['train_dice']:.4f}"
    print(f"| {row['train_seconds']:.2f} | {row['step']} | {row['val_dice']:.4f} | "
          f"{row['val_dice_mean']:.4f} | {train_dice} | {row['load_average'][0]} |")
  print(f"\n{step} steps in {train_seconds:.1f} s of training ({result['steps_per_second']} "
        f"steps/s), {eval_seconds:.1f} s of evaluation; final val Dice "
        f"{result['final_val_dice']:.4f}, best {best['val_dice']:.4f} at step {best['step']}; "
        f"load average {result['load_average_during']}")
  if dice_at:
    print("Dice at " + ", ".join(f"{k} s: {v['val_dice']:.4f}" for k, v in dice_at.items()))
  return result


# ---------------------------------------------------------------------------------------------

def main(argv: Optional[list[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="prepared dataset -> .npy (run with the project's .venv)")
  ex.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py")
  ex.add_argument("--out", required=True, help="folder for the .npy files and index.json")
  tr = sub.add_parser("train", help="train and evaluate (run with the torch virtualenv)")
  tr.add_argument("--data", required=True, help="an export folder")
  tr.add_argument("--seconds", type=float, required=True, help="training wall-time budget")
  tr.add_argument("--seed", type=int, default=0)
  tr.add_argument("--out", default=os.path.join(_HERE, "results", "torch_baseline.json"))
  tr.add_argument("--eval_every_s", type=float, default=30.0,
                  help="evaluate every this many seconds of training time (default 30)")
  tr.add_argument("--eval_every_steps", type=int, default=0,
                  help="evaluate every N steps instead (0: use --eval_every_s)")
  tr.add_argument("--max_steps", type=int, default=0, help="also stop after N steps (0: no)")
  tr.add_argument("--mark_every", type=int, default=60,
                  help="report the Dice at every this many training seconds (default 60)")
  tr.add_argument("--batch_size", type=int, default=8)
  tr.add_argument("--eval_batch_size", type=int, default=32)
  tr.add_argument("--tumour_fraction", type=float, default=0.5)
  tr.add_argument("--lr", type=float, default=1e-3)
  tr.add_argument("--channels", type=int, nargs="+", default=[8, 16, 32, 64])
  tr.add_argument("--threads", type=int, default=0, help="torch threads (0: available cores)")
  if argv[:1] == ["export"]:  # `--config.x=y` / `--config.x y` overrides, as `curriculum-seg`
    from curriculum_seg import config_loading  # pylint: disable=import-outside-toplevel
    try:
      argv, overrides = config_loading.split_override_args(argv)
      args = parser.parse_args(argv)
      export(args.config, overrides, args.out)
    except config_loading.ConfigError as e:
      print(f"torch_baseline.py export: {e}", file=sys.stderr)
      return 2
    return 0
  args = parser.parse_args(argv)
  if args.command != "train":
    parser.error("the command comes first: torch_baseline.py export|train ...")
  if args.seconds <= 0 or args.eval_every_s <= 0 or args.mark_every <= 0:
    parser.error("--seconds, --eval_every_s and --mark_every must be > 0")
  if not 0.0 <= args.tumour_fraction <= 1.0:
    parser.error("--tumour_fraction must be in [0, 1]")
  train(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
