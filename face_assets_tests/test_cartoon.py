"""The shipped cartoon classifier artifact: small, safe to load, tied to its recognizer, with its held-out record."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from face_assets import FaceFilter, load_settings
from face_assets.analysis import STYLE_MIN_SIDE
from face_assets.cartoon import DEFAULT_ARTIFACT, CartoonClassifier, backbone_for
from face_assets.errors import ModelNotFoundError
from face_assets.imaging import load_image
from face_assets.models import STYLE_BACKBONE, builtin_pack, file_sha256


def test_artifact_is_small_and_loads_without_pickles():
    assert DEFAULT_ARTIFACT.stat().st_size < 5 * 1024 * 1024
    clf = CartoonClassifier.read()
    assert 0.5 < clf.threshold < 1.0
    assert clf.mean.shape == clf.scale.shape and clf.weights[0].shape[0] == clf.mean.shape[0]


def test_artifact_belongs_to_the_builtin_recognizer():
    pack = builtin_pack()
    assert pack is not None and CartoonClassifier.read().recognizer_sha256 == pack.recognizer_sha256


def test_artifact_belongs_to_the_shipped_image_backbone():
    clf = CartoonClassifier.read()
    assert clf.backbone_sha256 == file_sha256(STYLE_BACKBONE)
    assert STYLE_BACKBONE.stat().st_size < 10 * 1024 * 1024  # float16 weights
    backbone = backbone_for(clf, load_settings(environ={}).models)
    assert backbone is not None and backbone.model_path == STYLE_BACKBONE


def test_a_classifier_of_another_backbone_is_refused():
    clf = CartoonClassifier.read()
    other = dataclasses.replace(clf, backbone_sha256="0" * 64)
    with pytest.raises(ModelNotFoundError, match="image backbone"):
        backbone_for(other, load_settings(environ={}).models)
    assert backbone_for(dataclasses.replace(clf, backbone_sha256=None), load_settings(environ={}).models) is None


def test_filter_scores_faces_with_the_backbone_and_skips_tiny_faces(datasets):
    face_filter = FaceFilter(load_settings(environ={}))
    clf = face_filter.classifier
    img = load_image(sorted((datasets / "real" / "lfw10").rglob("*.jpg"))[0])
    face = face_filter.analyzer.analyze_loaded([img])[0].faces[0]
    x = clf.features(face.normed_embedding, face.texture, face.style)
    assert face.style is not None and x.shape == (1, clf.mean.shape[0])
    # The same face shrunk under STYLE_MIN_SIDE: embedded and textured, but given no style features,
    # so the filter leaves it to the quality gate instead of judging its style.
    k = 0.8 * (STYLE_MIN_SIDE - 1) / max(face.face_size)
    tiny_img = cv2.resize(img, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    tiny = dataclasses.replace(face, bbox=face.bbox * np.float32(k), kps=face.kps * np.float32(k),
                               embedding=None, texture=None, style=None)
    assert 0 < max(tiny.face_size) < STYLE_MIN_SIDE
    face_filter.analyzer.embed_faces([(tiny_img, [tiny])])
    assert tiny.embedding is not None and tiny.texture is not None and tiny.style is None


def test_artifact_records_the_held_out_protocol():
    info = CartoonClassifier.read().info
    held = info["held_out"]
    # every real kind, the new ones included, was measured with its source held out
    assert {"bw", "old", "studio", "lighting", "web", "imfdb", "all"} <= set(held["real_kind"])
    assert held["real_kind"]["all"]["faces"] > 1000
    assert {"painting", "render3d", "sketch", "caricature", "anime", "illustration", "cartoon"} <= set(held["style"])
    assert {"painting", "render3d"} <= set(held["style_out"])
    assert len(held["curve"]) >= 5


def test_probabilities_are_in_range_and_round_trip(tmp_path):
    clf = CartoonClassifier.read()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    n_style = 2 * 2128 if clf.backbone_sha256 else 0  # the backbone's row for the aligned and the wide crop
    texture = np.abs(rng.normal(size=(4, clf.mean.shape[0] - 512 - n_style))).astype(np.float32)
    style = rng.normal(size=(4, n_style)).astype(np.float32) if n_style else None
    x = CartoonClassifier.features(emb, texture, style)
    p = clf.predict_proba(x)
    assert p.shape == (4,) and np.all((p >= 0) & (p <= 1))
    again = CartoonClassifier.read(clf.save(tmp_path / "c.npz"))
    assert np.allclose(again.predict_proba(x), p, atol=1e-6) and again.threshold == clf.threshold
