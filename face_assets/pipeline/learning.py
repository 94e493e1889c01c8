"""Learning from feedback in the graph: feedback pairs -> fine-tuned model -> promoted model, and re-embedding.

Each asset calls the library exactly as a user does (``export_feedback``, ``train``, ``promote``,
``reembed``), so the pipeline and a person at the CLI produce the same files and registry rows.
All of them open the library, whose DuckDB sessions are short (:mod:`face_assets.storage`); only
``promoted_model`` and ``reembedded_catalog``, which rewrite the whole catalog, run in the
``face_catalog`` pool, so a merge of new images never waits for a model to train.

- ``feedback_pairs``: the votes exported as ``pairs.parquet`` / ``triplets.parquet`` / ``report.json``
  under ``<data_dir>/<pipeline.feedback_export_dir>``.
- ``fine_tuned_model``: ``library.train`` on that export, registering a candidate version; its
  blocking check ``candidate_passes_gate`` fails when the evaluation gate rejected the candidate,
  so nothing downstream (promotion) runs in that case.
- ``promoted_model``: ``library.promote`` of the latest candidate (hot-swap and re-embedding).
  The retraining job includes it only when ``pipeline.auto_promote`` is on; a person can also
  materialize it from the UI. ``library.promote`` refuses a rejected candidate in any case.
- ``reembedded_catalog``: ``library.reembed`` after a promotion made outside the graph (CLI, web
  app): every image not yet embedded by the active version is embedded again; ``ann_index``
  follows it and checks the index.
"""

import time
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from ..errors import ModelVersionError
from ..process import at_background_priority
from .assets import CATALOG_POOL, SHARED_FILE_RETRY, ann_index
from .clusters import person_clusters
from .resources import FaceAssetsResource

GATE_CHECK = "candidate_passes_gate"
"""Blocking check of ``fine_tuned_model``: a candidate that the evaluation gate rejected is never promoted."""


def export_dir(face_assets: FaceAssetsResource) -> Path:
    """Folder of the feedback export the graph trains on: ``<data_dir>/<pipeline.feedback_export_dir>``."""
    return face_assets.settings.layout.feedback_export.absolute()


