"""Tests of face_assets.index: real faiss, exact and approximate types, persistence, typed errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from face_assets import errors
from face_assets import index as index_mod
from face_assets.errors import EmbeddingError, FaceRecognitionError
from face_assets.index import (
    FaceIndex,
    FaceIndexError,
    IndexCorruptError,
    IndexDimensionError,
    IndexInputError,
    IndexNotFoundError,
    ModelVersionMismatchError,
)
from benchmarks.synthetic import SyntheticFaces

DIM = 128
N = 20_000
THRESHOLD = 5_000  # small exact->approximate switch so IVF is exercised on ~20k vectors


@pytest.fixture(scope="module")
def lib():
    gen = SyntheticFaces(N, dim=DIM, seed=3)
    emb = gen.embeddings()
    ids = np.arange(N, dtype=np.int64) * 3 + 1000  # ids unrelated to row numbers
    return gen, emb, ids


@pytest.fixture(scope="module")
def ivf(lib):
    """An approximate index over the whole library (built once; tests must not modify it)."""
    _, emb, ids = lib
    idx = FaceIndex(dim=DIM, exact_threshold=THRESHOLD, model_version="arcface-r100@1")
    idx.rebuild(ids, emb)
    return idx


def _brute(emb, q, k):
    s = q @ emb.T
    return np.argsort(-s, axis=1)[:, :k], np.sort(s, axis=1)[:, ::-1][:, :k]


# -- type selection -------------------------------------------------------------------------------


@pytest.mark.slow  # trains IVF indexes as the size crosses its thresholds
def test_auto_type_follows_size(lib):
    _, emb, ids = lib
    idx = FaceIndex(dim=DIM, exact_threshold=THRESHOLD)
    idx.add(ids[:3000], emb[:3000])
    assert idx.is_exact and idx.resolved_factory == "IDMap2,Flat" and idx.nlist is None
    idx.add(ids[3000:5000], emb[3000:5000])  # reaches the threshold: trained IVF from here on
    assert not idx.is_exact and idx.resolved_factory == f"IVF16,PQ{DIM // 2}x4fs,Refine(SQ8)"
    assert idx.nlist == 16 and idx.nprobe == 16 and len(idx) == 5000  # ~256 per list, >= 64 probed
    assert np.array_equal(idx.ids(), np.sort(ids[:5000]))
    idx.add(ids[5000:8000], emb[5000:8000])  # plain add, same lists
    assert idx.nlist == 16
    idx.add(ids[8000:], emb[8000:])  # >= 4x what it was trained for: rebuilt with more lists
    assert idx.nlist == 64 and len(idx) == N
    _, found = idx.search(emb[:200], 1)
    assert np.mean(found[:, 0] == ids[:200]) >= 0.99  # every vector survived both conversions

    idx.rebuild(ids[:1000], emb[:1000])  # rebuild picks by size: back to exact
    assert idx.is_exact and len(idx) == 1000


def test_approximate_recall_against_exact(lib, ivf):
    gen, emb, ids = lib
    assert ivf.resolved_factory == f"IVF64,PQ{DIM // 2}x4fs,Refine(SQ8)"
    people = gen.labels[np.random.default_rng(0).integers(0, N, 300)]
    q = gen.sample_faces(people, seed=1)
    truth, truth_scores = _brute(emb, q, 10)
    truth_ids = ids[truth]

    def recall(found, min_score=-1.0):
        keep = truth_scores >= min_score
        return sum(np.isin(truth_ids[i][keep[i]], found[i]).sum() for i in range(len(q))) / keep.sum()

    assert ivf.nprobe == 64 and ivf.refine_factor == 10  # small: every list by default
    nprobe = ivf.nprobe
    try:
        ivf.nprobe = 8  # 1/8 of the lists, 100 candidates re-ranked
        scores, found = ivf.search(q, 10)
        assert recall(found, 0.3) >= 0.8
        # Probing every list with a deep re-rank gives back (almost) the exact answer: what
        # remains are near-ties SQ8 (~1e-3) cannot order and rare neighbours that 4-bit PQ ranks
        # below the 1000 candidates.
        ivf.nprobe, ivf.refine_factor = ivf.nlist, 100
        full_scores, full = ivf.search(q, 10)
        assert recall(full) >= 0.97
        assert np.mean(np.abs(full_scores - truth_scores) < 3e-3) >= 0.97
    finally:
        ivf.nprobe, ivf.refine_factor = nprobe, 10
    # Scores are (SQ8-precise) cosines, best first.
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    rows = np.searchsorted(ids, found[:, 0])
    np.testing.assert_allclose(scores[:, 0], np.einsum("ij,ij->i", emb[rows], q), atol=3e-3)


def test_explicit_factories(lib):
    _, emb, ids = lib
    flat = FaceIndex(dim=DIM, factory="IDMap2,Flat")
    flat.add(ids[:100], emb[:100])
    s, f = flat.search(emb[:3], 1)
    assert np.array_equal(f[:, 0], ids[:3]) and np.allclose(s[:, 0], 1.0, atol=1e-5)

    ivf = FaceIndex(dim=DIM, factory="IVF16,Flat", nprobe=4)
    with pytest.raises(FaceIndexError, match="at least nlist"):
        ivf.add(ids[:10], emb[:10])  # cannot train 16 lists on 10 vectors
    assert len(ivf) == 0
    ivf.add(ids[:2000], emb[:2000])  # trains on its first batch
    assert ivf.nlist == 16 and ivf.nprobe == 4
    assert ivf.remove(ids[:10]) == 10 and len(ivf) == 1990

    hnsw = FaceIndex(dim=DIM, factory="HNSW16", ef_search=32)
    hnsw.add(ids[:500], emb[:500])
    assert hnsw.ef_search == 32
    with pytest.raises(FaceIndexError, match="removal"):
        hnsw.remove(ids[:1])

    with pytest.raises(IndexInputError):
        FaceIndex(dim=DIM, factory="NoSuchIndex42")


# -- add / search / remove ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("approximate", [False, True])
def test_removed_ids_are_never_returned(lib, approximate):
    gen, emb, ids = lib
    n = 8000
    idx = FaceIndex(dim=DIM, exact_threshold=THRESHOLD if approximate else 10**9)
    idx.add(ids[:n], emb[:n])
    assert idx.is_exact is not approximate
    big = int(np.argmax(np.bincount(gen.labels[:n])))  # one person with many faces
    rows = np.flatnonzero(gen.labels[:n] == big)
    gone = ids[rows[::2]]
    assert idx.remove(np.concatenate([gone, [10**12]])) == len(gone)  # unknown ids ignored
    assert idx.remove(gone) == 0
    assert len(idx) == n - len(gone) and not np.isin(gone, idx.ids()).any()
    assert gone[0] not in idx and ids[rows[1]] in idx
    _, found = idx.search(emb[rows], 50)  # the removed faces themselves, and their siblings
    assert not np.isin(found, gone).any()
    assert np.isin(found[:, 0], ids[rows[1::2]]).mean() > 0.9
    idx.add(gone, emb[rows[::2]])  # a removed id can be added again
    assert len(idx) == n


def test_missing_results_and_empty_index(lib):
    _, emb, ids = lib
    idx = FaceIndex(dim=DIM)
    s, f = idx.search(emb[:2], 5)
    assert f.shape == (2, 5) and np.all(f == -1) and np.all(np.isneginf(s))
    idx.add(ids[:3], emb[:3])
    s, f = idx.search(emb[0], 5)  # a single 1-D query is accepted
    assert f.shape == (1, 5) and set(f[0, :3]) == set(ids[:3]) and np.all(f[0, 3:] == -1)
    assert np.all(np.isneginf(s[0, 3:])) and s[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_vectors_are_normalised_and_not_modified(lib):
    _, emb, ids = lib
    raw = (emb[:50] * 7.5).astype(np.float64)  # float64, not unit length
    before = raw.copy()
    idx = FaceIndex(dim=DIM)
    idx.add(ids[:50], raw)
    assert np.array_equal(raw, before)
    q = np.asfortranarray(raw[:5] * 3)  # non-contiguous too
    s, f = idx.search(q, 1)
    assert np.array_equal(f[:, 0], ids[:5]) and np.allclose(s[:, 0], 1.0, atol=1e-5)


def test_bad_input_raises_typed_errors_and_changes_nothing(lib):
    _, emb, ids = lib
    idx = FaceIndex(dim=DIM)
    idx.add(ids[:10], emb[:10])
    bad = emb[10:20].copy()
    bad[3, 5] = np.nan
    inf = emb[10:20].copy()
    inf[0, 0] = np.inf
    zero = emb[10:20].copy()
    zero[2] = 0
    cases = [
        (IndexDimensionError, ids[10:20], emb[10:20, :64]),  # wrong dim
        (IndexDimensionError, ids[10:11], emb[10]),  # 1-D to add
        (EmbeddingError, ids[10:20], bad),
        (EmbeddingError, ids[10:20], inf),
        (EmbeddingError, ids[10:20], zero),
        (IndexInputError, ids[10:19], emb[10:20]),  # count mismatch
        (IndexInputError, np.r_[ids[10:19], ids[10]], emb[10:20]),  # duplicate in batch
        (IndexInputError, np.r_[ids[10:19], ids[0]], emb[10:20]),  # already present
        (IndexInputError, np.r_[ids[10:19], -5], emb[10:20]),  # negative id
    ]
    for err, i, v in cases:
        with pytest.raises(err):
            idx.add(i, v)
    assert len(idx) == 10  # all checks run before anything is added
    with pytest.raises(IndexDimensionError):
        idx.search(emb[:2, :100], 3)
    with pytest.raises(EmbeddingError):
        idx.search(bad, 3)
    with pytest.raises(IndexInputError):
        idx.search(emb[:1], 0)
    # The error hierarchy callers rely on (the library catches EmbeddingError and the errors.py
    # IndexNotFoundError / IndexCorruptError).
    assert issubclass(IndexDimensionError, EmbeddingError) and issubclass(EmbeddingError, ValueError)
    assert issubclass(IndexInputError, ValueError) and issubclass(IndexInputError, FaceRecognitionError)
    assert issubclass(ModelVersionMismatchError, FaceRecognitionError)
    assert IndexNotFoundError is errors.IndexNotFoundError and IndexCorruptError is errors.IndexCorruptError


def test_model_versions_never_mix(lib, tmp_path):
    _, emb, ids = lib
    idx = FaceIndex(dim=DIM, model_version="m1")
    idx.add(ids[:10], emb[:10], model_version="m1")
    idx.add(ids[10:20], emb[10:20])  # no declaration: trusted
    with pytest.raises(ModelVersionMismatchError):
        idx.add(ids[20:30], emb[20:30], model_version="m2")
    with pytest.raises(ModelVersionMismatchError):
        idx.search(emb[:1], 3, model_version="m2")
    assert len(idx) == 20

    fresh = FaceIndex(dim=DIM)  # empty and unversioned: takes the first declared version
    fresh.add(ids[:10], emb[:10], model_version="m2")
    assert fresh.model_version == "m2"
    unversioned = FaceIndex(dim=DIM)
    unversioned.add(ids[:10], emb[:10])
    with pytest.raises(ModelVersionMismatchError):  # holds vectors of an unknown model
        unversioned.add(ids[10:20], emb[10:20], model_version="m1")

    idx.save(tmp_path / "faces.index")
    assert FaceIndex.load(tmp_path / "faces.index", model_version="m1").model_version == "m1"
    with pytest.raises(ModelVersionMismatchError):
        FaceIndex.load(tmp_path / "faces.index", model_version="m2")


# -- persistence ----------------------------------------------------------------------------------


def test_save_load_round_trip(lib, ivf, tmp_path):
    _, emb, ids = lib
    path = tmp_path / "sub" / "faces.index"
    ivf.save(path)
    loaded = FaceIndex.load(path)
    assert loaded.resolved_factory == ivf.resolved_factory and loaded.model_version == ivf.model_version
    assert loaded.nprobe == ivf.nprobe and len(loaded) == len(ivf)
    assert np.array_equal(loaded.ids(), ivf.ids())
    q = emb[::500]
    s1, f1 = ivf.search(q, 10)
    s2, f2 = loaded.search(q, 10)
    assert np.array_equal(f1, f2) and np.allclose(s1, s2)
    side = path.with_name(path.name + ".json")
    meta = json.loads(side.read_text())
    assert meta["dim"] == DIM and meta["count"] == N and meta["factory"] == "auto"
    assert meta["model_version"] == "arcface-r100@1" and len(meta["checksum_sha256"]) == 64
    # A loaded index keeps working: add, remove, search.
    assert loaded.remove(ids[:5]) == 5
    loaded.add(ids[:5], emb[:5])
    assert len(loaded) == N

    exact = FaceIndex(dim=DIM)
    exact.add(ids[:100], emb[:100])
    exact.save(tmp_path / "exact.index")
    back = FaceIndex.load(tmp_path / "exact.index")
    assert back.is_exact and np.array_equal(back.search(emb[:5], 3)[1], exact.search(emb[:5], 3)[1])


def test_failed_save_leaves_old_file_intact(lib, tmp_path, monkeypatch):
    _, emb, ids = lib
    path = tmp_path / "faces.index"
    idx = FaceIndex(dim=DIM)
    idx.add(ids[:100], emb[:100])
    idx.save(path)
    idx.add(ids[100:300], emb[100:300])

    def disk_failure(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(index_mod.os, "fsync", disk_failure)
    with pytest.raises(OSError):
        idx.save(path)
    monkeypatch.undo()
    assert len(FaceIndex.load(path)) == 100  # the previous version, still valid
    assert sorted(os.listdir(tmp_path)) == ["faces.index", "faces.index.ids.npy", "faces.index.journal",
                                            "faces.index.json"]  # no temp left


def test_missing_and_corrupt_files(lib, tmp_path):
    _, emb, ids = lib
    with pytest.raises(IndexNotFoundError):
        FaceIndex.load(tmp_path / "nope.index")
    path = tmp_path / "faces.index"
    idx = FaceIndex(dim=DIM, exact_threshold=1000)
    idx.add(ids[:2000], emb[:2000])
    idx.save(path)
    good = path.read_bytes()

    def corrupt(data: bytes) -> None:
        path.write_bytes(data)
        with pytest.raises(IndexCorruptError):
            FaceIndex.load(path)

    corrupt(b"")
    corrupt(good[: len(good) // 2])  # truncated
    corrupt(good[:-1])
    corrupt(good[:20])  # truncated inside the header
    corrupt(os.urandom(len(good)))  # garbage
    corrupt(b"<html>502 Bad Gateway</html>")
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # one flipped bit in the payload: checksum mismatch
    corrupt(bytes(flipped))
    header = bytearray(good)
    i = good.index(b'"count": 2000')
    header[i + 9 : i + 13] = b"2001"  # tampered header: also covered by the checksum
    corrupt(bytes(header))
    path.write_bytes(good)
    assert len(FaceIndex.load(path)) == 2000
