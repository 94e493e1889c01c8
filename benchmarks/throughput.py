"""Throughput: face_assets' detect+filter+embed vs a plain insightface FaceAnalysis loop, same images.

    python benchmarks/throughput.py [--per-folder 100] [--repeat 3] [--large]

The plain loop is what a user writes first: ``FaceAnalysis(name="buffalo_s")`` over the same ONNX
files with its defaults (every model of the pack, default session options, default detector
sizes), ``cv2.imread`` then ``app.get``. Both run in this process on the same files, alternately,
``--repeat`` times: the table gives the best run of each (images/s, the share of images where at
least one face was found), the ratio of the best runs and the ratio of every pair of runs, since
one run's ratio moves by a few percent with what else the machine does (and their median). Each side
is timed with its models loaded and warmed on the first images, untimed: ``FaceAnalysis`` starts its
sessions in ``prepare()``, the filter on first use. ``--large`` runs the same
comparison on the shared photos of at least ``LARGE_PIXELS`` (several megapixels), where decoding and
detection at ``det_size`` dominate instead of the small-photo detection. Then the
cost per face of each path of the cartoon check: the recognizer pass with the texture taps against
the same pass without them, the image backbone on the aligned and the wide crop (when the shipped
classifier uses one), and the classifier head, on the faces of the same images.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_datasets  # noqa: E402
from face_assets import FaceFilter, load_settings  # noqa: E402
from face_assets.imaging import load_image  # noqa: E402
from face_assets.models import builtin_pack_dir  # noqa: E402

REAL = ("lfw10", "deepface", "imfdb", "dlib_johns", "ageitgey")
LARGE_PIXELS = 2_000_000


def large_photos() -> list[Path]:
    """The shared real and group photos of at least ``LARGE_PIXELS`` (read from their headers)."""
    from PIL import Image

    root = shared_datasets()
    out = []
    for folder in (root / "real", root / "detection"):
        for p in sorted(q for q in folder.rglob("*") if q.suffix.lower() in {".jpg", ".jpeg", ".png"}):
            with Image.open(p) as im:
                if im.size[0] * im.size[1] >= LARGE_PIXELS:
                    out.append(p)
    return out


def plain_loop(paths: list[Path]) -> tuple[float, int]:
    """A plain FaceAnalysis loop over the buffalo_s files; returns (seconds, images with a face)."""
    from insightface.app import FaceAnalysis

    with tempfile.TemporaryDirectory() as root:
        pack = Path(root) / "models" / "buffalo_s"
        pack.mkdir(parents=True)
        for name in ("scrfd_500m_bnkps.onnx", "2d106det.onnx", "w600k_mbf.onnx"):
            (pack / name).symlink_to(builtin_pack_dir() / name)
        app = FaceAnalysis(name="buffalo_s", root=root, providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=-1)
        app.get(cv2.imread(str(paths[0])))  # warm, untimed: as the filter below
        start = time.perf_counter()
        found = 0
        for p in paths:
            img = cv2.imread(str(p))
            found += bool(img is not None and app.get(img))
        return time.perf_counter() - start, found


def project_pipeline(paths: list[Path], chunk: int = 16) -> tuple[float, int, int]:
    """face_assets' filter over the same files; returns (seconds, images with a face, valid images)."""
    face_filter = FaceFilter(load_settings())
    # Warm, untimed, as the plain loop is: the filter starts its sessions on first use (each detection
    # thread's own, the image backbone's), which FaceAnalysis does before its timer, in prepare().
    face_filter.filter_loaded(face_filter.analyzer.load_many(paths[:2]))
    start = time.perf_counter()
    found = valid = 0
    for i in range(0, len(paths), chunk):
        images = face_filter.analyzer.load_many(paths[i : i + chunk])  # as indexing decodes them
        for analysis, result in face_filter.filter_loaded(images):
            found += bool(analysis.faces)
            valid += result["is_valid"]
    return time.perf_counter() - start, found, valid


