"""face_assets: production face recognition on CPU.

Public entry points::

    from face_assets import FaceRecognitionLibrary, filter_image

    with FaceRecognitionLibrary(index_dir="data") as lib:
        lib.index_directory("photos/")
        matches = lib.search("query.jpg", top_k=10)   # each with its person's cluster_id
        lib.cluster()                                   # persons; then lib.assign_new() as faces arrive

Every error the library raises is a :class:`FaceRecognitionError`; the subclasses are exported here.
"""

from .config import Settings, load_settings
from .errors import (
    ClusterNotFoundError,
    ConfigError,
    CurationError,
    EmbeddingError,
    FaceImportError,
    FaceRecognitionError,
    FeedbackError,
    ImageLoadError,
    IndexCorruptError,
    IndexNotFoundError,
    ModelNotFoundError,
    ModelVersionError,
    NoFaceDetectedError,
    NotAResultError,
    StoreBusyError,
    TrainingError,
    UnknownFaceError,
    UnknownQueryError,
)


def __getattr__(name: str):
    """``FaceRecognitionLibrary``, ``FaceFilter`` and ``filter_image`` on first use: importing the
    package (what every submodule and the CLI do) then costs the configuration and the errors only,
    not the stores, the index and the models' runtime, which a short command such as ``stats`` may
    not need."""
    if name == "FaceRecognitionLibrary":
        from .library import FaceRecognitionLibrary

        return FaceRecognitionLibrary
    if name in ("FaceFilter", "filter_image"):
        from . import filtering

        return getattr(filtering, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ClusterNotFoundError",
    "ConfigError",
    "CurationError",
    "EmbeddingError",
    "FaceFilter",
    "FaceImportError",
    "FaceRecognitionError",
    "FaceRecognitionLibrary",
    "FeedbackError",
    "ImageLoadError",
    "IndexCorruptError",
    "IndexNotFoundError",
    "ModelNotFoundError",
    "ModelVersionError",
    "NoFaceDetectedError",
    "NotAResultError",
    "StoreBusyError",
    "Settings",
    "TrainingError",
    "UnknownFaceError",
    "UnknownQueryError",
    "filter_image",
    "load_settings",
]
__version__ = "0.1.0"
