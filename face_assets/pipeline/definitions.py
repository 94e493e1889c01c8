"""``defs``: what ``dagster dev``, ``dagster asset materialize`` and the webserver load (``workspace.yaml``).

Jobs:

- ``ingest_images``: one batch (partition) through source images, filtered images (and its
  blocking check) and face embeddings; what the new-image sensor requests. Its runs carry
  Dagster's run-retry tags: a failed batch is launched again up to ``pipeline.max_partition_retries``.
- ``refresh_index``: the ANN index and its check, over everything merged so far.
- ``retrain_model``: feedback pairs exported and a candidate fine-tuned (and promoted, with
  ``pipeline.auto_promote``, when its gate passed); what the retraining sensor requests.
- ``reembed_catalog``: the catalog re-embedded by the active model version, then the ANN index;
  what the re-embedding sensor requests after a promotion.
- ``update_clusters``: person clusters (incremental, or full when due).
- ``nightly_refresh``: the ANN index and the person clusters; what the nightly schedule runs.

``face-assets pipeline`` launches these jobs (:func:`resolve_job`). The daemon requests the ANN index
and the person clusters declaratively (their ``AutomationCondition``, evaluated by one automation
sensor, so that both come in one run after a merge).

Every job's runs carry the tag ``face_assets/executor`` (:data:`EXECUTOR_TAG`): the UI shows where
their steps ran; and the tag ``face_assets/lane`` (:data:`LANE_TAG`): ``ingest``, ``index`` or
``background``. ``dagster.yaml`` gives each lane its own run slots, so that a long re-clustering or
fine-tuning never holds the slots a new batch and its index run need to become searchable.

``pipeline.executor`` (and ``pipeline.dask_scheduler``) choose where the ingest steps run;
:func:`build_ingest_job` binds the job to another executor per call. See ``docs/scaling.md``.
"""

from __future__ import annotations

from dagster import (
    AssetsDefinition,
    AssetSelection,
    Definitions,
    ExecutorDefinition,
    JobDefinition,
    define_asset_job,
    in_process_executor,
    multiprocess_executor,
)

