"""Load images from paths, encoded bytes or numpy arrays as OpenCV-style BGR ``uint8`` arrays.

InsightFace models expect ``HxWx3`` BGR ``uint8`` input, so every source is normalised to exactly that.
Every failure surfaces as :class:`~face_assets.errors.ImageLoadError`, so callers that walk large
folders or take untrusted uploads can skip bad images with a single ``except`` clause.
"""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageLoadError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray

DEFAULT_MAX_PIXELS = 64_000_000

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})

# Raster formats only: Pillow's EPS/PS plugins hand untrusted bytes to Ghostscript when installed.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "PPM", "ICO", "TGA", "JPEG2000", "AVIF")


def _open_formats() -> list[str]:
    Image.init()  # plugins register lazily; ask only for those this Pillow build has
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Return ``source`` as a new C-contiguous BGR ``uint8`` array of shape ``HxWx3``.

    Args:
        source: a file path, the bytes of an encoded image file, or a numpy array in OpenCV
            convention: ``HxW`` / ``HxWx1`` grayscale, ``HxWx3`` BGR or ``HxWx4`` BGRA, of dtype
            ``uint8``, ``uint16`` (reduced to the top 8 bits), ``bool``, or float with values in [0, 1].
        max_pixels: encoded images with more pixels (width * height) are refused before their
            pixels are decoded, as protection against decompression bombs. Pillow's own hard limit
            (twice ``PIL.Image.MAX_IMAGE_PIXELS``) also applies.

    Encoded files are decoded with Pillow, which detects the format from the content (the file
    extension is ignored). The EXIF orientation is applied, only the first frame of animated or
    multi-page files is read, and transparent areas are composited onto white.

    Raises:
        ImageLoadError: the source cannot be read or decoded; ``.path`` is the file path,
            ``"<bytes>"`` or ``"<array>"`` and ``.reason`` says why.
        TypeError: ``source`` is none of the accepted types.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, "<array>")
    label, data = _read(source)
    return _decode(data, label, max_pixels)


class DraftImage:
    """A JPEG decoded at a reduced scale for detection, which decodes itself in full on demand.

    libjpeg scales by 1/2, 1/4 or 1/8 while it decodes (``Image.draft``), several times faster than a
    full decode: detection at ``det_size`` needs no more pixels, and a face that stays larger than the
    recognizer's input in the reduced image loses nothing its aligned crop could hold. Faces smaller
    than that are cut from :meth:`full`, decoded once from the same bytes.

    Attributes:
        pixels: the reduced BGR ``uint8`` image.
        scale: its size over the full image's (1/2, 1/4 or 1/8).
        width, height: the full image's size, after its EXIF orientation.
    """

    def __init__(self, pixels: np.ndarray, scale: float, size: tuple[int, int], data: bytes, label: str,
                 max_pixels: int):
        self.pixels, self.scale = pixels, scale
        self.width, self.height = size
        self._data, self._label, self._max_pixels = data, label, max_pixels

    def full(self) -> np.ndarray:
        """The image decoded at full size, as :func:`load_image` gives it."""
        return _decode(self._data, self._label, self._max_pixels)


