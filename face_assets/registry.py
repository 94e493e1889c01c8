"""Where recognizer versions live and how a version name resolves to its ONNX file.

The registry rows are in the catalog (``model_versions``, see :mod:`face_assets.store`); the files are
under the data folder, ``<data_dir>/models/versions/<version>.onnx``, stored relative to ``data_dir``
so a data folder can move. Version ``base`` is the model pack's own recognizer. Nothing here needs
torch: listing, promoting and rolling back work without the training extra.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from .config import Settings
from .errors import ModelVersionError
from .models import ModelPack
from .store import Catalog

BASE = "base"


def versions_dir(settings: Settings) -> Path:
    """Folder of the fine-tuned recognizer files."""
    return Path(settings.storage.data_dir) / "models" / "versions"


def runs_dir(settings: Settings) -> Path:
    """Folder of the training runs (checkpoints, curves, exported candidates)."""
    return Path(settings.storage.data_dir) / "models" / "runs"


def new_version_name(sha256: str) -> str:
    """A sortable, unique version name: UTC time of creation and the start of the file hash."""
    return f"ft-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{sha256[:8]}"


def ensure_base(catalog: Catalog, pack: ModelPack) -> None:
    """Register the pack's own recognizer as version ``base`` (promoted when nothing else is).

    Writes only the first time, so opening a library for reading takes no write session.
    """
    if catalog.promoted_model() is not None and any(r["version"] == BASE for r in catalog.model_versions()):
        return
    catalog.add_model_version(BASE, None, None, pack.recognizer_sha256, "retired")
    if catalog.promoted_model() is None:
        catalog.promote_model(BASE, action="initial")


def version_row(catalog: Catalog, version: str) -> dict:
    """The registry row of ``version``; :class:`ModelVersionError` when unknown."""
    for row in catalog.model_versions():
        if row["version"] == version:
            return row
    known = ", ".join(r["version"] for r in catalog.model_versions()) or "none"
    raise ModelVersionError(f"unknown model version '{version}' (known: {known})")


def failed_gate(row: dict) -> bool:
    """Whether a registry row is a candidate the evaluation gate rejected (its status may have moved on since)."""
    return not ((row.get("metrics") or {}).get("gate") or {"passed": True})["passed"]


def model_file(catalog: Catalog, settings: Settings, pack: ModelPack, version: str) -> Path:
    """The ONNX file of ``version`` (the pack's recognizer for ``base``), checked to exist."""
    if version == BASE:
        return pack.recognizer
    row = version_row(catalog, version)
    path = Path(settings.storage.data_dir) / row["path"]
    if not path.is_file():
        raise ModelVersionError(f"model version '{version}': file {path} is missing")
    return path


def active_version(catalog: Catalog, settings: Settings) -> str:
    """The version the library should run: ``training.active_model`` if set, else the promoted one."""
    return settings.training.active_model or catalog.promoted_model() or BASE
