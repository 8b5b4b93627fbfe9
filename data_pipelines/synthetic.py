"""Synthetic LiTS-format CT cases with small liver tumours: a stand-in benchmark for LiTS.

Each case is an abdomen-like body in physical (mm) coordinates: air, subcutaneous fat, a muscle
wall, visceral fat, spine and ribs, aorta and vena cava, kidneys, a spleen and bowel loops of
liver-like density (hard negatives), and a contrast-enhanced liver with vessels holding 0-8
irregular hypo- or hyper-dense tumours, most under 10 mm. Labels are drawn on the voxel grid, then
the CT gets partial-volume blur and noise. Files are stored the way real LiTS files vary: in
several orientations and CT/label data types. Case i depends only on (seed, i), so a larger
`num_cases` extends a smaller one.

The field of view follows LiTS: in-plane spacing is drawn from LiTS's 0.56-1.0 mm range for a
512-pixel grid and scaled by 512 / size, so smaller grids show the same anatomy coarser; slice
thickness is drawn so the scan covers 160-400 mm where the slice count allows, within LiTS's
0.45-6.0 mm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import nibabel as nib
import numpy as np
from nibabel import orientations
from scipy import ndimage


GENERATOR_VERSION = 1
MANIFEST = "manifest.json"
OWNER_MARK = ".curriculum_seg_synthetic"  # marks a folder the generator made

# Storage variants seen across LiTS sites.
ORIENTATIONS = (("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"), ("R", "A", "I"),
                ("A", "R", "S"), ("P", "L", "I"))
CT_STORAGE = ("int16", "uint16_offset", "float32", "float32_scaled")
LABEL_STORAGE = ("uint8", "int16", "float32")


@dataclasses.dataclass(frozen=True)
class SynthConfig:
  """What the generator draws from. Sizes are the canonical (X, Y, Z) array shape."""

  size: int = 256                    # in-plane pixels (X = Y)
  slices: int = 64                   # Z
  lits_spacing_range: tuple[float, float] = (0.56, 1.0)   # mm at 512 pixels
  coverage_range_mm: tuple[float, float] = (160.0, 400.0)  # z extent of the scan
  max_tumours: int = 8
  no_tumour_fraction: float = 0.15
  small_fraction: float = 0.65       # share of tumours drawn from 3-10 mm
  diameter_range_mm: tuple[float, float] = (3.0, 40.0)
  small_limit_mm: float = 10.0
  noise_hu_range: tuple[float, float] = (6.0, 18.0)
  storage_variants: bool = True      # vary orientation and data types as LiTS files do
  compress: bool = True              # .nii.gz (False: .nii, as the LiTS downloads are)

  def __post_init__(self):
    if self.size < 32 or self.slices < 8:
      raise ValueError(f"synthetic size must be >= 32 and slices >= 8, got {self.size}x"
                       f"{self.slices}")
    if not 0 <= self.max_tumours <= 64:
      raise ValueError(f"max_tumours must be in 0..64, got {self.max_tumours}")


def _ellipsoid(coords, centre, semi, bbox_only=True):
  """Returns (slices, inside-mask, normalised radius^2) of an axis-aligned ellipsoid."""
  (xs, ys, zs), sp = coords
  sl = []
  for axis, (grid, c, s) in enumerate(zip((xs, ys, zs), centre, semi)):
    lo = np.searchsorted(grid, c - s, side="left")
    hi = np.searchsorted(grid, c + s, side="right")
    sl.append(slice(int(lo), int(max(hi, lo))))
  x = xs[sl[0], None, None]
  y = ys[None, sl[1], None]
  z = zs[None, None, sl[2]]
  r2 = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + (
      (z - centre[2]) / semi[2]) ** 2
  return tuple(sl), r2 <= 1.0, r2


class _Painter:
  """Holds one case's HU and label volumes and the geometry to draw into them."""

  def __init__(self, rng: np.random.Generator, cfg: SynthConfig):
    self.rng = rng
    self.cfg = cfg
    n, nz = cfg.size, cfg.slices
    inplane = rng.uniform(*cfg.lits_spacing_range) * 512.0 / n
    # Thickness covering 160-400 mm, within LiTS's 0.45-6 mm; few slices cannot cover that
    # much, so their range widens downwards (the scan then shows part of the abdomen).
    dz_hi = float(np.clip(cfg.coverage_range_mm[1] / nz, 0.45, 6.0))
    dz_lo = min(float(np.clip(cfg.coverage_range_mm[0] / nz, 0.45, 6.0)), 0.6 * dz_hi)
    dz = float(rng.uniform(dz_lo, dz_hi))
    self.spacing = (float(inplane), float(inplane), dz)
    self.shape = (n, n, nz)
    self.xs = (np.arange(n) - (n - 1) / 2) * inplane
    self.ys = (np.arange(n) - (n - 1) / 2) * inplane
    self.zs = (np.arange(nz) - (nz - 1) / 2) * dz
    self.coords = ((self.xs, self.ys, self.zs), self.spacing)
    self.hu = np.full(self.shape, -1000.0, dtype=np.float32)
    self.labels = np.zeros(self.shape, dtype=np.uint8)

  def paint(self, sl, mask, value):
    region = self.hu[sl]
    if np.isscalar(value):
      region[mask] = value
    else:
      region[mask] = value[mask]


