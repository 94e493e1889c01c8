"""Validation report of the filter (spec 1.4): every shared folder, what the filter decided.

    python scripts/validation_report.py [--datasets DIR] [--config FILE] [--json]

For each folder: files, valid, rejected by reason, unreadable, and the error rate against what the
folder is known to hold (real faces should be valid: the error is the share rejected, a false
positive of the filter; cartoons, non-faces and tiny faces should be rejected: the error is the
share accepted, a false negative). Each folder goes through the same bulk path as
``face-assets process`` (an in-memory catalog), so duplicates inside a folder count once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from face_assets import FaceFilter, load_settings
from face_assets.config import datasets_root
from face_assets.ingest import ingest_paths, iter_image_files
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
    "cartoon/iiit_cfw": "rejected",
    "cartoon/dualstylegan/anime": "rejected",
    "cartoon/dualstylegan/cartoon": "rejected",
    "cartoon/dualstylegan/pixar": "rejected",
    "cartoon/dualstylegan/illustration": "rejected",
    "cartoon/dualstylegan/caricature": "rejected",
    "cartoon/dualstylegan/impasto": "rejected",
    "nonface": "rejected",
    "lowres": "rejected",
    "corrupted": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=str(datasets_root()))
    parser.add_argument("--config")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(args.datasets)
    face_filter = FaceFilter(load_settings(args.config))
    rows = []
    for folder, expected in FOLDERS.items():
        paths = [p for p in iter_image_files(root / folder) if p.suffix.lower() not in {".xml", ".txt", ".csv"}]
        with Catalog(":memory:") as catalog:
            s = ingest_paths(paths, face_filter, catalog)
        n = s.total - s.skipped
        error = None
        if expected == "valid":
            error = 1 - s.valid / n if n else None
        elif expected == "rejected":
            error = s.valid / n if n else None
        rows.append({"folder": folder, "expected": expected or "mixed", **s.to_dict(), "error_rate": error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    reasons = ("cartoon", "no_face", "low_quality")
    head = f"{'folder':<36}{'expect':>9}{'files':>7}{'valid':>7}" + "".join(f"{r:>12}" for r in reasons)
    print(head + f"{'unreadable':>11}{'error':>8}")
    for r in rows:
        err = "-" if r["error_rate"] is None else f"{r['error_rate']:.1%}"
        print(
            f"{r['folder']:<36}{r['expected']:>9}{r['total'] - r['skipped']:>7}{r['valid']:>7}"
            + "".join(f"{r['rejected'].get(x, 0):>12}" for x in reasons)
            + f"{r['unreadable']:>11}{err:>8}"
        )
    print("error = share rejected for folders expected valid (false positives), share accepted for folders expected rejected (false negatives)")


if __name__ == "__main__":
    main()
