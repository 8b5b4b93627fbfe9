"""How many synthetic test cases the curriculum experiment needs: reference lesions per diameter
bin, counted as `curriculum-seg evaluate` measures them, over the cases that follow the training
folder's (numbered from data.synthetic.num_cases, the experiment's test cases).

Each case is drawn by data_pipelines.synthetic with the training data's generator seed and
settings (configs/synthetic.py, plus any `--config.data.*` overrides), written to a temporary
folder, loaded by data_pipelines.lits and its lesions measured by curriculum_seg.metrics
(6-connected components, `diameter_mm`); nothing is kept. Prints, for growing numbers of cases,
the lesion counts per bin, and the fewest cases that reach `--min_lesions` lesions with
`--min_small` under 10 mm and `--min_per_bin` in every bin. Run from the repository root:

  .venv/bin/python benchmarks/count_test_lesions.py --max_cases 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import curriculum_experiment as ce  # noqa: E402  this folder
import paired_stats  # noqa: E402


def measure(config, max_cases: int, log=print) -> list[dict]:
  """Per test case (numbered from data.synthetic.num_cases): its reference lesion diameters."""
  from data_pipelines import lits, lits_tfds, synthetic  # pylint: disable=g-import-not-at-top
  cfg = lits_tfds.synth_config(config.data)
  seed = int(config.data.synthetic.seed)
  out = []
  with tempfile.TemporaryDirectory() as folder:
    for n in ce.numbers_of_test_cases(config, max_cases):
      synthetic.write_case(folder, seed, n, cfg)
      volume, segmentation = lits.find_cases(folder)[n]
      out.append(dict(case=n, diameters_mm=ce.reference_lesion_diameters(volume, segmentation)))
      os.remove(volume)
      os.remove(segmentation)
      log(f"case {n}: {len(out[-1]['diameters_mm'])} lesions")
  return out


def cumulative(cases: list[dict]) -> list[dict]:
  """Lesion counts per bin over the first k cases, k = 1..len(cases)."""
  rows, diameters = [], []
  for k, case in enumerate(cases, start=1):
    diameters += case["diameters_mm"]
    counts = {b: 0 for b in paired_stats.BINS}
    for d in diameters:
      counts[paired_stats.diameter_bin(d)] += 1
    rows.append(dict(cases=k, last_case=case["case"], all=len(diameters), **counts))
  return rows


def fewest(rows: list[dict], min_lesions: int, min_small: int, min_per_bin: int
           ) -> Optional[dict]:
  return next((r for r in rows if r["all"] >= min_lesions and r[paired_stats.BINS[0]] >= min_small
               and all(r[b] >= min_per_bin for b in paired_stats.BINS)), None)


def main(argv: Optional[list[str]] = None) -> int:
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = config_loading.split_override_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--max_cases", type=int, default=60)
  parser.add_argument("--min_lesions", type=int, default=ce.MIN_TEST_LESIONS)
  parser.add_argument("--min_small", type=int, default=ce.MIN_SMALL_TEST_LESIONS)
  parser.add_argument("--min_per_bin", type=int, default=15)
  parser.add_argument("--json", default=None, help="also write the per-case diameters here")
  args = parser.parse_args(argv)
  config = ce.regime_config("three_stage", 0, ce.DEFAULT_TOTAL_STEPS, tempfile.gettempdir(),
                            overrides)
  cases = measure(config, args.max_cases, log=lambda m: None)
  rows = cumulative(cases)
  print("| test cases | case numbers | lesions | " + " | ".join(paired_stats.BINS) + " |")
  print("|---|---|---|---|---|---|")
  first = cases[0]["case"]
  for r in rows:
    if r["cases"] % 5 == 0 or r is rows[-1]:
      print(f"| {r['cases']} | {first}-{r['last_case']} | {r['all']} | "
            + " | ".join(str(r[b]) for b in paired_stats.BINS) + " |")
  best = fewest(rows, args.min_lesions, args.min_small, args.min_per_bin)
  if best is None:
    print(f"\n{args.max_cases} cases do not reach {args.min_lesions} lesions, {args.min_small} "
          f"under 10 mm and {args.min_per_bin} per bin; raise --max_cases")
  else:
    print(f"\nfewest: {best['cases']} cases ({first}-{best['last_case']}): {best['all']} lesions, "
          + ", ".join(f"{b} {best[b]}" for b in paired_stats.BINS))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(cases=cases, cumulative=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
