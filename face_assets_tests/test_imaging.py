"""Tests of face_assets.imaging: every source kind, every odd file in datasets/corrupted, and hashing."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from face_assets.errors import ImageLoadError
from face_assets.imaging import DraftImage, _from_array, _pil_to_array, content_hash, load_draft, load_image

LOADS = "loads"
FAILS = "ImageLoadError"

# One row per file in datasets/corrupted; the README lists which files Pillow cannot read.
CORRUPTED_EXPECTED = {
    "all_black_640x480.png": LOADS,
    "all_white_640x480.jpg": LOADS,
    "animated_gif_no_time_for_that_tiny.gif": LOADS,
    "cmyk.jpg": LOADS,
    "exif_orientation6_rotated_pixels.jpg": LOADS,
    "gray16.png": LOADS,
    "grayscale.jpg": LOADS,
    "html_error_page_named.png": FAILS,
    "huge_dims_40000x40000_header.png": FAILS,
    "jpeg_bytes_named.png": LOADS,
    "jpeg_header_only_600B.jpg": FAILS,
    "lossy_q5.jpg": LOADS,
    # Verified, as the README says: a float64 planar RGB TIFF written by tifffile, a layout Pillow
    # does not decode ("unknown pixel mode"), so Image.open rejects it.
    "multipage_rgb.tif": FAILS,
    "no_extension_jpeg": LOADS,
    "palette.png": LOADS,
    "png_bytes_named.jpg": LOADS,
    "png_corrupt_idat.png": FAILS,
    "progressive.jpg": LOADS,
    "random_bytes.png": FAILS,
    "rgba.png": LOADS,
    "rgba_32bit_ageitgey.png": LOADS,
    "text_file_named.jpg": FAILS,
    "tiny_1x1.png": LOADS,
    "tiny_face_12x12.png": LOADS,
    "tiny_face_24x24.png": LOADS,
    "truncated_50pct.jpg": FAILS,
    "truncated_95pct.jpg": FAILS,
    "upside_down_face.jpg": LOADS,
    "webp_lossy.webp": LOADS,
    "zero_bytes.jpg": FAILS,
}

# Generous for files of at most a few hundred KB; a bomb that got decoded would take far longer.
MAX_LOAD_SECONDS = 2.0


@pytest.fixture(scope="module")
def corrupted(datasets):
    return datasets / "corrupted"


def assert_bgr_image(image: np.ndarray) -> None:
    assert isinstance(image, np.ndarray)
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] > 0 and image.shape[1] > 0
    assert image.flags.c_contiguous and image.flags.writeable


def test_corrupted_folder_matches_table(corrupted):
    assert {p.name for p in corrupted.iterdir()} == set(CORRUPTED_EXPECTED)


@pytest.mark.parametrize("name, expected", sorted(CORRUPTED_EXPECTED.items()))
def test_corrupted_file(corrupted, name, expected):
    path = corrupted / name
    start = time.perf_counter()
    if expected == LOADS:
        assert_bgr_image(load_image(path))
    else:
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        assert info.value.reason
        assert info.value.path == str(path)
        assert str(path) in str(info.value)
    assert time.perf_counter() - start < MAX_LOAD_SECONDS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "name, reason_part",
    [
        ("zero_bytes.jpg", "empty file (0 bytes)"),
        ("text_file_named.jpg", "not a recognised"),
        ("truncated_50pct.jpg", "truncated or corrupt"),
        ("png_corrupt_idat.png", "truncated or corrupt"),
        ("huge_dims_40000x40000_header.png", "decompression bomb"),
    ],
)
def test_failure_reasons(corrupted, name, reason_part):
    with pytest.raises(ImageLoadError, match="cannot load image") as info:
        load_image(corrupted / name)
    assert reason_part in info.value.reason


def test_own_pixel_limit_refuses_before_decoding(corrupted):
    with pytest.raises(ImageLoadError) as info:
        load_image(corrupted / "tiny_face_24x24.png", max_pixels=100)
    assert info.value.reason == (
        "image is 24x24 = 576 pixels, above the limit of 100 (possible decompression bomb)"
    )


def test_exif_orientation_is_applied(corrupted):
    path = corrupted / "exif_orientation6_rotated_pixels.jpg"
    with Image.open(path) as raw:
        raw_width, raw_height = raw.size
    assert raw_width != raw_height
    image = load_image(path)
    # Orientation 6 is a 90 degree rotation: the loaded width is the raw height and vice versa.
    assert (image.shape[1], image.shape[0]) == (raw_height, raw_width)


def test_gray16_keeps_its_tonal_range(corrupted):
    image = load_image(corrupted / "gray16.png")
    with Image.open(corrupted / "gray16.png") as raw:
        expected = (np.asarray(raw) >> 8).astype(np.uint8)
    assert len(np.unique(image)) > 2
    np.testing.assert_array_equal(image, np.repeat(expected[..., None], 3, axis=2))


def test_rgba_file_keeps_opaque_pixels(corrupted):
    # The dataset's rgba.png is fully opaque, so its colours must come through unchanged.
    with Image.open(corrupted / "rgba.png") as raw:
        rgba = np.asarray(raw)
    image = load_image(corrupted / "rgba.png")
    np.testing.assert_array_equal(image[rgba[..., 3] == 255], rgba[rgba[..., 3] == 255][:, 2::-1])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_areas_become_white(mode):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:, 4:, 3] = 255
    pil = Image.fromarray(rgba).convert(mode)
    buffer = io.BytesIO()
    pil.save(buffer, "PNG")
    image = load_image(buffer.getvalue())
    assert (image[:, :4] == 255).all()
    expected_bgr = np.asarray(pil.convert("RGB"))[0, 4, ::-1]
    assert (image[:, 4:] == expected_bgr).all()


def test_palette_with_transparency_becomes_white():
    pil = Image.new("P", (4, 4), 1)
    pil.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pil.paste(0, (0, 0, 2, 4))
    buffer = io.BytesIO()
    pil.save(buffer, "PNG", transparency=0)
    image = load_image(buffer.getvalue())
    assert (image[:, :2] == 255).all()
    assert (image[:, 2:] == (0, 0, 255)).all()


def test_cmyk_loads_as_three_channels(corrupted):
    image = load_image(corrupted / "cmyk.jpg")
    assert image.shape == (450, 600, 3)
    assert image.std() > 0


def test_animated_gif_gives_first_frame(corrupted):
    path = corrupted / "animated_gif_no_time_for_that_tiny.gif"
    with Image.open(path) as raw:
        first = np.asarray(raw.convert("RGB"))[..., ::-1]
        raw.seek(raw.n_frames - 1)
        last = np.asarray(raw.convert("RGB"))[..., ::-1]
    image = load_image(path)
    np.testing.assert_array_equal(image, first)
    assert not np.array_equal(image, last)


def test_multipage_tiff_gives_first_page():
    pages = [Image.new("RGB", (5, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    image = load_image(buffer.getvalue())
    assert image.shape == (4, 5, 3)
    assert (image == (0, 0, 255)).all()


@pytest.mark.parametrize(
    "name", ["progressive.jpg", "palette.png", "webp_lossy.webp", "jpeg_bytes_named.png"]
)
def test_bytes_input_equals_path_input(corrupted, name):
    path = corrupted / name
    data = path.read_bytes()
    expected = load_image(path)
    for source in (str(path), data, bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(load_image(source), expected)


def test_bytes_failures_are_labelled():
    with pytest.raises(ImageLoadError) as info:
        load_image(b"")
    assert info.value.path == "<bytes>"
    assert info.value.reason == "empty file (0 bytes)"
    with pytest.raises(ImageLoadError, match="<bytes>"):
        load_image(b"<html>not an image</html>")


def test_gray_uint8_array():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for source in (gray, gray[..., None]):
        image = load_image(source)
        assert_bgr_image(image)
        np.testing.assert_array_equal(image, np.stack([gray] * 3, axis=2))


def test_bgr_uint8_array_is_copied():
    bgr = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    image = load_image(bgr)
    np.testing.assert_array_equal(image, bgr)
    image[:] = 0
    assert bgr.any()


@pytest.mark.parametrize("mode, fmt", [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("P", "GIF"), ("CMYK", "JPEG")])
def test_decoded_file_is_pillows_rgb_in_bgr_order(mode, fmt):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (7, 9, 3), dtype=np.uint8))
    buf = io.BytesIO()
    rgb.convert(mode).save(buf, fmt)
    image = load_image(buf.getvalue())
    assert_bgr_image(image)
    np.testing.assert_array_equal(image, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))[..., ::-1])


def test_non_contiguous_array():
    bgr = np.random.default_rng(1).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = load_image(bgr[::2, ::-1])
    assert_bgr_image(image)
    np.testing.assert_array_equal(image, bgr[::2, ::-1])


@pytest.mark.parametrize("dtype", [np.uint16, np.dtype(">u2")])
def test_uint16_array(dtype):
    values = np.array([[0, 255, 256, 65535]], dtype=dtype)
    image = load_image(values)
    assert_bgr_image(image)
    assert image[0, :, 0].tolist() == [0, 0, 1, 255]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_array(dtype):
    values = np.array([[0.0, 0.5, 1.0]], dtype=dtype)
    image = load_image(np.stack([values] * 3, axis=2))
    assert_bgr_image(image)
    assert image[0, :, 0].tolist() == [0, 128, 255]


def test_bool_array():
    image = load_image(np.array([[True, False]]))
    assert image[0, :, 0].tolist() == [255, 0]


def test_bgra_array_composites_onto_white():
    bgra = np.zeros((2, 3, 4), np.uint8)
    bgra[..., :3] = (10, 20, 30)
    bgra[0, :, 3] = 255
    bgra[1, :, 3] = 0
    image = load_image(bgra)
    assert_bgr_image(image)
    assert (image[0] == (10, 20, 30)).all()
    assert (image[1] == 255).all()


@pytest.mark.parametrize(
    "array, reason_part",
    [
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros(5, np.uint8), "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "shape"),
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((0, 4), np.float32), "empty"),
        (np.array([[0.5, np.nan]]), "NaN"),
        (np.array([[0.5, np.inf]], np.float32), "NaN or infinite"),
        (np.array([[0.0, 255.0]]), "[0, 1]"),
        (np.zeros((2, 2), np.int32), "dtype"),
        (np.zeros((2, 2), np.complex64), "dtype"),
        (np.zeros((2, 2), object), "dtype"),
    ],
)
def test_bad_arrays(array, reason_part):
    with pytest.raises(ImageLoadError) as info:
        load_image(array)
    assert info.value.path == "<array>"
    assert reason_part in info.value.reason


def test_missing_path(tmp_path):
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.reason == "file not found"
    assert info.value.path == str(tmp_path / "nope.jpg")


def test_directory_path(tmp_path):
    with pytest.raises(ImageLoadError) as info:
        load_image(tmp_path)
    assert info.value.reason == "is a directory"


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="int"):
        load_image(42)


def test_16bit_ppm_stored_as_mode_i():
    # Pillow opens 16-bit PGM as 32-bit mode "I"; it must still be scaled as 16-bit data.
    data = b"P5\n3 1\n65535\n" + np.array([0, 32768, 65535], ">u2").tobytes()
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I"
    assert load_image(data)[0, :, 0].tolist() == [0, 128, 255]


def test_32bit_integer_file_uses_full_range():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0, 2**30, 2**31 - 1]], np.int32)).save(buffer, "TIFF")
    assert load_image(buffer.getvalue())[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_converts(mode):
    # Guards against a mode (present or added by a Pillow upgrade) that the conversion misses.
    image = _from_array(_pil_to_array(Image.new(mode, (3, 2))), "<test>")
    assert_bgr_image(image)
    assert image.shape == (2, 3, 3)


def test_zero_size_image_is_refused():
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    png = b"\x89PNG\r\n\x1a\n" + chunks
    with pytest.raises(ImageLoadError, match="not a recognised"):
        load_image(png)


def test_non_raster_formats_are_refused():
    # PCX is outside the raster allowlist; EPS would hand the bytes to Ghostscript.
    pcx = bytes([10, 5, 1, 8]) + struct.pack("<HHHH", 0, 0, 9, 9) + bytes(124)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    for data in (pcx, eps):
        with pytest.raises(ImageLoadError, match="not a recognised or supported"):
            load_image(data)


def test_float_image_file():
    buffer = io.BytesIO()
    Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32)).save(buffer, "TIFF")
    assert load_image(buffer.getvalue())[0, :, 0].tolist() == [0, 64, 255]


def test_content_hash_of_files(corrupted):
    path = corrupted / "progressive.jpg"
    data = path.read_bytes()
    assert content_hash(path) == content_hash(str(path)) == content_hash(data)
    assert content_hash(path) == hashlib.sha256(data).hexdigest()
    assert content_hash(path) != content_hash(corrupted / "lossy_q5.jpg")
    # Same pixels in a file of another name and extension: the bytes, not the name, decide.
    same_bytes = ("jpeg_bytes_named.png", "no_extension_jpeg")
    assert content_hash(corrupted / same_bytes[0]) == content_hash(corrupted / same_bytes[1])


def test_content_hash_of_arrays():
    array = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    assert content_hash(array) == content_hash(array.copy())
    assert content_hash(array) != content_hash(array.reshape(4, 2, 3))
    assert content_hash(array) != content_hash(array.view(np.int8))
    changed = array.copy()
    changed[0, 0, 0] += 1
    assert content_hash(array) != content_hash(changed)
    assert content_hash(array[:, ::2]) == content_hash(np.ascontiguousarray(array[:, ::2]))


def test_content_hash_of_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        content_hash(tmp_path / "nope.jpg")


def _jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", [None, 6])
def test_large_jpeg_is_drafted_at_the_detectors_scale(orientation):
    data = _jpeg(2600, 1800, orientation)
    full = load_image(data)
    draft = load_draft(data, min_side=640)
    assert isinstance(draft, DraftImage) and draft.scale == 0.25  # 650 px: the smallest scale of at least 640
    assert (draft.width, draft.height) == (full.shape[1], full.shape[0])
    assert draft.pixels.shape[:2] == (-(-full.shape[0] // 4), -(-full.shape[1] // 4))  # EXIF turn applied to both
    np.testing.assert_array_equal(draft.full(), full)
    # the reduced pixels are the full image averaged over 4 x 4 blocks, up to the JPEG decoder's rounding
    blocks = full[: full.shape[0] // 4 * 4, : full.shape[1] // 4 * 4].reshape(full.shape[0] // 4, 4, full.shape[1] // 4, 4, 3)
    mean = blocks.mean(axis=(1, 3))
    assert np.abs(mean - draft.pixels[: mean.shape[0], : mean.shape[1]]).mean() < 3


def test_small_jpegs_and_other_formats_are_decoded_in_full():
    small = _jpeg(1200, 900)  # under twice the side asked for: no reduction
    np.testing.assert_array_equal(load_draft(small, min_side=640), load_image(small))
    png = io.BytesIO()
    Image.fromarray(np.zeros((1800, 2600, 3), np.uint8)).save(png, "PNG")
    assert isinstance(load_draft(png.getvalue(), min_side=640), np.ndarray)
    array = np.zeros((1800, 2600, 3), np.uint8)
    assert isinstance(load_draft(array, min_side=640), np.ndarray)
