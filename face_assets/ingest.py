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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ImageLoadError
from .filtering import FaceFilter
from .imaging import content_hash, load_image
from .store import Catalog

ProgressCallback = Callable[[int, int, str], None]
"""Called after each file as ``on_progress(done, total, path)``."""


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
    paths: Iterable[str | Path],
    face_filter: FaceFilter,
    catalog: Catalog,
    on_progress: ProgressCallback | None = None,
    chunk_size: int = 16,
) -> IngestSummary:
    """Filter and embed ``paths`` into ``catalog``; already-processed contents are skipped.

    Images are decoded and analysed ``chunk_size`` at a time so the recognizer runs batched
    across images; each image is committed on its own.
    """
    paths = [Path(p) for p in paths]
    summary = IngestSummary(total=len(paths))
    start = time.perf_counter()
    seen: set[str] = set()
    done = 0
    for begin in range(0, len(paths), chunk_size):
        chunk = paths[begin : begin + chunk_size]
        pending = []
        hashed = [(p, *_read(p)) for p in chunk]
        known = catalog.known_image_ids([h for _, h, _ in hashed])
        for path, image_id, data in hashed:
            if image_id in known or image_id in seen:
                summary.skipped += 1
                continue
            seen.add(image_id)
            try:
                if isinstance(data, ImageLoadError):
                    raise data
                pending.append((path, image_id, load_image(data, max_pixels=face_filter.settings.images.max_pixels)))
            except ImageLoadError as exc:
                catalog.record_unreadable(image_id, str(path), exc.reason)
                summary.unreadable += 1
        results = face_filter.filter_loaded([img for _, _, img in pending]) if pending else []
        for (path, image_id, _), (analysis, result) in zip(pending, results):
            catalog.record_image(image_id, str(path), analysis, result, face_filter.analyzer.model_version)
            summary.faces += len(analysis.faces)
            if result["is_valid"]:
                summary.valid += 1
            else:
                summary.rejected[result["rejection_reason"]] += 1
        for path in chunk:
            done += 1
            if on_progress is not None:
                on_progress(done, summary.total, str(path))
    summary.seconds = time.perf_counter() - start
    return summary


def _read(path: Path) -> tuple[str, bytes | ImageLoadError]:
    """Content id and bytes of a file; an unreadable file gets an id from its path and its error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return "path:" + hashlib.sha256(str(path).encode()).hexdigest(), ImageLoadError(path, exc.strerror or str(exc))
    return content_hash(data), data

