"""Automation: the new-image sensor, the index sensor and the optional nightly schedule.

Each sensor or schedule is built from the settings by a small factory, so the interval, folders
and cron live in the config file like every other setting. Sensors that follow the same pattern
(a threshold from the settings, a cursor over materializations, run requests for a job) go here.
"""

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from ..config import PipelineSettings
from .assets import face_embeddings, image_batches
from .batches import scan
from .resources import FaceAssetsResource


def pending_batches(face_assets: FaceAssetsResource, registered: set[str]) -> list[str]:
    """Plan batches for the new files of the watched folders; returns every batch not yet ``registered``.

    Batches planned by an earlier evaluation that never got their partition (a crash between the
    two) are returned again, so no file is lost.
    """
    cfg = face_assets.settings.pipeline
    store = face_assets.batches()
    store.plan(scan(face_assets.watched_folders(), cfg.extensions, cfg.recursive), cfg.batch_size)
    return [key for key in store.keys() if key not in registered]


def build_new_images_sensor(job_name: str, cfg: PipelineSettings) -> SensorDefinition:
    """Sensor that turns new files of the watched folders into partitions, and requests a run of ``job_name`` for each."""

    @sensor(name="new_images_sensor", job_name=job_name, minimum_interval_seconds=cfg.sensor_interval_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Scans pipeline.watched_folders; new files become batches (dynamic partitions) "
            "and each batch gets one run of the ingest job.")
    def new_images_sensor(context: SensorEvaluationContext, face_assets: FaceAssetsResource):
        registered = set(context.instance.get_dynamic_partitions(image_batches.name))
        keys = pending_batches(face_assets, registered)
        if not keys:
            return SkipReason("no new images")
        context.log.info("%d new batch(es): %s", len(keys), ", ".join(keys))
        # run_key = partition key: a batch is requested once, even if two ticks see it.
        return SensorResult(
            run_requests=[RunRequest(partition_key=key, run_key=key) for key in keys],
            dynamic_partitions_requests=[image_batches.build_add_request(keys)],
        )

    return new_images_sensor


def build_index_sensor(job_name: str, cfg: PipelineSettings) -> SensorDefinition:
    """Sensor requesting a run of ``job_name`` (the ANN index) when batches were merged since the last one.

    Its cursor is the event storage id of the newest ``face_embeddings`` materialization already
    handed to a run, so the batches merged during one interval are indexed together: the index is
    loaded and saved once per interval, not once per batch.
    """

    @sensor(name="index_refresh_sensor", job_name=job_name, minimum_interval_seconds=cfg.index_refresh_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Requests an ANN index update when face_embeddings has new materializations.")
    def index_refresh_sensor(context: SensorEvaluationContext):
        records = context.instance.fetch_materializations(face_embeddings.key, limit=1).records
        if not records:
            return SkipReason("no batch merged yet")
        latest = records[0].storage_id
        if context.cursor is not None and latest <= int(context.cursor):
            return SkipReason("no batch merged since the last index update")
        context.update_cursor(str(latest))
        return RunRequest(run_key=f"index-{latest}")

    return index_refresh_sensor


def build_nightly_schedule(job_name: str, cfg: PipelineSettings) -> ScheduleDefinition | None:
    """The nightly schedule of ``job_name`` at ``pipeline.nightly_cron``, or None when unset."""
    if not cfg.nightly_cron:
        return None
    return ScheduleDefinition(name="nightly_refresh", cron_schedule=cfg.nightly_cron, job_name=job_name,
                              default_status=DefaultSensorStatus.RUNNING,
                              description="Refreshes what depends on the whole catalog (the ANN index) and runs its checks.")
