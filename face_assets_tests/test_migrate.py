"""`face-assets migrate`: a data folder of an older release, built here by SQL in real DuckDB files, is
refused by the normal opens with a typed error, upgraded in place once with every row kept, and opened
normally afterwards; a second run has nothing to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest

from face_assets.audit import AuditLog
from face_assets.cli import main
from face_assets.config import load_settings
from face_assets.errors import MigrationRequiredError
from face_assets.feedback import FeedbackStore
from face_assets.library import FaceRecognitionLibrary
from face_assets.migrate import migrate_data_folder
from face_assets.store import Catalog

# The catalog of the releases that kept it in one file (data/face_assets.duckdb): images had no image_seq.
OLD_CATALOG = """
CREATE SEQUENCE face_id_seq START 1;
CREATE TABLE images (
    image_id VARCHAR PRIMARY KEY, content_hash VARCHAR NOT NULL, path VARCHAR NOT NULL, width INTEGER,
    height INTEGER, status VARCHAR NOT NULL, rejection_reason VARCHAR, error VARCHAR,
    num_faces INTEGER NOT NULL DEFAULT 0, padded BOOLEAN, model_version VARCHAR, metadata JSON,
    processed_at TIMESTAMPTZ NOT NULL);
CREATE TABLE faces (
    face_id BIGINT PRIMARY KEY DEFAULT nextval('face_id_seq'), image_id VARCHAR NOT NULL,
    face_index INTEGER NOT NULL, x1 REAL, y1 REAL, x2 REAL, y2 REAL, det_score REAL NOT NULL,
    embedding_norm REAL NOT NULL, face_width INTEGER NOT NULL, face_height INTEGER NOT NULL,
    face_area_ratio REAL NOT NULL, cartoon_probability REAL NOT NULL, quality REAL NOT NULL,
    is_valid BOOLEAN NOT NULL, rejection_reason VARCHAR, model_version VARCHAR NOT NULL,
    embedding FLOAT[] NOT NULL);
CREATE INDEX faces_image_idx ON faces (image_id);
CREATE INDEX images_hash_idx ON images (content_hash);
"""

# A feedback store master of the releases before the publication ordered its tables (_published_tables
# without ord) and before queries had publication keys and their shown results.
OLD_FEEDBACK = """
CREATE SEQUENCE _change_seq START 1;
CREATE TABLE _published_tables (tbl VARCHAR PRIMARY KEY, key VARCHAR, exclude VARCHAR[] NOT NULL);
CREATE TABLE _changes (tbl VARCHAR NOT NULL, kind VARCHAR NOT NULL, lo BIGINT, hi BIGINT,
                       seq BIGINT NOT NULL DEFAULT nextval('_change_seq'));
CREATE TABLE _segments (tbl VARCHAR NOT NULL, seg BIGINT NOT NULL, data VARCHAR NOT NULL, keys VARCHAR,
                        rows BIGINT NOT NULL, base BOOLEAN NOT NULL);
CREATE SEQUENCE feedback_id_seq START 1;
CREATE TABLE feedback_queries (
    query_id VARCHAR PRIMARY KEY, created_at TIMESTAMPTZ NOT NULL, session_id VARCHAR,
    model_version VARCHAR NOT NULL, embedding REAL[] NOT NULL, image_path VARCHAR NOT NULL,
    content_hash VARCHAR NOT NULL, width INTEGER, height INTEGER, bbox REAL[] NOT NULL, det_score REAL,
    query_face_id BIGINT, source VARCHAR NOT NULL, filename VARCHAR);
CREATE INDEX feedback_queries_time_idx ON feedback_queries (created_at);
CREATE TABLE feedback_more_results (query_id VARCHAR NOT NULL, face_id BIGINT NOT NULL,
                                    PRIMARY KEY (query_id, face_id));
