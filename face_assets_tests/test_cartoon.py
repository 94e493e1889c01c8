"""The shipped cartoon classifier artifact: small, safe to load, tied to its recognizer, with its held-out record."""

from __future__ import annotations

import numpy as np

from face_assets.cartoon import DEFAULT_ARTIFACT, CartoonClassifier
from face_assets.models import builtin_pack


def test_artifact_is_small_and_loads_without_pickles():
    assert DEFAULT_ARTIFACT.stat().st_size < 5 * 1024 * 1024
    clf = CartoonClassifier.load()
    assert 0.5 < clf.threshold < 1.0
    assert clf.mean.shape == clf.scale.shape and clf.weights[0].shape[0] == clf.mean.shape[0]


def test_artifact_belongs_to_the_builtin_recognizer():
    pack = builtin_pack()
    assert pack is not None and CartoonClassifier.load().recognizer_sha256 == pack.recognizer_sha256


def test_artifact_records_the_held_out_protocol():
    info = CartoonClassifier.load().info
    held = info["held_out"]
    # every real kind, the new ones included, was measured with its source held out
    assert {"bw", "old", "studio", "lighting", "web", "imfdb", "all"} <= set(held["real_kind"])
    assert held["real_kind"]["all"]["faces"] > 1000
    assert {"painting", "render3d", "sketch", "caricature", "anime", "illustration", "cartoon"} <= set(held["style"])
    assert {"painting", "render3d"} <= set(held["style_out"])
    assert len(held["curve"]) >= 5


def test_probabilities_are_in_range_and_round_trip(tmp_path):
    clf = CartoonClassifier.load()
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    texture = np.abs(rng.normal(size=(4, clf.mean.shape[0] - 512))).astype(np.float32)
    x = CartoonClassifier.features(emb, texture)
    p = clf.predict_proba(x)
    assert p.shape == (4,) and np.all((p >= 0) & (p <= 1))
    again = CartoonClassifier.load(clf.save(tmp_path / "c.npz"))
    assert np.allclose(again.predict_proba(x), p, atol=1e-6) and again.threshold == clf.threshold
