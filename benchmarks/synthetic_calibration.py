"""Real vs synthetic face-similarity distributions: the calibration of :mod:`benchmarks.synthetic`.

    python benchmarks/synthetic_calibration.py [--faces 20000] [--plot data/synthetic_calibration.png]
                                              [--fit] [--refresh]

Real embeddings come from the library itself: ``FaceRecognitionLibrary.get_embedding`` on every
file of ``real/{lfw10,deepface,imfdb,dlib_johns,ageitgey}/<identity>/`` under the shared datasets
(``FACE_ASSETS_DATASETS``, default ``../shared/datasets`` beside the repo); files without a usable
face are skipped. They are cached in ``data/cache/real_embeddings.npz`` (recomputed when the file
list changes, or with ``--refresh``).

Synthetic faces are :class:`benchmarks.synthetic.SyntheticFaces` with the default (calibrated)
:class:`~benchmarks.synthetic.SyntheticParams`, or freshly fitted ones with ``--fit``.

Printed: the same-person and different-person cosine histograms side by side (fraction of pairs
per bin), then summary statistics (mean, std, percentiles, mean-embedding norm, PCA spectrum,
effective dimension), real vs synthetic. Pairs of the real set are weighted so that every
identity (same-person) and every pair of identities (different-person) counts equally, since its
42 identities have 1 to 50 images; the synthetic statistics are computed the same way. With
matplotlib installed, the histograms are also drawn to ``--plot``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shared_datasets  # noqa: E402
from benchmarks.synthetic import (  # noqa: E402
    SyntheticParams,
    calibration_report,
    fit_params,
    matched_stats,
    similarity_stats,
)

FOLDERS = ("lfw10", "deepface", "imfdb", "dlib_johns", "ageitgey")
DEFAULT_CACHE = REPO / "data" / "cache" / "real_embeddings.npz"
DEFAULT_PLOT = REPO / "data" / "synthetic_calibration.png"




def _real_files(root: Path) -> list[tuple[str, str]]:
    """``(relative path, identity)`` of every labelled real image, identity = ``folder/person``."""
    out = []
    for folder in FOLDERS:
        base = root / "real" / folder
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.parent != base:
                out.append((path.relative_to(root).as_posix(), f"{folder}/{path.parent.name}"))
    return out


def cached_for_files(root: Path, cache: Path, refresh: bool, log: Callable[[str], None]
                     ) -> tuple[list[tuple[str, str]], np.ndarray, dict[str, np.ndarray] | None]:
    """The labelled real files ``(relative path, identity)``, their paths as an array (what a cache
    records as ``listed``), and the arrays of ``cache`` when it holds exactly that list (else None)."""
    files = _real_files(root)
    if not files:
        raise SystemExit(f"no labelled real images under {root / 'real'} (set FACE_ASSETS_DATASETS)")
    listed = np.array([f for f, _ in files])
    if cache.is_file() and not refresh:
        with np.load(cache) as z:
            if np.array_equal(z["listed"], listed):
                return files, listed, {k: z[k] for k in z.files}
        log(f"{cache.name}: file list changed, recomputing")
    return files, listed, None


def real_embeddings(
    root: Path, cache: Path, refresh: bool = False, log: Callable[[str], None] = print
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(embeddings float32 [n, d], identity labels str [n], relative paths str [n])`` of real faces.

    Read from ``cache`` when it holds exactly the current file list, else computed with the
    library (files raising :class:`FaceRecognitionError` are skipped) and cached.
    """
    files, listed, cached = cached_for_files(root, cache, refresh, log)
    if cached is not None:
        return cached["embeddings"], cached["labels"], cached["paths"]
    from face_assets import FaceRecognitionError
    from face_assets.cartoon import DEFAULT_ARTIFACT
    from face_assets.library import FaceRecognitionLibrary

    if not DEFAULT_ARTIFACT.is_file():  # the cartoon classifier is not trained yet: skip that check
        os.environ.setdefault("FACE_ASSETS__FILTER__CHECK_CARTOON", "false")
    emb, labels, paths = [], [], []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, FaceRecognitionLibrary(index_dir=tmp) as lib:
        for i, (rel, ident) in enumerate(files):
            try:
                v = lib.get_embedding(root / rel)
            except FaceRecognitionError as e:
                log(f"skip {rel}: {type(e).__name__}")
                continue
            emb.append(np.asarray(v, dtype=np.float32))
            labels.append(ident)
            paths.append(rel)
            if (i + 1) % 100 == 0:
                log(f"embedded {i + 1}/{len(files)} files in {time.time() - t0:.0f}s")
    out = np.stack(emb), np.array(labels), np.array(paths)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, embeddings=out[0], labels=out[1], paths=out[2], listed=listed)
    log(f"cached {len(out[0])} real embeddings ({len(files) - len(out[0])} files skipped) in {cache}")
    return out


