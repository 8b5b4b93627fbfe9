"""The machine description every benchmark writes next to its figures (curriculum_seg.machine,
standard library only), importable from this folder's scripts."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the scripts run as `python benchmarks/X.py` from the repository
  sys.path.insert(0, _ROOT)

from curriculum_seg.machine import describe, write_result  # noqa: E402,F401