def _draw_body(p: _Painter) -> dict[str, Any]:
  rng = p.rng
  fov = p.xs[-1] - p.xs[0]
  a = rng.uniform(0.36, 0.45) * fov
  b = a * rng.uniform(0.65, 0.8)
  cy = -rng.uniform(0.0, 0.06) * fov
  scale = a / 160.0
  x2 = p.xs[:, None]
  y2 = p.ys[None, :] - cy
  rings = []
  fat_t = rng.uniform(8, 25) * scale
  muscle_t = rng.uniform(8, 15) * scale
  for shrink, hu in ((0.0, rng.uniform(-110, -90)), (fat_t, rng.uniform(40, 60)),
                     (fat_t + muscle_t, rng.uniform(-100, -80))):
    inside = (x2 / (a - shrink)) ** 2 + (y2 / (b - shrink)) ** 2 <= 1.0
    rings.append(inside)
    p.hu[inside, :] = hu
  visceral = rings[-1]
  # Ribs: bright arcs just inside the muscle wall, in bands along z (posterior and lateral).
  angle = np.arctan2(y2, x2)
  ring_r = np.sqrt((x2 / (a - fat_t - 0.5 * muscle_t)) ** 2 + (y2 / (b - fat_t - 0.5 * muscle_t))
                   ** 2)
  rib_band = (np.abs(ring_r - 1.0) < 3.0 * scale / a) & (angle < 0.9) & (angle > -np.pi + 0.3)
  period = rng.uniform(22, 30) * scale
  phase = rng.uniform(0, period)
  rib_z = ((p.zs - phase) % period) < 0.35 * period
  p.hu[rib_band[:, :, None] & rib_z[None, None, :]] = rng.uniform(500, 900)
  # Spine: vertebral body with cortical shell, canal; aorta and IVC in front of it.
  spine_c = (0.0, cy - b + rng.uniform(35, 45) * scale)
  r_vert = rng.uniform(16, 22) * scale
  dist = np.sqrt((x2 - spine_c[0]) ** 2 + (p.ys[None, :] - spine_c[1]) ** 2)
  p.hu[dist <= r_vert, :] = rng.uniform(500, 800)
  p.hu[dist <= r_vert - 3 * scale, :] = rng.uniform(180, 260)
  canal = np.sqrt((x2 - spine_c[0]) ** 2 + (p.ys[None, :] - (spine_c[1] - r_vert - 8 * scale)) ** 2)
  p.hu[canal <= 8 * scale, :] = rng.uniform(500, 800)
  p.hu[canal <= 5 * scale, :] = rng.uniform(10, 30)
  spine = (dist <= r_vert) | (canal <= 8 * scale)
  vessels = []
  for dx, r, hu in ((-18, 11, rng.uniform(150, 220)), (22, 12, rng.uniform(110, 150))):
    c = (dx * scale, spine_c[1] + r_vert + 14 * scale)
    d = np.sqrt((x2 - c[0]) ** 2 + (p.ys[None, :] - c[1]) ** 2)
    p.hu[d <= r * scale, :] = hu
    vessels.append(d <= r * scale + 2)
  return dict(a=a, b=b, cy=cy, scale=scale, visceral=visceral,
              spine=spine | vessels[0] | vessels[1], spine_c=spine_c, r_vert=r_vert)


