"""Reading LiTS-format NIfTI cases into one canonical orientation, with validation.

LiTS files come from seven sites and differ in orientation (RAS, LPS, permuted axes), CT storage
(int16, uint16 or float, with or without scl_slope/scl_inter) and label storage (uint8, int16,
float). `load_case` hides all of that: it returns HU as int16 and labels as uint8 in {0, 1, 2}, in
the closest-to-RAS array orientation, with spacing in mm per array axis, and keeps what is needed
to write a prediction back in the file's own geometry (`Case.to_original`, `Case.save_mask`).
Anything malformed is refused with a `CaseError` whose message names the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import shutil
import tempfile
import threading
import zlib
from typing import Callable, ContextManager, Optional

import nibabel as nib
import numpy as np
from etils import epath
from nibabel import orientations

HU_MIN, HU_MAX = np.iinfo(np.int16).min, np.iinfo(np.int16).max
LABEL_VALUES = (0, 1, 2)  # background, liver, tumour
_CANONICAL = orientations.axcodes2ornt(("R", "A", "S"))
_CHUNK_SLICES = 32  # slices converted at a time, so float copies stay small


class CaseError(ValueError):
  """A LiTS file that cannot be used; the message names the file and what is wrong."""


class CaseFileNotFoundError(CaseError, FileNotFoundError):
  """A volume or segmentation file that does not exist."""


@dataclasses.dataclass
class Case:
  """One CT volume (and its segmentation) in canonical (closest to RAS+) orientation.

  Attributes:
    image: HU, int16, shape (X, Y, Z) with axes pointing Right, Anterior, Superior.
    labels: uint8 in {0 background, 1 liver, 2 tumour} with the image's shape, or None.
    spacing: voxel size in mm along each array axis of `image`.
    affine: voxel-to-world (RAS+ mm) affine of `image`.
    original_affine, original_shape, header: the volume file's own geometry and header.
    ornt: the nibabel orientation that maps the file's array axes onto the canonical axes.
  """

  image: np.ndarray
  labels: Optional[np.ndarray]
  spacing: tuple[float, float, float]
  affine: np.ndarray
  original_affine: np.ndarray
  original_shape: tuple[int, int, int]
  header: nib.Nifti1Header
  ornt: np.ndarray
  volume_path: str
  segmentation_path: Optional[str] = None

  def to_original(self, array: np.ndarray) -> np.ndarray:
    """Maps an array on the canonical grid back onto the file's own array layout."""
    if array.shape[:3] != self.image.shape:
      raise ValueError(f"array of shape {array.shape} is not on the grid of {self.volume_path} "
                       f"(canonical shape {self.image.shape})")
    back = orientations.ornt_transform(_CANONICAL, self.ornt)
    out = orientations.apply_orientation(array, back)
    assert out.shape[:3] == self.original_shape
    return np.ascontiguousarray(out)

  def save_mask(self, mask: np.ndarray, path: str | os.PathLike) -> None:
    """Writes a canonical-grid label mask with the volume file's shape, affine and orientation."""
    data = self.to_original(np.asarray(mask, dtype=np.uint8))
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.uint8)
    header.set_zooms(self.header.get_zooms()[:3])
    header.set_xyzt_units(*self.header.get_xyzt_units())
    image = nib.Nifti1Image(data, self.original_affine, header)
    image.set_qform(self.original_affine, code=int(self.header["qform_code"]) or 1)
    image.set_sform(self.original_affine, code=int(self.header["sform_code"]) or 1)
    write_nifti_atomically(image, path)


def write_nifti_atomically(image: nib.Nifti1Image, path: str | os.PathLike) -> None:
  """Saves a NIfTI image so that `path` is either absent or complete (never half-written)."""
  suffix = ".nii.gz" if os.fspath(path).endswith(".gz") else ".nii"
  write_atomically(path, lambda tmp: nib.save(image, tmp), suffix)


def write_atomically(path: str | os.PathLike, write: Callable[[str], None],
                     suffix: str = "") -> None:
  """Calls `write(name)` on a temporary local file, then moves it to `path` (local or gs://):
  `path` is either absent or complete. The file gets the permissions the process umask gives
  any file the user writes (a name of our own, not mkstemp's 0600)."""
  path = epath.Path(path)
  folder = _local_dir_for(path) or tempfile.gettempdir()
  tmp = os.path.join(folder, f".tmp-{os.getpid()}-{threading.get_ident()}{suffix}")
  try:
    write(tmp)
    if _is_local(path):
      os.replace(tmp, path)
    else:
      epath.Path(tmp).copy(path, overwrite=True)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _is_local(path: epath.Path) -> bool:
  return "://" not in os.fspath(path)


