"""One data folder, many processes: the library, CLI commands and an analyst's DuckDB session at once.

Each test runs the parts as a deployment does, in separate processes, on real DuckDB files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import onnxruntime
import pytest

from face_assets.errors import StoreBusyError
from face_assets.library import FaceRecognitionLibrary
from face_assets.storage import DuckDBFile, Table, log_changes
from face_assets_tests.waiting import wait_for


def _cli(data: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``face-assets ARGS`` in its own process on ``data``."""
    env = os.environ | {"FACE_ASSETS__STORAGE__DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "-m", "face_assets.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def data_dir(indexed_dir, tmp_path) -> Path:
    """A private copy of the session's indexed data folder."""
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(indexed_dir, folder)
    return folder


@pytest.mark.slow
def test_analyst_session_blocks_no_writer(data_dir, feedback_people, datasets):
    """An analyst keeps a read-only session on the published catalog while other processes index and read."""
    analyst = duckdb.connect(str(data_dir / "face_assets.duckdb"), read_only=True)
    before = analyst.execute("SELECT count(*) FROM images").fetchone()[0]
    new = sorted((datasets / "real" / "lfw10").iterdir())[5]
    indexed = _cli(data_dir, "index", str(new), "--json")
    assert indexed.returncode == 0, indexed.stderr[-2000:]
    stats = _cli(data_dir, "stats", "--json")
    assert stats.returncode == 0, stats.stderr[-2000:]
    added = json.loads(indexed.stdout)["valid"]
    assert added > 0 and json.loads(stats.stdout)["images"] == before + json.loads(indexed.stdout)["total"]
    # The open session still reads the state it opened; a new one sees the published change.
    assert analyst.execute("SELECT count(*) FROM images").fetchone()[0] == before
    analyst.close()
    fresh = duckdb.connect(str(data_dir / "face_assets.duckdb"), read_only=True)
    assert fresh.execute("SELECT count(*) FROM images").fetchone()[0] == before + json.loads(indexed.stdout)["total"]
    fresh.close()


@pytest.mark.slow  # several processes on one data folder
def test_running_library_sees_other_process_faces(data_dir, datasets):
    """A running library (as the service holds one) finds faces another process indexed, without a restart."""
    with FaceRecognitionLibrary(index_dir=data_dir) as lib:
        new = sorted((sorted((datasets / "real" / "lfw10").iterdir())[6]).glob("*.jpg"))
        assert not any(h.path == str(new[0]) for h in lib.search(new[0], top_k=5))
        indexed = _cli(data_dir, "index", *map(str, new[:3]), "--json")
        assert indexed.returncode == 0, indexed.stderr[-2000:]
        # The library looks for a newer index every storage.index_refresh_seconds: wait for it to find the faces.
        hits = wait_for(lambda: [h for h in lib.search(new[0], top_k=1) if h.path == str(new[0])],
                        lib.settings.storage.index_refresh_seconds + 60, "the other process's faces found")
        assert hits[0].similarity > 0.99
        feedback = _cli(data_dir, "feedback", "stats", "--json")  # while this library holds its stores
        assert feedback.returncode == 0, feedback.stderr[-2000:]


def test_concurrent_votes_all_stored_once(data_dir):
    """Votes of many threads commit in groups; each acknowledged vote is stored exactly once."""
    with FaceRecognitionLibrary(index_dir=data_dir) as lib:
        face_id = lib.catalog.valid_face_ids(lib.model_version).tolist()[0]
        q = lib.feedback_search(face_id=face_id, top_k=8)
        acked, errors = [], []

        def vote(worker: int) -> None:
            for i, hit in enumerate(q.results):
                try:
                    acked.append(lib.record_feedback(q.query_id, hit.face_id, "up" if (worker + i) % 2 else "down",
                                                     voter=f"w{worker}"))
                except Exception as exc:  # noqa: BLE001 - reported by the assert below
                    errors.append(exc)

        threads = [threading.Thread(target=vote, args=(w,)) for w in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(acked) == 12 * len(q.results)
        stored = lib.feedback.votes(query_id=q.query_id)
        assert len(stored) == len(acked) == len({v.feedback_id for v in acked})
        assert {(r["voter"], r["result_face_id"], r["vote"]) for r in stored} == {
            (v.voter, v.result_id, v.vote) for v in acked}


def test_one_bad_call_in_a_group_fails_alone(tmp_path):
    """Group commit: a call that fails is retried alone, so the calls grouped with it still commit."""
    db = DuckDBFile(tmp_path / "m.duckdb", tmp_path / "p.duckdb", schema="CREATE TABLE IF NOT EXISTS t (k INT PRIMARY KEY)")
    db.declare([Table("t", "k")])
    results, errors = [], []

    def write(con: duckdb.DuckDBPyConnection, k: int) -> int:
        con.execute("INSERT INTO t VALUES (?)", [k])
        log_changes(con, "t", [k])
        return k

    def insert(k: int) -> None:
        try:
            results.append(db.submit(lambda con: write(con, k)))
        except duckdb.ConstraintException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(k % 20,)) for k in range(21)]  # one duplicate key
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(20)) and len(errors) == 1
    db.close()
    con = duckdb.connect(str(tmp_path / "p.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 20
    con.close()


def test_busy_store_gives_typed_error_in_bounded_time(tmp_path):
    """A writer that never lets go makes others fail with StoreBusyError after the timeout, not hang."""
    master = tmp_path / "m.duckdb"
    DuckDBFile(master, schema="CREATE TABLE IF NOT EXISTS t (k INT)").close()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; fd = open(sys.argv[1], 'a'); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), str(master) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        db = DuckDBFile(master, lock_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(StoreBusyError, match="stayed locked"):
            with db.write():
                pass
        assert 0.5 <= time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    with DuckDBFile(master, lock_timeout=5).write() as con:  # free again once the holder is gone
        con.execute("INSERT INTO t VALUES (1)")


def test_read_only_work_loads_no_model(data_dir, monkeypatch):
    """Opening the library, stats, model and cluster lists and index upkeep start no ONNX session; search does."""
    sessions = []
    real = onnxruntime.InferenceSession

    class Counting(real):
        def __init__(self, *args, **kwargs):
            sessions.append(args[0] if args else kwargs.get("path_or_bytes"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counting)
    with FaceRecognitionLibrary(index_dir=data_dir) as lib:
        assert lib.stats()["valid_faces"] > 0
        assert [m["version"] for m in lib.list_models()] == ["base"]
        lib.cluster()
        assert lib.list_clusters()
        face_id = lib.catalog.valid_face_ids(lib.model_version).tolist()[0]
        assert lib.search_embedding(lib.catalog.embeddings([face_id])[1][0], top_k=1)[0].face_id == face_id
        assert sessions == []
        lib.get_embedding(sorted(Path(lib.catalog.faces_by_id([face_id])[face_id]["path"]).parent.glob("*.jpg"))[0])
        assert len(sessions) >= 2  # detector and recognizer, on first use
