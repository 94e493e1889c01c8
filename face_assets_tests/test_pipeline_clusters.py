"""Person clusters in the Dagster graph: their automation, full and incremental runs, the quality check.

Real faces (twelve indexed LFW photos of three persons, then new photos through the ingest graph),
the library's clustering, a real DuckDB catalog and a real Dagster instance; tests run in file order.
"""

from __future__ import annotations

import pytest
import yaml
from dagster import AssetKey, evaluate_automation_conditions, materialize

from face_assets.pipeline.assets import ASSETS, ann_index
from face_assets.pipeline.clusters import QUALITY_CHECK, person_clusters, size_distribution
from face_assets.pipeline.definitions import ALL_ASSETS, CLUSTER_JOB, NIGHTLY_JOB, defs
from face_assets.pipeline.resources import FaceAssetsResource
from face_assets_tests.workspace import Workspace, run_as_the_automation

pytestmark = pytest.mark.dagster


class ClusterWorkspace(Workspace):
    """The Dagster tests' workspace on a copy of the indexed faces, with the automation's cursor."""

    cursor = None

    def ingest(self, rel: str) -> None:
        """One shared photo dropped into the watched folder and merged through the ingest graph."""
        self.add([rel])
        for key in self.plan():
            assert self.materialize(key, selection=[a for a in ASSETS if a is not ann_index]).success

    def tick(self) -> set[AssetKey]:
        """One evaluation of the automation conditions, continuing from the last one; the assets it requests."""
        result = evaluate_automation_conditions(defs, self.instance, cursor=self.cursor)
        self.cursor = result.cursor
        return {key for key in (ann_index.key, person_clusters.key) if result.get_requested_partitions(key)}

    def index_and_cluster(self):
        """What the automation requests after a merge, in one run: the index, then the person clusters."""
        return run_as_the_automation(self.instance, self.resources, ann_index, person_clusters)

    def cluster(self, run_config: dict, resources: dict):
        """Materialize ``person_clusters`` alone with ``run_config``."""
        return materialize(ALL_ASSETS, selection=[person_clusters], instance=self.instance, resources=resources,
                           run_config=run_config)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, indexed_dir, datasets) -> ClusterWorkspace:
    """Twelve indexed faces, never clustered."""
    return ClusterWorkspace(tmp_path_factory.mktemp("clusters"), datasets, indexed=indexed_dir)


def test_automation_waits_for_embeddings_then_clusters_fully(ws):
    assert ws.tick() == set()  # the first evaluation: nothing counts as updated
    assert ws.tick() == set()  # nothing merged by the graph yet
    ws.ingest("real/lfw10/George_W_Bush/George_W_Bush_0001.jpg")
    assert ws.tick() == {ann_index.key, person_clusters.key}
    assert ws.tick() == set()  # the same merges are not handed over twice

    result = ws.index_and_cluster()
    assert result.success
    assert ws.tick() == set()  # the index updated by the run that also clustered: nothing more to do
    meta = ws.metadata("person_clusters")
    clusters = ws.sql("SELECT cluster_id, size FROM clusters ORDER BY size DESC")
    assert meta["kind"] == "full" and any("never clustered" in r for r in meta["full_run_reasons"])
    assert 0.1 < meta["peak_memory_gib"] < 64
    progress = [e.user_message for e in ws.instance.all_logs(result.run_id)]
    assert any("faces read" in m for m in progress) and any("clusters in" in m and "writing" in m for m in progress)
    assert meta["clusters"] == len(clusters) >= 3
    assert meta["faces"] == sum(s for _, s in clusters) == ws.sql("SELECT count(*) FROM faces WHERE is_valid")[0][0]
    assert meta["largest_cluster"] == clusters[0][1] >= 4
    assert "clusters by size" in meta["cluster_sizes"] and f"| {clusters[0][0]} |" in meta["cluster_sizes"]
    assert meta["quality"]["silhouette"] is not None
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == QUALITY_CHECK]
    assert check.passed and check.metadata["weighted_cohesion"].value >= 0.3


def test_new_faces_are_assigned_incrementally(ws):
    ws.ingest("real/lfw10/George_W_Bush/George_W_Bush_0002.jpg")
    assert ws.tick() == {ann_index.key, person_clusters.key}
    assert ws.index_and_cluster().success
    meta = ws.metadata("person_clusters")
    assert meta["kind"] == "incremental" and meta["new_faces"] == 1 and meta["full_run_reasons"] == []
    bush = ws.sql("""SELECT DISTINCT fc.cluster_id FROM face_clusters fc JOIN faces f USING (face_id)
                     JOIN images i USING (image_id) WHERE i.path LIKE '%George_W_Bush%' AND f.is_valid""")
    assert len(bush) == 1  # the second photo joined the first one's person
    assert ws.sql("SELECT count(*) FROM faces f LEFT JOIN face_clusters USING (face_id) "
                  "WHERE f.is_valid AND cluster_id IS NULL") == [(0,)]


def test_quality_below_the_floor_fails_the_check(ws):
    strict = ws.config.with_name("strict.yaml")
    strict.write_text(yaml.safe_dump(yaml.safe_load(ws.config.read_text()) | {
        "pipeline": {"watched_folders": [str(ws.photos)], "min_cluster_cohesion": 0.99}}))
    result = ws.cluster({"ops": {"person_clusters": {"config": {"full": True}}}},
                        resources={"face_assets": FaceAssetsResource(config_path=str(strict))})
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["floor"].value == 0.99
    assert result.success  # not blocking: the clusters are stored, the UI shows the failed check
    meta = ws.metadata("person_clusters")
    assert meta["kind"] == "full" and meta["full_run_reasons"]  # the policy's, or "asked for by the run"


def test_jobs_and_size_chart():
    assert set(defs.resolve_job_def(CLUSTER_JOB).asset_layer.selected_asset_keys) == {person_clusters.key}
    assert set(defs.resolve_job_def(NIGHTLY_JOB).asset_layer.selected_asset_keys) == {
        person_clusters.key, AssetKey("ann_index")}
    assert size_distribution([1, 1, 2, 3, 5, 300]) == {"1 faces": 2, "2-3 faces": 2, "4-7 faces": 1, "256+ faces": 1}
