"""The asset graph: source images -> filtered images -> face embeddings -> ANN index.

The three ingest assets are partitioned by batch of new files (:data:`image_batches`, dynamic
partitions added by the new-image sensor). DuckDB takes one writer, so the expensive step,
``filtered_images`` (decode, detect, embed, judge), writes nothing shared: each partition runs the
library's ``ingest_paths`` into its own staging catalog and exports it to Parquet in the batch
folder, so any number of partitions can run at once, in processes or on other machines. Only
``face_embeddings`` (the merge of one partition into the main catalog) and ``ann_index`` open the
main catalog for writing, and both run in the ``face_catalog`` pool, whose limit of one
(``dagster.yaml``) makes them one writer across all runs.

Nothing reaches a shared file before its blocking check passed: ``filtered_images`` stages the
batch as Parquet and its check ``embeddings_finite_and_normalized`` reads the staged embeddings, so
``face_embeddings`` merges only a batch that passed; ``ann_index`` appends the batch's faces to
the published index's journal and checks what it holds against the catalog. The steps
that touch the shared catalog or index files retry on errors (a held lock, a busy file) with
exponential backoff and jitter (:data:`SHARED_FILE_RETRY`); an error that a retry cannot cure
(another model version, an index that disagrees) stops the step at once.

``ann_index`` and ``person_clusters`` are automated declaratively (:data:`AFTER_UPSTREAM_UPDATES`):
each is requested when what it depends on was updated and passed its blocking checks.

Every batch is embedded by the model version the library runs (the registry's active version):
``source_images`` records that version (read from the published registry) in the
batch folder (``model.json``), ``filtered_images`` embeds with it, and ``face_embeddings`` refuses a
batch whose version is no longer the active one, so the catalog never mixes versions behind the
library's back.
"""


import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AutomationCondition,
    Backoff,
    DataVersion,
    DynamicPartitionsDefinition,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
    asset_check,
)
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from ..errors import ModelVersionError
from ..ingest import ingest_paths
from ..index import sorted_member
from ..process import at_background_priority
from ..store import Catalog
from .charts import counts_markdown, histogram_markdown
from .resources import FaceAssetsResource

image_batches = DynamicPartitionsDefinition(name="image_batches")
"""One partition per batch of new files; the key names the batch folder (see :mod:`.batches`)."""

CATALOG_POOL = "face_catalog"
"""Concurrency pool of every step that opens the main DuckDB catalog; limited to 1 in dagster.yaml."""

NORM_TOLERANCE = 1e-3
"""How far from 1 the length of a stored (normalized) embedding may be."""

MODEL_FILE = "model.json"
"""Per batch: the registry version, recognizer file and embedding tag the batch is embedded with."""


