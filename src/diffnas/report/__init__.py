"""Reporting: costs, plots and run summaries."""

from diffnas.report.cost import count_macs, count_parameters

__all__ = ["count_macs", "count_parameters"]