def _local_dir_for(path: epath.Path) -> Optional[str]:
  if _is_local(path):
    os.makedirs(path.parent, exist_ok=True)
    return os.fspath(path.parent)
  return None


def _open_nifti(path: str | os.PathLike, role: str, stack) -> nib.Nifti1Image:
  """Opens a NIfTI file lazily; remote (gs://) files are first copied to a local temp file."""
  epath_path = epath.Path(path)
  if not epath_path.exists():
    raise CaseFileNotFoundError(f"{path}: {role} file does not exist")
  local = os.fspath(path)
  if not _is_local(epath_path):
    fd, local = tempfile.mkstemp(suffix="".join(epath_path.suffixes[-2:]))
    os.close(fd)
    stack.append(local)
    with epath_path.open("rb") as src, open(local, "wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
  try:
    image = nib.load(local, mmap=False)  # read whole when asked: no lazily mapped pages
  except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error, ValueError) as e:
    raise CaseError(f"{path}: not a readable NIfTI {role} file ({type(e).__name__}: {e})") from e
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise CaseError(f"{path}: {role} file is a {type(image).__name__}, not NIfTI")
  return image


def _shape3(image: nib.Nifti1Image, path, role: str) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in image.shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise CaseError(f"{path}: {role} must be a 3-D volume, got shape {tuple(image.shape)}")
  if min(shape) < 1:
    raise CaseError(f"{path}: {role} has an empty dimension, shape {shape}")
  return shape


def _read_raw(image: nib.Nifti1Image, shape, path, role: str) -> np.ndarray:
  """Reads the stored (unscaled) array, turning truncated or corrupt data into a CaseError."""
  try:
    raw = np.asarray(image.dataobj.get_unscaled())
  except (EOFError, OSError, zlib.error, ValueError, gzip.BadGzipFile) as e:
    raise CaseError(f"{path}: cannot read the {role} data, the file is truncated or corrupt "
                    f"({type(e).__name__}: {e})") from e
  return raw.reshape(shape)


def _scaling(image: nib.Nifti1Image, path, role: str) -> tuple[float, float]:
  slope, inter = image.dataobj.slope, image.dataobj.inter
  slope = 1.0 if slope is None else float(slope)
  inter = 0.0 if inter is None else float(inter)
  if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
    raise CaseError(f"{path}: {role} has invalid scl_slope/scl_inter ({slope}, {inter})")
  return slope, inter


def _to_hu(raw: np.ndarray, slope: float, inter: float, path) -> np.ndarray:
  """Scales stored values to HU and rounds them into int16, a few slices at a time.

  Integer storage with integer scaling is computed in int32, which equals the float32 rounding
  exactly (every value involved is below 2**24); anything else goes through float32 in place.
  """
  if raw.dtype == np.int16 and slope == 1.0 and inter == 0.0:
    return raw
  out = np.empty(raw.shape, dtype=np.int16, order=_order(raw))
  exact_int = (np.issubdtype(raw.dtype, np.integer) and raw.dtype.itemsize <= 2
               and slope.is_integer() and inter.is_integer()
               and abs(slope) * 2**16 + abs(inter) < 2**24)
  step = _chunk_slices(raw)
  for k in range(0, raw.shape[2], step):
    if exact_int:
      chunk = raw[:, :, k:k + step].astype(np.int32)
      if slope != 1.0:
        np.multiply(chunk, np.int32(slope), out=chunk)
      np.add(chunk, np.int32(inter), out=chunk)
    else:
      chunk = raw[:, :, k:k + step].astype(np.float32)
      if not np.isfinite(np.add.reduce(chunk, axis=None, dtype=np.float64)):
        raise CaseError(f"{path}: CT volume contains NaN or infinite values")
      np.multiply(chunk, np.float32(slope), out=chunk)
      np.add(chunk, np.float32(inter), out=chunk)
      np.rint(chunk, out=chunk)
    np.clip(chunk, HU_MIN, HU_MAX, out=chunk)
    out[:, :, k:k + step] = chunk
  return out


