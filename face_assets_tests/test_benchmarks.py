"""Tests of the benchmark package: the clustering metrics by hand, and the synthetic faces (determinism,
shapes, unit norm, calibrated similarity law, long tail)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from benchmarks.metrics import bcubed_per_face, bcubed_prf, clustering_metrics, pairwise_prf
from benchmarks.synthetic import (
    HARD_PARAMS,
    IDS_PER_BLOCK,
    NuisanceParams,
    SyntheticFaces,
    SyntheticParams,
    fit_params,
    make_identities,
    matched_stats,
    similarity_stats,
)

# The old law, for contrast: isotropic random directions, no mean, no clusters.
ISOTROPIC = dict(mean_share=0.0, identity_decay=0.0, noise_decay=0.0, noise_alignment=0.0, cluster_share=0.0)


def test_pairwise_and_bcubed_by_hand():
    pred, true = [0, 0, 1, 1], [0, 0, 0, 1]
    # Predicted pairs (0,1), (2,3); true pairs (0,1), (0,2), (1,2); one in common.
    assert pairwise_prf(pred, true) == pytest.approx((1 / 2, 1 / 3, 0.4))
    # BCubed per face: precision 1, 1, 1/2, 1/2; recall 2/3, 2/3, 1/3, 1.
    p, r, f = bcubed_prf(pred, true)
    assert (p, r) == pytest.approx((0.75, 2 / 3))
    per_p, per_r = bcubed_per_face(pred, true)
    assert per_p == pytest.approx([1, 1, 0.5, 0.5]) and per_r == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1])
    assert f == pytest.approx(2 * 0.75 * (2 / 3) / (0.75 + 2 / 3))
    assert pairwise_prf([0, 1, 2], [0, 0, 1])[0] == 1.0  # no predicted pair: nothing wrong
    m = clustering_metrics(["a", "a", "b"], [7, 7, 7])
    assert m["clusters"] == 2 and m["true_clusters"] == 1 and m["pairwise_recall"] == pytest.approx(1 / 3)
    assert clustering_metrics(true, true)["bcubed_f"] == 1.0


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
    a, b = rng.integers(0, len(emb), 10 * n), rng.integers(0, len(emb), 10 * n)
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


def test_similarities_follow_the_calibrated_law(library):
    gen, emb = library
    p = gen.params
    intra, inter = _pair_sims(emb, gen.labels, np.random.default_rng(0))
    assert abs(intra.mean() - p.intra_mean) < 0.02
    assert abs(intra.std() - 0.159) < 0.02  # intra_std plus the variation term: the real 0.159
    # Real different-person cosines (buffalo_s): mean 0.016, std 0.069, p99.9 0.250; the isotropic
    # law had N(0, 0.044).
    assert 0.005 < inter.mean() < 0.03
    assert abs(inter.std() - 0.069) < 0.008
    assert abs(np.percentile(inter, 99.9) - 0.25) < 0.04


def test_embeddings_are_structured_not_isotropic(library):
    gen, emb = library
    x = emb[::3].astype(np.float64)
    assert 0.08 < np.linalg.norm(x.mean(axis=0)) < 0.2  # not centred: a common mean direction
    ev = np.linalg.eigvalsh(np.cov(x.T))
    eff_dim = ev.sum() ** 2 / (ev**2).sum()
    assert 100 < eff_dim < 300  # anisotropic (512 if isotropic)
    assert 100 < gen.model.noise_dim < 300


def test_similarity_parameters_are_honoured():
    params = SyntheticParams(intra_mean=0.7, intra_std=0.08, person_spread=0.0)
    gen = SyntheticFaces(20_000, dim=512, seed=2, params=params)
    intra, _ = _pair_sims(gen.embeddings(), gen.labels, np.random.default_rng(1))
    assert abs(intra.mean() - 0.7) < 0.02
    assert abs(intra.std() - 0.08) < 0.02

    iso = SyntheticFaces(20_000, dim=512, seed=2, params=SyntheticParams(**ISOTROPIC))
    _, inter = _pair_sims(iso.embeddings(), iso.labels, np.random.default_rng(1))
    assert abs(inter.mean()) < 0.003 and abs(inter.std() - 1 / np.sqrt(512)) < 0.004


def test_long_tail_of_identity_sizes():
    gen = SyntheticFaces(100_000, seed=0)
    sizes = gen.sizes
    assert sizes.sum() == 100_000
    assert np.mean(sizes <= 3) > 0.75  # most people on one to three photos
    assert np.mean(sizes == 1) > 0.5
    assert np.sum(sizes >= 100) >= 20 and sizes.max() >= 300  # a few on hundreds
    assert sizes.max() <= SyntheticParams().max_faces_per_identity


def test_lookalike_centroids_are_close_to_a_partner():
    # Isotropic centroids, so that plain pairs never come near 0.3 and look-alikes stand out.
    params = SyntheticParams(**ISOTROPIC, lookalike_fraction=0.2, lookalike_cos=(0.35, 0.5))
    gen = SyntheticFaces(20_000, dim=512, seed=5, params=params)
    c = gen.centroids(np.arange(IDS_PER_BLOCK))  # partners always live in the same block
    cos = c @ c.T
    np.fill_diagonal(cos, 0)
    best = cos.max(axis=1)
    close = best > 0.3
    assert 0.2 <= close.mean() <= 0.45  # look-alikes and their partners
    assert best[close].min() >= 0.35 - 1e-3 and best.max() <= 0.5 + 1e-3

    plain = SyntheticFaces(20_000, dim=512, seed=5, params=SyntheticParams(**ISOTROPIC, lookalike_fraction=0.0))
    c = plain.centroids(np.arange(IDS_PER_BLOCK))
    cos = c @ c.T
    np.fill_diagonal(cos, 0)
    assert cos.max() < 0.3


def test_centroids_explain_faces(library):
    gen, emb = library
    ident = np.arange(50)
    c = gen.centroids(ident)
    own = np.einsum("ij,ij->i", emb[gen.offsets[ident]], c)
    assert own.mean() > 0.55  # a ~ sqrt(intra_mean) ~ 0.67 on average
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    # Regenerating a subset gives the same centroids as the whole block.
    np.testing.assert_allclose(gen.centroids([3, 49, 3]), c[[3, 49, 3]], atol=1e-6)


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
    assert abs(own.mean() - gen.params.intra_mean) < 0.04 and 0.0 < other.mean() < 0.035


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
        SyntheticParams(cluster_share=-0.1)
    with pytest.raises(ValueError):
        SyntheticFaces(-1)
    e, l = make_identities(0, dim=16)
    assert e.shape == (0, 16) and l.shape == (0,)
    e, _ = make_identities(500, dim=16, seed=1, intra_mean=0.8)  # keyword overrides of the params
    assert e.shape == (500, 16)


def test_chunked_generation_matches_whole():
    gen = SyntheticFaces(40_000, dim=64, seed=9)  # several blocks and several chunks
    whole = gen.embeddings()
    parts = np.concatenate([f for _, f in gen.iter_blocks()])
    assert np.array_equal(whole, parts)


@pytest.mark.slow
def test_fit_recovers_known_parameters():
    """fit_params on a synthetic 'real' set of known law moves the parameters to it."""
    truth = SyntheticParams(intra_mean=0.65, intra_std=0.1, person_spread=0.05, mean_share=0.1, identity_decay=0.9)
    sizes = np.full(40, 12)
    gen = SyntheticFaces(5000, dim=64, seed=21, params=truth)
    ids = np.random.default_rng(0).choice(gen.n_identities, len(sizes), replace=False)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    emb = gen.sample_faces(ids[labels], seed=3)
    fitted = fit_params(emb, labels, rounds=1, steps=6, replicates=3, seeds=(0,))
    assert abs(fitted.intra_mean - 0.65) < 0.06
    assert abs(fitted.mean_share - 0.1) < 0.06
    assert fitted.identity_decay > 0.5  # clearly anisotropic, as the truth


@pytest.mark.slow  # embeds the shared real faces when not cached
def test_defaults_match_the_real_embeddings(datasets):
    """The calibrated defaults against the real labelled faces, embedded as the calibration benchmark does.

    The benchmark's own cache (``data/cache``) is reused when it holds the current file list, else the
    faces are embedded once (about a minute) and cached there.
    """
    from benchmarks.synthetic_calibration import DEFAULT_CACHE, real_embeddings

    emb, labels, _ = real_embeddings(datasets, DEFAULT_CACHE, log=lambda _: None)
    real = similarity_stats(emb, labels)
    syn, _, _ = matched_stats(SyntheticParams(), np.unique(labels, return_counts=True)[1], replicates=8, seed=5)
    tolerance = {"same_mean": 0.03, "same_std": 0.02, "diff_mean": 0.01, "diff_std": 0.008, "diff_p99.9": 0.04}
    for stat, tol in tolerance.items():
        assert abs(syn[stat] - real[stat]) < tol, (stat, syn[stat], real[stat])


# -- the harder set: shared conditions and near-duplicates ----------------------------------------


@pytest.fixture(scope="module")
def plain_and_hard():
    """The plain set, the harder set, and the harder set's own faces before their conditions."""
    plain = SyntheticFaces(12_000, seed=11)
    hard = SyntheticFaces(12_000, seed=11, params=HARD_PARAMS)
    before = SyntheticFaces(12_000, seed=11, params=replace(HARD_PARAMS, nuisance=None))
    return plain.embeddings(), before.embeddings(), hard, hard.embeddings(), hard.conditions()


