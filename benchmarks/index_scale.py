"""Scale benchmark of :class:`face_assets.index.FaceIndex` on synthetic face embeddings.

    python benchmarks/index_scale.py --n 2000000 [--queries 1000] [--factory "auto;IVF8192,SQ8"]
                                     [--nprobe 512,682] [--refine-factor 10,20]

Generates ``n`` synthetic faces (:mod:`benchmarks.synthetic`, parameters calibrated on real
embeddings), builds each ``--factory`` in turn (``;``-separated, default: what "auto" picks for
that size) and reports, in one run:

* build time, RSS before/after each build, and peak memory (``ru_maxrss``) of the whole run;
* single-query latency p50/p99 for top-10 (one query per call, as a user would search);
* exact search (``IndexFlatIP`` over the same data) single-query latency and the speed-up;
* recall@10 against exact search (batch-searched ground truth), for each ``--nprobe`` and
  ``--refine-factor`` value.

The dataset lives once in memory: it is generated straight into the storage of the exact
``IndexFlatIP``, and the ANN index is built from a view of it.

Queries are fresh faces of identities in the library (held-out: not in the index), in two mixes:
``faces`` picks the identity of a random library face (people with many photos are searched more,
like holding out random photos), ``people`` picks identities uniformly (mostly people with 1-3
photos, the hard case). Two recall figures per mix:

* ``recall@10``: |ANN top-10 ∩ exact top-10| / 10, the standard definition;
* ``match@10``: the same, counting only exact neighbours with cosine >= ``--match-threshold``
  (0.3, about where face matching starts to be plausible: the part of recall that changes what a
  user sees).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.synthetic import SyntheticFaces  # noqa: E402
from face_assets.config import ProcessSettings  # noqa: E402
from face_assets.index import FaceIndex  # noqa: E402
from face_assets.process import apply_process_settings, faiss  # noqa: E402

GB = 1024**3
_T0 = time.time()


def log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def rss_bytes() -> int | None:
    """Current resident set size (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def fmt_gb(b: int | None) -> str:
    return "n/a" if b is None else f"{b / GB:.2f} GiB"


def recall(found: np.ndarray, truth: np.ndarray, truth_scores: np.ndarray, min_score: float | None) -> float:
    """Fraction of exact top-k neighbours (optionally only those scoring >= min_score) found."""
    hit = total = 0
    for f, t, s in zip(found, truth, truth_scores):
        keep = t[t >= 0] if min_score is None else t[(t >= 0) & (s >= min_score)]
        total += len(keep)
        hit += len(np.intersect1d(keep, f, assume_unique=False))
    return hit / total if total else float("nan")


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def single_query_latencies(search, queries: np.ndarray, k: int) -> np.ndarray:
    """Seconds per call, one query per call."""
    for q in queries[: min(5, len(queries))]:  # warm caches and thread pools
        search(q[None], k)
    out = np.empty(len(queries))
    for i, q in enumerate(queries):
        t = time.perf_counter()
        search(q[None], k)
        out[i] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000, help="library size (faces)")
    p.add_argument("--queries", type=int, default=1000, help="queries per mix")
    p.add_argument("--factory", default="auto", help="FaceIndex factory strings, ';'-separated (built in turn)")
    p.add_argument("--nprobe", default="", help="comma-separated nprobe values to sweep (default: the index's)")
    p.add_argument("--refine-factor", default="", help="comma-separated refine factors to sweep (default: the index's)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exact-queries", type=int, default=50, help="single queries timed on the exact index")
    p.add_argument("--match-threshold", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    apply_process_settings(ProcessSettings(omp_threads=args.threads))  # before faiss loads
    k = args.k

    # -- data, generated straight into the exact index's storage -----------------------------
    gen = SyntheticFaces(args.n, dim=args.dim, seed=args.seed)
    exact = faiss.IndexFlatIP(args.dim)
    exact.codes.resize(args.n * args.dim * 4)
    exact.ntotal = args.n
    data = faiss.rev_swig_ptr(exact.get_xb(), args.n * args.dim).reshape(args.n, args.dim)
    t = time.time()
    gen.embeddings(out=data)
    t_gen = time.time() - t
    log(f"generated {args.n:,} faces of {gen.n_identities:,} identities in {t_gen:.1f}s")

    rng = np.random.default_rng(args.seed + 1)
    mixes = {
        "faces": gen.labels[rng.integers(0, args.n, args.queries)],
        "people": rng.integers(0, gen.n_identities, args.queries),
    }
    queries = {m: gen.sample_faces(ids, seed=args.seed + 10 + i) for i, (m, ids) in enumerate(mixes.items())}

    t = time.time()
    truth = {m: exact.search(q, k) for m, q in queries.items()}
    t_truth = time.time() - t
    log(f"exact ground truth for {sum(len(q) for q in queries.values())} queries in {t_truth:.1f}s")

    nq_exact = min(args.exact_queries, args.queries)
    exact_lat = single_query_latencies(exact.search, queries["faces"][:nq_exact], k)
    log(f"exact single-query p50 {np.median(exact_lat) * 1e3:.1f} ms")

    # -- build and sweep, per factory --------------------------------------------------------
    rows, builds = [], []
    for factory in [f.strip() for f in args.factory.split(";") if f.strip()]:
        index = FaceIndex(dim=args.dim, factory=factory)
        rss_before = rss_bytes()
        t = time.time()
        index.rebuild(np.arange(args.n, dtype=np.int64), data)
        t_build = time.time() - t
        rss_after, peak_after = rss_bytes(), peak_rss_bytes()
        builds.append((factory, index.resolved_factory, t_build, rss_before, rss_after, peak_after))
        log(f"built {index.resolved_factory} in {t_build:.1f}s")
        default = (index.nprobe, index.refine_factor)
        refines = ints(args.refine_factor) or [default[1]]
        if "Refine(" not in index.resolved_factory:
            refines = [default[1]]  # no re-ranking stage: the factor does nothing
        for nprobe, rf in [(n, r) for n in ints(args.nprobe) or [default[0]] for r in refines]:
            if nprobe is not None:
                index.nprobe = nprobe  # (at most nlist)
            index.refine_factor = rf
            lat = single_query_latencies(index.search, queries["faces"], k)
            nprobe = index.nprobe
            row = {"factory": index.resolved_factory, "nprobe": nprobe, "default": (nprobe, rf) == default}
            row["rf"] = rf if "Refine(" in index.resolved_factory else None
            row.update(p50=np.median(lat), p99=np.percentile(lat, 99))
            for m, q in queries.items():
                _, found = index.search(q, k)
                ts, ti = truth[m]
                row[f"r_{m}"] = recall(found, ti, ts, None)
                row[f"m_{m}"] = recall(found, ti, ts, args.match_threshold)
            rows.append(row)
            log(f"{row['factory']} nprobe={nprobe} refine={row['rf']}: p50 {row['p50'] * 1e3:.2f} ms, recall@10 faces "
                f"{row['r_faces']:.3f} people {row['r_people']:.3f}")
        del index
    peak_end = peak_rss_bytes()

    # -- report ------------------------------------------------------------------------------
    exact_p50 = float(np.median(exact_lat))
    sizes = gen.sizes
    print(
        f"index_scale  n={args.n:,}  dim={args.dim}  queries={args.queries}/mix  k={k}  "
        f"threads={args.threads}  seed={args.seed}  data: synthetic, calibrated SyntheticParams()"
    )
    print(
        f"data         {gen.n_identities:,} identities (1 face: {np.mean(sizes == 1):.0%}, <=3: "
        f"{np.mean(sizes <= 3):.0%}, >=100: {int(np.sum(sizes >= 100)):,}, max {int(sizes.max())}); "
        f"generated in {t_gen:.1f} s; dataset = exact index {fmt_gb(args.n * args.dim * 4)}"
    )
    for factory, resolved, t_build, rss_before, rss_after, peak_after in builds:
        grown = None if rss_after is None or rss_before is None else rss_after - rss_before
        print(
            f"build        {factory!r} -> {resolved}: {t_build:.1f} s, RSS {fmt_gb(rss_before)} -> "
            f"{fmt_gb(rss_after)} (index ~{fmt_gb(grown)}), peak so far {fmt_gb(peak_after)}"
        )
    print(f"peak memory  ru_maxrss {fmt_gb(peak_end)} for the whole run (dataset, exact index and ANN index)")
    print(
        f"exact        IndexFlatIP 1 query/call: p50 {exact_p50 * 1e3:.1f} ms  p99 "
        f"{np.percentile(exact_lat, 99) * 1e3:.1f} ms ({nq_exact} queries); batch ground truth "
        f"{t_truth:.1f} s"
    )
    thr = args.match_threshold
    head = (
        f"| index | nprobe | refine | p50 ms | p99 ms | speed-up | recall@10 faces | recall@10 people "
        f"| match@10>={thr} faces | match@10>={thr} people |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(
            f"| {r['factory']} | {str(r['nprobe']) + mark:>6} | {r['rf'] or '-'!s:>6} | {r['p50'] * 1e3:6.2f} "
            f"| {r['p99'] * 1e3:6.2f} | "
            f"{exact_p50 / r['p50']:7.0f}x | {r['r_faces']:15.3f} | {r['r_people']:16.3f} "
            f"| {r['m_faces']:18.3f} | {r['m_people']:19.3f} |"
        )
    print("(* = defaults of that index; refine = candidates re-ranked per result, k * factor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
