"""face_assets: production face recognition on CPU.

Public entry points::

    from face_assets import filter_image, load_settings, FaceFilter
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

__all__ = [
    "ConfigError",
    "FaceFilter",
    "FaceRecognitionError",
    "ImageLoadError",
    "ModelNotFoundError",
    "NoFaceDetectedError",
    "Settings",
    "filter_image",
    "load_settings",
]
__version__ = "0.1.0"
