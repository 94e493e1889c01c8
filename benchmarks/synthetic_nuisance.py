"""Shared nuisance directions of real face embeddings, and the harder synthetic set that carries them.

    python benchmarks/synthetic_nuisance.py [--refresh] [--faces 4000]

Real faces look alike not only because their people do: two black-and-white photos, two profiles or
two blurred small faces of *different* people are closer than the same people photographed well,
because the condition moves every embedding the same way. This script measures that move with the
project's own recognizer on the shared labelled real faces (``real/{lfw10,deepface,imfdb,
dlib_johns,ageitgey}``, the calibration set of :mod:`benchmarks.synthetic_calibration`):

* **B/W**: each photo embedded as it is and converted to grey (same detection, same alignment);
* **low quality**: the aligned face shrunk to 40 px (the smallest face the library keeps), saved
  as JPEG quality 30 and enlarged back (a small, compressed face of a group photo or an old phone);
* **profile**: no photo exists twice at two poses, so the shift is read from the real variation:
  a yaw proxy from the five landmarks (nose offset from the eyes' midpoint over the eye distance),
  and the within-person regression of the embedding on it.

For each: the *shared shift* (norm of the mean of the paired differences, and how much of each
difference lies along it), the cosine of a photo with its altered self, and the effect on
strangers: the mean cosine of two different people both altered minus both as they were
(profile: both in the top yaw quartile minus both in the bottom one). The same statistics are
computed on :class:`benchmarks.synthetic.SyntheticFaces` with the harder
:data:`benchmarks.synthetic.HARD_PARAMS`, beside the same-person / different-person cosine
statistics of both sets against the real ones. The real embeddings are cached in
``build/cache/real_nuisance.npz`` (recomputed when the file list changes, or with ``--refresh``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import shared_datasets  # noqa: E402
from benchmarks.synthetic import (  # noqa: E402
    HARD_PARAMS,
    SyntheticFaces,
    SyntheticParams,
    matched_stats,
    similarity_stats,
)
from benchmarks.synthetic_calibration import cached_for_files  # noqa: E402

DEFAULT_CACHE = REPO / "build" / "cache" / "real_nuisance.npz"
# The degraded face: the aligned crop at the size of the smallest face the library keeps
# (filter.min_face_size 36 px box, ~40 px aligned), JPEG-compressed; the recognizer's input is 112.
LOW_SIDE = 40
LOW_JPEG = 30


def yaw_proxy(kps: np.ndarray) -> float:
    """|nose x - eyes' midpoint x| / eye distance from SCRFD's five landmarks: 0 frontal, ~0.5+ profile."""
    eyes = 0.5 * (kps[0] + kps[1])
    dist = float(np.linalg.norm(kps[1] - kps[0])) or 1.0
    return abs(float(kps[2][0] - eyes[0])) / dist


def _degrade(crop: np.ndarray) -> np.ndarray:
    import cv2

    side = crop.shape[0]
    small = cv2.resize(crop, (LOW_SIDE, LOW_SIDE), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, LOW_JPEG])
    return cv2.resize(cv2.imdecode(buf, cv2.IMREAD_COLOR), (side, side), interpolation=cv2.INTER_LINEAR)


def real_nuisance_embeddings(root: Path, cache: Path, refresh: bool = False,
                             log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """Per real face: ``colour``, ``grey``, ``low`` unit embeddings, ``yaw`` proxy, ``labels``, ``paths``.

    One detection per photo (its largest face); the grey and low-quality versions are embedded from
    the same landmarks, so the difference is the condition's alone. Cached in ``cache``.
    """
    files, listed, cached = cached_for_files(root, cache, refresh, log)
    if cached is not None:
        return cached

    import cv2

    from face_assets.analysis import FaceAnalyzer
    from face_assets.config import load_settings
    from face_assets.imaging import load_image

    analyzer = FaceAnalyzer(load_settings())
    rec = analyzer.recognizer
    out: dict[str, list] = {k: [] for k in ("colour", "grey", "low", "yaw", "labels", "paths")}
    t0 = time.time()
    for i, (rel, ident) in enumerate(files):
        try:
            img = load_image(root / rel)
        except Exception as e:  # noqa: BLE001 - an unreadable file is skipped, as in the calibration
            log(f"skip {rel}: {type(e).__name__}")
            continue
        faces, _ = analyzer.detector.predict([img])[0]
        if not faces:
            continue
        kps = faces[0].kps
        crop = rec.align(img, kps)
        grey = cv2.cvtColor(cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        emb, _ = rec.predict([crop, grey, _degrade(crop)])
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        for key, v in zip(("colour", "grey", "low"), emb):
            out[key].append(v)
        out["yaw"].append(yaw_proxy(kps))
        out["labels"].append(ident)
        out["paths"].append(rel)
        if (i + 1) % 100 == 0:
            log(f"embedded {i + 1}/{len(files)} files in {time.time() - t0:.0f}s")
    res = {k: np.array(v, dtype=np.float32 if k in ("colour", "grey", "low", "yaw") else None)
           for k, v in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, listed=listed, **res)
    log(f"cached {len(res['colour'])} faces x 3 versions in {cache}")
    return res


def paired_shift(before: np.ndarray, after: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Statistics of a condition applied to the same photos: ``shift`` (norm of the mean difference),
    ``along`` (mean share of each difference's squared norm along that mean), ``self_cos`` (mean
    cosine of a photo with its altered self), ``strangers`` (mean cosine of two different people
    both altered minus both before) and ``same`` (the same for two photos of one person, averaged
    per person)."""
    d = after - before
    moved = (d * d).sum(axis=1) > 1e-8  # a photo already grey does not move: not a B/W pair
    before, after, labels, d = before[moved], after[moved], labels[moved], d[moved]
    m = d.mean(axis=0)
    u = m / np.linalg.norm(m)
    delta = after @ after.T - before @ before.T
    iu = np.triu_indices(len(before), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    per_person = []  # people weigh equally: pairs would let the largest person decide
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        if len(rows) >= 2:
            per_person.append(float(delta[np.ix_(rows, rows)][np.triu_indices(len(rows), 1)].mean()))
    return {"shift": float(np.linalg.norm(m)),
            "along": float(np.mean((d @ u) ** 2 / np.maximum((d * d).sum(axis=1), 1e-12))),
            "self_cos": float(np.mean((before * after).sum(axis=1))),
            "strangers": float(delta[iu][~same].mean()), "same": float(np.mean(per_person))}


def pose_effect(emb: np.ndarray, yaw: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None
                ) -> dict[str, float]:
    """Profile vs frontal: mean cosine of two different people both in the top yaw quartile minus
    both in the bottom one (``strangers``), and the quartiles' yaw (``yaw_q1``, ``yaw_q3``). With
    ``groups``, only pairs of one group (the real folders: they differ in both pose and source)."""
    lo, hi = np.quantile(yaw, [0.25, 0.75])
    s = emb @ emb.T
    diff = labels[:, None] != labels[None, :]
    if groups is not None:
        diff &= groups[:, None] == groups[None, :]
    top, bot = yaw >= hi, yaw <= lo
    both_top = diff & top[:, None] & top[None, :]
    both_bot = diff & bot[:, None] & bot[None, :]
    return {"strangers": float(s[both_top].mean() - s[both_bot].mean()), "yaw_q1": float(lo), "yaw_q3": float(hi)}


def folders(labels: np.ndarray) -> np.ndarray:
    """The source folder of each real face (its label is ``folder/person``)."""
    return np.array([str(v).split("/")[0] for v in labels])


def fit_nuisance(real: dict[str, np.ndarray], null_draws: int = 50, seed: int = 0) -> dict[str, float]:
    """:class:`~benchmarks.synthetic.NuisanceParams` fields from the real pairs.

    A condition moves a unit face ``f`` to ``(f + A d + P r) / s``, ``s = sqrt(1 + A^2 + P^2)``,
    so its self-cosine is ``C = 1 / s`` and the mean of the differences is ``A d / s - (1 - 1 / s)``
    times the mean face: the shared part is read after adding the mean face's share back.
    Pose: the within-person regression of the faces on the yaw proxy; its norm less the norm
    that shuffling the yaw within each person gives (noise) is the shared shift per unit of yaw.
    """
    c = real["colour"]
    mean = c.mean(axis=0)
    mean_dir = mean / np.linalg.norm(mean)
    out = {}
    for name, key in (("bw", "grey"), ("low", "low")):
        d = real[key] - c
        moved = (d * d).sum(axis=1) > 1e-8
        cos = float(np.mean((c[moved] * real[key][moved]).sum(axis=1)))
        v = d[moved].mean(axis=0) + (1.0 - cos) * c[moved].mean(axis=0)
        a = float(np.linalg.norm(v)) / cos
        out[f"{name}_shift"] = a
        out[f"{name}_private"] = float(np.sqrt(max(1.0 / cos**2 - 1.0 - a * a, 0.0)))
        out[f"{name}_alignment"] = float(v @ mean_dir / np.linalg.norm(v))
    labels, yaw = real["labels"], real["yaw"].astype(np.float64)
    _, inv = np.unique(labels, return_inverse=True)
    counts = np.bincount(inv)
    means = np.zeros((counts.size, c.shape[1]))
    np.add.at(means, inv, c)
    resid = c - means[inv] / counts[inv, None]
    centred = yaw - (np.bincount(inv, yaw) / counts)[inv]

    def beta(t: np.ndarray) -> np.ndarray:
        return (resid * t[:, None]).sum(axis=0) / (t * t).sum()

    b = beta(centred)
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(null_draws):
        t = centred.copy()
        for k in range(counts.size):
            rows = np.flatnonzero(inv == k)
            t[rows] = rng.permutation(t[rows])
        null.append(float(np.sum(beta(t) ** 2)))
    signal = float(np.sqrt(max(float(b @ b) - np.mean(null), 0.0)))
    out["pose_shift"] = signal
    out["pose_alignment"] = float(b @ mean_dir) / signal if signal else 0.0
    out["yaw_median"] = float(np.median(yaw))
    out["yaw_log_sd"] = float(np.log(np.quantile(yaw, 0.9) / np.median(yaw)) / 1.2816)  # z of the 90th percentile
    return out


def synthetic_nuisance(params: SyntheticParams, n_faces: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """The same statistics on a synthetic set: each face with and without each condition
    (:meth:`SyntheticFaces.nuisance_pairs`), and the pose effect on its own faces."""
    gen = SyntheticFaces(n_faces, seed=seed, params=params)
    plain, bw, low, yaw = gen.nuisance_pairs()
    return {"bw": paired_shift(plain, bw, gen.labels), "low": paired_shift(plain, low, gen.labels),
            "pose": pose_effect(gen.embeddings(), yaw, gen.labels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--refresh", action="store_true", help="recompute the real embeddings")
    p.add_argument("--faces", type=int, default=4000, help="synthetic faces for the nuisance statistics")
    p.add_argument("--replicates", type=int, default=8, help="synthetic sets of the real design")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    real = real_nuisance_embeddings(shared_datasets(), args.cache, args.refresh, log)
    labels = real["labels"]
    rows = {"real": {"bw": paired_shift(real["colour"], real["grey"], labels),
                     "low": paired_shift(real["colour"], real["low"], labels),
                     "pose": pose_effect(real["colour"], real["yaw"], labels, folders(labels))}}
    log("fitted: " + ", ".join(f"{k}={v:.3f}" for k, v in fit_nuisance(real).items()))
    rows["hard"] = synthetic_nuisance(HARD_PARAMS, args.faces)
    print(f"nuisance shifts: real ({len(labels)} faces of {len(np.unique(labels))} people) vs the harder "
          f"synthetic set ({args.faces} faces, seed 0; the plain set has none)")
    print(f"| {'statistic':<28} | {'real':>7} | {'hard':>7} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 9}|")
    for cond, keys in (("bw", ("shift", "along", "self_cos", "strangers", "same")),
                       ("low", ("shift", "along", "self_cos", "strangers", "same")), ("pose", ("strangers",))):
        for k in keys:
            print(f"| {cond + ' ' + k:<28} | {rows['real'][cond][k]:7.3f} | {rows['hard'][cond][k]:7.3f} |")
    sizes = np.unique(labels, return_counts=True)[1]
    target = similarity_stats(real["colour"], labels)
    syn = {name: matched_stats(params, sizes, replicates=args.replicates)[0]
           for name, params in (("plain", SyntheticParams()), ("hard", HARD_PARAMS))}
    print()
    print("same-person / different-person cosines (real: these photos as they are; synthetic: sets of "
          f"the same design, {args.replicates} replicates)")
    print(f"| {'statistic':<28} | {'real':>7} | {'plain':>7} | {'hard':>7} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 9}|{'-' * 9}|")
    for k in ("same_mean", "same_std", "same_p5", "same_p50", "same_p99", "diff_mean", "diff_std", "diff_p99",
              "diff_p99.9", "person_spread"):
        print(f"| {k:<28} | {target[k]:7.3f} | {syn['plain'][k]:7.3f} | {syn['hard'][k]:7.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
