"""Joint image/label augmentation: parameters drawn on the host, pixels moved on the device.

Parameters (flips, rotation, scaling, intensity jitter, lesion contrast) are a pure function of
(seed, global example position) through a counter-based hash, so they never depend on threads,
processes or devices. Pixels move by one affine map per example that the image (bilinear) and the
label (nearest neighbour) share, which keeps them aligned by construction; the same map centres a
patch and pads with air where it leaves the slice.

The warp is a jitted JAX function (`make_finish`), run on the accelerator by
`curriculum_seg.device_feed` or, with `augment.on_device=False`, on the host CPU inside the
pipeline. A host warp costs several times the whole host pipeline's budget per slice, while an
accelerator warps a batch in microseconds (benchmarks/pipeline.py --warp), so the host only
draws parameters and the device does the pixel work.

Lesion contrast (`lesion_scale`, `lesion_invert`) is label-guided: inside the (warped) tumour
label, each voxel's difference from the slice's mean liver HU is multiplied by a factor whose
size is drawn from `lesion_scale` and whose sign is negative with probability `lesion_invert`,
so a hypo-dense training lesion may become a fainter, stronger or hyper-dense one (liver
lesions are either, depending on the tumour and the contrast phase). It applies to every context
channel through the centre slice's label, before windowing; slices without liver are unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from data_pipelines.labels import LIVER, TUMOUR

AIR_HU = -1024.0

# Hash streams: each random quantity of an example draws from its own stream.
STREAM_ANGLE = 1
STREAM_SCALE = 2
STREAM_FLIP_LR = 3
STREAM_FLIP_UD = 4
STREAM_INTENSITY_SCALE = 5
STREAM_INTENSITY_SHIFT = 6
STREAM_LESION_SCALE = 7
STREAM_LESION_INVERT = 8
STREAM_FLIP_DEPTH = 9

_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, counters, stream: int) -> np.ndarray:
  """Uniform floats in [0, 1), one per counter: a pure function of (seed, counter, stream).

  A counter-based generator (splitmix64 of the mixed key), so any element of a stream can be
  drawn without drawing the ones before it: the basis of stateless, resumable pipelines.
  """
  counters = np.asarray(counters, dtype=np.int64).astype(np.uint64)
  key = np.array([(int(seed) * 0x632BE59BD9B4E019 + int(stream) * 0xD1B54A32D192ED03) & _MASK64],
                 dtype=np.uint64)
  with np.errstate(over="ignore"):
    key = _splitmix64(key)
    h = _splitmix64(_splitmix64(counters ^ key) + key)
  return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  """What `config.augment` asks for, validated. Intensity values are in normalised units."""

  enabled: bool = False
  flip_lr: float = 0.0          # probability of mirroring columns
  flip_ud: float = 0.0          # probability of mirroring rows
  rotate_deg: float = 0.0       # uniform in [-rotate_deg, rotate_deg]
  scale_range: tuple[float, float] = (1.0, 1.0)  # uniform zoom factor (>1 magnifies)
  intensity_shift: float = 0.0  # uniform additive shift in [-s, s] after windowing
  intensity_scale: float = 0.0  # uniform factor in [1 - s, 1 + s] after windowing
  lesion_scale: tuple[float, float] = (1.0, 1.0)  # |factor| on a lesion's contrast to the liver
  lesion_invert: float = 0.0    # probability that the factor is negative (polarity flipped)
  on_device: bool = True        # warp in the device feed (True) or in the host pipeline
  flip_depth: float = 0.0       # probability of mirroring a 3-D row's slices

  def __post_init__(self):
    for key in ("flip_lr", "flip_ud", "flip_depth"):
      if not 0.0 <= getattr(self, key) <= 1.0:
        raise ValueError(f"augment.{key} must be a probability in [0, 1], got "
                         f"{getattr(self, key)}")
    if not 0.0 <= self.rotate_deg <= 180.0:
      raise ValueError(f"augment.rotate_deg must be in [0, 180], got {self.rotate_deg}")
    lo, hi = self.scale_range
    if not 0.0 < lo <= hi:
      raise ValueError(f"augment.scale_range must be (lo, hi) with 0 < lo <= hi, got "
                       f"{self.scale_range}")
    if not 0.0 <= self.intensity_shift <= 1.0:
      raise ValueError(f"augment.intensity_shift must be in [0, 1], got {self.intensity_shift}")
    if not 0.0 <= self.intensity_scale < 1.0:
      raise ValueError(f"augment.intensity_scale must be in [0, 1), got {self.intensity_scale}")
    lo, hi = self.lesion_scale
    if not 0.0 <= lo <= hi:
      raise ValueError(f"augment.lesion_scale must be (lo, hi) with 0 <= lo <= hi, got "
                       f"{self.lesion_scale}")
    if not 0.0 <= self.lesion_invert <= 1.0:
      raise ValueError(f"augment.lesion_invert must be a probability in [0, 1], got "
                       f"{self.lesion_invert}")

  @classmethod
  def from_config(cls, cfg: Any) -> "AugmentSpec":
    """From a ConfigDict or mapping; missing keys take the (identity) defaults."""
    if cfg is None:
      return cls()
    get = cfg.get
    scale = get("scale_range", (1.0, 1.0))
    lesion = get("lesion_scale", (1.0, 1.0))
    for key, pair in (("scale_range", scale), ("lesion_scale", lesion)):
      if len(tuple(pair)) != 2:
        raise ValueError(f"augment.{key} must be a pair (lo, hi), got {pair!r}")
    return cls(enabled=bool(get("enabled", False)), flip_lr=float(get("flip_lr", 0.0)),
               flip_ud=float(get("flip_ud", 0.0)), rotate_deg=float(get("rotate_deg", 0.0)),
               scale_range=(float(scale[0]), float(scale[1])),
               intensity_shift=float(get("intensity_shift", 0.0)),
               intensity_scale=float(get("intensity_scale", 0.0)),
               lesion_scale=(float(lesion[0]), float(lesion[1])),
               lesion_invert=float(get("lesion_invert", 0.0)),
               on_device=bool(get("on_device", True)),
               flip_depth=float(get("flip_depth", 0.0)))

  @property
  def geometric(self) -> bool:
    """True when pixels move (flips, rotation or scaling), i.e. a warp is needed."""
    return self.enabled and (self.flip_lr > 0 or self.flip_ud > 0 or self.rotate_deg > 0
                             or self.scale_range != (1.0, 1.0))

  @property
  def lesion_contrast(self) -> bool:
    """True when lesion contrast changes (the batches then carry a third intensity column)."""
    return self.enabled and (self.lesion_scale != (1.0, 1.0) or self.lesion_invert > 0)

  def footprint(self, out_size: int) -> int:
    """Side of the input square around a patch centre that any drawn map can sample."""
    if not self.geometric:
      return out_size
    theta = math.radians(min(self.rotate_deg, 45.0))
    spread = math.cos(theta) + math.sin(theta)
    half = (out_size / 2 + 1) * spread / self.scale_range[0] + 2
    return 2 * int(math.ceil(half))


def sample_params(spec: AugmentSpec, seed: int, positions) -> dict[str, np.ndarray]:
  """Per-example parameters for global example positions (float32/bool arrays [n])."""
  positions = np.asarray(positions, dtype=np.int64)
  n = len(positions)
  if not spec.enabled:
    zeros = np.zeros(n, np.float32)
    return dict(angle=zeros, scale=np.ones(n, np.float32), flip_lr=np.zeros(n, bool),
                flip_ud=np.zeros(n, bool), intensity_scale=np.ones(n, np.float32),
                intensity_shift=zeros, lesion_factor=np.ones(n, np.float32))
  u = lambda stream: counter_uniform(seed, positions, stream)  # noqa: E731
  lo, hi = spec.scale_range
  depth = dict(flip_depth=u(STREAM_FLIP_DEPTH) < spec.flip_depth) if spec.flip_depth else {}
  return dict(**depth,
      angle=np.radians((2 * u(STREAM_ANGLE) - 1) * spec.rotate_deg).astype(np.float32),
      scale=(lo + (hi - lo) * u(STREAM_SCALE)).astype(np.float32),
      flip_lr=u(STREAM_FLIP_LR) < spec.flip_lr,
      flip_ud=u(STREAM_FLIP_UD) < spec.flip_ud,
      intensity_scale=(1 + (2 * u(STREAM_INTENSITY_SCALE) - 1) * spec.intensity_scale
                       ).astype(np.float32),
      intensity_shift=((2 * u(STREAM_INTENSITY_SHIFT) - 1) * spec.intensity_shift
                       ).astype(np.float32),
      lesion_factor=(np.where(u(STREAM_LESION_INVERT) < spec.lesion_invert, -1.0, 1.0)
                     * (spec.lesion_scale[0] + (spec.lesion_scale[1] - spec.lesion_scale[0])
                        * u(STREAM_LESION_SCALE))).astype(np.float32))


def affine_matrices(params: Mapping[str, np.ndarray], out_centre: float,
                    in_centre: float) -> np.ndarray:
  """[n, 2, 3] float32 maps from output (row, col, 1) to input (row, col) pixel coordinates.

  input = in_centre + R(angle) . diag(flip_ud ? -1 : 1, flip_lr ? -1 : 1) / scale .
  (output - out_centre); the identity parameters give a pure translation by
  in_centre - out_centre, exact when that is an integer.
  """
  c, s = np.cos(params["angle"]), np.sin(params["angle"])
  fr = np.where(params["flip_ud"], -1.0, 1.0) / params["scale"]
  fc = np.where(params["flip_lr"], -1.0, 1.0) / params["scale"]
  m = np.stack([np.stack([c * fr, -s * fc], -1), np.stack([s * fr, c * fc], -1)], -2)
  t = in_centre - m @ np.array([out_centre, out_centre])
  return np.concatenate([m, t[..., None]], -1).astype(np.float32)


def intensity_pairs(params: Mapping[str, np.ndarray], lesion: bool = False) -> np.ndarray:
  """[n, 2] float32 (scale, shift) applied after windowing; with `lesion`, [n, 3] with the lesion
  contrast factor third (`AugmentSpec.lesion_contrast`; `make_finish` applies it)."""
  keys = ("intensity_scale", "intensity_shift") + (("lesion_factor",) if lesion else ())
  return np.stack([params[k] for k in keys], -1).astype(np.float32)


# ---- pixel ops (JAX; run jitted on the accelerator or the host CPU) ----

def _grid(out_size: int, affine):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  r = jnp.arange(out_size, dtype=jnp.float32)
  rows, cols = r[:, None], r[None, :]
  y = affine[0, 0] * rows + affine[0, 1] * cols + affine[0, 2]
  x = affine[1, 0] * rows + affine[1, 1] * cols + affine[1, 2]
  return y, x


def _take(image, yi, xi, fill):
  """image[yi, xi] ([H, W, ...]) with `fill` where (yi, xi) leaves the image."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
  flat = image.reshape((h * w,) + image.shape[2:])
  idx = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
  values = jnp.take(flat, idx, axis=0)
  inside = inside.reshape(inside.shape + (1,) * (image.ndim - 2))
  return jnp.where(inside, values, jnp.asarray(fill, values.dtype))


