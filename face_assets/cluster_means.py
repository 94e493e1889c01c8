"""The cluster means incremental assignment searches, kept on disk between runs.

At a million persons, reading every centroid from the catalog and building the inverted lists of
:class:`~face_assets.clustering.MeansIndex` cost about 20 s per call, whatever the size of the
batch. :class:`ClusterMeans` keeps them in a folder beside the catalog (memory-mapped: a search
reads the lists it probes) with the size and write time of each cluster they reflect. A call reads
those two columns of the clusters table, and patches the rows that differ since: their saved row
leaves the lists, their current mean is searched exactly beside them. The cost of a call follows
what changed since the files were written; they are rewritten (without training the lists again)
once the patch holds :data:`REWRITE_SHARE` of the rows, and rebuilt when most rows changed (a full
re-clustering, another model) or the files are missing or unreadable.

Below :data:`MIN_ROWS` clusters the means are searched exactly, built for each call (reading
them is cheap there), and nothing is kept.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clustering import MeansIndex
from .process import faiss  # loaded on first use, after the process settings (OpenMP's wait policy)

MIN_ROWS = 50_000
"""Fewer clusters than this: an exact search built for each call (as :class:`MeansIndex` does)."""

REWRITE_SHARE = 0.05
"""The files are rewritten once this share of their rows has been patched since."""

REBUILD_SHARE = 0.5
"""Above this share of changed rows, the lists are trained again from scratch."""

LAYOUT = 2
"""Version of the lists' layout in the files (2: lists of ~256 means, 16 probed); files of another
layout are rebuilt, as for another model."""

_STATE = "state.json"
_ARRAYS = ("ids", "sizes", "stamps", "means", "scale", "means_lists", "means_home", "units_lists", "units_home")

Stamps = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(cluster ids, sizes, write times in microseconds)`` of every cluster, by id."""