SHARED_FILE_RETRY = RetryPolicy(max_retries=4, delay=0.5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
"""Steps that open the shared catalog or index files: up to 4 retries, after about 0.5, 1.5, 3.5 and 7.5
seconds (Dagster's exponential backoff), each moved at random by up to 0.5 s so that concurrent
steps do not retry in step."""

UPSTREAM_CHANGED = (
    AutomationCondition.any_deps_match(
        AutomationCondition.data_version_changed() & ~AutomationCondition.executed_with_root_target())
    | AutomationCondition.any_deps_match(AutomationCondition.will_be_requested())
).with_label("upstream data changed")
"""On this tick: the data version of a dependency changed (outside a run of this asset), or a dependency is
requested in the same tick."""

AFTER_UPSTREAM_UPDATES = (
    UPSTREAM_CHANGED.since(
        (AutomationCondition.newly_requested() & ~UPSTREAM_CHANGED) | AutomationCondition.initial_evaluation()
    )
    & AutomationCondition.all_deps_blocking_checks_passed()
    & ~AutomationCondition.in_progress()
).with_label("after upstream changes")
"""Requested once after the data of its dependencies changed (all merges since the last request
together) and their blocking checks passed, unless a run of it is in progress; in the same run as
a dependency requested on the same tick. Unlike ``AutomationCondition.eager()`` it neither waits for
every dependency partition to exist (a failed batch must not stop the index) nor for running
dependency partitions (under a steady stream of new images some batch is always running, and the
index must not wait for a quiet moment). It follows data versions, not materializations: a merge
that added nothing keeps its batch's data version (:func:`merge_data_version`), so re-executing a
merged batch requests neither the index nor the clusters. The first evaluation sees nothing as
changed, so starting the daemon redoes nothing.

A change is handled only by a request made after it. Dagster's ``since_last_handled()`` also counts
the asset's own update as handled, and on a tick that sees both a change and a reset it keeps the
reset (a data-version change carries no time to order them by): a merge committed while the index
run was in progress, or between the request and the next tick, was then never indexed until the
next batch. Here the tick after a request resets only when nothing changed meanwhile; when something
did, the asset is requested again once its run has ended (a run that may find nothing new: cheap)."""


def _seconds(start: float) -> MetadataValue:
    return MetadataValue.float(round(time.perf_counter() - start, 3))


@asset(
    partitions_def=image_batches,
    retry_policy=SHARED_FILE_RETRY,
    group_name="ingest",
    kinds={"python", "parquet"},
    description="The files of one batch found in the watched folders: path, folder, size, time, present. "
    "Files: `pipeline/batches/<partition>/source_images.parquet`, and `model.json` (the active model version "
    "the batch is embedded with).",
)
def source_images(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """List the batch's files as planned by the sensor, noting those gone since, and pin the active model version."""
    start = time.perf_counter()
    store = face_assets.batches()
    files = store.files(context.partition_key)
    frame = pl.DataFrame(
        {
            "path": [f.path for f in files],
            "folder": [str(Path(f.path).parent) for f in files],
            "size": [f.size for f in files],
            "mtime_ns": [f.mtime_ns for f in files],
            "sha256": [f.sha256 for f in files],
            "present": [Path(f.path).is_file() for f in files],
        },
        schema={"path": pl.Utf8, "folder": pl.Utf8, "size": pl.Int64, "mtime_ns": pl.Int64, "sha256": pl.Utf8,
                "present": pl.Boolean},
    )
    out = store.folder(context.partition_key) / "source_images.parquet"
    partial = out.with_name("." + out.name + ".partial")
    frame.write_parquet(partial)
    partial.replace(out)
    version, recognizer, tag = face_assets.active_recognizer()
    model = store.folder(context.partition_key) / MODEL_FILE
    model.write_text(json.dumps({"version": version, "recognizer": str(recognizer), "model_version": tag}),
                     encoding="utf-8")
    per_folder = dict(frame.group_by("folder").len().iter_rows())
    return MaterializeResult(
        metadata={
            "dagster/row_count": len(files),
            "missing_files": int((~frame["present"]).sum()),
            "bytes": int(frame["size"].sum() or 0),
            "files_per_folder": MetadataValue.md(counts_markdown("files per folder", per_folder)),
            "path": MetadataValue.path(str(out)),
            "model_version": version,
            "seconds": _seconds(start),
        }
    )


@asset(
    partitions_def=image_batches,
    deps=[source_images],
    group_name="ingest",
    kinds={"duckdb", "parquet"},
    description="Every image and face of the batch with its scores and verdict, and the embeddings, "
    "computed by the library's ingest. Files: `pipeline/batches/<partition>/images.parquet` and "
    "`faces.parquet` (the catalog's `images` and `faces` columns).",
)
def filtered_images(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """Decode, detect, embed and judge the batch into its own staging catalog, exported to Parquet.

    The staging catalog is this partition's alone, so partitions run in parallel without sharing
    a DuckDB file. A retry resumes from it (images already staged are skipped); it is deleted once
    the Parquet files are in place.
    """
    start = time.perf_counter()
    folder = face_assets.batches().folder(context.partition_key)
    sources = pl.read_parquet(folder / "source_images.parquet").filter(pl.col("present"))
    model = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    face_filter = face_assets.face_filter(Path(model["recognizer"]))
    stage_path = folder / "stage.duckdb"

    def embed() -> tuple[Any, dict[str, Path]]:
        with Catalog(stage_path) as stage:
            summary = ingest_paths(sources["path"].to_list(), face_filter, stage)
            files = stage.export_parquet(folder)
        stage.remove_files()
        return summary, files

    summary, files = at_background_priority(embed)  # searches go first; the run's other steps do not wait

    images = pl.read_parquet(files["images"], columns=["status", "rejection_reason"])
    faces = pl.read_parquet(files["faces"], columns=["det_score", "embedding_norm", "quality",
                                                     "cartoon_probability", "is_valid", "rejection_reason"])
    status = Counter(images["status"].to_list())
    image_reasons = Counter(images.filter(pl.col("status") == "rejected")["rejection_reason"].to_list())
    face_reasons = Counter(faces.filter(~pl.col("is_valid"))["rejection_reason"].to_list())
    cfg = face_filter.settings.filter
    charts = "\n".join([
        counts_markdown("images by verdict", {**{f"rejected: {r}": n for r, n in image_reasons.items()},
                                              "valid": status.get("valid", 0),
                                              "unreadable": status.get("unreadable", 0)}),
        histogram_markdown("det_score", faces["det_score"].to_list(), threshold=cfg.min_det_score),
        histogram_markdown("embedding_norm", faces["embedding_norm"].to_list(), threshold=cfg.min_embedding_norm),
        histogram_markdown("quality", faces["quality"].to_list()),
        histogram_markdown("cartoon_probability", faces["cartoon_probability"].to_list(),
                           threshold=face_filter.cartoon_threshold),
    ])
    seconds = time.perf_counter() - start
    return MaterializeResult(
        metadata={
            "dagster/row_count": images.height,
            "valid_images": status.get("valid", 0),
            "rejected_images": status.get("rejected", 0),
            "unreadable_images": status.get("unreadable", 0),
            "rejected_by_reason": MetadataValue.json(dict(image_reasons)),
            "faces": faces.height,
            "valid_faces": int(faces["is_valid"].sum()),
            "rejected_faces_by_reason": MetadataValue.json(dict(face_reasons)),
            "charts": MetadataValue.md(charts),
            "images_per_second": MetadataValue.float(round(summary.total / seconds, 2) if seconds else 0.0),
            "model_version": face_filter.analyzer.model_version,
            "registry_version": model["version"],
            "images_file": MetadataValue.path(str(files["images"])),
            "faces_file": MetadataValue.path(str(files["faces"])),
            "seconds": MetadataValue.float(round(seconds, 3)),
        }
    )


STAGED_CHECK = "embeddings_finite_and_normalized"
"""Blocking check of ``filtered_images``: the staged embeddings are finite and of unit length."""


def staged_embedding_faults(faces_file: Path) -> dict[str, Any]:
    """Embeddings of a staged ``faces.parquet``: how many, how many not finite, how many not of unit length."""
    rows = pl.read_parquet(faces_file, columns=["embedding"])["embedding"].drop_nulls().to_list()
    # A batch without faces (blank or unreadable images only) has nothing to check, and passes.
    vectors = np.array(rows, dtype=np.float32).reshape(len(rows), -1) if rows else np.empty((0, 0), np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    deviation = np.abs(np.linalg.norm(np.where(np.isfinite(vectors), vectors, 0.0), axis=1) - 1.0)
    return {"embeddings": len(rows), "non_finite": int((~finite).sum()),
            "not_unit_length": int((finite & (deviation > NORM_TOLERANCE)).sum()),
            "max_norm_deviation": float(deviation[finite].max()) if finite.any() else 0.0}


@asset_check(asset=filtered_images, name=STAGED_CHECK, blocking=True,
             description="Every embedding staged for the batch (faces.parquet) is finite and of unit length; "
             "a batch that fails is never merged into the catalog.")
def staged_embeddings_check(context: AssetCheckExecutionContext, face_assets: FaceAssetsResource) -> AssetCheckResult:
    """Read the staged Parquet of the run's batch; fail (blocking the merge) on a non-finite or non-unit embedding."""
    key = context.run.tags["dagster/partition"]
    faults = staged_embedding_faults(face_assets.batches().folder(key) / "faces.parquet")
    return AssetCheckResult(passed=not faults["non_finite"] and not faults["not_unit_length"],
                            severity=AssetCheckSeverity.ERROR, metadata={"partition": key, **faults})


@asset(
    partitions_def=image_batches,
    deps=[filtered_images],
    pool=CATALOG_POOL,
    retry_policy=SHARED_FILE_RETRY,
    group_name="ingest",
    kinds={"duckdb"},
    description="The batch merged into the main DuckDB catalog (tables `images` and `faces`, embedding "
    "in `faces.embedding`); content already there is skipped. Runs only after the staged batch passed "
    f"`filtered_images` / `{STAGED_CHECK}`.",
)
def face_embeddings(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """Merge the partition's Parquet files into the main catalog in one transaction (idempotent).

    The staged embeddings are checked again here, so that materializing this asset alone (without
    the check before it) cannot merge a batch that fails the check either.

    Raises:
        Failure: the batch was embedded by another model version than the one active now (a version
            was promoted meanwhile; a :class:`ModelVersionError`), or its staged embeddings fail the
            check; not retried: materialize the whole partition again.
    """
    start = time.perf_counter()
    folder = face_assets.batches().folder(context.partition_key)
    images_file = folder / "images.parquet"
    version, _, active_tag = face_assets.active_recognizer()
    staged = {t for t in pl.read_parquet(images_file, columns=["model_version"])["model_version"].to_list() if t}
    if staged - {active_tag}:
        # Merging would replace newer faces of the same content with older ones, or add faces the
        # library's index never holds: the batch is embedded again instead. Retrying cannot help.
        error = ModelVersionError(f"batch {context.partition_key} was embedded by {', '.join(sorted(staged))}, but "
                                  f"model version '{version}' ({active_tag}) is active now: materialize the whole "
                                  "partition again")
        raise Failure(str(error), allow_retries=False) from error
    faults = staged_embedding_faults(folder / "faces.parquet")
    if faults["non_finite"] or faults["not_unit_length"]:
        raise Failure(f"batch {context.partition_key} fails {STAGED_CHECK}: not merged", metadata=faults,
                      allow_retries=False)
    with face_assets.catalog() as catalog:
        merged = catalog.import_parquet(images_file, folder / "faces.parquet")
        totals = catalog.stats()
    context.log.info("merged %s: %d images, %d faces added, %d skipped",
                     context.partition_key, merged["images"], merged["faces"], merged["skipped"])
    return MaterializeResult(
        data_version=merge_data_version(context, added=merged["images"]),
        metadata={
            "images_added": merged["images"],
            "faces_added": merged["faces"],
            "images_already_in_catalog": merged["skipped"],
            "catalog_images": totals["images"],
            "catalog_faces": totals["faces"],
            "catalog_valid_faces": totals["valid_faces"],
            "catalog_rejected_by_reason": MetadataValue.json(totals["rejected_by_reason"]),
            "catalog": MetadataValue.path(str(catalog.path)),
            "model_version": version,
            "seconds": _seconds(start),
        },
    )


def merge_data_version(context: AssetExecutionContext, added: int) -> DataVersion:
    """Data version of a batch after its merge: new when the merge added anything, else the batch's previous one.

    A merge retried after it committed, or a batch re-executed, adds nothing: its data version stays,
    so the automation after it (:data:`AFTER_UPSTREAM_UPDATES`) sees no change and requests nothing.
    """
    if not added:
        records = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=context.asset_key, asset_partitions=[context.partition_key]), limit=1).records
        previous = records[0].asset_materialization.tags.get(DATA_VERSION_TAG) if records else None
        if previous:
            return DataVersion(previous)
    return DataVersion(context.run.run_id)


INDEX_CHECK = "catalog_and_index_agree"
"""Blocking check of ``ann_index``: the index built holds exactly the catalog's searchable faces."""


@asset(
    # reembedded_catalog (module learning) re-embeds the catalog after a promotion; the index follows it.
    deps=[face_embeddings, AssetKey("reembedded_catalog")],
    pool=CATALOG_POOL,
    retry_policy=SHARED_FILE_RETRY,
    automation_condition=AFTER_UPSTREAM_UPDATES,
    group_name="index",
    kinds={"faiss"},
    check_specs=[AssetCheckSpec(INDEX_CHECK, asset="ann_index", blocking=True,
                                description="The index built holds exactly the catalog's searchable faces; "
                                "an index that fails is not published.")],
    description="The faiss index of every valid face (file `faces.faiss` beside the catalog): the faces a batch "
    "added or removed appended to its journal by the library, checked against the catalog.",
)
def ann_index(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> Iterator[Any]:
    """Bring the published index up to date with the catalog, then check that it holds exactly the
    catalog's searchable faces.

    The library appends the batch's faces to the index's journal (:meth:`FaceRecognitionLibrary.publish_index`),
    a cost that follows the batch; it saves the index whole only when the journal has grown to a
    share of it. The check reads the ids the published index and its journal hold, without loading
    the index. A failed check blocks what depends on the index; the library repairs the index
    from the catalog when it next loads it.

    Raises:
        Failure: the index disagrees with the catalog after the update (not retried).
    """
    start = time.perf_counter()
    with face_assets.library() as lib:
        done = lib.publish_index()
        expected = lib.catalog.valid_face_ids(lib.model_version)
        held = lib.published_ids()
        stored = np.zeros(0, np.int64) if held is None else held
        stats = lib.stats()
        published = lib.index_path
    missing = expected[~sorted_member(stored, expected)]
    extra = stored[~sorted_member(expected, stored)]
    check = AssetCheckResult(
        check_name=INDEX_CHECK,
        passed=not len(missing) and not len(extra),
        metadata={"catalog_faces": len(expected), "index_faces": len(stored),
                  "missing_from_index": len(missing), "not_in_catalog": len(extra)},
    )
    if len(missing) or len(extra):
        yield check  # recorded for the UI; no materialization, so nothing downstream sees this index
        raise Failure(f"the index holds {len(stored)} faces, {len(missing)} of the catalog's {len(expected)} "
                      f"missing and {len(extra)} not in the catalog", allow_retries=False)
    yield MaterializeResult(
        metadata={
            "dagster/row_count": len(stored),
            "faces_added": done["added"],
            "faces_removed": done["removed"],
            "saved": done["mode"],
            "index_type": stats["index_type"],
            "model_version": stats["model_version"],
            "file_bytes": published.stat().st_size,
            "journal_bytes": done.get("journal_bytes", 0),
            "path": MetadataValue.path(str(published)),
            "seconds": _seconds(start),
        },
        check_results=[check],
    )


ASSETS = [source_images, filtered_images, staged_embeddings_check, face_embeddings, ann_index]
"""Every asset of this module in graph order, with the check that gates the merge."""