def _draw_organs(p: _Painter, body: dict[str, Any], liver_hu: float) -> None:
  """Kidneys, spleen and bowel: the last two of liver-like density (hard negatives)."""
  rng, s, a, b, cy = p.rng, body["scale"], body["a"], body["b"], body["cy"]
  zc = rng.uniform(-0.1, 0.1) * (p.zs[-1] - p.zs[0])
  allowed = body["visceral"] & ~body["spine"]
  for side in (-1, 1):  # kidneys, posterior either side of the spine
    c = (side * rng.uniform(55, 70) * s, body["spine_c"][1] + rng.uniform(5, 20) * s,
         zc - rng.uniform(30, 60) * s)
    semi = (rng.uniform(22, 28) * s, rng.uniform(28, 35) * s, rng.uniform(45, 60) * s)
    sl, inside, r2 = _ellipsoid(p.coords, c, semi)
    m = inside & allowed[sl[0], sl[1]][:, :, None]
    p.paint(sl, m, rng.uniform(150, 210))
    p.paint(sl, m & (r2 < 0.35), rng.uniform(30, 60))  # medulla / pelvis
  # Spleen on the patient's left (-x in RAS), posterior, liver-like density.
  c = (-rng.uniform(0.5, 0.62) * a, cy - rng.uniform(0.1, 0.35) * b, zc + rng.uniform(10, 40) * s)
  semi = (rng.uniform(22, 32) * s, rng.uniform(40, 55) * s, rng.uniform(40, 60) * s)
  sl, inside, _ = _ellipsoid(p.coords, c, semi)
  p.paint(sl, inside & allowed[sl[0], sl[1]][:, :, None], liver_hu + rng.uniform(-12, 12))
  # Bowel: loops of contrast-filled wall with gas, anterior and inferior.
  for _ in range(rng.integers(4, 9)):
    c = (rng.uniform(-0.5, 0.3) * a, cy + rng.uniform(0.0, 0.6) * b,
         zc - rng.uniform(0, 0.5) * (p.zs[-1] - p.zs[0]))
    semi = tuple(rng.uniform(12, 25, size=3) * s)
    sl, inside, r2 = _ellipsoid(p.coords, c, semi)
    m = inside & allowed[sl[0], sl[1]][:, :, None]
    p.paint(sl, m, liver_hu + rng.uniform(-35, 25))
    if rng.random() < 0.6:
      p.paint(sl, m & (r2 < rng.uniform(0.1, 0.4)), -1000.0 + rng.uniform(0, 100))


def _liver_mask(p: _Painter, body: dict[str, Any]) -> tuple[tuple[slice, ...], np.ndarray]:
  """A right-sided liver: an ellipsoid widening upwards, tapering medially, softly deformed."""
  rng, s, a, b, cy = p.rng, body["scale"], body["a"], body["b"], body["cy"]
  zext = p.zs[-1] - p.zs[0]
  c = (rng.uniform(0.38, 0.45) * a, cy + rng.uniform(0.0, 0.15) * b,
       rng.uniform(-0.12, 0.12) * zext + 0.1 * zext)
  semi = (rng.uniform(62, 75) * s, rng.uniform(60, 75) * s, rng.uniform(70, 90) * s)
  sl, _, _ = _ellipsoid(p.coords, c, tuple(1.3 * v for v in semi))
  x = p.xs[sl[0], None, None] - c[0]
  y = p.ys[None, sl[1], None] - c[1]
  z = p.zs[None, None, sl[2]] - c[2]
  widen = 1.0 + 0.25 * np.clip(z / semi[2], -1, 1)
  taper = 1.0 - 0.35 * np.clip(-x / semi[0], 0, 1)  # thinner left lobe
  f = (x / (semi[0] * widen)) ** 2 + (y / (semi[1] * taper)) ** 2 + (z / semi[2]) ** 2
  for _ in range(3):
    k = rng.normal(size=3) / np.array(semi) * rng.uniform(1.5, 3.0)
    f = f + rng.uniform(0.04, 0.1) * np.sin(k[0] * x + k[1] * y + k[2] * z + rng.uniform(0, 6.3))
  allowed = body["visceral"][sl[0], sl[1]][:, :, None] & ~body["spine"][sl[0], sl[1]][:, :, None]
  return sl, (f <= 1.0) & allowed