def _stranger_pairs(labels: np.ndarray, mask: np.ndarray, n: int, rng: np.random.Generator):
    rows = np.flatnonzero(mask)
    a, b = rng.choice(rows, n), rng.choice(rows, n)
    keep = labels[a] != labels[b]
    return a[keep], b[keep]


def test_strangers_sharing_a_condition_are_closer_than_in_the_plain_set(plain_and_hard):
    """Two different people photographed in the same poor condition (small compressed faces, B/W)
    are closer in the harder set than the same two faces before their conditions, and than
    strangers of the plain set; strangers photographed well are not."""
    xp, xb, hard, xh, cond = plain_and_hard
    rng = np.random.default_rng(0)

    def cosines(x, a, b):
        return np.einsum("ij,ij->i", x[a], x[b])

    def gain(mask):
        a, b = _stranger_pairs(hard.labels, mask, 20_000, rng)
        return float(np.mean(cosines(xh, a, b) - cosines(xb, a, b)))

    sharp = (cond["quality"] < 0.05) & ~cond["bw"] & (cond["yaw"] < 0.1)
    poor, grey = cond["quality"] > 0.6, cond["bw"] & (cond["quality"] < 0.05)
    assert 0.05 < poor.mean() < 0.4 and 0.02 < grey.mean() < 0.2 and sharp.mean() > 0.1
    assert gain(poor) > gain(sharp) + 0.01
    assert gain(grey) > gain(sharp) + 0.003
    assert abs(gain(sharp)) < 0.01
    a, b = _stranger_pairs(hard.labels, poor, 20_000, rng)
    pa, pb = _stranger_pairs(hard.labels, np.ones(len(xp), bool), 20_000, rng)
    assert cosines(xh, a, b).mean() > cosines(xp, pa, pb).mean() + 0.01


