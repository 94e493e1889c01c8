"""The benchmark side of face_assets: research code that the runtime package does not ship.

Synthetic face libraries of known identities (:mod:`benchmarks.synthetic`), clustering metrics
(:mod:`benchmarks.metrics`) and the scripts that print a table against a baseline in the same run.
Run a script from the repository root, ``python benchmarks/cluster_scale.py`` or
``python -m benchmarks.cluster_scale``; their extra dependencies are ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

from pathlib import Path

from face_assets.config import datasets_root

REPO = Path(__file__).resolve().parents[1]


def shared_datasets() -> Path:
    """The shared labelled datasets beside this checkout, wherever a script is started from
    (``FACE_ASSETS_DATASETS`` wins)."""
    return datasets_root(base=REPO)