def _draw_vessels(p: _Painter, liver_sl, liver: np.ndarray, liver_hu: float, scale: float) -> None:
  """Contrast-filled hepatic and portal vessel segments inside the liver (label stays liver)."""
  rng = p.rng
  idx = np.argwhere(liver)
  if len(idx) < 10:
    return
  x = p.xs[liver_sl[0], None, None]
  y = p.ys[None, liver_sl[1], None]
  z = p.zs[None, None, liver_sl[2]]
  hu = liver_hu + rng.uniform(40, 90)
  region = p.hu[liver_sl]
  for _ in range(rng.integers(4, 9)):
    i0, i1 = idx[rng.integers(len(idx))], idx[rng.integers(len(idx))]
    a0 = np.array([p.xs[liver_sl[0]][i0[0]], p.ys[liver_sl[1]][i0[1]], p.zs[liver_sl[2]][i0[2]]])
    a1 = np.array([p.xs[liver_sl[0]][i1[0]], p.ys[liver_sl[1]][i1[1]], p.zs[liver_sl[2]][i1[2]]])
    d = a1 - a0
    L2 = float(d @ d) + 1e-6
    t = np.clip(((x - a0[0]) * d[0] + (y - a0[1]) * d[1] + (z - a0[2]) * d[2]) / L2, 0, 1)
    dist2 = (x - a0[0] - t * d[0]) ** 2 + (y - a0[1] - t * d[1]) ** 2 + (z - a0[2] - t * d[2]) ** 2
    r = rng.uniform(1.5, 5.0) * scale
    region[(dist2 <= r * r) & liver] = hu


