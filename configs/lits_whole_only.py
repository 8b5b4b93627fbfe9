"""Baseline without curriculum: the same network trained on whole LiTS slices only.

Same data, model and total steps (60,000) as configs/lits_three_stage.py, so the two are
comparable at equal compute.
"""

from configs import common
from configs import lits_three_stage


def get_config(arg=None):
  config = lits_three_stage.get_config(arg)
  config.curriculum = ("whole",)
  whole = common.stage("whole", steps=60_000, batch_size=64, learning_rate=1e-4, init="scratch",
                       schedule="cosine", warmup_steps=500, log_every=100, eval_every=1_000,
                       checkpoint_every=1_000)
  del config.stages
  config.stages = {"whole": whole}
  return config
