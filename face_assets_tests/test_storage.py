"""The catalog's storage at scale: publication by Parquet segments, bulk import, what a write costs.

Real DuckDB files, real Parquet segments, and the DuckDB 1.x command-line client an analyst uses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from face_assets.errors import FaceImportError
from face_assets.persons import ClusterStore
from face_assets.storage import log_all, log_changes
from face_assets.store import Catalog

if TYPE_CHECKING:
    from face_assets import FaceRecognitionLibrary

DIM = 512


def faces_file(path: Path, n: int, *, start: int = 0, dim: int = DIM, seed: int = 0, **extra: list) -> Path:
    """A Parquet file of ``n`` precomputed faces, one image each."""
    rng = np.random.default_rng(seed * 1_000_003 + start)  # other rows, other vectors
    x = rng.standard_normal((n, dim), dtype=np.float32)
    ids = [f"img{i:08d}" for i in range(start, start + n)]
    columns = {"image_id": pa.array(ids), "path": pa.array([f"photos/{i}.jpg" for i in ids]),
               "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}
    columns.update({k: pa.array(v) for k, v in extra.items()})
    pq.write_table(pa.table(columns), path)
    return path


def open_catalog(folder: Path, **kw) -> Catalog:
    return Catalog(folder / "store" / "catalog.duckdb", published=folder / "face_assets.duckdb",
                   publish_interval=0, **kw)


def published_rows(folder: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(folder / "face_assets.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def segment_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / "published" / "face_assets").iterdir())


MASTER_VS_PUBLISHED = {
    "images": "SELECT image_id, path, status, num_faces, image_seq FROM {} ORDER BY image_id",
    "faces": "SELECT face_id, image_id, face_index, embedding_norm, is_valid FROM {} ORDER BY face_id",
    "clusters": "SELECT cluster_id, size, label FROM {} ORDER BY cluster_id",
    "face_clusters": "SELECT face_id, cluster_id, source FROM {} ORDER BY face_id",
    "cluster_constraints": "SELECT face_a, face_b, kind FROM {} ORDER BY face_a, face_b",
}


def assert_published_matches(catalog: Catalog, folder: Path) -> None:
    """Every published table holds exactly the master's rows."""
    catalog.db.publish()
    for table, sql in MASTER_VS_PUBLISHED.items():
        with catalog.db.read() as con:
            master = con.execute(sql.format(table)).fetchall()
        assert published_rows(folder, sql.format(table)) == master, table


def test_published_tables_follow_every_kind_of_write(tmp_path):
    """Appends, replacements, deletions, curation-style updates and whole rewrites, each published
    as a delta or a base, read back through the views exactly as the master holds them; folding
    the deltas changes nothing readers see."""
    folder = tmp_path / "data"
    catalog = open_catalog(folder, max_deltas=1000)
    store = ClusterStore(catalog)
    report = catalog.import_faces(faces_file(tmp_path / "a.parquet", 300), "m1", DIM)
    assert report == {"images": 300, "faces": 300, "skipped_images": 0, "face_ids": [1, 300]}
    assert_published_matches(catalog, folder)
    ids = np.arange(1, 301, dtype=np.int64)
    with store.transaction() as con:  # a full clustering: whole tables
        store.write_clusters(con, [{"cluster_id": c, "size": 30} for c in range(10)], (ids, ids % 10), "cluster",
                             replace_all=True)
    assert_published_matches(catalog, folder)
    catalog.import_faces(faces_file(tmp_path / "b.parquet", 20, start=300), "m1", DIM)  # a batch: a delta
    with store.transaction() as con:  # a move of a few faces and a rename: deltas of changed keys
        con.execute("UPDATE face_clusters SET cluster_id = 3 WHERE face_id IN (1, 2, 5)")
        log_changes(con, "face_clusters", [1, 2, 5])
        con.execute("UPDATE clusters SET label = 'Ada' WHERE cluster_id = 3")
        log_changes(con, "clusters", [3])
    with store.transaction() as con:  # a small table published whole
        con.execute("INSERT INTO cluster_constraints VALUES (1, 3, 'must_link', 'test', now()), "
                    "(2, 3, 'must_link', 'test', now())")
        log_all(con, "cluster_constraints")
    assert catalog.remove_face(7) == [7]
    assert catalog.remove_image("img00000010") == [11]
    store.forget_faces([7, 11])
    assert_published_matches(catalog, folder)
    deltas = published_rows(folder, "SELECT 1")  # the views file opens
    assert deltas == [(1,)]
    with catalog.db.read() as con:
        n_deltas = con.execute("SELECT count(*) FROM _segments WHERE NOT base AND tbl = 'faces'").fetchone()[0]
    assert n_deltas >= 2
    assert catalog.db.compact("faces") and catalog.db.compact("face_clusters")
    with catalog.db.read() as con:
        assert con.execute("SELECT count(*) FROM _segments WHERE tbl = 'faces'").fetchone()[0] < n_deltas + 1
    assert_published_matches(catalog, folder)
    catalog.clear()
    assert_published_matches(catalog, folder)
    catalog.close()