def _draw_tumours(p: _Painter, liver_sl, liver: np.ndarray, liver_hu: float) -> list[dict]:
  """Places non-touching irregular tumours wholly inside the liver; returns their records."""
  rng, cfg = p.rng, p.cfg
  if cfg.max_tumours == 0 or rng.random() < cfg.no_tumour_fraction:
    return []
  wanted = int(rng.integers(1, cfg.max_tumours + 1))
  lo, hi = cfg.diameter_range_mm
  sp = np.array(p.spacing)
  offset = np.array([s.start for s in liver_sl])
  liver_idx = np.argwhere(liver)
  placed: list[dict] = []
  tumour_region = p.labels[liver_sl]
  hu_region = p.hu[liver_sl]
  for _ in range(wanted):
    if rng.random() < cfg.small_fraction:
      diameter = math.exp(rng.uniform(math.log(lo), math.log(min(cfg.small_limit_mm, hi))))
    else:
      diameter = math.exp(rng.uniform(math.log(min(cfg.small_limit_mm, hi)), math.log(hi)))
    r = diameter / 2
    for _attempt in range(40):
      centre_idx = liver_idx[rng.integers(len(liver_idx))]
      centre = centre_idx * sp
      if any(np.linalg.norm(centre - t["_centre"]) < r + t["_r"] + 2 * sp.max() + 1.0
             for t in placed):
        continue
      half = np.ceil((1.35 * r + sp) / sp).astype(int)
      lo_i = centre_idx - half
      hi_i = centre_idx + half + 1
      if np.any(lo_i < 0) or np.any(hi_i > np.array(liver.shape)):
        continue
      box = tuple(slice(int(a), int(b)) for a, b in zip(lo_i, hi_i))
      rel = [(np.arange(b.start, b.stop) - c) * s for b, c, s in zip(box, centre_idx, sp)]
      dx, dy, dz = rel[0][:, None, None], rel[1][None, :, None], rel[2][None, None, :]
      dist = np.sqrt(dx ** 2 + dy ** 2 + dz ** 2)
      with np.errstate(invalid="ignore", divide="ignore"):
        u = np.stack([dx / dist, dy / dist, dz / dist]) * (dist > 0)
      radius = np.full(dist.shape, r)
      for _k in range(3):  # irregular outline: low-order lobes on the sphere
        w = rng.normal(size=3)
        radius = radius * (1 + rng.uniform(0.05, 0.15) * np.cos(
            rng.integers(1, 4) * np.tensordot(w / np.linalg.norm(w), u, 1) + rng.uniform(0, 6.3)))
      inside = dist <= radius
      inside[tuple(half)] = True  # a tumour always holds the voxel at its centre
      comp, _ = ndimage.label(inside)
      inside = comp == comp[tuple(half)]
      margin = ndimage.binary_dilation(inside)
      if not np.all(liver[box][margin]):
        continue
      kind = "hypo" if rng.random() < 0.7 else "hyper"
      contrast = -rng.uniform(30, 75) if kind == "hypo" else rng.uniform(30, 70)
      texture = rng.normal(0, 6, size=inside.shape)
      values = liver_hu + contrast + texture
      if diameter > 20 and kind == "hypo":  # necrotic core
        values = np.where(dist < 0.5 * r, liver_hu - rng.uniform(70, 100), values)
      hu_region[box][inside] = values[inside].astype(np.float32)
      tumour_region[box][inside] = 2
      voxels = int(inside.sum())
      ijk = (centre_idx + offset).tolist()
      placed.append(dict(
          _centre=centre, _r=r, centre_voxel=[int(v) for v in ijk], kind=kind,
          diameter_mm=round(diameter, 3), voxels=voxels,
          equivalent_diameter_mm=round((6 * voxels * float(np.prod(sp)) / math.pi) ** (1 / 3), 3)))
      break
  return placed


def generate_case(seed: int, index: int, cfg: SynthConfig = SynthConfig()) -> dict[str, Any]:
  """Draws case `index` for `seed`: canonical (RAS) HU float32 and labels, spacing, tumours."""
  rng = np.random.default_rng([seed, index])
  p = _Painter(rng, cfg)
  body = _draw_body(p)
  liver_hu = rng.uniform(85, 135)
  _draw_organs(p, body, liver_hu)
  liver_sl, liver = _liver_mask(p, body)
  p.paint(liver_sl, liver, liver_hu)
  p.labels[liver_sl][liver] = 1
  _draw_vessels(p, liver_sl, liver, liver_hu, body["scale"])
  tumours = _draw_tumours(p, liver_sl, liver, liver_hu)
  # Partial-volume blur (thicker slices blur less in voxels), then CT noise.
  ndimage.gaussian_filter(p.hu, sigma=(0.7, 0.7, 0.35), output=p.hu, truncate=3.0)
  noise = rng.uniform(*cfg.noise_hu_range)
  p.hu += rng.standard_normal(size=p.shape, dtype=np.float32) * np.float32(noise)
  hu = np.clip(np.rint(p.hu), -1024, 3071).astype(np.int16)
  for t in tumours:
    t.pop("_centre"), t.pop("_r")
  return dict(image=hu, labels=p.labels, spacing=p.spacing, tumours=tumours,
              noise_hu=round(float(noise), 3))


def _storage(rng: np.random.Generator, cfg: SynthConfig) -> tuple[tuple[str, ...], str, str]:
  if not cfg.storage_variants:
    return ("R", "A", "S"), "int16", "uint8"
  return (ORIENTATIONS[rng.integers(len(ORIENTATIONS))], CT_STORAGE[rng.integers(len(CT_STORAGE))],
          LABEL_STORAGE[rng.integers(len(LABEL_STORAGE))])


