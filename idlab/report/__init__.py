"""``idlab report``: results -> tables (Parquet), figures (PNG + PDF) and REPORT.md.

The package: `idlab.report.load` (run folders -> DataFrames), `idlab.report.tables` (cells,
d90 / r90 through `idlab.d90`, baseline), `idlab.report.figures` (one function per figure),
`idlab.report.markdown` (REPORT.md and `make_report`). The Delta W tables come from
`idlab.report.deltas`.
"""

from idlab.report.load import load_curves, load_results
from idlab.report.markdown import make_report, md_table, report_study
from idlab.report.tables import amplification_table, cell_table, thin_crossings, threshold_crossing

__all__ = ["amplification_table", "cell_table", "load_curves", "load_results", "make_report", "md_table",
           "report_study", "thin_crossings", "threshold_crossing"]