def test_reader_keeps_its_state_and_a_new_one_sees_the_next(tmp_path):
    """An open connection to the published file keeps the state it opened (old segments are
    retired, not deleted); a new connection sees the newest publication."""
    folder = tmp_path / "data"
    catalog = open_catalog(folder)
    catalog.import_faces(faces_file(tmp_path / "a.parquet", 50), "m1", DIM)
    analyst = duckdb.connect(str(folder / "face_assets.duckdb"), read_only=True)
    assert analyst.execute("SELECT count(*) FROM faces").fetchone() == (50,)
    catalog.import_faces(faces_file(tmp_path / "b.parquet", 5000, start=50), "m1", DIM)  # a new base
    catalog.clear()
    assert analyst.execute("SELECT count(*) FROM faces").fetchone() == (50,)
    fresh = subprocess.run([sys.executable, "-c", "import duckdb, sys; print(duckdb.connect(sys.argv[1], "
                            "read_only=True).execute('SELECT count(*) FROM faces').fetchone()[0])",
                            str(folder / "face_assets.duckdb")], capture_output=True, text=True, timeout=60)
    assert fresh.stdout.strip() == "0", fresh.stderr  # another process sees the newest state at once
    # In this process DuckDB shares one instance per file: a new connection sees the old state until
    # every connection to the file is closed (docs/operations.md says so for notebooks).
    analyst.close()
    assert published_rows(folder, "SELECT count(*) FROM faces") == [(0,)]
    catalog.close()


def wait_published(folder: Path, sql: str, expected: list[tuple], timeout: float = 30.0) -> list[tuple]:
    """The published rows of ``sql`` once they equal ``expected`` (or the last ones seen at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = published_rows(folder, sql)
        if rows == expected or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_views_are_written_after_the_session_and_never_go_back(tmp_path):
    """With a publication interval, a write session exports its change and returns; the views
    file follows on a thread of its own. Views of an older export never replace newer ones, whichever
    is written last (here two stores of one master in one process, as two processes would be)."""
    folder = tmp_path / "data"
    first = Catalog(folder / "store" / "catalog.duckdb", published=folder / "face_assets.duckdb", publish_interval=0.2)
    store = ClusterStore(first)
    with store.transaction() as con:
        con.execute("INSERT INTO clusters (cluster_id, label, size, created_at, updated_at) VALUES (1, 'a', 1, now(), now())")
        log_changes(con, "clusters", [1])
    first.db.publish()
    sql = "SELECT label FROM clusters WHERE cluster_id = 1"
    assert published_rows(folder, sql) == [("a",)]
    time.sleep(0.3)  # an export is due: the next session makes it
    with first.db._views_lock:  # hold back this store's views file
        with store.transaction() as con:
            con.execute("UPDATE clusters SET label = 'b' WHERE cluster_id = 1")
            log_changes(con, "clusters", [1])
        assert first.db._views is not None  # exported, views pending
        second = Catalog(folder / "store" / "catalog.duckdb", published=folder / "face_assets.duckdb",
                         publish_interval=0)
        with ClusterStore(second).transaction() as con:
            con.execute("UPDATE clusters SET label = 'c' WHERE cluster_id = 1")
            log_changes(con, "clusters", [1])
        assert published_rows(folder, sql) == [("c",)]
    first.db.publish()  # writes what it held back, unless newer views exist: they do
    assert published_rows(folder, sql) == [("c",)]
    assert first.db._views is None
    with store.transaction() as con:  # and the next change of the first store follows, on its own
        con.execute("UPDATE clusters SET label = 'd' WHERE cluster_id = 1")
        log_changes(con, "clusters", [1])
    assert wait_published(folder, sql, [("d",)]) == [("d",)]
    second.close()
    first.close()


READER = """
import os, sys, time
from face_assets.storage import DuckDBFile
db = DuckDBFile(sys.argv[1])
print("reading", flush=True)
end = time.monotonic() + 60
while time.monotonic() < end and not os.path.exists(sys.argv[2]):
    with db.read() as con:  # back-to-back sessions, each holding the shared lock a while
        con.execute("SELECT 1").fetchall()
        time.sleep(0.03)
