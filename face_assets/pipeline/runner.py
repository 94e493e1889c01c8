"""``face-assets pipeline``: the main job of ``make run``, the code location's jobs launched on a Dagster instance.

It does once, in the foreground, what the daemon does with its sensors: plan batches for the new
contents of the watched folders, add them as partitions, launch an ``ingest_images`` run for each
partition not yet merged, then ``refresh_index`` when batches were merged since the last index and
``update_clusters`` when the index changed since the last clustering. The runs are ordinary runs of
those jobs (``execute_job`` of the definitions' own jobs, on ``pipeline.executor``), recorded in the
instance: ``dagster dev`` on the same ``DAGSTER_HOME`` shows them and re-executes them. A failed run
is re-executed from its failed step up to ``pipeline.max_partition_retries`` times, as the daemon's
run retries do. With nothing new, nothing runs.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dagster import (
    AssetKey,
    DagsterInstance,
    ReexecutionOptions,
    build_reconstructable_job,
    execute_job,
)

from .assets import ann_index, face_embeddings, image_batches
from .clusters import person_clusters
from .definitions import CLUSTER_JOB, INGEST_JOB, REFRESH_JOB
from .resources import FaceAssetsResource
from .sensors import pending_batches

Progress = Callable[[str], None]
"""Receives one line per run launched and finished."""


@dataclass
class RunRecord:
    """One run launched by :func:`run_pipeline` (after its retries): its job, partition, outcome and time."""

    job: str
    run_id: str
    partition: str | None
    success: bool
    attempts: int
    seconds: float


@dataclass
class PipelineRun:
    """What ``run_pipeline`` did: the partitions run, every run, and whether all of them succeeded."""

    partitions: list[str] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    success: bool = True

    @property
    def run_ids(self) -> dict[str, str]:
        """Run id of each partition run, and of the index and cluster runs by job name."""
        return {r.partition or r.job: r.run_id for r in self.runs}


def dagster_home(folder: str | os.PathLike | None = None) -> Path:
    """The instance folder: ``folder``, else ``$DAGSTER_HOME``, else the current folder (created if missing).

    The folder holds ``dagster.yaml``; the project's own one keeps all storage under ``data/dagster``.
    """
    home = Path(folder or os.environ.get("DAGSTER_HOME") or ".").absolute()
    home.mkdir(parents=True, exist_ok=True)
    return home


def open_instance(folder: str | os.PathLike | None = None) -> DagsterInstance:
    """The Dagster instance of :func:`dagster_home`."""
    return DagsterInstance.from_config(str(dagster_home(folder)))


def seed_incoming(face_assets: FaceAssetsResource, samples: Path | None) -> list[Path]:
    """On first use of the default watched folder, copy the sample photos of ``samples`` into it.

    Only when ``pipeline.watched_folders`` is unset and ``incoming/`` does not exist yet, so a fresh
    checkout has something to show; a folder the user emptied stays empty. Returns the files copied.
    """
    settings = face_assets.settings
    incoming = face_assets.incoming_dir
    if settings.pipeline.watched_folders or incoming.exists() or samples is None:
        return []
    incoming.mkdir(parents=True)
    endings = tuple(e.lower() for e in settings.pipeline.extensions)
    return [Path(shutil.copy(p, incoming / p.name)) for p in sorted(samples.iterdir())
            if p.is_file() and p.name.lower().endswith(endings)]


def _latest(instance: DagsterInstance, *keys: AssetKey) -> int:
    """Event storage id of the newest materialization of any of ``keys`` (0 when none)."""
    ids = [r.storage_id for key in keys for r in instance.fetch_materializations(key, limit=1).records]
    return max(ids, default=0)


class _Launcher:
    """Launches the definitions' jobs for one set of settings, re-executing failed runs from failure."""

    def __init__(self, instance: DagsterInstance, face_assets: FaceAssetsResource, progress: Progress,
                 verbose: bool):
        self.instance, self.progress = instance, progress
        settings = face_assets.settings
        self.pipeline_json = settings.pipeline.model_dump_json()
        self.max_retries = settings.pipeline.max_partition_retries
        # Absolute paths: the step processes, and a re-execution from the UI, may run in another folder.
        resource = {k: str(Path(v).absolute()) if k in ("config_path", "data_dir") else v
                    for k, v in face_assets.model_dump().items() if v is not None}
        self.run_config = {"resources": {"face_assets": {"config": resource}},
                           # DEBUG lists every Dagster event; the summary lines say what matters.
                           "loggers": {"console": {"config": {"log_level": "DEBUG" if verbose else "WARNING"}}}}

    def launch(self, job_name: str, partition: str | None = None) -> RunRecord:
        """Run ``job_name`` (on ``partition``) to the end; a failed run is re-executed from its failed step."""
        job = build_reconstructable_job("face_assets.pipeline.definitions", "resolve_job",
                                        reconstructable_args=(job_name, self.pipeline_json))
        tags = {"dagster/partition": partition} if partition else {}
        start = time.perf_counter()
        what = f"{job_name}" + (f" [{partition}]" if partition else "")
        with execute_job(job, self.instance, run_config=self.run_config, tags=tags, raise_on_error=False) as result:
            run_id, success = result.run_id, result.success
        attempts = 1
        while not success and attempts <= self.max_retries:
            self.progress(f"{what}: run {run_id[:8]} failed, re-executing from the failed step "
                          f"({attempts}/{self.max_retries})")
            options = ReexecutionOptions.from_failure(run_id, self.instance)
            with execute_job(job, self.instance, reexecution_options=options, tags=tags,
                             raise_on_error=False) as result:
                run_id, success = result.run_id, result.success
            attempts += 1
        record = RunRecord(job_name, run_id, partition, success, attempts, round(time.perf_counter() - start, 1))
        self.progress(f"{what}: run {run_id[:8]} {'succeeded' if success else 'FAILED'} in {record.seconds} s")
        return record


def run_pipeline(instance: DagsterInstance, face_assets: FaceAssetsResource | None = None,
                 progress: Progress | None = None, verbose: bool = False) -> PipelineRun:
    """Launch the ingest runs of every batch of the watched folders not yet merged, then the index and persons.

    Batches already merged are left alone, and the index and the persons run only when something
    they depend on changed since they last ran: over the same folders a second call launches no
    run. A batch whose runs failed is tried again. ``progress`` gets a line per run; ``verbose``
    prints Dagster's events (DEBUG) on the console.
    """
    face_assets = face_assets or FaceAssetsResource()
    progress = progress or (lambda line: None)
    launcher = _Launcher(instance, face_assets, progress, verbose)
    registered = set(instance.get_dynamic_partitions(image_batches.name))
    new = pending_batches(face_assets, registered, wait=True)
    if new:
        instance.add_dynamic_partitions(image_batches.name, new)
    merged = instance.get_materialized_partitions(face_embeddings.key)
    out = PipelineRun(partitions=[key for key in face_assets.batches().keys() if key not in merged])
    progress(f"{len(new)} new batch(es) planned, {len(out.partitions)} to run")
    out.runs = [launcher.launch(INGEST_JOB, key) for key in out.partitions]
    if _latest(instance, face_embeddings.key, AssetKey("reembedded_catalog")) > _latest(instance, ann_index.key):
        out.runs.append(launcher.launch(REFRESH_JOB))
    if _latest(instance, ann_index.key) > _latest(instance, person_clusters.key):
        out.runs.append(launcher.launch(CLUSTER_JOB))
    out.success = all(r.success for r in out.runs)
    return out
