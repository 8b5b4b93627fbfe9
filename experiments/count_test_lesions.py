"""How many reference lesions a sweep will score its runs on, per diameter bin, before training:
to size a benchmark's held-out test set (the experiment asks for 60+ lesions in each size bin).

For the sweep a config file declares (`get_sweep`, with any `--config.KEY=VALUE`), the held-out
cases are those `curriculum-seg sweep` scores: its declared synthetic held-out set, the test
split of the runs' data, or every case of `--score_dir`. Synthetic cases not yet written are
drawn by data_pipelines.synthetic (the data's generator, seed and settings) into a temporary
folder; each case is loaded by data_pipelines.lits and its lesions measured by
curriculum_seg.metrics as `evaluate` measures them (6-connected components, `diameter_mm`).
Prints the cumulative counts over the cases and the totals; nothing of the sweep's folder is
written. Run from the repository root:

  .venv/bin/python experiments/count_test_lesions.py --config configs/synthetic.py
  .venv/bin/python experiments/count_test_lesions.py --config configs/synthetic.py \\
      --config.data.synthetic.num_cases=80
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Callable, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from curriculum_seg import metrics, stats, sweep  # noqa: E402

MIN_PER_BIN = 60  # lesions in each diameter bin the experiment asks for


def reference_diameters(volume, segmentation) -> list[float]:
  """`diameter_mm` of each reference lesion of a LiTS case, as evaluate measures it."""
  from data_pipelines import lits  # pylint: disable=g-import-not-at-top
  case = lits.load_case(volume, segmentation)
  ref = case.labels == 2
  det = metrics.detect_lesions(ref, ref, case.spacing)
  return [float(r["diameter_mm"]) for r in det["reference_lesions"]]


def measure(spec: str, score_dir: Optional[str] = None, overrides=(),
            log: Callable[[str], object] = print) -> list[dict]:
  """Per held-out case of the sweep `spec` declares: its number and reference lesion
  diameters."""
  from data_pipelines import lits, lits_tfds, synthetic  # pylint: disable=g-import-not-at-top
  declared = sweep.load_sweep(spec)
  with tempfile.TemporaryDirectory() as out:  # `{out}` of the sweep's overrides
    config = sweep.run_config(declared, declared.runs[0], out, overrides)
    generator, seed = lits_tfds.synth_config(config.data), int(config.data.synthetic.seed)
    if declared.held_out is not None and score_dir is None:  # synthetic held-out cases
      held_out = sweep.held_out_settings(declared, config, out)
      folder, numbers = held_out["folder"], list(range(held_out["num_cases"]))
      generator = synthetic.SynthConfig(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in held_out["generator"].items()})
      seed = held_out["seed"]
    else:
      source, numbers = sweep.scored_cases(config, score_dir)
      folder = source.get("folder") or os.fspath(config.data.lits_dir)
    present = lits.find_cases(folder) if os.path.isdir(folder) and any(
        n.startswith("volume-") for n in os.listdir(folder)) else {}
    cases = []
    for n in numbers:
      if n in present:
        diameters = reference_diameters(*present[n])
      else:  # synthetic data not written yet: draw the case alone
        synthetic.write_case(out, seed, n, generator)
        volume, segmentation = lits.find_cases(out)[n]
        diameters = reference_diameters(volume, segmentation)
        os.remove(volume)
        os.remove(segmentation)
      cases.append(dict(case=int(n), diameters_mm=diameters))
      log(f"case {n}: {len(diameters)} lesions")
  return cases


def cumulative(cases: list[dict]) -> list[dict]:
  """Lesion counts per bin over the first k cases, k = 1..len(cases)."""
  rows, counts = [], {b: 0 for b in stats.BINS}
  for k, case in enumerate(cases, start=1):
    for d in case["diameters_mm"]:
      counts[metrics.diameter_bin(d)] += 1
    rows.append(dict(cases=k, last_case=case["case"], all=sum(counts.values()), **counts))
  return rows


def main(argv: Optional[list[str]] = None) -> int:
  from curriculum_seg import config_loading  # pylint: disable=g-import-not-at-top
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = config_loading.split_override_args(argv)
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a config file declaring a sweep")
  parser.add_argument("--score_dir", default=None, help="as `curriculum-seg sweep`'s")
  parser.add_argument("--json", default=None, help="also write the per-case diameters here")
  args = parser.parse_args(argv)
  try:
    cases = measure(args.config, args.score_dir, overrides, log=lambda m: None)
  except (sweep.SweepError, config_loading.ConfigError) as e:
    print(f"count_test_lesions: error: {e}", file=sys.stderr)
    return 2
  rows = cumulative(cases)
  print("| held-out cases | last case | lesions | " + " | ".join(stats.BINS) + " |")
  print("|---|---|---|" + "---|" * len(stats.BINS))
  for r in rows:
    if r["cases"] % 5 == 0 or r is rows[-1]:
      print(f"| {r['cases']} | {r['last_case']} | {r['all']} | "
            + " | ".join(str(r[b]) for b in stats.BINS) + " |")
  last = rows[-1] if rows else dict(all=0, **{b: 0 for b in stats.BINS})
  print(f"\n{len(cases)} held-out cases, {last['all']} reference lesions ("
        + ", ".join(f"{b} {last[b]}" for b in stats.BINS) + ")")
  if min(last[b] for b in stats.BINS) < MIN_PER_BIN:
    print(f"fewer than {MIN_PER_BIN} lesions in a size bin: hold out more cases")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(cases=cases, cumulative=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
