"""Person clusters of a library: full runs, incremental assignment, curation, persistence.

This module ties :mod:`face_assets.clustering` (pure computations) to the catalog's faces and
owns the person tables (``clusters``, ``face_clusters``, ``cluster_constraints``, ``cluster_runs``)
and their SQL (:class:`ClusterStore`). :class:`~face_assets.library.FaceRecognitionLibrary` exposes it as
``cluster()``, ``assign_new()``, ``merge()``, ``split()``, ``move()``, ``rename()``,
``get_cluster()``, ``list_clusters()`` and ``recluster_policy()``.

Curation decisions are stored as face-pair constraints, which every later run honours:

* ``merge``: every face of the merged clusters must-links the kept cluster's representative;
* ``split``: the faces of each part must-link the part's first face; the parts' first faces
  cannot-link each other;
* ``move``: the face must-links every face of the target and cannot-links its old cluster's
  representative.

Two faces of one photo are never put in one person unless a must-link says so (a user decision).
A later decision on the same pair of faces replaces an earlier one.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from .clustering import (
    ReclusterDecision,
    assign_to_clusters,
    cluster_embeddings,
    cluster_means,
    cluster_quality,
    match_ids,
    recluster_decision,
    split_kmeans,
)
from .cluster_means import MIN_ROWS, ClusterMeans
from .config import ClusteringSettings
from .audit import ACTOR, AuditLog
from .errors import ClusterNotFoundError, CurationError, InvalidNameError
from .schemas import ClusterInfo, ClusterRun
from .storage import Table, log_all, log_changes, log_changes_where, utc_now
from .store import Catalog

#: Person clusters (``docs/clustering.md``), in the catalog's DuckDB file beside the faces they group.
#: ``face_clusters`` maps each clustered face to its cluster; ``clusters.centroid`` is the
#: unnormalised mean embedding (a face's inner product with it is its average cosine with the
#: cluster), used by incremental assignment; ``cluster_constraints`` holds the curation decisions
#: (must-link / cannot-link face pairs) every run honours; ``cluster_runs`` the quality metrics of each run.
CLUSTER_SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS cluster_run_seq START 1;
CREATE TABLE IF NOT EXISTS clusters (
    cluster_id BIGINT PRIMARY KEY,
    size INTEGER NOT NULL,
    representative_face_id BIGINT,
    cohesion REAL,
    separation REAL,
    confidence REAL,
    label VARCHAR,
    centroid FLOAT[],
    run_id BIGINT,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS face_clusters (
    face_id BIGINT PRIMARY KEY,
    cluster_id BIGINT NOT NULL,
    source VARCHAR NOT NULL,
    assigned_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX IF NOT EXISTS face_clusters_cluster_idx ON face_clusters (cluster_id);
CREATE TABLE IF NOT EXISTS cluster_constraints (
    face_a BIGINT NOT NULL,
    face_b BIGINT NOT NULL,
    kind VARCHAR NOT NULL,
    reason VARCHAR,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (face_a, face_b)
);
CREATE TABLE IF NOT EXISTS cluster_runs (
    run_id BIGINT PRIMARY KEY DEFAULT nextval('cluster_run_seq'),
    kind VARCHAR NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    seconds REAL,
    faces BIGINT,
    clusters BIGINT,
    singletons BIGINT,
    new_faces BIGINT,
    unassigned BIGINT,
    id_changed REAL,
    cohesion REAL,
    separation REAL,
    silhouette REAL,
    model_version VARCHAR,
    settings JSON
);
"""


#: The person tables readers get (``centroid`` is the assignment's internal state, 2 KiB a person).
TABLES = [Table("clusters", "cluster_id", exclude=("centroid",)), Table("face_clusters", "face_id"),
          # Keyed by the pair's first face: a curation decision publishes the rows of the faces it
          # touched, not the whole table, which grows with every decision ever made.
          Table("cluster_constraints", "face_a"), Table("cluster_runs", "run_id")]