CREATE TABLE feedback (
    feedback_id BIGINT PRIMARY KEY DEFAULT nextval('feedback_id_seq'),
    query_id VARCHAR NOT NULL REFERENCES feedback_queries (query_id), result_face_id BIGINT NOT NULL,
    vote VARCHAR NOT NULL CHECK (vote IN ('up', 'down')), voter VARCHAR NOT NULL, session_id VARCHAR,
    created_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL, revisions INTEGER NOT NULL DEFAULT 0,
    model_version VARCHAR NOT NULL, similarity REAL NOT NULL, query_embedding REAL[] NOT NULL,
    result_embedding REAL[] NOT NULL, result_image_id VARCHAR NOT NULL, result_path VARCHAR NOT NULL,
    result_bbox REAL[] NOT NULL, result_metadata JSON, UNIQUE (query_id, result_face_id, voter));
INSERT INTO _published_tables VALUES ('feedback', 'feedback_id', []);
"""

TAG = "buffalo_s/old@000000000000"
AUDIT = [{"at": "2026-01-02T03:04:05+00:00", "actor": "ann", "action": "rename", "cluster_id": 1, "old": None,
          "new": "Ann"},
         {"at": "2026-01-02T03:05:00+00:00", "actor": "ann", "action": "merge", "cluster_ids": [1, 2], "kept": 1}]


def _old_folder(data: Path) -> dict[str, list[tuple]]:
    """An older release's data folder: a one-file catalog, an old feedback master and a JSON-lines curation
    log, with rows; returns the rows written, per table."""
    rng = np.random.default_rng(7)
    data.mkdir(parents=True)
    with duckdb.connect(str(data / "face_assets.duckdb")) as con:
        con.execute(OLD_CATALOG)
        for i in range(3):
            con.execute("INSERT INTO images VALUES (?, ?, ?, 640, 480, 'valid', NULL, NULL, ?, false, ?, NULL, "
                        "TIMESTAMPTZ '2026-01-01 00:00:00+00' + INTERVAL (?) MINUTE)",
                        [f"img{i}", f"hash{i}", f"/photos/{i}.jpg", 2 if i < 1 else 1, TAG, i])
        for image, index in [("img0", 0), ("img0", 1), ("img1", 0), ("img2", 0)]:
            emb = rng.standard_normal(512).astype(np.float32)
            con.execute("INSERT INTO faces (image_id, face_index, x1, y1, x2, y2, det_score, embedding_norm, "
                        "face_width, face_height, face_area_ratio, cartoon_probability, quality, is_valid, "
                        "rejection_reason, model_version, embedding) VALUES (?, ?, 1, 2, 101, 122, 0.9, 21.5, 100, "
                        "120, 0.04, 0.01, 0.8, true, NULL, ?, ?)", [image, index, TAG, emb / np.linalg.norm(emb)])
    (data / "store").mkdir()
    with duckdb.connect(str(data / "store" / "feedback.duckdb")) as con:
        con.execute(OLD_FEEDBACK)
        for q in ("q1", "q2"):
            con.execute("INSERT INTO feedback_queries VALUES (?, TIMESTAMPTZ '2026-01-03 10:00:00+00', 's', ?, ?, "
                        "?, ?, 640, 480, [1, 2, 101, 122], 0.9, NULL, 'upload', 'me.jpg')",
                        [q, TAG, [0.5] * 512, f"feedback/queries/{q}.jpg", f"qhash-{q}"])
        for q, face, vote, voter in [("q1", 1, "up", "ann"), ("q1", 2, "down", "ann"), ("q2", 3, "up", "bob")]:
            con.execute("INSERT INTO feedback (query_id, result_face_id, vote, voter, session_id, created_at, "
                        "updated_at, model_version, similarity, query_embedding, result_embedding, result_image_id, "
                        "result_path, result_bbox) VALUES (?, ?, ?, ?, 's', TIMESTAMPTZ '2026-01-03 10:01:00+00', "
                        "TIMESTAMPTZ '2026-01-03 10:01:00+00', ?, 0.7, ?, ?, 'img0', '/photos/0.jpg', [1, 2, 3, 4])",
                        [q, face, vote, voter, TAG, [0.5] * 512, [0.25] * 512])
        con.execute("INSERT INTO feedback_more_results VALUES ('q1', 4)")
    (data / "audit").mkdir()
    (data / "audit" / "people.jsonl").write_text("".join(json.dumps(e) + "\n" for e in AUDIT))
    return {**_rows(data / "face_assets.duckdb", ["images", "faces"]),
            **_rows(data / "store" / "feedback.duckdb", ["feedback_queries", "feedback", "feedback_more_results"])}


# The columns each table had in the older release, in its order: what every row must keep.
COLUMNS = {
    "images": "image_id, content_hash, path, width, height, status, num_faces, padded, model_version, processed_at",
    "faces": "face_id, image_id, face_index, x1, y2, det_score, embedding_norm, is_valid, model_version, embedding",
    "feedback_queries": "query_id, created_at, model_version, embedding, image_path, content_hash, bbox, filename",
    "feedback": "feedback_id, query_id, result_face_id, vote, voter, similarity, result_embedding, result_bbox",
    "feedback_more_results": "query_id, face_id",
}


def _rows(path: Path, tables: list[str]) -> dict[str, list[tuple]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {t: con.execute(f"SELECT {COLUMNS[t]} FROM {t} ORDER BY ALL").fetchall() for t in tables}


def test_an_old_data_folder_is_refused_then_migrated_once_with_every_row(tmp_path, capsys):
    data = tmp_path / "data"
    before = _old_folder(data)
    settings = load_settings(overrides={"storage": {"data_dir": str(data)}}, environ={})

    # Before: every normal open says what to run, and changes nothing.
    with pytest.raises(MigrationRequiredError, match="face-assets migrate") as err:
        FaceRecognitionLibrary(settings=settings)
    assert "a catalog in one file" in str(err.value)
    with pytest.raises(MigrationRequiredError, match="feedback_queries without column query_seq") as err:
        FeedbackStore.open(settings)
    assert "_published_tables without column ord" in str(err.value)
    master = data / "store" / "catalog.duckdb"
    assert not master.exists()
    shutil.copyfile(data / "face_assets.duckdb", tmp_path / "copied.duckdb")  # a master copied, not upgraded
    with pytest.raises(MigrationRequiredError, match="images without column image_seq"):
        Catalog(tmp_path / "copied.duckdb")
    with pytest.raises(MigrationRequiredError, match="former JSON-lines"):
        AuditLog(Catalog(tmp_path / "fresh.duckdb").db, data / "audit" / "people.jsonl")

    assert main(["migrate", "--data-dir", str(data)]) == 0
    done = capsys.readouterr().out
    for step in ("face_assets.duckdb: copied to", "column image_seq added to table images",
                 "2 curation log entries", "column ord added to table _published_tables",
                 "column query_seq added to table feedback_queries", "column result_face_ids added",
                 "column result_seq added to table feedback_more_results"):
        assert step in done, step

    # Every row kept, with the new keys given; the former log set aside, nothing else removed.
    after = {**_rows(master, ["images", "faces"]),
             **_rows(data / "store" / "feedback.duckdb", ["feedback_queries", "feedback", "feedback_more_results"])}
    assert after == before and sum(map(len, after.values())) == 3 + 4 + 2 + 3 + 1
    with duckdb.connect(str(master), read_only=True) as con:
        seqs = [r[0] for r in con.execute("SELECT image_seq FROM images").fetchall()]
    with duckdb.connect(str(data / "store" / "feedback.duckdb"), read_only=True) as con:
        keys = con.execute("SELECT count(DISTINCT query_seq), count(*) FILTER (result_face_ids IS NULL) "
                           "FROM feedback_queries").fetchone()
        result_seq = con.execute("SELECT result_seq FROM feedback_more_results").fetchone()[0]
    assert sorted(seqs) == [1, 2, 3] and keys == (2, 2) and result_seq is not None
    assert not (data / "audit" / "people.jsonl").exists() and (data / "audit" / "people.jsonl.imported").is_file()

    # The normal opens work, and what they publish holds the old rows.
    with FaceRecognitionLibrary(settings=settings) as lib:
        stats = lib.stats()
        assert (stats["images"], stats["faces"]) == (3, 4)
        assert [(e["actor"], e["action"]) for e in lib.curation_log(limit=10)] == [("ann", "merge"), ("ann", "rename")]
        assert lib.feedback_stats()["votes"] == 3
        lib.feedback.add_results("q2", [1])  # the new key columns take new rows
    with Catalog.open(settings.storage, read_only=True) as published:
        assert published.query("SELECT count(*) FROM images")[0][0] == 3
    published = FeedbackStore.open(settings, read_only=True)
    assert published.query("SELECT count(*) AS n FROM feedback_queries") == [{"n": 2}]
    published.close()

    # A second run has nothing to do.
    assert migrate_data_folder(settings) == []
    assert main(["migrate", "--data-dir", str(data)]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_current_or_empty_folder_has_nothing_to_migrate(tmp_path):
    settings = load_settings(overrides={"storage": {"data_dir": str(tmp_path / "data")}}, environ={})
    assert migrate_data_folder(settings) == []
    assert not (tmp_path / "data").exists()  # nothing created
    Catalog.open(settings.storage).close()
    FeedbackStore.open(settings).close()
    assert (tmp_path / "data" / "store" / "catalog.duckdb").is_file()
    assert migrate_data_folder(settings) == []


def test_an_old_postgresql_feedback_store_is_refused_then_migrated(postgres_dsn, tmp_path):
    """The same columns on the PostgreSQL backend: refused before, added once, every vote kept."""
    import psycopg

    old = OLD_FEEDBACK[OLD_FEEDBACK.index("CREATE SEQUENCE feedback_id_seq"):OLD_FEEDBACK.index("INSERT INTO _published")]
    with psycopg.connect(postgres_dsn, autocommit=True) as con:
        con.execute(old)
        for q in ("q1", "q2"):
            con.execute("INSERT INTO feedback_queries VALUES (%s, now(), 's', %s, %s, %s, %s, 640, 480, %s, 0.9, NULL, "
                        "'upload', 'me.jpg')", [q, TAG, [0.5] * 512, f"feedback/queries/{q}.jpg", f"qhash-{q}",
                                                [1.0, 2.0, 101.0, 122.0]])
        con.execute("INSERT INTO feedback (query_id, result_face_id, vote, voter, created_at, updated_at, model_version, "
                    "similarity, query_embedding, result_embedding, result_image_id, result_path, result_bbox) VALUES "
                    "('q1', 1, 'up', 'ann', now(), now(), %s, 0.7, %s, %s, 'img0', '/photos/0.jpg', %s)",
                    [TAG, [0.5] * 512, [0.25] * 512, [1.0, 2.0, 3.0, 4.0]])
        con.execute("INSERT INTO feedback_more_results VALUES ('q1', 4)")
    settings = load_settings(overrides={"storage": {"data_dir": str(tmp_path / "data")},
                                        "feedback": {"backend": "postgresql", "postgresql_dsn": postgres_dsn}},
                             environ={})
    with pytest.raises(MigrationRequiredError, match="PostgreSQL feedback store .*feedback_queries without column query_seq"):
        FeedbackStore.open(settings)
    done = migrate_data_folder(settings)
    assert len(done) == 3 and all(line.startswith("the PostgreSQL feedback store: column") for line in done)
    store = FeedbackStore.open(settings)
    try:
        assert store.stats()["votes"] == 1
        assert store.query("SELECT count(DISTINCT query_seq) AS n FROM feedback_queries") == [{"n": 2}]
        assert store.query("SELECT face_id, result_seq IS NOT NULL AS keyed FROM feedback_more_results") == [
            {"face_id": 4, "keyed": True}]
    finally:
        store.close()
    assert migrate_data_folder(settings) == []
