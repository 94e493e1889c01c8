"""The DuckDB catalog: the images and faces tables and their SQL.

Tables (query them with DuckDB SQL, see ``docs/filter.md``):

``images``  one row per distinct image content: ``image_id`` (given by the user, or else the
            ``content_hash``, the sha256 of the file bytes), path, size, ``status`` (``valid`` / ``rejected`` / ``unreadable``), ``rejection_reason``,
            ``error``, number of faces, model version, time processed.
``faces``   one row per detected face: ``face_id`` (int64, also the ANN index id), ``image_id``,
            box, ``det_score``, ``embedding_norm``, size, area ratio, cartoon probability,
            ``quality``, own verdict, ``model_version`` and the normalized ``embedding``.

The model registry (:mod:`face_assets.registry`), the person clusters (:mod:`face_assets.persons`) and
the curation audit log (:mod:`face_assets.audit`) keep their own tables in the same file, each module
with its own SQL. The file itself is opened by :mod:`face_assets.storage` (short sessions on the
master ``<data_dir>/store/catalog.duckdb``, published read-only as ``<data_dir>/face_assets.duckdb``).

Each image is written in one transaction, so a crash never leaves half an image behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import StorageSettings
from .errors import FaceImportError, MigrationRequiredError
from .schemas import FilterResult, ImageAnalysis
from .storage import (ColumnUpgrade, DuckDBFile, Table, log_all, log_appends, log_changes, log_changes_where,
                      utc_now)

TABLES = [Table("images", "image_seq", order="image_id"), Table("faces", "face_id")]
"""The catalog's published tables: an image row gets a new ``image_seq`` each time it is written."""

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS face_id_seq START 1;
CREATE SEQUENCE IF NOT EXISTS image_seq START 1;
CREATE TABLE IF NOT EXISTS images (
    image_id VARCHAR PRIMARY KEY,
    content_hash VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    width INTEGER,
    height INTEGER,
    status VARCHAR NOT NULL,
    rejection_reason VARCHAR,
    error VARCHAR,
    num_faces INTEGER NOT NULL DEFAULT 0,
    padded BOOLEAN,
    model_version VARCHAR,
    metadata JSON,
    processed_at TIMESTAMPTZ NOT NULL,
    image_seq BIGINT DEFAULT nextval('image_seq')
);
CREATE TABLE IF NOT EXISTS faces (
    face_id BIGINT PRIMARY KEY DEFAULT nextval('face_id_seq'),
    image_id VARCHAR NOT NULL,
    face_index INTEGER NOT NULL,
    x1 REAL, y1 REAL, x2 REAL, y2 REAL,
    det_score REAL NOT NULL,
    embedding_norm REAL NOT NULL,
    face_width INTEGER NOT NULL,
    face_height INTEGER NOT NULL,
    face_area_ratio REAL NOT NULL,
    cartoon_probability REAL NOT NULL,
    quality REAL NOT NULL,
    is_valid BOOLEAN NOT NULL,
    rejection_reason VARCHAR,
    model_version VARCHAR NOT NULL,
    embedding FLOAT[] NOT NULL
);
CREATE INDEX IF NOT EXISTS faces_image_idx ON faces (image_id);
CREATE INDEX IF NOT EXISTS images_hash_idx ON images (content_hash);
"""

UPGRADES = (
    ColumnUpgrade("images", "image_seq", ("CREATE SEQUENCE IF NOT EXISTS image_seq START 1",
                                          "ALTER TABLE images ADD COLUMN image_seq BIGINT DEFAULT nextval('image_seq')")),
)
"""Columns the catalog's tables gained since the first release (``face-assets migrate`` adds them)."""

