"""Learning from feedback in the Dagster graph, on real faces, votes, training, registry and a real instance.

One module-scoped workspace: twelve indexed LFW faces, votes recorded through the library, one
tiny training run through the retraining job (its gate fails on purpose: a near-zero learning rate
leaves nothing to gain), then the sensors and the re-embedding after a forced promotion, in file order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from dagster import (
    RunRequest,
    SkipReason,
    build_sensor_context,
    materialize,
)

from face_assets import registry
from face_assets.library import FaceRecognitionLibrary
from face_assets.pipeline.assets import ASSETS, ann_index, face_embeddings, image_batches
from face_assets.pipeline.definitions import ALL_ASSETS, REEMBED_JOB, RETRAIN_JOB, build_retrain_job, defs
from face_assets.pipeline.learning import GATE_CHECK, fine_tuned_model, promoted_model, reembedded_catalog
from face_assets.pipeline.sensors import build_reembed_sensor, build_retraining_sensor, pending_batches
from face_assets.store import Catalog
from face_assets_tests.workspace import Workspace

pytestmark = [pytest.mark.dagster, pytest.mark.training]

# Small enough to train in seconds on 2 cores; lr ~0 makes every epoch equal to the current model,
# so the best-epoch choice keeps the current model and the gate rejects the candidate: "no improvement".
TRAINING = {"epochs": 1, "batch_size": 8, "steps_per_epoch": 1, "triplets_per_batch": 2, "trainable_blocks": 1,
            "lr": 1e-12, "val_fraction": 0.5, "threads": 2}
MIN_VOTES = 5


class FeedbackWorkspace(Workspace):
    """The Dagster tests' workspace on a copy of the indexed faces, set up to retrain from a few votes."""

    def __init__(self, root: Path, indexed: Path, datasets: Path, people: dict[str, list[Path]]):
        super().__init__(root, datasets, indexed=indexed,
                         pipeline={"retrain_min_new_votes": MIN_VOTES, "auto_promote": True},
                         training=TRAINING | {"general_eval_dirs": [str(datasets / "real" / "dlib_johns")]})
        self.people = people

    def vote(self) -> int:
        """One search per person; thumbs up on the person's own faces, down on the others. Returns the votes."""
        owner = {str(p): name for name, paths in self.people.items() for p in paths}
        votes = 0
        with self.library() as lib:
            for name, paths in self.people.items():
                face_id = _sql_lib(lib, "SELECT f.face_id FROM faces f JOIN images i USING (image_id) WHERE i.path = ?",
                                   [str(paths[0])])
                q = lib.feedback_search(face_id=face_id, top_k=8)
                for hit in q.results:
                    if hit.face_id != face_id:
                        lib.record_feedback(q.query_id, hit.face_id, "up" if owner.get(hit.path) == name else "down",
                                            voter="tester")
                        votes += 1
        return votes


def _sql_lib(lib: FaceRecognitionLibrary, query: str, params) -> int:
    return lib.catalog.query(query, params)[0][0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, indexed_dir, datasets, feedback_people) -> FeedbackWorkspace:
    """The workspace with votes recorded (no training yet)."""
    w = FeedbackWorkspace(tmp_path_factory.mktemp("learning"), indexed_dir, datasets, feedback_people)
    w.votes = w.vote()
    assert w.votes > MIN_VOTES
    return w


def test_retraining_sensor_requests_a_run_once_enough_votes_arrived(ws):
    sensor = build_retraining_sensor(RETRAIN_JOB, ws.resource.settings.pipeline)
    context = build_sensor_context(instance=ws.instance, resources=ws.resources)
    first = sensor(context)
    assert isinstance(first, RunRequest) and first.tags["face_assets/new_votes"] == str(ws.votes)
    first_cursor = context.cursor
    assert json.loads(first_cursor)["votes"] == ws.votes
    again = sensor(build_sensor_context(instance=ws.instance, cursor=first_cursor, resources=ws.resources))
    assert isinstance(again, SkipReason) and "0 new vote(s)" in again.skip_message

    with ws.library() as lib:  # fewer than the threshold: still waiting
        q = lib.feedback_search(face_id=lib.catalog.query("SELECT min(face_id) FROM faces")[0][0], top_k=3)
        lib.record_feedback(q.query_id, q.results[-1].face_id, "down", voter="late")
    waiting = sensor(build_sensor_context(instance=ws.instance, cursor=first_cursor, resources=ws.resources))
    assert isinstance(waiting, SkipReason) and f"1 new vote(s) since the last training, waiting for {MIN_VOTES}" \
        in waiting.skip_message