class ClusterStore:
    """The person tables and their SQL, on the catalog's DuckDB file (sessions of ``catalog.db``).

    Creates its tables on first use; on a read-only (published) catalog it only reads.
    """

    def __init__(self, catalog: Catalog, former_audit_log: str | os.PathLike | None = None,
                 means_folder: Path | None = None):
        self.catalog = catalog
        self._means_folder = means_folder
        catalog.db.ensure(CLUSTER_SCHEMA, "cluster_runs")
        catalog.db.declare(TABLES)
        self.audit = AuditLog(catalog.db, former_audit_log)
        """The curation audit log, beside the person tables (a former log file still at ``former_audit_log``
        makes it raise :class:`MigrationRequiredError`)."""

    def transaction(self):
        """One write session on the catalog file (joined by nested calls of the same thread)."""
        return self.catalog.db.write()

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """A read query on the person tables (and the catalog's), all rows."""
        with self.catalog.db.read() as con:
            return con.execute(sql, params or []).fetchall()

    def cluster_ids(self, face_ids: Sequence[int]) -> dict[int, int]:
        """Face id -> person cluster id of the clustered ones (published file first, like search results)."""
        rows = self.catalog.db.read_ids("SELECT face_id, cluster_id FROM face_clusters WHERE face_id IN ({keys})",
                                        [int(i) for i in face_ids])
        return {int(f): int(c) for f, c in rows}

    def labels(self, cluster_ids: Sequence[int]) -> dict[int, str | None]:
        """Cluster id -> name of the given clusters that exist (published file first, like search
        results: a search never waits for a writer)."""
        return dict(self.catalog.db.read_ids("SELECT cluster_id, label FROM clusters WHERE cluster_id IN ({keys})",
                                             [int(c) for c in cluster_ids]))

    def members(self, cluster_id: int, limit: int | None = None, offset: int = 0) -> list[int]:
        """Face ids of a cluster by id, ``limit`` of them from ``offset`` (the cluster index finds them)."""
        rows = self.query("SELECT face_id FROM face_clusters WHERE cluster_id = ? ORDER BY face_id LIMIT ? OFFSET ?",
                          [int(cluster_id), limit, int(offset)])
        return [r[0] for r in rows]

    def find(self, text: str = "", min_size: int = 1, limit: int | None = None,
             offset: int = 0) -> tuple[int, list[tuple]]:
        """``(count, rows)`` of the clusters of at least ``min_size`` faces whose name contains ``text``
        (case-insensitive) or whose id it is (``12`` / ``#12``), largest first; one page of rows
        (:data:`_INFO_COLS`), counted and cut by the store."""
        needle = unicodedata.normalize("NFC", text or "").strip()
        where, params = ["size >= ?"], [int(min_size)]
        if needle:
            digits = needle.removeprefix("#")
            ident = int(digits) if digits.isdigit() and len(digits) < 19 else None
            where.append("(label ILIKE ? ESCAPE '\\' OR cluster_id = ?)")
            params += ["%" + re.sub(r"([\\%_])", r"\\\1", needle) + "%", ident]
        cond = " AND ".join(where)
        with self.catalog.db.read() as con:
            total = int(con.execute(f"SELECT count(*) FROM clusters WHERE {cond}", params).fetchone()[0])
            # The page's ids first, sorting two columns, then its rows: the other columns are read for
            # one page, not for every person (a window count over all of them cost 6x at 437k persons).
            rows = con.execute(f"WITH page AS (SELECT cluster_id FROM clusters WHERE {cond} "
                               "ORDER BY size DESC, cluster_id LIMIT ? OFFSET ?) "
                               f"SELECT {_INFO_COLS} FROM clusters JOIN page USING (cluster_id) "
                               "ORDER BY size DESC, cluster_id", [*params, limit, int(offset)]).fetchall()
        return total, rows

    def face_page(self, model_version: str, limit: int, offset: int = 0) -> list[tuple[int, int | None]]:
        """``(face id, cluster id or None)`` of the searchable faces of ``model_version`` by id: one page."""
        return [(int(f), c) for f, c in self.query(
            "SELECT f.face_id, c.cluster_id FROM faces f LEFT JOIN face_clusters c USING (face_id) "
            "WHERE f.is_valid AND f.model_version = ? ORDER BY f.face_id LIMIT ? OFFSET ?",
            [model_version, int(limit), int(offset)])]

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sizes, cohesions)`` of every cluster, largest first (NaN where no cohesion is known)."""
        with self.catalog.db.read() as con:
            rows = con.execute("SELECT size, coalesce(cohesion, 'NaN'::REAL) AS cohesion FROM clusters "
                               "ORDER BY size DESC").fetchnumpy()
        return rows["size"].astype(np.int64), rows["cohesion"].astype(np.float64)

    def count(self) -> int:
        """Number of person clusters."""
        return int(self.query("SELECT count(*) FROM clusters")[0][0])

    def clear(self) -> None:
        """Delete every cluster, assignment, constraint and run record."""
        with self.transaction() as con:
            for table in ("face_clusters", "clusters", "cluster_constraints", "cluster_runs"):
                con.execute(f"DELETE FROM {table}")
                log_all(con, table)

    def unclustered_faces(self, model_version: str) -> tuple[np.ndarray, np.ndarray]:
        """``(face ids, image ids)`` of the valid faces of ``model_version`` in no cluster, by face id."""
        with self.catalog.db.read() as con:
            rows = con.execute("""SELECT f.face_id, f.image_id FROM faces f
                                  WHERE f.is_valid AND f.model_version = ? AND NOT EXISTS
                                        (SELECT 1 FROM face_clusters c WHERE c.face_id = f.face_id)
                                  ORDER BY f.face_id""", [model_version]).fetchnumpy()
        return rows["face_id"].astype(np.int64), np.asarray(rows["image_id"], dtype=object)

    def cluster_stamps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(cluster ids, sizes, write times in microseconds)`` of every cluster, by id: what tells
        a kept copy of the means (:class:`~face_assets.cluster_means.ClusterMeans`) which rows changed."""
        with self.catalog.db.read() as con:
            rows = con.execute("SELECT cluster_id, size, epoch_us(updated_at) AS stamp FROM clusters "
                               "ORDER BY cluster_id").fetchnumpy()
        return (rows["cluster_id"].astype(np.int64), rows["size"].astype(np.int64), rows["stamp"].astype(np.int64))

    def centroids(self, dim: int, cluster_ids: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(cluster ids, sizes, write times in microseconds, means float32 [c, dim])`` of the clusters
        (all, or ``cluster_ids``) that have a centroid, by id, read together; as Arrow arrays (a
        Python list per person would cost seconds at a million persons)."""
        which = "" if cluster_ids is None else "AND cluster_id IN (SELECT unnest(?))"
        with self.catalog.db.read() as con:
            table = con.sql(f"SELECT cluster_id, size, epoch_us(updated_at) AS stamp, centroid FROM clusters "
                            f"WHERE centroid IS NOT NULL {which} ORDER BY cluster_id",
                            params=None if cluster_ids is None else [np.asarray(cluster_ids).tolist()]).to_arrow_table()
        centroid = table.column("centroid").combine_chunks()
        means = centroid.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return (table.column("cluster_id").to_numpy().astype(np.int64), table.column("size").to_numpy().astype(np.int64),
                table.column("stamp").to_numpy().astype(np.int64), means.reshape(len(table), dim))

    def means_folder(self) -> Path:
        """Where the kept copy of the cluster means lives (the data folder's layout names it; a store
        of its own keeps it beside its catalog file)."""
        return self._means_folder or self.catalog.path.parent / "cluster_means"

    def barred(self, face_ids: Sequence[int]) -> set[tuple[int, int]]:
        """``(face, cluster)`` pairs these faces may not join: the clusters of the other faces of their
        photos (two faces of one photo are two people) and of the faces curation cannot-linked them to."""
        with self.catalog.db.read() as con:
            rows = con.execute("""WITH new AS (SELECT unnest(?) AS face_id),
                     partners AS (
                         SELECT n.face_id, o.face_id AS other FROM new n JOIN faces f USING (face_id)
                         JOIN faces o ON o.image_id = f.image_id AND o.face_id <> n.face_id
                         UNION ALL SELECT face_a, face_b FROM cluster_constraints
                                   WHERE kind = 'cannot_link' AND face_a IN (SELECT face_id FROM new)
                         UNION ALL SELECT face_b, face_a FROM cluster_constraints
                                   WHERE kind = 'cannot_link' AND face_b IN (SELECT face_id FROM new))
                  SELECT DISTINCT p.face_id, c.cluster_id FROM partners p JOIN face_clusters c ON c.face_id = p.other""",
                               [[int(f) for f in face_ids]]).fetchall()
        return {(int(f), int(c)) for f, c in rows}

    def face_cluster_map(self) -> tuple[np.ndarray, np.ndarray]:
        """``(face ids, cluster ids)`` of every clustered face, by face id."""
        with self.catalog.db.read() as con:
            rows = con.execute("SELECT face_id, cluster_id FROM face_clusters ORDER BY face_id").fetchnumpy()
        return rows["face_id"].astype(np.int64), rows["cluster_id"].astype(np.int64)

    def constraints(self) -> tuple[np.ndarray, np.ndarray]:
        """``(must-link pairs, cannot-link pairs)``, int64 [m, 2] face ids, from curation."""
        with self.catalog.db.read() as con:
            rows = con.execute("SELECT face_a, face_b, kind FROM cluster_constraints").fetchall()
        must = np.array([(a, b) for a, b, k in rows if k == "must_link"], np.int64).reshape(-1, 2)
        cannot = np.array([(a, b) for a, b, k in rows if k == "cannot_link"], np.int64).reshape(-1, 2)
        return must, cannot

    def write_clusters(self, con: duckdb.DuckDBPyConnection, clusters: Sequence[dict[str, Any]],
                       assignments: tuple[np.ndarray, np.ndarray], source: str, replace_all: bool) -> None:
        """Upsert cluster rows and face -> cluster rows inside the caller's transaction.

        ``clusters``: dicts with the ``clusters`` columns (``centroid`` a float array or None).
        ``assignments``: ``(face ids, cluster ids)``. With ``replace_all`` the previous clustering is
        dropped first (labels of surviving ids are kept), else rows are upserted.
        """
        now = utc_now()
        ids = [int(c["cluster_id"]) for c in clusters]
        # The names and creation times that survive: of every person for a full rewrite, else of these only.
        which = "" if replace_all else " WHERE cluster_id IN (SELECT unnest(?))"
        params = [] if replace_all else [ids]
        labels = dict(con.execute(f"SELECT cluster_id, label FROM clusters{which}", params).fetchall())
        labels = {c: name for c, name in labels.items() if name is not None}
        created = dict(con.execute(f"SELECT cluster_id, created_at FROM clusters{which}", params).fetchall())
        if replace_all:
            con.execute("DELETE FROM clusters")
            con.execute("DELETE FROM face_clusters")
            log_all(con, "clusters")
            log_all(con, "face_clusters")
        else:
            con.execute("DELETE FROM clusters WHERE cluster_id IN (SELECT unnest(?))", [ids])
            log_changes(con, "clusters", ids)
            log_changes(con, "face_clusters", np.asarray(assignments[0], np.int64).tolist())
        if clusters:
            import pyarrow as pa

            table = pa.table({
                "cluster_id": pa.array([int(c["cluster_id"]) for c in clusters], pa.int64()),
                "size": pa.array([int(c["size"]) for c in clusters], pa.int32()),
                "representative_face_id": pa.array([c.get("representative_face_id") for c in clusters], pa.int64()),
                "cohesion": pa.array([c.get("cohesion") for c in clusters], pa.float32()),
                "separation": pa.array([c.get("separation") for c in clusters], pa.float32()),
                "confidence": pa.array([c.get("confidence") for c in clusters], pa.float32()),
                "label": pa.array([c.get("label", labels.get(int(c["cluster_id"]))) for c in clusters], pa.string()),
                "centroid": pa.array([None if c.get("centroid") is None else np.asarray(c["centroid"], np.float32)
                                      for c in clusters], pa.list_(pa.float32())),
                "run_id": pa.array([c.get("run_id") for c in clusters], pa.int64()),
                "created_at": pa.array([created.get(int(c["cluster_id"]), now) for c in clusters],
                                       pa.timestamp("us", tz="UTC")),
                "updated_at": pa.array([now] * len(clusters), pa.timestamp("us", tz="UTC")),
            })
            con.register("_new_clusters", table)
            con.execute("INSERT INTO clusters SELECT * FROM _new_clusters")
            con.unregister("_new_clusters")
        faces, cids = assignments
        if len(faces):
            import pyarrow as pa

            fc = pa.table({"face_id": pa.array(np.asarray(faces, np.int64)),
                           "cluster_id": pa.array(np.asarray(cids, np.int64)),
                           "source": pa.array([source] * len(faces), pa.string()),
                           "assigned_at": pa.array([now] * len(faces), pa.timestamp("us", tz="UTC"))})
            con.register("_new_fc", fc)
            con.execute("INSERT OR REPLACE INTO face_clusters SELECT * FROM _new_fc")
            con.unregister("_new_fc")

    def record_cluster_run(self, con: duckdb.DuckDBPyConnection, **fields: Any) -> int:
        """Insert a ``cluster_runs`` row inside the caller's transaction; returns its run id."""
        fields = {k: (json.dumps(v) if k == "settings" else v) for k, v in fields.items()}
        fields.setdefault("started_at", utc_now())
        cols = list(fields)
        row = con.execute(f"INSERT INTO cluster_runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
                          "RETURNING run_id", [fields[c] for c in cols]).fetchone()
        log_changes(con, "cluster_runs", [row[0]])
        return int(row[0])

    def forget_faces(self, face_ids: Sequence[int]) -> None:
        """Drop removed faces from their clusters (sizes follow; empty clusters go; centroids wait for the next run)."""
        if not face_ids:
            return
        ids = [int(i) for i in face_ids]
        with self.transaction() as con:
            self._forget(con, ids)

    @staticmethod
    def _forget(con: duckdb.DuckDBPyConnection, ids: list[int]) -> None:
        touched = [r[0] for r in con.execute(
            "DELETE FROM face_clusters WHERE face_id IN (SELECT unnest(?)) RETURNING cluster_id", [ids]).fetchall()]
        log_changes(con, "face_clusters", ids)
        where = "face_a IN (SELECT unnest(?)) OR face_b IN (SELECT unnest(?))"
        log_changes_where(con, "cluster_constraints", "face_a", where, [ids, ids])
        con.execute(f"DELETE FROM cluster_constraints WHERE {where}", [ids, ids])
        if touched:
            con.execute("""UPDATE clusters SET size = (SELECT count(*) FROM face_clusters f
                           WHERE f.cluster_id = clusters.cluster_id) WHERE cluster_id IN (SELECT unnest(?))""", [touched])
            log_changes(con, "clusters", touched)
            con.execute("DELETE FROM clusters WHERE size = 0")


MAX_LABEL = 200
_BLOCK = 65_536  # faces per block of the passes over every face of a full run
#: Bidirectional formatting characters: embeddings, overrides, isolates and marks.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_KEEP = object()

_INFO_COLS = "cluster_id, size, label, representative_face_id, cohesion, separation, confidence, created_at, updated_at"


def same_photo_pairs(face_ids: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """int64 [m, 2]: every pair of faces of one image (they are two different people)."""
    order = np.argsort(image_ids, kind="stable")
    f, im = face_ids[order], image_ids[order]
    start = np.flatnonzero(np.r_[True, im[1:] != im[:-1]])
    ends = np.r_[start[1:], len(im)]
    pairs = [(int(f[i]), int(f[j])) for s, e in zip(start, ends) if e - s > 1
             for i in range(s, e) for j in range(i + 1, e)]
    return np.array(pairs, np.int64).reshape(-1, 2)


def _barred_check(faces: np.ndarray, clusters: np.ndarray, barred: set[tuple[int, int]]
                  ) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """For :func:`~face_assets.clustering.assign_to_clusters`: whether ``(faces[r], clusters[c])``
    pairs are barred, as arrays; None when no pair is."""
    if not barred:
        return None
    barred_faces, barred_clusters = np.array(sorted(barred), np.int64).reshape(-1, 2).T

    def banned(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        return _pairs_in(faces[r], clusters[c], barred_faces, barred_clusters)

    return banned


def _pairs_in(a: np.ndarray, b: np.ndarray, ref_a: np.ndarray, ref_b: np.ndarray) -> np.ndarray:
    """bool [len(a)]: is ``(a[i], b[i])`` one of the pairs ``(ref_a[j], ref_b[j])``? (int arrays)"""
    ua, ub = np.unique(np.concatenate([a, ref_a])), np.unique(np.concatenate([b, ref_b]))

    def key(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return np.searchsorted(ua, p).astype(np.int64) * len(ub) + np.searchsorted(ub, q)

    return np.isin(key(a, b), key(ref_a, ref_b))


def _drop_constraints(con: Any, kind: str, side_a: list[int], side_b: list[int] | None) -> None:
    """Forget ``kind`` constraints between faces of ``side_a`` and ``side_b`` (None: any face).

    A new curation decision replaces the earlier ones it contradicts.
    """
    if side_b is None:
        where = "kind = ? AND (face_a IN (SELECT unnest(?)) OR face_b IN (SELECT unnest(?)))"
        params = [kind, side_a, side_a]
    else:
        where = ("kind = ? AND ((face_a IN (SELECT unnest(?)) AND face_b IN (SELECT unnest(?))) "
                 "OR (face_b IN (SELECT unnest(?)) AND face_a IN (SELECT unnest(?))))")
        params = [kind, side_a, side_b, side_a, side_b]
    log_changes_where(con, "cluster_constraints", "face_a", where, params)
    con.execute(f"DELETE FROM cluster_constraints WHERE {where}", params)


def _link(con: Any, side_a: list[int], side_b: list[int], kind: str, reason: str) -> None:
    """Record a ``kind`` constraint between every face of ``side_a`` and every other face of ``side_b``,
    in one statement; a later decision on a pair replaces the earlier one."""
    if side_a and side_b:
        con.execute("INSERT OR REPLACE INTO cluster_constraints SELECT DISTINCT least(a, b), greatest(a, b), ?, ?, "
                    "now() FROM (SELECT unnest(?) AS a) CROSS JOIN (SELECT unnest(?) AS b) WHERE a <> b",
                    [kind, reason, [int(f) for f in side_a], [int(f) for f in side_b]])
        log_changes(con, "cluster_constraints", set(side_a) | set(side_b))  # each pair's first face is one of them


def _clusters_of(con: Any, faces: list[int]) -> dict[int, int]:
    """Face id -> cluster id of the clustered ``faces``, read in the caller's transaction."""
    return dict(con.execute("SELECT face_id, cluster_id FROM face_clusters WHERE face_id IN (SELECT unnest(?))",
                            [faces]).fetchall())


def normalize_label(label: str | None) -> str | None:
    """A person's name as stored: NFC, runs of white space made one space, blank -> None.

    Raises:
        InvalidNameError: control characters (NUL, line breaks...), bidirectional overrides and
            isolates (which can make "evil" display as "live"), or more than ``MAX_LABEL`` characters.
    """
    if label is None:
        return None
    text = re.sub(" {2,}", " ", unicodedata.normalize("NFC", str(label)).strip(" "))
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") or c in _BIDI_CONTROLS]
    if bad:
        raise InvalidNameError(f"a name cannot hold control or text-direction characters ({ascii(bad[0])})")
    if len(text) > MAX_LABEL:
        raise InvalidNameError(f"a name has at most {MAX_LABEL} characters, not {len(text)}")
    return text or None


class PersonClusters:
    """Person clusters over a catalog's valid faces of one model version."""

    def __init__(self, catalog: Catalog, settings: ClusteringSettings, model_version: str,
                 store: ClusterStore | None = None):
        self.catalog = catalog
        self.store = store or ClusterStore(catalog)
        self.settings = settings
        self.model_version = model_version

    # -- helpers ---------------------------------------------------------------------------------

    def _faces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(face ids, embeddings float16, image ids)`` of every valid face: float16 halves the input
        of a full run (the clustering reads it in float32 piece by piece; docs/clustering.md)."""
        ids, images = self.catalog.face_images(self.model_version)
        fids, x = self.catalog.embeddings(ids, dtype=np.float16)
        if len(fids) != len(ids):  # faces removed between the reads (they are read in short sessions)
            images = images[np.isin(ids, fids)]
        return fids, x, images

    def _constraint_rows(self, ids: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Must-link and cannot-link pairs as rows of ``ids`` (pairs with unknown faces dropped)."""
        must, cannot = self.store.constraints()
        cannot = np.concatenate([cannot, same_photo_pairs(ids, images)])

        def rows(pairs: np.ndarray) -> np.ndarray:
            if len(pairs) == 0 or len(ids) == 0:
                return np.zeros((0, 2), np.int64)
            pos = np.minimum(np.searchsorted(ids, pairs), len(ids) - 1)
            ok = (ids[pos] == pairs).all(axis=1)
            return pos[ok]

        return rows(must), rows(cannot)

    def _next_id(self) -> int:
        row = self.store.query("SELECT greatest((SELECT max(cluster_id) FROM clusters), "
                                 "(SELECT max(cluster_id) FROM face_clusters))")
        return int(row[0][0] or 0) + 1

    def _cluster_rows(self, x: np.ndarray, ids: np.ndarray, labels: np.ndarray, run_id: int | None,
                      quality: dict | None) -> list[dict[str, Any]]:
        """Rows of ``clusters`` for a labelling of faces ``ids`` (embeddings ``x``)."""
        c_ids, means, sizes = cluster_means(x, labels)
        row = np.searchsorted(c_ids, labels)
        score = np.empty(len(x), np.float32)
        for s in range(0, len(x), _BLOCK):  # a block at a time: every face's mean at once is 4 GB at 2M faces
            score[s : s + _BLOCK] = np.einsum("ij,ij->i", np.asarray(x[s : s + _BLOCK], np.float32),
                                              means[row[s : s + _BLOCK]])
        order = np.lexsort((-score, row))
        first = np.r_[True, row[order][1:] != row[order][:-1]]
        rep = np.empty(len(c_ids), np.int64)
        rep[row[order][first]] = ids[order][first]
        per = (quality or {}).get("clusters", {})
        out = []
        for i, cid in enumerate(c_ids.tolist()):
            q = per.get(cid)
            coh = sep = conf = None
            if q is not None:
                coh, sep = q["cohesion"], q["separation"]
                conf = coh - (1.0 - sep)
            out.append({"cluster_id": cid, "size": int(sizes[i]), "representative_face_id": int(rep[i]),
                        "cohesion": coh, "separation": sep, "confidence": conf, "centroid": means[i],
                        "run_id": run_id})
        return out

    def _info(self, row: tuple) -> ClusterInfo:
        return ClusterInfo(*row)

    def _rewrite(self, con: Any, cluster_ids: list[int], source: str) -> None:
        """Recompute the rows of ``cluster_ids`` from their current faces (delete the empty ones)."""
        rows = con.execute("SELECT face_id, cluster_id FROM face_clusters WHERE cluster_id IN (SELECT unnest(?)) "
                           "ORDER BY face_id", [cluster_ids]).fetchall()
        # Every face that changed cluster is in one of ``cluster_ids`` now: their rows are republished.
        log_changes(con, "clusters", cluster_ids)
        log_changes(con, "face_clusters", [r[0] for r in rows])
        # The emptied ones, from the rows just read (a NOT IN over every face's cluster read them all).
        empty = sorted(set(int(c) for c in cluster_ids) - {int(r[1]) for r in rows})
        if empty:
            con.execute("DELETE FROM clusters WHERE cluster_id IN (SELECT unnest(?))", [empty])
        if not rows:
            return
        fids = np.array([r[0] for r in rows], np.int64)
        labels = np.array([r[1] for r in rows], np.int64)
        ids, x = self.catalog.embeddings(fids.tolist())
        labels = labels[np.searchsorted(fids, ids)]
        rows = self._cluster_rows(x, ids, labels, None, cluster_quality(x, labels, sample=1))
        for r in rows:  # separation needs every other cluster: left to the next full run
            r["separation"] = r["confidence"] = None
        self.store.write_clusters(con, rows, (np.zeros(0, np.int64), np.zeros(0, np.int64)), source,
                                    replace_all=False)

    # -- runs ------------------------------------------------------------------------------------

    def run(self, log: Callable[[str], None] | None = None) -> ClusterRun:
        """Full clustering of every valid face; ids stay stable by maximum overlap with the last run.

        ``log``: progress messages (the graph, the merging rounds, the write), e.g. a run's logger.
        """
        log = log or (lambda _msg: None)
        t0 = time.perf_counter()
        started = datetime.now(timezone.utc)
        ids, x, images = self._faces()
        log(f"full clustering: {len(ids)} faces read in {time.perf_counter() - t0:.0f}s")
        old_f, old_c = self.store.face_cluster_map()
        new_faces = int((~np.isin(ids, old_f)).sum())
        if len(ids) == 0:
            labels = np.zeros(0, np.int64)
        else:
            must, cannot = self._constraint_rows(ids, images)
            res = cluster_embeddings(x, must_link=must, cannot_link=cannot, log=log, **self.settings.method_kwargs())
            labels = res.labels
        stable, _ = match_ids(old_f, old_c, ids, labels, self._next_id())
        # The faces of the last run (``old_f`` is by id), compared as arrays: a dict of every face cost
        # hundreds of MB at 2M faces.
        pos = np.minimum(np.searchsorted(old_f, ids), max(len(old_f) - 1, 0))
        both = old_f[pos] == ids if len(old_f) else np.zeros(len(ids), bool)
        id_changed = float(np.mean(old_c[pos[both]] != stable[both])) if both.any() else None
        quality = cluster_quality(x, stable, sample=self.settings.quality_sample) if len(ids) else {}
        n_clusters = int(len(np.unique(stable)))
        singletons = int((np.unique(stable, return_counts=True)[1] == 1).sum()) if len(ids) else 0
        seconds = time.perf_counter() - t0
        log(f"full clustering: {n_clusters} clusters in {seconds:.0f}s; writing them")
        with self.store.transaction() as con:
            run_id = self.store.record_cluster_run(
                con, kind="full", started_at=started, seconds=seconds, faces=len(ids), clusters=n_clusters,
                singletons=singletons, new_faces=new_faces, unassigned=0, id_changed=id_changed,
                cohesion=quality.get("cohesion"), separation=quality.get("separation"),
                silhouette=quality.get("silhouette"), model_version=self.model_version,
                settings=self.settings.model_dump())
            self.store.write_clusters(con, self._cluster_rows(x, ids, stable, run_id, quality), (ids, stable),
                                        "cluster", replace_all=True)
        self.keep_means(x.shape[1])
        return ClusterRun(run_id, "full", len(ids), n_clusters, singletons, new_faces, 0, id_changed, seconds,
                          {k: quality.get(k) for k in ("cohesion", "separation", "silhouette")})

    def assign_new(self) -> ClusterRun:
        """Put faces without a cluster into the nearest cluster when close enough, else new clusters.

        A face joins the cluster of best average cosine if it reaches ``merge_threshold(1, size)``
        (never a cluster holding a face of the same photo or a cannot-linked face); the remaining
        new faces are clustered among themselves into new clusters.
        """
        t0 = time.perf_counter()
        started = datetime.now(timezone.utc)
        # What the new faces need, read by the store: a cost that follows the batch, and the centroids.
        wanted, images = self.store.unclustered_faces(self.model_version)
        if len(wanted) == 0:
            return self._record_incremental(started, t0, 0, 0)
        new, x = self.catalog.embeddings(wanted.tolist())
        new_images = images[np.isin(wanted, new)]  # faces removed between the reads are left out
        means = self._kept_means(x.shape[1])
        c_ids = means.ids
        is_banned = _barred_check(new, c_ids, self.store.barred(new.tolist()))
        cfg = self.settings
        best, score = assign_to_clusters(x, None, means.sizes, **cfg.link_kwargs(), banned=is_banned,
                                         index=means.means, group_index=means.groups,
                                         group_rows=np.arange(len(c_ids)))
        assigned = np.where(best >= 0, c_ids[np.maximum(best, 0)], -1)
        # Two new faces of one photo must not both join the same cluster: the closer one joins, the
        # others start their own.
        joined = np.flatnonzero(assigned >= 0)
        joined = joined[np.argsort(-score[joined], kind="stable")]
        photo = np.unique(new_images[joined], return_inverse=True)[1].astype(np.int64)
        person = np.unique(assigned[joined], return_inverse=True)[1].astype(np.int64)
        first = np.unique(photo * (int(person.max(initial=0)) + 1) + person, return_index=True)[1]
        second = np.ones(len(joined), bool)
        second[first] = False
        assigned[joined[second]] = -1
        rest = np.flatnonzero(assigned < 0)
        next_id = self._next_id()
        if len(rest):
            sub_ids = new[rest]
            must, cannot = self._constraint_rows(sub_ids, new_images[rest])
            res = cluster_embeddings(x[rest], must_link=must, cannot_link=cannot, **cfg.method_kwargs())
            fresh, _ = match_ids(np.zeros(0), np.zeros(0), sub_ids, res.labels, next_id)
            assigned[rest] = fresh
        touched = sorted(set(assigned.tolist()))
        with self.store.transaction() as con:
            self.store.write_clusters(con, [], (new, assigned), "assign", replace_all=False)
            self._rewrite(con, touched, "assign")
            run = self._record_incremental(started, t0, len(new), len(rest), con)
        return run

    def keep_means(self, dim: int) -> None:
        """Bring the kept cluster means up to date now, not in the first assignment after (about a
        minute at a million persons, which would hold up the index run of the next batch): after a
        full run, or after clusters were written otherwise (imported). Nothing is kept below
        :data:`~face_assets.cluster_means.MIN_ROWS` clusters."""
        if self.store.query("SELECT count(*) FROM clusters")[0][0] >= MIN_ROWS:
            self._kept_means(dim)

    def _kept_means(self, dim: int) -> ClusterMeans:
        """The cluster means as kept between runs, patched by the clusters that changed since: a cost
        that follows the changes, not the number of persons (docs/clustering.md)."""
        return ClusterMeans.current(self.store.means_folder(), self.store.cluster_stamps(),
                                    lambda ids: self.store.centroids(dim, ids), self.model_version, dim)

    def _record_incremental(self, started: datetime, t0: float, new: int, unassigned: int,
                            con: Any = None) -> ClusterRun:
        counts = self.store.query("SELECT count(*), count(*) FILTER (WHERE size = 1), coalesce(sum(size), 0) "
                                    "FROM clusters") if con is None else \
            con.execute("SELECT count(*), count(*) FILTER (WHERE size = 1), coalesce(sum(size), 0) "
                        "FROM clusters").fetchall()
        clusters, singletons, faces = (int(v) for v in counts[0])
        seconds = time.perf_counter() - t0
        fields = dict(kind="incremental", started_at=started, seconds=seconds, faces=faces, clusters=clusters,
                      singletons=singletons, new_faces=new, unassigned=unassigned,
                      model_version=self.model_version, settings=self.settings.model_dump())
        if con is None:
            with self.store.transaction() as c:
                run_id = self.store.record_cluster_run(c, **fields)
        else:
            run_id = self.store.record_cluster_run(con, **fields)
        return ClusterRun(run_id, "incremental", faces, clusters, singletons, new, unassigned, None, seconds)

    def decision(self) -> ReclusterDecision:
        """The drift policy (:func:`~face_assets.clustering.recluster_decision`) on this catalog's history."""
        last = self.store.query("SELECT run_id, faces, started_at, model_version FROM cluster_runs "
                                  "WHERE kind = 'full' ORDER BY run_id DESC LIMIT 1")
        faces_now = self.catalog.valid_face_count(self.model_version)
        cfg = self.settings
        if not last:
            return recluster_decision(faces_now=faces_now, faces_at_last_run=0, unassigned_since=0, days_since=None,
                                      max_growth=cfg.recluster_growth, max_unassigned=cfg.recluster_unassigned,
                                      max_age_days=cfg.recluster_max_age_days)
        run_id, faces, started, model = last[0]
        unassigned = self.store.query("SELECT coalesce(sum(unassigned), 0) FROM cluster_runs "
                                        "WHERE kind = 'incremental' AND run_id > ?", [run_id])[0][0]
        days = (datetime.now(timezone.utc) - started).total_seconds() / 86400
        return recluster_decision(faces_now=faces_now, faces_at_last_run=int(faces), unassigned_since=int(unassigned),
                                  days_since=days, model_changed=model != self.model_version,
                                  max_growth=cfg.recluster_growth, max_unassigned=cfg.recluster_unassigned,
                                  max_age_days=cfg.recluster_max_age_days)

    # -- reading persons -------------------------------------------------------------------------

    def get(self, cluster_id: int, with_faces: bool = True, limit: int | None = None, offset: int = 0) -> ClusterInfo:
        """One cluster, with its face ids by id (``limit`` of them from ``offset`` when given)."""
        with self.catalog.db.read():  # one session for both reads (the calls below join it)
            rows = self.store.query(f"SELECT {_INFO_COLS} FROM clusters WHERE cluster_id = ?", [int(cluster_id)])
            if not rows:
                raise ClusterNotFoundError(cluster_id)
            info = self._info(rows[0])
            if with_faces:
                info.face_ids = self.store.members(cluster_id, limit, offset)
        return info

    def list(self, min_size: int = 1, limit: int | None = None, offset: int = 0) -> list[ClusterInfo]:
        """Clusters of at least ``min_size`` faces, largest first."""
        return [self._info(r) for r in self.store.find(min_size=min_size, limit=limit, offset=offset)[1]]

    def find(self, text: str = "", limit: int = 48, offset: int = 0) -> tuple[int, list[ClusterInfo]]:
        """``(how many match, one page of them)``: persons whose name contains ``text`` (any case), or
        whose id it is (``12`` or ``#12``), largest first; every person when ``text`` is blank."""
        total, rows = self.store.find(text=text, limit=limit, offset=offset)
        return total, [self._info(r) for r in rows]

    # -- curation: one write session per action (the change, its audit entry, the persons returned) --

    def rename(self, cluster_id: int, label: str | None, actor: str = ACTOR) -> ClusterInfo:
        """Name (label) a person; ``None`` or blank clears it. Labels follow the id through re-clustering.

        Raises:
            InvalidNameError: control or bidirectional-override characters, or over ``MAX_LABEL`` characters.
        """
        label = normalize_label(label)
        cid = int(cluster_id)
        entry = None
        with self.store.transaction() as con:
            old = self.get(cid, with_faces=False).label
            if old != label:
                con.execute("UPDATE clusters SET label = ?, updated_at = now() WHERE cluster_id = ?", [label, cid])
                entry = self.store.audit.append(
                    actor, "rename", [cid], cluster_id=cid, old=old, new=label,
                    changes={"moves": [], "labels": [{"cluster_id": cid, "old": old, "new": label}]})
            return self._changed(self.get(cid, with_faces=False), entry)

    def merge(self, cluster_ids: list[int], actor: str = ACTOR) -> ClusterInfo:
        """Merge clusters into the largest one (its id is kept); the decision survives re-clustering.

        The kept person keeps its name, or takes the first name among the others when it has none.
        """
        ids = sorted(set(int(c) for c in cluster_ids))
        if len(ids) < 2:
            raise CurationError("merge needs at least two different cluster ids")
        with self.store.transaction() as con:
            infos = [self.get(c) for c in ids]
            keep = max(infos, key=lambda i: (i.size, -i.cluster_id))
            anchor = keep.representative_face_id or keep.face_ids[0]
            faces = [f for i in infos for f in i.face_ids]
            _drop_constraints(con, "cannot_link", faces, faces)
            _link(con, [anchor], faces, "must_link", "merge")
            con.execute("UPDATE face_clusters SET cluster_id = ?, source = 'user' WHERE cluster_id IN "
                        "(SELECT unnest(?))", [keep.cluster_id, ids])
            self._rewrite(con, ids, "user")
            label = next((i.label for i in [keep, *infos] if i.label), None)
            labels = []
            if label != keep.label:
                con.execute("UPDATE clusters SET label = ? WHERE cluster_id = ?", [label, keep.cluster_id])
                labels = [{"cluster_id": keep.cluster_id, "old": keep.label, "new": label}]
            moves = [{"faces": i.face_ids, "from": i.cluster_id, "to": keep.cluster_id, "from_label": i.label}
                     for i in infos if i is not keep]
            entry = self.store.audit.append(actor, "merge", ids, kept=keep.cluster_id,
                                    sizes={str(i.cluster_id): i.size for i in infos},
                                    changes={"moves": moves, "labels": labels})
            return self._changed(self.get(keep.cluster_id), entry)

    def split(self, cluster_id: int, face_ids: list[int] | None = None, k: int | None = None,
              actor: str = ACTOR) -> list[ClusterInfo]:
        """Split a cluster: ``face_ids`` become a new person, or (none given) k-means into ``k`` parts.

        Returns the parts, the one keeping the id first. With ``face_ids`` the remaining faces keep
        the id and the name, and the chosen ones get a new id and no name; with k-means the largest
        part keeps them. Each part's faces must-link its first face; the parts' first faces
        cannot-link each other, so re-clustering keeps the parts apart.
        """
        cid = int(cluster_id)
        with self.store.transaction() as con:
            info = self.get(cid)
            members = info.face_ids
            if face_ids:
                chosen = sorted(set(int(f) for f in face_ids))
                outside = set(chosen) - set(members)
                if outside:
                    raise CurationError(f"faces {sorted(outside)[:5]} are not in cluster {cid}")
                if len(chosen) == len(members):
                    raise CurationError("split needs faces on both sides")
                parts = [sorted(set(members) - set(chosen)), chosen]
            else:
                k = k or self.settings.split_k
                if len(members) < k:
                    raise CurationError(f"cluster {cid} has {len(members)} faces, cannot split into {k}")
                ids, x = self.catalog.embeddings(members)
                lab = split_kmeans(x, k)
                parts = sorted((ids[lab == j].tolist() for j in range(k) if (lab == j).any()),
                               key=lambda p: (-len(p), p[0]))
            next_id = self._next_id()
            new_ids = [cid] + list(range(next_id, next_id + len(parts) - 1))
            anchors = [p[0] for p in parts]
            _drop_constraints(con, "must_link", members, members)
            for part in parts:
                _link(con, part[:1], part[1:], "must_link", "split")
            _link(con, anchors, anchors, "cannot_link", "split")
            for new, part in zip(new_ids[1:], parts[1:]):
                con.execute("UPDATE face_clusters SET cluster_id = ?, source = 'user' WHERE face_id IN "
                            "(SELECT unnest(?))", [new, part])
            self._rewrite(con, new_ids, "user")
            entry = self.store.audit.append(actor, "split", new_ids, cluster_id=cid, parts=new_ids[1:],
                                    sizes={str(c): len(p) for c, p in zip(new_ids, parts)},
                                    changes={"moves": [{"faces": p, "from": cid, "to": c, "from_label": info.label}
                                                       for c, p in zip(new_ids[1:], parts[1:])], "labels": []})
            return [self._changed(self.get(c), entry) for c in new_ids]

    def move_faces(self, face_ids: Sequence[int], cluster_id: int, from_cluster: int | None = None,
                   actor: str = ACTOR) -> ClusterInfo:
        """Move faces to another cluster, in one write; they stay there through re-clustering.

        ``from_cluster``: the person the faces were chosen on; the move is refused unless they are
        all still its faces. Each moved face must-links every face of the target (a must-link to one
        face alone could take that face away from its cluster) and cannot-links the representative
        of the cluster it leaves. Faces already in the target are left as they are.
        """
        faces = sorted(set(int(f) for f in face_ids))
        if not faces:
            raise CurationError("no faces to move")
        to = int(cluster_id)
        with self.store.transaction() as con:
            if from_cluster is not None:
                outside = set(faces) - set(self.get(from_cluster).face_ids)
                if outside:
                    raise CurationError(f"{len(outside)} of the faces are not in person {from_cluster}")
            self.get(to, with_faces=False)
            moves, entry = self._move(con, faces, to), None
            if moves:
                entry = self.store.audit.append(actor, "move", [to, *(m["from"] for m in moves if m["from"] is not None)],
                                        cluster_id=from_cluster, to=to, face_ids=[f for m in moves for f in m["faces"]],
                                        changes={"moves": moves, "labels": []})
            return self._changed(self.get(to), entry)

    def undo(self, entry_id: int, actor: str = ACTOR) -> dict[str, Any]:
        """Undo a recorded change (see :mod:`face_assets.audit`); returns the undo's own entry (undoable too).

        Faces go back to where the change took them from (a person it emptied comes back under its
        id and name) and names back to what they were, as far as later changes left them: a face
        moved on since, or a name changed again since, is left alone.

        Raises:
            CurationError: no such change, already undone, recorded without undo information, or
                nothing of it is left to undo.
        """
        with self.store.transaction() as con:
            entry = self.store.audit.get(entry_id)
            if entry is None:
                raise CurationError(f"no change {entry_id} in the audit log")
            if entry["undone_by"] is not None:
                raise CurationError(f"change {entry_id} was already undone (change {entry['undone_by']})")
            changes = entry.get("changes")
            if changes is None:
                raise CurationError(f"change {entry_id} was recorded without what undoing it needs")
            moves = []
            for m in reversed(changes["moves"]):
                if m["from"] is None:
                    continue  # the faces had no person before: there is none to give them back to
                where = _clusters_of(con, m["faces"])
                still = [f for f in m["faces"] if where.get(f) == m["to"]]
                if still:
                    moves += self._move(con, still, int(m["from"]), create_label=m.get("from_label"))
            labels = []
            for change in changes["labels"]:
                now = con.execute("SELECT label FROM clusters WHERE cluster_id = ?", [change["cluster_id"]]).fetchall()
                if now and now[0][0] == change["new"]:
                    con.execute("UPDATE clusters SET label = ?, updated_at = now() WHERE cluster_id = ?",
                                [change["old"], change["cluster_id"]])
                    labels.append({"cluster_id": change["cluster_id"], "old": change["new"], "new": change["old"]})
            if not moves and not labels:
                raise CurationError(f"nothing of change {entry_id} is left to undo: later changes replaced it")
            touched = [*(m["to"] for m in moves), *(m["from"] for m in moves if m["from"] is not None),
                       *(c["cluster_id"] for c in labels)]
            return self.store.audit.append(actor, "undo", touched, undoes=int(entry_id), of=entry["action"],
                                           changes={"moves": moves, "labels": labels})

    @staticmethod
    def _changed(info: ClusterInfo, entry: dict[str, Any] | None) -> ClusterInfo:
        info.change_id = entry["id"] if entry is not None else None
        return info

    def _move(self, con: Any, faces: list[int], to: int, create_label: Any = _KEEP) -> list[dict[str, Any]]:
        """Move ``faces`` to cluster ``to`` inside the caller's transaction; returns the moves made, by source.

        ``create_label``: when given, ``to`` may be gone (an undo gives back a person a change
        emptied): it comes back under its id with this name.
        """
        where = _clusters_of(con, faces)
        unknown = [f for f in faces if f not in where]
        if unknown:
            known = {r[0] for r in con.execute("SELECT face_id FROM faces WHERE face_id IN (SELECT unnest(?))",
                                               [unknown]).fetchall()}
            if set(unknown) - known:
                raise CurationError(f"no faces {sorted(set(unknown) - known)[:5]}")
        moving = [f for f in faces if where.get(f) != to]
        if not moving:
            return []
        exists = con.execute("SELECT 1 FROM clusters WHERE cluster_id = ?", [to]).fetchall()
        if not exists and create_label is _KEEP:
            raise ClusterNotFoundError(to)
        target = [r[0] for r in con.execute("SELECT face_id FROM face_clusters WHERE cluster_id = ?", [to]).fetchall()]
        _drop_constraints(con, "must_link", moving, None)
        _drop_constraints(con, "cannot_link", moving, target + moving)
        _link(con, moving, target or moving[:1], "must_link", "move")
        sources: dict[int | None, list[int]] = {}
        for f in moving:
            sources.setdefault(where.get(f), []).append(f)
        labels = dict(con.execute("SELECT cluster_id, label FROM clusters WHERE cluster_id IN (SELECT unnest(?))",
                                  [[s for s in sources if s is not None]]).fetchall())
        for source, fs in sources.items():
            if source is None:
                continue
            rep = con.execute("SELECT representative_face_id FROM clusters WHERE cluster_id = ?", [source]).fetchone()
            rest = con.execute("SELECT min(face_id) FROM face_clusters WHERE cluster_id = ? AND face_id NOT IN "
                               "(SELECT unnest(?))", [source, fs]).fetchone()[0]
            other = rep[0] if rep and rep[0] is not None and rep[0] not in fs else rest
            if other is not None:
                _link(con, fs, [other], "cannot_link", "move")
        con.execute("INSERT OR REPLACE INTO face_clusters SELECT unnest(?), ?, 'user', now()", [moving, to])
        self._rewrite(con, [to, *(s for s in sources if s is not None)], "user")
        if not exists and create_label is not None:
            con.execute("UPDATE clusters SET label = ? WHERE cluster_id = ?", [create_label, to])
        return [{"faces": fs, "from": s, "to": to, "from_label": labels.get(s)} for s, fs in sources.items()]
