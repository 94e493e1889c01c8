"""face_assets: production face recognition on CPU.

Public entry points::

    from face_assets import FaceRecognitionLibrary, filter_image

    with FaceRecognitionLibrary(index_dir="data") as lib:
        lib.index_directory("photos/")
        matches = lib.search("query.jpg", top_k=10)
"""

from .config import Settings, load_settings
from .errors import (
    ConfigError,
    FaceRecognitionError,
    ImageLoadError,
    ModelNotFoundError,
    NoFaceDetectedError,
)
from .filtering import FaceFilter, filter_image
from .library import FaceRecognitionLibrary

__all__ = [
    "ConfigError",
    "FaceFilter",
    "FaceRecognitionLibrary",
    "FaceRecognitionError",
    "ImageLoadError",
    "ModelNotFoundError",
    "NoFaceDetectedError",
    "Settings",
    "filter_image",
    "load_settings",
]
__version__ = "0.1.0"
