"""CT intensities: the network's input normalisation and the training data's HU statistics.

Two normalisations (`data.normalisation`):
  'window'         clip to `data.hu_window` and scale to [0, 1] (the paper: -60..140 HU);
  'ct_foreground'  nnU-Net's CT scheme: clip to the 0.5 and 99.5 percentiles of the training
                   split's foreground (liver and tumour) voxels, then subtract their mean and
                   divide by their standard deviation.
Both are one map x = (clip(hu, lo, hi) - offset) / scale, a `Normaliser`. The statistics come
from the per-case HU histograms that `prepare` stores in the dataset's metadata, so they are
exact (not sampled) and cost nothing at training time; a run records its normaliser in its
checkpoints, so inference on new volumes needs no dataset.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import numpy as np

from data_pipelines import settings, slices

NORMALISATIONS = ("window", "ct_foreground")
PERCENTILES = (0.5, 99.5)  # nnU-Net's foreground clip


@dataclasses.dataclass(frozen=True)
class Normaliser:
  """x = (clip(hu, lo, hi) - offset) / scale, float32; `name` says where it came from."""

  lo: float
  hi: float
  offset: float
  scale: float
  name: str = "window"

  def __post_init__(self):
    if not (np.isfinite([self.lo, self.hi, self.offset, self.scale]).all()
            and self.lo < self.hi and self.scale > 0):
      raise ValueError(f"normalisation needs finite lo < hi and scale > 0, got {self}")

  @property
  def range(self) -> tuple[float, float]:
    """The normalised values of lo and hi: every input value lies in this range."""
    return ((self.lo - self.offset) / self.scale, (self.hi - self.offset) / self.scale)

  def into(self, dst: np.ndarray, hu: np.ndarray) -> None:
    """dst[...] = the normalised `hu`, in float32, without temporaries beyond dst."""
    np.clip(hu, np.float32(self.lo), np.float32(self.hi), out=dst, dtype=np.float32,
            casting="unsafe")
    np.subtract(dst, np.float32(self.offset), out=dst)
    np.multiply(dst, np.float32(1.0 / self.scale), out=dst)

  def __call__(self, hu: np.ndarray) -> np.ndarray:
    out = np.empty(np.shape(hu), np.float32)
    self.into(out, hu)
    return out

  def jax(self, hu):
    """The same map in JAX (the device half of a batch)."""
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    x = jnp.clip(hu.astype(jnp.float32), self.lo, self.hi)
    return (x - np.float32(self.offset)) * np.float32(1.0 / self.scale)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Normaliser":
    return cls(lo=float(d["lo"]), hi=float(d["hi"]), offset=float(d["offset"]),
               scale=float(d["scale"]), name=str(d.get("name", "window")))

  def describe(self) -> str:
    if self.name == "window":
      return f"window {self.lo:g}..{self.hi:g} HU -> [0, 1]"
    return (f"{self.name}: clip {self.lo:g}..{self.hi:g} HU, (HU - {self.offset:.1f}) / "
            f"{self.scale:.1f}")


def window(lo: float, hi: float) -> Normaliser:
  """The paper's scaling: clip to [lo, hi] HU, map to [0, 1]."""
  return Normaliser(lo=float(lo), hi=float(hi), offset=float(lo), scale=float(hi) - float(lo))


def normalisation_name(data_cfg) -> str:
  name = data_cfg.get("normalisation", "window")
  if name not in NORMALISATIONS:
    raise ValueError(f"data.normalisation={name!r} is not one of {list(NORMALISATIONS)}")
  return name


# --------------------------------------------------------------------------- histograms

def pack(hist: np.ndarray) -> dict[str, Any]:
  """A HU histogram (one bin per HU from slices.HU_LO) as JSON: its non-zero span only."""
  nonzero = np.flatnonzero(hist)
  if len(nonzero) == 0:
    return dict(first_hu=0, counts=[])
  lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
  return dict(first_hu=lo + slices.HU_LO, counts=[int(c) for c in hist[lo:hi]])


