"""Synthetic face embeddings with known identities, calibrated on real ArcFace embeddings.

Real face libraries are long-tailed (most people on one to three photos, a few on hundreds), and
real embeddings are not random directions: they share a mean direction, their variance is spread
unevenly (an effective dimension of ~200 rather than 512), and people cluster by demographics.
This module generates such a library, with every knob an explicit field of
:class:`SyntheticParams` whose defaults are fitted (:func:`fit_params`) on the library's own
embeddings of the shared labelled real faces (``benchmarks/synthetic_calibration.py`` prints the
comparison; ``docs/index.md`` has the numbers).

The model. A fixed random basis (from the seed) carries a power-law spectrum
``lambda_i ~ i ** -identity_decay``; identity vectors are Gaussian with that covariance. Each person
belongs to one of ``n_clusters`` demographic super-clusters, whose centres are drawn the same way,
and gets the unit *centroid*

    c = normalize(sqrt(mean_share) * u + sqrt(1 - mean_share) * (sqrt(cluster_share) * g_cluster
                                                                  + sqrt(1 - cluster_share) * z)),

``u`` a common unit mean direction, ``z`` the person's own Gaussian vector. A fraction of people
are *look-alikes*: their centroid is mixed with another person's so the two have cosine in
``lookalike_cos`` (siblings, twins). Each face is

    face = a * c + sqrt(1 - a**2) * n,     n a unit "variation" vector orthogonal to c,

where ``n`` is Gaussian with its own spectrum (``noise_decay``), partly in the identity basis
(``noise_alignment``, the rest in an independent basis), and ``a = sigmoid(m + delta_person + e_face)`` is
drawn per face around a per-person offset (some people are photographed worse than others).
``m`` and the spreads are solved from ``intra_mean``, ``intra_std`` and ``person_spread`` so
that same-person cosines have those statistics.

The harder set (:data:`HARD_PARAMS`) adds what makes real strangers look alike besides their
identities: conditions shared across people (B/W photos, small compressed faces, turned heads),
each a shift along one direction common to everyone plus a private part, with strengths measured
on real photos by ``benchmarks/synthetic_nuisance.py``, and a tail of near-duplicate photos
(:class:`NuisanceParams`). Its identity law is refitted with the conditions on, so that its
same- and different-person cosines still match the real ones. The conditions come from random
streams of their own: the default set is the same draws as before they existed.

Generation is seeded and deterministic, and memory-efficient: faces are written block by block
into one preallocated float32 array (2,000,000 x 512 is 4.1 GB; no float64 copy of the whole set
is ever made). Identity vectors are never stored for all people (at 2M faces that would be ~1.6 GB
more); they are regenerated per block on demand, which is what lets
:meth:`SyntheticFaces.sample_faces` draw fresh held-out faces of known identities.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

try:  # LAPACK on 512x512 matrices is ~200x slower with OpenBLAS threads on a few busy cores
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - optional
    threadpool_limits = None


def _one_blas_thread():
    return threadpool_limits(1, user_api="blas") if threadpool_limits else nullcontext()

__all__ = [
    "NuisanceParams",
    "SyntheticParams",
    "HARD_PARAMS",
    "SyntheticFaces",
    "make_identities",
    "similarity_stats",
    "matched_stats",
    "calibration_report",
    "fit_params",
]

# Identities are generated in fixed blocks of this many; each block has its own random stream so
# any block (its centroids in particular) can be regenerated without replaying the others.
# Changing this constant changes every generated set, so it is part of the determinism contract.
IDS_PER_BLOCK = 1024
# Faces are written this many rows at a time inside a block, bounding temporary memory.
_FACE_CHUNK = 8192
# Identity sizes are drawn this many at a time until they cover the requested number of faces.
_SIZE_BATCH = 65536

# Independent random streams, keyed under the user seed (numpy SeedSequence spawn keys).
_STREAM_SIZES = 0
_STREAM_BLOCK = 1
_STREAM_SAMPLE = 2
_STREAM_GLOBAL = 3
# The harder set's conditions (per block / per sampled batch) and their private vectors: streams of
# their own, so that the plain faces underneath are the same draws with or without them.
_STREAM_CONDITIONS = 4
_STREAM_CONDITION_NOISE = 5
_STREAM_SAMPLE_CONDITIONS = 6
_STREAM_PAIRS = 7  # nuisance_pairs' private vectors


@dataclass(frozen=True)
class NuisanceParams:
    """Conditions shared across people, and near-duplicate photos: what makes the harder set harder.

    A condition moves a face by a *shared* shift (the same unit direction for every person, of norm
    ``*_shift`` at full strength) plus a private one (a fresh variation-like direction, norm
    ``*_private``), then the face is normalised again. The shifts, the private parts and the
    directions' cosines with the library's mean direction are measured with the project's
    recognizer on the shared real labelled faces (``benchmarks/synthetic_nuisance.py``: each photo
    turned grey, degraded to a 40 px JPEG face, and the within-person regression on a landmark yaw
    proxy); the rates are a personal library's, chosen, not measured.

    Attributes:
        bw_shift, bw_private: a black-and-white photo against the same photo in colour.
        bw_person, low_person: share of the private part that is the person's own (the same for
            all their photos: turning two photos of one person grey moves them alike), fitted to
            the real change of same-person cosines when both photos are altered.
        bw_old_people: share of people photographed in an older era (scanned prints).
        bw_rate_old, bw_rate: share of B/W photos of those people, and of everyone else.
        low_shift, low_private: a small compressed face (quality level 1) against the sharp one.
        low_power: a face's quality level is ``u ** low_power`` (u uniform): most faces near 0, a
            tail of poor ones (mean ``1 / (1 + low_power)``).
        pose_shift: the shared shift per unit of the yaw proxy (0 frontal, ~0.6 for the most
            turned 1 % of the real faces).
        yaw_median, yaw_log_sd: the yaw proxy of a face is log-normal (fitted on the real faces'
            median and 90th percentile; their quartiles and 99th percentile are then within
            0.03), clipped at 1.5.
        dup_fraction: share of faces that are near-duplicates of the person's previous photo
            (bursts, edits, re-uploads), with cosine uniform in ``dup_cos``.
        mean_alignment: cosine of each shared direction with the library's mean direction.
    """

    bw_shift: float = 0.105
    bw_private: float = 0.336
    bw_person: float = 0.25
    bw_old_people: float = 0.1
    bw_rate_old: float = 0.7
    bw_rate: float = 0.03
    low_shift: float = 0.495
    low_private: float = 1.717
    low_person: float = 0.15
    low_power: float = 3.0
    pose_shift: float = 0.213
    yaw_median: float = 0.074
    yaw_log_sd: float = 0.871
    dup_fraction: float = 0.05
    dup_cos: tuple[float, float] = (0.85, 0.97)
    mean_alignment: tuple[float, float, float] = (-0.077, 0.124, -0.304)

    def __post_init__(self) -> None:
        for name in ("bw_person", "bw_old_people", "bw_rate_old", "bw_rate", "low_person", "dup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("bw_shift", "bw_private", "low_shift", "low_private", "low_power", "pose_shift", "yaw_median",
                     "yaw_log_sd"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        lo, hi = self.dup_cos
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"dup_cos must be (low, high) within (0, 1), got {self.dup_cos}")
        if any(abs(c) >= 1.0 for c in self.mean_alignment):
            raise ValueError(f"mean_alignment must be within (-1, 1), got {self.mean_alignment}")


@dataclass(frozen=True)
class SyntheticParams:
    """The distribution of the synthetic library; every field is a calibration knob.

    Defaults are fitted on 630 real faces of 42 people embedded by buffalo_s (w600k_mbf); see
    :func:`fit_params` and ``docs/index.md``.

    Attributes:
        intra_mean: mean cosine of two faces of the same person (pairs pooled over people).
        intra_std: standard deviation of that cosine (pooled over people).
        person_spread: standard deviation across people of their mean same-person cosine.
        mean_share: share of a centroid along the common mean direction; different people then
            have mean cosine ~ ``mean_share * intra_mean``.
        identity_decay: exponent of the power-law spectrum of identity vectors (0 = isotropic,
            effective dimension = dim; 0.6 gives ~200 at 512-d).
        noise_decay: the same for the per-face variation.
        noise_alignment: fraction of the per-face variation that lies in the identity basis (with
            the same ordering of variances); the rest lies in an independent random basis.
        n_clusters: number of demographic super-clusters.
        cluster_share: share of an identity vector's variance that is its cluster's centre.
        size_exponent: identity sizes follow a truncated discrete power law,
            ``P(size = k) ~ k ** -size_exponent`` for ``1 <= k <= max_faces_per_identity``. With 2.0
            about 61 % of people have one face, 83 % at most three, and ~0.6 % have 100 or more.
        max_faces_per_identity: the largest identity size.
        lookalike_fraction: fraction of identities whose centroid is mixed from another identity's.
        lookalike_cos: (low, high) range of the cosine between a look-alike's centroid and its
            partner's centroid, drawn uniformly.
        nuisance: shared conditions and near-duplicates (:class:`NuisanceParams`); None (the
            default set) has none, and its faces are the harder set's faces before them.
    """

    intra_mean: float = 0.463
    intra_std: float = 0.166
    person_spread: float = 0.11
    mean_share: float = 0.029
    identity_decay: float = 0.49
    noise_decay: float = 0.66
    noise_alignment: float = 1.0
    n_clusters: int = 32
    cluster_share: float = 0.23
    size_exponent: float = 2.0
    max_faces_per_identity: int = 1000
    lookalike_fraction: float = 0.05
    lookalike_cos: tuple[float, float] = (0.35, 0.5)
    nuisance: NuisanceParams | None = None

    def __post_init__(self) -> None:
        for name in ("intra_mean", "mean_share", "noise_alignment", "cluster_share", "lookalike_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0 or (name == "intra_mean" and v in (0.0, 1.0)):
                raise ValueError(f"{name} must be in [0, 1] (intra_mean in (0, 1)), got {v}")
        for name in ("intra_std", "person_spread", "identity_decay", "noise_decay"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.size_exponent <= 0.0:
            raise ValueError(f"size_exponent must be > 0, got {self.size_exponent}")
        if self.max_faces_per_identity < 1 or self.n_clusters < 1:
            raise ValueError("max_faces_per_identity and n_clusters must be >= 1")
        lo, hi = self.lookalike_cos
        if not -1.0 <= lo <= hi <= 1.0:
            raise ValueError(f"lookalike_cos must be (low, high) within [-1, 1], got {self.lookalike_cos}")

    def face_weight_law(self, noise_dim: float) -> tuple[float, float, float]:
        """``(m, person_sd, face_sd)`` of the centroid weight ``a = sigmoid(m + delta_person + e_face)``.

        Two faces of one person have cosine ``a1 * a2 + b1 * b2 * (n1 . n2)`` (``b = sqrt(1 - a**2)``,
        the last term of variance ``E[b1**2 b2**2] / noise_dim``). A logistic-normal ``a`` stays in
        (0, 1) and is skewed like real face quality (a long tail of poor faces, none identical to
        the centroid). The three values are solved numerically (Gauss-Hermite quadrature over
        person and face) so that pair cosines pooled over people have mean ``intra_mean`` and std
        ``intra_std``, and people's mean cosines have std ``person_spread``.
        """
        x, w = np.polynomial.hermite_e.hermegauss(24)
        w = w / w.sum()

        def moments(m: float, p: float, s: float) -> tuple[float, float, float]:
            a = 1.0 / (1.0 + np.exp(-(m + p * x[:, None] + s * x[None, :])))  # [person node, face node]
            a1, a2 = a @ w, (a * a) @ w  # per person E[a], E[a^2]
            mean = float(w @ a1**2)
            spread = float(np.sqrt(w @ (a1**2 - mean) ** 2))
            var = spread**2 + float(w @ (a2**2 - a1**4)) + float(w @ (1.0 - a2) ** 2) / noise_dim
            return mean, spread, math.sqrt(var)

        def solve(f, target: float, lo: float, hi: float) -> float:  # f increasing on [lo, hi]
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
            return 0.5 * (lo + hi)

        m, p, s = 0.0, 0.0, 0.5
        for _ in range(12):  # coordinate-wise: each moment mostly follows one variable
            m = solve(lambda v: moments(v, p, s)[0], self.intra_mean, -8.0, 8.0)
            p = solve(lambda v: moments(m, v, s)[1], self.person_spread, 0.0, 4.0)
            s = solve(lambda v: moments(m, p, v)[2], self.intra_std, 0.0, 4.0)
        return m, p, s


#: The harder set: shared conditions and near-duplicates, and the identity law refitted with them on
#: (``fit_params(..., start=SyntheticParams(nuisance=NuisanceParams()))`` on the real faces of
#: ``benchmarks/synthetic_nuisance.py``; 2 rounds): photos of one person must be closer before the
#: conditions for their cosines to match the real ones after.
HARD_PARAMS = SyntheticParams(
    intra_mean=0.565, intra_std=0.1789, person_spread=0.1342, mean_share=0.01, identity_decay=0.5127,
    noise_decay=0.6064, noise_alignment=0.998, cluster_share=0.2262, nuisance=NuisanceParams(),
)


def _spectrum(dim: int, decay: float) -> np.ndarray:
    lam = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    return lam / lam.sum()


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))  # Haar-distributed orthogonal matrix


class _Model:
    """The global (per seed) part of the law: bases, covariance roots, mean, cluster centres."""

    def __init__(self, dim: int, params: SyntheticParams, rng: np.random.Generator):
        p = params
        q_id, q_ind = _rotation(rng, dim), _rotation(rng, dim)
        lam_id, lam_n = _spectrum(dim, p.identity_decay), _spectrum(dim, p.noise_decay)
        # Row-vector sampling: g @ root has covariance root.T @ root.
        self.identity_root = (np.sqrt(lam_id)[:, None] * q_id.T).astype(np.float32)
        cov_n = p.noise_alignment * (q_id * lam_n) @ q_id.T + (1.0 - p.noise_alignment) * (q_ind * lam_n) @ q_ind.T
        w, v = np.linalg.eigh(cov_n)
        w = np.maximum(w, 0.0)
        self.noise_root = (np.sqrt(w)[:, None] * v.T).astype(np.float32)
        #: Effective dimension of the face variation: 1 / Var(n1 . n2) for two independent ones.
        self.noise_dim = float(w.sum() ** 2 / (w**2).sum())
        u = rng.standard_normal(dim)
        self.mean_dir = (u / np.linalg.norm(u)).astype(np.float32)
        self.clusters = rng.standard_normal((p.n_clusters, dim), dtype=np.float32) @ self.identity_root
        self.weight_law = p.face_weight_law(self.noise_dim)
        #: Unit shared directions of the conditions (B/W, low quality, pose), or None. Drawn after
        #: everything else from this stream, so the plain set's draws are the same with or without.
        self.nuisance_dirs = None
        if p.nuisance is not None:
            # Like identity directions (drawn from their spectrum), made orthogonal to the mean
            # direction, then given their measured cosine with it.
            g = rng.standard_normal((3, dim)) @ self.identity_root.astype(np.float64)
            g -= (g @ self.mean_dir)[:, None] * self.mean_dir
            g /= np.linalg.norm(g, axis=1, keepdims=True)
            c = np.asarray(p.nuisance.mean_alignment, dtype=np.float64)[:, None]
            self.nuisance_dirs = (c * self.mean_dir + np.sqrt(1.0 - c * c) * g).astype(np.float32)
            #: Maps from a person's centroid to the person's own part of a condition's private
            #: shift (B/W, low quality): a fixed function of the centroid, so nothing per person is stored.
            self.person_maps = [rng.standard_normal((dim, dim), dtype=np.float32) @ self.noise_root for _ in range(2)]


class SyntheticFaces:
    """A deterministic synthetic library: identity sizes, labels, and embeddings on demand.

    Args:
        n_faces: total number of faces.
        dim: embedding dimension.
        seed: the seed; the same (n_faces, dim, seed, params) always give the same faces.
        params: the distribution; defaults to :class:`SyntheticParams` () (the calibrated one).

    Attributes:
        sizes: int64 [n_identities], faces per identity (identity ``i`` is label ``i``).
        labels: int64 [n_faces], identity of each face; faces of one identity are contiguous.
    """

    def __init__(self, n_faces: int, dim: int = 512, seed: int = 0, params: SyntheticParams | None = None):
        if n_faces < 0:
            raise ValueError(f"n_faces must be >= 0, got {n_faces}")
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.n_faces = int(n_faces)
        self.dim = int(dim)
        self.seed = int(seed)
        self.params = params or SyntheticParams()
        self.sizes = self._draw_sizes()
        self.labels = np.repeat(np.arange(len(self.sizes), dtype=np.int64), self.sizes)
        # offsets[i] is the row of identity i's first face.
        self.offsets = np.zeros(len(self.sizes) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=self.offsets[1:])

    @property
    def n_identities(self) -> int:
        """Number of identities (people)."""
        return len(self.sizes)

    @cached_property
    def model(self) -> _Model:
        """Bases, covariance roots, mean direction and cluster centres of this seed."""
        with _one_blas_thread():
            return _Model(self.dim, self.params, self._rng(_STREAM_GLOBAL))

    # -- random streams --------------------------------------------------------------------------

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))

    def _draw_sizes(self) -> np.ndarray:
        p = self.params
        k = np.arange(1, p.max_faces_per_identity + 1, dtype=np.float64)
        cdf = np.cumsum(k ** -p.size_exponent)
        cdf /= cdf[-1]
        rng = self._rng(_STREAM_SIZES)
        batches, total = [], 0
        while total < self.n_faces:
            # Inverse-CDF sampling; searchsorted is exact for a discrete law.
            s = np.searchsorted(cdf, rng.random(_SIZE_BATCH), side="right").astype(np.int64) + 1
            csum = np.cumsum(s) + total
            stop = int(np.searchsorted(csum, self.n_faces, side="left"))
            if stop < len(s):
                s = s[: stop + 1].copy()
                s[-1] -= int(csum[stop]) - self.n_faces  # trim the last identity to hit n_faces
                batches.append(s)
                total = self.n_faces
            else:
                batches.append(s)
                total = int(csum[-1])
        return np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)

    # -- identities ------------------------------------------------------------------------------

    def _block_identities(
        self, block: int, rng: np.random.Generator, want: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(centroids, weight offsets)`` of a block's identities (``want``: local rows, or all).

        Always the first draws of the block's stream, all of them drawn whatever ``want`` is; only
        the requested centroids (and their look-alike partners) are computed.
        """
        p, m = self.params, self.model
        n = min(IDS_PER_BLOCK, self.n_identities - block * IDS_PER_BLOCK)
        g = rng.standard_normal((n, self.dim), dtype=np.float32)
        cluster = rng.integers(0, p.n_clusters, n)
        is_alike = rng.random(n) < p.lookalike_fraction
        alike, bases = np.flatnonzero(is_alike), np.flatnonzero(~is_alike)
        # Partners are plain identities of the same block, so a block never depends on another.
        partner = bases[rng.integers(0, len(bases), len(alike))] if len(bases) else alike[:0]
        rho = rng.uniform(p.lookalike_cos[0], p.lookalike_cos[1], len(alike)).astype(np.float32)
        offset = rng.normal(0.0, m.weight_law[1], n).astype(np.float32)

        want = np.arange(n) if want is None else np.asarray(want, dtype=np.int64)
        partner_of = np.full(n, -1, dtype=np.int64)
        if len(partner):
            partner_of[alike] = partner
        need = np.union1d(want, partner_of[want][partner_of[want] >= 0])
        r = g[need] @ m.identity_root
        r *= math.sqrt(1.0 - p.cluster_share)
        r += math.sqrt(p.cluster_share) * m.clusters[cluster[need]]
        c = np.empty((n, self.dim), dtype=np.float32)
        c[need] = math.sqrt(p.mean_share) * m.mean_dir + math.sqrt(1.0 - p.mean_share) * r
        c[need] /= np.linalg.norm(c[need], axis=1, keepdims=True)
        mix = want[partner_of[want] >= 0]
        if len(mix):
            pc = c[partner_of[mix]]
            rr = rho[np.searchsorted(alike, mix)]
            own = c[mix]  # the look-alike's own direction, made orthogonal to the partner
            own -= np.einsum("ij,ij->i", own, pc)[:, None] * pc
            own /= np.linalg.norm(own, axis=1, keepdims=True)
            c[mix] = rr[:, None] * pc + np.sqrt(1.0 - rr * rr)[:, None] * own
        return c[want], offset[want]

    def centroids(self, identities: np.ndarray | list[int]) -> np.ndarray:
        """Unit centroids (float32 [len(identities), dim]) of the given identities, regenerated."""
        return self._identities(identities)[0]

    def _identities(self, identities: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(identities, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_identities):
            raise ValueError("identity out of range")
        c = np.empty((len(ids), self.dim), dtype=np.float32)
        off = np.empty(len(ids), dtype=np.float32)
        blocks = ids // IDS_PER_BLOCK
        for b in np.unique(blocks):
            rows = np.flatnonzero(blocks == b)
            local = ids[rows] - int(b) * IDS_PER_BLOCK
            uniq, inv = np.unique(local, return_inverse=True)
            bc, bo = self._block_identities(int(b), self._rng(_STREAM_BLOCK, int(b)), uniq)
            c[rows], off[rows] = bc[inv], bo[inv]
        return c, off

    # -- faces -----------------------------------------------------------------------------------

    def _faces(self, centroids: np.ndarray, a: np.ndarray, g: np.ndarray) -> np.ndarray:
        """``a * c + sqrt(1 - a^2) * n``, n = the variation of Gaussian ``g`` made unit and orthogonal to c."""
        n = g @ self.model.noise_root
        n -= np.einsum("ij,ij->i", n, centroids)[:, None] * centroids
        n /= np.linalg.norm(n, axis=1, keepdims=True)
        n *= np.sqrt(1.0 - a * a)[:, None]
        n += a[:, None] * centroids
        n /= np.linalg.norm(n, axis=1, keepdims=True)  # unit within float32 rounding
        return n

    def _draw_weights(self, rng: np.random.Generator, offsets: np.ndarray) -> np.ndarray:
        m, _, s = self.model.weight_law
        return (1.0 / (1.0 + np.exp(-(m + offsets + rng.normal(0.0, s, len(offsets)))))).astype(np.float32)

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, faces)`` chunks in row order, float32, unit-norm (<= 8192 rows each)."""
        n_blocks = -(-self.n_identities // IDS_PER_BLOCK)
        for b in range(n_blocks):
            rng = self._rng(_STREAM_BLOCK, b)
            c, off = self._block_identities(b, rng)
            first_id = b * IDS_PER_BLOCK
            row0 = int(self.offsets[first_id])
            row1 = int(self.offsets[first_id + len(c)])
            local = self.labels[row0:row1] - first_id
            a = self._draw_weights(rng, off[local])
            if self.params.nuisance is not None:
                cond = self._block_conditions(b, len(c), local)
                noise = self._rng(_STREAM_CONDITION_NOISE, b)
                previous = None  # the last face of the previous chunk (a near-duplicate's original)
            for s in range(0, row1 - row0, _FACE_CHUNK):
                e = min(s + _FACE_CHUNK, row1 - row0)
                g = rng.standard_normal((e - s, self.dim), dtype=np.float32)
                faces = self._faces(c[local[s:e]], a[s:e], g)
                if self.params.nuisance is not None:
                    part = {k: v[s:e] for k, v in cond.items()}
                    faces = self._with_conditions(faces, c[local[s:e]], part, noise, previous)
                    previous = faces[-1].copy()
                yield row0 + s, faces

    def embeddings(self, out: np.ndarray | None = None) -> np.ndarray:
        """All faces, float32 [n_faces, dim], unit-norm, rows in label order.

        Args:
            out: optional preallocated C-contiguous float32 [n_faces, dim] array to fill (e.g. a
                view of an index's storage, so the data exists only once in memory).
        """
        if out is None:
            out = np.empty((self.n_faces, self.dim), dtype=np.float32)
        elif out.shape != (self.n_faces, self.dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {(self.n_faces, self.dim)}")
        for row, faces in self.iter_blocks():
            out[row : row + len(faces)] = faces
        return out

    def sample_faces(self, identities: np.ndarray | list[int], seed: int = 0) -> np.ndarray:
        """Fresh faces (not among :meth:`embeddings`) of the given identities, one per entry.

        Held-out query faces of known people: same centroids and same law, independent noise.

        Args:
            identities: identity labels; repeat a label to get several faces of that person.
            seed: seed of the fresh noise (independent of the library's own faces).
        """
        ids = np.asarray(identities, dtype=np.int64).reshape(-1)
        c, off = self._identities(ids)
        rng = self._rng(_STREAM_SAMPLE, int(seed))
        a = self._draw_weights(rng, off)
        g = rng.standard_normal((len(c), self.dim), dtype=np.float32)
        faces = self._faces(c, a, g)
        if self.params.nuisance is None:
            return faces
        crng = self._rng(_STREAM_SAMPLE_CONDITIONS, int(seed))
        cond = self._draw_conditions(crng, self._old_era(ids)) | {"duplicate": np.zeros(len(ids), bool)}
        return self._with_conditions(faces, c, cond, crng, None)

    # -- the harder set's conditions ---------------------------------------------------------------

    def _old_era(self, identities: np.ndarray) -> np.ndarray:
        """Whether each identity is photographed in an older era (mostly B/W), regenerated."""
        out = np.zeros(len(identities), bool)
        blocks = identities // IDS_PER_BLOCK
        for b in np.unique(blocks):
            rows = np.flatnonzero(blocks == b)
            n = min(IDS_PER_BLOCK, self.n_identities - int(b) * IDS_PER_BLOCK)
            old = self._rng(_STREAM_CONDITIONS, int(b)).random(n) < self.params.nuisance.bw_old_people
            out[rows] = old[identities[rows] - int(b) * IDS_PER_BLOCK]
        return out

    def _draw_conditions(self, rng: np.random.Generator, old: np.ndarray) -> dict[str, np.ndarray]:
        """Per face: ``bw`` (bool), ``quality`` (0 sharp .. 1 the smallest kept face), ``yaw``."""
        nz, n = self.params.nuisance, len(old)
        bw = rng.random(n) < np.where(old, nz.bw_rate_old, nz.bw_rate)
        quality = (rng.random(n) ** nz.low_power).astype(np.float32)
        yaw = np.minimum(nz.yaw_median * np.exp(nz.yaw_log_sd * rng.standard_normal(n)), 1.5).astype(np.float32)
        return {"bw": bw, "quality": quality, "yaw": yaw}

    def _block_conditions(self, block: int, n_ids: int, local: np.ndarray) -> dict[str, np.ndarray]:
        """Conditions of a block's faces (``local``: each face's identity within the block), and
        ``duplicate``: the face is a near-duplicate of the row before it, a photo of the same person
        (never of another near-duplicate), whose conditions it shares."""
        rng = self._rng(_STREAM_CONDITIONS, block)
        old = rng.random(n_ids) < self.params.nuisance.bw_old_people  # first draws: see _old_era
        cond = self._draw_conditions(rng, old[local])
        raw = rng.random(len(local)) < self.params.nuisance.dup_fraction
        dup = np.zeros(len(local), bool)
        dup[1:] = raw[1:] & (local[1:] == local[:-1]) & ~raw[:-1]
        for v in cond.values():
            v[1:][dup[1:]] = v[:-1][dup[1:]]
        return cond | {"duplicate": dup}

    def _private(self, rng: np.random.Generator, n: int) -> np.ndarray:
        v = rng.standard_normal((n, self.dim), dtype=np.float32) @ self.model.noise_root
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v

    def _private_shift(self, rng: np.random.Generator, centroids: np.ndarray, which: int, share: float) -> np.ndarray:
        """Unit private directions of a condition: the person's own (from the centroid) and the photo's."""
        u = self.model.mean_dir  # without it every person's own part would share a component
        own = (centroids - np.outer(centroids @ u, u)) @ self.model.person_maps[which]
        own *= math.sqrt(share) / np.linalg.norm(own, axis=1, keepdims=True)
        own += math.sqrt(1.0 - share) * self._private(rng, len(centroids))
        own /= np.linalg.norm(own, axis=1, keepdims=True)
        return own

    def _with_conditions(self, faces: np.ndarray, centroids: np.ndarray, cond: dict[str, np.ndarray],
                         rng: np.random.Generator, previous: np.ndarray | None) -> np.ndarray:
        """Faces moved by their conditions (shared shift + private part, renormalised), then the
        near-duplicates replaced by their original turned by the drawn cosine. ``centroids``: each
        face's person; ``previous``: the row before the first (the last of the previous chunk), None
        when there is none."""
        nz, dirs = self.params.nuisance, self.model.nuisance_dirs
        bw, q, yaw = cond["bw"].astype(np.float32), cond["quality"], cond["yaw"]
        p_bw = self._private_shift(rng, centroids, 0, nz.bw_person)
        p_low = self._private_shift(rng, centroids, 1, nz.low_person)
        turn = self._private(rng, len(faces))
        cos = rng.uniform(nz.dup_cos[0], nz.dup_cos[1], len(faces)).astype(np.float32)
        faces = faces + np.outer(bw * nz.bw_shift, dirs[0]) + (bw * nz.bw_private)[:, None] * p_bw
        faces += np.outer(q * nz.low_shift, dirs[1]) + (q * nz.low_private)[:, None] * p_low
        faces += np.outer(yaw * nz.pose_shift, dirs[2])
        faces /= np.linalg.norm(faces, axis=1, keepdims=True)
        rows = np.flatnonzero(cond["duplicate"])
        if len(rows):
            before = np.concatenate([previous[None] if previous is not None else faces[:1], faces])[rows]
            t = turn[rows] - np.einsum("ij,ij->i", turn[rows], before)[:, None] * before
            t /= np.linalg.norm(t, axis=1, keepdims=True)
            faces[rows] = cos[rows, None] * before + np.sqrt(1.0 - cos[rows] ** 2)[:, None] * t
        return faces

    def nuisance_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(plain, bw, low, yaw)`` of the harder set's faces before any condition: the faces
        themselves, the same faces all turned B/W, all at quality 1, and each face's yaw proxy.
        What ``benchmarks/synthetic_nuisance.py`` compares with real photos and their altered copies."""
        cond = self.conditions()
        plain = SyntheticFaces(self.n_faces, self.dim, self.seed, replace(self.params, nuisance=None)).embeddings()
        n, zero = self.n_faces, np.zeros(self.n_faces, np.float32)
        none = {"bw": np.zeros(n, bool), "quality": zero, "yaw": zero, "duplicate": np.zeros(n, bool)}
        rng, c = self._rng(_STREAM_PAIRS), self.centroids(self.labels)
        bw = self._with_conditions(plain, c, none | {"bw": np.ones(n, bool)}, rng, None)
        low = self._with_conditions(plain, c, none | {"quality": np.ones(n, np.float32)}, rng, None)
        return plain, bw, low, cond["yaw"]

    def conditions(self) -> dict[str, np.ndarray]:
        """Every face's conditions in the harder set (``bw``, ``quality``, ``yaw``, ``duplicate``), in
        row order, without generating the faces."""
        if self.params.nuisance is None:
            raise ValueError("this set has no conditions (params.nuisance is None)")
        parts = []
        for b in range(-(-self.n_identities // IDS_PER_BLOCK)):
            first = b * IDS_PER_BLOCK
            n_ids = min(IDS_PER_BLOCK, self.n_identities - first)
            local = self.labels[self.offsets[first] : self.offsets[first + n_ids]] - first
            parts.append(self._block_conditions(b, n_ids, local))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def make_identities(
    n_faces: int,
    dim: int = 512,
    seed: int = 0,
    *,
    params: SyntheticParams | None = None,
    out: np.ndarray | None = None,
    **overrides: object,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic unit-norm face embeddings with known, long-tailed identities.

    ``params`` (default: the calibrated :class:`SyntheticParams`) with any of its fields replaced
    by keyword ``overrides``. See :class:`SyntheticFaces` to also get centroids or held-out faces.

    Returns:
        ``(embeddings, labels)``: float32 [n_faces, dim] unit rows, and int64 [n_faces] identity
        labels ``0 .. n_identities-1`` (faces of one identity are contiguous rows).
    """
    params = replace(params or SyntheticParams(), **overrides)
    gen = SyntheticFaces(n_faces, dim=dim, seed=seed, params=params)
    return gen.embeddings(out=out), gen.labels


# -- calibration against real embeddings -----------------------------------------------------------

#: Statistics compared by :func:`calibration_report`, in print order.
STAT_NAMES = (
    "same_mean", "same_std", "same_p1", "same_p5", "same_p50", "same_p95", "same_p99",
    "diff_mean", "diff_std", "diff_p1", "diff_p50", "diff_p99", "diff_p99.9",
    "person_spread", "mean_norm", "pca_top1", "pca_top10", "within_dim", "within_in_between",
)  # fmt: skip


def _pair_sims(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """All pairwise cosines split into same / different person, and each person's mean."""
    s = emb @ emb.T
    iu = np.triu_indices(len(emb), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    sims = s[iu]
    per_person = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        if len(rows) >= 2:
            per_person.append(float(s[np.ix_(rows, rows)][np.triu_indices(len(rows), 1)].mean()))
    return sims[same], sims[~same], per_person


def similarity_stats(emb: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Summary statistics of a labelled set of unit embeddings (all pairs; keep it to a few thousand).

    Pairs count equally (as in a library: people with more photos weigh more). Beyond the
    same-person (``same_*``) and different-person (``diff_*``) cosine moments and percentiles:
    ``person_spread`` (std across people of their mean same-person cosine), ``mean_norm`` (norm of
    the mean embedding), ``pca_top1`` / ``pca_top10`` (share of the variance in the top 1 / 10
    principal components), ``within_dim`` (effective dimension ``tr(C)**2 / tr(C**2)`` of the
    within-person covariance ``C``) and ``within_in_between`` (share of the within-person variance
    lying in the span of the person means). Several depend on the number of people and faces:
    compare with :func:`matched_stats`, which reproduces the design.
    """
    with _one_blas_thread():
        return _similarity_stats(np.asarray(emb, dtype=np.float64), np.asarray(labels))


def _similarity_stats(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    same, diff, per_person = _pair_sims(x, labels)
    out = {"same_mean": same.mean(), "same_std": same.std(), "diff_mean": diff.mean(), "diff_std": diff.std()}
    for q in (1, 5, 50, 95, 99):
        out[f"same_p{q}"] = np.percentile(same, q)
    for q in (1, 50, 99, 99.9):
        out[f"diff_p{q}"] = np.percentile(diff, q)
    out["person_spread"] = float(np.std(per_person))
    mean = x.mean(axis=0)
    out["mean_norm"] = np.linalg.norm(mean)
    ev = np.linalg.eigvalsh(np.cov(x.T))[::-1]
    out["pca_top1"], out["pca_top10"] = ev[0] / ev.sum(), ev[:10].sum() / ev.sum()
    uniq, inv = np.unique(labels, return_inverse=True)
    means = np.zeros((len(uniq), x.shape[1]))
    np.add.at(means, inv, x)
    means /= np.bincount(inv)[:, None]
    resid = x - means[inv]
    ew = np.linalg.eigvalsh(resid.T @ resid)
    out["within_dim"] = ew.sum() ** 2 / (ew**2).sum()
    u, sv, _ = np.linalg.svd((means - mean).T, full_matrices=False)
    span = u[:, sv > 1e-9 * sv.max()]
    out["within_in_between"] = ((resid @ span) ** 2).sum() / (resid**2).sum()
    return {k: float(out[k]) for k in STAT_NAMES}


def matched_stats(
    params: SyntheticParams, sizes: np.ndarray, dim: int = 512, replicates: int = 8, seed: int = 0
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """:func:`similarity_stats` of synthetic sets of the same design as a real one.

    Each replicate draws ``len(sizes)`` fresh people with ``sizes`` faces each; statistics are
    averaged over replicates. Also returns all same- and different-person cosines (for histograms).
    """
    n_people = len(sizes) * replicates
    gen = SyntheticFaces(n_people * 10, dim=dim, seed=seed, params=params)  # ~2x the people needed
    # Every identity of a library this size has >= 1 face; draw people spread over the blocks.
    people = np.random.default_rng(seed).choice(gen.n_identities, n_people, replace=False)
    acc: dict[str, list[float]] = {k: [] for k in STAT_NAMES}
    same_all, diff_all = [], []
    labels = np.repeat(np.arange(len(sizes)), sizes)
    for r in range(replicates):
        ids = people[r * len(sizes) : (r + 1) * len(sizes)]
        emb = gen.sample_faces(ids[labels], seed=r)
        for k, v in similarity_stats(emb, labels).items():
            acc[k].append(v)
        same, diff, _ = _pair_sims(emb.astype(np.float64), labels)
        same_all.append(same)
        diff_all.append(diff)
    return {k: float(np.mean(v)) for k, v in acc.items()}, np.concatenate(same_all), np.concatenate(diff_all)


def calibration_report(real: dict[str, float], synthetic: dict[str, float]) -> str:
    """A text table of real vs synthetic statistics, with the difference."""
    lines = [f"{'statistic':<18} {'real':>8} {'synthetic':>10} {'diff':>8}"]
    for k in STAT_NAMES:
        lines.append(f"{k:<18} {real[k]:8.3f} {synthetic[k]:10.3f} {synthetic[k] - real[k]:+8.3f}")
    return "\n".join(lines)


# (parameter, the statistic it is fitted to, search bracket), in fitting order.
_FIT_PLAN = (
    ("intra_mean", "same_mean", (0.05, 0.95)),
    ("intra_std", "same_std", (0.0, 0.4)),
    ("person_spread", "person_spread", (0.0, 0.3)),
    ("mean_share", "diff_mean", (0.0, 0.3)),
    ("identity_decay", "diff_std", (0.0, 1.5)),
    ("noise_decay", "within_dim", (0.0, 1.5)),
    ("noise_alignment", "within_in_between", (0.0, 1.0)),
    ("cluster_share", "diff_p99.9", (0.0, 0.6)),
)


def fit_params(
    emb: np.ndarray,
    labels: np.ndarray,
    start: SyntheticParams | None = None,
    rounds: int = 2,
    steps: int = 8,
    replicates: int = 6,
    seeds: tuple[int, ...] = (0, 1, 2),
    log: Callable[[str], None] | None = None,
) -> SyntheticParams:
    """Fit the distribution parameters to real embeddings by simulation.

    Coordinate-wise bisection: each parameter of the plan in turn is moved until the matching
    statistic of :func:`matched_stats` (same design as the real set, fixed seed: common random
    numbers keep each response monotone) equals the real one; ``rounds`` passes over the plan.
    Statistics are averaged over ``seeds`` (each seed has its own bases, mean and clusters).
    Size-law and look-alike fields are kept from ``start`` (the real set says nothing about them).
    """
    labels = np.asarray(labels)
    target = similarity_stats(emb, labels)
    sizes = np.unique(labels, return_counts=True)[1]
    params = start or SyntheticParams()
    dim = emb.shape[1]
    for rnd in range(rounds):
        for name, stat, (lo, hi) in _FIT_PLAN:
            a, b = lo, hi
            # Every statistic grows with its parameter except within_dim (falls with the decay).
            sign = -1.0 if stat == "within_dim" else 1.0
            for _ in range(steps):
                mid = 0.5 * (a + b)
                trial = replace(params, **{name: mid})
                got = np.mean([matched_stats(trial, sizes, dim, replicates, sd)[0][stat] for sd in seeds])
                if sign * (got - target[stat]) < 0:
                    a = mid
                else:
                    b = mid
            params = replace(params, **{name: round(0.5 * (a + b), 4)})
            if log:
                log(f"round {rnd + 1}: {name} = {getattr(params, name)} (fitting {stat} = {target[stat]:.4f})")
    return params