def to_nifti(image: np.ndarray, spacing, axcodes=("R", "A", "S"), storage: str = "int16",
             is_label: bool = False, origin=None) -> nib.Nifti1Image:
  """Stores a canonical (RAS) array as a NIfTI image in another orientation and data type.

  `load_case` on the result returns `image` exactly: this is how the tests build every storage
  variant of one case.
  """
  shape = image.shape
  canonical = np.diag([*spacing, 1.0])
  if origin is None:
    origin = -(np.array(shape) - 1) / 2 * np.array(spacing)
  canonical[:3, 3] = origin
  transform = orientations.ornt_transform(orientations.axcodes2ornt(("R", "A", "S")),
                                          orientations.axcodes2ornt(tuple(axcodes)))
  data = orientations.apply_orientation(image, transform)
  affine = canonical @ orientations.inv_ornt_aff(transform, shape)
  slope, inter = 1.0, 0.0
  if is_label:
    data = data.astype({"uint8": np.uint8, "int16": np.int16, "float32": np.float32}[storage])
  elif storage == "int16":
    data = data.astype(np.int16)
  elif storage == "uint16_offset":  # stored HU + 1024, scl_inter = -1024
    data = (data.astype(np.int32) + 1024).clip(0, 65535).astype(np.uint16)
    inter = -1024.0
  elif storage == "float32":
    data = data.astype(np.float32)
  elif storage == "float32_scaled":  # stored (HU + 1024) * 2, scl_slope = 0.5
    data = ((data.astype(np.float32) + 1024) * 2).astype(np.float32)
    slope, inter = 0.5, -1024.0
  else:
    raise ValueError(f"unknown storage {storage!r}")
  img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
  img.header.set_xyzt_units("mm", "sec")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  if not is_label and storage != "int16":
    img.header.set_slope_inter(slope, inter)
  return img


def _save(img: nib.Nifti1Image, path: str) -> None:
  """Writes via a temporary file in the same folder, so a file is never half-written.

  The temporary file is created with open()'s mode (the process umask applies), not
  mkstemp's 0600, so colleagues who may read the folder may read the cases.
  """
  folder, name = os.path.split(path)
  tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")  # keeps the .nii/.nii.gz suffix
  try:
    nib.save(img, tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_case(out_dir: str, seed: int, index: int, cfg: SynthConfig = SynthConfig()) -> dict:
  """Generates case `index`, writes volume-i.nii.gz and segmentation-i.nii.gz, returns its
  record."""
  case = generate_case(seed, index, cfg)
  rng = np.random.default_rng([seed, index, 1])
  axcodes, ct_storage, label_storage = _storage(rng, cfg)
  ext = ".nii.gz" if cfg.compress else ".nii"
  _save(to_nifti(case["image"], case["spacing"], axcodes, ct_storage),
        os.path.join(out_dir, f"volume-{index}{ext}"))
  _save(to_nifti(case["labels"], case["spacing"], axcodes, label_storage, is_label=True),
        os.path.join(out_dir, f"segmentation-{index}{ext}"))
  liver = case["labels"] >= 1
  return dict(
      case=index, volume=f"volume-{index}{ext}", segmentation=f"segmentation-{index}{ext}",
      shape=list(case["image"].shape), spacing=[round(s, 6) for s in case["spacing"]],
      orientation="".join(axcodes), ct_storage=ct_storage, label_storage=label_storage,
      noise_hu=case["noise_hu"], liver_voxels=int(liver.sum()),
      num_tumours=len(case["tumours"]), tumours=case["tumours"])


class ForeignFolderError(ValueError):
  """A folder that holds files this generator did not write: synthesis never writes there."""


def _read_mark(out_dir: str) -> Optional[dict]:
  path = os.path.join(out_dir, OWNER_MARK)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_json(out_dir: str, name: str, value: Any) -> None:
  tmp = os.path.join(out_dir, f".tmp-{os.getpid()}-{name}")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, os.path.join(out_dir, name))


