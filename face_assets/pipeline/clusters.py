"""Person clusters in the graph: the library's incremental assignment, or a full re-clustering when due.

``person_clusters`` opens the library and asks its drift policy (``recluster_policy``): when a full
run is due (never clustered, the model changed, the library grew or incremental assignment left
too many faces alone, the last full run is old), it calls ``cluster()``; otherwise
``assign_new()`` puts the faces that have no cluster yet into the nearest person, or new ones.
It is requested declaratively after each published index (``AFTER_UPSTREAM_UPDATES``). A run can
ask for a full re-clustering outright (run config ``full: true``). Everything it writes is in the main
catalog (``clusters``, ``face_clusters``, ``cluster_runs``), so it runs in the ``face_catalog`` pool.
"""

import time

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)

from .assets import AFTER_UPSTREAM_UPDATES, CATALOG_POOL, SHARED_FILE_RETRY, ann_index
from .charts import counts_markdown
from .resources import FaceAssetsResource

QUALITY_CHECK = "cluster_quality_above_floor"
"""Check of ``person_clusters``: the size-weighted cohesion of multi-face clusters reaches the floor."""

SIZE_BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255), (256, None))


class ClusterRunConfig(Config):
    """Run config of ``person_clusters``: ``full`` forces a full re-clustering whatever the policy says."""

    full: bool = False


def size_distribution(sizes: list[int]) -> dict[str, int]:
    """Clusters per size bucket (1, 2-3, 4-7, ... 256+), for the UI's chart."""
    out: dict[str, int] = {}
    for lo, hi in SIZE_BUCKETS:
        n = sum(1 for s in sizes if s >= lo and (hi is None or s <= hi))
        if n:
            name = f"{lo}" if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
            out[f"{name} faces"] = n
    return out


def weighted_cohesion(clusters) -> float | None:
    """Mean cohesion of the clusters of 2+ faces, weighted by size (None when there is none)."""
    multi = [(c.size, c.cohesion) for c in clusters if c.size >= 2 and c.cohesion is not None]
    total = sum(n for n, _ in multi)
    return sum(n * c for n, c in multi) / total if total else None


@asset(
    deps=[ann_index],
    pool=CATALOG_POOL,
    retry_policy=SHARED_FILE_RETRY,
    automation_condition=AFTER_UPSTREAM_UPDATES,
    group_name="clusters",
    kinds={"duckdb"},
    check_specs=[AssetCheckSpec(QUALITY_CHECK, asset="person_clusters",
                                description="Size-weighted cohesion of the multi-face clusters is at least "
                                "pipeline.min_cluster_cohesion.")],
    description="Every valid face in a person cluster, by the library (tables `clusters`, `face_clusters`, "
    "`cluster_runs`; docs/clustering.md): new faces assigned incrementally, a full re-clustering when the "
    "drift policy says so.",
)
def person_clusters(context: AssetExecutionContext, config: ClusterRunConfig,
                    face_assets: FaceAssetsResource) -> MaterializeResult:
    """``library.assign_new()``, or ``library.cluster()`` when a full run is due or asked for."""
    start = time.perf_counter()
    with face_assets.library() as lib:
        policy = lib.recluster_policy()
        full = config.full or policy.recluster
        run = lib.cluster() if full else lib.assign_new()
        clusters = lib.list_clusters()
    sizes = [c.size for c in clusters]
    cohesion = weighted_cohesion(clusters)
    floor = face_assets.settings.pipeline.min_cluster_cohesion
    reasons = policy.reasons if policy.recluster else (["asked for by the run"] if config.full else [])
    largest = ["| cluster | label | faces | cohesion |", "|---:|---|---:|---:|"] + [
        f"| {c.cluster_id} | {c.label or ''} | {c.size} | {'' if c.cohesion is None else f'{c.cohesion:.3f}'} |"
        for c in clusters[:10]]
    context.log.info("%s clustering: %d clusters, %d new faces, %d unassigned", run.kind, run.clusters,
                     run.new_faces, run.unassigned)
    check = AssetCheckResult(
        check_name=QUALITY_CHECK,
        passed=cohesion is None or cohesion >= floor,
        severity=AssetCheckSeverity.ERROR,
        metadata={"weighted_cohesion": MetadataValue.float(cohesion) if cohesion is not None else MetadataValue.null(),
                  "floor": floor, "multi_face_clusters": sum(s >= 2 for s in sizes)},
    )
    return MaterializeResult(
        metadata={
            "kind": run.kind,
            "full_run_reasons": MetadataValue.json(reasons),
            "dagster/row_count": run.clusters,
            "clusters": run.clusters,
            "singletons": run.singletons,
            "faces": sum(sizes),
            "largest_cluster": max(sizes, default=0),
            "new_faces": run.new_faces,
            "unassigned": run.unassigned,
            "id_changed": MetadataValue.float(run.id_changed) if run.id_changed is not None else MetadataValue.null(),
            "quality": MetadataValue.json({k: v for k, v in run.quality.items() if k != "clusters"}),
            "weighted_cohesion": MetadataValue.float(cohesion) if cohesion is not None else MetadataValue.null(),
            "cluster_sizes": MetadataValue.md(
                counts_markdown("clusters by size", size_distribution(sizes), largest_first=False)
                + "\n**largest clusters**\n\n" + "\n".join(largest) + "\n"),
            "cluster_run_id": run.run_id,
            "seconds": MetadataValue.float(round(time.perf_counter() - start, 3)),
        },
        check_results=[check],
    )


CLUSTER_ASSETS = [person_clusters]
"""Every asset of this module."""