"""


def test_readers_in_back_to_back_sessions_do_not_starve_a_writer(tmp_path):
    """Two processes reading in overlapping sessions without pause (as a re-clustering's chunks and
    the service's pages do) keep the shared lock taken all the time; a writer still gets its turn,
    while they go on reading."""
    from face_assets.storage import DuckDBFile

    master, stop = tmp_path / "m.duckdb", tmp_path / "stop"
    db = DuckDBFile(master, schema="CREATE TABLE IF NOT EXISTS t (a INT);", lock_timeout=20)
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(master), str(stop)], stdout=subprocess.PIPE,
                                text=True) for _ in range(2)]
    try:
        for r in readers:
            assert r.stdout.readline().strip() == "reading"
        time.sleep(0.5)
        for i in range(3):
            with db.write() as con:
                con.execute("INSERT INTO t VALUES (?)", [i])
            assert all(r.poll() is None for r in readers)  # written while both still read
        with db.read() as con:
            assert con.execute("SELECT count(*) FROM t").fetchone() == (3,)
    finally:
        stop.touch()
        for r in readers:
            r.wait(timeout=60)
    db.close()


def test_duckdb_1x_cli_opens_the_published_catalog(tmp_path):
    """The analysts' documented command, with the DuckDB 1.x command-line client (the newest on
    PyPI reads storage versions up to 1.x only): the views and their Parquet segments answer."""
    cli = Path(sys.executable).with_name("duckdb")
    if not cli.exists():
        pytest.skip("the duckdb-cli package is not installed (pip install -e '.[dev]')")
    folder = tmp_path / "data"
    with open_catalog(folder) as catalog:
        catalog.import_faces(faces_file(tmp_path / "a.parquet", 40), "m1", DIM)
        catalog.remove_face(3)
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.startswith("v1."), version
    out = subprocess.run([str(cli), "-readonly", "-noheader", "-csv", str(folder / "face_assets.duckdb"), "-c",
                          "SELECT count(*), min(face_id) FILTER (WHERE face_id > 2) FROM faces"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "39,4"


@pytest.mark.parametrize("bad, message", [
    ({"dim": 128}, "dimension is 512"),
    ({"extra": {"face_index": [0, 0, 0]}, "same_image": True}, "given twice"),
    ({"nan": True}, "NaN, inf or zero norm"),
    ({"drop": "path"}, "missing column 'path'"),
])
def test_import_refuses_a_bad_file_whole(tmp_path, bad, message):
    """A wrong dimension, a duplicate face, a NaN embedding or a missing column: a typed error,
    and nothing of the file in the catalog or the published tables."""
    folder = tmp_path / "data"
    catalog = open_catalog(folder)
    catalog.import_faces(faces_file(tmp_path / "good.parquet", 10), "m1", DIM)
    path = faces_file(tmp_path / "bad.parquet", 3, start=100, dim=bad.get("dim", DIM), **bad.get("extra", {}))
    table = pq.read_table(path)
    if bad.get("same_image"):
        table = table.set_column(0, "image_id", pa.array(["same"] * 3)).set_column(1, "path", pa.array(["p"] * 3))
    if bad.get("nan"):
        x = np.ones((3, DIM), np.float32)
        x[2, 5] = np.nan
        table = table.set_column(2, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM))
    if bad.get("drop"):
        table = table.drop([bad["drop"]])
    pq.write_table(table, path)
    with pytest.raises(FaceImportError, match=message):
        catalog.import_faces(path, "m1", DIM)
    assert catalog.stats()["faces"] == 10
    assert published_rows(folder, "SELECT count(*) FROM faces") == [(10,)]
    again = catalog.import_faces(tmp_path / "good.parquet", "m1", DIM)  # run again: nothing added
    assert again == {"images": 0, "faces": 0, "skipped_images": 10, "face_ids": []}
    catalog.close()


def one_row_writes(catalog: Catalog, store: ClusterStore, n: int = 15) -> tuple[float, int]:
    """Median seconds and bytes of segment files written by a write that renames one person."""
    times, written = [], []
    folder = catalog.db.published.parent
    for i in range(n):
        before = segment_bytes(folder)
        t = time.perf_counter()
        with store.transaction() as con:
            con.execute("UPDATE clusters SET label = ? WHERE cluster_id = 1", [f"name {i}"])
            log_changes(con, "clusters", [1])
        times.append(time.perf_counter() - t)
        written.append(segment_bytes(folder) - before)
    return float(np.median(times)), int(np.median(written))


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory) -> dict[int, Path]:
    """Data folders of 10k and 200k imported faces (one image each), a person per three faces."""
    from face_assets import FaceRecognitionLibrary, load_settings

    folders = {}
    for n in (10_000, 200_000):
        folder = tmp_path_factory.mktemp(f"c{n}")
        settings = load_settings(overrides={"storage": {"data_dir": str(folder), "publish_interval_seconds": 0,
                                                        "max_delta_segments": 10_000}})
        with FaceRecognitionLibrary(settings=settings) as lib:
            for start in range(0, n, 100_000):
                lib.import_faces(faces_file(folder / f"f{start}.parquet", min(100_000, n - start), start=start))
            store = lib.persons.store
            ids = np.arange(1, n + 1, dtype=np.int64)
            with store.transaction() as con:
                store.write_clusters(con, [{"cluster_id": c, "size": int(np.sum(ids % (n // 3 - 1) + 1 == c))}
                                           for c in range(1, n // 3)],
                                     (ids, ids % (n // 3 - 1) + 1), "cluster", replace_all=True)
            for i in range(3):
                lib.rename(7, f"Ada {i}")  # entries in the audit log
        folders[n] = folder
    return folders


@pytest.mark.slow  # imports catalogs of 10k and 200k faces
def test_a_write_costs_the_change_not_the_catalog(two_sizes):
    """A one-row write (committed and published) on a 200k-face catalog writes as many bytes as on
    a 10k one, and takes about as long: the ratio, not a time, is asserted."""
    results = {}
    for n, folder in two_sizes.items():
        catalog = open_catalog(folder, max_deltas=10_000)
        results[n] = one_row_writes(catalog, ClusterStore(catalog))
        assert published_rows(folder, "SELECT label FROM clusters WHERE cluster_id = 1") == [("name 14",)]
        catalog.close()
    (t_small, b_small), (t_large, b_large) = results[10_000], results[200_000]
    assert b_large <= 2 * b_small + 4096, results  # bytes follow the change (a segment of one row)
    assert t_large <= 3 * t_small + 0.05, results


@pytest.mark.slow  # imports catalogs of 10k and 200k faces
def test_pages_are_cut_by_the_store_at_both_sizes(two_sizes):
    """People (largest first, by name), a person's faces, catalog faces and audit entries: each page
    holds what the published tables say it should, at 10k and 200k faces, and costs about the same."""
    from fastapi.testclient import TestClient

    from face_assets import FaceRecognitionLibrary, load_settings
    from face_assets.web import create_app

    timings = {}
    for n, folder in two_sizes.items():
        settings = load_settings(overrides={"storage": {"data_dir": str(folder)},
                                            "web": {"auth": "none", "allowed_hosts": ["testserver"]}})
        with FaceRecognitionLibrary(settings=settings) as lib:
            client = TestClient(create_app(lib))
            persons = n // 3 - 1
            late = persons - 60
            pages = [  # (what, url, expected ids, the ids in the answer)
                ("people, late page", f"/api/people?offset={late}&limit=48", [r[0] for r in published_rows(
                    folder, f"SELECT cluster_id FROM clusters ORDER BY size DESC, cluster_id LIMIT 48 OFFSET {late}")],
                 lambda r: [p["cluster_id"] for p in r["items"]]),
                ("people by name", "/api/people?q=ada", [7], lambda r: [p["cluster_id"] for p in r["items"]]),
                ("a person's faces", "/api/people/5?offset=1&limit=2", [r[0] for r in published_rows(
                    folder, "SELECT face_id FROM face_clusters WHERE cluster_id = 5 ORDER BY face_id LIMIT 2 OFFSET 1")],
                 lambda r: [f["face_id"] for f in r["faces"]]),
                ("catalog faces, last page", f"/api/faces?offset={n - 30}&limit=24", list(range(n - 29, n - 5)),
                 lambda r: [f["face_id"] for f in r]),
                ("audit entries", "/api/audit?limit=2", [3, 2], lambda r: [e["id"] for e in r]),
            ]
            for what, url, want, ids in pages:
                answer = client.get(url)
                assert answer.status_code == 200 and ids(answer.json()) == want, (n, url, answer.text[:300])
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    client.get(url)
                    times.append(time.perf_counter() - t)
                timings.setdefault(what, {})[n] = float(np.median(times))
    for endpoint, t in timings.items():
        assert t[200_000] <= 4 * t[10_000] + 0.05, (endpoint, timings)  # 20x the rows, not 20x the time


def library(data: Path, **storage) -> "FaceRecognitionLibrary":
    from face_assets import FaceRecognitionLibrary, load_settings

    settings = load_settings(overrides={"storage": {"data_dir": str(data), "index_refresh_seconds": 0,
                                                    "publish_interval_seconds": 0, **storage}})
    return FaceRecognitionLibrary(settings=settings)


def test_index_journal_carries_a_batch_to_a_running_service(tmp_path):
    """A batch reaches the saved index as journal records (the index file is not rewritten), a
    running service applies just those, removals too; the pipeline's path appends from the catalog
    without loading the index; past its share of the index the journal is folded into a whole save."""
    from face_assets.storage import file_stamp

    data = tmp_path / "data"
    with library(data) as first:
        first.import_faces(faces_file(tmp_path / "a.parquet", 300))
        index_file = first.index_path
    service = library(data)
    assert len(service.index) == 300
    saved = file_stamp(index_file)
    with library(data) as writer:
        writer.import_faces(faces_file(tmp_path / "b.parquet", 20, start=300))
        writer.remove(5)
    assert file_stamp(index_file) == saved  # the batch went to the journal
    assert service.refresh() and len(service.index) == 319 and 5 not in service.index and 320 in service.index
    with library(data) as pipeline:  # faces merged into the catalog by another path, then published
        pipeline.catalog.import_faces(faces_file(tmp_path / "c.parquet", 10, start=400), pipeline.model_version, DIM)
        done = pipeline.publish_index()
        assert (done["mode"], done["added"], done["removed"]) == ("journal", 10, 0)
        assert pipeline.published_ids().tolist() == sorted(pipeline.catalog.valid_face_ids(pipeline.model_version))
    assert file_stamp(index_file) == saved
    assert service.refresh() and len(service.index) == 329
    with library(data, index_journal_min_bytes=0, index_journal_share=0.0) as folding:
        folding.import_faces(faces_file(tmp_path / "d.parquet", 5, start=500))
    assert file_stamp(index_file) != saved  # saved whole, journal started anew
    assert service.refresh() and len(service.index) == 334
    hits = service.search_embedding(pq.read_table(tmp_path / "d.parquet")["embedding"][0].as_py(), top_k=1)
    assert hits[0].face_id == 331
    service.close()


def test_a_session_holds_the_lock_at_normal_priority(tmp_path):
    """A thread of a process at a lower CPU priority (the pipeline's runs, nice 10) runs its store
    sessions at normal priority, so that other processes never wait for a starved lock holder;
    outside the session it is back at its own priority."""
    import os
    import threading

    catalog = open_catalog(tmp_path)
    seen: dict[str, int] = {}

    def niced() -> None:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 10)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
            os.setpriority(os.PRIO_PROCESS, tid, 10)
        except PermissionError:
            seen["unprivileged"] = 1
            return
        with catalog.db.write():
            seen["write"] = os.getpriority(os.PRIO_PROCESS, tid)
            with catalog.db.write():  # nested: the same session
                seen["nested"] = os.getpriority(os.PRIO_PROCESS, tid)
            seen["still"] = os.getpriority(os.PRIO_PROCESS, tid)
        with catalog.db.read():
            seen["read"] = os.getpriority(os.PRIO_PROCESS, tid)
        seen["after"] = os.getpriority(os.PRIO_PROCESS, tid)

    worker = threading.Thread(target=niced)
    worker.start()
    worker.join()
    catalog.close()
    if "unprivileged" in seen:
        pytest.skip("this user may not raise a thread's priority (RLIMIT_NICE)")
    assert seen == {"write": 0, "nested": 0, "still": 0, "read": 0, "after": 10}


def test_a_whole_new_index_is_read_beside_the_searches(tmp_path, caplog):
    """An index saved whole by another process is read once, on a thread of its own: searches go on
    with the index in memory meanwhile (none waits for the read, none starts another), then find the
    new faces."""
    import logging

    from face_assets_tests.waiting import wait_for

    data = tmp_path / "data"
    with library(data) as first:
        first.import_faces(faces_file(tmp_path / "a.parquet", 300))
    service = library(data)
    assert len(service.index) == 300
    with library(data, index_journal_min_bytes=0, index_journal_share=0.0) as folding:
        folding.import_faces(faces_file(tmp_path / "b.parquet", 5, start=300))
    query = pq.read_table(tmp_path / "b.parquet")["embedding"][0].as_py()
    caplog.set_level(logging.INFO, logger="face_assets")
    with service._search_index._loading:  # as while another thread reads the new index
        assert service.search_embedding(query, top_k=1)[0].similarity < 0.9
        assert len(service.index) == 300
    assert not service.refresh(wait=False)  # starts the read and returns at once
    wait_for(lambda: len(service.index) == 305, 60, "the new index swapped in")
    assert service.search_embedding(query, top_k=1)[0].similarity > 0.99
    assert sum("loaded the index published" in r.getMessage() for r in caplog.records) == 1
    service.close()


@pytest.mark.slow  # 400 votes, each its own write session and publication: about 30 s
def test_a_vote_publishes_the_vote_not_the_feedback_store(tmp_path):
    """The feedback store publishes like the catalog: a vote, a re-vote and a retraction each add a
    segment of their own row, and the published views hold what the master holds."""
    from face_assets import load_settings
    from face_assets.feedback import FeedbackStore, QueryRecord

    rng = np.random.default_rng(0)

    def settings(interval: float):
        return load_settings(overrides={"storage": {"data_dir": str(tmp_path), "publish_interval_seconds": interval}})

    def vote(store: FeedbackStore, q: str, result: int, value: str = "up"):
        return store.upsert_vote(
            query_id=q, result_face_id=result, vote=value, voter="ann", session_id=None, model_version="m1",
            similarity=0.5, query_embedding=rng.standard_normal(512), result_embedding=rng.standard_normal(512),
            result_image_id="img", result_path="p.jpg", result_bbox=[0, 0, 1, 1], result_metadata=None)

    def published_votes() -> list[tuple]:
        con = duckdb.connect(str(tmp_path / "feedback.duckdb"), read_only=True)
        try:
            return con.execute("SELECT feedback_id, query_id, result_face_id, vote, revisions FROM feedback "
                               "ORDER BY feedback_id").fetchall()
        finally:
            con.close()

    def segments() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "published" / "feedback").iterdir())

    store = FeedbackStore.open(settings(3600))  # filled with one publication, on close
    for i in range(100):
        store.add_query(QueryRecord(query_id=f"q{i}", model_version="m1", embedding=rng.standard_normal(512),
                                    image_path="q.jpg", content_hash="h", bbox=[0, 0, 1, 1],
                                    result_face_ids=list(range(8))))
        for result in range(4):
            vote(store, f"q{i}", result)
    store.add_results("q0", [8, 9])
    store.close()
    base = segments()
    assert len(published_votes()) == 400 and base > 1_000_000

    store = FeedbackStore.open(settings(0))
    written = []
    for change in (lambda: vote(store, "q5", 6), lambda: vote(store, "q5", 6, "down"),
                   lambda: store.delete_vote("q7", 1, "ann")):
        before = segments()
        change()
        written.append(segments() - before)
    expected = sorted((r["feedback_id"], r["query_id"], r["result_face_id"], r["vote"], r["revisions"])
                      for r in store.votes())
    store.close()
    assert max(written) < base / 50, (written, base)  # a few kB per change against the whole store
    assert published_votes() == expected and len(expected) == 400
    assert ("q5", 6, "down", 1) in [v[1:] for v in expected] and not any(v[1:3] == ("q7", 1) for v in expected)
    read_only = FeedbackStore.open(settings(0), read_only=True)
    assert read_only.get_query("q0")["result_face_ids"] == list(range(10))
    read_only.close()
