"""The run report: ``report.html`` with inline SVG charts (:func:`write_report`)."""

from compactor.report.html import build_report, write_report

__all__ = ["build_report", "write_report"]
