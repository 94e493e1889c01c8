"""``filter_image``: is this image usable for face recognition, and if not, why (spec 1.1 to 1.3).

Every face of an image gets its own verdict from its scores:

1. ``cartoon`` when the cartoon classifier's probability reaches its threshold, for faces of at
   least ``CARTOON_MIN_SIDE`` pixels (below that the aligned crop is mostly interpolation and
   style cannot be judged);
2. ``low_quality`` (:func:`is_low_quality`) when the face is smaller than ``min_face_size`` or
   ``min_face_area_ratio``, or its ``embedding_norm`` is under ``min_embedding_norm``, or its
   ``det_score`` is under its threshold (``min_det_score_padded`` for faces found by the padded
   retry) while the face is not clearly good: a face of ``good_face_size`` px or more whose
   embedding norm reaches ``good_face_norm`` is kept on its other signals.

The image is valid when at least one face is. The deciding face, whose scores are reported at the
top level, is the valid face of highest ``quality`` or, when none is valid, the largest face. An
image without any face is ``no_face``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from .analysis import STYLE_MIN_SIDE, FaceAnalyzer
from .cartoon import CartoonClassifier, backbone_for
from .config import FilterSettings, Settings, load_settings
from .imaging import DraftImage
from .schemas import DetectedFace, FaceVerdict, FilterResult, ImageAnalysis, RejectionReason

# Norm and size at which a face counts as fully good in the combined quality score: the upper
# range of real-face norms on the shared data, and the recognizer's own 112 px input.
NORM_REF = 25.0
SIZE_REF = 112.0
CARTOON_MIN_SIDE = STYLE_MIN_SIDE


def quality_score(det_score: float, embedding_norm: float, face_size: Sequence[int]) -> float:
    """One sortable number in [0, 1]: geometric mean of confidence, norm and size sub-scores."""
    parts = (
        min(max(det_score, 0.0), 1.0),
        min(max(embedding_norm / NORM_REF, 0.0), 1.0),
        min(max(min(face_size) / SIZE_REF, 0.0), 1.0),
    )
    return float(np.prod(parts) ** (1.0 / 3.0))


def is_low_quality(cfg: FilterSettings, det_score: float, embedding_norm: float, face_size: Sequence[int],
                   area_ratio: float, padded: bool) -> bool:
    """The quality decision of one face from its detector score, embedding norm, size and area ratio.

    Size and norm are hard limits: below them a face is too small or too ambiguous to recognize.
    ``det_score`` only decides for faces that are not clearly good: SCRFD scores a clean frontal
    face low when it fills the frame or sits in the border of the padded retry, and the
    recognizer's norm says more about such a face than the detector's confidence.
    """
    if min(face_size) < cfg.min_face_size or area_ratio < cfg.min_face_area_ratio:
        return True
    if embedding_norm < cfg.min_embedding_norm:
        return True
    clearly_good = embedding_norm >= cfg.good_face_norm and min(face_size) >= cfg.good_face_size
    return det_score < (cfg.min_det_score_padded if padded else cfg.min_det_score) and not clearly_good


class FaceFilter:
    """Detect, embed and judge faces; one instance holds the models, reuse it for many images."""

    def __init__(
        self,
        settings: Settings | None = None,
        classifier: CartoonClassifier | None = None,
        analyzer: FaceAnalyzer | None = None,
    ):
        self.settings = settings or load_settings()
        check = self.settings.filter.check_cartoon
        self.classifier = (classifier or CartoonClassifier.read()) if check else None
        self.analyzer = analyzer or FaceAnalyzer(
            self.settings,
            taps=self.classifier.taps if self.classifier else (),
            texture_model=self.classifier.recognizer_sha256 if self.classifier else None,
            backbone=backbone_for(self.classifier, self.settings.models) if self.classifier else None,
        )

    @property
    def cartoon_threshold(self) -> float | None:
        """Probability above which a face is a cartoon: from config, else the classifier's own."""
        if self.classifier is None:
            return None
        configured = self.settings.filter.cartoon_threshold
        return self.classifier.threshold if configured is None else configured

    def filter(self, image: Any) -> FilterResult:
        """Verdict for one image given as a path, encoded bytes or a BGR array.

        Raises:
            ImageLoadError: the image cannot be read.
        """
        return self.judge(self.analyzer.analyze(image))

    def filter_loaded(self, images: Sequence[np.ndarray | DraftImage]) -> list[tuple[ImageAnalysis, FilterResult]]:
        """Analyses and verdicts for decoded images (BGR arrays, or what ``analyzer.load`` gives), recognizer
        batched across them."""
        analyses = self.analyzer.analyze_loaded(images)
        return [(a, self.judge(a)) for a in analyses]

    def judge(self, analysis: ImageAnalysis) -> FilterResult:
        """Turn an analysis into the ``filter_image`` result."""
        probabilities = self._cartoon_probabilities(analysis.faces)
        verdicts = [self._face_verdict(analysis, f, p) for f, p in zip(analysis.faces, probabilities)]
        base = {"num_faces": len(verdicts), "image_size": [analysis.width, analysis.height], "padded": analysis.padded}
        if not verdicts:
            scores = {"det_score": 0.0, "embedding_norm": 0.0, "face_size": [0, 0], "is_cartoon": False}
            return {"is_valid": False, "rejection_reason": "no_face", "scores": scores, "faces": [],
                    "face_index": None, **base}
        valid = [i for i, v in enumerate(verdicts) if v["is_valid"]]
        index = max(valid, key=lambda i: verdicts[i]["scores"]["quality"]) if valid else 0
        chosen = verdicts[index]
        return {
            "is_valid": bool(valid),
            "rejection_reason": chosen["rejection_reason"],
            "scores": dict(chosen["scores"]),
            "faces": verdicts,
            "face_index": index,
            **base,
        }

    def _cartoon_probabilities(self, faces: Sequence[DetectedFace]) -> list[float]:
        """The classifier's probability for each face it can judge (one ``predict`` for the image), 0 for the
        others: no classifier, no texture statistics, under ``CARTOON_MIN_SIDE`` px or without the style
        features its backbone needs."""
        clf = self.classifier
        if clf is None:
            return [0.0] * len(faces)
        judged = [i for i, face in enumerate(faces)
                  if face.texture is not None and min(face.face_size) >= CARTOON_MIN_SIDE
                  and (clf.backbone_sha256 is None or face.style is not None)]
        probabilities = [0.0] * len(faces)
        for i, p in zip(judged, clf.predict([faces[i] for i in judged])):
            probabilities[i] = float(p)
        return probabilities

    def _face_verdict(self, analysis: ImageAnalysis, face: DetectedFace, prob: float) -> FaceVerdict:
        cfg: FilterSettings = self.settings.filter
        size = face.face_size
        norm = face.embedding_norm or 0.0
        ratio = analysis.area_ratio(face)
        threshold = self.cartoon_threshold
        is_cartoon = threshold is not None and prob >= threshold
        reason: RejectionReason | None = None
        if is_cartoon:
            reason = "cartoon"
        elif is_low_quality(cfg, face.det_score, norm, size, ratio, analysis.padded):
            reason = "low_quality"
        return {
            "bbox": [round(float(v), 2) for v in face.bbox[:4]],
            "is_valid": reason is None,
            "rejection_reason": reason,
            "scores": {
                "det_score": round(face.det_score, 4),
                "embedding_norm": round(norm, 4),
                "face_size": list(size),
                "face_area_ratio": round(ratio, 6),
                "is_cartoon": bool(is_cartoon),
                "cartoon_probability": round(prob, 4),
                "quality": round(quality_score(face.det_score, norm, size), 4),
            },
        }


_default_lock = threading.Lock()


@lru_cache(maxsize=4)
def _default_filter(config_path: str | None) -> FaceFilter:
    return FaceFilter(load_settings(config_path))


def filter_image(image: Any, config_path: str | None = None) -> FilterResult:
    """Judge one image: ``{"is_valid", "rejection_reason", "scores", ...}`` (spec 1.3).

    ``image`` is a path, encoded bytes or a BGR numpy array. Models load once per ``config_path``
    and are reused by later calls. ``scores`` holds ``det_score``, ``embedding_norm``,
    ``face_size`` ``[w, h]``, ``is_cartoon``, ``face_area_ratio``, ``cartoon_probability`` and
    ``quality`` of the deciding face; ``faces`` lists every face with its own verdict, and
    ``face_index`` says which one decided.

    Raises:
        ImageLoadError: unreadable input.
    """
    with _default_lock:
        face_filter = _default_filter(None if config_path is None else str(config_path))
    return face_filter.filter(image)


__all__ = ["FaceFilter", "filter_image", "is_low_quality", "quality_score"]
