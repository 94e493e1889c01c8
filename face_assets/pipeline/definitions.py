"""``defs``: what ``dagster dev``, ``dagster asset materialize`` and the webserver load (``workspace.yaml``).

Jobs:

- ``ingest_images``: one batch (partition) through source images, filtered images and face
  embeddings, then the ANN index; what the new-image sensor requests.
- ``index_maintenance``: the ANN index and its checks alone; what the nightly schedule runs.

:func:`build_ingest_job` returns ``ingest_images`` bound to another executor (``multiprocess``,
``in_process`` or ``dask``) for running the steps elsewhere; see ``docs/scaling.md``.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    Definitions,
    ExecutorDefinition,
    JobDefinition,
    define_asset_job,
    in_process_executor,
    multiprocess_executor,
)

from ..config import load_settings
from .assets import ASSETS, ann_index
from .resources import FaceAssetsResource
from .sensors import build_new_images_sensor, build_nightly_schedule

INGEST_JOB = "ingest_images"
MAINTENANCE_JOB = "index_maintenance"

RESOURCES = {"face_assets": FaceAssetsResource()}
"""Default resources: settings from ``$FACE_ASSETS_CONFIG`` and the environment, like the CLI."""


def _ingest_job(executor_def: ExecutorDefinition | None = None):
    return define_asset_job(INGEST_JOB, selection=AssetSelection.assets(*ASSETS),
                            executor_def=executor_def,
                            description="One batch of new images into the catalog, then the ANN index.")


def _executor(name: str) -> ExecutorDefinition:
    if name == "in_process":
        return in_process_executor
    if name == "multiprocess":
        return multiprocess_executor
    if name == "dask":
        from .executors import dask_executor  # optional: pip install 'face_assets[distributed]'

        return dask_executor
    raise ValueError(f"unknown executor {name!r}; use in_process, multiprocess or dask")


def build_ingest_job(executor: str = "multiprocess") -> JobDefinition:
    """The ``ingest_images`` job on the named executor, resolved against the assets.

    Give ``dagster.reconstructable``-style callers (``build_reconstructable_job``) this module and
    function name; executor settings (e.g. a Dask scheduler address) come with the run config.
    """
    job = _ingest_job(_executor(executor))
    return Definitions(assets=ASSETS, resources=RESOURCES, jobs=[job]).resolve_job_def(INGEST_JOB)


def build_definitions() -> Definitions:
    """Assets, jobs, sensors and schedules, with intervals and cron from the settings."""
    cfg = load_settings().pipeline
    ingest = _ingest_job()
    maintenance = define_asset_job(MAINTENANCE_JOB, selection=AssetSelection.assets(ann_index),
                                   description="Bring the ANN index up to date with the catalog and check it.")
    schedule = build_nightly_schedule(MAINTENANCE_JOB, cfg)
    return Definitions(
        assets=ASSETS,
        jobs=[ingest, maintenance],
        sensors=[build_new_images_sensor(INGEST_JOB, cfg)],
        schedules=[schedule] if schedule else [],
        resources=RESOURCES,
    )


defs = build_definitions()
