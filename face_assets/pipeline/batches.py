"""New files in the watched folders, grouped into batches: the dynamic partitions of the graph.

A batch is a list of files, each identified by its path, size and modification time, written once
as ``<pipeline dir>/batches/<key>/manifest.json``. Its key is derived from that list, so planning
the same files twice gives the same key, and a file is new when no manifest lists it with the same
size and time. A file changed in place is therefore planned again (the catalog, keyed by content,
stores the new content beside the old). This module knows nothing of Dagster.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..ingest import iter_image_files

MANIFEST = "manifest.json"


@dataclass(frozen=True, order=True)
class SourceFile:
    """One file as the sensor saw it: absolute path, size in bytes, modification time in ns."""

    path: str
    size: int
    mtime_ns: int


def scan(folders: Iterable[str | os.PathLike], extensions: Sequence[str], recursive: bool = True) -> list[SourceFile]:
    """Every image file under ``folders`` whose name ends with one of ``extensions``, sorted by path.

    A folder that does not exist contributes nothing (a watched share may be unmounted for a while).
    """
    endings = tuple(e.lower() for e in extensions)
    found = []
    for folder in folders:
        if not Path(folder).exists():
            continue
        for path in iter_image_files(folder, recursive=recursive):
            if not path.name.lower().endswith(endings):
                continue
            try:
                st = path.stat()
            except OSError:
                continue  # removed between listing and stat
            found.append(SourceFile(str(path.absolute()), st.st_size, st.st_mtime_ns))
    return sorted(set(found))


def batch_key(files: Sequence[SourceFile]) -> str:
    """Deterministic partition key of a batch: ``b-`` and 16 hex digits of a hash of its files."""
    digest = hashlib.sha256("\n".join(f"{f.path}\t{f.size}\t{f.mtime_ns}" for f in sorted(files)).encode())
    return "b-" + digest.hexdigest()[:16]


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
        return [SourceFile(**f) for f in json.loads(path.read_text(encoding="utf-8"))["files"]]

    def known(self) -> set[SourceFile]:
        """Every file some batch already holds."""
        return {f for key in self.keys() for f in self.files(key)}

    def plan(self, files: Iterable[SourceFile], batch_size: int) -> list[str]:
        """Write manifests for the files no batch holds yet, ``batch_size`` per batch; returns the new keys."""
        new = sorted(set(files) - self.known())
        keys = []
        for start in range(0, len(new), batch_size):
            chunk = new[start : start + batch_size]
            key = batch_key(chunk)
            folder = self.folder(key)
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{MANIFEST}.partial"
            partial.write_text(json.dumps({"files": [asdict(f) for f in chunk]}, indent=1), encoding="utf-8")
            partial.replace(folder / MANIFEST)  # a manifest is complete or absent
            keys.append(key)
        return keys
