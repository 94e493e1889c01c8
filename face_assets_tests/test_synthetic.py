"""Tests of face_assets.synthetic: determinism, shapes, unit norm, similarity law, long tail."""

from __future__ import annotations

import numpy as np
import pytest

from face_assets.synthetic import IDS_PER_BLOCK, SyntheticFaces, SyntheticParams, make_identities


def _pair_sims(emb: np.ndarray, labels: np.ndarray, rng: np.random.Generator, n: int = 20_000):
    """Cosines of random same-identity pairs and of random different-identity pairs."""
    sizes = np.bincount(labels)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    multi = np.flatnonzero(sizes >= 2)
    ident = rng.choice(multi, n)
    a = offsets[ident] + (rng.random(n) * sizes[ident]).astype(np.int64)
    b = offsets[ident] + (rng.random(n) * sizes[ident]).astype(np.int64)
    keep = a != b
    intra = np.einsum("ij,ij->i", emb[a[keep]], emb[b[keep]])
    a, b = rng.integers(0, len(emb), n), rng.integers(0, len(emb), n)
    keep = labels[a] != labels[b]
    inter = np.einsum("ij,ij->i", emb[a[keep]], emb[b[keep]])
    return intra, inter


@pytest.fixture(scope="module")
def library():
    gen = SyntheticFaces(30_000, dim=512, seed=7)
    return gen, gen.embeddings()


def test_deterministic_by_seed():
    e1, l1 = make_identities(3000, dim=64, seed=3)
    e2, l2 = make_identities(3000, dim=64, seed=3)
    e3, _ = make_identities(3000, dim=64, seed=4)
    assert np.array_equal(e1, e2) and np.array_equal(l1, l2)
    assert not np.array_equal(e1, e3)


def test_shapes_dtypes_and_unit_norm():
    emb, labels = make_identities(5000, dim=128, seed=1)
    assert emb.shape == (5000, 128) and emb.dtype == np.float32 and emb.flags.c_contiguous
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert np.all(np.diff(labels) >= 0) and labels[0] == 0  # contiguous identities, from 0
    assert np.all(np.bincount(labels) >= 1)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_intra_and_inter_similarity_match_parameters(library):
    gen, emb = library
    intra, inter = _pair_sims(emb, gen.labels, np.random.default_rng(0))
    assert abs(intra.mean() - 0.55) < 0.02
    assert abs(intra.std() - 0.12) < 0.02
    assert abs(inter.mean()) < 0.005
    # Different people are random directions, cosine ~ N(0, 1/sqrt(512)); look-alikes add a bit.
    assert abs(inter.std() - 1 / np.sqrt(512)) < 0.005


def test_similarity_parameters_are_honoured():
    gen = SyntheticFaces(20_000, dim=512, seed=2, params=SyntheticParams(intra_mean=0.7, intra_std=0.08))
    intra, _ = _pair_sims(gen.embeddings(), gen.labels, np.random.default_rng(1))
    assert abs(intra.mean() - 0.7) < 0.02
    assert abs(intra.std() - 0.08) < 0.02


def test_long_tail_of_identity_sizes():
    gen = SyntheticFaces(100_000, seed=0)
    sizes = gen.sizes
    assert sizes.sum() == 100_000
    assert np.mean(sizes <= 3) > 0.75  # most people on one to three photos
    assert np.mean(sizes == 1) > 0.5
    assert np.sum(sizes >= 100) >= 20 and sizes.max() >= 300  # a few on hundreds
    assert sizes.max() <= SyntheticParams().max_faces_per_identity


def test_lookalike_centroids_are_close_to_a_partner():
    params = SyntheticParams(lookalike_fraction=0.2, lookalike_cos=(0.35, 0.5))
    gen = SyntheticFaces(20_000, dim=512, seed=5, params=params)
    c = gen.centroids(np.arange(IDS_PER_BLOCK))  # partners always live in the same block
    cos = c @ c.T
    np.fill_diagonal(cos, 0)
    best = cos.max(axis=1)
    close = best > 0.3
    # Look-alikes and their partners; random pairs in 512-d never reach 0.3.
    assert 0.2 <= close.mean() <= 0.45
    assert best[close].min() >= 0.35 - 1e-3 and best.max() <= 0.5 + 1e-3

    plain = SyntheticFaces(20_000, dim=512, seed=5, params=SyntheticParams(lookalike_fraction=0.0))
    c = plain.centroids(np.arange(IDS_PER_BLOCK))
    cos = c @ c.T
    np.fill_diagonal(cos, 0)
    assert cos.max() < 0.3


def test_centroids_explain_faces(library):
    gen, emb = library
    ident = np.arange(50)
    c = gen.centroids(ident)
    rows = gen.offsets[ident]
    own = np.einsum("ij,ij->i", emb[rows], c)
    assert own.mean() > 0.6  # a = sqrt(0.55) ~ 0.74 on average
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)


def test_sample_faces_are_held_out_faces_of_known_identities(library):
    gen, emb = library
    big = np.flatnonzero(gen.sizes >= 5)[:200]
    q = gen.sample_faces(big, seed=11)
    assert q.shape == (len(big), 512) and q.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(q, gen.sample_faces(big, seed=11))
    assert not np.array_equal(q, gen.sample_faces(big, seed=12))
    sims = q @ emb.T
    assert sims.max() < 0.999  # new faces, not copies of library rows
    own = np.array([sims[i, gen.labels == p].mean() for i, p in enumerate(big)])
    other = np.array([sims[i, gen.labels != p].mean() for i, p in enumerate(big)])
    assert abs(own.mean() - 0.55) < 0.03 and abs(other.mean()) < 0.01


def test_out_parameter_and_validation():
    gen = SyntheticFaces(1000, dim=32, seed=0)
    out = np.zeros((1000, 32), dtype=np.float32)
    res = gen.embeddings(out=out)
    assert res is out and np.array_equal(out, gen.embeddings())
    with pytest.raises(ValueError):
        gen.embeddings(out=np.zeros((1000, 32), dtype=np.float64))
    with pytest.raises(ValueError):
        SyntheticParams(intra_mean=1.5)
    with pytest.raises(ValueError):
        SyntheticFaces(-1)
    e, l = make_identities(0, dim=16)
    assert e.shape == (0, 16) and l.shape == (0,)


def test_chunked_generation_matches_whole():
    gen = SyntheticFaces(40_000, dim=64, seed=9)  # several blocks and several chunks
    whole = gen.embeddings()
    parts = np.concatenate([f for _, f in gen.iter_blocks()])
    assert np.array_equal(whole, parts)