def test_retrain_job_exports_trains_and_blocks_a_degrading_candidate(ws):
    job = build_retrain_job(auto_promote=True)
    result = materialize(ALL_ASSETS, selection=job.selection, instance=ws.instance, resources=ws.resources,
                         raise_on_error=False)
    # The gate failed, so the blocking check failed the run before promotion.
    assert not result.success
    (failed,) = [e for e in result.all_events if e.is_step_failure]
    assert failed.step_key == "fine_tuned_model"
    assert failed.step_failure_data.error.cls_name == "DagsterAssetCheckFailedError"
    export = ws.metadata("feedback_pairs")
    report = json.loads((ws.data / "feedback" / "export" / "report.json").read_text())
    pairs = pl.read_parquet(ws.data / "feedback" / "export" / "pairs.parquet")
    assert export["pairs"] == report["pairs"] == pairs.height > 0
    assert export["positives"] == report["positives"] == int((pairs["label"] == 1).sum()) > 0
    assert export["negatives"] == pairs.height - export["positives"]
    assert export["dropped_by_reason"] == report["dropped"] and export["triplets"] == report["triplets"]
    assert export["votes_read"] == ws.votes + 1

    model = ws.metadata("fine_tuned_model")
    assert model["gate"] == "failed" and "feedback pairs: no improvement" in model["gate_reasons"]
    assert Path(model["curves"]).is_file() and model["training_minutes"] > 0
    assert "| feedback | auc |" in model["summary"]
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == GATE_CHECK and not evaluation.passed
    assert evaluation.asset_key == fine_tuned_model.key
    assert ws.instance.get_latest_materialization_event(promoted_model.key) is None
    versions = {r[0]: r[1] for r in ws.sql("SELECT version, status FROM model_versions")}
    assert versions == {"base": "promoted", model["version"]: "rejected"}
    ws.candidate = model["version"]

    # Asked directly, promotion still refuses the rejected candidate (the library's own gate).
    direct = materialize(ALL_ASSETS, selection=[promoted_model], instance=ws.instance, resources=ws.resources,
                         raise_on_error=False)
    assert not direct.success
    failure = next(e for e in direct.all_events if e.is_step_failure)
    assert "failed the evaluation gate" in failure.step_failure_data.error.cause.message
    assert ws.sql("SELECT version FROM model_versions WHERE status = 'promoted'") == [("base",)]


def test_promotion_requests_reembedding_and_ingest_follows_the_active_model(ws, datasets):
    sensor = build_reembed_sensor(REEMBED_JOB, ws.resource.settings.pipeline)
    context = build_sensor_context(instance=ws.instance, resources=ws.resources)
    assert isinstance(sensor(context), SkipReason) and context.cursor == "base"

    # A batch staged (filtered and embedded) by the base model before the promotion...
    shutil.copy(datasets / "real/lfw10/George_W_Bush/George_W_Bush_0001.jpg", ws.photos / "bush.jpg")
    (key,) = pending_batches(ws.resource, set())
    ws.instance.add_dynamic_partitions(image_batches.name, [key])
    staged = materialize(ASSETS, selection=ASSETS[:2], partition_key=key, instance=ws.instance, resources=ws.resources)
    assert staged.success

    # The candidate becomes the promoted version outside the graph, and nothing is re-embedded yet (as
    # when the process that promoted it stopped before re-embedding).
    with Catalog.open(ws.resource.settings.storage) as catalog:
        registry.promote(catalog, ws.candidate)
    tag = ws.resource.active_recognizer()[2]
    request = sensor(build_sensor_context(instance=ws.instance, cursor=context.cursor, resources=ws.resources))
    assert isinstance(request, RunRequest) and request.tags["face_assets/model_version"] == ws.candidate

    # ...is refused at the merge: the catalog never mixes it in. Embedded again, it goes in with the new model.
    merge = materialize(ASSETS, selection=[face_embeddings], partition_key=key, instance=ws.instance,
                        resources=ws.resources, raise_on_error=False)
    failure = next(e for e in merge.all_events if e.is_step_failure)
    assert "materialize the whole partition again" in failure.step_failure_data.error.message
    assert not [e for e in merge.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]  # retrying cannot help
    assert materialize(ASSETS, selection=[a for a in ASSETS if a is not ann_index], partition_key=key,
                       instance=ws.instance, resources=ws.resources).success
    assert ws.sql("SELECT DISTINCT f.model_version FROM faces f JOIN images i USING (image_id) "
                  "WHERE i.path LIKE '%bush.jpg'") == [(tag,)]

    stale = ws.sql("SELECT count(*) FROM images WHERE status <> 'unreadable' AND model_version <> ?", [tag])
    assert stale[0][0] == 12
    job = defs.resolve_job_def(REEMBED_JOB)
    assert set(job.asset_layer.selected_asset_keys) == {reembedded_catalog.key, ann_index.key}
    assert materialize(ALL_ASSETS, selection=[reembedded_catalog, ann_index], instance=ws.instance,
                       resources=ws.resources).success
    reembedded = ws.metadata("reembedded_catalog")
    assert reembedded["version"] == ws.candidate and reembedded["images_reembedded"] == 12
    assert {r[0] for r in ws.sql("SELECT DISTINCT model_version FROM faces")} == {tag}
    index = ws.metadata("ann_index")
    assert index["model_version"] == tag and index["dagster/row_count"] == ws.sql(
        "SELECT count(*) FROM faces WHERE is_valid")[0][0]

