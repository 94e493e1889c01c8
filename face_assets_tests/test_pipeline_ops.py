"""The operator's path: a deployment with the default settings, and a Dask cluster started elsewhere.

Real processes throughout: the search service and the Dagster daemon of ``benchmarks/soak.py``'s
deployment (default intervals, settle time and executor), a Dask scheduler and two workers started
by their own command lines in another folder, real models, DuckDB files and faiss.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, ReexecutionOptions, RunsFilter, execute_job
from dagster._core.scheduler.instigation import InstigatorType

from benchmarks import soak
from face_assets.imaging import content_hash
from face_assets.pipeline.definitions import EXECUTOR_TAG, INGEST_JOB
from face_assets.pipeline.runner import dagster_home
from face_assets_tests.test_pipeline import FIRST, REPO_ROOT, _defs_job
from face_assets_tests.waiting import wait_for
from face_assets_tests.workspace import Workspace, latest_metadata

pytestmark = [pytest.mark.slow, pytest.mark.dagster]  # a deployment's processes with its defaults; a Dask cluster

SEARCHABLE_TARGET_S, CLUSTERED_TARGET_S = 30, 60
"""Issue 26's targets on an idle 2-core host; the test allows twice as much (a shared CI machine)."""

IN_FLIGHT = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
             DagsterRunStatus.STARTED]

PERSON = ["real/lfw10/Colin_Powell/Colin_Powell_0001.jpg", "real/lfw10/Colin_Powell/Colin_Powell_0002.jpg",
          "real/lfw10/Colin_Powell/Colin_Powell_0003.jpg"]


def _sensor_ticks(instance: DagsterInstance, since: float = 0.0) -> dict[str, int]:
    """Finished ticks per sensor name (of the last ten) that began after ``since`` (a ``time.time()``)."""
    counts = {state.instigator_name: sum(t.timestamp > since and t.is_completed for t in instance.get_ticks(
        state.instigator_origin_id, state.selector_id, limit=10))
        for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)}
    return {name: n for name, n in counts.items() if n}


def _searchable(dep: soak.Deployment, photo: Path, others: list[str]) -> bool:
    """A search of the service with ``photo`` finds one of the images ``others`` (the query's own face is left out)."""
    r = httpx.post(f"{dep.base}/api/search", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                   headers=dep.auth, timeout=60)
    assert r.status_code == 200, r.text
    return any(h["image_id"] in others for h in r.json()["results"])


def _clustered(dep: soak.Deployment, image_ids: list[str]) -> bool:
    """Every valid face of ``image_ids`` is in a person cluster, in the published catalog."""
    published = dep.data / "face_assets.duckdb"
    if not published.is_file():
        return False
    import duckdb

    with duckdb.connect(str(published), read_only=True) as con:
        tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "face_clusters" not in tables:
            return False
        (valid, clustered), = con.execute(
            "SELECT count(*), count(fc.face_id) FROM faces f LEFT JOIN face_clusters fc USING (face_id) "
            "WHERE f.is_valid AND f.image_id IN (SELECT unnest(?))", [image_ids]).fetchall()
    return valid >= len(image_ids) and clustered == valid


