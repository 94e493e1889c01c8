"""Person clustering at scale: our method against the baselines, stable ids, incremental assignment.

    python benchmarks/cluster_scale.py --n 100000            # development size, all baselines
    python benchmarks/cluster_scale.py --n 2000000           # the target size
    python benchmarks/cluster_scale.py --n 0 --real          # only the shared real labelled faces
    python benchmarks/cluster_scale.py --n 200000 --sets plain,hard --skip-nndescent \
        --kmeans-max 10000 --hdbscan-max 2000                # both sets, under 10 min on 2 cores

Data: :class:`benchmarks.synthetic.SyntheticFaces` (seeded, calibrated on real embeddings, long-tail
identity sizes, 5 % look-alikes). ``--n`` faces are the library; 1 % more (``--new-frac``) arrive
later, half fresh photos of people already in the library, half the photos of new people.
``--sets`` picks the synthetic sets, each getting the whole table: ``plain`` (the calibrated law,
the default and the set of every earlier figure) and ``hard`` (the same law refitted with shared
conditions, B/W, low quality and pose, measured on real photos, and 5 % near-duplicate photos:
:data:`benchmarks.synthetic.HARD_PARAMS`, ``benchmarks/synthetic_nuisance.py``).

Printed, in one table per set (time, peak resident memory of this process during the step,
pairwise and BCubed precision / recall / F, clusters found vs true):

* ours: :func:`face_assets.clustering.cluster_embeddings` (kNN graph + average linkage);
* the same average linkage on pynndescent's k-NN graph (NN-descent, the graph library the design
  started from), with both graphs' recall against exact neighbours on ``--graph-queries`` faces:
  the faiss graph against the general-purpose one, side by side;
* Immich-style incremental DBSCAN: faces in order; a face with ``min_faces`` neighbours within
  ``max_distance`` (cosine distance; Immich's defaults 0.5 and 3) is a core face and joins the
  person of its nearest neighbour that has one, or founds a person; non-core faces are deferred and
  then join the person of their nearest neighbour within the distance, if any. Neighbours come from
  our kNN graph (its time is counted), since exact radius search at this size is what Immich
  delegates to its vector database;
* Immich as it runs (:func:`immich_as_it_runs`): the same rule on a vector index of its own (faiss
  HNSW, M 16, efConstruction 300: the settings of Immich's face index), one search of
  ``min_faces`` results per face and, when none of them has a person, one search filtered to the
  faces with a person, as Immich's face recognition job does; its time is the index's build plus
  the searches and the assignment. The acceptance's time ratio is measured against this row;
* faiss k-means with the true number of people (an oracle advantage), on the largest subsample
  ``--kmeans-max`` its quadratic cost allows;
* HDBSCAN (scikit-learn, ``min_cluster_size=2``, noise = single-face clusters) on ``--hdbscan-max``
  faces; ours is re-run on the same subsamples for a like-for-like row.

Then the stable-id experiment (a full re-clustering of library + 1 % new faces; fraction of the
old faces whose cluster id changed vs whose cluster truly changed) and the incremental one (the
first ``--n-assign`` new faces assigned to the first clustering; time, and agreement with a full
re-clustering of the library plus those same faces). All clusterings use one kNN graph computed over
library + new faces (restricted to the faces each run clusters), so the graph is built once. With ``--real``, the same
table on the shared real labelled faces (embedded by the library; cached).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shared_datasets  # noqa: E402
from benchmarks.metrics import bcubed_per_face, clustering_metrics  # noqa: E402
from benchmarks.synthetic import HARD_PARAMS, SyntheticFaces, SyntheticParams  # noqa: E402
from face_assets.clustering import (  # noqa: E402
    KnnGraph,
    MeansIndex,
    assign_to_clusters,
    average_linkage,
    clear_best_index,
    cluster_embeddings,
    cluster_means,
    knn_graph,
    match_ids,
)
from face_assets.config import ClusteringSettings  # noqa: E402
from face_assets.process import faiss  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class PeakRSS:
    """Peak resident memory of this process between ``start()`` and ``stop()`` (sampled, GB)."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self._run = every, 0, False

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _loop(self) -> None:
        while self._run:
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def __enter__(self) -> "PeakRSS":
        self.peak, self._run = self.now(), True
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._run = False
        self._t.join()
        self.peak = max(self.peak, self.now())

    @property
    def gb(self) -> float:
        return self.peak / 2**30


# -- baselines -------------------------------------------------------------------------------------