def metrics_markdown(metrics: dict[str, Any]) -> str:
    """A markdown table of the gate's metrics: current vs candidate model on each evaluation set."""
    lines = ["| set | metric | current | candidate | change |", "|---|---|---:|---:|---:|"]
    current, candidate = metrics.get("current", {}), metrics.get("candidate", {})
    for name in sorted(set(current) | set(candidate)):
        cur, cand = current.get(name, {}), candidate.get(name, {})
        for key in sorted(set(cur) | set(cand)):
            a, b = cur.get(key), cand.get(key)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and key not in ("pairs", "images"):
                lines.append(f"| {name} | {key} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
            else:
                lines.append(f"| {name} | {key} | {a} | {b} | |")
    return "\n".join(lines) + "\n"


@asset(
    # the export mines negatives among the index's neighbours, from other person clusters
    deps=[ann_index, person_clusters],
    retry_policy=SHARED_FILE_RETRY,
    group_name="learning",
    kinds={"parquet"},
    description="The feedback votes exported as training data by the library: `pairs.parquet`, `triplets.parquet` "
    "and `report.json` in `<data_dir>/<pipeline.feedback_export_dir>` (docs/feedback.md).",
)
def feedback_pairs(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """``library.export_feedback`` into the export folder (rewritten atomically, so reruns are idempotent)."""
    start = time.perf_counter()
    out = export_dir(face_assets)
    with face_assets.library() as lib:
        report = lib.export_feedback(out)
        votes = lib.feedback_stats()
    context.log.info(report.summary())
    return MaterializeResult(
        metadata={
            "dagster/row_count": report.pairs,
            "pairs": report.pairs,
            "triplets": report.triplets,
            "positives": report.positives,
            "negatives": sum(report.negatives.values()),
            "negatives_by_source": MetadataValue.json(report.negatives),
            "negatives_per_positive": MetadataValue.float(report.negatives_per_positive)
            if report.negatives_per_positive is not None else MetadataValue.null(),
            "dropped_by_reason": MetadataValue.json(report.dropped),
            "mined_by": MetadataValue.json(report.mining),
            "warnings": MetadataValue.json(report.warnings),
            "votes_read": report.votes_read,
            "last_vote_at": votes["last_vote_at"] or "",
            "pairs_file": MetadataValue.path(report.files["pairs"]),
            "triplets_file": MetadataValue.path(report.files["triplets"]),
            "report_file": MetadataValue.path(report.files["report"]),
            "seconds": MetadataValue.float(round(time.perf_counter() - start, 3)),
        }
    )


@asset(
    # No pool: training reads the catalog and writes the registry in short sessions (face_assets.storage),
    # so merges of new images go on while a model trains.
    deps=[feedback_pairs],
    # No step retry: a retry would train again from the start; a failed run is re-executed instead.
    group_name="learning",
    kinds={"pytorch", "onnx"},
    check_specs=[AssetCheckSpec(GATE_CHECK, asset="fine_tuned_model", blocking=True,
                                description="The candidate passed the evaluation gate; a candidate that degrades "
                                "is never promoted.")],
    description="A candidate recognizer fine-tuned by the library on the exported feedback, registered in the model "
    "registry (`model_versions`; file `models/versions/<version>.onnx`, run folder `models/runs/<run id>`).",
)
def fine_tuned_model(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """``library.train`` on the export's pairs and triplets; the same export again returns the finished run."""
    start = time.perf_counter()
    folder = export_dir(face_assets)
    pairs, triplets = folder / "pairs.parquet", folder / "triplets.parquet"
    with face_assets.library() as lib:
        parent = lib.active_model
        result = at_background_priority(lambda: lib.train(pairs, triplets if triplets.is_file() else None))
    curves = Path(result.run_dir) / "curves.png"
    verdict = "passed" if result.passed_gate else "failed"
    context.log.info("candidate %s (from %s): gate %s: %s", result.version, parent, verdict,
                     "; ".join(result.gate_reasons))
    check = AssetCheckResult(
        check_name=GATE_CHECK,
        passed=result.passed_gate,
        metadata={"version": result.version, "reasons": MetadataValue.json(result.gate_reasons)},
    )
    summary = "\n".join([f"**{result.version}** (parent {parent}): gate **{verdict}**", "",
                         *[f"- {r}" for r in result.gate_reasons], "", metrics_markdown(result.metrics)])
    return MaterializeResult(
        metadata={
            "version": result.version,
            "parent": parent,
            "gate": verdict,
            "gate_reasons": MetadataValue.json(result.gate_reasons),
            "metrics": MetadataValue.json(result.metrics),
            "summary": MetadataValue.md(summary),
            "training_minutes": MetadataValue.float(round(result.seconds / 60, 2)),
            "data": MetadataValue.json(result.data),
            "curves": MetadataValue.path(str(curves)),
            "model_file": MetadataValue.path(result.model_path),
            "run_id": result.run_id,
            "seconds": MetadataValue.float(round(time.perf_counter() - start, 3)),
        },
        check_results=[check],
    )


def latest_candidate(context: AssetExecutionContext) -> str:
    """The version of the latest ``fine_tuned_model`` materialization.

    Raises:
        ModelVersionError: the model was never fine-tuned here.
    """
    event = context.instance.get_latest_materialization_event(fine_tuned_model.key)
    if event is None or event.asset_materialization is None:
        raise ModelVersionError("fine_tuned_model was never materialized: there is no candidate to promote")
    return str(event.asset_materialization.metadata["version"].value)


@asset(
    deps=[fine_tuned_model],
    pool=CATALOG_POOL,
    retry_policy=SHARED_FILE_RETRY,
    group_name="learning",
    kinds={"onnx"},
    description="The latest candidate promoted by the library (hot-swap, catalog re-embedded, index rebuilt). "
    "Part of the retraining job only with `pipeline.auto_promote`; a rejected candidate is refused.",
)
def promoted_model(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """``library.promote`` of the latest candidate; promoting the running version again changes nothing."""
    start = time.perf_counter()
    version = latest_candidate(context)
    with face_assets.library() as lib:
        previous = lib.active_model
        summary = lib.promote(version)
        stats = lib.stats()
    return MaterializeResult(
        metadata={
            "version": version,
            "previous": previous,
            "model_version": stats["model_version"],
            "images_reembedded": summary.total if summary is not None else 0,
            "index_size": stats["index_size"],
            "seconds": MetadataValue.float(round(time.perf_counter() - start, 3)),
        }
    )


@asset(
    pool=CATALOG_POOL,
    retry_policy=SHARED_FILE_RETRY,
    group_name="index",
    kinds={"duckdb"},
    description="Every catalog image embedded by the active model version (after a promotion): the library's "
    "`reembed`, same image ids and metadata; `ann_index` follows.",
)
def reembedded_catalog(context: AssetExecutionContext, face_assets: FaceAssetsResource) -> MaterializeResult:
    """Open the library (which loads the active version and rebuilds the index for it) and re-embed stale images."""
    start = time.perf_counter()
    with face_assets.library() as lib:
        summary = at_background_priority(lib.reembed)
        stats = lib.stats()
        version = lib.active_model
    context.log.info("model %s: %d images re-embedded", version, summary.total)
    return MaterializeResult(
        metadata={
            "version": version,
            "model_version": stats["model_version"],
            "images_reembedded": summary.total,
            "valid_faces": stats["valid_faces"],
            "index_size": stats["index_size"],
            "seconds": MetadataValue.float(round(time.perf_counter() - start, 3)),
        }
    )


LEARNING_ASSETS = [feedback_pairs, fine_tuned_model, promoted_model, reembedded_catalog]
"""Every asset of this module, in graph order."""
