"""Seed a data folder with N synthetic faces, persons and clusters, as a team importing its system would.

The faces come from the calibrated generator (:mod:`benchmarks.synthetic`): one image per face,
the true persons as person clusters (what a full clustering finds, near enough for storage and
service figures). They enter through the product's bulk import (``face-assets import``), so the
seed measures it too, then the clusters are written in one transaction with their centroids, as a
full clustering writes them.

    python -m benchmarks.catalog_seed --data-dir /tmp/seeded --n 2000000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.synthetic import SyntheticFaces


def write_faces_file(path: Path, n: int, seed: int = 0, dim: int = 512, start: int = 0) -> SyntheticFaces:
    """Write the import file of ``n`` synthetic faces (``image_id``, ``path``, ``embedding``, ``person``)."""
    faces = SyntheticFaces(n, dim, seed=seed)
    writer = None
    for row, x in faces.iter_blocks():
        rows = np.arange(row, row + len(x)) + start
        people = faces.labels[row : row + len(x)]
        table = pa.table({
            "image_id": pa.array([f"seed{seed}-{i:09d}" for i in rows]),
            "path": pa.array([f"seed/person{p}/{i}.jpg" for p, i in zip(people, rows)]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
            "person": pa.array(people),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()
    return faces


def seed_catalog(data_dir: Path, n: int, seed: int = 0, work: Path | None = None) -> dict:
    """Import ``n`` synthetic faces into ``data_dir`` and write their persons as clusters; the figures."""
    from face_assets import FaceRecognitionLibrary

    work = work or data_dir
    work.mkdir(parents=True, exist_ok=True)
    file = work / f"seed-{n}-{seed}.parquet"
    t0 = time.perf_counter()
    faces = write_faces_file(file, n, seed=seed)
    t1 = time.perf_counter()
    with FaceRecognitionLibrary(index_dir=data_dir) as lib:
        report = lib.import_faces(file)
        t2 = time.perf_counter()
        store = lib.persons.store
        with lib.catalog.db.read() as con:
            got = con.execute("SELECT face_id, image_id FROM faces WHERE image_id LIKE ? ORDER BY face_id",
                              [f"seed{seed}-%"]).fetchnumpy()
        rows = np.array([int(i.rsplit("-", 1)[1]) for i in got["image_id"]], np.int64)
        face_ids = got["face_id"].astype(np.int64)
        people = faces.labels[rows]
        sums = np.zeros((faces.n_identities, faces.dim), np.float32)
        for row, x in faces.iter_blocks():  # centroids, one block at a time
            np.add.at(sums, faces.labels[row : row + len(x)], x)
        sizes = np.bincount(people, minlength=faces.n_identities)
        first = np.full(faces.n_identities, -1, np.int64)
        first[people[::-1]] = face_ids[::-1]
        base = store.query("SELECT coalesce(max(cluster_id), 0) FROM clusters")[0][0] + 1
        clusters = [{"cluster_id": base + p, "size": int(sizes[p]), "representative_face_id": int(first[p]),
                     "centroid": sums[p] / sizes[p]} for p in np.flatnonzero(sizes)]
        with store.transaction() as con:
            store.write_clusters(con, clusters, (face_ids, base + people), "cluster", replace_all=False)
            # The seeded persons stand for a full clustering of the catalog: recorded as one, so the
            # drift policy does not ask the pipeline for a full re-clustering of the seed at once.
            store.record_cluster_run(con, kind="full", seconds=0.0, faces=len(lib.catalog.valid_face_ids(lib.model_version)),
                                     clusters=len(clusters), singletons=int(np.sum(sizes == 1)), new_faces=len(face_ids),
                                     unassigned=0, model_version=lib.model_version, settings={"seeded": True})
        t3 = time.perf_counter()
        lib.persons.keep_means(faces.dim)  # as a full run leaves them: the first batch's assignment patches them
        t4 = time.perf_counter()
    file.unlink()
    return {"faces": report["faces"], "persons": len(clusters), "generate_s": round(t1 - t0, 1),
            "import_catalog_s": report["catalog_seconds"], "import_index_s": report["index_seconds"],
            "import_faces_per_s": round(report["faces"] / max(report["catalog_seconds"], 1e-9)),
            "clusters_s": round(t3 - t2, 1), "kept_means_s": round(t4 - t3, 1)}


def main() -> None:
    """Command line: seed a data folder and print the figures as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(seed_catalog(args.data_dir, args.n, args.seed), indent=2))


if __name__ == "__main__":
    main()
