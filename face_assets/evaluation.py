"""Verification metrics and the evaluation gate that decides whether a fine-tuned model may replace the current one.

Metrics are plain functions on arrays (no I/O): ROC AUC, TAR at a fixed FAR, rank-1 identification,
the match threshold at a target FAR, and false accept / false reject rates at a threshold with a
bootstrap confidence interval. The gate compares a candidate with the current model:

(a) the held-out feedback pairs (persons the training never saw): the candidate must improve at
    least one of AUC, TAR at FAR 1e-3 and accuracy at the match threshold, and worsen none;
(b) a general set of real identities not used in training: no metric (AUC, TAR at FAR 1e-3,
    rank-1) may drop by more than ``max_drop`` (0.005 = half a point);
(c) the operating point: each model at the threshold it runs with (the candidate at its own,
    calibrated on the general set; the current model at the one it runs with today), false accept
    and false reject rates on the held-out feedback faces and on the general set. A rate whose
    change, candidate minus current, has its whole confidence interval above zero has risen beyond
    noise, and the candidate is rejected.

The interval comes from a paired cluster bootstrap (:func:`operating_point`): persons are drawn
with replacement, each face weighs as often as its person was drawn, and both models are scored on
the same draws, so a change carried by one or two persons stays inside the interval.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

FAR = 1e-3


def threshold_at_far(genuine: np.ndarray, impostor: np.ndarray, far: float) -> tuple[float, float]:
    """Cosine threshold whose false accept rate on impostor pairs is ``far``, and the TAR there."""
    thr = float(np.quantile(impostor, 1.0 - far))
    return thr, float(np.mean(genuine >= thr))


def calibrate_threshold(impostor: np.ndarray, far: float) -> float:
    """The lowest cosine threshold that accepts at most ``far`` of ``impostor`` similarities.

    Exactly ``floor(far * n)`` impostor pairs score at or above it (ties aside), so the false accept
    rate on the calibration set never exceeds ``far``.
    """
    scores = np.sort(np.asarray(impostor))[::-1]
    if not len(scores):
        raise ValueError("no impostor pairs to calibrate a threshold on")
    # the next value up in the scores' own dtype: a float32 score compared with a threshold one
    # float64 step above it would round to the score and be accepted after all
    return float(np.nextafter(scores[min(int(far * len(scores) + 1e-9), len(scores) - 1)], scores.dtype.type(np.inf)))


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


def all_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices ``(i, j)`` of every pair ``i < j`` of ``labels`` and whether the two share a label."""
    labels = np.asarray(labels)
    i, j = np.triu_indices(len(labels), 1)
    return i, j, labels[i] == labels[j]


def identity_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Over all pairs of normalized ``embeddings``: AUC and TAR at FAR 1e-3; plus leave-one-out rank-1."""
    labels = np.asarray(labels)
    sims = embeddings @ embeddings.T
    i, j, same = all_pairs(labels)
    genuine, impostor = sims[i, j][same], sims[i, j][~same]
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


def _rates(weights: np.ndarray, accepted: np.ndarray, genuine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAR and FRR under pair ``weights`` [B, P]: weighted share of impostors accepted, genuine rejected."""
    imp, gen = weights[:, ~genuine], weights[:, genuine]
    far = (imp * accepted[~genuine]).sum(1) / np.maximum(imp.sum(1), 1e-12)
    frr = (gen * ~accepted[genuine]).sum(1) / np.maximum(gen.sum(1), 1e-12)
    return far, frr