def _to_labels(raw: np.ndarray, slope: float, inter: float, path) -> np.ndarray:
  """Converts stored label values to uint8, refusing anything outside {0, 1, 2}.

  The usual storage (integers, or floats holding exact 0, 1, 2) is checked by its range and an
  exact round trip; only a file that fails that pays for the exact search of its bad values.
  """
  if np.issubdtype(raw.dtype, np.integer) and slope == 1.0 and inter == 0.0:
    if raw.size and (raw.max() > 2 or raw.min() < 0):
      values = np.unique(raw)
      bad = [v for v in values.tolist() if v not in LABEL_VALUES]
      raise CaseError(f"{path}: segmentation has label values {bad[:10]} outside {{0, 1, 2}}")
    return raw.astype(np.uint8, copy=False)
  out = np.empty(raw.shape, dtype=np.uint8, order=_order(raw))
  step = _chunk_slices(raw)
  for k in range(0, raw.shape[2], step):
    chunk = raw[:, :, k:k + step]
    if slope == 1.0 and inter == 0.0 and np.issubdtype(raw.dtype, np.floating):
      with np.errstate(invalid="ignore"):
        fast = chunk.astype(np.uint8)  # NaN, negative or huge values fail the round trip
      if fast.max(initial=0) <= 2 and np.array_equal(fast, chunk):
        out[:, :, k:k + step] = fast
        continue
    chunk = chunk.astype(np.float64) * slope + inter
    rounded = np.rint(chunk)
    bad = ~np.isfinite(chunk) | (np.abs(chunk - rounded) > 1e-3) | (rounded < 0) | (rounded > 2)
    if bad.any():
      values = np.unique(chunk[bad])[:10].tolist()
      raise CaseError(f"{path}: segmentation has label values {values} outside {{0, 1, 2}}")
    out[:, :, k:k + step] = rounded
  return out


def _order(raw: np.ndarray) -> str:
  """The memory order of a converted array: the file's (NIfTI data is column-major), so that a
  chunk of slices is copied contiguously; the canonical copy is C-ordered afterwards."""
  return "F" if raw.flags.f_contiguous and not raw.flags.c_contiguous else "C"