def _pair_sims(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = emb.astype(np.float64) @ emb.T.astype(np.float64)
    iu = np.triu_indices(len(emb), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    return s[iu][same], s[iu][~same]


def histogram_table(real: tuple[np.ndarray, np.ndarray], syn: tuple[np.ndarray, np.ndarray], width: float) -> str:
    """Side-by-side % of pairs per cosine bin: same-person real/synthetic, different-person real/synthetic."""
    lo = np.floor(min(v.min() for v in (*real, *syn)) / width) * width
    hi = np.ceil(max(v.max() for v in (*real, *syn)) / width) * width
    edges = np.round(np.arange(lo, hi + width / 2, width), 6) + 0.0  # (no "-0.00")
    cols = [np.histogram(v, edges)[0] / len(v) * 100 for v in (real[0], syn[0], real[1], syn[1])]
    lines = [
        f"{'cosine bin':>15} | {'same real':>9} {'same syn':>9} | {'diff real':>9} {'diff syn':>9}",
        f"{'-' * 15}-+-{'-' * 19}-+-{'-' * 19}",
    ]
    for i in range(len(edges) - 1):
        vals = [c[i] for c in cols]
        if max(vals) < 0.005:
            continue
        cells = [f"{v:8.2f}%" if v >= 0.005 else f"{'':9}" for v in vals]
        lines.append(f"[{edges[i]:+.2f}, {edges[i + 1]:+.2f}) | {cells[0]} {cells[1]} | {cells[2]} {cells[3]}")
    return "\n".join(lines)


def plot(path: Path, real: tuple[np.ndarray, np.ndarray], syn: tuple[np.ndarray, np.ndarray], log: Callable[[str], None]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, i, title in ((axes[0], 0, "same person"), (axes[1], 1, "different people")):
        bins = np.linspace(min(real[i].min(), syn[i].min()), max(real[i].max(), syn[i].max()), 60)
        ax.hist(real[i], bins, density=True, alpha=0.5, label=f"real ({len(real[i]):,} pairs)")
        ax.hist(syn[i], bins, density=True, histtype="step", lw=2, label=f"synthetic ({len(syn[i]):,} pairs)")
        ax.set_title(f"cosine, {title}")
        ax.set_yscale("log" if i == 1 else "linear")
        ax.legend(loc="lower center" if i else "upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    log(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicates", type=int, default=16, help="synthetic sets of the real design")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit", action="store_true", help="fit the parameters first (a few minutes)")
    p.add_argument("--bin", type=float, default=0.05, help="histogram bin width")
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG path (needs matplotlib)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--refresh", action="store_true", help="recompute the real embeddings")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    emb, labels, _ = real_embeddings(shared_datasets(), args.cache, args.refresh, log)
    sizes = np.unique(labels, return_counts=True)[1]
    params = fit_params(emb, labels, log=log) if args.fit else SyntheticParams()
    real = similarity_stats(emb, labels)
    syn, syn_same, syn_diff = matched_stats(params, sizes, emb.shape[1], args.replicates, args.seed)
    real_pairs = _pair_sims(emb, labels)

    print(
        f"real: {len(emb)} faces of {len(sizes)} people (folders {', '.join(FOLDERS)}), "
        f"{len(real_pairs[0]):,} same-person and {len(real_pairs[1]):,} different-person pairs"
    )
    print(
        f"synthetic: {args.replicates} sets of the same design (same sizes, fresh people each), seed {args.seed}, "
        f"{'fitted' if args.fit else 'default'} SyntheticParams:"
    )
    print("  " + ", ".join(f"{k}={v}" for k, v in vars(params).items()))
    print()
    print(histogram_table(real_pairs, (syn_same, syn_diff), args.bin))
    print()
    print(calibration_report(real, syn))
    plot(args.plot, real_pairs, (syn_same, syn_diff), log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
