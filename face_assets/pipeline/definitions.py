"""``defs``: what ``dagster dev``, ``dagster asset materialize`` and the webserver load (``workspace.yaml``).

Jobs:

- ``ingest_images``: one batch (partition) through source images, filtered images and face
  embeddings; what the new-image sensor requests.
- ``refresh_index``: the ANN index and its check, over everything merged so far; what the index
  sensor (after new batches) and the nightly schedule request.
- ``retrain_model``: feedback pairs exported and a candidate fine-tuned (and promoted, with
  ``pipeline.auto_promote``, when its gate passed); what the retraining sensor requests.
- ``reembed_catalog``: the catalog re-embedded by the active model version, then the ANN index;
  what the re-embedding sensor requests after a promotion.
- ``update_clusters``: person clusters (incremental, or full when due); what the cluster sensor requests.
- ``nightly_refresh``: the ANN index and the person clusters; what the nightly schedule runs.

``pipeline.executor`` (and ``pipeline.dask_scheduler``) choose where the ingest steps run;
:func:`build_ingest_job` binds the job to another executor per call. See ``docs/scaling.md``.
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
from .assets import ASSETS, ann_index, image_batches
from .clusters import CLUSTER_ASSETS, person_clusters
from .learning import LEARNING_ASSETS, feedback_pairs, fine_tuned_model, promoted_model, reembedded_catalog
from .resources import FaceAssetsResource
from .sensors import (
    build_cluster_sensor,
    build_index_sensor,
    build_new_images_sensor,
    build_nightly_schedule,
    build_reembed_sensor,
    build_retraining_sensor,
)

INGEST_JOB = "ingest_images"
REFRESH_JOB = "refresh_index"
RETRAIN_JOB = "retrain_model"
REEMBED_JOB = "reembed_catalog"
CLUSTER_JOB = "update_clusters"
NIGHTLY_JOB = "nightly_refresh"
ALL_ASSETS = ASSETS + CLUSTER_ASSETS + LEARNING_ASSETS
"""Every asset of the graph: ingest and index, person clusters, then learning from feedback."""

RESOURCES = {"face_assets": FaceAssetsResource()}
"""Default resources: settings from ``$FACE_ASSETS_CONFIG`` and the environment, like the CLI."""


def _ingest_job(executor_def: ExecutorDefinition | None = None):
    partitioned = [a for a in ASSETS if a.partitions_def == image_batches]
    return define_asset_job(INGEST_JOB, selection=AssetSelection.assets(*partitioned), executor_def=executor_def,
                            description="One batch of new images filtered, embedded and merged into the catalog.")


def _executor(name: str, dask_scheduler: str | None = None) -> ExecutorDefinition:
    if name == "in_process":
        return in_process_executor
    if name == "multiprocess":
        return multiprocess_executor
    if name == "dask":
        from .executors import dask_executor  # optional: pip install 'face_assets[distributed]'

        if dask_scheduler:
            return dask_executor.configured({"cluster": {"existing": {"address": dask_scheduler}}})
        return dask_executor
    raise ValueError(f"unknown executor {name!r}; use in_process, multiprocess or dask")


def build_ingest_job(executor: str = "multiprocess") -> JobDefinition:
    """The ``ingest_images`` job on the named executor, resolved against the assets.

    For ``dagster.build_reconstructable_job`` callers (tests, scripts) that pick the executor per
    call; executor settings (e.g. a Dask scheduler address) come with the run config.
    """
    job = _ingest_job(_executor(executor))
    return Definitions(assets=ALL_ASSETS, resources=RESOURCES, jobs=[job]).resolve_job_def(INGEST_JOB)


def build_retrain_job(auto_promote: bool):
    """The ``retrain_model`` job: export and fine-tune, and promote too when ``auto_promote``.

    Promotion follows the blocking gate check of ``fine_tuned_model``: a rejected candidate stops
    the run before ``promoted_model``.
    """
    selected = [feedback_pairs, fine_tuned_model] + ([promoted_model] if auto_promote else [])
    return define_asset_job(RETRAIN_JOB, selection=AssetSelection.assets(*selected),
                            description="Export the feedback, fine-tune a candidate and gate it"
                            + (", promote it when it passed." if auto_promote else "."))


def build_definitions() -> Definitions:
    """Assets, jobs, sensors and schedules, with intervals and cron from the settings."""
    cfg = load_settings().pipeline
    # Dagster's default executor is multiprocess and still lets a run choose in_process in its config.
    ingest = _ingest_job(None if cfg.executor == "multiprocess" else _executor(cfg.executor, cfg.dask_scheduler))
    refresh = define_asset_job(REFRESH_JOB, selection=AssetSelection.assets(ann_index),
                               description="Bring the ANN index up to date with the catalog and check it.")
    reembed = define_asset_job(REEMBED_JOB, selection=AssetSelection.assets(reembedded_catalog, ann_index),
                               description="Re-embed the catalog with the active model version, then the index.")
    clusters = define_asset_job(CLUSTER_JOB, selection=AssetSelection.assets(person_clusters),
                                description="Assign new faces to person clusters, or re-cluster fully when due.")
    nightly = define_asset_job(NIGHTLY_JOB, selection=AssetSelection.assets(ann_index, person_clusters),
                               description="The ANN index and the person clusters over the whole catalog, with checks.")
    schedule = build_nightly_schedule(NIGHTLY_JOB, cfg)
    return Definitions(
        assets=ALL_ASSETS,
        jobs=[ingest, refresh, build_retrain_job(cfg.auto_promote), reembed, clusters, nightly],
        sensors=[build_new_images_sensor(INGEST_JOB, cfg), build_index_sensor(REFRESH_JOB, cfg),
                 build_cluster_sensor(CLUSTER_JOB, cfg), build_retraining_sensor(RETRAIN_JOB, cfg),
                 build_reembed_sensor(REEMBED_JOB, cfg)],
        schedules=[schedule] if schedule else [],
        resources=RESOURCES,
    )


defs = build_definitions()