def operating_point(i: np.ndarray, j: np.ndarray, genuine: np.ndarray, groups: np.ndarray,
                    current: tuple[np.ndarray, float], candidate: tuple[np.ndarray, float],
                    rounds: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, dict]:
    """False accepts and rejects of two models at their own thresholds, with a paired bootstrap interval.

    Args:
        i, j: face indices of each pair; ``genuine``: whether the pair is the same person.
        groups: the person of each face (any labels); persons are what the bootstrap resamples.
        current, candidate: ``(similarity of each pair, threshold)`` of the two models.
        rounds: bootstrap draws; ``confidence``: two-sided level of the intervals; ``seed``: their seed.

    Returns:
        ``{"far": ..., "frr": ...}``, each with ``current``, ``candidate`` (rates on the pairs as
        given), ``change`` (candidate minus current) and ``interval`` (its bootstrap interval), and
        the counts ``current_errors`` / ``candidate_errors`` out of ``pairs`` of that kind.
        Reference: Efron & Tibshirani, *An Introduction to the Bootstrap*, ch. 13 (percentile interval).
    """
    i, j, genuine = np.asarray(i), np.asarray(j), np.asarray(genuine, bool)
    _, person = np.unique(np.asarray(groups), return_inverse=True)
    accepted = [np.asarray(s) >= t for s, t in (current, candidate)]
    ones = np.ones((1, len(i)))
    point = [_rates(ones, a, genuine) for a in accepted]
    rng = np.random.default_rng(seed)
    changes: list[np.ndarray] = []
    for start in range(0, rounds, 100):  # chunks keep [draws, pairs] small for large sets
        draws = min(100, rounds - start)
        counts = rng.multinomial(person.max() + 1, np.full(person.max() + 1, 1.0 / (person.max() + 1)), size=draws)
        face_weight = counts[:, person].astype(np.float64)
        weights = face_weight[:, i] * face_weight[:, j]
        cur, cand = (_rates(weights, a, genuine) for a in accepted)
        changes.append(np.stack([cand[0] - cur[0], cand[1] - cur[1]], axis=1))
    change = np.concatenate(changes)
    tail = (1.0 - confidence) / 2.0 * 100.0
    out: dict[str, dict] = {}
    for k, (name, kind) in enumerate((("far", ~genuine), ("frr", genuine))):
        errors = [int(np.sum(a[kind] if name == "far" else ~a[kind])) for a in accepted]
        out[name] = {"current": float(point[0][k][0]), "candidate": float(point[1][k][0]),
                     "change": float(point[1][k][0] - point[0][k][0]),
                     "interval": [float(np.percentile(change[:, k], tail)), float(np.percentile(change[:, k], 100 - tail))],
                     "current_errors": errors[0], "candidate_errors": errors[1], "pairs": int(kind.sum())}
    return out


@dataclass
class GateResult:
    """Verdict of the gate: ``passed``, every reason for or against, and the names of the failed checks."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-friendly view."""
        return asdict(self)


def gate(candidate: dict[str, dict[str, float]], current: dict[str, dict[str, float]], max_drop: float,
         operating: dict[str, dict[str, dict]] | None = None) -> GateResult:
    """Decide a promotion (see module doc).

    Args:
        candidate, current: ``{"feedback": metrics, "general": metrics}`` of both models.
        max_drop: largest tolerated drop of a general-set metric.
        operating: ``{set name: operating_point(...)}`` for check (c); None skips it.

    A failed check is named ``<set>.<metric>`` in ``failed`` (``feedback.auc``, ``general.rank1``,
    ``operating.feedback.far``, ...).
    """
    reasons: list[str] = []
    failed: list[str] = []
    cand_fb, cur_fb = candidate.get("feedback", {}), current.get("feedback", {})
    keys = [k for k in ("auc", "tar_at_far", "accuracy") if k in cand_fb and k in cur_fb]
    if not keys:
        return GateResult(False, ["no held-out feedback pairs to judge the candidate on"], ["feedback.pairs"])
    gains = {k: cand_fb[k] - cur_fb[k] for k in keys}
    worse = [k for k, d in gains.items() if d < 0]
    if worse:
        failed += [f"feedback.{k}" for k in worse]
        reasons.append("feedback pairs: worse " + ", ".join(f"{k} ({gains[k]:+.4f})" for k in worse))
    if not any(d > 0 for d in gains.values()):
        failed.append("feedback.improvement")
        reasons.append("feedback pairs: no improvement")
    else:
        reasons.append("feedback pairs: " + ", ".join(f"{k} {d:+.4f}" for k, d in gains.items()))
    cand_gen, cur_gen = candidate.get("general", {}), current.get("general", {})
    for k in ("auc", "tar_at_far", "rank1"):
        if k not in cand_gen or k not in cur_gen:
            failed.append(f"general.{k}")
            reasons.append(f"general set: {k} missing")
            continue
        drop = cur_gen[k] - cand_gen[k]
        if drop > max_drop:
            failed.append(f"general.{k}")
            reasons.append(f"general set: {k} drops {drop:.4f} > {max_drop}")
        else:
            reasons.append(f"general set: {k} {-drop:+.4f}")
    for set_name, rates in (operating or {}).items():
        for metric in ("far", "frr"):
            m = rates.get(metric)
            if not m or not m["pairs"]:
                continue
            text = (f"operating point, {set_name}: {metric.upper()} {m['current']:.4g} -> {m['candidate']:.4g} "
                    f"({m['current_errors']} -> {m['candidate_errors']} of {m['pairs']}), change interval "
                    f"[{m['interval'][0]:+.4g}, {m['interval'][1]:+.4g}]")
            if m["interval"][0] > 0:
                failed.append(f"operating.{set_name}.{metric}")
                reasons.append(text + ": rises beyond the interval")
            else:
                reasons.append(text)
    return GateResult(not failed, reasons, failed)
