"""Writing the dataset's case shards with Apache Beam, on the local runner or any other.

The pipeline is one element per case: `beam.Create(tasks) | Reshuffle | WriteCaseShard`, where
each element writes its case's shard (case_shards.write_case_shard, as the local builds do) and
emits its small summary; the summaries are gathered into one JSON file beside the shards, which
the driver reads once the pipeline is done. TFDS keeps nothing a builder changes on its Beam
workers, so the split's index is assembled in the driver from that file; it lies inside TFDS's
temporary dataset folder, so an interrupted pipeline leaves nothing that looks complete.

Runners: `local` (or `DirectRunner`) is Beam's FnApiRunner with one SDK worker process per core
(`--direct_running_mode=multi_processing`, `--direct_num_workers`); Beam 2.68 and later would
first try Prism, a Go binary that Beam downloads at run time. Any other name (DataflowRunner,
FlinkRunner, SparkRunner, ...) goes to Beam as it is, with `--beam_options`.
"""

from __future__ import annotations

import json
import re
import shlex
from typing import Any, Optional, Sequence

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import fn_runner
from etils import epath

from data_pipelines import case_pool, case_shards, lits

LOCAL_RUNNERS = ("local", "DirectRunner")
SUMMARIES_FILE = "lits-case-summaries.json"


def pipeline_settings(runner: str, options: str = "", workers: int = 0) -> tuple[Any, Any]:
  """(runner, PipelineOptions) for `--beam_runner` and `--beam_options` (Beam's own flags,
  e.g. "--project=P --region=R --temp_location=gs://B/tmp"); `workers` (0: the available
  cores) sets the local runner's worker processes unless the options set them."""
  try:
    flags = shlex.split(options or "")
  except ValueError as e:
    raise ValueError(f"--beam_options: {e}") from e
  if runner in LOCAL_RUNNERS:
    given = {f.split("=", 1)[0] for f in flags}
    if "--direct_running_mode" not in given:
      flags.append("--direct_running_mode=multi_processing")
    if "--direct_num_workers" not in given:
      flags.append(f"--direct_num_workers={workers or case_pool.available_cores()}")
    runner = fn_runner.FnApiRunner()
  return runner, beam.options.pipeline_options.PipelineOptions(flags)


class WriteCaseShard(beam.DoFn):
  """A case's shard written by this worker; emits its summary as JSON."""

  def __init__(self, spec: case_shards.ShardSpec):
    self.spec = spec

  def setup(self) -> None:
    case_pool.exit_with_parent()
    case_pool.single_threaded_tensorflow()

  def process(self, task: case_shards.CaseTask):
    yield case_shards.write_case_shard(task, self.spec).to_json()


def _save(summaries: list[dict], path: str) -> None:
  """Writes the gathered summaries atomically (a retried step writes the same content)."""
  final = epath.Path(path)
  tmp = final.parent / f"{case_shards.INCOMPLETE_PREFIX}{final.name}"
  tmp.write_text(json.dumps(sorted(summaries, key=lambda s: (s["split"], s["rank"]))))
  tmp.replace(final)


def add_case_shards(pipeline, tasks: Sequence[case_shards.CaseTask],
                    spec: case_shards.ShardSpec, summaries_path: str) -> None:
  """Adds the steps that write every task's shard and gather the summaries to `pipeline`."""
  _ = (pipeline
       | "Cases" >> beam.Create(list(tasks), reshuffle=False)
       | "Spread" >> beam.Reshuffle()
       | "WriteCaseShards" >> beam.ParDo(WriteCaseShard(spec))
       | "Gather" >> beam.combiners.ToList()
       | "SaveSummaries" >> beam.Map(_save, summaries_path))


def read_summaries(summaries_path: str, tasks: Sequence[case_shards.CaseTask]
                   ) -> list[case_shards.CaseSummary]:
  """The summaries a pipeline gathered, one per task (checked), then deletes their file."""
  path = epath.Path(summaries_path)
  summaries = [case_shards.CaseSummary.from_json(d) for d in json.loads(path.read_text())]
  got = sorted((s.split, s.rank) for s in summaries)
  want = sorted((t.split, t.rank) for t in tasks)
  if got != want:
    raise RuntimeError(f"{summaries_path}: the pipeline summarised {len(got)} cases, not the "
                       f"{len(want)} it was given")
  path.unlink()
  return summaries


_CASE_ERROR = re.compile(r"CaseError: (.+?)(?: \[while running [^\]]*\])*\s*$", re.MULTILINE)


def case_error(error: BaseException) -> Optional[lits.CaseError]:
  """The CaseError a worker raised, recovered from a runner's error (which carries the
  worker's traceback as text), or None."""
  seen: set[int] = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, lits.CaseError):
      return lits.CaseError(str(error))
    seen.add(id(error))
    found = _CASE_ERROR.findall(str(error))
    if found:
      return lits.CaseError(found[-1].strip())
    error = error.__cause__ or error.__context__
  return None
