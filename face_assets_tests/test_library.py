"""FaceRecognitionLibrary end to end with real models, a real DuckDB file and a real faiss index."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from face_assets import NoFaceDetectedError
from face_assets.errors import EmbeddingError, ImageLoadError
from face_assets.imaging import content_hash
from face_assets.library import FaceRecognitionLibrary


@dataclasses.dataclass
class Meta:
    person: str
    source: str = "test"


def _lfw(datasets: Path, person: str) -> list[Path]:
    return sorted((datasets / "real" / "lfw10" / person).glob("*.jpg"))


@pytest.fixture(scope="module")
def people(datasets) -> dict[str, list[Path]]:
    names = sorted(p.name for p in (datasets / "real" / "lfw10").iterdir() if p.is_dir())[:3]
    return {n: _lfw(datasets, n) for n in names}


@pytest.fixture()
def lib(tmp_path):
    with FaceRecognitionLibrary(index_dir=tmp_path / "idx") as library:
        yield library


def test_index_search_compare(lib, people, datasets):
    (a, b, c) = people
    first = lib.index_image(people[a][1], image_id="a1", metadata={"person": a})
    assert first.status == "valid" and first.image_id == "a1" and len(first.indexed) == 1
    face = first.indexed[0]
    assert face["face_id"] > 0 and len(face["bbox"]) == 4 and face["scores"]["det_score"] > 0.5
    lib.index_image(people[b][1], metadata=Meta(person=b))
    summary = lib.index_batch(people[a][2:5] + people[c][1:4])
    assert summary.valid == 6 and summary.total == 6

    hits = lib.search(people[a][0], top_k=5)
    assert hits[0].path.startswith(str(datasets)) and a in hits[0].path
    assert all(h1.similarity >= h2.similarity for h1, h2 in zip(hits, hits[1:]))
    assert any(h.metadata == {"person": a} for h in hits)
    assert lib.search(people[a][0], top_k=5, threshold=0.99) == []
    b_hit = lib.search(people[b][0], top_k=1)[0]
    assert b_hit.metadata == {"person": b, "source": "test"}

    same = lib.compare(people[a][0], people[a][1])
    other = lib.compare(people[a][0], people[b][0])
    assert same.is_match and not other.is_match and same.similarity > other.similarity
    assert same.threshold == lib.settings.search.match_threshold

    emb = lib.get_embedding(people[a][0])
    assert emb.shape == (512,) and emb.dtype == np.float32 and abs(np.linalg.norm(emb) - 1) < 1e-5
    assert lib.search_embedding(emb * 7.0, top_k=3)[0].face_id == hits[0].face_id


def test_bad_queries_raise_typed_errors(lib, people, datasets):
    lib.index_image(next(iter(people.values()))[0])
    with pytest.raises(EmbeddingError, match="512"):
        lib.search_embedding(np.ones(128))
    with pytest.raises(EmbeddingError, match="NaN"):
        lib.search_embedding(np.full(512, np.nan))
    with pytest.raises(EmbeddingError, match="zeros"):
        lib.search_embedding(np.zeros(512))
    with pytest.raises(NoFaceDetectedError):
        lib.search(datasets / "corrupted" / "all_white_640x480.jpg")
    with pytest.raises(ImageLoadError):
        lib.get_embedding(datasets / "corrupted" / "zero_bytes.jpg")


def test_persistence_crud_and_repair(tmp_path, people):
    paths = [p for ps in people.values() for p in ps[:3]]
    with FaceRecognitionLibrary(index_dir=tmp_path) as lib:
        lib.index_batch(paths)
        n = len(lib.index)
        query = lib.get_embedding(paths[0])
        image_id = lib.search_embedding(query, top_k=1)[0].image_id
    with FaceRecognitionLibrary(index_dir=tmp_path) as lib:
        assert len(lib.index) == n
        top = lib.search_embedding(query, top_k=1)[0]
        assert top.image_id == image_id and top.similarity > 0.99
        assert lib.index_batch(paths).skipped == len(paths)  # content hash: nothing new
        assert lib.remove(image_id) == 1 and len(lib.index) == n - 1
        assert all(r.image_id != image_id for r in lib.search_embedding(query, top_k=n))
        face_id = lib.search_embedding(query, top_k=1)[0].face_id
        assert lib.remove(face_id) == 1 and lib.remove(face_id) == 0
        assert lib.stats()["valid_faces"] == len(lib.index) == n - 2
    (tmp_path / "faces.faiss").write_bytes(b"garbage")
    with FaceRecognitionLibrary(index_dir=tmp_path) as lib:  # corrupt index: rebuilt from the catalog
        assert len(lib.index) == n - 2
        lib.clear()
        assert len(lib.index) == 0 and lib.stats()["images"] == 0 and lib.search_embedding(query) == []


def test_directory_summary_matches_catalog(tmp_path, datasets):
    src = tmp_path / "mixed"
    for folder, k in (("real/lfw10", 4), ("cartoon/dualstylegan/anime", 3), ("nonface", 3), ("corrupted", 30)):
        for p in sorted(q for q in (datasets / folder).rglob("*") if q.is_file())[:k]:
            dest = src / folder / p.relative_to(datasets / folder)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dest)
    seen = []
    with FaceRecognitionLibrary(index_dir=tmp_path / "idx") as lib:
        s = lib.index_directory(src, on_progress=lambda done, total, path: seen.append(done))
        assert seen == list(range(1, s.total + 1))
        assert s.valid + sum(s.rejected.values()) + s.unreadable + s.skipped == s.total == 40
        assert s.unreadable == 10  # the ten files of corrupted/ Pillow cannot read
        stats = lib.stats()
        assert stats["images"] == s.total - s.skipped
        assert stats["by_status"].get("valid", 0) == s.valid
        assert stats["rejected_by_reason"] == dict(s.rejected)
        assert len(lib.index) == stats["valid_faces"]


CRASH_SCRIPT = textwrap.dedent(
    """
    import sys
    from face_assets.library import FaceRecognitionLibrary
    lib = FaceRecognitionLibrary(index_dir=sys.argv[1])
    lib.index_batch(sys.argv[2:], on_progress=lambda done, total, path: print(path, flush=True))
    """
)


@pytest.mark.slow  # a subprocess indexing 120 photos
def test_kill_9_during_indexing_loses_and_duplicates_nothing(tmp_path, datasets):
    paths = [str(p) for p in sorted((datasets / "real" / "imfdb").rglob("*.png"))[:120]]
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "FACE_ASSETS__STORAGE__INDEX_SAVE_EVERY": "5"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "idx"), *paths],
                            stdout=subprocess.PIPE, text=True, env=env)
    reported: list[str] = []  # files reported done: committed to the catalog
    for line in proc.stdout:
        reported.append(line.rstrip("\n"))
        if len(reported) == 13:  # between two index saves (every 5 images)
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with FaceRecognitionLibrary(index_dir=tmp_path / "idx") as lib:
        # No content and no face stored twice (image_id is the primary key; these two are not constrained).
        assert lib.catalog.query("SELECT content_hash FROM images GROUP BY ALL HAVING count(*) > 1") == []
        assert lib.catalog.query("SELECT image_id, face_index FROM faces GROUP BY ALL HAVING count(*) > 1") == []
        index_ids = set(lib.index.ids().tolist())
        for path in reported:
            count = lib.catalog.query("SELECT count(*) FROM images WHERE image_id = ?", [content_hash(path)])
            assert count[0][0] == 1, path
        assert set(lib.catalog.valid_face_ids(lib.model_version)) == index_ids
        summary = lib.index_batch(paths)
        assert summary.skipped >= len(reported)
        assert lib.catalog.query("SELECT count(DISTINCT content_hash) = count(*) FROM images")[0][0]
        assert lib.stats()["images"] == len({hashlib.sha256(Path(p).read_bytes()).digest() for p in paths})
        assert set(lib.catalog.valid_face_ids(lib.model_version)) == set(lib.index.ids().tolist())


def test_the_active_model_is_one_choice_with_or_without_a_catalog(tmp_path):
    """``registry.active_model``, which the library and the Dagster graph both ask: the configured version,
    else the promoted one, else ``base``; without a catalog only ``base``; an unknown version is refused."""
    from face_assets import registry
    from face_assets.config import load_settings
    from face_assets.errors import ModelVersionError
    from face_assets.models import resolve_pack
    from face_assets.store import Catalog

    plain = load_settings(overrides={"storage": {"data_dir": str(tmp_path)}}, environ={})
    pinned = load_settings(overrides={"storage": {"data_dir": str(tmp_path)}, "training": {"active_model": "v9"}},
                           environ={})
    pack = resolve_pack(plain.models)
    assert registry.active_model(None, plain, pack) == ("base", pack.recognizer)
    with pytest.raises(ModelVersionError, match="no catalog"):
        registry.active_model(None, pinned, pack)
    with Catalog.open(plain.storage) as catalog:
        registry.ensure_base(catalog, pack)
        assert registry.active_model(catalog, plain, pack) == ("base", pack.recognizer)
        with pytest.raises(ModelVersionError, match="unknown model version 'v9'"):
            registry.active_model(catalog, pinned, pack)