def load_draft(source: ImageSource, *, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | DraftImage:
    """Like :func:`load_image`, but a JPEG whose longer side is at least twice ``min_side`` comes back as a
    :class:`DraftImage`, decoded at the smallest of libjpeg's scales that keeps its longer side at least
    ``min_side`` (the detector's input side); anything else comes back as :func:`load_image` gives it.

    Raises:
        ImageLoadError, TypeError: as :func:`load_image`.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, "<array>")
    label, data = _read(source)
    return _decode(data, label, max_pixels, min_side)


def content_hash(source: ImageSource) -> str:
    """Return the sha256 hex digest identifying ``source``, for de-duplication.

    Paths and bytes hash the encoded file bytes, so a file and its bytes agree. Arrays hash their
    dtype, shape and pixel bytes; they never match the hash of an encoded file.

    Raises:
        ImageLoadError: a path cannot be read.
        TypeError: ``source`` is none of the accepted types.
    """
    if isinstance(source, np.ndarray):
        # The same bytes under another shape or dtype are a different image.
        digest = hashlib.sha256(f"{source.dtype.str}{source.shape}".encode())
        digest.update(np.ascontiguousarray(source))
        return digest.hexdigest()
    return hashlib.sha256(_read(source)[1]).hexdigest()


def _read(source: ImageSource) -> tuple[str, bytes]:
    """Return ``(label for messages, encoded bytes)`` of a path or bytes-like source."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>", bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        kind = type(source).__name__
        raise TypeError(f"image source must be a path, bytes or numpy array, not {kind}")
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            return path, fh.read()
    except FileNotFoundError as exc:
        raise ImageLoadError(path, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(path, "is a directory") from exc
    except PermissionError as exc:
        # Windows reports opening a directory as a permission error.
        reason = "is a directory" if os.path.isdir(path) else "permission denied"
        raise ImageLoadError(path, reason) from exc
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file: {exc.strerror or exc}") from exc


def _decode(data: bytes, label: str, max_pixels: int, draft_side: int | None = None) -> np.ndarray | DraftImage:
    if not data:
        raise ImageLoadError(label, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=_open_formats()) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    label,
                    f"image is {width}x{height} = {width * height} pixels, above the limit of"
                    f" {max_pixels} (possible decompression bomb)",
                )
            scale = 1.0
            if draft_side and img.format == "JPEG" and max(width, height) >= 2 * draft_side:
                wanted = max(width, height) / draft_side  # libjpeg picks the largest scale that keeps this side
                img.draft(img.mode, (max(1, int(width / wanted)), max(1, int(height / wanted))))
                scale = 1 / round(width / img.size[0])  # a block of 2, 4 or 8 pixels became one
            # Pixels are decoded only here: after the size check, and inside the try so that
            # truncated or corrupt data becomes ImageLoadError.
            img.load()
            decoded = img.size
            # In place: for the many images without an orientation tag, exif_transpose would return a
            # copy of every pixel for nothing (a tenth of the decoding time of a large JPEG).
            ImageOps.exif_transpose(img, in_place=True)
            pixels = _pil_to_array(img)
            if scale < 1:
                full = (width, height) if img.size == decoded else (height, width)  # turned by its EXIF
                return DraftImage(_from_array(pixels, label, copy=False), scale, full, data, label, max_pixels)
    except ImageLoadError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageLoadError(label, "not a recognised or supported image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning arrives as an exception only when the application runs with warnings as errors.
        raise ImageLoadError(label, f"refused by Pillow: {exc}") from exc
    except Exception as exc:
        # Decoders fed untrusted bytes raise many types: OSError, SyntaxError, struct.error, EOFError...
        raise ImageLoadError(label, f"truncated or corrupt image data: {exc}") from exc
    return _from_array(pixels, label, copy=False)


def _pil_to_array(img: Image.Image) -> np.ndarray:
    """Return the pixels of a decoded image as an array in the convention :func:`_from_array` takes."""
    if img.mode == "La":
        # Pillow converts premultiplied grey+alpha (associated-alpha TIFF) to nothing but LA.
        img = img.convert("LA")
    if img.mode.startswith("I;16") or img.mode == "F":
        return np.asarray(img)
    if img.mode == "I":
        values = np.asarray(img)
        # Pillow stores 16-bit PGM/PPM and the like as 32-bit "I": use 16-bit scale when values fit.
        if values.min() >= 0 and values.max() <= 0xFFFF:
            return values.astype(np.uint16)
        return (np.clip(values, 0, None) >> 23).astype(np.uint8)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return np.asarray(img.convert("RGBA"))[..., [2, 1, 0, 3]]
    # OpenCV swaps the channels into a new C-contiguous array several times faster than a copy of
    # the reversed numpy view, and an RGB image needs no conversion copy first.
    import cv2  # where images are decoded: a command that decodes none (stats, pages) skips its 0.1 s

    return cv2.cvtColor(np.asarray(img if img.mode == "RGB" else img.convert("RGB")), cv2.COLOR_RGB2BGR)


def _from_array(arr: np.ndarray, label: str, copy: bool = True) -> np.ndarray:
    """Return a new BGR ``uint8`` ``HxWx3`` C-contiguous array from an OpenCV-convention array.

    ``copy=False`` when ``arr`` is already our own (freshly decoded): a writable C-contiguous BGR
    ``uint8`` array is then returned as it is.
    """
    if arr.size == 0:
        raise ImageLoadError(label, f"empty array of shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageLoadError(
            label,
            f"unsupported array shape {arr.shape}; expected HxW, HxWx1, HxWx3 (BGR) or HxWx4 (BGRA)",
        )
    arr = _to_uint8(arr, label)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 4:
        # Transparent pixels hold arbitrary colour; white is what viewers show.
        alpha = arr[..., 3:].astype(np.float32) / 255
        return np.rint(arr[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8, order="C")
    if not copy and arr.flags.c_contiguous and arr.flags.writeable:
        return arr
    # A copy, so the caller's array and ours never alias.
    return np.array(arr, order="C")


def _to_uint8(arr: np.ndarray, label: str) -> np.ndarray:
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size == 1:
        return arr
    if kind == "u" and size == 2:
        return (arr >> 8).astype(np.uint8)
    if kind == "b":
        return arr.astype(np.uint8) * 255
    if kind == "f":
        if not np.isfinite(arr).all():
            raise ImageLoadError(label, "float image contains NaN or infinite values")
        low, high = float(arr.min()), float(arr.max())
        if low < 0 or high > 1:
            raise ImageLoadError(label, f"float values must lie in [0, 1], found {low:g} to {high:g}")
        return np.rint(arr * 255).astype(np.uint8)
    raise ImageLoadError(
        label, f"unsupported dtype {arr.dtype}; expected uint8, uint16, bool or float in [0, 1]"
    )