def unpack(packed: Mapping[str, Any]) -> np.ndarray:
  hist = np.zeros(slices.HU_HI - slices.HU_LO + 1, np.int64)
  counts = np.asarray(packed.get("counts", []), np.int64)
  start = int(packed.get("first_hu", 0)) - slices.HU_LO
  hist[start:start + len(counts)] = counts
  return hist


def _percentile(hist: np.ndarray, q: float) -> float:
  """The q-th percentile (0-100) of the values a histogram counts (numpy's 'linear' rule)."""
  n = int(hist.sum())
  position = q / 100.0 * (n - 1)
  cumulative = np.cumsum(hist)
  lo = int(np.searchsorted(cumulative, np.floor(position) + 1))
  hi = int(np.searchsorted(cumulative, np.ceil(position) + 1))
  fraction = position - np.floor(position)
  return float(slices.HU_LO + lo + fraction * (hi - lo))


def foreground_stats(hists: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Percentiles (0.5, 50, 99.5), mean and standard deviation of the liver and tumour voxels
  together, and each class's voxel count."""
  fg = hists["liver"] + hists["tumour"]
  n = int(fg.sum())
  if n == 0:
    raise ValueError("the training split holds no liver or tumour voxel: the 'ct_foreground' "
                     "normalisation needs labelled foreground (use data.normalisation='window')")
  values = np.arange(slices.HU_LO, slices.HU_HI + 1, dtype=np.float64)
  mean = float((fg * values).sum() / n)
  std = float(np.sqrt(max((fg * (values - mean) ** 2).sum() / n, 0.0)))
  return dict(p0_5=_percentile(fg, PERCENTILES[0]), p50=_percentile(fg, 50.0),
              p99_5=_percentile(fg, PERCENTILES[1]), mean=mean, std=std,
              liver_voxels=int(hists["liver"].sum()), tumour_voxels=int(hists["tumour"].sum()))


def clipped_shares(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
  """The shares of the counted voxels below `lo` and above `hi` HU (clipped by a window)."""
  n = max(int(hist.sum()), 1)
  values = np.arange(slices.HU_LO, slices.HU_HI + 1)
  return float(hist[values < lo].sum() / n), float(hist[values > hi].sum() / n)


def split_histograms(metadata: Mapping[str, Any], split: str = "train"
                     ) -> Optional[dict[str, np.ndarray]]:
  """The summed liver and tumour HU histograms of a prepared split (None: an older dataset)."""
  packed = metadata.get("intensity", {}).get(split)
  if packed is None:
    return None
  return {k: unpack(packed[k]) for k in ("liver", "tumour")}


def normaliser_for(data_cfg, metadata: Optional[Mapping[str, Any]] = None) -> Normaliser:
  """The input normalisation `config.data` asks for, from the prepared dataset's training
  statistics where it needs them."""
  name = normalisation_name(data_cfg)
  lo, hi = settings.hu_window(data_cfg)
  if name == "window":
    return window(lo, hi)
  hists = split_histograms(metadata or {}, "train")
  if hists is None:
    raise ValueError("data.normalisation='ct_foreground' needs the training split's HU "
                     "statistics, which this prepared dataset lacks: prepare it again")
  stats = foreground_stats(hists)
  return Normaliser(lo=stats["p0_5"], hi=stats["p99_5"], offset=stats["mean"],
                    scale=max(stats["std"], 1e-3), name="ct_foreground")


def clipping_report(hists: Mapping[str, np.ndarray], normalisers: Mapping[str, Normaliser]
                    ) -> list[str]:
  """Lines saying which share of liver and tumour voxels each normaliser clips (below, above)."""
  lines = []
  for label, norm in normalisers.items():
    parts = []
    for name in ("liver", "tumour"):
      if hists[name].sum() == 0:
        continue
      below, above = clipped_shares(hists[name], norm.lo, norm.hi)
      parts.append(f"{name} {100 * below:.1f} % below, {100 * above:.1f} % above")
    lines.append(f"{label} ({norm.lo:g}..{norm.hi:g} HU) clips: {'; '.join(parts)}")
  return lines
