"""New files in the watched folders, grouped into batches: the dynamic partitions of the graph.

A file is identified by its content: the sha256 of its bytes, the key the catalog stores images
by. A batch is a list of files written once as ``<pipeline dir>/batches/<key>/manifest.json``; its
key is derived from the contents it lists, so planning the same contents twice gives the same key,
and a file is new when no manifest lists its content. Touching a file, copying it again or copying
it under another name therefore plans nothing; a file changed in place has new content and is
planned again. A file is read only once it has settled: no write or metadata change for
``settle_seconds``, so a file still being copied is left for a later scan. Hashes are kept in a
cache keyed by path, size and modification time, so a scan reads only files it has not seen so.
This module knows nothing of Dagster.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ImageLoadError
from ..imaging import content_hash
from ..ingest import iter_image_files

MANIFEST = "manifest.json"
HASH_CACHE = "file_hashes.json"
"""In the batches folder: path -> [size, mtime_ns, sha256] of every settled file of the last scan."""


@dataclass(frozen=True, order=True)
class SourceFile:
    """One file as the sensor saw it: absolute path, size in bytes, modification time in ns, content hash."""

    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class Scan:
    """What a scan found: the settled files, sorted by path, and the paths of the files still settling."""

    files: list[SourceFile]
    settling: list[str]


def scan(folders: Iterable[str | os.PathLike], extensions: Sequence[str], recursive: bool = True,
         settle_seconds: float = 0.0, hashes: Mapping[str, tuple[int, int, str]] | None = None,
         now: float | None = None) -> Scan:
    """Every settled image file under ``folders`` whose name ends with one of ``extensions``.

    A file has settled when neither its content nor its metadata changed for ``settle_seconds``
    (its modification and status-change times are that old): a copy in progress, even one that
    restores an old modification time at the end, is left out until then. ``hashes`` (path ->
    size, mtime_ns, sha256 of an earlier scan) saves reading files that did not change. A folder
    that does not exist contributes nothing (a watched share may be unmounted for a while).
    """
    endings = tuple(e.lower() for e in extensions)
    hashes = hashes or {}
    now = time.time() if now is None else now
    found, settling = [], []
    for folder in folders:
        if not Path(folder).exists():
            continue
        for path in iter_image_files(folder, recursive=recursive):
            if not path.name.lower().endswith(endings):
                continue
            name = str(path.absolute())
            try:
                st = path.stat()
                if now - max(st.st_mtime, st.st_ctime) < settle_seconds:
                    settling.append(name)  # still being written (or just touched): a later scan looks again
                    continue
                size, mtime_ns, digest = hashes.get(name, (None, None, None))
                if (size, mtime_ns) != (st.st_size, st.st_mtime_ns):
                    digest = content_hash(path)
            except (OSError, ImageLoadError):
                continue  # removed or unreadable between listing and reading
            found.append(SourceFile(name, st.st_size, st.st_mtime_ns, digest))
    return Scan(sorted(set(found)), sorted(settling))


def batch_key(files: Sequence[SourceFile]) -> str:
    """Deterministic partition key of a batch: ``b-`` and 16 hex digits of a hash of its contents."""
    digest = hashlib.sha256("\n".join(sorted(f.sha256 for f in files)).encode())
    return "b-" + digest.hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)  # complete or absent, never half written


class BatchStore:
    """The manifests of all batches planned so far, one folder per batch under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        """Folder of one batch: its manifest and the files its assets write."""
        return self.root / key

    def keys(self) -> list[str]:
        """Keys of every planned batch, oldest first."""
        if not self.root.is_dir():
            return []
        manifests = [p for p in self.root.glob(f"*/{MANIFEST}")]
        return [p.parent.name for p in sorted(manifests, key=lambda p: (p.stat().st_mtime_ns, p.parent.name))]

    def files(self, key: str) -> list[SourceFile]:
        """The files of batch ``key``.

        Raises:
            KeyError: no batch has this key.
        """
        path = self.folder(key) / MANIFEST
        if not path.is_file():
            raise KeyError(f"no batch {key!r} under {self.root}")
        # A manifest written before files were identified by content has no hash: its files count as unknown.
        return [SourceFile(**{"sha256": "", **f}) for f in json.loads(path.read_text(encoding="utf-8"))["files"]]

    def known(self) -> set[str]:
        """Content hashes of every file some batch already holds."""
        return {f.sha256 for key in self.keys() for f in self.files(key)}

    def hashes(self) -> dict[str, tuple[int, int, str]]:
        """The hash cache of the last scan: path -> (size, mtime_ns, sha256); empty when there is none."""
        try:
            return {p: tuple(v) for p, v in json.loads((self.root / HASH_CACHE).read_text(encoding="utf-8")).items()}
        except (OSError, ValueError):
            return {}

    def scan(self, folders: Iterable[str | os.PathLike], extensions: Sequence[str], recursive: bool = True,
             settle_seconds: float = 0.0) -> Scan:
        """:func:`scan` with this store's hash cache, which is then replaced by what this scan saw.

        The cache is rewritten only when it changed: a scan that finds nothing new writes nothing.
        """
        cached = self.hashes()
        found = scan(folders, extensions, recursive, settle_seconds, cached)
        seen = {f.path: (f.size, f.mtime_ns, f.sha256) for f in found.files}
        if seen != cached:
            self.root.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.root / HASH_CACHE, json.dumps(seen))
        return found

    def plan(self, files: Iterable[SourceFile], batch_size: int) -> list[str]:
        """Write manifests for the contents no batch holds yet, ``batch_size`` per batch; returns the new keys.

        Of several files with the same content only the first by path is planned.
        """
        known, new = self.known(), {}
        for f in sorted(files):
            if f.sha256 not in known:
                new.setdefault(f.sha256, f)
        chunks = sorted(new.values())
        keys = []
        for start in range(0, len(chunks), batch_size):
            chunk = chunks[start : start + batch_size]
            key = batch_key(chunk)
            folder = self.folder(key)
            folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(folder / MANIFEST, json.dumps({"files": [asdict(f) for f in chunk]}, indent=1))
            keys.append(key)
        return keys
