"""Verification metrics and the evaluation gate that decides whether a fine-tuned model may replace the current one.

Metrics are plain functions on arrays (no I/O): ROC AUC, TAR at a fixed FAR, rank-1 identification.
The gate compares a candidate with the current model on two sets:

(a) the held-out feedback pairs (persons the training never saw): the candidate must improve at
    least one of AUC, TAR at FAR 1e-3 and accuracy at the match threshold, and worsen none;
(b) a general set of real identities not used in training: no metric (AUC, TAR at FAR 1e-3,
    rank-1) may drop by more than ``max_drop`` (0.005 = half a point).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

FAR = 1e-3


def threshold_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """Cosine threshold whose false accept rate on impostor pairs is ``far``, and the TAR there."""
    thr = float(np.quantile(impostor, 1.0 - far))
    return thr, float(np.mean(genuine >= thr))


def roc_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    """Probability that a genuine pair scores above an impostor pair (Mann-Whitney U)."""
    scores = np.concatenate([genuine, impostor])
    ranks = scores.argsort().argsort() + 1.0
    return float((ranks[: len(genuine)].sum() - len(genuine) * (len(genuine) + 1) / 2) / (len(genuine) * len(impostor)))


def pair_metrics(similarity: np.ndarray, label: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, TAR at FAR 1e-3 and accuracy at ``threshold`` of scored pairs (label 1 = same person)."""
    similarity, label = np.asarray(similarity, np.float64), np.asarray(label).astype(bool)
    genuine, impostor = similarity[label], similarity[~label]
    out = {"pairs": int(len(label)), "accuracy": float(np.mean((similarity >= threshold) == label)) if len(label) else 0.0}
    if len(genuine) and len(impostor):
        out["auc"] = roc_auc(genuine, impostor)
        out["tar_at_far"] = threshold_at_far(genuine, impostor, FAR)[1]
    return out


def identity_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Over all pairs of normalized ``embeddings``: AUC and TAR at FAR 1e-3; plus leave-one-out rank-1."""
    labels = np.asarray(labels)
    sims = embeddings @ embeddings.T
    iu = np.triu_indices(len(labels), 1)
    same = labels[iu[0]] == labels[iu[1]]
    genuine, impostor = sims[iu][same], sims[iu][~same]
    np.fill_diagonal(sims, -np.inf)
    counts = {lab: int(np.sum(labels == lab)) for lab in set(labels.tolist())}
    queries = np.array([counts[lab] > 1 for lab in labels])
    nearest = labels[sims.argmax(axis=1)]
    return {
        "images": int(len(labels)),
        "auc": roc_auc(genuine, impostor),
        "tar_at_far": threshold_at_far(genuine, impostor, FAR)[1],
        "rank1": float(np.mean(nearest[queries] == labels[queries])) if queries.any() else 0.0,
    }


@dataclass
class GateResult:
    """Verdict of the gate: ``passed``, and every reason for or against."""

    passed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly view."""
        return asdict(self)


def gate(candidate: dict[str, dict[str, float]], current: dict[str, dict[str, float]], max_drop: float) -> GateResult:
    """Decide a promotion from ``{"feedback": metrics, "general": metrics}`` of both models (see module doc)."""
    reasons: list[str] = []
    ok = True
    cand_fb, cur_fb = candidate.get("feedback", {}), current.get("feedback", {})
    keys = [k for k in ("auc", "tar_at_far", "accuracy") if k in cand_fb and k in cur_fb]
    if not keys:
        return GateResult(False, ["no held-out feedback pairs to judge the candidate on"])
    gains = {k: cand_fb[k] - cur_fb[k] for k in keys}
    worse = [k for k, d in gains.items() if d < 0]
    if worse:
        ok = False
        reasons.append("feedback pairs: worse " + ", ".join(f"{k} ({gains[k]:+.4f})" for k in worse))
    if not any(d > 0 for d in gains.values()):
        ok = False
        reasons.append("feedback pairs: no improvement")
    else:
        reasons.append("feedback pairs: " + ", ".join(f"{k} {d:+.4f}" for k, d in gains.items()))
    cand_gen, cur_gen = candidate.get("general", {}), current.get("general", {})
    for k in ("auc", "tar_at_far", "rank1"):
        if k not in cand_gen or k not in cur_gen:
            ok = False
            reasons.append(f"general set: {k} missing")
            continue
        drop = cur_gen[k] - cand_gen[k]
        if drop > max_drop:
            ok = False
            reasons.append(f"general set: {k} drops {drop:.4f} > {max_drop}")
        else:
            reasons.append(f"general set: {k} {-drop:+.4f}")
    return GateResult(ok, reasons)
