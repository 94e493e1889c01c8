"""Threshold calibration for the quality filters, on the shared real faces or a user's own folder.

Rule: each threshold rejects the worst ``percentile`` % of the faces in folders known to hold good
real faces (``det_score``, ``embedding_norm`` and face size are all "higher is better"), never
below a floor (the detector's own threshold, a 24 px face). ``det_score`` is calibrated apart for
faces found directly and for faces found by the padded retry, whose scores follow another scale. The
clearly-good rule (a face of ``good_face_size`` px with a norm of ``good_face_norm`` is kept
whatever its ``det_score``) takes the norm that 90 % of the good faces reach (``GOOD_NORM_PERCENTILE``). Faces found in folders of
non-faces or tiny images are shown beside them, so one sees what each threshold separates.

The face area ratio is reported but only calibrated on request (``area_ratio=True``): in group and
crowd photos a well-resolved face covers 0.03-0.1 % of the image, so a ratio learned on portraits
would reject them. Collections of portraits only may turn it on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Settings
from .filtering import FaceFilter
from .imaging import DraftImage
from .errors import ImageLoadError
from .ingest import iter_image_files

METRICS = ("det_score", "det_score_padded", "embedding_norm", "face_size", "face_area_ratio")
GOOD_NORM_PERCENTILE = 10.0
_FIELDS = {
    "det_score": "min_det_score",
    "det_score_padded": "min_det_score_padded",
    "embedding_norm": "min_embedding_norm",
    "face_size": "min_face_size",
    "face_area_ratio": "min_face_area_ratio",
}


@dataclass
class Calibration:
    """Per-metric samples of the good faces, the proposed thresholds and the settings holding them."""

    samples: dict[str, np.ndarray]
    negatives: dict[str, np.ndarray]
    thresholds: dict[str, float]
    settings: Settings

    def report(self) -> str:
        """Text table: distribution of each metric on good and bad faces, and the chosen threshold."""
        qs = (1, 5, 25, 50, 75, 95)
        lines = [
            f"{'metric':<18}{'set':<10}{'n':>6}  " + "".join(f"{'p' + str(q):>10}" for q in qs) + f"{'threshold':>12}{'kept':>8}"
        ]
        for metric in METRICS:
            thr = self.thresholds[metric]
            for name, data in (("good", self.samples[metric]), ("bad", self.negatives.get(metric, np.array([])))):
                if data.size == 0:
                    lines.append(f"{metric:<18}{name:<10}{0:>6}")
                    continue
                pct = np.percentile(data, qs)
                kept = float(np.mean(data >= thr))
                lines.append(
                    f"{metric:<18}{name:<10}{data.size:>6}  "
                    + "".join(f"{v:>10.4g}" for v in pct)
                    + f"{thr:>12.4g}{kept:>8.1%}"
                )
        return "\n".join(lines)


def collect_face_scores(face_filter: FaceFilter, paths: Iterable[Path]) -> dict[str, list[float]]:
    """Scores of every detected face in ``paths`` (unreadable files are skipped)."""
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    batch: list[np.ndarray | DraftImage] = []

    def flush() -> None:
        for _, result in face_filter.filter_loaded(batch):
            for face in result["faces"]:
                s = face["scores"]
                out["det_score_padded" if result["padded"] else "det_score"].append(s["det_score"])
                out["embedding_norm"].append(s["embedding_norm"])
                out["face_size"].append(min(s["face_size"]))
                out["face_area_ratio"].append(s["face_area_ratio"])
        batch.clear()

    for path in paths:
        try:
            batch.append(face_filter.analyzer.load(path))  # decoded as indexing decodes it
        except ImageLoadError:
            continue
        if len(batch) >= 16:
            flush()
    if batch:
        flush()
    return out


def calibrate(
    face_filter: FaceFilter,
    good_dirs: Sequence[Path],
    bad_dirs: Sequence[Path] = (),
    percentile: float = 1.0,
    area_ratio: bool = False,
) -> Calibration:
    """Propose filter thresholds from folders of good real faces (and show bad folders for contrast)."""
    good = collect_face_scores(face_filter, (p for d in good_dirs for p in iter_image_files(d)))
    bad = collect_face_scores(face_filter, (p for d in bad_dirs for p in iter_image_files(d))) if bad_dirs else {}
    samples = {m: np.asarray(v, np.float64) for m, v in good.items()}
    negatives = {m: np.asarray(v, np.float64) for m, v in bad.items()}
    if samples["embedding_norm"].size == 0:
        raise ValueError("no faces found in the calibration folders")
    floors = {
        "det_score": face_filter.settings.detection.det_thresh,
        "det_score_padded": face_filter.settings.detection.det_thresh,
        "embedding_norm": 0.0,
        "face_size": 24.0,
        "face_area_ratio": 0.0,
    }
    # Without padded faces among the good ones, the padded threshold is the detector's own.
    thresholds = {m: max(floors[m], float(np.percentile(samples[m], percentile)) if samples[m].size else 0.0)
                  for m in METRICS}
    thresholds["face_size"] = float(int(thresholds["face_size"]))
    thresholds["det_score"] = round(thresholds["det_score"], 3)
    thresholds["det_score_padded"] = round(thresholds["det_score_padded"], 3)
    thresholds["embedding_norm"] = round(thresholds["embedding_norm"], 2)
    thresholds["face_area_ratio"] = (
        float(f"{thresholds['face_area_ratio']:.2g}") if area_ratio else face_filter.settings.filter.min_face_area_ratio
    )
    proposed = face_filter.settings.model_copy(deep=True)
    update = {_FIELDS[m]: (int(thresholds[m]) if m == "face_size" else thresholds[m]) for m in METRICS}
    thresholds["good_face_norm"] = update["good_face_norm"] = round(
        float(np.percentile(samples["embedding_norm"], GOOD_NORM_PERCENTILE)), 2
    )
    proposed.filter = proposed.filter.model_copy(update=update)
    return Calibration(samples, negatives, thresholds, proposed)
