"""The library as a Dagster resource: settings, models, catalog and folders, configured in one place."""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from .. import registry
from ..config import Settings, load_settings
from ..filtering import FaceFilter
from ..library import FaceRecognitionLibrary
from ..models import resolve_pack
from ..store import Catalog
from .batches import BatchStore


@lru_cache(maxsize=4)
def _face_filter(config_path: str | None, data_dir: str | None, settings_json: str | None) -> FaceFilter:
    # Models load once per process and configuration: a run process (or Dask worker) that
    # materializes several steps reuses them.
    return FaceFilter(_load(config_path, data_dir, settings_json))


def _load(config_path: str | None, data_dir: str | None, settings_json: str | None = None) -> Settings:
    if settings_json is not None:
        return Settings.model_validate_json(settings_json)
    overrides: dict[str, Any] = {"storage": {"data_dir": data_dir}} if data_dir else {}
    return load_settings(config_path, overrides=overrides or None)


class FaceAssetsResource(ConfigurableResource):
    """face_assets configured for the graph: the same settings a user's ``FaceRecognitionLibrary`` reads.

    ``config_path`` defaults to ``$FACE_ASSETS_CONFIG`` and ``data_dir`` to ``storage.data_dir``
    (environment overrides ``FACE_ASSETS__SECTION__KEY`` apply as everywhere). ``settings_json``,
    when set, holds the whole settings inline instead (:meth:`portable`): how a step on another
    machine gets them without the config file or the environment.
    """

    config_path: str | None = None
    data_dir: str | None = None
    settings_json: str | None = None
    _settings: Settings | None = PrivateAttr(default=None)

    @property
    def settings(self) -> Settings:
        """The validated settings, read once per resource instance (Dagster makes one per run, sensor
        tick or step process, so a changed config file counts from the next one)."""
        if self._settings is None:
            self._settings = _load(self.config_path, self.data_dir, self.settings_json)
        return self._settings

    def portable(self) -> dict[str, str]:
        """Config of an equivalent resource that needs no file or environment: the settings inline,
        the data folder absolute (it must be mounted at the same path where the steps run)."""
        settings = self.settings
        storage = settings.storage.model_copy(update={"data_dir": Path(settings.storage.data_dir).absolute()})
        return {"settings_json": settings.model_copy(update={"storage": storage}).model_dump_json()}

    def batches(self) -> BatchStore:
        """The batch manifests (the dynamic partitions' contents)."""
        return BatchStore(self.settings.layout.batches.absolute())

    def watched_folders(self) -> list[Path]:
        """Folders to scan: ``pipeline.watched_folders``, else ``incoming/`` in the data folder (created if missing)."""
        folders = self.settings.pipeline.watched_folders
        if folders:
            return [Path(f).expanduser().absolute() for f in folders]
        incoming = self.incoming_dir
        incoming.mkdir(parents=True, exist_ok=True)
        return [incoming]

    @property
    def incoming_dir(self) -> Path:
        """The default watched folder: ``incoming/`` inside ``storage.data_dir``."""
        return self.settings.layout.incoming.absolute()

    def face_filter(self, recognizer: Path | None = None) -> FaceFilter:
        """Detector, recognizer and cartoon classifier, loaded once per process.

        ``recognizer`` (a registry version's ONNX file, see :meth:`active_recognizer`) replaces the
        pack's own, as the library does for the version it runs.
        """
        face_filter = _face_filter(self.config_path, self.data_dir, self.settings_json)
        if recognizer is not None:
            face_filter.analyzer.use_recognizer(recognizer)
        return face_filter

    def active_recognizer(self) -> tuple[str, Path, str]:
        """The registry version the library runs now, its ONNX file and its embedding tag.

        The library's own choice (:func:`face_assets.registry.active_model`), read from the catalog's
        master (a promotion counts at once) without loading the index or a model.

        Raises:
            ModelVersionError: the version is unknown or its file is missing.
        """
        settings = self.settings
        pack = resolve_pack(settings.models)
        if settings.layout.catalog_master.is_file():
            with Catalog.open(settings.storage) as catalog:
                version, model = registry.active_model(catalog, settings, pack)
        else:
            version, model = registry.active_model(None, settings, pack)
        return version, model, dataclasses.replace(pack, recognizer=model).model_version

    def catalog(self) -> Catalog:
        """The main DuckDB catalog's master, written in short sessions (see :mod:`face_assets.storage`)."""
        return Catalog.open(self.settings.storage)

    def library(self) -> FaceRecognitionLibrary:
        """The user-facing library over the main catalog and index (the index is read on first use)."""
        return FaceRecognitionLibrary(settings=self.settings)