def test_near_duplicates_and_conditions(plain_and_hard):
    """Near-duplicates follow a photo of the same person at the drawn cosine, and share its
    conditions; a person of the older era has most of their photos in B/W."""
    _, _, hard, xh, cond = plain_and_hard
    dup = np.flatnonzero(cond["duplicate"])
    assert 0.02 < len(dup) / len(xh) < 0.05  # 5 % drawn, only after a photo of the same person
    assert np.all(hard.labels[dup] == hard.labels[dup - 1]) and not cond["duplicate"][dup - 1].any()
    cos = np.einsum("ij,ij->i", xh[dup], xh[dup - 1])
    lo, hi = HARD_PARAMS.nuisance.dup_cos
    assert np.all((cos > lo - 1e-4) & (cos < hi + 1e-4))
    for key in ("bw", "quality", "yaw"):
        assert np.array_equal(cond[key][dup], cond[key][dup - 1])
    per_person = np.bincount(hard.labels, cond["bw"]) / np.bincount(hard.labels)
    big = np.bincount(hard.labels) >= 10
    assert np.mean(per_person[big] > 0.5) > 0.05  # the older era's people
    assert np.mean(per_person[big] == 0) > 0.3
    np.testing.assert_allclose(np.linalg.norm(xh, axis=1), 1.0, atol=1e-5)


