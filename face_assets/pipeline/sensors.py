"""Automation: the new-image, retraining and re-embedding sensors, the automation sensors, the nightly schedule.

Each sensor or schedule is built from the settings by a small factory, so the interval, folders
and cron live in the config file like every other setting. What follows from an asset update
alone (the index after merges, the person clusters after the index) is declarative
(``AutomationCondition`` on the assets, evaluated by :func:`build_automation_sensor`); what needs
a look outside the instance (files, votes, the model registry) is a sensor.
"""

import json
import time
from dataclasses import dataclass
from datetime import datetime

import duckdb
from dagster import (
    AssetsDefinition,
    AssetSelection,
    AutomationConditionSensorDefinition,
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
from ..errors import FeedbackStoreUnavailableError
from ..feedback import FeedbackStore
from .assets import image_batches
from .learning import promoted_model
from .resources import FaceAssetsResource


SETTLING_NAMED = 5
"""How many of the files still settling a sensor tick names (then: "and N more")."""


@dataclass(frozen=True)
class Plan:
    """What a look at the watched folders gave: the batches to run, and the files still settling."""

    keys: list[str]
    settling: list[str]


def plan_batches(face_assets: FaceAssetsResource, registered: set[str], wait: bool = False) -> Plan:
    """Plan batches for the new contents of the watched folders; returns every batch not yet ``registered``.

    Files are identified by content and read only once settled (:mod:`.batches`); with ``wait``,
    files still settling are waited for (``pipeline.settle_seconds``) and planned too, as the
    foreground command does. Batches planned by an earlier evaluation that never got their
    partition (a crash between the two) are returned again, so no file is lost.
    """
    cfg = face_assets.settings.pipeline
    store = face_assets.batches()
    found = store.scan(face_assets.watched_folders(), cfg.extensions, cfg.recursive, cfg.settle_seconds)
    if wait and found.settling:
        time.sleep(cfg.settle_seconds)
        found = store.scan(face_assets.watched_folders(), cfg.extensions, cfg.recursive, cfg.settle_seconds)
    store.plan(found.files, cfg.batch_size)
    return Plan([key for key in store.keys() if key not in registered], found.settling)


def pending_batches(face_assets: FaceAssetsResource, registered: set[str], wait: bool = False) -> list[str]:
    """The keys of :func:`plan_batches`: every planned batch not yet ``registered``."""
    return plan_batches(face_assets, registered, wait).keys


def settling_note(paths: list[str]) -> str:
    """The files still settling, named (the first :data:`SETTLING_NAMED`), for a sensor tick's message."""
    named = ", ".join(paths[:SETTLING_NAMED]) + (f" and {len(paths) - SETTLING_NAMED} more"
                                                 if len(paths) > SETTLING_NAMED else "")
    return f"{len(paths)} file(s) waiting to settle: {named}" if paths else ""


def build_new_images_sensor(job_name: str, cfg: PipelineSettings) -> SensorDefinition:
    """Sensor that turns new files of the watched folders into partitions, and requests a run of ``job_name`` for each."""

    @sensor(name="new_images_sensor", job_name=job_name, minimum_interval_seconds=cfg.sensor_interval_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Scans pipeline.watched_folders; new contents become batches (dynamic partitions) "
            "and each batch gets one run of the ingest job (retried up to pipeline.max_partition_retries).")
    def new_images_sensor(context: SensorEvaluationContext, face_assets: FaceAssetsResource):
        registered = set(context.instance.get_dynamic_partitions(image_batches.name))
        plan = plan_batches(face_assets, registered)
        keys, waiting = plan.keys, settling_note(plan.settling)
        if not keys:
            return SkipReason(f"no new images; {waiting}" if waiting else "no new images")
        context.log.info("%d new batch(es): %s%s", len(keys), ", ".join(keys), f"; {waiting}" if waiting else "")
        # run_key = partition key: a batch is requested once, even if two ticks see it.
        return SensorResult(
            run_requests=[RunRequest(partition_key=key, run_key=key) for key in keys],
            dynamic_partitions_requests=[image_batches.build_add_request(keys)],
        )

    return new_images_sensor


def build_automation_sensor(name: str, assets: list[AssetsDefinition], interval_seconds: int,
                            run_tags: dict[str, str]) -> AutomationConditionSensorDefinition:
    """Sensor evaluating the ``AutomationCondition`` of ``assets`` every ``interval_seconds``, with ``run_tags``.

    One sensor for assets that follow each other (the index, then the clusters): when both are due on
    one tick they come in one run, so the second does not wait for another tick and another run's
    start-up. A tick with nothing new reads the event log only.
    """
    names = ", ".join(a.key.to_user_string() for a in assets)
    return AutomationConditionSensorDefinition(
        name, target=AssetSelection.assets(*assets), minimum_interval_seconds=interval_seconds,
        default_status=DefaultSensorStatus.RUNNING, run_tags=run_tags,
        description=f"Requests {names} when their automation conditions hold (after the data of their upstream "
        "assets changed and passed their blocking checks).")


def retry_tags(max_retries: int) -> dict[str, str]:
    """Run tags for Dagster's run retries: up to ``max_retries`` new runs, each from the failed step on."""
    return {"dagster/max_retries": str(max_retries), "dagster/retry_strategy": "FROM_FAILURE"}


def build_nightly_schedule(job_name: str, cfg: PipelineSettings) -> ScheduleDefinition | None:
    """The nightly schedule of ``job_name`` at ``pipeline.nightly_cron``, or None when unset."""
    if not cfg.nightly_cron:
        return None
    return ScheduleDefinition(name="nightly_refresh", cron_schedule=cfg.nightly_cron, job_name=job_name,
                              default_status=DefaultSensorStatus.RUNNING,
                              description="Refreshes what depends on the whole catalog (the ANN index, the person "
                              "clusters: a full re-clustering when the drift policy says so) and runs the checks.")


def new_votes(face_assets: FaceAssetsResource, since: datetime | None) -> tuple[int, datetime | None]:
    """Votes cast or changed after ``since`` (all when None), and the time of the newest; read without writing.

    The store is ``feedback.backend``: the published views of the DuckDB feedback store (no votes
    before it exists), or the PostgreSQL server.
    """
    settings = face_assets.settings
    postgres = settings.feedback.backend == "postgresql"
    if not postgres and not settings.storage.feedback_path.is_file():
        return 0, None
    store = FeedbackStore.open(settings, read_only=not postgres)
    try:
        return store.votes_since(since)
    finally:
        store.close()


def build_retraining_sensor(job_name: str, cfg: PipelineSettings) -> SensorDefinition:
    """Sensor requesting ``job_name`` (export and fine-tune) once ``pipeline.retrain_min_new_votes`` new votes arrived.

    Its cursor holds the time of the newest vote handed to a training run (and how many votes that
    run got): votes cast or changed after it are new. A tick that cannot read the store (the
    published file unreadable at that moment, or no PostgreSQL server) is skipped and the next one
    counts again.
    """

    @sensor(name="retraining_sensor", job_name=job_name, minimum_interval_seconds=cfg.retrain_check_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Requests a fine-tuning run when pipeline.retrain_min_new_votes votes were cast or changed "
            "since the last one.")
    def retraining_sensor(context: SensorEvaluationContext, face_assets: FaceAssetsResource):
        cursor = json.loads(context.cursor) if context.cursor else {}
        since = datetime.fromisoformat(cursor["last_vote_at"]) if cursor.get("last_vote_at") else None
        try:
            count, last = new_votes(face_assets, since)
        except (duckdb.IOException, FeedbackStoreUnavailableError) as exc:  # a run holds the file, or no server
            return SkipReason(f"feedback store not readable now: {exc}")
        threshold = face_assets.settings.pipeline.retrain_min_new_votes
        if count < threshold:
            return SkipReason(f"{count} new vote(s) since the last training, waiting for {threshold}")
        context.update_cursor(json.dumps({"last_vote_at": last.isoformat(), "votes": count}))
        context.log.info("%d new votes (newest %s): requesting a fine-tuning run", count, last)
        return RunRequest(run_key=f"retrain-{last.isoformat()}", tags={"face_assets/new_votes": str(count)})

    return retraining_sensor


def build_reembed_sensor(job_name: str, cfg: PipelineSettings) -> SensorDefinition:
    """Sensor requesting ``job_name`` (re-embed the catalog, refresh the index) when the active model version changes.

    Its cursor is the version seen last (the registry's promoted one, or ``training.active_model``).
    The first tick only records it. A promotion made by the graph's own ``promoted_model`` has
    already re-embedded the catalog and needs no run.
    """

    @sensor(name="reembed_sensor", job_name=job_name, minimum_interval_seconds=cfg.reembed_check_seconds,
            default_status=DefaultSensorStatus.RUNNING,
            description="Re-embeds the catalog and refreshes the index when another model version was promoted.")
    def reembed_sensor(context: SensorEvaluationContext, face_assets: FaceAssetsResource):
        try:
            version = face_assets.active_recognizer()[0]
        except duckdb.IOException as exc:
            return SkipReason(f"catalog not readable now: {exc}")
        if context.cursor is None or context.cursor == version:
            context.update_cursor(version)
            return SkipReason(f"model version {version} is still the active one")
        previous = context.cursor
        context.update_cursor(version)
        event = context.instance.get_latest_materialization_event(promoted_model.key)
        if event is not None and event.asset_materialization.metadata["version"].value == version:
            return SkipReason(f"{version} was promoted by promoted_model, which re-embedded the catalog")
        context.log.info("model version %s replaced %s: requesting re-embedding", version, previous)
        # No run key: the cursor makes one request per change, and a version may come back after a rollback.
        return RunRequest(tags={"face_assets/model_version": version})

    return reembed_sensor
