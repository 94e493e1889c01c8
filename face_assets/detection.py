"""Finding faces: insightface's SCRFD at the image's own scale (up to det_size), with a padded retry for tight crops."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .config import DetectionSettings, ModelSettings
from .models import OnnxModel, providers_for
from .schemas import DetectedFace, Detection

if TYPE_CHECKING:
    import onnxruntime as ort


class FaceDetector(OnnxModel[np.ndarray, list[Detection]]):
    """Detects faces in BGR images, one image per session run; when none is found, pads the image and
    tries again.

    SCRFD is trained on scenes: a crop where the face fills the frame is scaled up until the face is
    larger than anything it learned, and it finds nothing (1 of 400 IMFDB crops at 640). A border of
    ``pad_ratio`` times the image on each side brings the face back to a familiar scale.

    Args:
        model_path: the pack's SCRFD file.
        models: the ``models`` settings (providers, threads).
        settings: the ``detection`` settings (sizes, thresholds, retry, faces kept).
        intra_op_threads: overrides ``models.intra_op_threads`` (a detection thread's share of the cores).
    """

    def __init__(self, model_path: Path, models: ModelSettings, settings: DetectionSettings,
                 intra_op_threads: int | None = None):
        super().__init__(model_path, models, batch_size=1, intra_op_threads=intra_op_threads)
        self.settings = settings
        self._scrfd = None

    def _load(self) -> ort.InferenceSession:
        from insightface.model_zoo.scrfd import SCRFD

        session = self._new_session()
        self._check_role(session, "detector", "an SCRFD detector")
        scrfd = SCRFD(model_file=str(self.model_path), session=session)
        s = self.settings
        gpu = providers_for(self.models)[0].startswith("CUDA")
        scrfd.prepare(0 if gpu else -1, input_size=(s.det_size, s.det_size), det_thresh=s.det_thresh,
                      nms_thresh=s.nms_thresh)
        self._scrfd = scrfd
        return scrfd.session

    def _predict(self, batch: list[np.ndarray]) -> list[Detection]:
        return [self._detect_padded(img) for img in batch]

    def _join(self, parts: list[list[Detection]]) -> list[Detection]:
        return [found for part in parts for found in part]

    def _detect_padded(self, img: np.ndarray) -> Detection:
        """The faces of one image, largest first, and whether the padded retry found them."""
        faces = self._detect(img)
        padded = False
        if not faces and self.settings.pad_ratio > 0:
            h, w = img.shape[:2]
            pad = int(round(max(h, w) * self.settings.pad_ratio))
            big = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
            faces = self._detect(big, offset=pad)
            padded = bool(faces)
        faces.sort(key=lambda f: -(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        if self.settings.max_faces:
            faces = faces[: self.settings.max_faces]
        return Detection(faces, padded)

    def input_side(self, img: np.ndarray) -> int:
        """Side of the square detector input for ``img``: ``det_size``, or with ``native_scale`` the image's
        own longer side rounded up to a multiple of 32 (SCRFD's strides need it) when that is smaller,
        but at least ``native_min_size``.

        Enlarging a 400 px photo to 640 costs 2.6x the detection for faces the native size finds
        too. Tiny images are the exception: SCRFD misses many faces of 60 px tiles at 64 but finds
        at 320 those it finds at 640. A tight crop near its own scale is also found more often
        without the padded retry, since the face is then within SCRFD's anchors.
        """
        s = self.settings
        if not s.native_scale:
            return s.det_size
        return min(s.det_size, max(s.native_min_size, -(-max(img.shape[:2]) // 32) * 32))

    def _detect(self, img: np.ndarray, offset: int = 0) -> list[DetectedFace]:
        side = self.input_side(img)
        dets, kpss = self._scrfd.detect(img, input_size=(side, side))
        return [
            DetectedFace(
                bbox=(dets[i, :4] - offset).astype(np.float32),
                kps=(kpss[i] - offset).astype(np.float32),
                det_score=float(dets[i, 4]),
            )
            for i in range(dets.shape[0])
        ]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (0 when either is empty)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
