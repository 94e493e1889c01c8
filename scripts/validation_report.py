"""Validation report of the filter (spec 1.4): every shared folder, what the filter decided.

    python scripts/validation_report.py [--datasets DIR] [--config FILE] [--json] [--sources]

For each folder: files, valid, rejected by reason, unreadable, and the error rate against what the
folder is known to hold (real faces should be valid: the error is the share rejected, a false
positive of the filter; cartoons, non-faces and tiny faces should be rejected: the error is the
share accepted, a false negative). Each folder goes through the same bulk path as
``face-assets process`` (an in-memory catalog), so duplicates inside a folder count once.
``--sources`` adds one row per source (file-name prefix) of the ``extra`` folders.

The shipped cartoon classifier was trained on every one of these folders, so its rows here are
not a held-out measure: those are in docs/cartoon.md (leave-one-source-out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from face_assets import FaceFilter, load_settings
from face_assets.config import datasets_root
from face_assets.ingest import ImageOutcome, ingest_paths, iter_image_files
from face_assets.store import Catalog

# folder -> expected verdict ("valid", "rejected", or None when the folder is a mix)
FOLDERS = {
    "real/lfw10": "valid",
    "real/deepface": "valid",
    "real/imfdb": "valid",
    "real/dlib_johns": "valid",
    "real/ageitgey": "valid",
    "detection/groups": "valid",
    "detection/dlib_voc": "valid",
    "real/extra/studio": "valid",
    "real/extra/bw": "valid",
    "real/extra/old": "valid",
    "real/extra/lighting": "valid",
    "real/extra/web": "valid",
    "real/extra/aigen": None,  # AI-generated portraits: neither a photo nor a drawing
    "cartoon/iiit_cfw": "rejected",
    "cartoon/dualstylegan/anime": "rejected",
    "cartoon/dualstylegan/cartoon": "rejected",
    "cartoon/dualstylegan/pixar": "rejected",
    "cartoon/dualstylegan/illustration": "rejected",
    "cartoon/dualstylegan/caricature": "rejected",
    "cartoon/dualstylegan/impasto": "rejected",
    "cartoon/extra/anime": "rejected",
    "cartoon/extra/illustration": "rejected",
    "cartoon/extra/render3d": "rejected",
    "cartoon/extra/painting": "rejected",
    "cartoon/extra/sketch": "rejected",
    "cartoon/extra/caricature": "rejected",
    "nonface": "rejected",
    "lowres": "rejected",
    "corrupted": None,
}


def _source(path: str) -> str:
    """Source of a file of the extra folders: its file-name prefix."""
    return Path(path).name.split("_", 1)[0]


def _row(name: str, expected: str | None, n: int, valid: int, counts: dict) -> dict:
    """One table row; the error is the share rejected where faces should be valid, else the share accepted."""
    error = None
    if expected == "valid":
        error = 1 - valid / n if n else None
    elif expected == "rejected":
        error = valid / n if n else None
    return {"folder": name, "expected": expected or "mixed", "files": n, "valid": valid,
            "rejected": counts["rejected"], "unreadable": counts["unreadable"], "error_rate": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=str(datasets_root()))
    parser.add_argument("--config")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sources", action="store_true", help="also one row per source of the extra folders")
    args = parser.parse_args()
    root = Path(args.datasets)
    face_filter = FaceFilter(load_settings(args.config))
    rows = []
    for folder, expected in FOLDERS.items():
        paths = [p for p in iter_image_files(root / folder) if p.suffix.lower() not in {".xml", ".txt", ".csv"}]
        outcomes: list[ImageOutcome] = []
        with Catalog(":memory:") as catalog:
            s = ingest_paths(paths, face_filter, catalog, on_image=outcomes.append)
        rows.append(_row(folder, expected, s.total - s.skipped, s.valid, s.to_dict()))
        if args.sources and "/extra/" in folder:
            for source in sorted({_source(o.path) for o in outcomes}):
                mine = [o for o in outcomes if _source(o.path) == source and o.status != "skipped"]
                counts = {"rejected": {}, "unreadable": sum(o.status == "unreadable" for o in mine)}
                for o in mine:
                    if o.status == "rejected":
                        counts["rejected"][o.rejection_reason] = counts["rejected"].get(o.rejection_reason, 0) + 1
                valid = sum(o.status == "valid" for o in mine)
                rows.append(_row(f"  {folder.rsplit('/', 1)[-1]}/{source}", expected, len(mine), valid, counts))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    reasons = ("cartoon", "no_face", "low_quality")
    head = f"{'folder':<36}{'expect':>9}{'files':>7}{'valid':>7}" + "".join(f"{r:>12}" for r in reasons)
    print(head + f"{'unreadable':>11}{'error':>8}")
    for r in rows:
        err = "-" if r["error_rate"] is None else f"{r['error_rate']:.1%}"
        print(
            f"{r['folder']:<36}{r['expected']:>9}{r['files']:>7}{r['valid']:>7}"
            + "".join(f"{r['rejected'].get(x, 0):>12}" for x in reasons)
            + f"{r['unreadable']:>11}{err:>8}"
        )
    print("error = share rejected for folders expected valid (false positives), share accepted for folders expected rejected (false negatives)")


if __name__ == "__main__":
    main()
