"""Person clustering: the method on synthetic faces, stable ids, constraints, and the library
end to end with real models, a real DuckDB file and real faiss."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import duckdb
import numpy as np
import pytest

from benchmarks.metrics import clustering_metrics
from benchmarks.synthetic import SyntheticFaces
from face_assets.cli import main as cli_main
from face_assets.cluster_means import ClusterMeans
from face_assets.clustering import (
    MeansIndex,
    assign_to_clusters,
    average_linkage,
    cluster_embeddings,
    cluster_means,
    cluster_quality,
    knn_graph,
    match_ids,
    merge_threshold,
    recluster_decision,
    split_kmeans,
)
from face_assets.errors import ClusterNotFoundError, CurationError, InvalidNameError
from face_assets.library import FaceRecognitionLibrary
from face_assets.persons import ClusterStore
from face_assets.store import Catalog

# -- by hand ---------------------------------------------------------------------------------------


def test_cluster_quality_by_hand():
    a = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 0, 1], [0, 0.28, 0.96]], np.float32)
    q = cluster_quality(a, np.array([0, 0, 5, 5]), sample=4)
    assert q["clusters"][0]["cohesion"] == pytest.approx(0.6, abs=1e-6)
    assert q["clusters"][5]["cohesion"] == pytest.approx(0.96, abs=1e-6)
    # Separation: 1 - mean of the cross cosines: (0 + 0 + 0.224 + 0.96*0.28=0.2688 ...) / 4.
    cross = (a[:2] @ a[2:].T).mean()
    assert q["clusters"][0]["separation"] == pytest.approx(1 - cross, abs=1e-6)
    assert -1 <= q["silhouette"] <= 1 and q["silhouette"] > 0.3


def test_merge_threshold_law():
    assert merge_threshold(1, 1, 0.5, 0.27, 1.0, 0.22) == pytest.approx(0.5)
    assert merge_threshold(1, 100, 0.5, 0.27, 1.0, 0.22) == pytest.approx(0.22 + 0.28 / 100)
    assert merge_threshold(10, 10, 0.5, 0.27, 1.0, 0.22) == pytest.approx(0.27 + 0.23 / 100)


# -- the method on synthetic faces -----------------------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    # At 6,000 faces one person has ~700 photos and half the pairs: pairwise figures swing with how
    # well that person is photographed (seed 3: a poorly photographed one, pairwise F 0.83).
    return SyntheticFaces(6000, seed=5)


@pytest.fixture(scope="module")
def synthetic(generator):
    return generator.embeddings(), generator.labels


def test_knn_graph_finds_true_neighbours(synthetic):
    x, _ = synthetic
    g = knn_graph(x, 10, pca_dim=128, list_size=256, nprobe=8)
    assert g.neighbors.shape == (len(x), 10) and (g.neighbors != np.arange(len(x))[:, None]).all()
    q = np.arange(0, len(x), 20)
    exact = np.argsort(-(x[q] @ x.T), axis=1)[:, 1:11]
    recall = np.mean([len(set(e) & set(f)) / 10 for e, f in zip(exact, g.neighbors[q])])
    assert recall > 0.6
    src, dst = g.edges()
    assert (src < dst).all() and len(np.unique(src.astype(np.int64) * len(x) + dst)) == len(src)


@pytest.mark.slow
def test_clustering_quality_and_baseline(synthetic):
    x, labels = synthetic
    res = cluster_embeddings(x)
    m = clustering_metrics(res.labels, labels)
    assert m["pairwise_f"] >= 0.9 and m["bcubed_f"] >= 0.9, m
    assert m["pairwise_precision"] >= 0.97
    # Connected components of the same graph at the singles' threshold chain people together.
    g = knn_graph(x, 16)
    src, dst = g.edges()
    keep = np.einsum("ij,ij->i", x[src], x[dst]) >= 0.3
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cc = connected_components(coo_matrix((np.ones(keep.sum()), (src[keep], dst[keep])), shape=(len(x),) * 2))[1]
    assert clustering_metrics(cc, labels)["pairwise_f"] < m["pairwise_f"]
    # Deterministic by seed.
    assert np.array_equal(cluster_embeddings(x).labels, res.labels)


@pytest.mark.slow
def test_constraints_are_honoured(synthetic):
    x, labels = synthetic
    g = knn_graph(x, 16)
    src, dst = g.edges()
    free = average_linkage(x, src, dst)
    big = np.argmax(np.bincount(labels))
    rows = np.flatnonzero(labels == big)
    a, b = rows[np.argsort(-(x[rows] @ x[rows].mean(0)))[:2]]  # two typical photos of the person
    assert free[a] == free[b]  # the same person, together without constraints
    other = np.flatnonzero(labels == (big + 1) % labels.max())[0]
    lab = average_linkage(x, src, dst, cannot_link=np.array([[a, b]]), must_link=np.array([[a, other]]))
    assert lab[a] != lab[b] and lab[a] == lab[other]
    # A must-link overrides a cannot-link on the same pair (the user's explicit decision).
    lab = average_linkage(x, src, dst, cannot_link=np.array([[a, other]]), must_link=np.array([[a, other]]))
    assert lab[a] == lab[other]


def test_means_pass_reaches_a_poor_photo_without_graph_edges():
    rng = np.random.default_rng(3)
    d, m = 512, 20

    def unit(v):
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

    centre = unit(rng.normal(size=d))
    noise = unit(rng.normal(size=(m + 1, d)))
    good = unit(0.8 * centre + 0.6 * noise[:m])
    poor = unit(0.5 * centre + 0.87 * noise[m])  # ~0.4 with each good photo: below tau_1, above tau_face
    strangers = unit(rng.normal(size=(50, d)))
    x = np.concatenate([good, poor[None], strangers])
    i, j = np.triu_indices(m, 1)  # the good photos are each other's neighbours; the poor one only has a stranger
    src = np.concatenate([i, [m]]).astype(np.int32)
    dst = np.concatenate([j, [m + 1]]).astype(np.int32)
    graph_only = average_linkage(x, src, dst, mean_k=0, join_ratio=0)
    assert len(set(graph_only[:m].tolist())) == 1 and graph_only[m] != graph_only[0]
    lab = average_linkage(x, src, dst, mean_k=8, join_ratio=0)
    assert lab[m] == lab[0]  # found through the person's mean
    assert len(set(lab[m + 1 :].tolist())) == 50  # the strangers stay apart


def test_a_face_alone_joins_the_cluster_it_is_clearly_closest_to():
    rng = np.random.default_rng(5)
    d, m = 512, 10

    def unit(v):
        return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)

    a, b = unit(rng.normal(size=(2, d)))
    good = np.concatenate([unit(0.75 * c + 0.66 * unit(rng.normal(size=(m, d)))) for c in (a, b)])
    dir_a, dir_b = unit(good[:m].mean(0)), unit(good[m:].mean(0))
    noise = rng.normal(size=(2, d))
    noise -= noise @ np.stack([dir_a, dir_b]).T @ np.linalg.pinv(np.stack([dir_a, dir_b]).T)  # orthogonal to both
    noise = unit(noise)
    # Cosine 0.37 with A's mean direction: an average cosine of ~0.29 with A's photos, below every threshold.
    poor = unit(0.37 * dir_a + np.sqrt(1 - 0.37**2) * noise[0])
    between = unit(0.5 * unit(dir_a + dir_b) + np.sqrt(1 - 0.5**2) * noise[1])  # ~0.36 with both: no clear choice
    x = np.concatenate([good, poor[None], between[None], unit(rng.normal(size=(20, d)))])
    src, dst = np.triu_indices(len(x), 1)
    off = average_linkage(x, src, dst, join_ratio=0)
    assert len({off[0], off[m]}) == 2 and off[2 * m] != off[0] and off[2 * m + 1] not in (off[0], off[m])
    lab = average_linkage(x, src, dst)
    assert lab[2 * m] == lab[0]  # the poor photo joins its person, the only cluster it stands out for
    assert lab[2 * m + 1] not in (lab[0], lab[m])  # between two people: stays alone
    assert len(set(lab[2 * m + 2 :].tolist())) == 20 and not set(lab[2 * m + 2 :]) & {lab[0], lab[m]}
    # Unless a cannot-link (e.g. the same photo) forbids it.
    kept = average_linkage(x, src, dst, cannot_link=np.array([[2 * m, 3]]))
    assert kept[2 * m] != kept[0]
    # Incremental assignment follows the same rule.
    c_ids, means, sizes = cluster_means(x[: 2 * m], off[: 2 * m])
    best, _ = assign_to_clusters(x[2 * m : 2 * m + 2], means, sizes)
    assert c_ids[best[0]] == off[0] and best[1] == -1
    assert assign_to_clusters(x[2 * m : 2 * m + 1], means, sizes, join_ratio=0)[0][0] == -1


def test_match_ids_stable_split_merge():
    old_faces = np.array([1, 2, 3, 4, 5, 6])
    old_ids = np.array([10, 10, 10, 20, 20, 30])
    # Same partition plus a new face in cluster 20 and a new person: ids kept, one fresh id.
    new_faces = np.array([1, 2, 3, 4, 5, 6, 7, 8])
    ids, nxt = match_ids(old_faces, old_ids, new_faces, np.array([0, 0, 0, 1, 1, 2, 1, 3]), 31)
    assert ids.tolist() == [10, 10, 10, 20, 20, 30, 20, 31] and nxt == 32
    # Split of 10 (larger part keeps it) and merge of 20 + 30 (largest old part's id).
    ids, nxt = match_ids(old_faces, old_ids, old_faces, np.array([0, 0, 1, 2, 2, 2]), 31)
    assert ids.tolist() == [10, 10, 31, 20, 20, 20] and nxt == 32
    ids, _ = match_ids(np.zeros(0), np.zeros(0), new_faces, np.array([5, 5, 1, 1, 2, 2, 3, 3]), 1)
    assert ids.tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_incremental_assignment_agrees(synthetic, generator):
    x, labels = synthetic
    base = cluster_embeddings(x)
    c_ids, means, sizes = cluster_means(x, base.labels)
    # Fresh photos of people with 5 photos or more: most join, and join their own person.
    known = np.flatnonzero(generator.sizes >= 5)
    best, score = assign_to_clusters(generator.sample_faces(known, seed=9), means, sizes)
    joined = best >= 0
    assert joined.mean() > 0.7 and (score[joined] > 0.22).all()
    majority = {c: np.bincount(labels[base.labels == c]).argmax() for c in np.unique(c_ids[best[joined]])}
    assert np.mean([majority[c] == t for c, t in zip(c_ids[best[joined]], known[joined])]) > 0.95
    # Photos of people never seen mostly become candidates for new persons.
    stranger = SyntheticFaces(2000, seed=4)
    best, _ = assign_to_clusters(stranger.embeddings()[::10], means, sizes)
    assert (best < 0).mean() > 0.9



def test_means_index_inverted_lists_find_the_best_mean():
    # The index is built once, searched per batch.
    rng = np.random.default_rng(3)
    means = rng.standard_normal((60_000, 64), dtype=np.float32)
    means *= (rng.uniform(0.3, 1.0, len(means)) / np.linalg.norm(means, axis=1)).astype(np.float32)[:, None]
    # Above 8,192 means: lists of ~256 means, 16 of them probed (assignment pays its search per
    # face): 256 lists of ~234 means here, a query compares itself with 6 % of the means and still
    # mostly finds its mean (isotropic random means are the hard case for lists; what it costs on
    # faces is measured by benchmarks/cluster_scale.py). Probing more lists finds more.
    index = MeansIndex(means)
    assert len(index.centroids) == 256 and len(index) == len(means) and np.bincount(index.home).max() < 2_000
    target = rng.choice(len(means), 300, replace=False)
    q = means[target] / np.linalg.norm(means[target], axis=1, keepdims=True)
    q += 0.05 * rng.standard_normal(q.shape, dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    exact_s, exact_i = np.sort(q @ means.T, axis=1)[:, ::-1][:, :3], np.argmax(q @ means.T, axis=1)
    ds, di = index.search(q, 3)
    assert np.mean(di[:, 0] == exact_i) > 0.8
    found = di[:, 0] == exact_i
    np.testing.assert_allclose(ds[found, 0], exact_s[found, 0], rtol=1e-4)
    wide = MeansIndex(means, nprobe=64)
    assert np.mean(wide.search(q, 3)[1][:, 0] == exact_i) > 0.95
    # assign_to_clusters with the kept index gives what it computes without one.
    sizes = np.full(len(means), 50)
    assert (assign_to_clusters(q, means, sizes, index=index)[0] == assign_to_clusters(q, means, sizes)[0]).all()
    # Below 8,192 means the search is exact.
    assert MeansIndex(means[:8_192]).centroids is None


class _Clusters:
    """Cluster rows as the person store holds them (id, size, write time, mean), for ClusterMeans."""

    def __init__(self, ids: np.ndarray, means: np.ndarray, sizes: np.ndarray):
        self.rows = {int(c): (int(n), 1, m) for c, m, n in zip(ids, means, sizes)}
        self.clock = 1

    def write(self, cluster_id: int, mean: np.ndarray, size: int) -> None:
        self.clock += 1
        self.rows[int(cluster_id)] = (size, self.clock, np.asarray(mean, np.float32))

    def stamps(self):
        ids = np.array(sorted(self.rows), np.int64)
        return ids, np.array([self.rows[i][0] for i in ids], np.int64), np.array([self.rows[i][1] for i in ids], np.int64)

    def fetch(self, ids):
        ids = np.array(sorted(self.rows if ids is None else set(ids.tolist()) & set(self.rows)), np.int64)
        d = len(next(iter(self.rows.values()))[2])
        means = np.array([self.rows[i][2] for i in ids], np.float32).reshape(len(ids), d)
        return ids, *self.stamps_of(ids), means

    def stamps_of(self, ids):
        return np.array([self.rows[i][0] for i in ids], np.int64), np.array([self.rows[i][1] for i in ids], np.int64)

    def assign(self, queries: np.ndarray, kept=None) -> tuple[np.ndarray, np.ndarray]:
        """Cluster ids and scores, from ``kept`` (a ClusterMeans) or from every mean searched exactly."""
        if kept is not None:
            best, score = assign_to_clusters(queries, None, kept.sizes, index=kept.means, group_index=kept.groups,
                                             group_rows=np.arange(len(kept.ids)))
            return np.where(best >= 0, kept.ids[np.maximum(best, 0)], -1), score
        ids, sizes, _, means = self.fetch(None)
        best, score = assign_to_clusters(queries, means, sizes)
        return np.where(best >= 0, ids[np.maximum(best, 0)], -1), score


def _generation(folder: Path) -> int:
    return json.loads((folder / "state.json").read_text())["generation"]


def test_kept_means_follow_the_clusters_that_changed(synthetic, generator, tmp_path):
    x, labels = synthetic
    store = _Clusters(*cluster_means(x, labels))
    folder = tmp_path / "cluster_means"

    def current():
        return ClusterMeans.current(folder, store.stamps(), store.fetch, "m1", x.shape[1], min_rows=0)

    queries = generator.sample_faces(np.flatnonzero(generator.sizes >= 2), seed=11)
    kept = current()
    assert _generation(folder) == 1 and kept.patched == 0
    (ids, score), (expected, expected_score) = store.assign(queries, kept), store.assign(queries)
    assert (ids == expected).all() and np.allclose(score, expected_score, atol=1e-6)
    # A few persons change: one grows (a new mean and size), two go, a new one comes.
    grown, *gone = (int(c) for c in np.unique(labels)[:3])
    store.write(grown, x[labels == grown].mean(0) * 0.9, int((labels == grown).sum()) + 1)
    for c in gone:
        del store.rows[c]
    store.write(10_000, x[labels == gone[0]].mean(0), int((labels == gone[0]).sum()))
    kept = current()
    assert _generation(folder) == 1 and kept.patched == 5  # 3 saved rows superseded, 2 added; files untouched
    ids, score = store.assign(queries, kept)
    expected, expected_score = store.assign(queries)
    assert (ids == expected).all() and np.allclose(score, expected_score, atol=1e-6)
    assert not set(ids.tolist()) & set(gone) and 10_000 in ids
    # Enough changes: the files are rewritten with them, and read back give the same answers.
    for c in list(store.rows)[: len(store.rows) // 10]:
        store.write(c, store.rows[c][2], store.rows[c][0])
    kept = current()
    assert _generation(folder) == 2
    reread = ClusterMeans.load(folder, "m1", x.shape[1])
    assert reread.patched == 0 and (store.assign(queries, reread)[0] == store.assign(queries)[0]).all()
    assert len(list(folder.glob("1.*.npy"))) == 0  # the older generation is gone
    # Most rows changed (a full re-clustering), or another model, or damaged files: built again.
    for c in list(store.rows):
        store.write(c, store.rows[c][2], store.rows[c][0])
    current()
    assert _generation(folder) == 3
    assert ClusterMeans.load(folder, "m2", x.shape[1]) is None
    (folder / "3.means.npy").write_bytes(b"damaged")
    assert ClusterMeans.load(folder, "m1", x.shape[1]) is None
    assert (store.assign(queries, current())[0] == store.assign(queries)[0]).all() and _generation(folder) == 4


def test_kept_means_over_inverted_lists_find_changed_clusters():
    # Above 50,000 means the kept rows are searched by inverted lists, the patched ones exactly.
    rng = np.random.default_rng(5)
    n, d = 60_000, 64
    means = rng.standard_normal((n, d), dtype=np.float32)
    means *= (rng.uniform(0.5, 0.9, n) / np.linalg.norm(means, axis=1)).astype(np.float32)[:, None]
    store = _Clusters(np.arange(1, n + 1), means, np.full(n, 5))
    kept = ClusterMeans.build(store.fetch, "m1")
    assert _base_lists(kept) > 1
    moved = rng.choice(n, 50, replace=False) + 1
    for c in moved:
        store.write(c, -store.rows[int(c)][2], 6)  # the opposite direction: found only by the patch
    ids, sizes, stamps = store.stamps()
    assert kept.patch((ids, sizes, stamps), store.fetch) and kept.patched == 100  # 50 superseded, 50 added
    q = np.array([store.rows[int(c)][2] for c in moved])
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, rows = kept.means.search(q, 3)
    assert (kept.ids[rows[:, 0]] == moved).all()
    # The superseded rows are never found, even by their old mean.
    superseded = np.flatnonzero(kept.sizes == 0)
    assert len(superseded) == 50
    _, rows = kept.means.search(-q, 3)
    assert (rows[:, 0] >= 0).all() and not np.isin(rows, superseded).any()


def _base_lists(kept) -> int:
    return len(kept.means.centroids)


def test_split_kmeans_and_policy(synthetic):
    x, labels = synthetic
    two = np.flatnonzero(np.isin(labels, np.argsort(-np.bincount(labels))[:2]))
    parts = split_kmeans(x[two], 2)
    assert clustering_metrics(parts, labels[two])["pairwise_f"] > 0.9
    with pytest.raises(ValueError):
        split_kmeans(x[:3], 5)
    assert recluster_decision(faces_now=10, faces_at_last_run=0, unassigned_since=0, days_since=None).recluster
    calm = recluster_decision(faces_now=105, faces_at_last_run=100, unassigned_since=1, days_since=2)
    assert not calm.recluster and calm.reasons == []
    grown = recluster_decision(faces_now=130, faces_at_last_run=100, unassigned_since=1, days_since=2)
    assert grown.recluster and "grew" in grown.reasons[0]
    drift = recluster_decision(faces_now=105, faces_at_last_run=100, unassigned_since=10, days_since=2)
    assert drift.recluster and "unassigned" in drift.reasons[0]
    assert recluster_decision(faces_now=100, faces_at_last_run=100, unassigned_since=0, days_since=1,
                              model_changed=True).recluster


# -- the library end to end (real models, DuckDB file, faiss) ---------------------------------------


@pytest.fixture(scope="module")
def people(datasets) -> dict[str, list[Path]]:
    root = datasets / "real" / "lfw10"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    return {n: sorted((root / n).glob("*.jpg"))[:6] for n in names}


@pytest.fixture(scope="module")
def twice(people, tmp_path_factory) -> Path:
    """One photo holding the same face twice: without the same-photo rule they would be one person."""
    src = people[sorted(people)[0]][0]
    img = cv2.imread(str(src))
    path = tmp_path_factory.mktemp("composite") / "twice.jpg"
    cv2.imwrite(str(path), cv2.hconcat([img, cv2.flip(img, 1)]))
    return path


@pytest.fixture(scope="module")
def lib_dir(tmp_path_factory, people, twice) -> Path:
    folder = tmp_path_factory.mktemp("lib")
    with FaceRecognitionLibrary(index_dir=folder) as lib:
        lib.index_batch([p for paths in people.values() for p in paths[:4]] + [twice])
    return folder


def _person_of(lib: FaceRecognitionLibrary, people: dict[str, list[Path]]) -> dict[int, str]:
    rows = lib.catalog.query("SELECT f.face_id, i.path FROM faces f JOIN images i USING (image_id) WHERE f.is_valid")
    return {fid: next((n for n in people if f"/{n}/" in path), "twice") for fid, path in rows}


def test_library_cluster_persist_search(lib_dir, people, twice):
    with FaceRecognitionLibrary(index_dir=lib_dir) as lib:
        run = lib.cluster()
        person = _person_of(lib, people)
        assert run.kind == "full" and run.faces == len(person) and run.clusters >= 3
        assert run.quality["cohesion"] > 0.3 and run.quality["silhouette"] is not None
        clusters = lib.list_clusters(min_size=2)
        # Every multi-face cluster is one person; each person has one main cluster.
        for c in clusters:
            info = lib.get_cluster(c.cluster_id)
            assert len({person[f] for f in info.face_ids} - {"twice"}) == 1
            assert info.representative_face_id in info.face_ids and info.cohesion > 0.2
        # The two copies of one face in one photo are two clusters (same-photo cannot-link).
        pair = [f for f, p in person.items() if p == "twice"]
        assert len(pair) == 2
        assert lib.catalog.query("SELECT count(DISTINCT cluster_id) FROM face_clusters WHERE face_id IN (?, ?)",
                                 pair)[0][0] == 2
        hits = lib.search(people[sorted(people)[1]][0], top_k=3)
        assert hits and all(h.cluster_id is not None for h in hits)
        assert hits[0].cluster_id == lib.catalog.query(
            "SELECT cluster_id FROM face_clusters WHERE face_id = ?", [hits[0].face_id])[0][0]
        ids_before = dict(lib.catalog.query("SELECT face_id, cluster_id FROM face_clusters"))
        again = lib.cluster()
        assert again.id_changed == 0.0
        assert dict(lib.catalog.query("SELECT face_id, cluster_id FROM face_clusters")) == ids_before
    with Catalog(lib_dir / "face_assets.duckdb", read_only=True) as cat:  # a real file, reopened
        tables = {r[0] for r in cat.query("SELECT table_name FROM information_schema.tables")}
        assert {"clusters", "face_clusters", "cluster_constraints", "cluster_runs"} <= tables
        assert cat.query("SELECT count(*) FROM cluster_runs WHERE kind = 'full'")[0][0] == 2
        assert ClusterStore(cat).face_cluster_map()[0].tolist() == sorted(ids_before)


def test_curation_survives_reclustering(lib_dir, people):
    with FaceRecognitionLibrary(index_dir=lib_dir) as lib:
        lib.cluster()
        person = _person_of(lib, people)
        a, b = [max((c for c in lib.list_clusters(min_size=2)
                     if person[lib.get_cluster(c.cluster_id).face_ids[0]] == n), key=lambda c: c.size)
                for n in sorted(people)[:2]]
        merged = lib.merge([a.cluster_id, b.cluster_id])
        assert merged.size == a.size + b.size and merged.cluster_id in (a.cluster_id, b.cluster_id)
        lib.rename(merged.cluster_id, "Both")
        lib.cluster()
        kept = lib.get_cluster(merged.cluster_id)
        assert set(merged.face_ids) <= set(kept.face_ids) and kept.label == "Both"

        moved = lib.get_cluster(merged.cluster_id).face_ids[0]
        c = next(c for c in lib.list_clusters() if c.cluster_id != merged.cluster_id)
        lib.move(moved, c.cluster_id)
        parts = lib.split(merged.cluster_id, k=2)
        assert len(parts) == 2 and sum(p.size for p in parts) == merged.size - 1
        lib.cluster()
        assert moved in lib.get_cluster(c.cluster_id).face_ids
        for p in parts:  # each part is still together, under its id, and the parts stay apart
            assert set(p.face_ids) <= set(lib.get_cluster(p.cluster_id).face_ids)

        with pytest.raises(ClusterNotFoundError):
            lib.get_cluster(10**9)
        with pytest.raises(CurationError):
            lib.merge([merged.cluster_id])
        with pytest.raises(CurationError):
            lib.split(parts[0].cluster_id, face_ids=[moved])


@pytest.fixture()
def curated(lib_dir, tmp_path) -> Iterator[FaceRecognitionLibrary]:
    """A freshly clustered copy of ``lib_dir``, without the curation other tests stored there."""
    folder = tmp_path / "lib"
    shutil.copytree(lib_dir, folder)
    with FaceRecognitionLibrary(index_dir=folder) as lib:
        lib.persons.store.clear()
        with lib.catalog.db.write() as con:
            con.execute("DELETE FROM audit_log; DELETE FROM audit_persons")
        lib.cluster()
        yield lib


def _where(lib: FaceRecognitionLibrary) -> dict[int, int]:
    return dict(lib.catalog.query("SELECT face_id, cluster_id FROM face_clusters"))


def test_split_makes_the_chosen_faces_the_new_person(curated):
    lib = curated
    big = lib.list_clusters(min_size=3)[0]
    lib.rename(big.cluster_id, "Ada")
    faces = lib.get_cluster(big.cluster_id).face_ids
    chosen = faces[: len(faces) - 1]  # the larger part is chosen: it still becomes the new person
    kept, new = lib.split(big.cluster_id, face_ids=chosen, actor="ann")
    assert (kept.cluster_id, kept.label, kept.face_ids) == (big.cluster_id, "Ada", faces[-1:])
    assert new.cluster_id not in (c.cluster_id for c in lib.list_clusters() if c.cluster_id != new.cluster_id)
    assert new.label is None and new.face_ids == chosen
    entry = lib.curation_log(limit=1)[0]
    assert (entry["actor"], entry["action"], entry["cluster_id"], entry["parts"]) == ("ann", "split", big.cluster_id,
                                                                                      [new.cluster_id])
    lib.cluster()  # the decision survives a full run
    assert set(chosen) <= set(lib.get_cluster(new.cluster_id).face_ids)
    assert faces[-1] not in lib.get_cluster(new.cluster_id).face_ids


def test_curation_publishes_the_constraints_of_the_faces_it_touched(curated):
    """Merges, a split, a move and a face's removal each publish the constraint rows of the faces
    they touched (a delta segment), not the whole table, and readers see the master's rows after each."""
    lib, db = curated, curated.catalog.db
    sql = "SELECT face_a, face_b, kind FROM cluster_constraints ORDER BY ALL"

    def check() -> tuple[int, bool, int]:
        """Rows and base flag of the latest constraints segment, and the table's rows, once the
        published table is the master's."""
        db.publish()
        with db.read() as con:
            master = con.execute(sql).fetchall()
            last = con.execute("SELECT rows, base FROM _segments WHERE tbl = 'cluster_constraints' "
                               "ORDER BY seg DESC LIMIT 1").fetchone()
        reader = duckdb.connect(str(db.published), read_only=True)
        try:
            assert reader.execute(sql).fetchall() == master
        finally:
            reader.close()
        return last[0], last[1], len(master)

    persons = lib.list_clusters(min_size=2)
    merges = []
    for a, b in zip(persons[0:8:2], persons[1:8:2]):  # decisions on eight persons
        merges.append(lib.merge([a.cluster_id, b.cluster_id]))
        check()
    merged = lib.get_cluster(merges[0].cluster_id)  # four faces or more
    actions = [lambda: lib.split(merged.cluster_id, face_ids=merged.face_ids[:1]),
               lambda: lib.move_faces(merged.face_ids[1:2], merges[1].cluster_id),
               lambda: lib.remove(int(merged.face_ids[2]))]
    for action in actions:
        action()
        rows, base, total = check()
        assert not base and rows < total, (rows, base, total)  # the touched faces' rows only


