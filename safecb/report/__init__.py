"""The run report: `build_report(store)` writes report/index.html and its PNGs into the run folder."""

from safecb.report.html import ReportError, build_report

__all__ = ["ReportError", "build_report"]