def _chunk_slices(raw: np.ndarray) -> int:
  """Slices converted at a time: about 4 MB of float32, so temporaries stay in cache."""
  return max(1, min(_CHUNK_SLICES, (1 << 20) // max(1, raw.shape[0] * raw.shape[1])))


def _raw_zooms(image: nib.Nifti1Image) -> np.ndarray:
  """pixdim[1:4] as stored: nibabel's loader silently turns zeros into ones."""
  holder = image.file_map["header"] if "header" in image.file_map else image.file_map["image"]
  with nib.openers.ImageOpener(holder.filename) as f:
    raw = type(image.header).from_fileobj(f, check=False)
  return np.asarray(raw["pixdim"][1:4], dtype=np.float64)


def _spacing_mm(image: nib.Nifti1Image, path) -> float:
  """Returns the factor from the header's spatial unit to mm, checking zooms and affine."""
  zooms = _raw_zooms(image)
  if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
    raise CaseError(f"{path}: voxel spacing {zooms.tolist()} is zero, negative or not finite")
  affine = image.affine
  if not np.all(np.isfinite(affine)):
    raise CaseError(f"{path}: affine has non-finite values")
  norms = np.linalg.norm(affine[:3, :3], axis=0)
  if np.any(norms <= 0) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise CaseError(f"{path}: affine is singular (voxel spacing {norms.tolist()})")
  unit = image.header.get_xyzt_units()[0]
  return {"meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)


def _no_stages(name: str):  # pylint: disable=unused-argument
  return contextlib.nullcontext()


def load_case(volume_path: str | os.PathLike,
              segmentation_path: str | os.PathLike | None = None, *,
              stages: Callable[[str], ContextManager] = _no_stages) -> Case:
  """Loads a LiTS-format CT volume (and segmentation) in canonical orientation.

  Args:
    volume_path: `volume-N.nii` or `.nii.gz` (local, or any path etils.epath opens, e.g. gs://).
    segmentation_path: the matching `segmentation-N.nii[.gz]`, or None.
    stages: `stages(name)` is entered around each stage ("read": open the files and read their
      data, "canonicalise": HU, labels, orientation); a benchmark times them with it.

  Returns:
    A `Case` with int16 HU, uint8 labels in {0, 1, 2} (or None), spacing in mm per array axis.

  Raises:
    CaseError: naming the file, for a missing, unreadable, truncated, non-3-D or invalid file, a
      CT with NaN/inf, labels outside {0, 1, 2}, or a segmentation on another grid.
  """
  temps: list[str] = []
  try:
    with stages("read"):
      vol = _open_nifti(volume_path, "CT volume", temps)
      shape = _shape3(vol, volume_path, "CT volume")
      unit = _spacing_mm(vol, volume_path)
      slope, inter = _scaling(vol, volume_path, "CT volume")
      raw = _read_raw(vol, shape, volume_path, "CT volume")
    with stages("canonicalise"):
      hu = _to_hu(raw, slope, inter, volume_path)
    del raw

    labels = None
    if segmentation_path is not None:
      with stages("read"):
        seg = _open_nifti(segmentation_path, "segmentation", temps)
        seg_shape = _shape3(seg, segmentation_path, "segmentation")
        if seg_shape != shape:
          raise CaseError(f"{segmentation_path}: segmentation shape {seg_shape} differs from "
                          f"the CT volume's {shape} ({volume_path})")
        if not np.allclose(seg.affine, vol.affine, rtol=0, atol=1e-3):
          raise CaseError(f"{segmentation_path}: segmentation grid (affine) differs from the CT "
                          f"volume's ({volume_path}):\n{np.round(seg.affine, 4)}\nvs\n"
                          f"{np.round(vol.affine, 4)}")
        seg_slope, seg_inter = _scaling(seg, segmentation_path, "segmentation")
        raw = _read_raw(seg, seg_shape, segmentation_path, "segmentation")
      with stages("canonicalise"):
        labels = _to_labels(raw, seg_slope, seg_inter, segmentation_path)
      del raw
  finally:
    for t in temps:
      os.remove(t)

  with stages("canonicalise"):
    affine = vol.affine.copy()
    affine[:3, :] *= unit
    ornt = orientations.io_orientation(affine)
    image = np.ascontiguousarray(orientations.apply_orientation(hu, ornt))
    if labels is not None:
      labels = np.ascontiguousarray(orientations.apply_orientation(labels, ornt))
    canonical_affine = affine @ orientations.inv_ornt_aff(ornt, shape)
    spacing = tuple(float(s) for s in np.linalg.norm(canonical_affine[:3, :3], axis=0))
  return Case(image=image, labels=labels, spacing=spacing, affine=canonical_affine,
              original_affine=vol.affine.copy(), original_shape=shape, header=vol.header.copy(),
              ornt=ornt, volume_path=os.fspath(volume_path),
              segmentation_path=None if segmentation_path is None else os.fspath(segmentation_path))


def check_segmentation(path: str | os.PathLike) -> None:
  """Validates a segmentation file on its own: readable, 3-D, whole data, labels in {0, 1, 2}.

  `load_case` stops at a bad volume; a folder check (`data_pipelines.verify`) uses this to name a
  bad segmentation of the same case too. Raises CaseError naming the file.
  """
  temps: list[str] = []
  try:
    seg = _open_nifti(path, "segmentation", temps)
    shape = _shape3(seg, path, "segmentation")
    slope, inter = _scaling(seg, path, "segmentation")
    _to_labels(_read_raw(seg, shape, path, "segmentation"), slope, inter, path)
  finally:
    for t in temps:
      os.remove(t)


def list_case_files(lits_dir: str | os.PathLike
                    ) -> dict[int, tuple[list[epath.Path], list[epath.Path]]]:
  """Every `volume-N` and `segmentation-N` file of a LiTS folder, by N, without judging them.

  Returns {N: (volume files, segmentation files)}, each list sorted by name and possibly empty
  or holding duplicates (`volume-1.nii` and `volume-1.nii.gz`): `find_cases` refuses those, a
  folder check lists them all. Raises CaseFileNotFoundError if the folder does not exist.
  """
  root = epath.Path(lits_dir)
  if not root.is_dir():
    raise CaseFileNotFoundError(f"{lits_dir}: LiTS folder does not exist")
  found: dict[int, tuple[list[epath.Path], list[epath.Path]]] = {}
  for p in root.iterdir():
    name = p.name
    for role, prefix in enumerate(("volume-", "segmentation-")):
      for ext in (".nii.gz", ".nii"):
        if name.startswith(prefix) and name.endswith(ext):
          number = name[len(prefix):-len(ext)]
          if number.isdigit():
            found.setdefault(int(number), ([], []))[role].append(p)
  for volumes, segmentations in found.values():
    volumes.sort(key=lambda p: p.name)
    segmentations.sort(key=lambda p: p.name)
  return dict(sorted(found.items()))


def find_cases(lits_dir: str | os.PathLike) -> dict[int, tuple[epath.Path, epath.Path]]:
  """Lists `volume-N` / `segmentation-N` pairs in a LiTS folder, keyed by N.

  Raises CaseError if the folder is missing, holds no volume, a case is stored twice, or a volume
  has no segmentation (a segmentation without a volume is ignored).
  """
  files = list_case_files(lits_dir)
  for number, (volumes, segmentations) in files.items():
    for paths in (volumes, segmentations):
      if len(paths) > 1:
        raise CaseError(f"{paths[1]}: case {number} is stored twice in {lits_dir}")
  numbers = [n for n, (volumes, _) in files.items() if volumes]
  if not numbers:
    raise CaseError(f"{lits_dir}: no volume-N.nii[.gz] files in the LiTS folder")
  missing = [n for n in numbers if not files[n][1]]
  if missing:
    raise CaseError(f"{lits_dir}: volumes without a segmentation-N file: {missing[:10]}")
  return {n: (files[n][0][0], files[n][1][0]) for n in numbers}