def warp_bilinear(image, affine, out_size: int, fill: float = AIR_HU):
  """Samples a [H, W, C] image at affine(output grid), bilinear; `fill` outside the image."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  image = image.astype(jnp.float32)
  y, x = _grid(out_size, affine)
  y0, x0 = jnp.floor(y), jnp.floor(x)
  wy, wx = (y - y0)[..., None], (x - x0)[..., None]
  y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
  top = _take(image, y0, x0, fill) * (1 - wx) + _take(image, y0, x0 + 1, fill) * wx
  bottom = _take(image, y0 + 1, x0, fill) * (1 - wx) + _take(image, y0 + 1, x0 + 1, fill) * wx
  return top * (1 - wy) + bottom * wy


def warp_nearest(label, affine, out_size: int, fill: int = 0):
  """Samples a [H, W] label map at affine(output grid), nearest neighbour; `fill` outside."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  y, x = _grid(out_size, affine)
  yi = jnp.floor(y + 0.5).astype(jnp.int32)
  xi = jnp.floor(x + 0.5).astype(jnp.int32)
  return _take(label, yi, xi, fill)


def scale_lesion_contrast(hu, label, factor):
  """HU [..., C] with every channel's voxels under the tumour label (`label` [...], [H, W] or
  [D, H, W]) moved to ref + factor * (hu - ref), ref the mean HU of the centre channel's liver
  voxels (label 1); unchanged where the row holds no liver."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  hu = hu.astype(jnp.float32)
  liver = (label == LIVER).astype(jnp.float32)
  count = liver.sum()
  ref = (hu[..., hu.shape[-1] // 2] * liver).sum() / jnp.maximum(count, 1.0)
  tumour = ((label == TUMOUR) & (count > 0))[..., None]
  return jnp.where(tumour, ref + factor * (hu - ref), hu)


def normalise(hu, normaliser):
  """HU -> the model's input (an intensity.Normaliser; the paper's window exactly as before:
  (hu - lo) / (hi - lo) clipped to [0, 1])."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if normaliser.name == "window" and normaliser.offset == normaliser.lo:
    lo, hi = float(normaliser.lo), float(normaliser.hi)
    return jnp.clip((hu.astype(jnp.float32) - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
  return normaliser.jax(hu)


def jitter_intensity(image, scale, shift, value_range=(0.0, 1.0)):
  """x * scale + shift on normalised values, clipped to the normaliser's range."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return jnp.clip(image * scale + shift, value_range[0], value_range[1])


def make_finish(normaliser, out_size: int,
                warp: bool) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
  """The device half of a training batch: warp, normalise, jitter; returns the model's batch.

  In: `image` int16 HU [b, F, F, C] ([b, D, F, F, C] for 3-D rows), `label` uint8 [b, F, F]
  ([b, D, F, F]), `mask` [b], `affine` [b, 2, 3] (in plane), `intensity` [b, 2] (scale, shift)
  or [b, 3] (+ the lesion contrast factor), optionally `flip_depth` [b] (3-D rows mirrored in
  depth). `normaliser`: an intensity.Normaliser. Out: `image` float32 [b, (D,) O, O, C],
  `label` int32, `mask` float32 [b]. Row-wise, so the result does not depend on how rows are
  sharded.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def one(image, label, affine, intensity, flip_depth):
    three_d = image.ndim == 4  # [D, F, F, C]: every slice warped alike, as channels
    if three_d:
      d, f, _, c = image.shape
      image = jnp.moveaxis(image, 0, 2).reshape(f, f, d * c)
      label = jnp.moveaxis(label, 0, 2)
    if warp:
      hu = warp_bilinear(image, affine, out_size)
      label = warp_nearest(label, affine, out_size)
    else:
      hu = image
    if three_d:
      hu = jnp.moveaxis(hu.reshape(hu.shape[0], hu.shape[1], d, c), 2, 0)
      label = jnp.moveaxis(label, 2, 0)
      hu, label = (jnp.where(flip_depth, x[::-1], x) for x in (hu, label))
    if intensity.shape[-1] == 3:
      hu = scale_lesion_contrast(hu, label, intensity[2])
    return (jitter_intensity(normalise(hu, normaliser), intensity[0], intensity[1],
                             normaliser.range), label)

  def finish(batch):
    flips = batch.get("flip_depth", jnp.zeros(batch["mask"].shape, bool))
    image, label = jax.vmap(one)(batch["image"], batch["label"], batch["affine"],
                                 batch["intensity"], flips)
    return dict(image=image, label=label.astype(jnp.int32),
                mask=batch["mask"].astype(jnp.float32))

  return finish
