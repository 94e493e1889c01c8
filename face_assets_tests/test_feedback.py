"""The feedback store on DuckDB and on a real PostgreSQL server, and the export to training Parquet files.

Every store test runs on both backends with the same assertions; votes are on real indexed LFW faces.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from face_assets import load_settings
from face_assets.cli import main as cli
from face_assets.errors import (ConfigError, FeedbackError, FeedbackStoreUnavailableError, NotAResultError,
                               UnknownFaceError, UnknownQueryError)
from face_assets.feedback import PAIRS_SCHEMA, TRIPLETS_SCHEMA, mine_negatives
from face_assets.library import FaceRecognitionLibrary

BACKENDS = ["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def lib(request, indexed_dir, tmp_path) -> FaceRecognitionLibrary:
    """A library over a copy of the indexed folder, its feedback store on the parametrized backend."""
    folder = tmp_path / "data"
    shutil.copytree(indexed_dir, folder)
    feedback = {"backend": request.param}
    if request.param == "postgresql":
        feedback["postgresql_dsn"] = request.getfixturevalue("postgres_dsn")
    settings = load_settings(overrides={"storage": {"data_dir": str(folder)}, "feedback": feedback})
    with FaceRecognitionLibrary(settings=settings) as library:
        yield library


def _person(path: str) -> str:
    return Path(path).parent.name


def _index_names(lib: FaceRecognitionLibrary) -> set[str]:
    if lib.feedback.backend == "duckdb":
        return {r["index_name"] for r in lib.feedback.query(
            "SELECT index_name FROM duckdb_indexes() WHERE table_name = 'feedback'")}
    return {r["indexname"] for r in lib.feedback.query("SELECT indexname FROM pg_indexes WHERE tablename = 'feedback'")}


def test_votes_upsert_validate_and_keep_embeddings(lib, feedback_people):
    person, photos = next(iter(feedback_people.items()))
    data = photos[0].read_bytes()
    q = lib.feedback_search(data, session_id="s1", filename="mine.jpg")
    stored = lib.feedback.get_query(q.query_id)
    saved = Path(stored["image_path"])
    assert saved.read_bytes() == data and saved.parent == (lib.index_dir / "feedback" / "queries").resolve()
    assert saved.name == f"{q.query_id}.jpg" and stored["filename"] == "mine.jpg" and stored["session_id"] == "s1"
    # An upload of a catalog photo is that catalog face, which is no result to vote on.
    assert q.query_face_id == lib.search(photos[0], top_k=1)[0].face_id
    assert q.query_face_id not in [r.face_id for r in q.results] and len(q.results) == lib.settings.feedback.search_top_k
    assert np.allclose(stored["embedding"], lib.get_embedding(photos[0]), atol=1e-5)
    assert stored["model_version"] == lib.model_version and len(stored["bbox"]) == 4

    hit = q.results[0]
    first = lib.record_feedback(q.query_id, hit.face_id, "up", voter="alice", session_id="s1")
    again = lib.record_feedback(q.query_id, hit.face_id, "down", voter="alice", session_id="s2")
    other = lib.record_feedback(q.query_id, hit.face_id, "up", voter="bob")
    assert first.revisions == 0 and again.revisions == 1 and again.feedback_id == first.feedback_id
    assert again.created_at == first.created_at and again.updated_at >= first.updated_at
    assert other.feedback_id != first.feedback_id
    assert abs(first.similarity - hit.similarity) < 1e-4

    rows = lib.feedback.votes(query_id=q.query_id)
    assert [(r["voter"], r["vote"], r["session_id"]) for r in rows] == [("alice", "down", "s2"), ("bob", "up", None)]
    assert _person(rows[0]["result_path"]) == _person(hit.path) and rows[0]["model_version"] == lib.model_version
    emb = lib.feedback.query("SELECT query_embedding, result_embedding FROM feedback WHERE voter = ?", ["alice"])[0]
    query_emb, result_emb = np.asarray(emb["query_embedding"]), np.asarray(emb["result_embedding"])
    assert query_emb.shape == result_emb.shape == (512,)
    assert abs(float(query_emb @ result_emb) - first.similarity) < 1e-4

    with pytest.raises(FeedbackError, match="'up' or 'down'"):
        lib.record_feedback(q.query_id, hit.face_id, "maybe", voter="carol")
    with pytest.raises(UnknownQueryError):
        lib.record_feedback("no-such-query", hit.face_id, "up", voter="carol")
    with pytest.raises(NotAResultError):  # a catalog face the search did not show
        lib.record_feedback(q.query_id, q.query_face_id, "up", voter="carol")
    with pytest.raises(NotAResultError):
        lib.record_feedback(q.query_id, 10**9, "up", voter="carol")
    with pytest.raises(UnknownFaceError):
        lib.record_feedback(q.query_id, "not-a-face-id", "up", voter="carol")
    stats = lib.feedback_stats()
    assert stats | {"last_vote_at": None} == {
        "backend": lib.feedback.backend, "queries": 1, "votes": 2, "up": 1, "down": 1, "voters": 2,
        "by_model_version": {lib.model_version: 2}, "last_vote_at": None}
    assert {"feedback_query_idx", "feedback_result_idx", "feedback_time_idx", "feedback_model_idx"} <= _index_names(lib)


def test_catalog_face_query_and_store_survives_reopen(lib):
    face_id = lib.catalog.valid_face_ids(lib.model_version).tolist()[2]
    q = lib.feedback_search(face_id=face_id, top_k=3)
    assert q.query_face_id == face_id and face_id not in [r.face_id for r in q.results] and len(q.results) == 3
    lib.record_feedback(q.query_id, q.results[1].face_id, "up", voter="v")
    lib.load()  # reopening the catalog reopens the store
    assert [r["result_face_id"] for r in lib.feedback.votes()] == [q.results[1].face_id]
    # A query remembered only by the store (another process, or before a restart) still takes votes.
    other = FaceRecognitionLibrary(settings=lib.settings)
    try:
        assert other.record_feedback(q.query_id, q.results[2].face_id, "down", voter="w").vote == "down"
    finally:
        other.close()
    with pytest.raises(UnknownFaceError):
        lib.feedback_search(face_id=10**9)


def test_export_pairs_triplets_and_quality_report(lib, feedback_people, tmp_path):
    names = list(feedback_people)
    threshold = lib.settings.search.match_threshold
    queries, expected = {}, {}
    for name in names:
        q = lib.feedback_search(feedback_people[name][0].read_bytes(), top_k=6)
        queries[name] = q
        for hit in q.results:  # the truth: same folder and similar (LFW photos also show bystanders)
            up = _person(hit.path) == name and hit.similarity >= threshold
            expected[(q.query_id, hit.face_id)] = int(up)
            lib.record_feedback(q.query_id, hit.face_id, "up" if up else "down", voter="truth")
    a, b, c = (queries[n] for n in names)
    a_same = [h.face_id for h in a.results if expected[(a.query_id, h.face_id)] and h.face_id != a.query_face_id]
    # conflicting: two voters disagree with the truth on one pair (1 of 3 agree)
    lib.record_feedback(a.query_id, a_same[0], "down", voter="x")
    lib.record_feedback(a.query_id, a_same[0], "down", voter="y")
    # outvoted: one wrong voter among five on another pair
    for voter in ("p", "q", "r"):
        lib.record_feedback(a.query_id, a_same[1], "up", voter=voter)
    lib.record_feedback(a.query_id, a_same[1], "down", voter="troll")
    # deleted face: a result of the second query leaves the catalog
    removed = next(h.face_id for h in b.results if h.face_id != b.query_face_id and h.face_id not in a_same[:2])
    votes_on_removed = sum(r["result_face_id"] == removed for r in lib.feedback.votes())
    lib.remove(removed)
    # missing query image: the third query's file is gone
    Path(lib.feedback.get_query(c.query_id)["image_path"]).unlink()

    report = lib.export_feedback(tmp_path / "export")
    pairs = pl.read_parquet(tmp_path / "export" / "pairs.parquet")
    triplets = pl.read_parquet(tmp_path / "export" / "triplets.parquet")
    assert pq.read_schema(tmp_path / "export" / "pairs.parquet").remove_metadata() == PAIRS_SCHEMA
    assert pq.read_schema(tmp_path / "export" / "triplets.parquet").remove_metadata() == TRIPLETS_SCHEMA

    assert report.votes_read == 18 + 2 + 4
    assert report.dropped["deleted_face"] == votes_on_removed
    assert report.dropped["missing_query_image"] == 6 - sum(h.face_id == removed for h in c.results)
    assert "self_pair" not in report.dropped  # a query's own face is never among its results to vote on
    assert report.dropped["conflicting_votes"] == 3 and report.dropped["outvoted"] == 1
    assert {e["reason"] for e in report.dropped_examples} >= {"conflicting_votes", "deleted_face"}

    by_source = dict(pairs.group_by("source").len().iter_rows())
    assert report.positives == by_source["vote_up"] == pairs.filter(pl.col("label") == 1).height
    assert report.negatives == {"vote_down": by_source["vote_down"], "mined_negative": by_source.get("mined_negative", 0)}
    assert report.pairs == pairs.height and report.triplets == triplets.height > 0
    voted = pairs.filter(pl.col("source") != "mined_negative")
    assert {(r["query_id"], r["result_face_id"]): r["label"] for r in voted.iter_rows(named=True)} == {
        k: v for k, v in expected.items()
        if k[0] != c.query_id and k[1] not in (removed, a_same[0])}
    for row in pairs.iter_rows(named=True):
        assert row["query_face_id"] in (a.query_face_id, b.query_face_id) and row["model_version"] == lib.model_version
        assert len(row["query_bbox"]) == len(row["result_bbox"]) == 4 and Path(row["query_path"]).is_file()
        assert row["result_face_id"] != row["query_face_id"] and Path(row["result_path"]).is_file()
    # mined negatives: no clusters yet, so below the match threshold, among faces nobody voted on
    mined = pairs.filter(pl.col("source") == "mined_negative")
    assert mined.height > 0 and report.mining == {"threshold": mined.height}
    assert (mined["similarity"] < threshold).all()
    assert not set(zip(mined["query_id"], mined["result_face_id"])) & set(expected)
    # hardest negatives first: thumbs-down by similarity, then mined by similarity
    negatives = pairs.filter(pl.col("label") == 0)
    assert negatives["source"].to_list() == sorted(negatives["source"].to_list(), key=lambda s: s != "vote_down")
    for part in negatives.partition_by("source"):
        assert part["similarity"].to_list() == sorted(part["similarity"].to_list(), reverse=True)
    # class balance: negatives per positive within the configured cap
    assert report.negatives_per_positive <= lib.settings.feedback.max_negatives_per_positive
    positive_ids = set(pairs.filter(pl.col("label") == 1)["result_face_id"])
    negative_sim = {(r["query_face_id"], r["result_face_id"]): r["similarity"]
                    for r in negatives.iter_rows(named=True)}
    for t in triplets.iter_rows(named=True):
        assert t["positive_face_id"] in positive_ids
        assert negative_sim[(t["anchor_face_id"], t["negative_face_id"])] == t["negative_similarity"]

    again = lib.export_feedback(tmp_path / "export")  # idempotent rerun
    assert again.to_dict() == report.to_dict()
    assert pl.read_parquet(tmp_path / "export" / "pairs.parquet").equals(pairs)
    assert (tmp_path / "export" / "report.json").is_file()


def test_mining_by_clusters_and_by_threshold():
    candidates = [(10, 0.60, 7, 0.9), (11, 0.50, 8, 0.2), (12, 0.30, None, 0.1), (13, 0.20, None, 0.1),
                  (14, 0.10, 9, 0.4), (15, 0.05, None, 0.3)]
    # with the query person's cluster known: other clusters are negatives however similar
    assert mine_negatives(candidates, {7}, 0.25, 10) == [
        (11, 0.50, "cluster"), (13, 0.20, "threshold"), (14, 0.10, "cluster")]
    # without clusters: below the threshold to the query and to every up-voted face
    assert mine_negatives(candidates, set(), 0.25, 10) == [(13, 0.20, "threshold")]
    assert mine_negatives(candidates, {7}, 0.25, 1) == [(11, 0.50, "cluster")]


def test_postgresql_needs_a_reachable_dsn(tmp_path, postgres_server):
    settings = load_settings(overrides={"storage": {"data_dir": str(tmp_path)}, "feedback": {"backend": "postgresql"}})
    with FaceRecognitionLibrary(settings=settings) as library, pytest.raises(ConfigError, match="postgresql_dsn"):
        library.feedback
    wrong = postgres_server + " dbname=no_such_database"
    settings.feedback.postgresql_dsn = wrong
    with FaceRecognitionLibrary(settings=settings) as library:
        with pytest.raises(FeedbackStoreUnavailableError, match="no_such_database"):
            library.feedback
        with pytest.raises(FeedbackStoreUnavailableError):  # refused again on the next use, not cached
            library.record_feedback("q", 1, "up")


def test_cli_feedback_stats_and_export(indexed_dir, feedback_people, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(indexed_dir, folder)
    with FaceRecognitionLibrary(index_dir=folder) as library:
        q = library.feedback_search(feedback_people[next(iter(feedback_people))][0], top_k=4)
        for hit in q.results[1:]:
            library.record_feedback(q.query_id, hit.face_id, "up" if hit.similarity > 0.4 else "down", voter="v")
    assert cli(["--data-dir", str(folder), "feedback", "stats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["votes"] == 3
    assert cli(["--data-dir", str(folder), "feedback", "export", str(tmp_path / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["votes_read"] == 3 and report["pairs"] == pl.read_parquet(tmp_path / "out" / "pairs.parquet").height
    assert cli(["--data-dir", str(folder), "feedback", "export", str(tmp_path / "out")]) == 0
    assert "3 votes read" in capsys.readouterr().out


def test_more_results_become_votable(lib):
    face_id = lib.catalog.valid_face_ids(lib.model_version).tolist()[0]
    q = lib.feedback_search(face_id=face_id, top_k=2)
    lib.record_feedback(q.query_id, q.results[0].face_id, "up", voter="v")
    later = lib.more_results(q.query_id, 2, 3)
    assert len(later) == 3 and not {r.face_id for r in later} & {face_id, *(r.face_id for r in q.results)}
    beyond = lib.search_embedding(lib.catalog.embeddings([face_id])[1][0], top_k=12)[-1].face_id
    with pytest.raises(NotAResultError):  # never shown
        lib.record_feedback(q.query_id, beyond, "up", voter="v")
    # Another process (no memory of the query) accepts a vote on a result shown later.
    other = FaceRecognitionLibrary(settings=lib.settings)
    try:
        assert other.record_feedback(q.query_id, later[2].face_id, "down", voter="v").vote == "down"
    finally:
        other.close()


def test_mined_negatives_use_person_clusters(lib, feedback_people, tmp_path):
    lib.cluster()
    name = next(iter(feedback_people))
    q = lib.feedback_search(feedback_people[name][0].read_bytes(), top_k=4)
    for hit in q.results:
        lib.record_feedback(q.query_id, hit.face_id, "up" if _person(hit.path) == name else "down", voter="truth")
    report = lib.export_feedback(tmp_path / "export")
    assert report.mining.get("cluster", 0) > 0  # faces of other persons' clusters, found through the cluster store
