"""Person clusters in the graph: the library's incremental assignment, or a full re-clustering when due.

``person_clusters`` calls the library's ``update_clusters``, which asks its drift policy
(``recluster_policy``): when a full run is due (never clustered, the model changed, the library
grew or incremental assignment left too many faces alone, the last full run is old), it calls
``cluster()``; otherwise ``assign_new()`` puts the faces that have no cluster yet into the nearest
person, or new ones.
It is requested declaratively after each published index (``AFTER_UPSTREAM_UPDATES``). A run can
ask for a full re-clustering outright (run config ``full: true``). Everything it writes is in the main
catalog (``clusters``, ``face_clusters``, ``cluster_runs``), under the catalog's lock, but it is not
in the ``face_catalog`` pool: a full run computes for tens of minutes at 2M faces before its one
write, and holding the pool's slot that long would stop every merge and index refresh meanwhile.
A full run logs its progress in the run's logs, and records the run process's peak memory.
"""

import resource
import time

import numpy as np

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

from ..process import at_background_priority
from .assets import AFTER_UPSTREAM_UPDATES, SHARED_FILE_RETRY, ann_index
from .charts import counts_markdown
from .resources import FaceAssetsResource

QUALITY_CHECK = "cluster_quality_above_floor"
"""Check of ``person_clusters``: the size-weighted cohesion of multi-face clusters reaches the floor."""

SIZE_BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127), (128, 255), (256, None))


class ClusterRunConfig(Config):
    """Run config of ``person_clusters``: ``full`` forces a full re-clustering whatever the policy says."""

    full: bool = False


def size_distribution(sizes) -> dict[str, int]:
    """Clusters per size bucket (1, 2-3, 4-7, ... 256+), for the UI's chart."""
    sizes = np.asarray(sizes)
    out: dict[str, int] = {}
    for lo, hi in SIZE_BUCKETS:
        n = int(((sizes >= lo) & ((sizes <= hi) if hi is not None else True)).sum())
        if n:
            name = f"{lo}" if lo == hi else (f"{lo}+" if hi is None else f"{lo}-{hi}")
            out[f"{name} faces"] = n
    return out


def weighted_cohesion(sizes: np.ndarray, cohesion: np.ndarray) -> float | None:
    """Mean cohesion of the clusters of 2+ faces, weighted by size (None when there is none);
    ``cohesion`` NaN where unknown."""
    multi = (sizes >= 2) & ~np.isnan(cohesion)
    total = int(sizes[multi].sum())
    return float((sizes[multi] * cohesion[multi]).sum() / total) if total else None


@asset(
    deps=[ann_index],
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
    """``library.update_clusters()``: ``assign_new()``, or ``cluster()`` when a full run is due or asked for."""
    start = time.perf_counter()
    with face_assets.library() as lib:
        # Behind the searches: a full run computes for minutes at millions of faces; an assignment
        # does not make a batch searchable (the index did), so it need not outrank a search either.
        run = at_background_priority(lambda: lib.update_clusters(full=config.full, log=context.log.info))
        sizes, cohesions = lib.cluster_sizes()
        clusters = lib.list_clusters(limit=10)
    cohesion = weighted_cohesion(sizes, cohesions)
    floor = face_assets.settings.pipeline.min_cluster_cohesion
    largest = ["| cluster | label | faces | cohesion |", "|---:|---|---:|---:|"] + [
        f"| {c.cluster_id} | {c.label or ''} | {c.size} | {'' if c.cohesion is None else f'{c.cohesion:.3f}'} |"
        for c in clusters]
    context.log.info("%s clustering: %d clusters, %d new faces, %d unassigned", run.kind, run.clusters,
                     run.new_faces, run.unassigned)
    check = AssetCheckResult(
        check_name=QUALITY_CHECK,
        passed=cohesion is None or cohesion >= floor,
        severity=AssetCheckSeverity.ERROR,
        metadata={"weighted_cohesion": MetadataValue.float(cohesion) if cohesion is not None else MetadataValue.null(),
                  "floor": floor, "multi_face_clusters": int((sizes >= 2).sum())},
    )
    return MaterializeResult(
        metadata={
            "kind": run.kind,
            "full_run_reasons": MetadataValue.json(run.reasons),
            "dagster/row_count": run.clusters,
            "clusters": run.clusters,
            "singletons": run.singletons,
            "faces": int(sizes.sum()),
            "largest_cluster": int(sizes.max(initial=0)),
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
            # The run's process holds every face's embedding during a full run: its peak, for sizing hosts.
            "peak_memory_gib": MetadataValue.float(round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)),
        },
        check_results=[check],
    )


CLUSTER_ASSETS = [person_clusters]
"""Every asset of this module."""
