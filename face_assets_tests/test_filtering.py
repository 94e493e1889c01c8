"""filter_image on real, cartoon, non-face, tiny and corrupted images, with the real models."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from face_assets import FaceFilter, ImageLoadError, filter_image, load_settings
from face_assets.analysis import _crop_scale
from face_assets.detection import box_iou
from face_assets.filtering import is_low_quality, quality_score
from face_assets.imaging import DraftImage, load_image


@pytest.fixture(scope="module")
def face_filter() -> FaceFilter:
    return FaceFilter(load_settings(environ={}))


def _first(folder: Path) -> Path:
    return sorted(p for p in folder.rglob("*") if p.is_file())[0]


def test_result_has_exactly_the_spec_shape(datasets):
    r = filter_image(str(_first(datasets / "real" / "lfw10")))
    assert {"is_valid", "rejection_reason", "scores"} <= set(r)
    assert r["is_valid"] is True and r["rejection_reason"] is None
    s = r["scores"]
    assert isinstance(s["det_score"], float) and 0.5 <= s["det_score"] <= 1.0
    assert isinstance(s["embedding_norm"], float) and s["embedding_norm"] > 10
    assert isinstance(s["face_size"], list) and len(s["face_size"]) == 2 and min(s["face_size"]) > 40
    assert s["is_cartoon"] is False
    assert 0.0 <= s["cartoon_probability"] <= 1.0 and 0.0 < s["quality"] <= 1.0
    assert r["faces"][r["face_index"]]["scores"] == s


def test_real_photo_inputs_agree(face_filter, datasets):
    path = _first(datasets / "real" / "deepface")
    by_path = face_filter.filter(path)
    by_bytes = face_filter.filter(path.read_bytes())
    by_array = face_filter.filter(load_image(path))
    assert by_path["scores"] == by_bytes["scores"]
    # this photo is 1868 px high: decoded at half size from its file, at full size as an array
    assert (by_path["is_valid"], by_path["num_faces"]) == (by_array["is_valid"], by_array["num_faces"])
    assert by_path["scores"]["face_size"] == pytest.approx(by_array["scores"]["face_size"], rel=0.05)
    assert by_path["scores"]["embedding_norm"] == pytest.approx(by_array["scores"]["embedding_norm"], rel=0.05)
    small = _first(datasets / "real" / "lfw10")  # decoded in full either way
    assert face_filter.filter(small)["scores"] == face_filter.filter(load_image(small))["scores"]


@pytest.mark.parametrize(
    "folder, allowed",
    [
        ("nonface", {"no_face"}),
        ("lowres/skimage_lfw_subset_25px", {"low_quality", "no_face"}),
        # a cartoon face too small for the classifier is still rejected, as low_quality
        ("cartoon/dualstylegan/anime", {"cartoon", "no_face", "low_quality"}),
        ("cartoon/dualstylegan/pixar", {"cartoon", "no_face", "low_quality"}),
    ],
)
def test_bad_images_are_rejected_with_the_right_reason(face_filter, datasets, folder, allowed):
    files = sorted(p for p in (datasets / folder).rglob("*") if p.is_file())[:12]
    reasons = [face_filter.filter(p)["rejection_reason"] for p in files]
    assert sum(r in allowed for r in reasons) >= len(files) - 1, reasons
    if "cartoon" in allowed:
        assert reasons.count("cartoon") >= len(files) // 2, reasons


def test_real_faces_are_valid(face_filter, datasets):
    files = [p for d in ("lfw10", "dlib_johns", "imfdb") for p in sorted((datasets / "real" / d).rglob("*.*"))[:8]]
    results = [face_filter.filter(p) for p in files]
    assert sum(r["is_valid"] for r in results) >= len(files) - 1, [r["rejection_reason"] for r in results]


@pytest.mark.parametrize(
    "style, at_least",
    # Floors under the shares of the whole folders in the validation report (render3d, sketch and
    # caricature 100 %, painting 97 %), which the classifier was trained on; held out by source,
    # painted faces remain the hard case (docs/cartoon.md), hence the lower floor for painting.
    [("render3d", 0.9), ("sketch", 0.85), ("caricature", 0.85), ("painting", 0.7)],
)
def test_new_styles_are_mostly_rejected(face_filter, datasets, style, at_least):
    files = sorted((datasets / "cartoon" / "extra" / style).iterdir())[::6]  # every sixth: all its sources
    reasons = [face_filter.filter(p)["rejection_reason"] for p in files]
    assert sum(r is not None for r in reasons) >= at_least * len(files), reasons
    assert reasons.count("cartoon") >= 0.8 * sum(r is not None for r in reasons), reasons


@pytest.mark.parametrize("kind", ["bw", "old", "studio", "lighting", "web"])
def test_real_photos_of_new_sources_are_valid(face_filter, datasets, kind):
    # Every eighth file of the folder: several sources per kind (black-and-white film, old prints,
    # retouched studio portraits, face databases, web photos), none of them called a cartoon. Faces
    # cut from crowd scenes (``*_f<n>``, 38 to 88 px, often in profile) may be rejected as poor.
    files = [p for p in sorted((datasets / "real" / "extra" / kind).iterdir())
             if not re.search(r"_f\d+$", p.stem)][::8]
    results = [face_filter.filter(p) for p in files]
    assert [r["rejection_reason"] for r in results].count("cartoon") == 0, [p.name for p, r in zip(files, results)
                                                                          if r["rejection_reason"] == "cartoon"]
    assert sum(r["is_valid"] for r in results) >= len(files) - 1, [r["rejection_reason"] for r in results]


@pytest.mark.parametrize("native_scale", [True, False])
def test_clean_tight_frontal_crops_are_not_low_quality(datasets, native_scale):
    # ORL: 92x112 grayscale frontal faces filling the frame. At their own scale SCRFD finds them
    # directly; enlarged to det_size only the padded retry does, with a low confidence, and the
    # embedding norm and size say they are good faces. Kept either way.
    face_filter = FaceFilter(load_settings(overrides={"detection": {"native_scale": native_scale}}, environ={}))
    files = sorted((datasets / "real" / "extra" / "lighting").glob("orl_*"))[:20]
    results = [face_filter.filter(p) for p in files]
    assert all(r["padded"] is not native_scale for r in results if r["num_faces"])
    assert [r["rejection_reason"] for r in results].count("low_quality") == 0


@pytest.mark.parametrize("native_scale", [True, False])
def test_tight_crops_are_found(datasets, native_scale):
    detector = FaceFilter(load_settings(overrides={"detection": {"native_scale": native_scale}}, environ={})).analyzer.detector
    files = sorted((datasets / "real" / "imfdb").rglob("*.png"))
    found = [detector.predict([load_image(p)])[0] for p in files]
    assert len(files) == 400
    assert sum(bool(faces) for faces, _ in found) / len(files) >= 0.98
    padded = sum(p for _, p in found)
    assert padded < 40 if native_scale else padded > 300  # the retry is what finds them when enlarged


def test_native_scale_detection_finds_the_faces_of_det_size(face_filter, datasets):
    """Small photos detected near their own size (at least 320) find the same faces as enlarged to
    det_size, at boxes that differ only by resolution; large photos are detected at det_size as before."""
    enlarged = FaceFilter(load_settings(overrides={"detection": {"native_scale": False}}, environ={})).analyzer.detector
    native = face_filter.analyzer.detector
    files = [p for d in ("lfw10", "deepface", "ageitgey") for p in sorted((datasets / "real" / d).rglob("*.*"))[:10]]
    small = 0
    for p in files:
        img = load_image(p)
        side = native.input_side(img)
        assert side % 32 == 0 and side == min(640, max(320, -(-max(img.shape[:2]) // 32) * 32))
        small += side < 640
        a, _ = enlarged.predict([img])[0]
        b, _ = native.predict([img])[0]
        big_a = [f for f in a if min(f.face_size) >= 37]
        big_b = [f for f in b if min(f.face_size) >= 37]
        assert len(big_a) == len(big_b), p
        for fa in big_a:
            assert max(box_iou(fa.bbox, fb.bbox) for fb in big_b) > 0.7, p
    assert small >= 10  # the LFW photos (250 px) at least


def test_detection_threads_give_the_single_thread_results(face_filter, datasets):
    """Two detection threads, each with its own session on its own core, find exactly what one finds."""
    files = [_first(datasets / "real" / d) for d in ("lfw10", "imfdb", "dlib_johns", "deepface")]
    files += [datasets / "detection" / "groups" / "10.jpg", _first(datasets / "nonface")]
    images = [load_image(p) for p in files] * 2
    # enlarged to det_size, so that the tight crops take the padded retry
    one = FaceFilter(load_settings(overrides={"detection": {"workers": 1, "native_scale": False}}, environ={}))
    two = FaceFilter(load_settings(overrides={"detection": {"workers": 2, "native_scale": False},
                                              "models": {"intra_op_threads": 2}}, environ={}))
    threaded = two.analyzer.analyze_loaded(images)
    pooled = [d for d in two.analyzer._detect_pool.map(lambda _: getattr(two.analyzer._pool_thread, "detector", None),
                                                         range(4)) if d is not None]
    assert pooled and all(d.session.get_session_options().intra_op_num_threads == 1 for d in pooled)
    assert two.analyzer.detector.session.get_session_options().intra_op_num_threads == 2  # single images
    assert any(b.padded for b in threaded) and any(b.faces and not b.padded for b in threaded)
    for a, b in zip(one.analyzer.analyze_loaded(images), threaded):
        assert a.padded == b.padded and len(a.faces) == len(b.faces)
        for fa, fb in zip(a.faces, b.faces):
            assert fa.det_score == fb.det_score
            np.testing.assert_array_equal(fa.bbox, fb.bbox)
            np.testing.assert_array_equal(fa.kps, fb.kps)


@pytest.mark.parametrize("name, factor", [("lfw10", 8), ("groups/10.jpg", 2)])
def test_a_large_jpeg_gives_the_faces_of_its_full_decode(face_filter, datasets, tmp_path, name, factor):
    """A large JPEG is detected at a reduced decoding scale: the same faces, in the full image's
    coordinates, with the embeddings and verdicts of the full decode; a face too small at that scale
    (the group photo's) is cut from the full image."""
    source = _first(datasets / "real" / name) if "/" not in name else datasets / "detection" / name
    small = load_image(source)
    big = cv2.resize(small, None, fx=factor, fy=factor, interpolation=cv2.INTER_CUBIC)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    loaded = face_filter.analyzer.load(path)
    assert isinstance(loaded, DraftImage) and loaded.scale <= 0.5
    analyses = face_filter.analyzer.analyze_loaded([load_image(path), loaded])
    full, drafted = (face_filter.judge(a) for a in analyses)
    assert drafted["image_size"] == full["image_size"] == [big.shape[1], big.shape[0]]
    assert drafted["num_faces"] == full["num_faces"] >= 1
    # the group photo's faces are too small at the reduced scale: their crops came from the full image
    assert any(_crop_scale(f.kps) / loaded.scale > 1 for f in analyses[1].faces) == ("/" in name)
    for a, b in zip(*(sorted(x.faces, key=lambda f: tuple(f.bbox[:2])) for x in analyses)):
        assert box_iou(a.bbox, b.bbox) > 0.9
        assert float(a.normed_embedding @ b.normed_embedding) > 0.9
    assert [f["is_valid"] for f in drafted["faces"]].count(True) == [f["is_valid"] for f in full["faces"]].count(True)
    assert drafted["is_valid"] and full["is_valid"]


def test_load_many_gives_each_image_or_its_error_in_place(datasets, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    files = [_first(datasets / "real" / "lfw10"), bad, _first(datasets / "real" / "deepface"), tmp_path / "missing.jpg"]
    for workers in (1, 2):
        analyzer = FaceFilter(load_settings(overrides={"detection": {"workers": workers}}, environ={})).analyzer
        loaded = analyzer.load_many(files)
        assert isinstance(loaded[1], ImageLoadError) and isinstance(loaded[3], ImageLoadError)
        assert loaded[3].reason == "file not found"
        np.testing.assert_array_equal(loaded[0], load_image(files[0]))
        assert isinstance(loaded[2], DraftImage)  # 1868 px high
        np.testing.assert_array_equal(loaded[2].pixels, analyzer.load(files[2]).pixels)


def test_group_photo_reports_every_face(face_filter, datasets):
    r = face_filter.filter(datasets / "detection" / "groups" / "10.jpg")
    assert r["num_faces"] == len(r["faces"]) >= 5
    assert r["is_valid"] and r["faces"][r["face_index"]]["is_valid"]
    best = max(f["scores"]["quality"] for f in r["faces"] if f["is_valid"])
    assert r["scores"]["quality"] == best


def test_thresholds_come_from_config(datasets):
    strict = FaceFilter(load_settings(overrides={"filter": {"min_embedding_norm": 99.0}}, environ={}))
    r = strict.filter(_first(datasets / "real" / "lfw10"))
    assert r["is_valid"] is False and r["rejection_reason"] == "low_quality"


def test_det_score_alone_never_rejects_a_clearly_good_face():
    cfg = load_settings(environ={}).filter
    good_norm, good_size = cfg.good_face_norm, (cfg.good_face_size, cfg.good_face_size + 20)
    low_det = min(cfg.min_det_score_padded, cfg.min_det_score) - 0.01
    # a clean, large face: kept whatever the detector's confidence, direct or padded
    assert not is_low_quality(cfg, low_det, good_norm, good_size, 0.5, padded=False)
    assert not is_low_quality(cfg, low_det, good_norm, good_size, 0.5, padded=True)
    # a face that is not clearly good (smaller, or a weaker embedding) still needs the detector's confidence
    assert is_low_quality(cfg, low_det, good_norm, (cfg.good_face_size - 1,) * 2, 0.5, padded=False)
    assert is_low_quality(cfg, cfg.min_det_score - 0.01, good_norm - 0.1, good_size, 0.5, padded=False)
    assert not is_low_quality(cfg, cfg.min_det_score, good_norm - 0.1, good_size, 0.5, padded=False)
    # padded-retry detections have their own scale: between the two thresholds, the verdicts differ
    assert cfg.min_det_score_padded != cfg.min_det_score
    mid = (cfg.min_det_score_padded + cfg.min_det_score) / 2
    padded_is_stricter = cfg.min_det_score_padded > cfg.min_det_score
    assert is_low_quality(cfg, mid, good_norm - 0.1, good_size, 0.5, padded=padded_is_stricter)
    assert not is_low_quality(cfg, mid, good_norm - 0.1, good_size, 0.5, padded=not padded_is_stricter)
    # size and norm are hard limits
    assert is_low_quality(cfg, 0.99, 30.0, (cfg.min_face_size - 1,) * 2, 0.5, padded=False)
    assert is_low_quality(cfg, 0.99, cfg.min_embedding_norm - 0.1, good_size, 0.5, padded=False)


def test_unreadable_input_raises(face_filter, datasets):
    with pytest.raises(ImageLoadError) as err:
        face_filter.filter(datasets / "corrupted" / "truncated_50pct.jpg")
    assert "truncated_50pct.jpg" in str(err.value)


def test_blank_image_has_no_face(face_filter):
    r = face_filter.filter(np.full((480, 640, 3), 255, np.uint8))
    assert r == {**r, "is_valid": False, "rejection_reason": "no_face", "num_faces": 0}
    assert r["scores"]["face_size"] == [0, 0]


def test_quality_score_is_monotonic():
    assert quality_score(0.9, 24, (120, 120)) > quality_score(0.6, 24, (120, 120))
    assert quality_score(0.9, 24, (120, 120)) > quality_score(0.9, 12, (120, 120))
    assert quality_score(0.9, 24, (120, 120)) > quality_score(0.9, 24, (40, 40))
    assert 0.0 <= quality_score(0.0, 0.0, (0, 0)) <= quality_score(1.0, 99, (999, 999)) == 1.0