def immich_dbscan(neighbors: np.ndarray, scores: np.ndarray, max_distance: float = 0.5, min_faces: int = 3) -> np.ndarray:
    """Immich's incremental DBSCAN-like person assignment on k-NN lists; unassigned faces stay alone."""
    from numba import njit

    @njit(cache=False)
    def run(nbr, sc, min_sim, min_faces):
        n, k = nbr.shape
        person = np.full(n, -1, np.int64)
        next_person = 0
        for deferred in range(2):
            for i in range(n):
                if person[i] >= 0:
                    continue
                count = 1  # the face itself is among its own search results in Immich
                for j in range(k):
                    if nbr[i, j] >= 0 and sc[i, j] >= min_sim:
                        count += 1
                core = count >= min_faces
                if not core and deferred == 0:
                    continue
                for j in range(k):
                    m = nbr[i, j]
                    if m >= 0 and sc[i, j] >= min_sim and person[m] >= 0:
                        person[i] = person[m]
                        break
                if person[i] < 0 and core:
                    person[i] = next_person
                    next_person += 1
        for i in range(n):
            if person[i] < 0:
                person[i] = next_person
                next_person += 1
        return person

    return run(neighbors, scores, 1.0 - max_distance, min_faces)


def immich_as_it_runs(x: np.ndarray, max_distance: float = 0.5, min_faces: int = 3, m: int = 16,
                      ef_construction: int = 300, ef_search: int = 100) -> tuple[np.ndarray, dict]:
    """Immich's face recognition job as it runs, on a vector index of its own: ``(person per face, seconds)``.

    A faiss HNSW index (inner product on unit rows: cosine) over every face stands for Immich's
    vector database index. Then, face by face in order, what the job does: search the face's
    ``min_faces`` nearest faces (the face itself among them) and keep those within
    ``max_distance``; a face that matches only itself gets no person; a face with fewer than
    ``min_faces`` matches is deferred to a second pass; otherwise it takes the person of its
    nearest match that has one, else the person of the nearest face within ``max_distance`` that
    has one (a second search, filtered to faces with a person), else (a core face) it founds a
    person. Deferred faces do the same but never found a person. The first search does not
    depend on earlier faces, so it is one batched call; the filtered one runs per face, on the
    persons as they stand. Faces without a person are returned as clusters of their own.
    """
    n, d = x.shape
    secs: dict = {}
    min_sim = 1.0 - max_distance
    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    for s in range(0, n, 65_536):
        index.add(np.ascontiguousarray(x[s : s + 65_536], np.float32))
    secs["index"] = time.perf_counter() - t
    t = time.perf_counter()
    index.hnsw.efSearch = max(ef_search, min_faces)
    sims = np.empty((n, min_faces), np.float32)
    rows = np.empty((n, min_faces), np.int64)
    for s in range(0, n, 65_536):
        sims[s : s + 65_536], rows[s : s + 65_536] = index.search(
            np.ascontiguousarray(x[s : s + 65_536], np.float32), min_faces)
    matched = (rows >= 0) & (sims >= min_sim)
    count = matched.sum(axis=1)
    secs["search"] = time.perf_counter() - t
    t = time.perf_counter()
    person = np.full(n, -1, np.int64)
    has_person = np.zeros((n + 7) // 8, np.uint8)  # the filter of the second search: bit i = face i has one
    params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBitmap(n, faiss.swig_ptr(has_person)),
                                        efSearch=max(ef_search, 1))
    next_person, filtered = 0, 0
    for deferred in (False, True):
        for i in range(n):
            if person[i] >= 0 or count[i] <= 1 or (count[i] < min_faces and not deferred):
                continue
            found = -1
            for j in range(min_faces):
                if matched[i, j] and person[rows[i, j]] >= 0:
                    found = person[rows[i, j]]
                    break
            if found < 0:
                filtered += 1
                s1, r1 = index.search(np.ascontiguousarray(x[i : i + 1], np.float32), 1, params=params)
                if r1[0, 0] >= 0 and s1[0, 0] >= min_sim:
                    found = person[r1[0, 0]]
            if found < 0 and count[i] >= min_faces:
                found, next_person = next_person, next_person + 1
            if found >= 0:
                person[i] = found
                has_person[i >> 3] |= np.uint8(1 << (i & 7))
    secs["assign"] = time.perf_counter() - t
    secs["filtered_searches"] = filtered
    alone = person < 0
    person[alone] = next_person + np.arange(int(alone.sum()))
    return person, secs


def nndescent_graph(x: np.ndarray, k: int, seed: int) -> tuple[KnnGraph, float]:
    """pynndescent's k-NN graph of unit embeddings (inner-product metric) as a :class:`KnnGraph`
    with exact cosines, and the seconds its numba functions took to compile (on a small array first,
    so the graph's own time excludes them)."""
    from pynndescent import NNDescent

    t = time.perf_counter()
    NNDescent(x[:2000], n_neighbors=k + 1, metric="dot", random_state=seed)
    compile_s = time.perf_counter() - t
    nbr, _ = NNDescent(x, n_neighbors=k + 1, metric="dot", random_state=seed, low_memory=True).neighbor_graph
    # Each face is among its own neighbours: keep the k others, best first.
    own = nbr == np.arange(len(x))[:, None]
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    nbr = np.take_along_axis(nbr, order, axis=1).astype(np.int32)
    scores = np.empty(nbr.shape, np.float32)
    for s in range(0, len(x), 10_000):  # in blocks: the neighbours' vectors of all faces would not fit
        rows = nbr[s : s + 10_000]
        scores[s : s + len(rows)] = np.einsum("ij,ikj->ik", x[s : s + len(rows)], x[np.maximum(rows, 0)])
    return KnnGraph(nbr, np.where(nbr >= 0, scores, -1).astype(np.float32)), compile_s