from ..config import PipelineSettings, load_settings
from .assets import ASSETS, ann_index, image_batches
from .clusters import CLUSTER_ASSETS, person_clusters
from .learning import LEARNING_ASSETS, feedback_pairs, fine_tuned_model, promoted_model, reembedded_catalog
from .resources import FaceAssetsResource
from .sensors import (
    build_automation_sensor,
    build_new_images_sensor,
    build_nightly_schedule,
    build_reembed_sensor,
    build_retraining_sensor,
    retry_tags,
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


EXECUTOR_TAG = "face_assets/executor"
"""Run tag naming the executor of the run's steps (``in_process``, ``multiprocess``, ``dask``)."""

IN_PROCESS = {EXECUTOR_TAG: "in_process"}
"""The tag of every run but the ingest runs: ``defs`` runs their steps in the run's process."""

LANE_TAG = "face_assets/lane"
"""Run tag of the run queue's lanes, each with its own limit in ``dagster.yaml``
(``concurrency.runs.tag_concurrency_limits``): a new batch (``ingest``), the index and clusters
that make it searchable (``index``), and the long runs that can wait (``background``: full
re-clustering, fine-tuning, re-embedding, the nightly refresh)."""

INGEST_LANE, INDEX_LANE, BACKGROUND_LANE = ({LANE_TAG: lane} for lane in ("ingest", "index", "background"))


def _ingest_job(executor: str, executor_def: ExecutorDefinition, max_retries: int = 0):
    partitioned = [a for a in ASSETS if isinstance(a, AssetsDefinition) and a.partitions_def == image_batches]
    return define_asset_job(INGEST_JOB, selection=AssetSelection.assets(*partitioned), executor_def=executor_def,
                            tags=retry_tags(max_retries) | {EXECUTOR_TAG: executor} | INGEST_LANE,
                            description="One batch of new images filtered, checked, embedded and merged into the "
                            "catalog.")


def _executor(name: str) -> ExecutorDefinition:
    if name == "in_process":
        return in_process_executor
    if name == "multiprocess":
        return multiprocess_executor
    if name == "dask":
        from .executors import dask_executor  # optional: pip install 'face_assets[distributed]'

        return dask_executor
    raise ValueError(f"unknown executor {name!r}; use in_process, multiprocess or dask")


def _settings_executor(cfg: PipelineSettings) -> ExecutorDefinition:
    """The executor ``pipeline.executor`` names, configured: Dask on ``pipeline.dask_scheduler``, else a local cluster."""
    if cfg.executor == "dask":
        cluster = {"existing": {"address": cfg.dask_scheduler}} if cfg.dask_scheduler else {"local": {}}
        return _executor("dask").configured({"cluster": cluster})
    return _executor(cfg.executor)


def build_ingest_job(executor: str = "multiprocess") -> JobDefinition:
    """The ``ingest_images`` job on the named executor, resolved against the assets.

    For ``dagster.build_reconstructable_job`` callers (tests, scripts) that pick the executor per
    call; executor settings (e.g. a Dask scheduler address) come with the run config.
    """
    job = _ingest_job(executor, _executor(executor))
    return Definitions(assets=ALL_ASSETS, resources=RESOURCES, jobs=[job]).resolve_job_def(INGEST_JOB)


def build_retrain_job(auto_promote: bool):
    """The ``retrain_model`` job: export and fine-tune, and promote too when ``auto_promote``.

    Promotion follows the blocking gate check of ``fine_tuned_model``: a rejected candidate stops
    the run before ``promoted_model``.
    """
    selected = [feedback_pairs, fine_tuned_model] + ([promoted_model] if auto_promote else [])
    return define_asset_job(RETRAIN_JOB, selection=AssetSelection.assets(*selected),
                            tags=IN_PROCESS | BACKGROUND_LANE,
                            description="Export the feedback, fine-tune a candidate and gate it"
                            + (", promote it when it passed." if auto_promote else "."))


def _jobs(cfg: PipelineSettings) -> list:
    ingest = _ingest_job(cfg.executor, _settings_executor(cfg), cfg.max_partition_retries)
    # The other jobs run in the run's own process (the default of ``defs``): their steps are a chain,
    # and a step process would only add its start-up (imports, models).
    refresh = define_asset_job(REFRESH_JOB, selection=AssetSelection.assets(ann_index), tags=IN_PROCESS | INDEX_LANE,
                               description="Bring the ANN index up to date with the catalog, check it, publish it.")
    reembed = define_asset_job(REEMBED_JOB, selection=AssetSelection.assets(reembedded_catalog, ann_index),
                               tags=IN_PROCESS | BACKGROUND_LANE,
                               description="Re-embed the catalog with the active model version, then the index.")
    clusters = define_asset_job(CLUSTER_JOB, selection=AssetSelection.assets(person_clusters),
                                tags=IN_PROCESS | BACKGROUND_LANE,
                                description="Assign new faces to person clusters, or re-cluster fully when due.")
    nightly = define_asset_job(NIGHTLY_JOB, selection=AssetSelection.assets(ann_index, person_clusters),
                               tags=IN_PROCESS | BACKGROUND_LANE,
                               description="The ANN index and the person clusters over the whole catalog, with checks.")
    return [ingest, refresh, build_retrain_job(cfg.auto_promote), reembed, clusters, nightly]


def build_definitions() -> Definitions:
    """Assets, jobs, sensors and schedules, with intervals, executor and retries from the settings."""
    cfg = load_settings().pipeline
    schedule = build_nightly_schedule(NIGHTLY_JOB, cfg)
    return Definitions(
        assets=ALL_ASSETS,
        jobs=_jobs(cfg),
        sensors=[build_new_images_sensor(INGEST_JOB, cfg),
                 build_automation_sensor("index_and_clusters_automation", [ann_index, person_clusters],
                                         cfg.index_refresh_seconds,
                                         retry_tags(cfg.max_partition_retries) | IN_PROCESS | INDEX_LANE),
                 build_retraining_sensor(RETRAIN_JOB, cfg), build_reembed_sensor(REEMBED_JOB, cfg)],
        schedules=[schedule] if schedule else [],
        resources=RESOURCES,
        executor=in_process_executor,
    )


def resolve_job(name: str, pipeline_json: str) -> JobDefinition:
    """The job ``name`` as :data:`defs` defines it for the ``pipeline`` settings given as JSON.

    For ``build_reconstructable_job``: ``face-assets pipeline`` launches the code location's own
    jobs through it, with the settings it runs with, and every step process (or Dask worker)
    rebuilds the same job from the same arguments without reading a config file.
    """
    cfg = PipelineSettings.model_validate_json(pipeline_json)
    return Definitions(assets=ALL_ASSETS, resources=RESOURCES, jobs=_jobs(cfg),
                       executor=in_process_executor).resolve_job_def(name)


defs = build_definitions()
