"""Person clustering of face embeddings: kNN graph, average-linkage merging, stable ids.

The method (decision and evidence: ``docs/clustering.md``):

1. **kNN graph** (:func:`knn_graph`). Embeddings are projected on their top ``pca_dim`` principal
   axes (uncentred, so reduced inner products estimate cosines), spread over ~``n / list_size``
   spherical k-means lists, and every face is compared with the members of its ``nprobe`` nearest
   lists: one BLAS product per list (faiss' exhaustive k-NN), the best ``k`` kept per face. The
   projection (256 of 512 dimensions) halves the arithmetic of the join. Memory stays at
   ``n x (pca_dim + 2 k)`` numbers besides the input.
2. **Average-linkage merging** (:func:`average_linkage`) on that graph. Clusters carry the sum of
   their embeddings, so the average cosine between two clusters, ``sum_A . sum_B / (|A| |B|)``, is
   exact in the full dimension whatever the graph's precision. Each round every cluster picks its
   best neighbour above a size-dependent threshold (:func:`merge_threshold`): two single faces
   need a cosine the ~2M strangers of a face almost never reach, while large clusters, whose
   average is precise, merge at a lower average. Mutually best pairs
   merge, and with them the clusters that point at either (one level, no chains). Must-link
   groups start merged; cannot-link pairs (two faces of one photo, curation) never end up together.
   When the graph's candidates are exhausted, every face still alone gets candidates from a search
   over the cluster means (that of incremental assignment) and merging resumes: a poor photo's
   nearest faces are strangers, its person's mean is not. Last, a face still alone joins the
   cluster of 2+ faces it is clearly closest to (its cosine with that cluster's mean direction
   ``join_ratio`` times that with the next one): a poor photo is far from every cluster, but
   not equally far.
3. **Stable ids** (:func:`match_ids`): a new clustering inherits, cluster by cluster, the id of the
   old cluster it overlaps most (one-to-one, largest overlaps first).
4. **Incremental assignment** (:func:`assign_to_clusters`): a new face joins the cluster whose mean
   gives the best average cosine when it reaches ``tau(1, |C|)``, the merge criterion itself, so
   assignment agrees with a full re-clustering; then the same clear-best rule; the others are
   clustered among themselves.

Also here: cluster quality (:func:`cluster_quality`), k-means sub-clusters for an automatic split
(:func:`split_kmeans`) and the drift policy for full re-clustering (:func:`recluster_decision`).
Pure computations on arrays; persistence lives in :mod:`face_assets.persons`, the API in :mod:`face_assets.library`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .config import ClusteringSettings
from .process import faiss  # loaded on first use, after the process settings (OpenMP's wait policy)

__all__ = [
    "KnnGraph",
    "ClusteringResult",
    "knn_graph",
    "average_linkage",
    "cluster_embeddings",
    "merge_threshold",
    "match_ids",
    "assign_to_clusters",
    "cluster_means",
    "MeansIndex",
    "clear_best_index",
    "split_kmeans",
    "cluster_quality",
    "recluster_decision",
    "ReclusterDecision",
]

_SEED = 1234
_DEFAULTS = ClusteringSettings()  # the one place the method's defaults are set (and documented)
_PCA_SAMPLE = 100_000  # rows used to estimate the projection
_TRAIN_PER_LIST = 40  # k-means sample per list (faiss wants >= 39)
_CHUNK = 65_536  # rows per chunk of the projection and the scoring passes
#: :class:`MeansIndex` parameters of the searches a full run makes once over its own means (the
#: candidates from cluster means, the clear-best joins): every face left alone is a query, so a
#: query's cost, ``nprobe x list_size`` means, is what the pass costs (docs/clustering.md).
_RUN_SEARCH: dict = {"nprobe": 32, "list_size": 256, "max_lists": 16_384, "exact_max": 16_384}


def _log_default(msg: str) -> None:  # noqa: ARG001 - silent unless a logger is given
    return None


# -- kNN graph -------------------------------------------------------------------------------------


@dataclass
class KnnGraph:
    """Approximate k nearest neighbours of every face (rows of the input).

    Attributes:
        neighbors: int32 [n, k] row indices, best first; -1 where fewer were found.
        scores: float32 [n, k] reduced-space inner products (estimates of the cosines).
        seconds: wall time per stage.
    """

    neighbors: np.ndarray
    scores: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique undirected edges ``(src, dst)``, int32, ``src < dst``."""
        n, k = self.neighbors.shape
        src = np.repeat(np.arange(n, dtype=np.int64), k)
        dst = self.neighbors.reshape(-1).astype(np.int64)
        ok = dst >= 0
        lo, hi = np.minimum(src[ok], dst[ok]), np.maximum(src[ok], dst[ok])
        keys = np.unique(lo * n + hi)
        return (keys // n).astype(np.int32), (keys % n).astype(np.int32)


def _projection(x: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """[d, dim] top eigenvectors of the (uncentred) second moment of a sample of ``x``."""
    rows = np.sort(rng.choice(len(x), min(len(x), _PCA_SAMPLE), replace=False))
    s = np.asarray(x[rows], dtype=np.float64)
    w, v = np.linalg.eigh(s.T @ s)
    return np.ascontiguousarray(v[:, ::-1][:, :dim], dtype=np.float32)


def knn_graph(
    x: np.ndarray,
    k: int = _DEFAULTS.k,
    *,
    pca_dim: int = _DEFAULTS.pca_dim,
    list_size: int = _DEFAULTS.list_size,
    nprobe: int = _DEFAULTS.nprobe,
    seed: int = _SEED,
    log: Callable[[str], None] = _log_default,
) -> KnnGraph:
    """Approximate k-NN graph of unit embeddings by an inverted-file join in a PCA subspace.

    Args:
        x: float32 [n, d] unit embeddings (may be a memory map).
        k: neighbours per face.
        pca_dim: dimension of the search subspace (``>= d`` searches in the full space).
        list_size: target faces per inverted list (``n / list_size`` lists).
        nprobe: lists each face is compared with (its nearest ones).
        seed: seed of the sample and k-means.
        log: progress messages.
    """
    n, d = x.shape
    t0 = time.perf_counter()
    secs: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    if k < 1:
        raise ValueError("k must be >= 1")
    r = min(pca_dim, d)
    proj = _projection(x, r, rng) if r < d else None
    # The projected faces in float16: half the memory of the graph's largest array (1 GB at 2M
    # faces), read back in float32 one list at a time; the graph only proposes pairs, whose
    # cosines the linkage computes exactly from ``x``.
    y = np.empty((n, r), dtype=np.float16)
    for s in range(0, n, _CHUNK):
        c = np.asarray(x[s : s + _CHUNK], dtype=np.float32)
        y[s : s + len(c)] = c @ proj if proj is not None else c
    secs["project"] = time.perf_counter() - t0

    nlist = max(1, min(n // max(list_size, 1), 65_536))
    nprobe = min(nprobe, nlist)
    t = time.perf_counter()
    if nlist > 1:
        train = y[np.sort(rng.choice(n, min(n, nlist * _TRAIN_PER_LIST), replace=False))].astype(np.float32)
        km = faiss.Kmeans(r, nlist, niter=10, spherical=True, seed=seed, max_points_per_centroid=_TRAIN_PER_LIST)
        km.train(np.ascontiguousarray(train))
        centroids = km.centroids
    else:
        centroids = y[:1].astype(np.float32)
    probe = np.empty((n, nprobe), np.int32)
    for s in range(0, n, 4 * _CHUNK):
        c = y[s : s + 4 * _CHUNK].astype(np.float32)
        probe[s : s + len(c)] = faiss.knn(c, centroids, nprobe, metric=faiss.METRIC_INNER_PRODUCT)[1]
    secs["lists"] = time.perf_counter() - t
    log(f"knn graph: {n} x {d} -> {r} dims, {nlist} lists, nprobe {nprobe}: lists in {secs['lists']:.0f}s")

    t = time.perf_counter()
    lists = _invert_lists(probe, probe[:, 0], nlist)
    del probe
    best_s, best_i = _ivf_join(y, y, lists, k, same=True, log=log)
    secs["join"] = time.perf_counter() - t
    secs["total"] = time.perf_counter() - t0
    log(f"knn graph: join {secs['join']:.0f}s, total {secs['total']:.0f}s")
    return KnnGraph(best_i, best_s, secs)


def _invert_lists(probe: np.ndarray, home: np.ndarray, nlist: int) -> tuple[np.ndarray, ...]:
    """Inverted lists for :func:`_ivf_join`: members of each list (base rows whose list it is,
    ``home``) and its queries (query rows probing it, ``probe`` int [nq, nprobe]), as CSR pairs."""
    nprobe = probe.shape[1]
    member_order = np.argsort(home, kind="stable").astype(np.int32)
    member_ptr = np.searchsorted(home[member_order], np.arange(nlist + 1))
    q_lists = probe.reshape(-1)
    q_order = np.argsort(q_lists, kind="stable")
    np.floor_divide(q_order, nprobe, out=q_order)  # in place: at 2M faces this array is 0.4 GB
    q_rows = q_order.astype(np.int32)
    del q_order
    q_ptr = np.zeros(nlist + 1, np.int64)
    np.cumsum(np.bincount(q_lists, minlength=nlist), out=q_ptr[1:])  # every query probes a list
    return member_order, member_ptr, q_rows, q_ptr


def _ivf_join(
    q: np.ndarray,
    base: np.ndarray,
    lists: tuple[np.ndarray, ...],
    k: int,
    *,
    same: bool = False,
    scale: np.ndarray | None = None,
    log: Callable[[str], None] = _log_default,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of each query with the base rows of the lists it probes.

    One BLAS product per list (its probing queries x its members), not one scan per query: at
    634k cluster means and 10,000 queries this is ~15x faster than faiss' IVF search.

    Args:
        q: float32 [nq, d] queries (float16 too: read in float32 one list at a time).
        base: float32 [nb, d] base rows (likewise).
        lists: :func:`_invert_lists` of the queries' probes and the base rows' lists.
        k: neighbours kept per query.
        same: ``q`` is ``base`` (a self-join): a row is not its own neighbour.
        scale: optional float32 [nb] factor of each base row (e.g. one over its length: the rows'
            directions searched without keeping a normalised copy of the base).
        log: progress messages.

    Returns:
        ``(scores float32 [nq, k], rows int32 [nq, k])``, best first; row -1 where fewer were found.
    """
    member_order, member_ptr, q_rows, q_ptr = lists
    nlist = len(member_ptr) - 1
    t = time.perf_counter()
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int32)
    for lst in range(nlist):
        members = member_order[member_ptr[lst] : member_ptr[lst + 1]]
        queries = q_rows[q_ptr[lst] : q_ptr[lst + 1]]
        if len(members) == 0 or len(queries) == 0:
            continue
        kk = min(k + 1 if same else k, len(members))  # +1: a face is a member of its own home list
        rows = np.asarray(base[members], np.float32)
        if scale is not None:
            rows *= scale[members, None]
        ds, di = faiss.knn(np.asarray(q[queries], np.float32), rows, kk, metric=faiss.METRIC_INNER_PRODUCT)
        di = members[di]
        if same:
            ds[di == queries[:, None]] = -np.inf
        cat_s = np.concatenate([best_s[queries], ds], axis=1)
        cat_i = np.concatenate([best_i[queries], di.astype(np.int32)], axis=1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k]
        best_s[queries] = np.take_along_axis(cat_s, top, 1)
        best_i[queries] = np.take_along_axis(cat_i, top, 1)
        if log is not _log_default and lst and lst % 1024 == 0:
            log(f"knn graph: {lst}/{nlist} lists, {time.perf_counter() - t:.0f}s")
    order = np.argsort(-best_s, axis=1)
    best_s = np.take_along_axis(best_s, order, 1)
    best_i = np.take_along_axis(best_i, order, 1)
    best_i[~np.isfinite(best_s)] = -1
    return best_s, best_i


# -- average-linkage merging -----------------------------------------------------------------------


def merge_threshold(size_a: np.ndarray, size_b: np.ndarray, tau_1: float, tau_inf: float,
                    decay: float = 1.0, tau_face: float | None = None) -> np.ndarray:
    """Average cosine two clusters of these sizes need to merge.

    ``tau_inf + (tau_1 - tau_inf) / (|A| |B|) ** decay``, where a single face joining a cluster
    has its own limit ``tau_face`` (default ``tau_inf``) instead of ``tau_inf``: a face's
    average cosine with a large cluster is as precise as the face itself, and a poor photo of a
    person sits lower than two halves of that person do, while look-alike people stay apart by
    the face picking its best cluster.
    """
    a, b = np.asarray(size_a, np.float64), np.asarray(size_b, np.float64)
    low = tau_inf if tau_face is None else np.where(np.minimum(a, b) <= 1, tau_face, tau_inf)
    return (low + (tau_1 - low) / (a * b) ** decay).astype(np.float32)


def _shrunk_cohesion(size: np.ndarray, sq_norm: np.ndarray, prior: float) -> np.ndarray:
    """Mean cosine between a cluster's faces, ``(|sum|^2 - n) / (n (n - 1))``, plus one pseudo-pair at ``prior``."""
    n = np.asarray(size, np.float64)
    return np.maximum(((np.asarray(sq_norm, np.float64) - n) / 2 + prior) / (n * (n - 1) / 2 + 1.0), 0.01)


class _Sums:
    """Sum of the embeddings of each cluster (cluster id = a face row); singletons read ``x``."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.slot = np.full(len(x), -1, dtype=np.int64)
        self.store = np.zeros((max(16, len(x) // 8), x.shape[1]), dtype=np.float32)
        self.used = 0

    def get(self, ids: np.ndarray) -> np.ndarray:
        sl = self.slot[ids]
        has = sl >= 0
        # One gather where all come from one place (the first round: all single faces); it is memory-bound.
        if not has.any():
            return np.asarray(self.x[ids], dtype=np.float32)
        if has.all():
            return self.store[sl]
        out = np.empty((len(ids), self.x.shape[1]), dtype=np.float32)
        rows, alone = np.flatnonzero(has), np.flatnonzero(~has)
        out[rows] = self.store[sl[rows]]
        out[alone] = self.x[ids[alone]]
        return out

    def set(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._reserve(ids)
        self.store[self.slot[ids]] = vectors

    def _reserve(self, ids: np.ndarray) -> None:
        """A slot of the store for each of ``ids`` without one (its content is the caller's to write)."""
        new = self.slot[ids] < 0
        need = int(new.sum())
        if self.used + need > len(self.store):
            self._grow(need)
        self.slot[ids[new]] = np.arange(self.used, self.used + need)
        self.used += need

    def drop(self, ids: np.ndarray) -> None:
        self.slot[ids] = -1

    def merge(self, roots: np.ndarray, movers: np.ndarray, dest: np.ndarray) -> np.ndarray:
        """Add the sums of ``movers`` to those of their ``dest`` (``roots``: the distinct ones) in place
        in the store, drop the movers; returns ``|sum|^2`` of each root. No block of all the roots'
        sums is made: at 2M faces the first round merges into ~600k roots (1.2 GB)."""
        import scipy.sparse as sp

        fresh = roots[self.slot[roots] < 0]  # single faces: their sum is their row of x
        self._reserve(fresh)
        for s in range(0, len(fresh), _CHUNK):
            self.store[self.slot[fresh[s : s + _CHUNK]]] = self.x[fresh[s : s + _CHUNK]]
        slots = self.slot[roots]
        group = np.searchsorted(roots, dest)
        step = _CHUNK // 4  # 32 MB of sums at a time, added by a sparse product over their own roots
        for s in range(0, len(movers), step):
            present, local = np.unique(group[s : s + step], return_inverse=True)
            m = sp.csr_matrix((np.ones(len(local), np.float32), (local, np.arange(len(local)))),
                              shape=(len(present), len(local)))
            self.store[slots[present]] += m @ self.get(movers[s : s + step])  # each root once
        self.drop(movers)
        sq = np.empty(len(roots), np.float64)
        for s in range(0, len(roots), _CHUNK):
            block = self.store[slots[s : s + _CHUNK]]
            sq[s : s + len(block)] = np.einsum("ij,ij->i", block, block)
        return sq

    def _grow(self, need: int) -> None:
        live = np.flatnonzero(self.slot >= 0)
        cap = max(len(self.store), int(1.25 * (len(live) + need)))
        store = np.zeros((cap, self.x.shape[1]), dtype=np.float32)
        store[: len(live)] = self.store[self.slot[live]]
        self.slot[live] = np.arange(len(live))
        self.store, self.used = store, len(live)

    def dots(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty(len(a), dtype=np.float32)
        step = _CHUNK // 4  # two blocks of sums, 64 MB
        for s in range(0, len(a), step):
            out[s : s + step] = np.einsum("ij,ij->i", self.get(a[s : s + step]), self.get(b[s : s + step]))
        return out


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each row's component under the pairs ``(a, b)``."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    if len(a) == 0:
        return np.arange(n, dtype=np.int64)
    g = sp.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]


def average_linkage(
    x: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    *,
    tau_1: float = _DEFAULTS.tau_1,
    tau_inf: float = _DEFAULTS.tau_inf,
    decay: float = _DEFAULTS.tau_decay,
    must_link: np.ndarray | None = None,
    cannot_link: np.ndarray | None = None,
    tau_face: float | None = _DEFAULTS.tau_face,
    min_ratio: float | None = _DEFAULTS.min_ratio,
    prior_cohesion: float = 0.46,
    max_rounds: int = 100,
    drop_margin: float = 0.1,
    mean_k: int = _DEFAULTS.mean_k,
    join_ratio: float = _DEFAULTS.join_ratio,
    join_floor: float = _DEFAULTS.join_floor,
    log: Callable[[str], None] = _log_default,
) -> np.ndarray:
    """Cluster rows of ``x`` by average linkage restricted to candidate pairs ``(src, dst)``.

    Args:
        x: float32 [n, d] unit embeddings.
        src, dst: candidate face pairs (e.g. :meth:`KnnGraph.edges`).
        tau_1, tau_inf, decay, tau_face: the merge threshold law, see :func:`merge_threshold`.
        min_ratio: two clusters of 2 faces or more also need an average cosine of at least this
            fraction of ``sqrt(cohesion_A cohesion_B)`` (cohesions shrunk towards
            ``prior_cohesion`` by one pseudo-pair). Two parts of one person score ~1 whatever the
            photos' quality; two look-alike people score the cosine of their centres (< 0.5), even
            when both are photographed so well that their average cosine passes ``tau_inf``.
        must_link: int [m, 2] face pairs that start in one cluster.
        cannot_link: int [c, 2] face pairs never put in one cluster (unless must-linked).
        max_rounds: rounds of merges at most.
        drop_margin: candidate pairs more than this below their threshold are forgotten (they come
            back through other edges when a side grows).
        mean_k: when the graph's candidates are exhausted, each face still alone gets ``mean_k``
            more candidates, the clusters whose means give it the best average cosine
            (:class:`MeansIndex`, :func:`_mean_candidates`), and merging resumes once. A poor photo's nearest faces are
            strangers, so no graph edge reaches its person; its person's mean does, as in
            incremental assignment. 0: graph candidates only.
        join_ratio, join_floor: at the end, each face still alone joins the cluster of 2+ faces it
            is clearly closest to (:func:`_clear_best`), as incremental assignment does.

    Returns:
        int64 [n] cluster label per row: a row index of its cluster (the cluster's id).
    """
    n = len(x)
    ml = np.zeros((0, 2), np.int64) if must_link is None else np.asarray(must_link, np.int64).reshape(-1, 2)
    cl = np.zeros((0, 2), np.int64) if cannot_link is None else np.asarray(cannot_link, np.int64).reshape(-1, 2)
    lab = _union_find(n, ml[:, 0], ml[:, 1])
    size = np.bincount(lab, minlength=n).astype(np.int64)
    sq = np.ones(n, np.float64)  # |sum of the cluster's embeddings|^2
    sums = _Sums(x)
    grouped = np.flatnonzero(size > 1)
    if len(grouped):
        pos = np.full(n, -1, np.int64)
        pos[grouped] = np.arange(len(grouped))
        rows = np.flatnonzero(size[lab] > 1)
        acc = _group_sum(pos[lab[rows]], len(grouped), x[rows])
        sums.set(grouped, acc)
        sq[grouped] = np.einsum("ij,ij->i", acc, acc)
    # Cannot-link pairs inside a must-link group are overridden by the user's must-link.
    cl = cl[lab[cl[:, 0]] != lab[cl[:, 1]]] if len(cl) else cl

    # The candidate pairs as int32 cluster ids (rows of x) and float32 scores: 12 bytes a pair, the
    # largest arrays of a round (~20M pairs at 2M faces); NaN: to be scored.
    pa, pb = lab[np.asarray(src)].astype(np.int32), lab[np.asarray(dst)].astype(np.int32)
    ps = np.full(len(pa), np.nan, np.float32)
    changed = np.ones(n, dtype=bool)
    means_pass = mean_k > 0
    for rnd in range(max_rounds):
        # Stale pairs (a side changed or new): relabel, deduplicate, rescore; the others keep their score.
        stale = changed[pa] | changed[pb] | np.isnan(ps)
        keys = _pair_keys(lab, pa[stale], pb[stale])
        np.logical_not(stale, out=stale)
        pa, pb, ps = pa[stale], pb[stale], ps[stale]
        del stale
        sa, sb = (keys // n).astype(np.int32), (keys % n).astype(np.int32)
        del keys
        ss = sums.dots(sa, sb) / (size[sa] * size[sb]).astype(np.float32)
        pa, pb, ps = np.concatenate([pa, sa]), np.concatenate([pb, sb]), np.concatenate([ps, ss])
        del sa, sb, ss
        thr = np.empty(len(pa), np.float32)
        for s in range(0, len(pa), 16 * _CHUNK):  # in blocks: the law works in float64
            thr[s : s + 16 * _CHUNK] = merge_threshold(size[pa[s : s + 16 * _CHUNK]], size[pb[s : s + 16 * _CHUNK]],
                                                       tau_1, tau_inf, decay, tau_face)
        live = ps >= thr - drop_margin
        pa, pb, ps, thr = pa[live], pb[live], ps[live], thr[live]
        ok = ps >= thr
        if min_ratio is not None and ok.any():
            big = ok & (np.minimum(size[pa], size[pb]) >= 2)
            coh = np.sqrt(_shrunk_cohesion(size[pa[big]], sq[pa[big]], prior_cohesion)
                          * _shrunk_cohesion(size[pb[big]], sq[pb[big]], prior_cohesion))
            ok[big] = ps[big] >= min_ratio * coh
        if len(cl) and ok.any():
            ca, cb = lab[cl[:, 0]], lab[cl[:, 1]]
            banned = np.unique(np.minimum(ca, cb) * n + np.maximum(ca, cb))
            ok[ok] = ~np.isin(pa[ok].astype(np.int64) * n + pb[ok], banned)
        if not ok.any():
            if not means_pass:
                break
            means_pass = False
            ma, mb = _mean_candidates(sums, size, mean_k, log)
            pa, pb = np.concatenate([pa, ma.astype(np.int32)]), np.concatenate([pb, mb.astype(np.int32)])
            ps = np.concatenate([ps, np.full(len(ma), np.nan, np.float32)])
            changed[:] = False
            continue
        # Best valid neighbour of every cluster, by average cosine.
        va, vb, vs = pa[ok], pb[ok], ps[ok]
        node = np.concatenate([va, vb])
        nbr = np.concatenate([vb, va])
        sc = np.concatenate([vs, vs])
        order = np.lexsort((-sc, node))
        node, nbr, sc = node[order], nbr[order], sc[order]
        first = np.ones(len(node), bool)
        first[1:] = node[1:] != node[:-1]
        best = np.full(n, -1, np.int64)
        best[node[first]] = nbr[first]
        best_score = np.zeros(n, np.float32)
        best_score[node[first]] = sc[first]
        cand = node[first]
        mutual = best[best[cand]] == cand
        # Roots: mutual pairs, merged into their smaller id. Leaves: clusters pointing at a root.
        target = np.arange(n, dtype=np.int64)
        pair_a = cand[mutual & (cand < best[cand])]
        pair_b = best[pair_a]
        target[pair_b] = pair_a
        in_pair = np.zeros(n, bool)
        in_pair[pair_a] = in_pair[pair_b] = True
        leaves = cand[~in_pair[cand] & in_pair[best[cand]]]
        target[leaves] = target[best[leaves]]
        movers = np.flatnonzero(target != np.arange(n))
        if len(movers) == 0:  # every valid pair waits on a cluster that prefers another
            break
        if len(cl):
            _resolve_cannot_links(target, best_score, lab, cl, in_pair)
            movers = np.flatnonzero(target != np.arange(n))
        dest = target[movers]
        roots = np.unique(dest)
        sq[roots] = sums.merge(roots, movers, dest)
        np.add.at(size, dest, size[movers])
        size[movers] = 0
        lab = target[lab]
        changed[:] = False
        changed[roots] = True
        changed[movers] = True
        log(f"average linkage round {rnd + 1}: {len(movers)} merges, {len(pa)} candidate pairs")
    if join_ratio > 0:
        lab = _join_clear_best(x, lab, size, sums, cl, join_ratio, join_floor, log)
    return lab


def _pair_keys(lab: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted unique ``lo * n + hi`` (int64) of the cluster pairs ``(lab[a], lab[b])`` of two different
    clusters, ``lo < hi``; computed in place where it can (at 2M faces each array is ~160 MB)."""
    n = len(lab)
    a, b = lab[a], lab[b]
    lo = np.minimum(a, b)
    np.maximum(a, b, out=b)
    del a
    keep = lo != b
    lo, b = lo[keep], b[keep]
    del keep
    lo *= n
    lo += b
    del b
    return np.unique(lo)


def _join_clear_best(x: np.ndarray, lab: np.ndarray, size: np.ndarray, sums: _Sums, cl: np.ndarray,
                     join_ratio: float, join_floor: float, log: Callable[[str], None]) -> np.ndarray:
    """Labels after every face still alone joined its :func:`_clear_best` cluster (cannot-links kept)."""
    t = time.perf_counter()
    groups = np.flatnonzero(size >= 2)
    single = np.flatnonzero(size == 1)  # a face alone is its own cluster's root
    if len(groups) == 0 or len(single) == 0:
        return lab
    means = _means_of(sums, size, groups)
    index = clear_best_index(means, size[groups], **_RUN_SEARCH)
    parts = [_clear_best(x[single[s : s + 2 * _CHUNK]], index, join_ratio, join_floor)
             for s in range(0, len(single), 2 * _CHUNK)]
    del means, index
    row, score = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    face, dest, score = single[row >= 0], groups[row[row >= 0]], score[row >= 0]
    if len(cl):
        n = len(lab)
        banned = np.concatenate([cl[:, 0] * n + lab[cl[:, 1]], cl[:, 1] * n + lab[cl[:, 0]]])
        keep = ~np.isin(face * n + dest, banned)
        face, dest, score = face[keep], dest[keep], score[keep]
        # Two cannot-linked faces joining one cluster: the closer one joins.
        to, by = np.full(n, -1, np.int64), np.zeros(n, np.float32)
        to[face], by[face] = dest, score
        a, b = cl[:, 0], cl[:, 1]
        clash = (to[a] >= 0) & (to[a] == to[b])
        to[np.where(by[a[clash]] < by[b[clash]], a[clash], b[clash])] = -1
        face = face[to[face] >= 0]
        dest = to[face]
    out = lab.copy()
    out[face] = dest
    log(f"average linkage: {len(face)} of {len(single)} single faces joined the cluster they are clearly "
        f"closest to in {time.perf_counter() - t:.0f}s")
    return out


def clear_best_index(means: np.ndarray, sizes: np.ndarray, **index_kwargs) -> MeansIndex:
    """Index of the mean *directions* of the clusters of 2+ faces (rows ``np.flatnonzero(sizes >= 2)``),
    which the clear-best rule searches (:func:`assign_to_clusters` ``group_index=``); ``index_kwargs``
    go to :class:`MeansIndex`."""
    m = means[np.asarray(sizes) >= 2]
    return MeansIndex(m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12), **index_kwargs)


def _clear_best(queries: np.ndarray, index: MeansIndex, join_ratio: float,
                join_floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Row of ``index`` (:func:`clear_best_index`) each query is clearly closest to, or -1.

    Clear: the query's cosine with the best cluster's mean direction reaches ``join_floor`` and
    ``join_ratio`` times that with the second best. A poor photo sits low against every cluster,
    its own person's too, so no fixed threshold admits it without admitting strangers; but its
    person still stands out from the others by a ratio, while a face whose person has no cluster
    finds only strangers, all alike. Directions, not average cosines: a cluster of sharp photos
    has a longer mean than one of poor photos, which would rank clusters by their photos' quality.
    """
    ds, di = index.search(queries, 2)
    second = np.where(di[:, 1] >= 0, ds[:, 1], 0.0) if ds.shape[1] > 1 else np.zeros(len(ds), np.float32)
    ok = (di[:, 0] >= 0) & (ds[:, 0] >= join_floor) & (ds[:, 0] >= join_ratio * second)
    return np.where(ok, di[:, 0], -1).astype(np.int64), np.where(ok, ds[:, 0], 0.0).astype(np.float32)


def _means_of(sums: _Sums, size: np.ndarray, roots: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """[len(roots), d] mean embedding of each cluster ``roots`` (float32, or ``dtype``), built chunk by chunk."""
    means = np.empty((len(roots), sums.x.shape[1]), dtype)
    step = _CHUNK // 8  # 16 MB of sums at a time, divided in place (a 64k-row block and its quotient were 0.27 GB)
    for s in range(0, len(roots), step):
        r = roots[s : s + step]
        block = sums.get(r)
        block /= size[r, None].astype(np.float32)
        means[s : s + len(r)] = block
    return means


def _mean_candidates(sums: _Sums, size: np.ndarray, k: int,
                     log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(single face, cluster)``: for each face alone in its cluster, the ``k``
    other clusters whose means give it the best average cosine, single faces included.

    That is the search of incremental assignment (:func:`assign_to_clusters`). Single faces in
    the list matter: a cluster is a candidate only if its mean beats the faces nearest to the
    face, so where strangers crowd (a large library) a cluster must be closer to be considered.
    """
    t = time.perf_counter()
    roots = np.flatnonzero(size > 0)
    single = np.flatnonzero(size[roots] == 1)
    if len(single) == 0 or len(roots) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    means = _means_of(sums, size, roots, np.float16)  # candidates only (scored exactly after): half the memory
    index = MeansIndex(means, **_RUN_SEARCH)
    rows = np.concatenate([index.search(means[single[s : s + 2 * _CHUNK]], k + 1)[1]
                           for s in range(0, len(single), 2 * _CHUNK)])
    del means, index
    qa = np.repeat(roots[single], rows.shape[1])
    qb = np.where(rows >= 0, roots[np.maximum(rows, 0)], -1).reshape(-1)
    keep = (qb >= 0) & (qb != qa)
    log(f"average linkage: {int(keep.sum())} candidate pairs from {len(roots)} cluster means for "
        f"{len(single)} single faces in {time.perf_counter() - t:.0f}s")
    return qa[keep], qb[keep]


def _resolve_cannot_links(target: np.ndarray, score: np.ndarray, lab: np.ndarray, cl: np.ndarray,
                          in_pair: np.ndarray) -> None:
    """Undo the moves of a round that would put a cannot-link pair together (rare, so in Python).

    In each offending group the mutual pair is kept (a pair is never cannot-linked: checked
    before), then leaves by decreasing score unless they clash with what is kept.
    """
    ca, cb = lab[cl[:, 0]], lab[cl[:, 1]]
    bad = target[ca] == target[cb]
    if not bad.any():
        return
    banned: dict[int, set[int]] = {}
    for a, b in zip(ca[bad].tolist(), cb[bad].tolist()):
        banned.setdefault(a, set()).add(b)
        banned.setdefault(b, set()).add(a)
    for g in np.unique(target[ca[bad]]).tolist():
        group = np.flatnonzero(target == g)
        kept: list[int] = []
        for c in sorted(group.tolist(), key=lambda c: (not in_pair[c], -float(score[c]), c)):
            if not banned.get(c, set()).intersection(kept):
                kept.append(c)
        target[group] = group
        target[np.array(kept)] = kept[0]


def cluster_means(x: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(cluster labels, unnormalised means float32 [c, d], sizes)`` of a labelling of ``x``.

    A face's inner product with a mean is its average cosine with the cluster's faces.
    """
    ids, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    means = _group_sum(inv, len(ids), x)
    means /= sizes[:, None].astype(np.float32)
    return ids, means, sizes


def _group_sum(group: np.ndarray, n_groups: int, x: np.ndarray) -> np.ndarray:
    """float32 [n_groups, d]: sum of the rows of ``x`` per group (a sparse product: np.add.at is ~50x slower)."""
    import scipy.sparse as sp

    out = np.zeros((n_groups, x.shape[1]), np.float32)
    for s in range(0, len(x), 8 * _CHUNK):
        g = group[s : s + 8 * _CHUNK]
        m = sp.csr_matrix((np.ones(len(g), np.float32), (g, np.arange(len(g)))), shape=(n_groups, len(g)))
        out += m @ np.asarray(x[s : s + len(g)], np.float32)
    return out


class MeansIndex:
    """Maximum-inner-product search over cluster means: exact up to 8,192 means, inverted lists above.

    Above ``exact_max`` means, the means are spread over ``2 ** round(log2(c / list_size))`` (at
    most ``max_lists``) spherical k-means lists and a query is compared with the members of its
    ``nprobe`` nearest lists, one BLAS product per list (:func:`_ivf_join`). A query costs about
    ``nlist + nprobe x list_size`` means, so the lists are small (256 means) and 16 of them probed
    by default: incremental assignment pays its search per face. At 62,000 clusters 16 of 256 lists
    agreed with a full run for 97.05 % of 2,000 new faces (32 of 64 lists: 97.15 %) for a seventh
    of the arithmetic (docs/clustering.md; at 2M expect ~1 % fewer right: ``nprobe`` is that
    trade); the one-shot searches of a full run probe 32 (:data:`_RUN_SEARCH`). Build
    it once per clustering and reuse it for every batch of new faces (:func:`assign_to_clusters`
    ``index=``): the build is the k-means and the list of every mean, the search is what a call
    pays. A row whose list is -1 is in no list and never found (:meth:`from_parts`: rows
    superseded since the lists were made). Float16 means are kept as they are (half the memory)
    and read in float32 a list at a time.
    """

    def __init__(self, means: np.ndarray, *, nprobe: int = 16, list_size: int = 256, max_lists: int = 16_384,
                 exact_max: int = 8_192, seed: int = _SEED):
        half = isinstance(means, np.ndarray) and means.dtype == np.float16
        self.means = np.ascontiguousarray(means, np.float16 if half else np.float32)
        self.centroids: np.ndarray | None = None
        self.home: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.nprobe = nprobe
        c = len(self.means)
        nlist = int(min(max_lists, 2 ** round(math.log2(max(c, 1) / list_size))))
        if c <= exact_max or nlist < 2:
            return
        rng = np.random.default_rng(seed)
        train = self.means[np.sort(rng.choice(c, min(c, nlist * 16), replace=False))].astype(np.float32)
        km = faiss.Kmeans(train.shape[1], nlist, niter=10, spherical=True, seed=seed, min_points_per_centroid=16,
                           max_points_per_centroid=16)
        km.train(np.ascontiguousarray(train / np.linalg.norm(train, axis=1, keepdims=True)))
        self.centroids = km.centroids
        self.home = self.lists_of(self.means)

    @classmethod
    def from_parts(cls, means: np.ndarray, centroids: np.ndarray, home: np.ndarray, *,
                   scale: np.ndarray | None = None, nprobe: int = 16) -> MeansIndex:
        """An inverted-list index from its parts kept elsewhere (``means`` may be memory-mapped: a
        search reads only the rows of the lists it probes); ``home`` -1 leaves a row out; each row
        is searched times its ``scale`` when given (the means' directions from the means themselves)."""
        index = cls.__new__(cls)
        index.means, index.centroids, index.home, index.nprobe = means, centroids, home, nprobe
        index.scale = scale
        return index

    def lists_of(self, vectors: np.ndarray) -> np.ndarray:
        """The list each vector belongs in (its nearest list centroid), as ``home`` holds them."""
        if self.centroids is None or len(vectors) == 0:
            return np.zeros(len(vectors), np.int64)
        home = np.empty(len(vectors), np.int64)
        step = _CHUNK // 2  # in float32 a block of 32k rows at a time (262k rows were 0.5 GB at 2M faces)
        for s in range(0, len(vectors), step):
            block = np.ascontiguousarray(vectors[s : s + step], np.float32)
            home[s : s + len(block)] = faiss.knn(block, self.centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel()
        return home

    def __len__(self) -> int:
        return len(self.means)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(inner products float32 [q, k], mean rows [q, k])``, best first; row -1 where none."""
        q = np.ascontiguousarray(queries, np.float32)
        k = min(k, len(self.means))
        if self.centroids is None:
            base = np.asarray(self.means, np.float32) if self.scale is None else self.means * self.scale[:, None]
            return faiss.knn(q, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        nprobe = min(self.nprobe, len(self.centroids))
        probe = faiss.knn(q, self.centroids, nprobe, metric=faiss.METRIC_INNER_PRODUCT)[1]
        ds, di = _ivf_join(q, self.means, _invert_lists(probe, self.home, len(self.centroids)), k, scale=self.scale)
        return ds, di.astype(np.int64)


def _mips(means: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of queries with means (a :class:`MeansIndex` built for one search)."""
    return MeansIndex(means).search(queries, k)


def assign_to_clusters(
    queries: np.ndarray,
    means: np.ndarray | None,
    sizes: np.ndarray,
    *,
    tau_1: float = _DEFAULTS.tau_1,
    tau_inf: float = _DEFAULTS.tau_inf,
    decay: float = _DEFAULTS.tau_decay,
    tau_face: float | None = _DEFAULTS.tau_face,
    join_ratio: float = _DEFAULTS.join_ratio,
    join_floor: float = _DEFAULTS.join_floor,
    k: int = 8,
    banned: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    index: MeansIndex | None = None,
    group_index: MeansIndex | None = None,
    group_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best cluster of each query face by average cosine, if it reaches the merge threshold.

    The criterion is the merge rule of :func:`average_linkage` for a one-face cluster: the face's
    average cosine with the cluster (``query . mean``) must reach ``merge_threshold(1, size)``.
    A face no cluster admits that way then joins the cluster of 2+ faces it is clearly closest
    to (:func:`_clear_best`, ``join_ratio``), as faces left alone do at the end of a full run.

    Args:
        queries: float32 [q, d] unit embeddings.
        means: float32 [c, d] unnormalised cluster means (:func:`cluster_means`); may be None when
            both indexes are given.
        sizes: int [c] cluster sizes.
        k: candidate clusters examined per query (by inner product).
        banned: optional ``f(query rows, cluster rows) -> bool mask`` of forbidden pairs.
        index: a :class:`MeansIndex` of ``means`` kept from an earlier call (built here if None).
        group_index: :func:`clear_best_index` of ``means, sizes`` kept likewise (built here if None),
            or any index with a ``search`` over the mean directions of the clusters of 2+ faces.
        group_rows: the cluster rows ``group_index``'s rows stand for (default: those of 2+ faces,
            as :func:`clear_best_index` orders them).

    Returns:
        ``(cluster row int64 [q], score float32 [q])``; row -1 where no cluster qualifies. The
        score is the average cosine, or for a clear-best join the cosine with the mean direction.
    """
    if len(sizes) == 0 or len(queries) == 0:
        return np.full(len(queries), -1, np.int64), np.zeros(len(queries), np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ds, di = (index if index is not None else MeansIndex(means)).search(q, k)
    ok = di >= 0
    thr = merge_threshold(1, sizes[np.maximum(di, 0)], tau_1, tau_inf, decay, tau_face)
    ok &= ds >= thr
    if banned is not None and ok.any():
        r, c = np.nonzero(ok)
        ok[r, c] = ~banned(r, di[r, c])
    score = np.where(ok, ds, -np.inf)
    j = np.argmax(score, axis=1)
    rows = np.arange(len(q))
    best = np.where(ok[rows, j], di[rows, j], -1).astype(np.int64)
    best_score = np.where(best >= 0, ds[rows, j], 0.0).astype(np.float32)
    groups = np.flatnonzero(sizes >= 2) if group_rows is None else group_rows
    rest = np.flatnonzero(best < 0)
    if join_ratio > 0 and len(groups) and len(rest):
        index = group_index if group_index is not None else clear_best_index(means, sizes)
        row, sc = _clear_best(q[rest], index, join_ratio, join_floor)
        hit = row >= 0
        if banned is not None and hit.any():
            hit[hit] = ~banned(rest[hit], groups[row[hit]])
        best[rest[hit]], best_score[rest[hit]] = groups[row[hit]], sc[hit]
    return best, best_score


@dataclass
class ClusteringResult:
    """Labels of a clustering run and what it cost.

    Attributes:
        labels: int64 [n] cluster of each row (a row index of its cluster).
        n_clusters: number of clusters (singletons included).
        seconds: wall time per stage.
    """

    labels: np.ndarray
    n_clusters: int
    seconds: dict[str, float]


def cluster_embeddings(
    x: np.ndarray,
    *,
    k: int = _DEFAULTS.k,
    pca_dim: int = _DEFAULTS.pca_dim,
    list_size: int = _DEFAULTS.list_size,
    nprobe: int = _DEFAULTS.nprobe,
    tau_1: float = _DEFAULTS.tau_1,
    tau_inf: float = _DEFAULTS.tau_inf,
    decay: float = _DEFAULTS.tau_decay,
    tau_face: float | None = _DEFAULTS.tau_face,
    min_ratio: float | None = _DEFAULTS.min_ratio,
    mean_k: int = _DEFAULTS.mean_k,
    join_ratio: float = _DEFAULTS.join_ratio,
    join_floor: float = _DEFAULTS.join_floor,
    must_link: np.ndarray | None = None,
    cannot_link: np.ndarray | None = None,
    seed: int = _SEED,
    log: Callable[[str], None] = _log_default,
) -> ClusteringResult:
    """The full method: :func:`knn_graph`, then :func:`average_linkage` on its edges."""
    t0 = time.perf_counter()
    g = knn_graph(x, k, pca_dim=pca_dim, list_size=list_size, nprobe=nprobe, seed=seed, log=log)
    src, dst = g.edges()
    del g
    t = time.perf_counter()
    labels = average_linkage(x, src, dst, tau_1=tau_1, tau_inf=tau_inf, decay=decay, tau_face=tau_face,
                             min_ratio=min_ratio, mean_k=mean_k, join_ratio=join_ratio, join_floor=join_floor,
                             must_link=must_link, cannot_link=cannot_link, log=log)
    secs = {"graph": t - t0, "linkage": time.perf_counter() - t, "total": time.perf_counter() - t0}
    return ClusteringResult(labels, int(len(np.unique(labels))), secs)


# -- stable ids --------------------------------------------------------------------------------------


def match_ids(
    old_faces: np.ndarray, old_ids: np.ndarray, new_faces: np.ndarray, new_labels: np.ndarray, next_id: int
) -> tuple[np.ndarray, int]:
    """Stable cluster ids for a new clustering: each new cluster inherits the old id it overlaps most.

    Matching is one-to-one, largest overlaps first (ties: smaller old id, then smaller new
    label), so a split keeps the id on its larger part and a merge keeps the id of its largest
    old part. New clusters left unmatched get fresh ids ``next_id, next_id + 1, ...`` in order of
    their smallest face id. A cluster whose faces did not change always keeps its id.

    Args:
        old_faces, old_ids: face ids and their cluster id in the previous run.
        new_faces, new_labels: face ids and their cluster label in the new run.
        next_id: the first unused id.

    Returns:
        ``(stable id per new face int64, next unused id)``.
    """
    old_faces, old_ids = np.asarray(old_faces, np.int64), np.asarray(old_ids, np.int64)
    new_faces, new_labels = np.asarray(new_faces, np.int64), np.asarray(new_labels, np.int64)
    labs, inv = np.unique(new_labels, return_inverse=True)
    out_of_label = np.full(len(labs), -1, np.int64)
    order = np.argsort(old_faces)
    pos = np.searchsorted(old_faces[order], new_faces)
    pos = np.minimum(pos, max(len(old_faces) - 1, 0))
    seen = (old_faces[order][pos] == new_faces) if len(old_faces) else np.zeros(len(new_faces), bool)
    if seen.any():
        pair_new = inv[seen].astype(np.int64)
        pair_old = old_ids[order][pos[seen]]
        o_vals, o_inv = np.unique(pair_old, return_inverse=True)
        key = pair_new * len(o_vals) + o_inv
        keys, counts = np.unique(key, return_counts=True)
        kn, ko = keys // len(o_vals), o_vals[keys % len(o_vals)]
        rank = np.lexsort((kn, ko, -counts))
        used_old: set[int] = set()
        for a, b in zip(kn[rank].tolist(), ko[rank].tolist()):
            if out_of_label[a] < 0 and b not in used_old:
                out_of_label[a] = b
                used_old.add(b)
    fresh = np.flatnonzero(out_of_label < 0)
    if len(fresh):
        first_face = np.full(len(labs), np.iinfo(np.int64).max)
        np.minimum.at(first_face, inv, new_faces)
        fresh = fresh[np.argsort(first_face[fresh], kind="stable")]
        out_of_label[fresh] = np.arange(next_id, next_id + len(fresh))
        next_id += len(fresh)
    return out_of_label[inv], int(next_id)


# -- curation helpers and quality ------------------------------------------------------------------


def split_kmeans(x: np.ndarray, k: int, seed: int = _SEED) -> np.ndarray:
    """Labels ``0..k-1`` of a spherical k-means of the rows (an automatic split of one cluster)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if k < 2 or k > len(x):
        raise ValueError(f"k must be in [2, {len(x)}], got {k}")
    km = faiss.Kmeans(x.shape[1], k, niter=25, spherical=True, seed=seed, min_points_per_centroid=1)
    km.train(x)
    return faiss.knn(x, km.centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel().astype(np.int64)


def cluster_quality(x: np.ndarray, labels: np.ndarray, *, sample: int = 10_000, seed: int = _SEED) -> dict:
    """Cohesion, separation and a sampled silhouette of a clustering (cosine on unit rows).

    * cohesion of a cluster: mean cosine between its faces (exact, from the sum of its embeddings);
    * separation of a cluster: ``1 -`` its best average cosine with another cluster (by means);
    * silhouette of a face: ``(b - a) / max(a, b)`` with ``a`` its mean cosine distance to its own
      cluster and ``b`` to the nearest other cluster (average linkage), over ``sample`` faces of
      clusters with 2 faces or more.

    Returns:
        ``{"clusters": {label: {"size", "cohesion", "separation"}} for clusters of >= 2 faces,
        "cohesion": size-weighted mean, "separation": size-weighted mean, "silhouette": mean}``.
    """
    ids, means, sizes = cluster_means(x, labels)
    multi = np.flatnonzero(sizes >= 2)
    out: dict = {"clusters": {}, "cohesion": None, "separation": None, "silhouette": None}
    if len(multi) == 0:
        return out
    n_m = sizes[multi].astype(np.float64)
    sq = np.einsum("ij,ij->i", means[multi], means[multi]).astype(np.float64) * n_m**2  # |sum|^2
    cohesion = (sq - n_m) / (n_m * (n_m - 1))
    separation = np.ones(len(multi))
    if len(ids) > 1:
        ds, di = _mips(means, np.ascontiguousarray(means[multi]), 2)
        other = np.where(di[:, 0] == multi, 1, 0)
        r = np.arange(len(multi))
        separation = 1.0 - ds[r, other].astype(np.float64)
    out["clusters"] = {int(ids[m]): {"size": int(sizes[m]), "cohesion": float(c), "separation": float(s)}
                       for m, c, s in zip(multi, cohesion, separation)}
    w = n_m / n_m.sum()
    out["cohesion"], out["separation"] = float(w @ cohesion), float(w @ separation)
    if len(ids) > 1:
        rng = np.random.default_rng(seed)
        label_row = np.searchsorted(ids, labels)
        pool = np.flatnonzero(sizes[label_row] >= 2)
        pick = np.sort(rng.choice(pool, min(sample, len(pool)), replace=False))
        q = np.asarray(x[pick], np.float32)
        own = label_row[pick]
        n_own = sizes[own].astype(np.float64)
        a = 1.0 - (np.einsum("ij,ij->i", q, means[own]) * n_own - 1.0) / (n_own - 1.0)
        ds, di = _mips(means, q, 2)
        other = np.where(di[:, 0] == own, 1, 0)
        b = 1.0 - ds[np.arange(len(pick)), other].astype(np.float64)
        out["silhouette"] = float(np.mean((b - a) / np.maximum(np.maximum(a, b), 1e-12)))
    return out


@dataclass
class ReclusterDecision:
    """Whether the pipeline should run a full re-clustering now, and why."""

    recluster: bool
    reasons: list[str]


def recluster_decision(
    *,
    faces_now: int,
    faces_at_last_run: int,
    unassigned_since: int,
    days_since: float | None,
    model_changed: bool = False,
    max_growth: float = 0.2,
    max_unassigned: float = 0.05,
    max_age_days: float = 30.0,
) -> ReclusterDecision:
    """The drift policy: when incremental assignment should give way to a full re-clustering.

    Incremental assignment never merges or splits existing clusters, so errors accumulate as the
    library grows: faces that arrived before their person had a cluster stay apart, and clusters
    built on few faces never get the benefit of the new ones. Re-cluster when any of:

    * never clustered, or the embedding model changed (old and new similarities do not mix);
    * the library grew by ``max_growth`` (20 %) since the last full run;
    * ``max_unassigned`` (5 %) of the faces were left as new single-face clusters by incremental
      assignment since the last run (new people, or drift);
    * the last full run is ``max_age_days`` old and something changed since.

    Curation is not a reason: merges, splits and moves are constraints every run honours.
    """
    reasons = []
    if faces_at_last_run <= 0 or days_since is None:
        reasons.append("never clustered")
    if model_changed:
        reasons.append("embedding model changed")
    if faces_at_last_run > 0:
        growth = (faces_now - faces_at_last_run) / faces_at_last_run
        if growth >= max_growth:
            reasons.append(f"library grew {growth:.0%} since the last full run (limit {max_growth:.0%})")
        if faces_now and unassigned_since / faces_now >= max_unassigned:
            reasons.append(f"{unassigned_since} faces ({unassigned_since / faces_now:.1%}) left unassigned "
                           f"by incremental assignment (limit {max_unassigned:.0%})")
        if days_since is not None and days_since >= max_age_days and faces_now != faces_at_last_run:
            reasons.append(f"last full run {days_since:.0f} days ago (limit {max_age_days:.0f})")
    return ReclusterDecision(bool(reasons), reasons)
