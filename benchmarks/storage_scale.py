"""What a write, a curation action, a batch and a page cost at the mission's size, against a small catalog.

Two data folders seeded the same way (:mod:`benchmarks.catalog_seed`): the baseline (10k faces)
and the large one (``--n``, 2M for the mission; ``--data-dir`` reuses one seeded before). Each
operation runs through the library, as the web service and the CLI call it, committed and
published; the table gives p50 and p95 on each side and the ratio large / baseline of the p50.
A cost that follows the change has a ratio near 1; one that follows the catalog grows with it.

    python -m benchmarks.storage_scale --n 200000           # a few minutes on 2 cores
    python -m benchmarks.storage_scale --data-dir /tmp/seeded-2m --n 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.catalog_seed import seed_catalog, write_faces_file


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _disk_written() -> int:
    """Bytes this process has written to storage so far (the kernel's count)."""
    with open(f"/proc/{os.getpid()}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes"))


def measure(data_dir: Path, repeats: int, batches: int, seed: int) -> dict[str, list[float]]:
    """Run each operation ``repeats`` times (a batch ``batches`` times) on a seeded folder; seconds (and bytes) per run."""
    from face_assets import FaceRecognitionLibrary

    rng = np.random.default_rng([seed, time.time_ns()])
    out: dict[str, list[float]] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        out.setdefault(name, []).append(time.perf_counter() - t)
        return result

    with FaceRecognitionLibrary(index_dir=data_dir) as lib:
        timed("service: load the index once (then journal)", lambda: lib.index)
        store = lib.persons.store
        pairs = store.query("SELECT cluster_id, size FROM clusters USING SAMPLE 2000 ROWS (reservoir, 1)")
        small = [c for c, s in pairs if s <= 3]
        multi = [c for c, s in pairs if 4 <= s <= 20]  # apart from the small ones the merges take
        for i in range(repeats):
            timed("write: rename one person", lib.rename, int(small[i]), f"person {i}")
            a, b = small[2 * i + repeats], small[2 * i + repeats + 1]
            timed("curation: merge two persons", lib.merge, [int(a), int(b)])
            target = int(multi[i])
            face = int(store.query("SELECT face_id FROM face_clusters WHERE cluster_id = ? LIMIT 1",
                                   [int(small[3 * repeats + i])])[0][0])
            timed("curation: move one face", lib.move, face, target)
            members = lib.get_cluster(int(multi[repeats + i])).face_ids
            timed("curation: split off one face", lib.split, int(multi[repeats + i]), [int(members[0])])
            offset = int(rng.integers(0, max(1, len(pairs) - 48)))
            timed("page: 48 persons, largest first", lib.list_clusters, 1, 48, offset)
        for i in range(batches):
            batch = Path(tempfile.mkdtemp()) / "batch.parquet"
            # Image ids no earlier run used: a folder measured again imports new faces, not skipped ones.
            write_faces_file(batch, 500, seed=1000 + seed * 100 + i, start=10**9 + int(rng.integers(0, 10**9)) * 1000)
            before = _disk_written()
            imported = timed("batch: import 500 faces (catalog + index)", lib.import_faces, batch)
            if imported["faces"] != 500:
                raise RuntimeError(f"the batch was not imported as new faces: {imported}")
            timed("batch: assign the 500 to persons", lib.assign_new)
            out.setdefault("batch: MB written to disk", []).append((_disk_written() - before) / 2**20)
            out.setdefault("batch: MB of the batch's file", []).append(batch.stat().st_size / 2**20)
            batch.unlink()
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "face_assets.cli", "--data-dir", str(data_dir), "stats"],
                       check=True, capture_output=True)
        out.setdefault("stats command (process)", []).append(time.perf_counter() - t)
    return out


def main() -> None:
    """Seed (or reuse) both folders, measure, print the table (and --json figures)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000, help="faces of the large catalog")
    ap.add_argument("--baseline", type=int, default=10_000, help="faces of the baseline catalog")
    ap.add_argument("--data-dir", type=Path, help="a large folder seeded before (else one is seeded)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batches", type=int, default=3, help="batches of 500 faces imported and assigned")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="storage-scale-"))
    seeds = {}
    small = work / "baseline"
    seeds["baseline"] = seed_catalog(small, args.baseline, seed=1)
    large = args.data_dir
    if large is None:
        large = work / "large"
        seeds["large"] = seed_catalog(large, args.n, seed=0)
    figures = {"baseline": measure(small, args.repeats, args.batches, 1),
               "large": measure(large, args.repeats, args.batches, 2)}
    print(f"{'operation':<44} {'base p50':>9} {'large p50':>10} {'large p95':>10} {'ratio':>6}")
    for name in figures["baseline"]:
        b, g = np.array(figures["baseline"][name]), np.array(figures["large"][name])
        unit = "" if name.startswith("batch: MB") else " s"
        print(f"{name:<44} {np.median(b):>9.3f} {np.median(g):>10.3f} {np.percentile(g, 95):>10.3f} "
              f"{np.median(g) / max(np.median(b), 1e-9):>6.2f}{unit}")
    print(f"catalogs: baseline {args.baseline} faces, large {args.n} faces "
          f"({_folder_bytes(large) / 2**30:.2f} GiB on disk); seeding: {json.dumps(seeds)}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"seeds": seeds, "figures": figures}, indent=2))


if __name__ == "__main__":
    main()