def check_writable(out_dir: str, key: str = "out_dir") -> None:
  """Raises ForeignFolderError unless synthesis may write into `out_dir`: a folder that does
  not exist, an empty one, or one this generator made (its mark file or manifest is there).

  `key` names the setting in the message (e.g. 'data.lits_dir').
  """
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise ForeignFolderError(f"{key}={out_dir} is a file, not a folder")
  if _read_mark(out_dir) is not None or read_manifest(out_dir) is not None:
    return
  names = sorted(n for n in os.listdir(out_dir))
  if names:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    advice = ("for your own LiTS cases there, give --config.data.synthetic.enabled=false (or "
              "use configs/lits_local.py); to synthesise, name a new folder"
              if key.startswith("config.") else "name a new or empty folder")
    raise ForeignFolderError(
        f"{key}={out_dir} holds files that the synthetic generator did not write ({shown}), "
        f"and it writes only into an empty folder or one it made: {advice}")


def synthesise(out_dir: str, num_cases: int, seed: int, cfg: SynthConfig = SynthConfig(),
               progress: Optional[Any] = None, key: str = "out_dir") -> dict:
  """Writes `num_cases` synthetic cases and `manifest.json` (written last, marking completion).

  Only into a folder that `check_writable` allows. The folder's mark file lists every file the
  generator ever wrote there (updated before writing), so files of an earlier, larger or
  interrupted synthesis that the new manifest does not list are removed, and nothing else is.
  """
  if num_cases < 1:
    raise ValueError(f"num_cases must be >= 1, got {num_cases}")
  check_writable(out_dir, key)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, MANIFEST)
  ext = ".nii.gz" if cfg.compress else ".nii"
  new_files = [f"{kind}-{i}{ext}" for i in range(num_cases) for kind in ("volume", "segmentation")]
  mark = _read_mark(out_dir) or dict(generator="curriculum-seg synthetic", files=[])
  old = read_manifest(out_dir)
  written = set(mark["files"]) | {c[k] for c in (old or {}).get("cases", [])
                                  for k in ("volume", "segmentation")}
  _write_json(out_dir, OWNER_MARK, dict(mark, files=sorted(written | set(new_files))))
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # the folder is incomplete until the new manifest lands
  for name in sorted(written - set(new_files)):  # the generator's own stale cases
    stale = os.path.join(out_dir, name)
    if os.path.exists(stale):
      os.remove(stale)
  records = []
  for i in range(num_cases):
    records.append(write_case(out_dir, seed, i, cfg))
    if progress is not None:
      progress(records[-1])
  manifest = dict(generator_version=GENERATOR_VERSION, seed=seed, num_cases=num_cases,
                  config=dataclasses.asdict(cfg), cases=records)
  manifest = json.loads(json.dumps(manifest))  # return exactly what the file holds
  _write_json(out_dir, OWNER_MARK, dict(mark, files=sorted(new_files)))
  _write_json(out_dir, MANIFEST, manifest)
  return manifest


def read_manifest(out_dir: str) -> Optional[dict]:
  """The manifest of a complete synthetic folder, or None when absent (folder incomplete) or
  when `manifest.json` is not the generator's (another tool's file of that name)."""
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  if not isinstance(manifest, dict) or not {"generator_version", "cases"} <= set(manifest):
    return None
  return manifest


def ensure_synthetic(out_dir: str, num_cases: int, seed: int, cfg: SynthConfig,
                     progress: Optional[Any] = None, key: str = "out_dir") -> dict:
  """Synthesises into `out_dir` unless a complete folder with the same parameters is there."""
  manifest = read_manifest(out_dir)
  if (manifest is not None and manifest["seed"] == seed and manifest["num_cases"] == num_cases
      and manifest["generator_version"] == GENERATOR_VERSION
      and manifest["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))):
    return manifest
  return synthesise(out_dir, num_cases, seed, cfg, progress, key)
