"""The asset graph: source images -> filtered images -> face embeddings -> ANN index.

The three ingest assets are partitioned by batch of new files (:data:`image_batches`, dynamic
partitions added by the new-image sensor). DuckDB takes one writer, so the expensive step,
``filtered_images`` (decode, detect, embed, judge), writes nothing shared: each partition runs the
library's ``ingest_paths`` into its own staging catalog and exports it to Parquet in the batch
folder, so any number of partitions can run at once, in processes or on other machines. Only
``face_embeddings`` (the merge of one partition into the main catalog) and ``ann_index`` open the
main catalog for writing, and both run in the ``face_catalog`` pool, whose limit of one
(``dagster.yaml``) makes them one writer across all runs.

Every batch is embedded by the model version the library runs (the registry's active version):
``source_images`` records that version (read from the published registry) in the
batch folder (``model.json``), ``filtered_images`` embeds with it, and ``face_embeddings`` refuses a
batch whose version is no longer the active one, so the catalog never mixes versions behind the
library's back.
"""


import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ..errors import ModelVersionError
from ..index import FaceIndex
from ..ingest import ingest_paths
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


def _seconds(start: float) -> MetadataValue:
    return MetadataValue.float(round(time.perf_counter() - start, 3))


@asset(
    partitions_def=image_batches,
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
            "present": [Path(f.path).is_file() for f in files],
        },
        schema={"path": pl.Utf8, "folder": pl.Utf8, "size": pl.Int64, "mtime_ns": pl.Int64, "present": pl.Boolean},
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
    with Catalog(stage_path) as stage:
        summary = ingest_paths(sources["path"].to_list(), face_filter, stage)
        files = stage.export_parquet(folder)
    for leftover in (stage_path, *(stage_path.with_name(stage_path.name + s) for s in (".wal", ".lock"))):
        leftover.unlink(missing_ok=True)

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


@asset(
    partitions_def=image_batches,
    deps=[filtered_images],
    pool=CATALOG_POOL,
    group_name="ingest",
    kinds={"duckdb"},
    check_specs=[AssetCheckSpec("embeddings_finite_and_normalized", asset="face_embeddings", blocking=True,
                                description="Every embedding of the batch in the catalog is finite and of unit length.")],
    description="The batch merged into the main DuckDB catalog (tables `images` and `faces`, embedding "
    "in `faces.embedding`); content already there is skipped.",
)
def face_embeddings(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """Merge the partition's Parquet files into the main catalog in one transaction (idempotent).

    Raises:
        ModelVersionError: the batch was embedded by another model version than the one active now (a
            version was promoted meanwhile); materialize the whole partition again.
    """
    start = time.perf_counter()
    folder = face_assets.batches().folder(context.partition_key)
    images_file = folder / "images.parquet"
    version, _, active_tag = face_assets.active_recognizer()
    staged = {t for t in pl.read_parquet(images_file, columns=["model_version"])["model_version"].to_list() if t}
    if staged - {active_tag}:
        # Merging would replace newer faces of the same content with older ones, or add faces the
        # library's index never holds: the batch is embedded again instead.
        raise ModelVersionError(f"batch {context.partition_key} was embedded by {', '.join(sorted(staged))}, but "
                                f"model version '{version}' ({active_tag}) is active now: materialize the whole "
                                "partition again")
    with face_assets.catalog() as catalog:
        merged = catalog.import_parquet(images_file, folder / "faces.parquet")
        # Every face of this batch's content, whether it came now or with an earlier batch.
        rows = catalog.query(
            """SELECT f.embedding FROM faces f JOIN images i USING (image_id)
               WHERE i.content_hash IN (SELECT content_hash FROM read_parquet(?))""",
            [str(images_file)],
        )
        totals = catalog.stats()
    vectors = np.array([r[0] for r in rows], dtype=np.float32).reshape(len(rows), -1)
    finite = bool(np.isfinite(vectors).all())
    worst = float(np.abs(np.linalg.norm(vectors, axis=1) - 1.0).max()) if len(vectors) and finite else 0.0
    check = AssetCheckResult(
        check_name="embeddings_finite_and_normalized",
        passed=finite and worst <= NORM_TOLERANCE,
        severity=AssetCheckSeverity.ERROR,
        metadata={"embeddings": len(vectors), "all_finite": finite, "max_norm_deviation": worst},
    )
    context.log.info("merged %s: %d images, %d faces added, %d skipped",
                     context.partition_key, merged["images"], merged["faces"], merged["skipped"])
    return MaterializeResult(
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
        check_results=[check],
    )


def _previous_count(index_path: Path) -> int | None:
    """Vectors in the index as last saved, from its metadata sidecar (None when there is none)."""
    try:
        return int(json.loads(index_path.with_name(index_path.name + ".json").read_text())["count"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@asset(
    # reembedded_catalog (module learning) re-embeds the catalog after a promotion; the index follows it.
    deps=[face_embeddings, AssetKey("reembedded_catalog")],
    pool=CATALOG_POOL,
    group_name="index",
    kinds={"faiss"},
    check_specs=[AssetCheckSpec("catalog_and_index_agree", asset="ann_index", blocking=True,
                                description="The saved index holds exactly the catalog's searchable faces.")],
    description="The faiss index of every valid face (file `faces.faiss` beside the catalog), brought up to "
    "date with the catalog by the library itself.",
)
def ann_index(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """Open the library, whose start-up reconciliation adds new faces to the index, and save it."""
    start = time.perf_counter()
    before = _previous_count(face_assets.settings.storage.data_dir / face_assets.settings.storage.index_file)
    with face_assets.library() as lib:
        lib.save()
        expected = set(lib.catalog.valid_face_ids(lib.model_version))
        stats = lib.stats()
        saved = FaceIndex.load(lib.index_path, model_version=lib.model_version)
        stored = {int(i) for i in saved.ids()}
        path = lib.index_path
    missing, extra = expected - stored, stored - expected
    check = AssetCheckResult(
        check_name="catalog_and_index_agree",
        passed=not missing and not extra,
        metadata={"catalog_faces": len(expected), "index_faces": len(stored),
                  "missing_from_index": len(missing), "not_in_catalog": len(extra)},
    )
    return MaterializeResult(
        metadata={
            "dagster/row_count": stats["index_size"],
            "faces_added": stats["index_size"] - (before or 0),
            "index_type": stats["index_type"],
            "model_version": stats["model_version"],
            "file_bytes": path.stat().st_size,
            "path": MetadataValue.path(str(path)),
            "seconds": _seconds(start),
        },
        check_results=[check],
    )


ASSETS = [source_images, filtered_images, face_embeddings, ann_index]
"""Every asset of this module, in graph order."""
