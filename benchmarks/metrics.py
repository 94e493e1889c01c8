"""Clustering metrics against known identities: pairwise and BCubed precision, recall and F.

Used by the clustering benchmark and tests, where the truth is known (synthetic faces, labelled
real faces); the product itself never has a truth to score against.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clustering_metrics", "pairwise_prf", "bcubed_prf", "bcubed_per_face"]


def _contingency(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sizes of the non-empty (pred, true) cells, and of each pred / true cluster."""
    _, p = np.unique(np.asarray(pred), return_inverse=True)
    _, t = np.unique(np.asarray(true), return_inverse=True)
    key = p.astype(np.int64) * (t.max() + 1) + t
    _, cell = np.unique(key, return_counts=True)
    return cell.astype(np.float64), np.bincount(p).astype(np.float64), np.bincount(t).astype(np.float64)


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def pairwise_prf(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    """Pairwise precision, recall and F1: over pairs of faces put together / truly together.

    With no pair on one side (all singletons), that side's value is 1.
    """
    cell, ps, ts = _contingency(pred, true)
    tp = (cell * (cell - 1)).sum() / 2
    pp = (ps * (ps - 1)).sum() / 2
    tt = (ts * (ts - 1)).sum() / 2
    p = tp / pp if pp else 1.0
    r = tp / tt if tt else 1.0
    return float(p), float(r), _f(p, r)


def bcubed_per_face(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each face's BCubed precision and recall: the share of its cluster that is its person, and
    the share of its person that is in its cluster."""
    pred, true = np.asarray(pred), np.asarray(true)
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(true, return_inverse=True)
    key = p.astype(np.int64) * (t.max() + 1) + t
    _, cell_of, cell = np.unique(key, return_inverse=True, return_counts=True)
    c = cell[cell_of].astype(np.float64)
    return c / np.bincount(p)[p], c / np.bincount(t)[t]


def bcubed_prf(pred: np.ndarray, true: np.ndarray) -> tuple[float, float, float]:
    """BCubed precision, recall and F1 (per face, averaged over faces; Amigo et al. 2009)."""
    prec, rec = (float(np.mean(v)) for v in bcubed_per_face(pred, true))
    return prec, rec, _f(prec, rec)


def clustering_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Pairwise and BCubed P/R/F and cluster counts of a clustering against the truth."""
    pp, pr, pf = pairwise_prf(pred, true)
    bp, br, bf = bcubed_prf(pred, true)
    return {"pairwise_precision": pp, "pairwise_recall": pr, "pairwise_f": pf,
            "bcubed_precision": bp, "bcubed_recall": br, "bcubed_f": bf,
            "clusters": int(len(np.unique(pred))), "true_clusters": int(len(np.unique(true)))}
