"""Markdown text of the report: values (`fmt`) and GitHub tables (`md_table`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def fmt(v: Any) -> str:
    """A table value: – for missing, yes/no, thousands separators, 4 significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if float(v).is_integer():  # a count or a grid point stored as float: 10000.0 -> 10,000
            return f"{int(v):,}"
        return f"{v:.4g}" if abs(float(v)) < 1e5 else f"{float(v):,.0f}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return str(v).replace("|", "\\|")


def md_table(df: pd.DataFrame, cols: Sequence[str] | None = None) -> str:
    """A GitHub markdown table (no external dependency)."""
    cols = list(cols or df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines)


__all__ = ["fmt", "md_table"]
