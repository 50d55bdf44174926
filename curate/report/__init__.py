"""The run report: `RUN/_report/index.html`, one static page per run folder with the funnel, each stage's numbers
and pictures of the rows (filters, dedup pairs, captions, training shards), built from stage records, markers
and a bounded sample of rows so that it costs the same at 1e9 rows as at 1e3 (docs/operations.md#the-run-report).
"""

from curate.report.build import build_quietly, build_report, report_uri
from curate.report.live import RunReport

__all__ = ["RunReport", "build_quietly", "build_report", "report_uri"]