class Catalog:
    """The DuckDB catalog of images and faces, in short sessions (see :mod:`face_assets.storage`).

    Args:
        path: the file sessions open: the master of a data folder (see :meth:`open`), or a private
            file such as a run's staging catalog.
        read_only: open ``path`` read-only in each read session and refuse writes (for the
            published file, which writers replace but never change in place).
        published: where committed states are published for readers (None: never).
        lock_timeout / publish_interval / retention / max_deltas: see :class:`face_assets.storage.DuckDBFile`.

    Thread-safe; no DuckDB connection stays open between calls, so other processes share the file.
    """

    def __init__(self, path: str | Path, read_only: bool = False, *, published: str | Path | None = None,
                 lock_timeout: float = 120.0, publish_interval: float = 1.0, retention: float = 3600.0,
                 max_deltas: int = 16):
        self.path = Path(path)
        self.read_only = read_only
        self.db = DuckDBFile(self.path, published, schema=SCHEMA, lock_timeout=lock_timeout,
                             publish_interval=publish_interval, read_only=read_only,
                             retention=retention, max_deltas=max_deltas, upgrades=UPGRADES)
        if not read_only:
            self.db.declare(TABLES)

    @classmethod
    def open(cls, storage: StorageSettings, read_only: bool = False) -> "Catalog":
        """The catalog of a data folder: its master (published to ``storage.duckdb_path``), or with
        ``read_only`` the published file itself, which readers share with no lock.

        Raises:
            MigrationRequiredError: the folder holds a catalog of an older release (one file, from before
                the master existed, or tables without a column they have now): see :meth:`migrate`.
        """
        if read_only:
            return cls(storage.duckdb_path, read_only=True)
        master = storage.master_path
        if not master.is_file() and storage.duckdb_path.is_file():
            raise MigrationRequiredError(storage.duckdb_path, [f"a catalog in one file, from before {master.name}"])
        return cls(master, published=storage.duckdb_path, lock_timeout=storage.lock_timeout_seconds,
                   publish_interval=storage.publish_interval_seconds,
                   retention=storage.segment_retention_seconds, max_deltas=storage.max_delta_segments)

    @staticmethod
    def migrate(storage: StorageSettings) -> list[str]:
        """Upgrade the catalog of a data folder written by an older release, in place (``face-assets migrate``).

        A catalog in one file (``storage.duckdb_path``, from before the master existed) is copied to the master
        (a whole copy, then a rename: a crash leaves the old file as it was); then the columns of
        :data:`UPGRADES` and of the publication that the master lacks are added, in one transaction. The next
        normal open publishes the tables whole. Returns what was done; nothing when the catalog is current.
        """
        done = []
        master = storage.master_path
        if not master.is_file() and storage.duckdb_path.is_file():
            master.parent.mkdir(parents=True, exist_ok=True)
            partial = master.with_name(master.name + ".partial")
            shutil.copyfile(storage.duckdb_path, partial)
            partial.replace(master)
            done.append(f"{storage.duckdb_path.name}: copied to {master} (the catalog's master)")
        if not master.is_file():
            return done  # no catalog yet: the first open creates a current one
        return done + DuckDBFile(master, lock_timeout=storage.lock_timeout_seconds, upgrades=UPGRADES).migrate()

    def close(self) -> None:
        """Publish what is pending (nothing stays open between calls)."""
        self.db.close()

    def remove_files(self) -> None:
        """Delete the catalog's files after :meth:`close` (a scratch catalog, such as a batch's staging one)."""
        self.db.remove_files()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for reading (a read session)."""
        with self.db.read() as con:
            yield con

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """All statements inside commit together or not at all (one write session)."""
        with self.db.write() as con:
            yield con

    def known_hashes(self, hashes: Sequence[str], model_version: str) -> dict[str, tuple[str, bool]]:
        """Content hashes already in the catalog -> (image id, done), ``done`` when nothing is left to do.

        An image is done when it is unreadable or was processed by ``model_version``; one embedded by
        another model version is processed again under the same image id (re-embedding).
        """
        if not hashes:
            return {}
        with self._read() as con:
            rows = con.execute(
                """SELECT content_hash, image_id, status = 'unreadable' OR model_version = ?
                   FROM images WHERE content_hash IN (SELECT unnest(?))""",
                [model_version, list(hashes)],
            ).fetchall()
        return {digest: (image_id, bool(done)) for digest, image_id, done in rows}

    def record_unreadable(self, image_id: str, content_hash: str, path: str, error: str) -> None:
        """Record a file that could not be decoded, so the next run does not retry it."""
        with self.transaction() as con:
            seq = _new_image_version(con, image_id)
            con.execute(
                """INSERT OR REPLACE INTO images (image_id, content_hash, path, status, error, processed_at, image_seq)
                   VALUES (?, ?, ?, 'unreadable', ?, ?, ?)""",
                [image_id, content_hash, path, error, utc_now(), seq],
            )

    def record_image(
        self,
        image_id: str,
        content_hash: str,
        path: str,
        analysis: ImageAnalysis,
        result: FilterResult,
        model_version: str,
        metadata: dict[str, Any] | None = None,
    ) -> list[int]:
        """Store an image, its verdict and all its faces in one transaction; returns the face ids."""
        status = "valid" if result["is_valid"] else "rejected"
        with self.transaction() as con:
            _delete_faces(con, "image_id = ?", [image_id])
            seq = _new_image_version(con, image_id)
            con.execute(
                """INSERT OR REPLACE INTO images (image_id, content_hash, path, width, height, status,
                   rejection_reason, num_faces, padded, model_version, metadata, processed_at, image_seq)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [image_id, content_hash, path, analysis.width, analysis.height, status,
                 None if result["is_valid"] else result["rejection_reason"], len(analysis.faces),
                 analysis.padded, model_version, json.dumps(metadata) if metadata else None, utc_now(), seq],
            )
            face_ids = []
            for i, (face, verdict) in enumerate(zip(analysis.faces, result["faces"])):
                s = verdict["scores"]
                row = con.execute(
                    """INSERT INTO faces (image_id, face_index, x1, y1, x2, y2, det_score, embedding_norm,
                       face_width, face_height, face_area_ratio, cartoon_probability, quality, is_valid,
                       rejection_reason, model_version, embedding)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING face_id""",
                    [image_id, i, *verdict["bbox"], s["det_score"], s["embedding_norm"], *s["face_size"],
                     s["face_area_ratio"], s["cartoon_probability"], s["quality"], verdict["is_valid"],
                     verdict["rejection_reason"], model_version,
                     np.asarray(face.normed_embedding, np.float32).tolist()],
                ).fetchone()
                face_ids.append(int(row[0]))
            if face_ids:
                log_appends(con, "faces", min(face_ids), max(face_ids))
        return face_ids

    def checkpoint(self) -> None:
        """Publish the committed state now (every write session already checkpoints the master)."""
        self.db.publish()

    def valid_face_ids(self, model_version: str) -> np.ndarray:
        """Ids of the searchable faces (valid, embedded by ``model_version``), sorted, as int64.

        An array, not a list: at two million faces a list of Python ints costs seconds and 70 MB.
        """
        with self._read() as con:
            ids = con.execute(
                "SELECT face_id FROM faces WHERE is_valid AND model_version = ? ORDER BY face_id", [model_version]
            ).fetchnumpy()["face_id"]
        return np.asarray(ids, np.int64)

    def valid_face_count(self, model_version: str) -> int:
        """How many faces are searchable (valid, embedded by ``model_version``)."""
        with self._read() as con:
            return con.execute("SELECT count(*) FROM faces WHERE is_valid AND model_version = ?",
                               [model_version]).fetchone()[0]

    def embeddings(self, face_ids: Sequence[int], batch: int = 25_000,
                   dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 [n], embeddings [n, d])`` of the given faces that exist, by id.

        Read ``batch`` faces per read session: a writer (a curation action, a batch's merge) waits
        for one batch, not for the whole read (at two million faces, most of a minute). A face
        removed meanwhile is left out of what is returned. The rows are written into one array of
        ``dtype`` as they come (no second copy of them all): float16 halves what a full
        clustering holds (2 GB instead of 4 at two million faces; unit vectors lose nothing to its
        range, and ~1e-4 of cosine to its precision).
        """
        face_ids = np.unique(np.asarray(face_ids, np.int64))
        ids = np.empty(len(face_ids), np.int64)
        out: np.ndarray | None = None
        filled = 0
        for start in range(0, len(face_ids), batch):
            chunk = face_ids[start : start + batch]
            with self._read() as con:
                # The range bounds let the scan skip the row groups outside the chunk's ids.
                table = con.sql(
                    "SELECT face_id, embedding FROM faces WHERE face_id BETWEEN ? AND ? "
                    "AND face_id IN (SELECT unnest(?)) ORDER BY face_id",
                    params=[int(chunk[0]), int(chunk[-1]), chunk.tolist()],
                ).to_arrow_table()
            rows = table.num_rows
            if rows == 0:
                continue
            flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if out is None:
                out = np.empty((len(face_ids), len(flat) // rows), dtype)
            out[filled : filled + rows] = flat.reshape(rows, -1)
            ids[filled : filled + rows] = table.column("face_id").to_numpy()
            filled += rows
        if out is None:
            return np.zeros(0, np.int64), np.zeros((0, 0), dtype)
        return ids[:filled], out[:filled]

    def faces_by_id(self, face_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Face id -> image id, path, box and image metadata, for search results.

        Read from the published catalog when it has the faces (a search never waits for a writer),
        else from the master.
        """
        faces = self.db.read_ids("SELECT face_id, image_id, x1, y1, x2, y2 FROM faces WHERE face_id IN ({keys})",
                                 [int(i) for i in face_ids])
        images = self._images_by_id({r[1] for r in faces}, "path, metadata")
        return {r[0]: {"image_id": r[1], "path": images[r[1]][0], "bbox": list(r[2:6]),
                       "metadata": json.loads(images[r[1]][1]) if images[r[1]][1] else None}
                for r in faces if r[1] in images}

    def _images_by_id(self, image_ids: set[str], columns: str) -> dict[str, tuple]:
        """Image id -> ``columns`` of these images. Looked up apart from their faces: a join would
        read the image ids of the whole published table, a list of ids reads the row groups that
        can hold them."""
        rows = self.db.read_ids(f"SELECT image_id, {columns} FROM images WHERE image_id IN ({{keys}})",
                                sorted(image_ids))
        return {r[0]: r[1:] for r in rows}

    def face_records(self, face_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Faces with their image: ids, path, box, det_score, embedding, model version, image metadata.

        Read like :meth:`faces_by_id`: the published catalog first, the master for the rest.
        """
        names = ["face_id", "image_id", "model_version", "embedding", "det_score", "path", "content_hash",
                 "width", "height", "metadata", "bbox"]
        faces = self.db.read_ids("SELECT face_id, image_id, model_version, embedding, det_score, "
                                 "[x1, y1, x2, y2] AS bbox FROM faces WHERE face_id IN ({keys})",
                                 [int(i) for i in face_ids])
        images = self._images_by_id({r[1] for r in faces}, "path, content_hash, width, height, metadata")
        return [dict(zip(names, (*r[:5], *images[r[1]], r[5]))) for r in faces if r[1] in images]

    def remove_image(self, image_id: str) -> list[int]:
        """Delete an image and its faces; returns the removed face ids."""
        with self.transaction() as con:
            ids = _delete_faces(con, "image_id = ?", [image_id])
            log_changes(con, "images", [r[0] for r in con.execute(
                "DELETE FROM images WHERE image_id = ? RETURNING image_seq", [image_id]).fetchall()])
        return ids

    def remove_face(self, face_id: int) -> list[int]:
        """Delete one face; returns ``[face_id]`` when it existed."""
        with self.transaction() as con:
            return _delete_faces(con, "face_id = ?", [face_id])

    def clear(self) -> None:
        """Delete every image and face (the sequence of face ids goes on, ids are never reused)."""
        with self.transaction() as con:
            con.execute("DELETE FROM faces")
            con.execute("DELETE FROM images")
            log_all(con, "faces")
            log_all(con, "images")

    def stats(self) -> dict[str, Any]:
        """Image counts by status and rejection reason, face counts and the number of person clusters."""
        with self._read() as con:
            by_status = dict(con.execute("SELECT status, count(*) FROM images GROUP BY ALL").fetchall())
            reasons = dict(con.execute(
                "SELECT rejection_reason, count(*) FROM images WHERE status = 'rejected' GROUP BY ALL").fetchall())
            faces, valid = con.execute("SELECT count(*), count(*) FILTER (WHERE is_valid) FROM faces").fetchone()
        return {"images": sum(by_status.values()), "by_status": by_status, "rejected_by_reason": reasons,
                "faces": faces, "valid_faces": valid}

    def export_parquet(self, folder: str | Path) -> dict[str, Path]:
        """Write the ``images`` and ``faces`` tables to ``folder/images.parquet`` and ``faces.parquet``.

        Each file is written beside its final name and renamed into place, so a reader never sees
        half a file. Returns table name -> file.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        order = {"images": "image_id", "faces": "image_id, face_index"}
        written = {}
        with self._read() as con:
            for table, key in order.items():
                final = folder / f"{table}.parquet"
                partial = folder / f".{table}.parquet.partial"
                con.execute(f"COPY (SELECT * FROM {table} ORDER BY {key}) TO '{partial}' (FORMAT parquet)")
                partial.replace(final)
                written[table] = final
        return written

    def import_parquet(self, images_file: str | Path, faces_file: str | Path) -> dict[str, Any]:
        """Merge images and faces exported by :meth:`export_parquet` of another catalog; idempotent.

        Images whose content this catalog already holds as done (unreadable, or processed by the
        same model version, as in :meth:`known_hashes`) are skipped; an image processed by another
        model version replaces its old faces under its existing image id. Faces get new face ids
        from this catalog's sequence. Everything commits in one transaction, so importing the same
        files again, or after a crash, adds nothing twice. Returns the counts and the image ids added.
        """
        with self.transaction() as con:
            con.execute(
                """CREATE OR REPLACE TEMP TABLE staged_images AS
                   SELECT s.* REPLACE (coalesce((SELECT min(m.image_id) FROM images m
                                                 WHERE m.content_hash = s.content_hash), s.image_id) AS image_id),
                          s.image_id AS staged_id
                   FROM read_parquet(?) s
                   WHERE NOT EXISTS (SELECT 1 FROM images m WHERE m.content_hash = s.content_hash
                                     AND (m.status = 'unreadable' OR m.model_version = s.model_version))""",
                [str(images_file)],
            )
            total = con.execute("SELECT count(*) FROM read_parquet(?)", [str(images_file)]).fetchone()[0]
            _delete_faces(con, "image_id IN (SELECT image_id FROM staged_images)")
            con.execute("ALTER TABLE staged_images DROP COLUMN IF EXISTS image_seq")
            staged = "image_id IN (SELECT image_id FROM staged_images)"
            log_changes_where(con, "images", "image_seq", staged)  # the versions replaced
            con.execute("INSERT OR REPLACE INTO images BY NAME SELECT * EXCLUDE (staged_id), "
                        "nextval('image_seq') AS image_seq FROM staged_images")
            log_changes_where(con, "images", "image_seq", staged)  # the new ones
            faces = con.execute(
                """INSERT INTO faces BY NAME
                   SELECT f.* EXCLUDE (face_id, image_id), st.image_id
                   FROM read_parquet(?) f JOIN staged_images st ON f.image_id = st.staged_id
                   ORDER BY st.image_id, f.face_index RETURNING face_id""",
                [str(faces_file)],
            ).fetchall()
            if faces:
                log_appends(con, "faces", min(r[0] for r in faces), max(r[0] for r in faces))
            added = [r[0] for r in con.execute("SELECT image_id FROM staged_images ORDER BY image_id").fetchall()]
            con.execute("DROP TABLE staged_images")
        return {"images": len(added), "faces": len(faces), "skipped": total - len(added), "image_ids": added}
    def import_faces(self, file: str | Path, model_version: str, dim: int, batch_rows: int = 65_536) -> dict[str, Any]:
        """Import precomputed faces, one row per face, from a Parquet file; all or nothing.

        Required columns: ``image_id`` and ``path`` (strings) and ``embedding`` (a list of floats
        of length ``dim``, the running model's; stored unit-normalised, its norm as
        ``embedding_norm``). Optional: ``face_index`` (else the file order within an image),
        ``bbox`` (list of 4) or ``x1``, ``y1``, ``x2``, ``y2``; ``det_score``, ``quality``,
        ``cartoon_probability`` (NaN when not given: not measured); ``width``, ``height``,
        ``content_hash`` (else the image id) and ``metadata`` (a JSON string) of the image. Every face
        is valid and of ``model_version``.

        Images already in the catalog are skipped whole (an import run again adds nothing). The new
        faces get consecutive ids, ``face_ids`` gives the first and the last.
        Raises :class:`FaceImportError`, with nothing imported, on a missing or mistyped column, an
        embedding of another length or with NaN, inf or zero norm, a face given twice, or an image
        with two paths. Returns the counts of images and faces added and of images skipped.
        """
        file = Path(file)
        try:
            meta = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as exc:
            raise FaceImportError(f"{file}: not a readable Parquet file ({exc})") from exc
        schema = meta.schema_arrow
        names = set(schema.names)
        for col in ("image_id", "path", "embedding"):
            if col not in names:
                raise FaceImportError(f"{file}: missing column {col!r} (required: image_id, path, embedding)")
        for col in ("image_id", "path"):
            if not pa.types.is_string(schema.field(col).type) and not pa.types.is_large_string(schema.field(col).type):
                raise FaceImportError(f"{file}: column {col!r} must be a string, not {schema.field(col).type}")
        etype = schema.field("embedding").type
        if not (pa.types.is_list(etype) or pa.types.is_large_list(etype) or pa.types.is_fixed_size_list(etype)) \
                or not pa.types.is_floating(etype.value_type):
            raise FaceImportError(f"{file}: column 'embedding' must be a list of floats, not {etype}")
        src = f"read_parquet({_sql_literal(file)}, file_row_number = true)"
        opt = _optional_columns(names)
        images = faces = 0
        with self.transaction() as con:
            # The small columns first: checks that need the whole file, before any row is written.
            con.execute(f"""CREATE OR REPLACE TEMP TABLE _import AS
                SELECT file_row_number AS row_no, image_id, path,
                       {opt["face_index"]} AS face_index, {opt["x1"]} AS x1, {opt["y1"]} AS y1,
                       {opt["x2"]} AS x2, {opt["y2"]} AS y2, {opt["det_score"]} AS det_score,
                       {opt["quality"]} AS quality, {opt["cartoon_probability"]} AS cartoon_probability,
                       {opt["width"]} AS width, {opt["height"]} AS height,
                       coalesce({opt["content_hash"]}, image_id) AS content_hash, {opt["metadata"]} AS metadata
                FROM {src}""")
            try:
                self._check_import(con, file)
                skipped = con.execute("""SELECT count(DISTINCT i.image_id) FROM _import i
                                         WHERE EXISTS (SELECT 1 FROM images m WHERE m.image_id = i.image_id)""").fetchone()[0]
                con.execute("DELETE FROM _import i WHERE EXISTS (SELECT 1 FROM images m WHERE m.image_id = i.image_id)")
                face0 = con.execute("SELECT coalesce(max(face_id), 0) FROM faces").fetchone()[0]
                seq0 = con.execute("SELECT coalesce(max(image_seq), 0) FROM images").fetchone()[0]
                images = con.execute(
                    """INSERT INTO images (image_id, content_hash, path, width, height, status, num_faces,
                                           model_version, metadata, processed_at, image_seq)
                       SELECT image_id, any_value(content_hash), any_value(path), any_value(width),
                              any_value(height), 'valid', count(*), ?, any_value(metadata), ?, nextval('image_seq')
                       FROM _import GROUP BY image_id ORDER BY min(row_no)""", [model_version, utc_now()]).fetchone()[0]
                faces = read = 0
                for batch in meta.iter_batches(batch_size=batch_rows, columns=["embedding"]):
                    faces += self._import_batch(con, batch.column(0), read, dim, model_version, file)
                    read += batch.num_rows
                con.execute("DROP TABLE _import")
                if images:
                    face1 = con.execute("SELECT max(face_id) FROM faces").fetchone()[0]
                    seq1 = con.execute("SELECT max(image_seq) FROM images").fetchone()[0]
                    log_appends(con, "faces", face0 + 1, face1)
                    log_appends(con, "images", seq0 + 1, seq1)
            except duckdb.ConversionException as exc:
                raise FaceImportError(f"{file}: a column has values of the wrong type ({exc})") from exc
        return {"images": int(images), "faces": int(faces), "skipped_images": int(skipped),
                "face_ids": [int(face0) + 1, int(face0) + int(faces)] if faces else []}

    @staticmethod
    def _check_import(con: duckdb.DuckDBPyConnection, file: Path) -> None:
        """Refuse a file with missing ids, a face given twice, or an image given two paths."""
        bad = con.execute("SELECT min(row_no) FROM _import WHERE image_id IS NULL OR path IS NULL "
                          "OR image_id = ''").fetchone()[0]
        if bad is not None:
            raise FaceImportError(f"{file}: row {bad} has no image_id or path")
        dup = con.execute("SELECT image_id, face_index FROM _import GROUP BY ALL HAVING count(*) > 1 "
                          "ORDER BY image_id LIMIT 1").fetchone()
        if dup is not None:
            raise FaceImportError(f"{file}: face {dup[1]} of image {dup[0]!r} is given twice")
        two = con.execute("SELECT image_id FROM _import GROUP BY image_id HAVING count(DISTINCT path) > 1 "
                          "ORDER BY image_id LIMIT 1").fetchone()
        if two is not None:
            raise FaceImportError(f"{file}: image {two[0]!r} is given with two paths")

    @staticmethod
    def _import_batch(con: duckdb.DuckDBPyConnection, column: pa.Array, first: int, dim: int,
                      model_version: str, file: Path) -> int:
        """Insert the faces of rows ``first..`` (one batch of the file's embeddings) whose image is
        being added; returns how many."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        n = len(column)
        if column.null_count:
            raise FaceImportError(f"{file}: row {first + column.is_null().index(True).as_py()} has no embedding")
        if pa.types.is_fixed_size_list(column.type):
            lengths = np.full(n, column.type.list_size)
        else:
            offsets = column.offsets.to_numpy()
            lengths = np.diff(offsets)
        wrong = np.flatnonzero(lengths != dim)
        if len(wrong):
            raise FaceImportError(f"{file}: row {first + int(wrong[0])} has an embedding of {int(lengths[wrong[0]])} "
                                  f"values; the running model's dimension is {dim}")
        x = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(n, dim)
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
        if len(bad):
            raise FaceImportError(f"{file}: row {first + int(bad[0])} has an embedding with NaN, inf or zero norm")
        x = x / norms[:, None]
        rows = pa.table({"row_no": pa.array(np.arange(first, first + n, dtype=np.int64)),
                         "embedding_norm": pa.array(norms.astype(np.float32)),
                         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)})
        con.register("_import_batch", rows)
        try:
            return con.execute(
                """INSERT INTO faces (image_id, face_index, x1, y1, x2, y2, det_score, embedding_norm, face_width,
                       face_height, face_area_ratio, cartoon_probability, quality, is_valid, rejection_reason,
                       model_version, embedding)
                   SELECT i.image_id, i.face_index, i.x1, i.y1, i.x2, i.y2, coalesce(i.det_score, 'NaN'),
                          b.embedding_norm, coalesce(round(i.x2 - i.x1), 0), coalesce(round(i.y2 - i.y1), 0),
                          coalesce((i.x2 - i.x1) * (i.y2 - i.y1) / (i.width * i.height), 'NaN'),
                          coalesce(i.cartoon_probability, 'NaN'), coalesce(i.quality, 'NaN'), true, NULL, ?,
                          b.embedding::FLOAT[]
                   FROM _import_batch b JOIN _import i USING (row_no) ORDER BY b.row_no""",
                [model_version]).fetchone()[0]
        finally:
            con.unregister("_import_batch")

    def image_sources(self, exclude_model_version: str) -> list[tuple[str, str, dict | None]]:
        """``(image_id, path, metadata)`` of readable images not yet processed by ``exclude_model_version``."""
        with self._read() as con:
            rows = con.execute(
                """SELECT image_id, path, metadata FROM images
                   WHERE status <> 'unreadable' AND model_version IS DISTINCT FROM ? ORDER BY image_id""",
                [exclude_model_version],
            ).fetchall()
        return [(r[0], r[1], json.loads(r[2]) if r[2] else None) for r in rows]

    def face_images(self, model_version: str) -> tuple[np.ndarray, np.ndarray]:
        """``(face ids, image ids)`` of the valid faces of ``model_version``, by face id."""
        with self._read() as con:
            rows = con.execute(
                "SELECT face_id, image_id FROM faces WHERE is_valid AND model_version = ? ORDER BY face_id",
                [model_version]).fetchnumpy()
        return rows["face_id"].astype(np.int64), np.asarray(rows["image_id"], dtype=object)

    def face_boxes_of_content(self, digest: str) -> list[tuple[int, float, float, float, float]]:
        """``(face_id, x1, y1, x2, y2)`` of the faces of the catalog image with this content hash."""
        return self.query("""SELECT f.face_id, f.x1, f.y1, f.x2, f.y2 FROM faces f JOIN images i USING (image_id)
                             WHERE i.content_hash = ?""", [digest])

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        """Run a read query and return all rows."""
        with self._read() as con:
            return con.execute(sql, params or []).fetchall()


def _sql_literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _optional_columns(names: set[str]) -> dict[str, str]:
    """SQL for each optional column of an import file: the column, or NULL (the box from ``bbox``)."""
    sql = {c: (c if c in names else "NULL") for c in
           ("face_index", "det_score", "quality", "cartoon_probability", "width", "height", "content_hash",
            "metadata")}
    if "face_index" not in names:
        sql["face_index"] = "row_number() OVER (PARTITION BY image_id ORDER BY file_row_number) - 1"
    for i, c in enumerate(("x1", "y1", "x2", "y2")):
        sql[c] = c if c in names else (f"bbox[{i + 1}]" if "bbox" in names else "NULL")
    if "metadata" in names:
        sql["metadata"] = "metadata::JSON"
    return sql


def _delete_faces(con: duckdb.DuckDBPyConnection, where: str, params: Sequence[Any] = ()) -> list[int]:
    """Delete the faces ``where`` selects, logged for publication; returns their ids."""
    ids = [r[0] for r in con.execute(f"DELETE FROM faces WHERE {where} RETURNING face_id", list(params)).fetchall()]
    log_changes(con, "faces", ids)
    return ids


def _new_image_version(con: duckdb.DuckDBPyConnection, image_id: str) -> int:
    """A new ``image_seq`` for an image row about to be written, with the version it replaces and
    the new one logged for publication."""
    log_changes_where(con, "images", "image_seq", "image_id = ?", [image_id])
    seq = con.execute("SELECT nextval('image_seq')").fetchone()[0]
    log_changes(con, "images", [seq])
    return seq
