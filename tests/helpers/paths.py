"""Paths the tests share: the repository root and the real data beside the checkout."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REAL_DATA = REPO.parent / "shared" / "data" / "real"
