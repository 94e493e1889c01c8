"""Synthetic face embeddings with known identities, for index tests and scale benchmarks.

Real libraries of faces are long-tailed: most people appear on one to three photos, a few on
hundreds. Every identity here gets a random unit *centroid*; each of its faces is

    face = a * centroid + sqrt(1 - a**2) * u,      u a random unit vector orthogonal to centroid,

with ``a`` drawn per face. Two faces of one person then have cosine ``a1 * a2 + e`` where ``e``
comes from the two noise directions (std ~ ``(1 - E[a**2]) / sqrt(dim)``); the mean and spread of
``a`` are solved from ``intra_mean`` / ``intra_std`` so that the intra-person cosine is about
``N(intra_mean, intra_std)``. Faces of different people are random directions: in 512-d their
cosine is about ``N(0, 1/sqrt(512)) = N(0, 0.044)``. A fraction of identities are *look-alikes*:
their centroid is mixed from another identity's centroid so the two centroids have cosine in
``lookalike_cos``, the hard negatives a face library really has (siblings, twins, similar faces).

All knobs are the explicit fields of :class:`SyntheticParams`, meant to be calibrated later on real
ArcFace embeddings. Generation is seeded and deterministic, and memory-efficient: faces are written
block by block into one preallocated float32 array (2,000,000 x 512 is 4.1 GB; no float64 copy of
the whole set is ever made). Centroids are never stored for all identities either (at 2M faces that
would be ~1 GB more); they are regenerated per block on demand, which is what lets
:meth:`SyntheticFaces.sample_faces` draw fresh held-out faces of known identities.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["SyntheticParams", "SyntheticFaces", "make_identities"]

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


@dataclass(frozen=True)
class SyntheticParams:
    """The distribution of the synthetic library; every field is a calibration knob.

    Attributes:
        intra_mean: mean cosine similarity of two faces of the same person (ArcFace-like: ~0.55).
        intra_std: standard deviation of that similarity. It cannot go below the noise floor of
            about ``(1 - intra_mean) / sqrt(dim)`` (0.02 at 512-d); smaller values are clamped.
        size_exponent: identity sizes follow a truncated discrete power law,
            ``P(size = k) ~ k ** -size_exponent`` for ``1 <= k <= max_faces_per_identity``. With 2.0
            about 61 % of people have one face, 83 % at most three, and ~0.6 % have 100 or more.
        max_faces_per_identity: the largest identity size.
        lookalike_fraction: fraction of identities whose centroid is mixed from another identity's.
        lookalike_cos: (low, high) range of the cosine between a look-alike's centroid and its
            partner's centroid, drawn uniformly.
    """

    intra_mean: float = 0.55
    intra_std: float = 0.12
    size_exponent: float = 2.0
    max_faces_per_identity: int = 1000
    lookalike_fraction: float = 0.05
    lookalike_cos: tuple[float, float] = (0.35, 0.5)

    def __post_init__(self) -> None:
        if not 0.0 < self.intra_mean < 1.0:
            raise ValueError(f"intra_mean must be in (0, 1), got {self.intra_mean}")
        if self.intra_std < 0.0:
            raise ValueError(f"intra_std must be >= 0, got {self.intra_std}")
        if self.size_exponent <= 0.0:
            raise ValueError(f"size_exponent must be > 0, got {self.size_exponent}")
        if self.max_faces_per_identity < 1:
            raise ValueError(f"max_faces_per_identity must be >= 1, got {self.max_faces_per_identity}")
        if not 0.0 <= self.lookalike_fraction <= 1.0:
            raise ValueError(f"lookalike_fraction must be in [0, 1], got {self.lookalike_fraction}")
        lo, hi = self.lookalike_cos
        if not -1.0 <= lo <= hi <= 1.0:
            raise ValueError(f"lookalike_cos must be (low, high) within [-1, 1], got {self.lookalike_cos}")

    def face_weight_moments(self, dim: int) -> tuple[float, float]:
        """Mean and std of the per-face centroid weight ``a`` that give the requested similarity.

        With ``a1, a2`` independent, ``E[a1 a2] = m**2`` and ``Var(a1 a2) = 2 m**2 v + v**2`` for
        mean ``m`` and variance ``v``; the noise directions add about ``(1 - m**2 - v)**2 / dim``
        of variance, so that much less has to come from ``a``.
        """
        m2 = self.intra_mean
        noise_var = (1.0 - m2) ** 2 / dim
        target = max(self.intra_std**2 - noise_var, 0.0)
        v = -m2 + math.sqrt(m2 * m2 + target)
        return math.sqrt(m2), math.sqrt(max(v, 0.0))


class SyntheticFaces:
    """A deterministic synthetic library: identity sizes, labels, and embeddings on demand.

    Args:
        n_faces: total number of faces.
        dim: embedding dimension.
        seed: the seed; the same (n_faces, dim, seed, params) always give the same faces.
        params: the distribution; defaults to :class:`SyntheticParams` ().

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

    # -- centroids -------------------------------------------------------------------------------

    def _block_centroids(self, block: int, rng: np.random.Generator) -> np.ndarray:
        """Centroids of one block's identities; always the first draws of the block's stream."""
        first = block * IDS_PER_BLOCK
        n = min(IDS_PER_BLOCK, self.n_identities - first)
        c = rng.standard_normal((n, self.dim), dtype=np.float32)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        p = self.params
        is_alike = rng.random(n) < p.lookalike_fraction
        alike = np.flatnonzero(is_alike)
        bases = np.flatnonzero(~is_alike)
        if len(alike) and len(bases):
            # Partners are plain identities of the same block, so a block never depends on another.
            partner = bases[rng.integers(0, len(bases), len(alike))]
            rho = rng.uniform(p.lookalike_cos[0], p.lookalike_cos[1], len(alike)).astype(np.float32)
            pc = c[partner]
            r = c[alike]  # the look-alike's own random direction, made orthogonal to the partner
            r -= np.einsum("ij,ij->i", r, pc)[:, None] * pc
            r /= np.linalg.norm(r, axis=1, keepdims=True)
            c[alike] = rho[:, None] * pc + np.sqrt(1.0 - rho * rho)[:, None] * r
        return c

    def centroids(self, identities: np.ndarray | list[int]) -> np.ndarray:
        """Unit centroids (float32 [len(identities), dim]) of the given identities, regenerated."""
        ids = np.asarray(identities, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n_identities):
            raise ValueError("identity out of range")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        blocks = ids // IDS_PER_BLOCK
        for b in np.unique(blocks):
            c = self._block_centroids(int(b), self._rng(_STREAM_BLOCK, int(b)))
            rows = np.flatnonzero(blocks == b)
            out[rows] = c[ids[rows] - int(b) * IDS_PER_BLOCK]
        return out

    # -- faces -----------------------------------------------------------------------------------

    def _faces(self, centroids: np.ndarray, a: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """``a * c + sqrt(1 - a^2) * u`` with u = noise made orthogonal to c; in place on ``noise``."""
        noise -= np.einsum("ij,ij->i", noise, centroids)[:, None] * centroids
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        noise *= np.sqrt(1.0 - a * a)[:, None]
        noise += a[:, None] * centroids
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)  # unit within float32 rounding
        return noise

    def _draw_weights(self, rng: np.random.Generator, n: int) -> np.ndarray:
        m, s = self.params.face_weight_moments(self.dim)
        # Clipping keeps a a valid cosine; at the defaults it touches ~1 % of faces.
        return np.clip(rng.normal(m, s, n), 0.0, 1.0).astype(np.float32)

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, faces)`` chunks in row order, float32, unit-norm (<= 8192 rows each)."""
        n_blocks = -(-self.n_identities // IDS_PER_BLOCK)
        for b in range(n_blocks):
            rng = self._rng(_STREAM_BLOCK, b)
            c = self._block_centroids(b, rng)
            first_id = b * IDS_PER_BLOCK
            row0 = int(self.offsets[first_id])
            row1 = int(self.offsets[first_id + len(c)])
            local = self.labels[row0:row1] - first_id
            a = self._draw_weights(rng, row1 - row0)
            for s in range(0, row1 - row0, _FACE_CHUNK):
                e = min(s + _FACE_CHUNK, row1 - row0)
                noise = rng.standard_normal((e - s, self.dim), dtype=np.float32)
                yield row0 + s, self._faces(c[local[s:e]], a[s:e], noise)

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
        c = self.centroids(ids)
        rng = self._rng(_STREAM_SAMPLE, int(seed))
        a = self._draw_weights(rng, len(ids))
        noise = rng.standard_normal((len(ids), self.dim), dtype=np.float32)
        return self._faces(c, a, noise)


def make_identities(
    n_faces: int,
    dim: int = 512,
    seed: int = 0,
    *,
    intra_mean: float = 0.55,
    intra_std: float = 0.12,
    size_exponent: float = 2.0,
    max_faces_per_identity: int = 1000,
    lookalike_fraction: float = 0.05,
    lookalike_cos: tuple[float, float] = (0.35, 0.5),
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic unit-norm face embeddings with known, long-tailed identities.

    See :class:`SyntheticParams` for the meaning of the keyword arguments, and :class:`SyntheticFaces`
    to also get centroids or held-out faces of the same identities.

    Returns:
        ``(embeddings, labels)``: float32 [n_faces, dim] unit rows, and int64 [n_faces] identity
        labels ``0 .. n_identities-1`` (faces of one identity are contiguous rows).
    """
    params = SyntheticParams(
        intra_mean=intra_mean,
        intra_std=intra_std,
        size_exponent=size_exponent,
        max_faces_per_identity=max_faces_per_identity,
        lookalike_fraction=lookalike_fraction,
        lookalike_cos=tuple(lookalike_cos),
    )
    gen = SyntheticFaces(n_faces, dim=dim, seed=seed, params=params)
    return gen.embeddings(out=out), gen.labels