def test_a_dropped_photo_is_searchable_and_clustered_in_time_with_the_defaults(datasets, tmp_path):
    dep = soak.Deployment(tmp_path / "deployment")
    photos = [datasets / p for p in PERSON]
    image_ids = [content_hash(p) for p in photos]
    instance = DagsterInstance.from_config(str(dep.home))
    dep.start_service()
    dep.start_daemon()
    try:
        # The daemon is up once both sensors ticked (the automation sensor's first tick sees nothing).
        wait_for(lambda: {"new_images_sensor", "index_and_clusters_automation"} <= set(_sensor_ticks(instance)),
              180, "first sensor ticks")
        start = time.monotonic()
        for photo in photos:
            shutil.copy(photo, dep.incoming / photo.name)
        wait_for(lambda: _searchable(dep, photos[0], image_ids[1:]), 4 * SEARCHABLE_TARGET_S, "searchable")
        searchable = time.monotonic() - start
        wait_for(lambda: _clustered(dep, image_ids), 4 * CLUSTERED_TARGET_S, "clustered")
        clustered = time.monotonic() - start
        wait_for(lambda: not instance.get_runs(RunsFilter(statuses=IN_FLIGHT)), 120, "runs finished")
        runs = instance.get_runs()

        # Nothing new: the same photos again under other names start no run, nor does the automation.
        copied_at = time.time()
        for photo in photos:
            shutil.copy(photo, dep.incoming / f"again_{photo.name}")
        # The first tick after the copies may have listed the folder before them; the second saw them.
        wait_for(lambda: min(_sensor_ticks(instance, copied_at).get(name, 0)
                             for name in ("new_images_sensor", "index_and_clusters_automation")) >= 2, 180,
                 "two ticks of each sensor after the copies")
        later = instance.get_runs()
    finally:
        codes = dep.stop()
    print(f"drop to searchable {searchable:.1f} s, to clustered {clustered:.1f} s (targets {SEARCHABLE_TARGET_S} / "
          f"{CLUSTERED_TARGET_S} s); runs: {[(r.job_name, r.tags.get(EXECUTOR_TAG)) for r in runs]}")
    assert searchable <= 2 * SEARCHABLE_TARGET_S
    assert clustered <= 2 * CLUSTERED_TARGET_S
    # One ingest run, then one run with the index and the clusters together; each says its executor.
    assert sorted(r.job_name for r in runs) == ["__ASSET_JOB", INGEST_JOB]
    assert all(r.status == DagsterRunStatus.SUCCESS for r in runs)
    assert all(r.tags.get(EXECUTOR_TAG) == "in_process" for r in runs)
    assert len(later) == len(runs)
    assert codes["serve"] == 0
    # The daemon's log: plain text, no warnings, the batch it found, and no line per idle tick.
    log = (dep.work / "daemon.log").read_text()
    assert "\x1b[" not in log and "Traceback" not in log  # stopped by SIGTERM without a traceback either
    assert not [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line], log[-3000:]
    assert "1 new batch(es)" in log
    assert log.count("skipped: no new images\n") <= 3 and "Checking for new runs" not in log, log[-3000:]
    # The service says what it serves, and each index it reloads.
    served = (dep.work / "serve.log").read_text()
    assert f"serving {dep.data}" in served and "(auth: tokens; index faces.faiss: 0 faces" in served, served[:2000]
    assert "loaded the index published at" in served


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process, then SIGKILL to what is left of its group (systemd's KillMode=mixed)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_a_dask_cluster_started_in_another_folder_runs_the_ingest_steps(datasets, tmp_path, monkeypatch):
    from dask.distributed import Client

    from face_assets.pipeline.assets import image_batches
    from face_assets.pipeline.resources import FaceAssetsResource
    from face_assets.pipeline.sensors import pending_batches

    # The run's side: the project's dagster.yaml (storage relative to this folder), the config by variables.
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    w = Workspace(run_dir, datasets, FIRST[:2])
    shutil.copy(REPO_ROOT / "dagster.yaml", w.home / "dagster.yaml")
    monkeypatch.chdir(run_dir)
    instance = DagsterInstance.from_config(str(dagster_home(w.home)))
    (key,) = pending_batches(w.resource, set())
    instance.add_dynamic_partitions(image_batches.name, [key])

    # The cluster: a scheduler and two workers started by their own commands in another folder,
    # with neither the config file, the face_assets variables nor DAGSTER_HOME.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACE_ASSETS", "DAGSTER"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(Path(sys.executable).parent / "dask")
    procs = [_start([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                    elsewhere, env, tmp_path / "scheduler.log")]
    try:
        procs += [_start([dask, "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                          "--name", f"w{i}"], elsewhere, env, tmp_path / f"worker{i}.log") for i in range(2)]
        with Client(address, timeout=120) as client:
            client.wait_for_workers(2, timeout=180)
        monkeypatch.setenv("FACE_ASSETS_CONFIG", str(w.config))
        monkeypatch.setenv("FACE_ASSETS__PIPELINE__EXECUTOR", "dask")
        monkeypatch.setenv("FACE_ASSETS__PIPELINE__DASK_SCHEDULER", address)
        job = _defs_job(FaceAssetsResource())
        with execute_job(job, instance=instance, tags={"dagster/partition": key}, raise_on_error=False) as result:
            run_id = result.run_id
            assert result.success, (tmp_path / "worker0.log").read_text()[-3000:]
            assert {e.step_key for e in result.get_step_success_events()} == {
                "source_images", "filtered_images", "filtered_images_embeddings_finite_and_normalized",
                "face_embeddings"}
        run = instance.get_run_by_id(run_id)
        assert run.status == DagsterRunStatus.SUCCESS and run.tags[EXECUTOR_TAG] == "dask"
        stored = w.sql("SELECT face_id, image_id FROM faces WHERE is_valid ORDER BY face_id")
        assert len(stored) == 2
        # The workers wrote into the run's instance, not into one of their own in their folder.
        assert not (elsewhere / "data").exists()
        assert (run_dir / "data" / "dagster" / "storage").is_dir()
        first = latest_metadata(instance, "face_embeddings", key)
        assert first["images_added"] == 2

        # The merge again (a retry after it committed): it succeeds, adds nothing and keeps the data version.
        options = ReexecutionOptions(parent_run_id=run_id, step_selection=["face_embeddings"])
        with execute_job(job, instance=instance, reexecution_options=options, tags={"dagster/partition": key},
                         raise_on_error=False) as again:
            assert again.success
        assert w.sql("SELECT face_id, image_id FROM faces WHERE is_valid ORDER BY face_id") == stored
        assert latest_metadata(instance, "face_embeddings", key)["images_added"] == 0
        versions = [r.asset_materialization.tags.get("dagster/data_version")
                    for r in instance.fetch_materializations(AssetKey("face_embeddings"), limit=2).records]
        assert len(versions) == 2 and versions[0] == versions[1] and versions[0]
    finally:
        _stop(procs[::-1])
    for i in range(2):  # the steps' results are bytes Dask can size: no warning per result
        assert "Sizeof calculation" not in (tmp_path / f"worker{i}.log").read_text()


def _postgres_url(conninfo: str) -> str:
    """A libpq ``key=value`` connection string as the URL dagster-postgres takes (its driver, psycopg2, named)."""
    kv = dict(item.split("=", 1) for item in conninfo.split())
    return f"postgresql+psycopg2://{kv.get('user', 'postgres')}@{kv['host']}:{kv['port']}/{kv['dbname']}"


def test_dagster_storage_on_postgresql_serves_dask_runs_and_pools(datasets, tmp_path, monkeypatch, postgres_dsn):
    from dask.distributed import LocalCluster

    from face_assets.pipeline.assets import CATALOG_POOL, image_batches
    from face_assets.pipeline.resources import FaceAssetsResource
    from face_assets.pipeline.sensors import pending_batches

    # As docs/scaling.md moves the instance for several hosts: runs, events and pools in PostgreSQL.
    w = Workspace(tmp_path, datasets, FIRST[:2])
    home = tmp_path / "pg_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump({
        "storage": {"postgres": {"postgres_url": _postgres_url(postgres_dsn)}},
        "concurrency": {"pools": {"default_limit": 1}}, "telemetry": {"enabled": False}}))
    instance = DagsterInstance.from_config(str(home))
    (key,) = pending_batches(w.resource, set())
    instance.add_dynamic_partitions(image_batches.name, [key])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        monkeypatch.setenv("FACE_ASSETS_CONFIG", str(w.config))
        monkeypatch.setenv("FACE_ASSETS__PIPELINE__EXECUTOR", "dask")
        monkeypatch.setenv("FACE_ASSETS__PIPELINE__DASK_SCHEDULER", cluster.scheduler_address)
        with execute_job(_defs_job(FaceAssetsResource()), instance=instance, tags={"dagster/partition": key},
                         raise_on_error=False) as result:
            assert result.success
            run_id = result.run_id
    # Another process (another host) opening the same instance sees the run, the batch and the pool.
    other = DagsterInstance.from_config(str(home))
    assert other.get_run_by_id(run_id).status == DagsterRunStatus.SUCCESS
    assert key in other.get_materialized_partitions(AssetKey("face_embeddings"))
    pool = other.event_log_storage.get_concurrency_info(CATALOG_POOL)
    assert pool.slot_count == 1 and pool.active_slot_count == 0
    assert not list(home.rglob("*.db"))  # runs, events, schedules: nothing in local SQLite
    assert len(w.sql("SELECT face_id FROM faces WHERE is_valid")) == 2


def test_first_start_creates_the_instance_once_then_daemon_and_webserver_start_together(datasets, tmp_path,
                                                                                        monkeypatch):
    """As the units and the compose file start them on a fresh DAGSTER_HOME: init, then both at the same moment."""
    w = Workspace(tmp_path / "w", datasets, [])
    root = tmp_path / "checkout"  # the folder the processes run in, as the units' WorkingDirectory
    root.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", root / "dagster.yaml")
    (root / "workspace.yaml").write_text((REPO_ROOT / "workspace.yaml").read_text().replace(
        "working_directory: .", f"working_directory: {REPO_ROOT}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACE_ASSETS", "DAGSTER"))}
    env |= {"DAGSTER_HOME": str(root), "FACE_ASSETS_CONFIG": str(w.config), "PYTHONPATH": str(REPO_ROOT)}
    init = subprocess.run([str(Path(sys.executable).parent / "dagster"), "instance", "migrate"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert init.returncode == 0, init.stderr[-2000:]
    port = _free_port()
    module = [sys.executable, "-m", "face_assets.pipeline.processes"]
    procs = [_start(module + ["daemon"], root, env, tmp_path / "daemon.log"),
             _start(module + ["webserver", "-h", "127.0.0.1", "-p", str(port)], root, env, tmp_path / "web.log")]
    try:
        def up() -> bool:
            assert all(p.poll() is None for p in procs), (tmp_path / "web.log").read_text()[-2000:]
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/graphql", timeout=5,
                               json={"query": "{ assetNodes { assetKey { path } } }"})
            except httpx.TransportError:
                return False
            return r.status_code == 200 and bool(r.json()["data"]["assetNodes"])

        wait_for(up, 180, "webserver answering")
        # What the UI asks on its first visit: with `nux` disabled, nothing is written into DAGSTER_HOME.
        nux = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": "{ shouldShowNux }"}, timeout=10)
        assert nux.json()["data"]["shouldShowNux"] is False
        monkeypatch.chdir(root)  # dagster.yaml's storage is relative to the folder Dagster runs in
        instance = DagsterInstance.from_config(str(root))
        wait_for(lambda: instance.get_daemon_heartbeats(), 120, "daemon heartbeats")
    finally:
        _stop(procs)
    logs = (tmp_path / "daemon.log").read_text() + (tmp_path / "web.log").read_text()
    assert "alembic_version" not in logs and "Traceback" not in logs, logs[-3000:]
    assert "\x1b[" not in logs
    assert not (root / ".nux").exists()
