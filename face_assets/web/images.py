"""Images of the web app: query uploads brought within the pixel budget, and face thumbnails cached on disk.

An upload's pixel count is read from its header first: beyond ``web.max_decode_pixels`` it is
refused undecoded; beyond ``web.max_query_pixels`` it is decoded (JPEG at a reduced DCT scale) and
downscaled before detection, so a search's memory is bounded by the decode budget, not by the file.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError, ImageTooLargeError, UnknownFaceError
from ..imaging import _open_formats, load_image
from ..library import FaceRecognitionLibrary
from ..process import lower_thread_priority

_UPLOAD = "<upload>"
logger = logging.getLogger(__name__)


def prepare_query_image(data: bytes, max_pixels: int, max_decode_pixels: int) -> bytes:
    """``data`` itself when within ``max_pixels``, else a JPEG downscaled to about ``max_pixels``.

    Raises:
        ImageTooLargeError: the header announces more than ``max_decode_pixels`` pixels.
        ImageLoadError: not an image of an allowed raster format, or truncated.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_open_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError(_UPLOAD, f"more than {max_decode_pixels} pixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageLoadError(_UPLOAD, "not a supported image file") from None
    with img:
        w, h = img.size
        if w * h > max_decode_pixels:
            raise ImageTooLargeError(_UPLOAD, f"{w}x{h} is more than {max_decode_pixels} pixels")
        if w * h <= max_pixels:
            return data
        scale = (max_pixels / (w * h)) ** 0.5
        target = (max(1, int(w * scale)), max(1, int(h * scale)))
        try:
            img.draft("RGB", target)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, a fraction of the memory
            if img.mode in ("P", "1", "I", "F", "I;16"):
                img = img.convert("RGBA")  # these modes resize poorly (nearest neighbour) or not at all
            side = max(target)  # a square box: the EXIF rotation, applied after, may swap width and height
            img.thumbnail((side, side), Image.Resampling.LANCZOS)  # in place: one full decode, then small copies
            small = ImageOps.exif_transpose(img)
            if small.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
                flat = Image.new("RGB", small.size, "white")  # transparency on white, as load_image does
                flat.paste(small.convert("RGBA"), mask=small.convert("RGBA").getchannel("A"))
                small = flat
            small = small.convert("RGB")
        except (OSError, ValueError, SyntaxError):
            raise ImageLoadError(_UPLOAD, "truncated or corrupt image") from None
        out = io.BytesIO()
        small.save(out, "JPEG", quality=92)
        return out.getvalue()


def encode_jpeg(img: np.ndarray, size: int, label: str) -> bytes:
    """JPEG of a BGR image, longest side at most ``size`` pixels."""
    scale = size / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise ImageLoadError(label, "cannot encode JPEG")
    return buf.tobytes()


def face_thumbnail(library: FaceRecognitionLibrary, face_id: int, size: int) -> bytes:
    """JPEG crop of one catalog face with some margin, longest side ``size`` pixels.

    Raises:
        UnknownFaceError: the catalog holds no such face.
        ImageLoadError: its image file is gone or unreadable.
    """
    face = library.catalog.faces_by_id([face_id]).get(face_id)
    if face is None:
        raise UnknownFaceError(face_id)
    img = load_image(face["path"], max_pixels=library.settings.images.max_pixels)
    x1, y1, x2, y2 = face["bbox"]
    mx, my = 0.25 * (x2 - x1), 0.25 * (y2 - y1)
    h, w = img.shape[:2]
    crop = img[max(0, int(y1 - my)):min(h, int(y2 + my)), max(0, int(x1 - mx)):min(w, int(x2 + mx))]
    return encode_jpeg(crop if crop.size else img, size, face["path"])


class ThumbnailCache:
    """Face thumbnails kept as ``<folder>/<size>/<face_id>.jpg``, made on first request.

    Face ids are never reused by the catalog, so a cached file stays right for its id.
    """

    def __init__(self, library: FaceRecognitionLibrary, folder: Path, size: int):
        self.library = library
        self.folder = folder / str(size)
        self.size = size

    def get(self, face_id: int) -> bytes:
        """The JPEG of ``face_id``, from the cache or made now and cached (see :func:`face_thumbnail`)."""
        path = self.folder / f"{face_id}.jpg"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        jpeg = face_thumbnail(self.library, face_id, self.size)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{id(jpeg)}.tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, path)
        return jpeg

    def prewarm(self, stop: threading.Event) -> int:
        """Make the missing thumbnails: person covers first, then every valid face; returns how many were made.

        Runs on a background thread at the lowest CPU priority and returns early when ``stop`` is set.
        """
        lower_thread_priority(19)
        covers = [c.representative_face_id for c in self.library.list_clusters() if c.representative_face_id]
        faces = self.library.catalog.valid_face_ids(self.library.model_version).tolist()
        made = 0
        for face_id in dict.fromkeys(covers + faces):
            if stop.is_set():
                break
            if (self.folder / f"{face_id}.jpg").exists():
                continue
            try:
                self.get(face_id)
                made += 1
            except (ImageLoadError, UnknownFaceError) as exc:  # a moved or removed photo: shown as 404 later
                logger.info("no thumbnail for face %s: %s", face_id, exc)
        logger.info("thumbnails: %d made ahead", made)
        return made