def graph_recall(x: np.ndarray, graph: KnnGraph, queries: np.ndarray, min_cos: float = 0.4) -> dict:
    """Share of the exact k nearest neighbours of ``queries`` the graph holds: all of them, and
    those with cosine >= ``min_cos`` (the pairs merging can use)."""
    k = graph.neighbors.shape[1]
    sims, exact = faiss.knn(x[queries], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    exact, sims = exact[:, 1:], sims[:, 1:]  # drop the face itself
    found = (exact[:, :, None] == graph.neighbors[queries][:, None, :]).any(axis=2)
    close = sims >= min_cos
    return {"recall_at_k": round(float(found.mean()), 4),
            f"recall_cos_{min_cos}": round(float(found[close].mean()), 4) if close.any() else None}


def kmeans_oracle(x: np.ndarray, k: int, niter: int = 10) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], k, niter=niter, spherical=True, seed=1234, min_points_per_centroid=1,
                      max_points_per_centroid=64)
    km.train(np.ascontiguousarray(x))
    return faiss.knn(x, km.centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel()


def hdbscan_labels(x: np.ndarray) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    lab = HDBSCAN(min_cluster_size=2, metric="euclidean", copy=True).fit_predict(x).astype(np.int64)
    noise = lab < 0
    lab[noise] = lab.max() + 1 + np.arange(noise.sum())
    return lab


# -- table -----------------------------------------------------------------------------------------

ROWS: list[dict] = []
#: The synthetic sets of ``--sets``.
SETS = {"plain": SyntheticParams(), "hard": HARD_PARAMS}


def record(method: str, n: int, seconds: float, peak_gb: float | None, pred: np.ndarray, true: np.ndarray,
           note: str = "") -> dict:
    """Score a clustering against the truth and add it to the table (``peak_gb`` None: not measured)."""
    m = clustering_metrics(pred, true)
    row = {"set": OUT.get("set", "plain"), "method": method, "n": n, "seconds": round(seconds, 1),
           "peak_gb": None if peak_gb is None else round(peak_gb, 2), "note": note,
           **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}}
    ROWS.append(row)
    log(f"[{row['set']}] {method} n={n}: {seconds:.1f}s peak {row['peak_gb']} GB pairwise P/R/F {m['pairwise_precision']:.4f} "
        f"{m['pairwise_recall']:.4f} {m['pairwise_f']:.4f} BCubed P/R/F {m['bcubed_precision']:.4f} "
        f"{m['bcubed_recall']:.4f} {m['bcubed_f']:.4f} clusters {m['clusters']} / {m['true_clusters']}")
    if OUT.get("json"):  # written as it goes: a long run stopped early keeps its rows
        OUT["json"].write_text(json.dumps(OUT["results"] | {"rows": ROWS}, indent=2, default=float))
    return row


OUT: dict = {}


def table(rows: list[dict]) -> str:
    head = (f"| {'method':<36} | {'faces':>9} | {'time s':>7} | {'peak GB':>7} | {'pw P':>6} | {'pw R':>6} | {'pw F':>6} "
            f"| {'B3 P':>6} | {'B3 R':>6} | {'B3 F':>6} | {'clusters':>9} | {'true':>9} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(
            f"| {r['method']:<36} | {r['n']:>9,} | {r['seconds']:>7.1f} | "
            f"{'-' if r['peak_gb'] is None else format(r['peak_gb'], '.2f'):>7} | {r['pairwise_precision']:>6.4f} "
            f"| {r['pairwise_recall']:>6.4f} | {r['pairwise_f']:>6.4f} | {r['bcubed_precision']:>6.4f} "
            f"| {r['bcubed_recall']:>6.4f} | {r['bcubed_f']:>6.4f} | {r['clusters']:>9,} | {r['true_clusters']:>9,} |")
    return "\n".join(lines)


# -- experiments -----------------------------------------------------------------------------------


