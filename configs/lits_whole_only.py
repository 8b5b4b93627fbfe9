"""Baseline without curriculum: the same network trained on whole LiTS slices only.

Same data, model and total steps (60,000) as configs/lits_three_stage.py, so the two are
comparable at equal compute; the same as `configs/lits_three_stage.py:whole_only`.
"""

from configs import lits_three_stage


def get_config(arg=None):
  del arg
  return lits_three_stage.get_config("whole_only")
