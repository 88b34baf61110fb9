"""Shared fixtures: offline environment, paths to ../shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GLUE_DIR = Path(os.environ.get("IDLAB_GLUE_DIR", SHARED / "data" / "glue"))


@pytest.fixture
def glue_dir() -> Path:
    """The GLUE tsv folder (../shared/data/glue); skips the test when it is absent."""
    if not (GLUE_DIR / "MRPC" / "dev.tsv").exists():
        pytest.skip(f"GLUE files not found at {GLUE_DIR} (set IDLAB_GLUE_DIR or place ../shared beside the repo)")
    return GLUE_DIR
