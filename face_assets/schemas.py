"""Typed results shared by detection, filtering, the library, persons and feedback: defined once, returned everywhere."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, NamedTuple, TypedDict

import numpy as np

RejectionReason = Literal["cartoon", "no_face", "low_quality"]


@dataclass
class DetectedFace:
    """One face, with InsightFace's names: ``bbox``, ``kps``, ``det_score``, ``embedding``.

    ``bbox`` and ``kps`` are in the coordinates of the original image (they may reach outside it for
    tight crops). ``embedding`` is the raw recognizer output; its norm carries quality information,
    so the normalized vector is derived, not stored twice. ``texture`` holds the recognizer's inner
    layer statistics used by the cartoon classifier.
    """

    bbox: np.ndarray
    kps: np.ndarray
    det_score: float
    embedding: np.ndarray | None = None
    texture: np.ndarray | None = None
    style: np.ndarray | None = None  # the cartoon classifier's image-backbone features (analysis.FaceAnalyzer)

    @property
    def embedding_norm(self) -> float | None:
        """L2 norm of the raw embedding (low for blurred or ambiguous faces)."""
        return None if self.embedding is None else float(np.linalg.norm(self.embedding))

    @property
    def normed_embedding(self) -> np.ndarray | None:
        """Unit-length embedding: cosine similarity is a dot product of two of these."""
        if self.embedding is None:
            return None
        return (self.embedding / max(np.linalg.norm(self.embedding), 1e-12)).astype(np.float32)

    @property
    def face_size(self) -> tuple[int, int]:
        """Width and height of the face box in pixels."""
        x1, y1, x2, y2 = self.bbox[:4]
        return int(round(x2 - x1)), int(round(y2 - y1))


class Detection(NamedTuple):
    """What the detector found in one image: its faces, largest first, and whether the padded retry found them."""

    faces: list[DetectedFace]
    padded: bool


class Embeddings(NamedTuple):
    """What the recognizer gives for aligned crops: raw embeddings ``[N, D]``, and with texture taps their
    statistics ``[N, 3 * sum(C)]`` (channel means, standard deviations, fractions of positive values), else None."""

    embeddings: np.ndarray
    taps: np.ndarray | None


@dataclass
class ImageAnalysis:
    """Every face found in one image, and how they were found."""

    width: int
    height: int
    faces: list[DetectedFace] = field(default_factory=list)
    padded: bool = False

    def area_ratio(self, face: DetectedFace) -> float:
        """Area of the face box inside the image divided by the image area."""
        x1, y1, x2, y2 = face.bbox[:4]
        w = max(0.0, min(x2, self.width) - max(x1, 0.0))
        h = max(0.0, min(y2, self.height) - max(y1, 0.0))
        return float(w * h / max(self.width * self.height, 1))


class FaceScores(TypedDict):
    """Scores of one face, as reported by ``filter_image``."""

    det_score: float
    embedding_norm: float
    face_size: list[int]
    face_area_ratio: float
    is_cartoon: bool
    cartoon_probability: float
    quality: float


class FaceVerdict(TypedDict):
    """One face of an image with its scores and its own verdict."""

    bbox: list[float]
    is_valid: bool
    rejection_reason: RejectionReason | None
    scores: FaceScores


class FilterResult(TypedDict):
    """What ``filter_image`` returns (spec 1.3), plus per-face details.

    ``scores`` are those of the deciding face (``face_index``): the best valid face when there is
    one, otherwise the largest face; for ``no_face`` they are zero.
    """

    is_valid: bool
    rejection_reason: RejectionReason | None
    scores: dict
    faces: list[FaceVerdict]
    face_index: int | None
    num_faces: int
    image_size: list[int]
    padded: bool


@dataclass
class SearchResult:
    """One match: which face, in which image, how similar (cosine, -1..1), and whether that is the same person.

    ``is_match``: the similarity reaches the running model version's match threshold.
    """

    face_id: int
    image_id: str
    path: str
    bbox: list[float]
    similarity: float
    metadata: dict | None = None
    cluster_id: int | None = None
    is_match: bool = False


@dataclass
class IndexedImage:
    """What ``index_image`` did: the image id, its status, the faces stored and those rejected."""

    image_id: str
    path: str
    status: str
    rejection_reason: str | None
    indexed: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class FeedbackQuery:
    """A search people can vote on: its ``query_id``, the face searched, and the results.

    ``faces`` holds the boxes of every face found in an uploaded query image (the catalog face alone
    for a catalog query) and ``face_index`` the one searched, so that a page can offer the others.
    """

    query_id: str
    bbox: list[float]
    query_face_id: int | None
    results: list[SearchResult]
    faces: list[list[float]] = field(default_factory=list)
    face_index: int = 0


@dataclass
class Comparison:
    """1:1 verification: cosine similarity of the two main faces, the decision and its threshold."""

    similarity: float
    is_match: bool
    threshold: float


@dataclass
class ClusterInfo:
    """One person cluster.

    Attributes:
        cluster_id: stable id (kept across re-clusterings by maximum overlap).
        size: number of faces.
        label: the user's name for the person, if any.
        representative_face_id: the face closest to the cluster's mean.
        cohesion: mean cosine between the cluster's faces (None for one face).
        separation: 1 - best average cosine with another cluster (None for one face).
        confidence: cohesion minus that best average cosine with another cluster.
        face_ids: the faces, when asked for (``get_cluster``).
        change_id: the audit entry of the curation call that returned it, if any.
    """

    cluster_id: int
    size: int
    label: str | None = None
    representative_face_id: int | None = None
    cohesion: float | None = None
    separation: float | None = None
    confidence: float | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    face_ids: list[int] | None = None
    change_id: int | None = None


@dataclass
class ClusterRun:
    """What a clustering run did.

    Attributes:
        run_id: row of ``cluster_runs``.
        kind: ``full`` or ``incremental``.
        faces: faces clustered (full) or examined (incremental).
        clusters: clusters after the run.
        singletons: single-face clusters after the run.
        new_faces: faces that had no cluster before the run.
        unassigned: incremental: new faces that joined no existing cluster.
        id_changed: full: fraction of previously clustered faces whose cluster id changed.
        seconds: wall time.
        quality: full: size-weighted cohesion, separation and sampled silhouette.
        reasons: full, from ``update_clusters``: why it ran (the drift policy's reasons, or asked for).
    """

    run_id: int
    kind: str
    faces: int
    clusters: int
    singletons: int
    new_faces: int = 0
    unassigned: int = 0
    id_changed: float | None = None
    seconds: float = 0.0
    quality: dict[str, float | None] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Vote:
    """A stored vote; ``revisions`` counts how often the same voter voted again on the same pair."""

    feedback_id: int
    query_id: str
    result_id: int
    vote: str
    voter: str
    similarity: float
    created_at: datetime
    updated_at: datetime
    revisions: int


@dataclass
class ExportReport:
    """What :func:`export_feedback` wrote, and what it dropped and why.

    ``dropped`` counts votes (or mined negatives for ``class_balance``) by reason: ``deleted_face``
    (the result face left the catalog), ``missing_query_image``, ``self_pair`` (query and result are
    the same face or the same photo), ``conflicting_votes`` (voters disagree on a pair beyond
    ``feedback.min_vote_agreement``), ``outvoted`` (the minority votes of a pair that kept its
    majority label), ``class_balance`` (mined negatives beyond ``feedback.max_negatives_per_positive``).
    ``mining`` counts mined negatives by method: ``cluster`` (another person cluster) or
    ``threshold`` (no cluster known: below the match threshold and not up-voted).
    """

    out_dir: str
    votes_read: int
    pairs: int
    triplets: int
    positives: int
    negatives: dict[str, int]
    negatives_per_positive: float | None
    dropped: dict[str, int]
    mining: dict[str, int]
    warnings: list[str]
    dropped_examples: list[dict[str, Any]]
    files: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict."""
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines."""
        neg = ", ".join(f"{k} {v}" for k, v in self.negatives.items()) or "none"
        lines = [f"{self.votes_read} votes read -> {self.pairs} pairs ({self.positives} positive; negatives: {neg}), "
                 f"{self.triplets} triplets in {self.out_dir}",
                 "dropped: " + (", ".join(f"{k} {v}" for k, v in self.dropped.items()) or "nothing"),
                 "mined by: " + (", ".join(f"{k} {v}" for k, v in self.mining.items()) or "nothing")]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)
