"""Shared fixtures: where the shared datasets live, and temporary data folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from face_assets.config import datasets_root

REPO_ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="session")
def datasets() -> Path:
    """The shared datasets folder; tests that need it skip with a clear message when it is absent."""
    root = datasets_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"shared datasets not found at {root} (set FACE_ASSETS_DATASETS)")
    return root