def make_data(n: int, n_new: int, seed: int, params: SyntheticParams | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` library faces then ``n_new`` new ones (half new people, half known people), one array."""
    n_people_new = n_new // 2
    gen = SyntheticFaces(n + n_people_new, seed=seed, params=params)
    x = np.empty((n + n_new, gen.dim), np.float32)
    gen.embeddings(out=x[: n + n_people_new])
    labels = np.empty(n + n_new, np.int64)
    labels[: n + n_people_new] = gen.labels
    rng = np.random.default_rng(seed + 1)
    known = gen.labels[rng.integers(0, n, n_new - n_people_new)]  # face-weighted: as photos arrive
    x[n + n_people_new :] = gen.sample_faces(known, seed=seed + 1)
    labels[n + n_people_new :] = known
    # New arrivals in random order, so the first --n-assign mix both kinds.
    perm = n + rng.permutation(n_new)
    x[n:], labels[n:] = x[perm], labels[perm]
    return x, labels


def by_condition(params: SyntheticParams, n: int, n_new: int, seed: int, true: np.ndarray,
                 runs: dict[str, np.ndarray]) -> dict:
    """BCubed precision and recall of each run over the library faces of each condition of the
    harder set (as :func:`make_data` draws them): where its loss is."""
    cond = SyntheticFaces(n + n_new // 2, seed=seed, params=params).conditions()
    cond = {k: v[:n] for k, v in cond.items()}
    groups = {"sharp": (cond["quality"] < 0.05) & ~cond["bw"] & (cond["yaw"] < 0.1) & ~cond["duplicate"],
              "poor (quality > 0.6)": cond["quality"] > 0.6, "B/W": cond["bw"],
              "turned (yaw > 0.3)": cond["yaw"] > 0.3, "near-duplicate": cond["duplicate"],
              "all": np.ones(n, bool)}
    out = {}
    for run, pred in runs.items():
        prec, rec = bcubed_per_face(pred, true)
        out[run] = {g: {"faces": int(m.sum()), "bcubed_precision": round(float(prec[m].mean()), 4),
                        "bcubed_recall": round(float(rec[m].mean()), 4)} for g, m in groups.items()}
    return out


def condition_table(rows: dict) -> str:
    """The :func:`by_condition` figures as a table: a row per condition, BCubed P / R per run."""
    runs = list(rows)
    lines = [f"| {'condition':<22} | {'faces':>7} | " + " | ".join(f"{r + ' B3 P / R':>30}" for r in runs) + " |",
             "|" + "-" * 24 + "|" + "-" * 9 + "|" + "|".join("-" * 32 for _ in runs) + "|"]
    for g, first in rows[runs[0]].items():
        cells = [f"{rows[r][g]['bcubed_precision']:.4f} / {rows[r][g]['bcubed_recall']:.4f}" for r in runs]
        lines.append(f"| {g:<22} | {first['faces']:>7,} | " + " | ".join(f"{c:>30}" for c in cells) + " |")
    return "\n".join(lines)


def restrict(graph: KnnGraph, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Edges of the graph among rows ``< n`` only."""
    sub = KnnGraph(np.where(graph.neighbors[:n] < n, graph.neighbors[:n], -1), graph.scores[:n])
    return sub.edges()


def run_synthetic(args: argparse.Namespace, cfg: ClusteringSettings, params: SyntheticParams) -> dict:
    n = args.n
    n_new = max(2, int(round(n * args.new_frac)))
    log(f"generating {n:,} + {n_new:,} synthetic faces (set {OUT.get('set', 'plain')}, seed {args.seed})")
    t = time.perf_counter()
    x, labels = make_data(n, n_new, args.seed, params)
    if args.float16:  # the embeddings as a caller may hold them: half the memory of the input
        x = x.astype(np.float16)
    log(f"generated in {time.perf_counter() - t:.0f}s")
    old_x, old_true = x[:n], labels[:n]
    link = cfg.linkage_kwargs()
    results: dict = {}

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        graph = knn_graph(x, cfg.k, pca_dim=cfg.pca_dim, list_size=cfg.list_size, nprobe=cfg.nprobe, log=log)
        t_graph = time.perf_counter() - t0
        src, dst = restrict(graph, n)
        t = time.perf_counter()
        lab1 = average_linkage(old_x, src, dst, **link, log=log)
        t_link = time.perf_counter() - t
    del src, dst
    results["graph_seconds"] = {k: round(v, 1) for k, v in graph.seconds.items()}
    results["linkage_seconds"] = round(t_link, 1)
    record("ours: kNN graph + average linkage", n, t_graph + t_link, mem.gb, lab1, old_true,
           f"graph {t_graph:.0f}s on {len(x):,} faces + linkage {t_link:.0f}s")
    for variant in args.variants:  # other merge thresholds on the same graph (tuning at this size)
        src, dst = restrict(graph, n)
        t = time.perf_counter()
        lab = average_linkage(old_x, src, dst, **(link | variant))
        record(f"ours, linkage {json.dumps(variant)}", n, time.perf_counter() - t, None, lab, old_true,
               "linkage only, same graph")
        del src, dst, lab

    if not (args.skip_baselines or args.skip_nndescent or args.float16):
        results["graphs"] = compare_graphs(args, cfg, x, graph, old_x, old_true, t_graph)

    if not args.skip_baselines:
        with PeakRSS() as mem:
            t = time.perf_counter()
            sub = KnnGraph(np.where(graph.neighbors[:n] < n, graph.neighbors[:n], -1), graph.scores[:n])
            lab = immich_dbscan(sub.neighbors, sub.scores)
            t_imm = time.perf_counter() - t
        del sub
        record("Immich-style DBSCAN (0.5, 3)", n, t_graph + t_imm, mem.gb, lab, old_true,
               f"same kNN graph {t_graph:.0f}s + {t_imm:.0f}s")
        if not args.skip_immich_index:
            with PeakRSS() as mem:
                t = time.perf_counter()
                lab_run, secs = immich_as_it_runs(old_x)
                t_run = time.perf_counter() - t
            record("Immich as it runs (HNSW, 0.5, 3)", n, t_run, mem.gb, lab_run, old_true,
                   f"HNSW index {secs['index']:.0f}s + searches {secs['search']:.0f}s + "
                   f"assignment {secs['assign']:.0f}s ({secs['filtered_searches']:,} filtered searches)")
            results["immich_as_it_runs"] = {k: round(v, 1) for k, v in secs.items()}
            del lab_run
        ours = t_graph + t_link
        results["time_ratios"] = {r["method"]: round(ours / r["seconds"], 2) for r in ROWS
                                  if r["set"] == OUT.get("set", "plain") and r["method"].startswith("Immich")}
        log(f"ours / baseline time: {results['time_ratios']}")
        if params.nuisance is not None:
            results["by_condition"] = by_condition(params, n, n_new, args.seed, old_true,
                                                   {"ours": lab1, "Immich-style": lab})

    t = time.perf_counter()
    results.update(stable_and_incremental(cfg, x, labels, n, lab1, graph, args.n_assign))
    del graph
    log(f"stable ids + incremental in {time.perf_counter() - t:.0f}s")

    if not args.skip_baselines:
        rng = np.random.default_rng(args.seed + 2)
        for name, size in (("kmeans", min(n, args.kmeans_max)), ("hdbscan", min(n, args.hdbscan_max))):
            pick = np.sort(rng.choice(n, size, replace=False))
            xs, ts = np.ascontiguousarray(old_x[pick], np.float32), old_true[pick]
            with PeakRSS() as mem:
                t = time.perf_counter()
                lab = kmeans_oracle(xs, len(np.unique(ts))) if name == "kmeans" else hdbscan_labels(xs)
                secs = time.perf_counter() - t
            record("faiss k-means (true k)" if name == "kmeans" else "HDBSCAN (min_cluster_size 2)", size, secs,
                   mem.gb, lab, ts, "subsample" if size < n else "")
            if size < n:
                with PeakRSS() as mem:
                    res = cluster_embeddings(xs, **cfg.method_kwargs())
                record("ours, same subsample", size, res.seconds["total"], mem.gb, res.labels, ts)
    return results


def compare_graphs(args: argparse.Namespace, cfg: ClusteringSettings, x: np.ndarray, graph: KnnGraph,
                   old_x: np.ndarray, old_true: np.ndarray, t_graph: float) -> dict:
    """pynndescent's graph beside ours on the same faces: time, memory, recall, and the clustering
    average linkage makes of it."""
    n = len(old_x)
    with PeakRSS() as mem:
        t = time.perf_counter()
        nnd, compile_s = nndescent_graph(x, cfg.k, args.seed)
        t_nnd = time.perf_counter() - t - compile_s
    queries = np.sort(np.random.default_rng(args.seed + 3).choice(len(x), min(len(x), args.graph_queries),
                                                                  replace=False))
    out = {"faiss": {"seconds": round(t_graph, 1), **graph_recall(x, graph, queries)},
           "pynndescent": {"seconds": round(t_nnd, 1), "compile_seconds": round(compile_s, 1),
                           "peak_gb": round(mem.gb, 2), **graph_recall(x, nnd, queries)}}
    log(f"graphs on {len(x):,} faces, recall on {len(queries)} of them: {json.dumps(out)}")
    src, dst = restrict(nnd, n)
    log(f"pynndescent graph: {len(src):,} edges among the library's faces")
    t = time.perf_counter()
    lab = average_linkage(old_x, src, dst, **cfg.linkage_kwargs(), log=log)
    t_link = time.perf_counter() - t
    record("pynndescent graph + average linkage", n, t_nnd + t_link, mem.gb, lab, old_true,
           f"graph {t_nnd:.0f}s (+{compile_s:.0f}s numba compile) + linkage {t_link:.0f}s")
    return out


def same_members(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per face: is its cluster under labelling ``a`` the same set of faces as under ``b``?"""
    _, ia, ca = np.unique(a, return_inverse=True, return_counts=True)
    _, ib, cb = np.unique(b, return_inverse=True, return_counts=True)
    _, ic, cc = np.unique(ia.astype(np.int64) * (ib.max() + 1) + ib, return_inverse=True, return_counts=True)
    return (cc[ic] == ca[ia]) & (cc[ic] == cb[ib])


def same_people(lab1: np.ndarray, best: np.ndarray, c_ids: np.ndarray, lab2: np.ndarray, n: int,
                n_assign: int) -> float:
    """Fraction of the assigned faces that incremental assignment and the full re-clustering put
    with the same library faces.

    A face agrees when the library faces of the cluster it joined incrementally (none if it joined
    no cluster) and those of its cluster in the full run (none if that holds new faces only) are
    both empty, or share more than half of each: the full run may renumber, split off or absorb a
    few faces near the threshold, but the face is then still with the same person.
    """
    new_rows = np.arange(n, n + n_assign)
    lab_a = np.where(best >= 0, c_ids[np.maximum(best, 0)], -1)  # cluster label in the first run
    size1 = np.bincount(np.searchsorted(c_ids, lab1), minlength=len(c_ids))
    a_size = np.where(best >= 0, size1[np.maximum(best, 0)], 0)
    lab_b = lab2[new_rows]
    old2 = lab2[:n]
    b_size = np.bincount(old2, minlength=len(lab2))[lab_b]  # library faces in its full-run cluster
    # Overlap: library faces in both its incremental cluster and its full-run cluster.
    key_faces = lab1.astype(np.int64) * len(lab2) + old2
    keys, counts = np.unique(key_faces, return_counts=True)
    want = lab_a.astype(np.int64) * len(lab2) + lab_b
    pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    inter = np.where((lab_a >= 0) & (keys[pos] == want), counts[pos], 0)
    both_new = (a_size == 0) & (b_size == 0)
    majority = (2 * inter > a_size) & (2 * inter > b_size)
    return float(np.mean(both_new | majority))


def incremental_labels(cfg: ClusteringSettings, x: np.ndarray, lab1: np.ndarray, best: np.ndarray,
                       c_ids: np.ndarray, n: int) -> np.ndarray:
    """Labels of the library plus the assigned faces after the library's whole incremental step:
    assigned faces take their cluster, the others are clustered among themselves into new
    clusters (what ``PersonClusters.assign_new`` does)."""
    rest = np.flatnonzero(best < 0)
    lab = np.concatenate([lab1, np.where(best >= 0, c_ids[np.maximum(best, 0)], -1)])
    if len(rest):
        sub = cluster_embeddings(x[n + rest], **cfg.method_kwargs()).labels
        lab[n + rest] = lab1.max() + 1 + np.unique(sub, return_inverse=True)[1]
    return lab


def same_members_majority(lab_a: np.ndarray, lab_b: np.ndarray, rows: np.ndarray) -> float:
    """Fraction of ``rows`` whose cluster under ``lab_a`` and under ``lab_b`` share more than half
    of each (all faces counted, library and new)."""
    _, ia = np.unique(lab_a, return_inverse=True)
    _, ib = np.unique(lab_b, return_inverse=True)
    key = ia.astype(np.int64) * (ib.max() + 1) + ib
    _, ik, ck = np.unique(key, return_inverse=True, return_counts=True)
    inter = ck[ik][rows]
    return float(np.mean((2 * inter > np.bincount(ia)[ia][rows]) & (2 * inter > np.bincount(ib)[ib][rows])))


def assignment_accuracy(lab_old: np.ndarray, true: np.ndarray, placed: np.ndarray, c_ids: np.ndarray | None,
                        n: int, n_assign: int) -> float:
    """Fraction of new faces placed right: with the cluster whose majority person is theirs, or
    (when they joined no library cluster) their person having no cluster of 2+ library faces."""
    lab = placed if c_ids is None else np.where(placed >= 0, c_ids[np.maximum(placed, 0)], -1)
    _, inv = np.unique(lab_old, return_inverse=True)
    key = inv.astype(np.int64) * (true.max() + 1) + true[:n]
    keys, counts = np.unique(key, return_counts=True)
    kc = keys // (true.max() + 1)
    top = np.lexsort((-counts, kc))
    first = np.ones(len(top), bool)
    first[1:] = kc[top][1:] != kc[top][:-1]
    major = np.full(inv.max() + 1, -1, np.int64)
    major[kc[top][first]] = (keys % (true.max() + 1))[top][first]
    lab_ids = np.unique(lab_old)
    pos = np.minimum(np.searchsorted(lab_ids, lab), len(lab_ids) - 1)
    in_lib = (lab >= 0) & (lab_ids[pos] == lab)
    t_new = true[n : n + n_assign]
    ok = np.where(in_lib, major[pos] == t_new, False)
    # Faces not with a library cluster: right when no library cluster of 2+ faces is their person's.
    sizes = np.bincount(inv)
    has_cluster = np.zeros(true.max() + 1, bool)
    has_cluster[major[sizes >= 2]] = True
    ok |= ~in_lib & ~has_cluster[t_new]
    return float(ok.mean())


def stable_and_incremental(cfg: ClusteringSettings, x: np.ndarray, labels: np.ndarray, n: int, lab1: np.ndarray,
                           graph: KnnGraph, n_assign: int) -> dict:
    """Stable ids across a re-clustering with the new faces, and incremental assignment of the first ones."""
    link = cfg.linkage_kwargs()
    out: dict = {}
    faces = np.arange(len(x))
    ids1, next_id = match_ids(np.zeros(0), np.zeros(0), faces[:n], lab1, 1)

    # Incremental: the first n_assign new faces against the first clustering. The means and their
    # index are built once per clustering (kept by the caller); a call pays the search.
    n_assign = min(n_assign, len(x) - n)
    with PeakRSS() as mem:
        t = time.perf_counter()
        c_ids, means, sizes = cluster_means(x[:n], lab1)
        t_means = time.perf_counter() - t
        t = time.perf_counter()
        index = MeansIndex(means)
        group_index = clear_best_index(means, sizes)
        t_index = time.perf_counter() - t
        t = time.perf_counter()
        best, _ = assign_to_clusters(x[n : n + n_assign], means, sizes, **cfg.link_kwargs(), index=index,
                                     group_index=group_index)
        t_assign = time.perf_counter() - t
    # Stable id of each cluster row of `means`: the id its faces carry.
    row_of_face = np.searchsorted(c_ids, lab1)
    id_of_row = np.empty(len(c_ids), np.int64)
    id_of_row[row_of_face] = ids1
    inc = np.where(best >= 0, id_of_row[np.maximum(best, 0)], -1)
    out["incremental"] = {"faces": int(n_assign), "means_seconds": round(t_means, 2),
                          "index_seconds": round(t_index, 2), "assign_seconds": round(t_assign, 2),
                          "peak_gb": round(mem.gb, 2), "joined_existing": int((best >= 0).sum())}
    log(f"incremental: {n_assign} faces in {t_assign:.1f}s (once per clustering: means {t_means:.1f}s, "
        f"index {t_index:.1f}s over {len(c_ids):,} clusters), {(best >= 0).sum()} joined a cluster")
    del means, index, group_index

    # Full re-clustering of library + new faces.
    t = time.perf_counter()
    src, dst = graph.edges()
    lab2 = average_linkage(x, src, dst, **link, log=log)
    t_full = time.perf_counter() - t
    ids2, _ = match_ids(faces[:n], ids1, faces, lab2, next_id)
    changed_id = ids2[:n] != ids1
    # A face's cluster truly changed when its cluster, restricted to library faces, is another set.
    same = same_members(lab1, lab2[:n])
    out["stable_ids"] = {"faces": int(n), "new_faces": int(len(x) - n), "id_changed": float(changed_id.mean()),
                         "membership_changed": float((~same).mean()),
                         "id_changed_but_same_members": int((changed_id & same).sum()),
                         "recluster_seconds": round(t_full, 1)}
    log(f"stable ids: {changed_id.mean():.4%} of faces changed id, {(~same).mean():.4%} changed cluster "
        f"membership, {(changed_id & same).sum()} id changes without a membership change")
    record("ours, re-clustering with +1 % faces", len(x), t_full, None, lab2, labels,
           "linkage only: graph shared with the first run")
    # The full run the incremental step is compared with must see the same new faces: the faces
    # it never saw would bridge or split the clusters of those it did.
    lab_same, ids_same, t_same = lab2, ids2, None
    if n_assign < len(x) - n:
        t = time.perf_counter()
        src, dst = restrict(graph, n + n_assign)
        lab_same = average_linkage(x[: n + n_assign], src, dst, **link, log=log)
        t_same = round(time.perf_counter() - t, 1)
        ids_same, _ = match_ids(faces[:n], ids1, faces[: n + n_assign], lab_same, next_id)
    full = ids_same[n : n + n_assign]
    full_lab = np.where(np.isin(full, np.unique(ids1)), full, -1)
    strict = float(np.mean(full_lab == inc))
    agree = same_people(lab1, best, c_ids, lab_same, n, n_assign)
    out["incremental"]["recluster_seconds"] = t_same
    out["incremental"]["agreement_with_full"] = agree
    out["incremental"]["agreement_same_id"] = strict
    # The library's incremental step also clusters the faces no cluster took; compare whole clusters.
    inc_lab = incremental_labels(cfg, x, lab1, best, c_ids, n)
    rows = np.arange(n, n + n_assign)
    whole = same_members_majority(inc_lab, lab_same, rows)
    out["incremental"]["agreement_whole_step"] = whole
    # Against the run with every new face (the stable-id run), for comparison with earlier reports.
    out["incremental"]["agreement_whole_step_all_new"] = same_members_majority(inc_lab, lab2[: n + n_assign], rows)
    log(f"incremental step (assignment + the rest clustered among themselves) vs full re-clustering of the "
        f"library + the same {n_assign} faces: {whole:.4f} of them in clusters sharing more than half of their "
        f"faces ({out['incremental']['agreement_whole_step_all_new']:.4f} against the run with all "
        f"{len(x) - n} new faces)")
    out["incremental"]["accuracy"] = {"incremental": assignment_accuracy(lab1, labels, best, c_ids, n, n_assign),
                                      "full": assignment_accuracy(lab_same[:n], labels, lab_same[n:], None, n,
                                                                  n_assign)}
    log(f"incremental vs full re-clustering on {n_assign} faces: {agree:.4f} put with the same people, "
        f"{strict:.4f} same stable id; accuracy {out['incremental']['accuracy']}")
    return out


def run_real(cfg: ClusteringSettings) -> None:
    from benchmarks.synthetic_calibration import DEFAULT_CACHE, real_embeddings

    emb, ident, _ = real_embeddings(shared_datasets(), DEFAULT_CACHE, log=log)
    true = np.unique(ident, return_inverse=True)[1]
    x = np.ascontiguousarray(emb, np.float32)
    with PeakRSS() as mem:
        res = cluster_embeddings(x, **cfg.method_kwargs())
    record("real: ours", len(x), res.seconds["total"], mem.gb, res.labels, true)
    g = knn_graph(x, cfg.k, pca_dim=cfg.pca_dim, list_size=cfg.list_size, nprobe=cfg.nprobe)
    t = time.perf_counter()
    record("real: Immich-style DBSCAN (0.5, 3)", len(x), time.perf_counter() - t, None,
           immich_dbscan(g.neighbors, g.scores), true)
    t = time.perf_counter()
    lab = kmeans_oracle(x, len(np.unique(true)))
    record("real: faiss k-means (true k)", len(x), time.perf_counter() - t, None, lab, true)
    t = time.perf_counter()
    lab = hdbscan_labels(x)
    record("real: HDBSCAN (min_cluster_size 2)", len(x), time.perf_counter() - t, None, lab, true)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="library size (0: skip the synthetic part)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-frac", type=float, default=0.01, help="new faces, as a fraction of --n")
    p.add_argument("--n-assign", type=int, default=10_000, help="new faces assigned incrementally")
    p.add_argument("--kmeans-max", type=int, default=20_000)
    p.add_argument("--hdbscan-max", type=int, default=5_000)
    p.add_argument("--graph-queries", type=int, default=2000, help="faces the graphs' recall is measured on")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--skip-immich-index", action="store_true",
                   help="no 'Immich as it runs' row (its HNSW index over the library takes minutes)")
    p.add_argument("--skip-nndescent", action="store_true",
                   help="no pynndescent graph row (its numba compilation alone takes minutes)")
    p.add_argument("--sets", default="plain", type=lambda v: v.split(","),
                   help="synthetic sets, comma-separated, each with the whole table: plain, hard")
    p.add_argument("--real", action="store_true", help="also the shared real labelled faces")
    p.add_argument("--float16", action="store_true",
                   help="hold the synthetic embeddings in float16 (the clustering reads them in float32 piece by piece; "
                        "no pynndescent row)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a clustering setting, e.g. --set tau_1=0.5")
    p.add_argument("--variant", dest="variants", action="append", default=[], type=json.loads,
                   help='also run the linkage with these settings on the same graph, e.g. \'{"tau_inf": 0.3}\'')
    p.add_argument("--json", type=Path, help="also write the results here (updated after every row)")
    args = p.parse_args(argv)
    cfg = ClusteringSettings(**{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    log(f"settings: {cfg.model_dump()}")
    results: dict = {"settings": cfg.model_dump(), "n": args.n}
    OUT.update(results=results, json=args.json)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    unknown = set(args.sets) - set(SETS)
    if unknown:
        p.error(f"unknown --sets {sorted(unknown)}: choose among {sorted(SETS)}")
    results["sets"] = {}
    for name in args.sets if args.n else ():
        OUT["set"] = name
        results["sets"][name] = run_synthetic(args, cfg, SETS[name])
    OUT["set"] = "real"
    if args.real:
        run_real(cfg)
    for name in [*results["sets"], *(["real"] if args.real else [])]:
        print(f"\n{name} set" if name != "real" else "\nshared real labelled faces")
        print(table([r for r in ROWS if r["set"] == name]))
        for key in ("graphs", "time_ratios", "immich_as_it_runs", "stable_ids", "incremental"):
            if key in results["sets"].get(name, {}):
                print(f"{key}: {json.dumps(results['sets'][name][key])}")
        if "by_condition" in results["sets"].get(name, {}):
            print("\nBCubed by condition of the library's faces:")
            print(condition_table(results["sets"][name]["by_condition"]))
    if args.json:
        args.json.write_text(json.dumps(results | {"rows": ROWS}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