def test_moving_many_faces_is_one_write_and_checks_where_they_were(curated, monkeypatch):
    lib = curated
    a, b = lib.list_clusters(min_size=2)[:2]
    faces = lib.get_cluster(a.cluster_id).face_ids
    writes, depth = [], []
    real = lib.catalog.db.write

    @contextmanager
    def counted():  # counts the outermost write sessions (transactions), not the nested ones joining them
        writes.append(not depth)
        depth.append(1)
        try:
            with real() as con:
                yield con
        finally:
            depth.pop()

    monkeypatch.setattr(lib.catalog.db, "write", counted)
    with pytest.raises(CurationError, match="not in person"):  # chosen on b, but they are a's faces
        lib.move_faces(faces, a.cluster_id, from_cluster=b.cluster_id)
    before = _where(lib)
    writes.clear()
    moved = lib.move_faces(faces, b.cluster_id, from_cluster=a.cluster_id, actor="ann")
    assert sum(writes) == 1  # the faces, the constraints, both persons' rows and the audit entry: one write
    assert moved.size == b.size + len(faces) and set(faces) <= set(moved.face_ids)
    with pytest.raises(ClusterNotFoundError):  # a was emptied: it is gone
        lib.get_cluster(a.cluster_id)
    entry = lib.curation_log(limit=1, cluster_id=a.cluster_id)[0]
    assert entry["action"] == "move" and entry["face_ids"] == sorted(faces) and entry["cluster_ids"] == sorted(
        [a.cluster_id, b.cluster_id])
    writes.clear()
    lib.undo(entry["id"], actor="bob")  # the emptied person comes back under its id
    assert sum(writes) == 1 and _where(lib) == before and lib.get_cluster(a.cluster_id).size == a.size
    writes.clear()
    kept = lib.merge([a.cluster_id, b.cluster_id])
    assert sum(writes) == 1
    writes.clear()
    lib.split(kept.cluster_id, kept.face_ids[: kept.size // 2])
    assert sum(writes) == 1


def test_undo_merge_split_rename_and_redo(curated):
    lib = curated
    a, b, c = lib.list_clusters(min_size=2)[:3]
    lib.rename(a.cluster_id, "Ada")
    lib.rename(b.cluster_id, "Bob")
    start = _where(lib)
    merged = lib.merge([a.cluster_id, b.cluster_id], actor="ann")
    merge_entry = lib.curation_log(limit=1)[0]
    assert merge_entry["action"] == "merge" and merge_entry["kept"] == merged.cluster_id
    undo = lib.undo(merge_entry["id"], actor="bob")
    assert (undo["action"], undo["undoes"], undo["actor"]) == ("undo", merge_entry["id"], "bob")
    assert _where(lib) == start  # every face back in its person, under its id
    assert (lib.get_cluster(a.cluster_id).label, lib.get_cluster(b.cluster_id).label) == ("Ada", "Bob")
    with pytest.raises(CurationError, match="already undone"):
        lib.undo(merge_entry["id"])
    lib.undo(undo["id"])  # undoing the undo merges again
    assert set(lib.get_cluster(merged.cluster_id).face_ids) == set(merged.face_ids)

    faces = lib.get_cluster(c.cluster_id).face_ids
    lib.split(c.cluster_id, face_ids=faces[:1])
    lib.undo(lib.curation_log(limit=1)[0]["id"])
    assert lib.get_cluster(c.cluster_id).face_ids == faces

    lib.rename(c.cluster_id, "Cy")
    rename = lib.curation_log(limit=1)[0]
    lib.rename(c.cluster_id, "Cyril")  # renamed again since: undoing the first rename leaves the name alone
    with pytest.raises(CurationError, match="nothing of change"):
        lib.undo(rename["id"])
    assert lib.get_cluster(c.cluster_id).label == "Cyril"
    lib.undo(lib.curation_log(limit=1)[0]["id"])
    assert lib.get_cluster(c.cluster_id).label == "Cy"
    with pytest.raises(CurationError, match="no change"):
        lib.undo(10**9)
    history = lib.curation_log(limit=100, cluster_id=c.cluster_id)
    assert [e["action"] for e in history] == ["undo", "rename", "rename", "undo", "split"]
    older = lib.curation_log(limit=2, before=history[1]["id"], cluster_id=c.cluster_id)
    assert [e["id"] for e in older] == [e["id"] for e in history[2:4]]  # keyset paging


def test_names_are_normalised_and_found_by_the_store(curated):
    lib = curated
    persons = lib.list_clusters()
    a = persons[0]
    assert lib.rename(a.cluster_id, "  Jose\u0301   Mari  ").label == "Jos\u00e9 Mari"  # NFC, spaces folded
    for bad in ["evil\u202e", "a\x00b", "two\nlines", "x" * 201, "\u2066iso"]:
        with pytest.raises(InvalidNameError):
            lib.rename(a.cluster_id, bad)
    assert lib.get_cluster(a.cluster_id).label == "Jos\u00e9 Mari"
    assert len(lib.curation_log(limit=100)) == 1  # refused names wrote nothing
    assert lib.rename(a.cluster_id, "   ").label is None  # blank clears
    lib.rename(persons[1].cluster_id, "100%_real")
    total, found = lib.find_persons("JOS")
    assert total == 0  # the name was cleared
    lib.rename(a.cluster_id, "Josiane")
    total, found = lib.find_persons("jos")
    assert total == 1 and [p.cluster_id for p in found] == [a.cluster_id]
    assert lib.find_persons("%_")[0] == 1  # LIKE wildcards are plain characters
    assert lib.find_persons("0%")[0] == 1 and lib.find_persons("1_0")[0] == 0
    total, page = lib.find_persons(f"#{persons[2].cluster_id}")
    assert [p.cluster_id for p in page] == [persons[2].cluster_id]
    total, page = lib.find_persons("", limit=2, offset=1)
    assert total == len(persons) and [p.cluster_id for p in page] == [p.cluster_id for p in persons[1:3]]
    assert lib.find_persons("", limit=2, offset=10_000) == (len(persons), [])
    info = lib.get_cluster(a.cluster_id, limit=1, offset=1)
    assert info.face_ids == lib.get_cluster(a.cluster_id).face_ids[1:2]


def test_new_faces_of_one_photo_never_join_one_person(curated, people):
    lib = curated
    person = _person_of(lib, people)
    pair = sorted(f for f, p in person.items() if p == "twice")
    first = sorted(people)[0]  # the person photographed twice in one photo
    # Both faces arrive again: each is a copy of a photo of a person with a cluster, so each would join it.
    lib.persons.store.forget_faces(pair)
    run = lib.assign_new()
    where = _where(lib)
    theirs = {where[f] for f, p in person.items() if p == first}
    assert run.new_faces == 2 and where[pair[0]] != where[pair[1]]
    assert {where[pair[0]], where[pair[1]]} & theirs  # the closer one joined the person


@pytest.mark.slow
def test_incremental_and_policy(tmp_path, people):
    with FaceRecognitionLibrary(index_dir=tmp_path) as lib:
        lib.index_batch([p for paths in people.values() for p in paths[:4]])
        lib.cluster()
        person = _person_of(lib, people)
        main = {}
        for c in lib.list_clusters(min_size=2):
            main.setdefault(person[lib.get_cluster(c.cluster_id).face_ids[0]], c.cluster_id)
        lib.index_batch([p for paths in people.values() for p in paths[4:]])
        assert lib.recluster_policy().recluster  # grew by far more than 20 %
        run = lib.assign_new()
        assert run.kind == "incremental" and run.new_faces >= len(people)
        person = _person_of(lib, people)
        new = lib.catalog.query("SELECT face_id, cluster_id FROM face_clusters WHERE source = 'assign'")
        joined = [main.get(person[f]) == c for f, c in new]
        assert len(new) == run.new_faces and np.mean(joined) >= 0.5
        assert lib.assign_new().new_faces == 0  # idempotent
        nothing = lib.update_clusters()  # the policy still says re-cluster: a full run
        assert nothing.kind == "full" and not lib.recluster_policy().recluster


def test_cli_cluster_commands(lib_dir, capsys):
    base = ["--data-dir", str(lib_dir), "cluster"]
    assert cli_main(base + ["run", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["kind"] == "full" and run["clusters"] >= 3
    assert cli_main(base + ["list", "--min-size", "2", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed and all(c["size"] >= 2 for c in listed)
    cid = listed[0]["cluster_id"]
    assert cli_main(base + ["rename", str(cid), "--label", "Ann", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "Ann"
    assert cli_main(base + ["show", str(cid), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["label"] == "Ann" and len(shown["face_ids"]) == shown["size"]
    assert cli_main(base + ["show", "999999999"]) == 1  # typed error, message on stderr
    assert "no cluster" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(base + ["merge", str(cid)])
