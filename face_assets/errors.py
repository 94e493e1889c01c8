"""Every exception face_assets raises on purpose derives from :class:`FaceRecognitionError`.

Catch the base class to handle any library failure; catch a subclass to react to one cause.
"""

from __future__ import annotations


class FaceRecognitionError(Exception):
    """Base class of all face_assets errors."""


class ConfigError(FaceRecognitionError, ValueError):
    """A configuration key or value is wrong; the message names the key and what is allowed."""


class ImageLoadError(FaceRecognitionError):
    """An image could not be read or decoded.

    Attributes:
        path: where the image came from (a path, ``"<bytes>"`` or ``"<array>"``).
        reason: a short human-readable cause, e.g. ``"truncated file"``.
    """

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load image {self.path}: {reason}")


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than allowed; refused from its header, before its pixels are decoded."""


class NoFaceDetectedError(FaceRecognitionError):
    """An operation that needs a face (embedding, compare, search) found none in the image."""

    def __init__(self, source: object = None, detail: str = ""):
        self.source = None if source is None else str(source)
        where = f" in {self.source}" if self.source else ""
        super().__init__(f"no face detected{where}{': ' + detail if detail else ''}")


class ModelNotFoundError(FaceRecognitionError):
    """A model pack or model file is missing; the message lists where we looked and what to do."""

    def __init__(self, what: str, searched: list[str] | tuple[str, ...] = (), hint: str = ""):
        self.what = what
        self.searched = [str(p) for p in searched]
        lines = [f"model not found: {what}"]
        if self.searched:
            lines.append("looked in:")
            lines.extend(f"  - {p}" for p in self.searched)
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class EmbeddingError(FaceRecognitionError, ValueError):
    """An embedding given to search has the wrong dimension, is all zeros, or holds NaN/inf."""


class IndexNotFoundError(FaceRecognitionError):
    """No index file where one was expected."""


class IndexCorruptError(FaceRecognitionError):
    """An index file exists but cannot be read back (truncated, garbage, checksum mismatch)."""


class FeedbackError(FaceRecognitionError, ValueError):
    """A vote or a feedback query is invalid (bad vote value, mismatched model version, ...)."""


class UnknownQueryError(FeedbackError, KeyError):
    """A vote names a ``query_id`` the feedback store does not hold."""

    def __init__(self, query_id: object):
        self.query_id = query_id
        super().__init__(f"unknown query_id {query_id!r}: run a search first")

    def __str__(self) -> str:
        return self.args[0]


class UnknownFaceError(FeedbackError, KeyError):
    """A face id that the catalog does not hold (never indexed, or removed)."""

    def __init__(self, face_id: object):
        self.face_id = face_id
        super().__init__(f"unknown face id {face_id!r}: not in the catalog")

    def __str__(self) -> str:
        return self.args[0]


class NotAResultError(FeedbackError):
    """A vote names a face that the query's search did not return."""

    def __init__(self, query_id: object, face_id: object):
        self.query_id, self.face_id = query_id, face_id
        super().__init__(f"face {face_id!r} is not among the results of query {query_id!r}")


class FeedbackStoreUnavailableError(FaceRecognitionError):
    """The feedback store's database cannot be reached (PostgreSQL down, wrong DSN)."""


class StoreBusyError(FaceRecognitionError, TimeoutError):
    """Another process held a store file longer than ``storage.lock_timeout_seconds``."""

    def __init__(self, path, timeout: float):
        self.path = str(path)
        self.timeout = timeout
        super().__init__(f"{path} stayed locked by another process for {timeout:g} s; try again later "
                         "or raise storage.lock_timeout_seconds")


class MigrationRequiredError(FaceRecognitionError):
    """A store of the data folder (or the PostgreSQL feedback database) was written by an older release;
    ``face-assets migrate`` upgrades it in place, once, keeping every row."""

    def __init__(self, where, missing: list[str]):
        self.where = str(where)
        self.missing = list(missing)
        super().__init__(f"{where} is in the layout of an older release ({'; '.join(self.missing)}); "
                         "run `face-assets migrate` to upgrade the data folder in place (once, keeping every row)")


class TrainingError(FaceRecognitionError):
    """Fine-tuning cannot proceed or produced a model that fails its checks (conversion, export, data)."""


class ModelVersionError(FaceRecognitionError, ValueError):
    """A model version is unknown, or its status forbids the requested promotion or rollback."""


class ClusterNotFoundError(FaceRecognitionError, KeyError):
    """No person cluster with this id."""

    def __init__(self, cluster_id: object):
        self.cluster_id = cluster_id
        super().__init__(f"no cluster {cluster_id}")

    def __str__(self) -> str:
        return str(self.args[0])


class CurationError(FaceRecognitionError, ValueError):
    """A merge, split or move request that cannot be done (unknown face, empty side, too few faces)."""


class InvalidNameError(CurationError):
    """A person's name that cannot be stored: control or bidirectional-override characters, or too long."""


class FaceImportError(FaceRecognitionError, ValueError):
    """A file of precomputed faces cannot be imported (missing or mistyped column, wrong embedding
    dimension, duplicate face, inconsistent image); nothing of it was imported."""
