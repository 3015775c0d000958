"""Efficiency analysis: the report model, :func:`analyze`, and its renderings."""

from .analyze import analyze
from .report import Report, Row, Run

__all__ = ["analyze", "Report", "Row", "Run"]
