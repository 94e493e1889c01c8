"""Bulk processing of image files into the catalog: decode, filter, embed, store; resumable.

An image is identified by the sha256 of its bytes, so a rerun over the same files does nothing new,
an interrupted run picks up where it stopped, and a copy of an image under another name is stored
once. A file that cannot be read is recorded as ``unreadable`` with its reason; it never stops the
batch.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ImageLoadError
from .imaging import content_hash
from .schemas import FilterResult, ImageAnalysis
from .store import Catalog

if TYPE_CHECKING:
    from .filtering import FaceFilter

ProgressCallback = Callable[[int, int, str], None]
"""Called after each file as ``on_progress(done, total, path)``."""


@dataclass
class ImageOutcome:
    """What happened to one input file: its id, status and, when stored, its faces."""

    path: str
    image_id: str
    status: str  # "valid", "rejected", "unreadable" or "skipped" (content already in the catalog)
    rejection_reason: str | None = None
    error: str | None = None
    face_ids: list[int] = field(default_factory=list)
    result: FilterResult | None = None
    analysis: ImageAnalysis | None = None


@dataclass
class IngestSummary:
    """What a bulk run did with every file it was given."""

    total: int = 0
    valid: int = 0
    rejected: Counter = field(default_factory=Counter)
    unreadable: int = 0
    skipped: int = 0
    faces: int = 0
    seconds: float = 0.0

    def add(self, outcome: ImageOutcome) -> None:
        """Count one outcome."""
        if outcome.status == "valid":
            self.valid += 1
        elif outcome.status == "rejected":
            self.rejected[outcome.rejection_reason] += 1
        elif outcome.status == "unreadable":
            self.unreadable += 1
        else:
            self.skipped += 1
        self.faces += len(outcome.face_ids)

    def to_dict(self) -> dict:
        """JSON-friendly view, with rejections broken down by reason."""
        return {
            "total": self.total,
            "valid": self.valid,
            "rejected": dict(self.rejected),
            "unreadable": self.unreadable,
            "skipped": self.skipped,
            "faces": self.faces,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.total / self.seconds, 2) if self.seconds else None,
        }


def iter_image_files(root: str | Path, recursive: bool = True) -> list[Path]:
    """Every regular, non-hidden file under ``root`` in a stable order (non-images are reported, not skipped)."""
    root = Path(root)
    if root.is_file():
        return [root]
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(
        p for p in pattern if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def ingest_paths(
    paths: Sequence[str | Path],
    face_filter: FaceFilter,
    catalog: Catalog,
    on_progress: ProgressCallback | None = None,
    on_image: Callable[[ImageOutcome], None] | None = None,
    image_ids: Sequence[str | None] | None = None,
    metadata: Sequence[dict | None] | None = None,
    chunk_size: int = 16,
) -> IngestSummary:
    """Filter and embed ``paths`` into ``catalog``; contents already in the catalog are skipped.

    Images are decoded and analysed ``chunk_size`` at a time so the recognizer runs batched
    across images; each chunk is committed in one transaction, then its images are reported to
    ``on_image`` (an interrupted run redoes at most one chunk).
    ``image_ids`` and ``metadata``, when given, run parallel to ``paths`` (the default id is the
    content hash).
    """
    paths = [Path(p).absolute() for p in paths]  # the catalog must not depend on the working directory
    image_ids = list(image_ids) if image_ids is not None else [None] * len(paths)
    metadata = list(metadata) if metadata is not None else [None] * len(paths)
    summary = IngestSummary(total=len(paths))
    start = time.perf_counter()
    seen: dict[str, str] = {}
    for begin in range(0, len(paths), chunk_size):
        items = list(zip(paths, image_ids, metadata))[begin : begin + chunk_size]
        hashed = [(path, _read(path), given, meta) for path, given, meta in items]
        known = catalog.known_hashes([digest for _, (digest, _), _, _ in hashed], face_filter.analyzer.model_version)
        outcomes: list[ImageOutcome] = []
        todo = []
        for path, (digest, data), given, meta in hashed:
            earlier, done = known.get(digest, (None, False))
            if done or digest in seen:
                outcomes.append(ImageOutcome(str(path), earlier or seen[digest], "skipped"))
                continue
            image_id = earlier or given or digest
            seen[digest] = image_id
            outcome = ImageOutcome(str(path), image_id, "pending")
            outcomes.append(outcome)
            todo.append((outcome, digest, meta, data))
        # decoded together: in the detection threads when there are several
        readable = [data for *_, data in todo if not isinstance(data, ImageLoadError)]
        decoded = iter(face_filter.analyzer.load_many(readable))
        pending = []
        for outcome, digest, meta, data in todo:
            image = data if isinstance(data, ImageLoadError) else next(decoded)
            if isinstance(image, ImageLoadError):
                catalog.record_unreadable(outcome.image_id, digest, outcome.path, image.reason)
                outcome.status, outcome.error = "unreadable", image.reason
                continue
            pending.append((outcome, digest, meta, image))
        results = face_filter.filter_loaded([img for *_, img in pending]) if pending else []
        # One transaction per chunk: a commit checkpoints the file (about 2 MB written whatever the
        # change), so a commit per image wrote 60 times a batch's photos; a crash redoes one chunk.
        with catalog.transaction():
            for (outcome, digest, meta, _), (analysis, result) in zip(pending, results):
                outcome.face_ids = catalog.record_image(
                    outcome.image_id, digest, outcome.path, analysis, result, face_filter.analyzer.model_version, meta
                )
                outcome.status = "valid" if result["is_valid"] else "rejected"
                outcome.rejection_reason = result["rejection_reason"] if not result["is_valid"] else None
                outcome.result, outcome.analysis = result, analysis
        for i, outcome in enumerate(outcomes):
            summary.add(outcome)
            if on_image is not None:
                on_image(outcome)
            if on_progress is not None:
                on_progress(begin + i + 1, summary.total, outcome.path)
    summary.seconds = time.perf_counter() - start
    return summary


def _read(path: Path) -> tuple[str, bytes | ImageLoadError]:
    """Content id and bytes of a file; an unreadable file gets an id from its path and its error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "path:" + hashlib.sha256(str(path).encode()).hexdigest(), ImageLoadError(path, exc.strerror or str(exc))
    return content_hash(data), data

