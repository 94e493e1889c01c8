"""``face-assets pipeline``: the main job of ``make run``, run in-process on a Dagster instance.

It does what the new-image sensor and the daemon would do, once and in the foreground: plan batches
for the new files of the watched folders, add them as partitions, materialize each partition not
yet in the catalog, then the ANN index and the person clusters. The runs are recorded in the instance, so ``dagster dev``
on the same ``DAGSTER_HOME`` shows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dagster import DagsterInstance, materialize

from .assets import ASSETS, ann_index, face_embeddings, image_batches
from .clusters import CLUSTER_ASSETS, person_clusters
from .resources import FaceAssetsResource
from .sensors import pending_batches


@dataclass
class PipelineRun:
    """What ``run_pipeline`` did: the partitions materialized and the run ids, by partition."""

    partitions: list[str] = field(default_factory=list)
    run_ids: dict[str, str] = field(default_factory=dict)
    success: bool = True


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


def run_pipeline(instance: DagsterInstance, face_assets: FaceAssetsResource | None = None) -> PipelineRun:
    """Materialize every batch of the watched folders not yet merged into the catalog, then the index and persons.

    Batches already merged are left alone, so running it again over the same folders does nothing
    but refresh the index; a batch whose run failed is tried again.
    """
    face_assets = face_assets or FaceAssetsResource()
    registered = set(instance.get_dynamic_partitions(image_batches.name))
    new = pending_batches(face_assets, registered)
    if new:
        instance.add_dynamic_partitions(image_batches.name, new)
    merged = instance.get_materialized_partitions(face_embeddings.key)
    todo = [key for key in face_assets.batches().keys() if key not in merged]
    resources = {"face_assets": face_assets}
    out = PipelineRun(partitions=todo)
    partitioned = [a for a in ASSETS if a.partitions_def is not None]
    for key in todo:
        result = materialize(ASSETS, selection=partitioned, partition_key=key, instance=instance,
                             resources=resources, raise_on_error=False)
        out.run_ids[key] = result.run_id
        out.success &= result.success
    for asset in (ann_index, person_clusters):
        if not out.success:
            break  # persons are built on a complete index only
        result = materialize(ASSETS + CLUSTER_ASSETS, selection=[asset], instance=instance, resources=resources,
                             raise_on_error=False)
        out.run_ids[asset.key.to_user_string()] = result.run_id
        out.success &= result.success
    return out
