"""The Dagster tests' workspace: a watched folder, a config file naming it, a data folder and a Dagster
instance, all temporary; and reading what a run stored (the catalog, an asset's metadata).

One helper for every test of the asset graph, so that they all run against the same deployment shape.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from dagster import AssetKey, DagsterInstance, Definitions, materialize

from face_assets.library import FaceRecognitionLibrary
from face_assets.pipeline.assets import ASSETS, image_batches
from face_assets.pipeline.definitions import ALL_ASSETS
from face_assets.pipeline.resources import FaceAssetsResource
from face_assets.pipeline.sensors import pending_batches
from face_assets.store import Catalog


def catalog_sql(data: Path, query: str, params=None) -> list[tuple]:
    """Rows of ``query`` on the published catalog of the data folder ``data`` (read-only)."""
    with Catalog(data / "face_assets.duckdb", read_only=True) as catalog:
        return catalog.query(query, params)


def latest_metadata(instance: DagsterInstance, asset: str, partition: str | None = None) -> dict[str, Any]:
    """The metadata of ``asset``'s latest materialization (of ``partition``, when given), as plain values."""
    event = instance.get_latest_materialization_event(AssetKey(asset))
    if partition is not None:
        records = instance.fetch_materializations(AssetKey(asset), limit=50).records
        event = next(r.event_log_entry for r in records if r.partition_key == partition)
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def run_as_the_automation(instance: DagsterInstance, resources: dict, *assets):
    """Materialize ``assets`` as the automation sensor's run would: one run of the asset job that records
    its asset selection, which the automation conditions read (an in-process ``materialize()`` run
    records none, so it would look like a run outside the automation)."""
    job = Definitions(assets=ALL_ASSETS, resources=resources).resolve_implicit_global_asset_job_def()
    return job.execute_in_process(instance=instance, asset_selection=[a.key for a in assets])


class Workspace:
    """A watched folder (``photos``), a config file naming it, a data folder (``data``), fresh or a copy of
    ``indexed``, and a Dagster instance (``home``), under ``root``.

    ``pipeline`` is merged into the config's ``pipeline`` section (which watches ``photos`` and does not
    wait for files to settle); ``sections`` are further config sections.
    """

    def __init__(self, root: Path, datasets: Path, files: list[str] = (), *, indexed: Path | None = None,
                 pipeline: dict | None = None, **sections: dict):
        self.root, self.datasets = root, datasets
        self.photos, self.data, self.home = root / "photos", root / "data", root / "home"
        self.photos.mkdir(parents=True)
        self.home.mkdir()
        if indexed is not None:
            shutil.copytree(indexed, self.data)
        self.add(files)
        self.config = root / "face_assets.yaml"
        self.config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(self.data)},
            "pipeline": {"watched_folders": [str(self.photos)], "settle_seconds": 0} | (pipeline or {}),
        } | sections))
        self.resource = FaceAssetsResource(config_path=str(self.config))
        self.resources = {"face_assets": self.resource}
        # As the project's dagster.yaml: one step at a time in each pool (the catalog writers).
        self.instance = DagsterInstance.local_temp(str(self.home), overrides={
            "telemetry": {"enabled": False}, "concurrency": {"pools": {"default_limit": 1}}})

    def add(self, files: list[str]) -> None:
        """Copy shared images into the watched folder (names prefixed by their dataset folder)."""
        for rel in files:
            shutil.copy(self.datasets / rel, self.photos / rel.replace("/", "_"))

    def plan(self) -> list[str]:
        """New batches for the watched folder, added as partitions as the sensor would."""
        keys = pending_batches(self.resource, set(self.instance.get_dynamic_partitions(image_batches.name)))
        self.instance.add_dynamic_partitions(image_batches.name, keys)
        return keys

    def materialize(self, key: str, selection=None, **kwargs):
        """The ingest graph (or ``selection`` of it) for one partition, in process."""
        return materialize(ASSETS, selection=selection, partition_key=key, instance=self.instance,
                           resources=self.resources, **kwargs)

    def sql(self, query: str, params=None) -> list[tuple]:
        """Read the published catalog."""
        return catalog_sql(self.data, query, params)

    def metadata(self, asset: str, partition: str | None = None) -> dict[str, Any]:
        """The metadata of ``asset``'s latest materialization in this workspace's instance."""
        return latest_metadata(self.instance, asset, partition)

    def library(self) -> FaceRecognitionLibrary:
        """The user's library on the workspace's data folder."""
        return FaceRecognitionLibrary(settings=self.resource.settings)

    def run_config(self, **execution) -> dict:
        """Run config for a reconstructable job: this workspace's resource (and an executor)."""
        config = {"resources": {"face_assets": {"config": {"config_path": str(self.config)}}}}
        return config | ({"execution": {"config": execution}} if execution else {})