Fetch = Callable[[np.ndarray | None], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
"""``f(cluster ids or None for all) -> (ids, sizes, write times, means float32 [n, d])`` of those
that exist and have a mean, by id, read together."""


class _Patched:
    """A saved :class:`MeansIndex` plus an exact search over the rows that replaced saved ones."""

    def __init__(self, base: MeansIndex, extra: np.ndarray, extra_rows: np.ndarray):
        self.base, self.extra, self.extra_rows = base, extra, extra_rows

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 [q, k], rows int64 [q, k])``, best first; row -1 where none."""
        ds, di = self.base.search(queries, k)
        if len(self.extra) == 0:
            return ds, di
        es, ei = faiss.knn(np.ascontiguousarray(queries, np.float32), self.extra, min(k, len(self.extra)),
                           metric=faiss.METRIC_INNER_PRODUCT)
        ei = np.where(ei >= 0, self.extra_rows[np.maximum(ei, 0)], -1)
        ds = np.concatenate([np.where(di >= 0, ds, -np.inf), np.where(ei >= 0, es, -np.inf)], axis=1)
        di = np.concatenate([di, ei], axis=1)
        top = np.argsort(-ds, axis=1, kind="stable")[:, :k]
        ds, di = np.take_along_axis(ds, top, 1), np.take_along_axis(di, top, 1)
        di[~np.isfinite(ds)] = -1
        return ds.astype(np.float32), di.astype(np.int64)


@dataclass
class ClusterMeans:
    """The means of every cluster, searchable, and what they reflect.

    Rows are the saved rows (by cluster id) then the rows patched in since; ``ids``, ``sizes`` and
    ``stamps`` hold every row, a superseded saved row keeps its place with size 0 and is in no list.

    Attributes:
        ids / sizes / stamps: per row: cluster id, size, write time (microseconds) it reflects.
        means: :class:`MeansIndex`-like search over the unnormalised means (average cosine).
        groups: the same over the mean directions of clusters of 2+ faces (the clear-best rule).
        model_version: the embedding tag the means are in.
        saved_rows: how many of the rows come from the files (the others were patched in).
        patched: rows superseded or added since the files were written.
    """

    ids: np.ndarray
    sizes: np.ndarray
    stamps: np.ndarray
    means: MeansIndex | _Patched
    groups: MeansIndex | _Patched
    model_version: str
    saved_rows: int
    patched: int = 0

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, fetch: Fetch, model_version: str) -> ClusterMeans:
        """Every cluster's mean read and indexed (inverted lists trained when there are many)."""
        ids, sizes, times, means = fetch(None)
        return cls(ids.astype(np.int64), sizes.astype(np.int64), times.astype(np.int64),
                   _index_of(means, np.ones(len(ids), bool)), _index_of(means, sizes >= 2, _inverse_lengths(means)),
                   model_version, len(ids))

    # -- files ----------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write the rows (patched rows folded in, superseded ones dropped) as a new generation of
        files, switch ``state.json`` to it, and delete the older generations (a process that mapped
        them keeps reading them)."""
        folder.mkdir(parents=True, exist_ok=True)
        arrays = self._compacted()._arrays()
        # Two processes saving at once (the pipeline and a command) take turns: one generation each.
        with open(folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            generation = (_read_state(folder) or {}).get("generation", 0) + 1
            for name in _ARRAYS:
                np.save(folder / f"{generation}.{name}.npy", arrays[name])
            tmp = folder / f".{_STATE}.{os.getpid()}"
            tmp.write_text(json.dumps({"generation": generation, "layout": LAYOUT, "model_version": self.model_version,
                                       "rows": len(arrays["ids"]), "dim": int(arrays["means"].shape[1])}))
            tmp.replace(folder / _STATE)
            for old in folder.glob("*.npy"):
                if not old.name.startswith(f"{generation}."):
                    old.unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path, model_version: str, dim: int) -> ClusterMeans | None:
        """The saved rows, memory-mapped, or None when there are none for this model, dimension and
        :data:`LAYOUT`."""
        state = _read_state(folder)
        if (not state or state.get("model_version") != model_version or state.get("dim") != dim
                or state.get("layout") != LAYOUT):
            return None
        g = state["generation"]
        try:
            a = {name: np.load(folder / f"{g}.{name}.npy", mmap_mode="r" if name == "means" else None)
                 for name in _ARRAYS}
        except (OSError, ValueError):  # a generation deleted by a newer save, or a damaged file: rebuild
            return None
        if not all(len(a[n]) == state["rows"] for n in ("ids", "sizes", "stamps", "means", "scale")):
            return None
        means = MeansIndex.from_parts(a["means"], a["means_lists"], np.array(a["means_home"]))
        units = MeansIndex.from_parts(a["means"], a["units_lists"], np.array(a["units_home"]), scale=a["scale"])
        return cls(np.array(a["ids"]), np.array(a["sizes"]), np.array(a["stamps"]), means, units, model_version,
                   len(a["ids"]))

    @classmethod
    def current(cls, folder: Path, stamps: Stamps, fetch: Fetch, model_version: str, dim: int, *,
                min_rows: int = MIN_ROWS) -> ClusterMeans:
        """The means as the clusters stand (``stamps``): the saved ones patched, rewritten or rebuilt
        as the share of changed rows says; built for this call only below ``min_rows`` clusters."""
        if len(stamps[0]) < min_rows:
            return cls.build(fetch, model_version)
        means = cls.load(folder, model_version, dim)
        if means is None or not means.patch(stamps, fetch):
            means = cls.build(fetch, model_version)
            means.save(folder)
        elif means.patched >= REWRITE_SHARE * means.saved_rows:
            means.save(folder)
        return means

    # -- patching -------------------------------------------------------------------------------

    def patch(self, stamps: Stamps, fetch: Fetch) -> bool:
        """Bring the rows up to ``stamps``: a saved row whose cluster changed or went is superseded,
        the current mean of a changed or new cluster searched beside. False (nothing done) when more
        than :data:`REBUILD_SHARE` of the rows changed: a rebuild is then cheaper and better."""
        ids, sizes, times = stamps
        row = np.searchsorted(self.ids[: self.saved_rows], ids)
        row = np.minimum(row, max(self.saved_rows - 1, 0))
        same = (self.ids[row] == ids) & (self.sizes[row] == sizes) & (self.stamps[row] == times) \
            if self.saved_rows else np.zeros(len(ids), bool)
        changed = ids[~same]
        if len(changed) > REBUILD_SHARE * max(len(ids), 1):
            return False
        keep = np.zeros(self.saved_rows, bool)
        keep[row[same]] = True
        # Read as they stand now (a cluster written between the two reads is taken with its new stamp).
        got, got_sizes, got_times, vectors = fetch(changed)
        self._supersede(np.flatnonzero(~keep))
        self._add(got, got_sizes, got_times, vectors)
        self.patched = len(self.ids) - int(keep.sum())
        return True

    def _supersede(self, rows: np.ndarray) -> None:
        self.sizes[rows] = 0
        for index in (self.means, self.groups):
            base = index.base if isinstance(index, _Patched) else index
            base.home[rows] = -1

    def _add(self, ids: np.ndarray, sizes: np.ndarray, stamps: np.ndarray, means: np.ndarray) -> None:
        start = len(self.ids)
        self.ids = np.concatenate([self.ids, ids.astype(np.int64)])
        self.sizes = np.concatenate([self.sizes, sizes.astype(np.int64)])
        self.stamps = np.concatenate([self.stamps, stamps.astype(np.int64)])
        rows = np.arange(start, start + len(ids))
        units = _directions(means)
        group = sizes >= 2
        self.means = _Patched(_base(self.means), np.ascontiguousarray(means, np.float32), rows)
        self.groups = _Patched(_base(self.groups), np.ascontiguousarray(units[group], np.float32), rows[group])

    def _compacted(self) -> ClusterMeans:
        """The same rows as one saved generation: live saved rows and patched rows, by cluster id."""
        if self.patched == 0 and len(self.ids) == self.saved_rows:
            return self
        live = np.flatnonzero(self.sizes > 0)
        order = live[np.argsort(self.ids[live], kind="stable")]
        means = np.zeros((len(order), _dim(self.means)), np.float32)
        saved = order < self.saved_rows
        means[saved] = np.asarray(_base(self.means).means[order[saved]])
        extra = self.means.extra if isinstance(self.means, _Patched) else np.zeros((0, means.shape[1]), np.float32)
        means[~saved] = extra[order[~saved] - self.saved_rows]
        scale = _inverse_lengths(means)
        sizes = self.sizes[order]
        # The lists stay those trained at the last build: a saved row keeps its list, a patched row
        # goes to its nearest one (only clusters of 2+ faces are in the directions' lists).
        fresh = np.flatnonzero(~saved)
        mean_home = _home(_base(self.means), means, order, saved, fresh)
        unit_home = _home(_base(self.groups), means * scale[:, None], order, saved, fresh[sizes[fresh] >= 2])
        return ClusterMeans(
            self.ids[order], sizes, self.stamps[order],
            MeansIndex.from_parts(means, _base(self.means).centroids, mean_home),
            MeansIndex.from_parts(means, _base(self.groups).centroids, unit_home, scale=scale),
            self.model_version, len(order))

    def _arrays(self) -> dict[str, np.ndarray]:
        m, u = _base(self.means), _base(self.groups)
        return {"ids": self.ids, "sizes": self.sizes, "stamps": self.stamps, "means": np.asarray(m.means),
                "scale": u.scale, "means_lists": m.centroids, "means_home": m.home,
                "units_lists": u.centroids, "units_home": u.home}


def _base(index: MeansIndex | _Patched) -> MeansIndex:
    return index.base if isinstance(index, _Patched) else index


def _dim(index: MeansIndex | _Patched) -> int:
    return int(_base(index).means.shape[1])


def _home(index: MeansIndex, vectors: np.ndarray, order: np.ndarray, saved: np.ndarray,
          fresh: np.ndarray) -> np.ndarray:
    """Lists of the rows ``order`` once compacted: a saved row keeps its own, each ``fresh`` row
    goes to its nearest one, any other row is in none."""
    home = np.full(len(order), -1, np.int64)
    home[saved] = index.home[order[saved]]
    home[fresh] = index.lists_of(vectors[fresh])
    return home


def _directions(means: np.ndarray) -> np.ndarray:
    """The means scaled to unit length (a zero mean stays zero)."""
    return means * _inverse_lengths(means)[:, None]


def _inverse_lengths(means: np.ndarray) -> np.ndarray:
    """float32 [n]: one over each mean's length, which turns the means into their directions
    without a second copy of them (0 for a zero mean)."""
    norms = np.linalg.norm(means, axis=1)
    return np.where(norms > 1e-12, 1.0 / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def _index_of(vectors: np.ndarray, member: np.ndarray, scale: np.ndarray | None = None) -> MeansIndex:
    """Inverted lists over ``vectors`` (each times its ``scale`` when given), trained on and holding
    only the ``member`` rows."""
    rows = np.flatnonzero(member)
    trained = (MeansIndex(vectors[rows] if scale is None else vectors[rows] * scale[rows, None])
               if len(rows) else None)
    home = np.full(len(vectors), -1, np.int64)
    if trained is None or trained.centroids is None:
        # Few rows: one list holds them all, and a search compares a query with every member.
        home[rows] = 0
        return MeansIndex.from_parts(vectors, np.zeros((1, vectors.shape[1]), np.float32), home, scale=scale)
    home[rows] = trained.home
    return MeansIndex.from_parts(vectors, trained.centroids, home, scale=scale)


def _read_state(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _STATE).read_text())
    except (OSError, ValueError):
        return None
