"""Identification and verification accuracy of the library on the shared labelled real faces.

    python benchmarks/recognition_accuracy.py [--config FILE]

Per identity of ``real/{lfw10,deepface,imfdb,dlib_johns,ageitgey}``, one image is held out (the
first in name order) and all others are indexed with ``FaceRecognitionLibrary.index_batch`` into a
temporary folder; each held-out image is searched with ``search``. Reported: rank-1 and rank-5
accuracy (correct identity among the first k results) per folder and overall, and, over all pairs
of the main faces of every image, ROC AUC, the cosine threshold at FAR 1e-3 and the TAR there, the
baseline being what the recognizer alone gives (no filter, every image).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_datasets  # noqa: E402
from face_assets import FaceRecognitionError, load_settings  # noqa: E402
from face_assets.evaluation import roc_auc, threshold_at_far  # noqa: E402
from face_assets.library import FaceRecognitionLibrary  # noqa: E402

FOLDERS = ("lfw10", "deepface", "imfdb", "dlib_johns", "ageitgey")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config")
    args = parser.parse_args()
    root = shared_datasets() / "real"
    identities: dict[str, list[Path]] = defaultdict(list)
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                identities[f"{folder}/{path.parent.name}"].append(path)
    held_out = {ident: paths[0] for ident, paths in identities.items() if len(paths) >= 2}
    gallery = [p for ident, paths in identities.items() for p in paths if held_out.get(ident) != p]
    identity_of = {str(p): ident for ident, paths in identities.items() for p in paths}

    with tempfile.TemporaryDirectory() as tmp:
        settings = load_settings(args.config, overrides={"storage": {"data_dir": tmp}})
        with FaceRecognitionLibrary(settings=settings) as lib:
            summary = lib.index_batch(gallery)
            hits = defaultdict(lambda: [0, 0, 0])  # folder -> [rank1, rank5, n]
            for ident, path in held_out.items():
                folder = ident.split("/")[0]
                hits[folder][2] += 1
                try:
                    found = [identity_of[r.path] for r in lib.search(path, top_k=5)]
                except FaceRecognitionError:
                    continue
                hits[folder][0] += bool(found) and found[0] == ident
                hits[folder][1] += ident in found
            embeddings, labels = [], []
            for ident, paths in identities.items():
                for p in paths:
                    try:
                        embeddings.append(lib.get_embedding(p))
                        labels.append(ident)
                    except FaceRecognitionError:
                        pass
    emb = np.stack(embeddings)
    lab = np.array(labels)
    sims = emb @ emb.T
    iu = np.triu_indices(len(lab), 1)
    same = lab[iu[0]] == lab[iu[1]]
    genuine, impostor = sims[iu][same], sims[iu][~same]
    thr, tar = threshold_at_far(genuine, impostor, 1e-3)

    print(f"gallery: {summary.total} images ({summary.valid} valid, rejected {dict(summary.rejected)}, "
          f"{summary.unreadable} unreadable), {summary.faces} faces; {len(held_out)} held-out queries")
    print(f"{'folder':<12}{'queries':>8}{'rank-1':>9}{'rank-5':>9}")
    tot = np.zeros(3)
    for folder in FOLDERS:
        r1, r5, n = hits[folder]
        tot += (r1, r5, n)
        print(f"{folder:<12}{n:>8}{r1 / n:>9.3f}{r5 / n:>9.3f}")
    print(f"{'all':<12}{int(tot[2]):>8}{tot[0] / tot[2]:>9.3f}{tot[1] / tot[2]:>9.3f}")
    print(f"verification over {len(genuine)} genuine / {len(impostor)} impostor pairs of {len(lab)} images: "
          f"ROC AUC {roc_auc(genuine, impostor):.4f}, threshold at FAR 1e-3 = {thr:.3f}, TAR there = {tar:.3f}")


if __name__ == "__main__":
    main()