def test_harder_set_is_deterministic_by_seed():
    a = SyntheticFaces(12_000, dim=64, seed=4, params=HARD_PARAMS)
    b = SyntheticFaces(12_000, dim=64, seed=4, params=HARD_PARAMS)
    c = SyntheticFaces(12_000, dim=64, seed=5, params=HARD_PARAMS)
    ea, eb = a.embeddings(), b.embeddings()
    assert np.array_equal(ea, eb) and not np.array_equal(ea[:100], c.embeddings()[:100])
    assert np.array_equal(np.concatenate([f for _, f in a.iter_blocks()]), ea)  # chunked as whole
    ids = a.labels[::50]
    assert np.array_equal(a.sample_faces(ids, seed=2), b.sample_faces(ids, seed=2))
    assert not np.array_equal(a.sample_faces(ids, seed=2), a.sample_faces(ids, seed=3))
    with pytest.raises(ValueError):
        SyntheticFaces(100).conditions()
    with pytest.raises(ValueError):
        NuisanceParams(dup_cos=(0.9, 1.0))


def test_plain_set_is_unchanged_by_the_harder_one():
    """The default set is the same draws as before the harder set existed (values recorded from the
    generator without conditions), so every earlier benchmark figure stands for it."""
    gen = SyntheticFaces(20_000, seed=0)
    x = gen.embeddings()
    assert gen.n_identities == 4402 and gen.sizes[:8].tolist() == [11, 1, 2, 1, 1, 2, 1, 3]
    np.testing.assert_allclose(x[[0, 777, 19_999], :4], [[-0.0356, -0.1244, -0.0046, 0.0452],
                                                        [0.0867, -0.0777, -0.0302, -0.0011],
                                                        [0.0394, -0.0013, 0.0039, -0.0697]], atol=1e-4)
    np.testing.assert_allclose(gen.sample_faces([3, 400], seed=1)[:, :4], [[-0.0199, 0.0451, 0.0398, -0.0201],
                                                                         [-0.0396, 0.0389, -0.0215, 0.0430]],
                               atol=1e-4)


def test_immich_as_it_runs_follows_the_face_recognition_job():
    from benchmarks.cluster_scale import immich_as_it_runs

    rng = np.random.default_rng(0)
    e = np.eye(8, dtype=np.float32)

    def near(v: np.ndarray, count: int) -> np.ndarray:
        x = v + 0.05 * rng.standard_normal((count, 8)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    u = (e[0] + 1.2 * e[1]) / np.linalg.norm(e[0] + 1.2 * e[1])  # cosine 0.64 with the first person
    x = np.concatenate([
        near(e[0], 3),  # 0-2: a core person: the first face founds it, the others join it
        near(e[2], 2),  # 3-4: two faces only: not core, deferred, no person within reach: alone
        near(e[3], 1),  # 5: matches only itself: skipped
        near(u, 3),  # 6-8: core, but their 3 nearest have no person yet: the filtered search finds 0-2
    ])
    person, secs = immich_as_it_runs(x)
    assert len(set(person[[0, 1, 2, 6, 7, 8]])) == 1
    assert len(set(person[[0, 3, 4, 5]])) == 4
    assert secs["filtered_searches"] >= 2  # the first face (none found) and face 6
    # Core faces out of every person's reach found a person of their own.
    far = np.concatenate([x[:6], near(e[5], 3)])
    assert len(set(immich_as_it_runs(far)[0][[0, 6]])) == 2
