"""The Dagster asset graph on real images, real models, real DuckDB files and a real Dagster instance.

One module-scoped materialization of a few shared images is reused by the incremental, sensor and
executor tests; the CLI and webserver tests run Dagster's own processes against a temporary
``DAGSTER_HOME`` holding the project's ``dagster.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    ReexecutionOptions,
    SensorResult,
    SkipReason,
    build_reconstructable_job,
    build_sensor_context,
    evaluate_automation_conditions,
    execute_job,
)

from face_assets.library import FaceRecognitionLibrary
from face_assets.pipeline.assets import (
    CATALOG_POOL,
    ann_index,
    face_embeddings,
    filtered_images,
    image_batches,
    source_images,
)
from face_assets.pipeline.clusters import person_clusters
from face_assets.pipeline.definitions import CLUSTER_JOB, INGEST_JOB, REFRESH_JOB, defs
from face_assets.pipeline.resources import FaceAssetsResource
from face_assets.pipeline.runner import seed_incoming
from face_assets.pipeline.sensors import pending_batches
from face_assets.store import Catalog
from face_assets_tests.waiting import wait_for
from face_assets_tests.workspace import Workspace, catalog_sql, latest_metadata, run_as_the_automation

pytestmark = pytest.mark.dagster  # Dagster materializations, its webserver, Dask

REPO_ROOT = Path(__file__).resolve().parents[1]
FIRST = ["real/lfw10/Ariel_Sharon/Ariel_Sharon_0001.jpg", "real/lfw10/Ariel_Sharon/Ariel_Sharon_0002.jpg",
         # a cartoon the classifier rejects with a wide margin (p 1.0 against 0.907): this file tests the graph, not the model
         "cartoon/dualstylegan/cartoon/cartoon_001.png", "corrupted/all_white_640x480.jpg",
         "corrupted/truncated_50pct.jpg"]
LATER = ["real/lfw10/Colin_Powell/Colin_Powell_0001.jpg", "real/lfw10/Arnold_Schwarzenegger/Arnold_Schwarzenegger_0001.jpg"]
FACE_COLUMNS = ("i.content_hash, f.face_index, f.x1, f.y1, f.x2, f.y2, f.det_score, f.quality, "
                "f.is_valid, f.rejection_reason, f.embedding")


def _faces(data: Path, hashes=None) -> list[tuple]:
    """Every face with its verdict and embedding, in a stable order, optionally only some contents."""
    where = "WHERE i.content_hash IN (SELECT unnest(?))" if hashes is not None else ""
    return catalog_sql(data, f"SELECT {FACE_COLUMNS} FROM faces f JOIN images i USING (image_id) {where} "
                       "ORDER BY i.content_hash, f.face_index", [list(hashes)] if hashes is not None else None)


def _same_faces(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b):
        assert ra[:2] == rb[:2] and ra[8:10] == rb[8:10]  # same content, face, verdict and reason
        np.testing.assert_allclose(ra[2:8], rb[2:8], atol=1e-3)
        np.testing.assert_allclose(np.asarray(ra[10]), np.asarray(rb[10]), atol=1e-4)


@pytest.fixture(scope="module")
def ws(datasets, tmp_path_factory) -> Workspace:
    """The first batch materialized once, shared by the tests below in file order."""
    w = Workspace(tmp_path_factory.mktemp("pipeline"), datasets, FIRST)
    (w.key,) = w.plan()
    w.first_run = w.materialize(w.key)
    assert w.first_run.success
    return w


def test_graph_materializes_what_the_library_would_store(ws, tmp_path):
    status = dict(ws.sql("SELECT status, count(*) FROM images GROUP BY ALL"))
    assert status == {"valid": 2, "rejected": 2, "unreadable": 1}
    # The graph stores exactly what a user indexing the same files with the library stores.
    with FaceRecognitionLibrary(index_dir=tmp_path / "lib") as lib:
        summary = lib.index_batch(sorted(ws.photos.iterdir()))
        assert summary.total == 5 and summary.valid == 2
    _same_faces(_faces(ws.data), _faces(tmp_path / "lib"))

    meta = latest_metadata(ws.instance, "filtered_images", ws.key)
    assert meta["dagster/row_count"] == 5 and meta["valid_images"] == 2 and meta["unreadable_images"] == 1
    assert sum(meta["rejected_by_reason"].values()) == 2 and "det_score" in meta["charts"]
    assert not list(ws.resource.batches().folder(ws.key).glob("stage.duckdb*"))  # the staging catalog is gone
    index_meta = latest_metadata(ws.instance, "ann_index")
    valid_faces = ws.sql("SELECT count(*) FROM faces WHERE is_valid")[0][0]
    assert index_meta["dagster/row_count"] == valid_faces > 0
    checks = {e.check_name: e.passed for e in ws.first_run.get_asset_check_evaluations()}
    assert checks == {"embeddings_finite_and_normalized": True, "catalog_and_index_agree": True}


def test_same_images_again_add_nothing(ws):
    before = ws.sql("SELECT face_id, image_id FROM faces ORDER BY face_id")
    assert ws.plan() == []  # nothing new in the folder: no batch, no partition
    assert ws.materialize(ws.key).success  # re-materializing the same partition is idempotent
    assert ws.sql("SELECT face_id, image_id FROM faces ORDER BY face_id") == before
    assert ws.sql("SELECT count(*) FROM images")[0][0] == 5
    assert latest_metadata(ws.instance, "face_embeddings", ws.key)["images_added"] == 0


def test_sensor_requests_runs_for_just_the_new_files(ws):
    sensor = defs.resolve_sensor_def("new_images_sensor")
    context = build_sensor_context(instance=ws.instance, resources={"face_assets": ws.resource})
    assert isinstance(sensor(context), SkipReason)

    ws.add(LATER)
    result = sensor(build_sensor_context(instance=ws.instance, resources={"face_assets": ws.resource}))
    assert isinstance(result, SensorResult)
    (request,) = result.run_requests
    (added,) = result.dynamic_partitions_requests
    assert added.partition_keys == [request.partition_key] and request.run_key == request.partition_key
    files = ws.resource.batches().files(request.partition_key)
    assert sorted(Path(f.path).name for f in files) == sorted(r.replace("/", "_") for r in LATER)

    ws.instance.add_dynamic_partitions(image_batches.name, added.partition_keys)
    assert isinstance(sensor(build_sensor_context(instance=ws.instance, resources={"face_assets": ws.resource})),
                      SkipReason)
    ws.later_key = request.partition_key


def test_new_images_add_only_themselves(ws):
    before = ws.sql("SELECT face_id, image_id FROM faces ORDER BY face_id")
    assert ws.materialize(ws.later_key).success
    after = ws.sql("SELECT face_id, image_id FROM faces ORDER BY face_id")
    assert after[: len(before)] == before and len(after) > len(before)
    new_paths = ws.sql("SELECT path FROM images WHERE image_id IN (SELECT unnest(?))",
                       [sorted({i for _, i in after[len(before):]})])
    assert sorted(Path(p).name for (p,) in new_paths) == sorted(r.replace("/", "_") for r in LATER)
    assert ws.sql("SELECT count(*) FROM images")[0][0] == 7
    meta = latest_metadata(ws.instance, "face_embeddings", ws.later_key)
    assert meta["images_added"] == 2 and meta["images_already_in_catalog"] == 0


INGEST = AssetSelection.assets(source_images, filtered_images, face_embeddings)
"""The ingest graph of one batch, as the ingest_images job runs it (with the staged check)."""


def test_automation_requests_index_and_clusters_after_new_merges_only(ws):
    first = evaluate_automation_conditions(defs, ws.instance)
    assert first.total_requested == 0  # the first evaluation redoes nothing (a daemon started after a run)
    # A merged batch re-executed: it adds nothing, keeps its data version, and requests nothing.
    assert ws.materialize(ws.key, selection=INGEST).success
    assert latest_metadata(ws.instance, "face_embeddings", ws.key)["images_added"] == 0
    again = evaluate_automation_conditions(defs, ws.instance, cursor=first.cursor)
    assert again.total_requested == 0
    # A batch that adds faces: the index, and the clusters after it in the same run.
    ws.add(["real/lfw10/Tony_Blair/Tony_Blair_0001.jpg"])
    (key,) = ws.plan()
    assert ws.materialize(key, selection=INGEST).success
    after = evaluate_automation_conditions(defs, ws.instance, cursor=again.cursor)
    assert after.get_requested_partitions(ann_index.key) == {None}
    assert after.get_requested_partitions(person_clusters.key) == {None}
    assert evaluate_automation_conditions(defs, ws.instance, cursor=after.cursor).total_requested == 0


def test_a_merge_seen_with_the_end_of_an_index_run_is_indexed(ws):
    start = evaluate_automation_conditions(defs, ws.instance)
    ws.add(["real/lfw10/Hugo_Chavez/Hugo_Chavez_0001.jpg"])
    (key,) = ws.plan()
    assert ws.materialize(key, selection=INGEST).success
    requested = evaluate_automation_conditions(defs, ws.instance, cursor=start.cursor)
    assert requested.get_requested_partitions(ann_index.key) == {None}
    # Before the next tick, the requested run ends and another batch is merged: one tick sees the
    # request, the index's update and the new merge together. The merge is still to be indexed.
    assert run_as_the_automation(ws.instance, {"face_assets": ws.resource}, ann_index, person_clusters).success
    ws.add(["real/lfw10/Jacques_Chirac/Jacques_Chirac_0001.jpg"])
    (later,) = ws.plan()
    assert ws.materialize(later, selection=INGEST).success
    again = evaluate_automation_conditions(defs, ws.instance, cursor=requested.cursor)
    assert again.get_requested_partitions(ann_index.key) == {None}
    assert again.get_requested_partitions(person_clusters.key) == {None}
    # That request handled it: with nothing new, the tick after it resets and requests nothing.
    assert evaluate_automation_conditions(defs, ws.instance, cursor=again.cursor).total_requested == 0


def test_a_batch_that_fails_its_staged_check_is_never_merged(datasets, tmp_path):
    w = Workspace(tmp_path, datasets, FIRST[:2])
    (key,) = w.plan()
    assert w.materialize(key, selection=[source_images, filtered_images]).success
    baseline = evaluate_automation_conditions(defs, w.instance)
    faces_file = w.resource.batches().folder(key) / "faces.parquet"
    faces = pl.read_parquet(faces_file)
    embeddings = faces["embedding"].to_list()
    assert len(embeddings) == 2
    embeddings[0] = [float("nan")] + embeddings[0][1:]  # not finite
    embeddings[1] = [2 * x for x in embeddings[1]]  # length 2
    faces.with_columns(pl.Series("embedding", embeddings, dtype=faces["embedding"].dtype)).write_parquet(faces_file)

    # The check and the merge, as a retry of the ingest run from its check would run them.
    result = w.materialize(key, selection=AssetSelection.checks_for_assets(filtered_images) | AssetSelection.assets(
        face_embeddings), raise_on_error=False)
    assert not result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "embeddings_finite_and_normalized" and not check.passed
    assert check.metadata["non_finite"].value == 1 and check.metadata["not_unit_length"].value == 1
    assert "face_embeddings" not in {e.step_key for e in result.get_step_success_events()}
    assert not w.resource.settings.storage.master_path.exists()  # nothing merged: the catalog was never opened
    assert w.instance.get_latest_materialization_event(face_embeddings.key) is None
    after = evaluate_automation_conditions(defs, w.instance, cursor=baseline.cursor)
    assert after.total_requested == 0  # neither the index nor the clusters are asked for
    # Materialized alone, without the check before it, the merge refuses the batch too, without retrying.
    alone = w.materialize(key, selection=[face_embeddings], raise_on_error=False)
    assert not alone.success and not (w.data / "face_assets.duckdb").exists()
    assert not [e for e in alone.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_a_batch_without_faces_passes_the_check_and_is_merged(datasets, tmp_path):
    w = Workspace(tmp_path, datasets, ["corrupted/all_white_640x480.jpg", "corrupted/truncated_50pct.jpg"])
    (key,) = w.plan()
    result = w.materialize(key, selection=INGEST)
    (check,) = result.get_asset_check_evaluations()
    assert result.success and check.passed and check.metadata["embeddings"].value == 0
    assert dict(w.sql("SELECT status, count(*) FROM images GROUP BY ALL")) == {"rejected": 1, "unreadable": 1}


def test_touched_renamed_or_copied_again_files_plan_nothing(datasets, tmp_path):
    w = Workspace(tmp_path, datasets, FIRST[:2])
    (key,) = w.plan()
    photo = sorted(w.photos.iterdir())[0]
    stamp = photo.stat().st_mtime_ns + 10**9
    os.utime(photo, ns=(stamp, stamp))  # touched
    shutil.copy(photo, w.photos / "copy_under_another_name.jpg")
    photo.write_bytes(photo.read_bytes())  # copied again over itself: new time, same bytes
    assert w.plan() == []
    sensor = defs.resolve_sensor_def("new_images_sensor")
    assert isinstance(sensor(build_sensor_context(instance=w.instance, resources={"face_assets": w.resource})),
                      SkipReason)
    # New content is new, whatever its name.
    shutil.copy(datasets / LATER[0], w.photos / photo.name)
    (changed,) = w.plan()
    assert [(Path(f.path).name, f.sha256) for f in w.resource.batches().files(changed)] == [
        (photo.name, hashlib.sha256((datasets / LATER[0]).read_bytes()).hexdigest())]


def test_a_file_still_being_written_is_not_planned_until_settled(datasets, tmp_path):
    w = Workspace(tmp_path, datasets, [], pipeline={"settle_seconds": 2})
    data = (datasets / FIRST[0]).read_bytes()
    target = w.photos / "arriving.jpg"
    target.write_bytes(data[: len(data) // 2])
    assert w.plan() == []
    with target.open("ab") as f:
        f.write(data[len(data) // 2 :])
    os.utime(target, (time.time() - 3600,) * 2)  # a copy that restores an old time (cp -p) is still fresh
    sensor = defs.resolve_sensor_def("new_images_sensor")
    waiting = sensor(build_sensor_context(instance=w.instance, resources={"face_assets": w.resource}))
    assert waiting.skip_message == f"no new images; 1 file(s) waiting to settle: {target}"  # the tick names it
    (key,) = wait_for(w.plan, 60, "the file planned once settled")
    (planned,) = w.resource.batches().files(key)
    assert planned.size == len(data) and planned.sha256 == hashlib.sha256(data).hexdigest()


def test_merge_goes_on_while_readers_hold_the_catalog(datasets, tmp_path):
    """An analyst's session on the published catalog never blocks the merge; one on the master only delays it."""
    w = Workspace(tmp_path, datasets, FIRST[:1])
    (key,) = w.plan()
    assert w.materialize(key, selection=[source_images, filtered_images]).success
    settings = w.resource.settings.storage
    Catalog.open(settings).close()  # an empty catalog (master and published copy) for the readers to open
    # A reader prints the count it sees; holds its session for SECONDS, or until its input closes ("-"); prints
    # the count again with the time, just before its session ends (at exit).
    code = ("import duckdb, sys, time; con = duckdb.connect(sys.argv[1], read_only=True); "
            "print(con.execute('SELECT count(*) FROM images').fetchone()[0], flush=True); "
            "sys.stdin.read() if sys.argv[2] == '-' else time.sleep(float(sys.argv[2])); "
            "print(con.execute('SELECT count(*) FROM images').fetchone()[0], time.time(), flush=True)")
    analyst = subprocess.Popen([sys.executable, "-c", code, str(settings.duckdb_path), "-"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    # A tool that opens the master itself (it should not) holds DuckDB's own lock for 3 s.
    intruder = subprocess.Popen([sys.executable, "-c", code, str(settings.master_path), "3"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert analyst.stdout.readline().strip() == "0" and intruder.stdout.readline().strip() == "0"
        result = w.materialize(key, selection=[face_embeddings])
        merged_at = time.time()
        assert result.success
        assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        assert analyst.poll() is None  # the analyst's session was open throughout
    finally:
        out = analyst.communicate(timeout=60)[0]
        intruded = intruder.communicate(timeout=30)[0]
    assert out.split()[0] == "0"  # the open session kept the state it opened
    count, ended_at = intruded.split()
    assert count == "0" and float(ended_at) < merged_at  # the merge waited for the intruder's session to end
    assert w.sql("SELECT count(*) FROM images")[0][0] == 1  # a new one sees the merge


def _job(executor: str):
    return build_reconstructable_job("face_assets.pipeline.definitions", "build_ingest_job",
                                     reconstructable_kwargs={"executor": executor})


def test_failure_then_reexecution_from_failure_without_duplicates(datasets, tmp_path):
    w = Workspace(tmp_path, datasets, FIRST[:2])
    (key,) = w.plan()
    catalog_file = w.resource.settings.storage.master_path
    catalog_file.mkdir(parents=True)  # the catalog cannot be opened: the merge step fails
    with execute_job(_job("in_process"), instance=w.instance, run_config=w.run_config(),
                     tags={"dagster/partition": key}, raise_on_error=False) as failed:
        assert not failed.success
        assert {e.step_key for e in failed.get_step_success_events()} == {
            "source_images", "filtered_images", "filtered_images_embeddings_finite_and_normalized"}
        assert {e.step_key for e in failed.get_step_failure_events()} == {"face_embeddings"}

    catalog_file.rmdir()
    options = ReexecutionOptions.from_failure(failed.run_id, w.instance)
    with execute_job(_job("in_process"), instance=w.instance, reexecution_options=options,
                     tags={"dagster/partition": key}, raise_on_error=False) as retried:
        assert retried.success
        assert {e.step_key for e in retried.get_step_success_events()} == {"face_embeddings"}
    stored = w.sql("SELECT face_id, image_id FROM faces ORDER BY face_id")
    assert len(stored) == 2 and len({i for _, i in stored}) == 2
    # Every step again (a full re-execution of the batch) adds nothing.
    with execute_job(_job("in_process"), instance=w.instance, run_config=w.run_config(),
                     tags={"dagster/partition": key}) as again:
        assert again.success
    assert w.sql("SELECT face_id, image_id FROM faces ORDER BY face_id") == stored
    assert latest_metadata(w.instance, "face_embeddings", key)["images_added"] == 0


def _defs_job(resource: FaceAssetsResource):
    """The ingest job as the code location defines it for the resource's settings (as ``face-assets pipeline``)."""
    return build_reconstructable_job("face_assets.pipeline.definitions", "resolve_job",
                                     reconstructable_args=(INGEST_JOB, resource.settings.pipeline.model_dump_json()))


def test_multiprocess_and_dask_executors_give_the_in_process_results(ws, tmp_path, monkeypatch):
    from dask.distributed import LocalCluster

    hashes = [h for (h,) in ws.sql("SELECT content_hash FROM images WHERE path IN (SELECT unnest(?))",
                                   [[str(ws.photos / r.replace("/", "_")) for r in FIRST]])]
    expected = _faces(ws.data, hashes)

    def check(w: Workspace, result) -> None:
        assert result.success
        assert {e.step_key for e in result.get_step_success_events()} == {
            "source_images", "filtered_images", "filtered_images_embeddings_finite_and_normalized", "face_embeddings"}
        _same_faces(_faces(w.data), expected)
        # The catalog writers went through the pool of one slot, and gave their slot back.
        pool = w.instance.event_log_storage.get_concurrency_info(CATALOG_POOL)
        assert pool.slot_count == 1 and pool.active_slot_count == 0

    w = Workspace(tmp_path / "multiprocess", ws.datasets, FIRST)
    (key,) = w.plan()
    with execute_job(_job("multiprocess"), instance=w.instance, run_config=w.run_config(max_concurrent=2),
                     tags={"dagster/partition": key}) as result:
        check(w, result)

    # As docs/scaling.md says: `executor: dask` and no scheduler, a local cluster for the run.
    w = Workspace(tmp_path / "dask_local", ws.datasets, FIRST, pipeline={"executor": "dask"})
    (key,) = w.plan()
    with execute_job(_defs_job(w.resource), instance=w.instance, run_config=w.run_config(),
                     tags={"dagster/partition": key}) as result:
        check(w, result)

    # A scheduler given by the environment only: the workers, started before, have neither the
    # config file's name nor the variables, and still run on the run's settings.
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        w = Workspace(tmp_path / "dask_existing", ws.datasets, FIRST)
        (key,) = w.plan()
        monkeypatch.setenv("FACE_ASSETS_CONFIG", str(w.config))
        monkeypatch.setenv("FACE_ASSETS__PIPELINE__EXECUTOR", "dask")
        monkeypatch.setenv("FACE_ASSETS__PIPELINE__DASK_SCHEDULER", cluster.scheduler_address)
        with execute_job(_defs_job(FaceAssetsResource()), instance=w.instance,
                         tags={"dagster/partition": key}) as result:
            check(w, result)


def _env(home: Path, config: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACE_ASSETS__")}
    return env | {"DAGSTER_HOME": str(home), "FACE_ASSETS_CONFIG": str(config), "PYTHONPATH": str(REPO_ROOT)}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_dagster_cli_materializes_into_duckdb(datasets, tmp_path, monkeypatch):
    w = Workspace(tmp_path / "w", datasets, FIRST[:2])
    shutil.copy(REPO_ROOT / "dagster.yaml", w.home / "dagster.yaml")
    monkeypatch.chdir(tmp_path)  # the project's dagster.yaml keeps its storage under ./data/dagster
    instance = DagsterInstance.from_config(str(w.home))
    (key,) = pending_batches(w.resource, set())
    instance.add_dynamic_partitions(image_batches.name, [key])
    proc = subprocess.run(
        [_bin("dagster"), "asset", "materialize", "-m", "face_assets.pipeline.definitions",
         # the ingest graph and the index (learning from feedback needs votes: test_pipeline_feedback.py)
         "--select", "source_images,filtered_images,face_embeddings,ann_index", "--partition", key],
        cwd=tmp_path, env=_env(w.home, w.config), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "data" / "dagster" / "storage").is_dir()
    rows = w.sql("""SELECT i.status, count(DISTINCT i.image_id), count(f.face_id) FILTER (WHERE f.is_valid)
                    FROM images i LEFT JOIN faces f USING (image_id) GROUP BY ALL""")
    assert rows == [("valid", 2, 2)]
    assert instance.get_latest_materialization_event(AssetKey("ann_index")) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_lists_the_assets_over_graphql(datasets, tmp_path):
    w = Workspace(tmp_path / "w", datasets, [])
    shutil.copy(REPO_ROOT / "dagster.yaml", w.home / "dagster.yaml")
    port = _free_port()
    # As the units and the compose file start it: Dagster's webserver with plain logs.
    server = subprocess.Popen(
        [sys.executable, "-m", "face_assets.pipeline.processes", "webserver", "-w", str(REPO_ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=_env(w.home, w.config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        query = json.dumps({"query": "{ assetNodes { assetKey { path } groupName } }"}).encode()
        deadline, nodes = time.monotonic() + 120, None
        while time.monotonic() < deadline and nodes is None:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=query,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    data = json.load(resp)["data"]["assetNodes"]
                nodes = data or None  # the code location may still be loading
            except OSError:
                pass
            if nodes is None:
                time.sleep(1)
        assert nodes is not None, "webserver did not list assets in time"
        assert {n["assetKey"]["path"][0]: n["groupName"] for n in nodes} == {
            "source_images": "ingest", "filtered_images": "ingest", "face_embeddings": "ingest", "ann_index": "index",
            "reembedded_catalog": "index", "feedback_pairs": "learning", "fine_tuned_model": "learning",
            "promoted_model": "learning", "person_clusters": "clusters"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail("webserver did not stop on SIGTERM")


def test_merge_replaces_faces_of_another_model_version(ws, tmp_path):
    folder = ws.resource.batches().folder(ws.key)
    files = (folder / "images.parquet", folder / "faces.parquet")
    with Catalog(tmp_path / "catalog.duckdb") as catalog:
        assert catalog.import_parquet(*files)["images"] == 5
        old = catalog.query("SELECT face_id FROM faces ORDER BY face_id")
        # One image stored under a user's id by an older model: the merge re-embeds it in place.
        with catalog.transaction() as con:
            (image_id,) = con.execute("SELECT min(image_id) FROM images WHERE status = 'valid'").fetchone()
            con.execute("UPDATE faces SET model_version = 'old', image_id = 'user-1' WHERE image_id = ?", [image_id])
            con.execute("UPDATE images SET model_version = 'old', image_id = 'user-1' WHERE image_id = ?", [image_id])
        merged = catalog.import_parquet(*files)
        assert merged == {"images": 1, "faces": 1, "skipped": 4, "image_ids": ["user-1"]}
        assert catalog.query("SELECT count(*), count(DISTINCT model_version) FROM images WHERE status <> 'unreadable'") == [(4, 1)]
        (new_face,) = catalog.query("SELECT face_id FROM faces WHERE image_id = 'user-1'")
        assert new_face[0] > max(i for (i,) in old) and len(catalog.query("SELECT * FROM faces")) == len(old)


def test_the_resource_reads_its_configuration_once(tmp_path):
    """A resource instance keeps the settings it read first; a new instance (Dagster makes one per run, tick
    or step process) reads the file again."""
    config = tmp_path / "face_assets.yaml"
    config.write_text(yaml.safe_dump({"pipeline": {"batch_size": 7}}))
    resource = FaceAssetsResource(config_path=str(config))
    assert resource.settings.pipeline.batch_size == 7
    config.write_text(yaml.safe_dump({"pipeline": {"batch_size": 9}}))
    assert resource.settings.pipeline.batch_size == 7
    assert FaceAssetsResource(config_path=str(config)).settings.pipeline.batch_size == 9


def test_first_run_seeds_the_default_watched_folder_with_the_samples(datasets, tmp_path):
    samples = tmp_path / "pack"
    samples.mkdir()
    shutil.copy(datasets / FIRST[0], samples / "one.jpg")
    shutil.copy(datasets / LATER[0], samples / "two.JPG")
    (samples / "w600k_mbf.onnx").write_bytes(b"not a photo")
    resource = FaceAssetsResource(data_dir=str(tmp_path / "data"))
    copied = seed_incoming(resource, samples)
    assert sorted(p.name for p in copied) == ["one.jpg", "two.JPG"]
    assert resource.watched_folders() == [tmp_path / "data" / "incoming"]
    assert sorted(p.name for p in resource.incoming_dir.iterdir()) == ["one.jpg", "two.JPG"]
    (resource.incoming_dir / "one.jpg").unlink()
    assert seed_incoming(resource, samples) == []  # only on first use: what the user removed stays removed
    watched = Workspace(tmp_path / "w", datasets, [])
    assert seed_incoming(watched.resource, samples) == [] and not (watched.data / "incoming").exists()


def test_pipeline_command_launches_the_jobs_once(datasets, tmp_path, capfd, monkeypatch):
    from face_assets.cli import main

    w = Workspace(tmp_path / "w", datasets, FIRST[:2])
    home = tmp_path / "cli_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")  # as make run: the project's instance
    monkeypatch.chdir(tmp_path)  # whose storage is under ./data/dagster
    argv = ["--config", str(w.config), "pipeline", "--dagster-home", str(home), "--json"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    first = json.loads(out)
    assert len(first["partitions"]) == 1 and first["success"] and "dagster dev" in first["ui"]
    assert first["stats"]["images"] == 2 and first["stats"]["index_size"] == 2
    # Ordinary runs of the code location's jobs, which the UI can re-execute.
    instance = DagsterInstance.from_config(str(home))
    runs = [instance.get_run_by_id(r["run_id"]) for r in first["runs"]]
    assert [r.job_name for r in runs] == [INGEST_JOB, REFRESH_JOB, CLUSTER_JOB]
    assert runs[0].tags["dagster/partition"] == first["partitions"][0]
    assert runs[0].tags["dagster/max_retries"] == "3"
    # The console: one line per run and the plan, no Dagster events.
    assert "DEBUG" not in err and "STEP_START" not in err
    assert len(err.splitlines()) == 4, err

    assert main(argv) == 0  # nothing new: no run at all
    again = json.loads(capfd.readouterr()[0])
    assert again["partitions"] == [] and again["runs"] == [] and again["stats"] == first["stats"]
    assert len(instance.get_run_records()) == 3
    # Nor does the daemon's first automation tick afterwards redo the index or the persons.
    assert evaluate_automation_conditions(defs, instance).total_requested == 0