def cartoon_cost(paths: list[Path], repeat: int = 3) -> dict[str, float]:
    """Milliseconds per face of the recognizer with and without the cartoon taps, of the image backbone
    (aligned and wide crop) and of the classifier head (best of ``repeat`` runs over the faces of
    ``paths``, batches of ``models.rec_batch_size``)."""
    from face_assets.cartoon import CartoonClassifier
    from face_assets.models import Recognizer, align_wide

    face_filter = FaceFilter(load_settings())
    recognizer = face_filter.analyzer.texture_recognizer or face_filter.analyzer.recognizer
    plain = Recognizer(recognizer.model_path, face_filter.settings.models)
    crops, wide = [], []
    for p in paths:
        img = load_image(p)
        faces, _ = face_filter.analyzer.detector.predict([img])[0]
        crops += [recognizer.align(img, f.kps) for f in faces[:1]]
        wide += [align_wide(img, f.kps) for f in faces[:1]]
    batch = face_filter.settings.models.rec_batch_size

    def best(fn, items=crops) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for i in range(0, len(items), batch):
                fn(items[i : i + batch])
            times.append(time.perf_counter() - start)
        return 1000 * min(times) / len(items)

    clf: CartoonClassifier = face_filter.classifier
    backbone = face_filter.analyzer.backbone
    emb, tex = recognizer.predict(crops)
    style = None if backbone is None else backbone.face_features(crops, wide)
    x = clf.features(emb / np.linalg.norm(emb, axis=1, keepdims=True), tex, style)
    cost = {"faces": len(crops), "recognizer_ms": best(plain.predict), "with_taps_ms": best(recognizer.predict),
            "head_ms": best(lambda c: clf.predict_proba(x[: len(c)]))}
    if backbone is not None:
        cost["backbone_ms"] = best(backbone.features)
        cost["backbone_wide_ms"] = best(backbone.features, wide)
    return cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-folder", type=int, default=100, help="images taken from each real folder")
    parser.add_argument("--repeat", type=int, default=3, help="alternate runs of each pipeline; the best counts")
    parser.add_argument("--large", action="store_true",
                        help=f"the real and group photos of at least {LARGE_PIXELS / 1e6:g} megapixels instead")
    args = parser.parse_args()
    if args.large:
        paths = large_photos()
    else:
        root = shared_datasets() / "real"
        paths = [p for d in REAL for p in sorted(q for q in (root / d).rglob("*") if q.is_file())[: args.per_folder]]
    runs = []
    for _ in range(args.repeat):  # alternate, so a slow spell of the machine hits both sides
        runs.append((plain_loop(paths), project_pipeline(paths)))
    t_plain, f_plain = min(plain for plain, _ in runs)
    t_ours, f_ours, v_ours = min(ours for _, ours in runs)
    n = len(paths)
    source = f"photos of {LARGE_PIXELS / 1e6:g} MP or more" if args.large else ", ".join(REAL)
    print(f"{n} images from {source} ({os.cpu_count()} cores), best of {args.repeat} alternate runs")
    print(f"{'pipeline':<38}{'seconds':>9}{'img/s':>8}{'face found':>12}{'valid':>8}")
    print(f"{'insightface FaceAnalysis defaults':<38}{t_plain:>9.1f}{n / t_plain:>8.1f}{f_plain / n:>12.1%}{'-':>8}")
    print(f"{'face_assets filter (det+emb+cartoon)':<38}{t_ours:>9.1f}{n / t_ours:>8.1f}{f_ours / n:>12.1%}{v_ours / n:>8.1%}")
    ratios = [plain[0] / ours[0] for plain, ours in runs]
    print(f"speed-up: {t_plain / t_ours:.2f}x (best runs); run by run: {', '.join(f'{r:.2f}x' for r in ratios)} "
          f"(median {float(np.median(ratios)):.2f}x)")
    cost = cartoon_cost(paths[:: max(1, len(paths) // 128)])
    print(f"cartoon check, per face ({cost['faces']} faces): recognizer {cost['recognizer_ms']:.2f} ms, with taps "
          f"{cost['with_taps_ms']:.2f} ms (+{cost['with_taps_ms'] - cost['recognizer_ms']:.2f}), classifier head "
          f"{cost['head_ms']:.3f} ms")
    if "backbone_ms" in cost:
        print(f"image backbone, per face: aligned crop {cost['backbone_ms']:.2f} ms + wide crop "
              f"{cost['backbone_wide_ms']:.2f} ms = {cost['backbone_ms'] + cost['backbone_wide_ms']:.2f} ms")


if __name__ == "__main__":
    main()
