"""curriculum-seg: stage-curriculum training of segmentation networks in JAX/Flax."""

import importlib.metadata

try:
  __version__ = importlib.metadata.version("curriculum-seg")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without installing
  __version__ = "0.0.0+unknown"
