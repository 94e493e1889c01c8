"""Cartoon / anime / illustration vs real-photo classifier for faces, CPU only, numpy at run time.

Features of a face are its normalized ArcFace embedding (what the face is) and per-channel mean,
standard deviation and fraction of positive activations of a few inner layers of the same
recognizer pass (how the image is drawn: flat colour, hard edges, brush strokes). The embedding
alone ignores style by design; the texture statistics are what let unseen styles be caught. A
small MLP (or a logistic regression, an MLP with no hidden layer) on standardized features gives
the probability of "not a real photo".

The trained artifact is an ``.npz`` rebuilt by ``scripts/train_cartoon_classifier.py``; it records
the sha256 of the recognizer it was trained on and the names of its tapped tensors, so it is never
applied to features of another model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelSettings
from .errors import ModelNotFoundError
from .models import STYLE_BACKBONE, ImageBackbone, file_sha256
from .schemas import DetectedFace
from .style_backbone import ensure_style_backbone

DEFAULT_ARTIFACT = Path(__file__).with_name("resources") / "cartoon_classifier.npz"


@dataclass
class CartoonClassifier:
    """Standardize -> optional projection -> dense ReLU layers -> sigmoid.

    An :class:`~face_assets.models.InferenceModel` like the networks whose features it reads:
    :meth:`predict` takes faces and gives their probabilities. Its arrays are in memory once it is
    built or :meth:`read`, so :meth:`load` has nothing left to start.

    Attributes:
        recognizer_sha256: recognizer the features come from.
        taps: inner tensor names whose statistics form the texture features.
        backbone_sha256: the image backbone (``models.STYLE_BACKBONE``) whose features end each row,
            or None for a classifier on the recognizer's features alone.
        mean, scale: feature standardization.
        proj: optional projection matrix applied after standardization (D x k).
        weights, biases: dense layers; ReLU between them, sigmoid on the single output.
        threshold: probability above which a face is called a cartoon (calibrated on real faces).
        info: how it was trained and how it scored (free-form, for reports).
        model_name: the artifact's file name (set by :meth:`read`).
    """

    recognizer_sha256: str
    taps: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    threshold: float
    proj: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    backbone_sha256: str | None = None
    model_name: str = "cartoon classifier"

    def load(self) -> None:
        """Nothing to start: the classifier is numpy arrays, in memory since it was built or read."""

    def predict(self, faces: Sequence[DetectedFace]) -> np.ndarray:
        """Cartoon probability of each face, from its normalized embedding, its texture statistics and, for a
        classifier with an image backbone, its ``style`` features (all set by ``FaceAnalyzer``)."""
        if not faces:
            return np.zeros(0)
        style = np.stack([f.style for f in faces]) if self.backbone_sha256 is not None else None
        return self.predict_proba(self.features(np.stack([f.normed_embedding for f in faces]),
                                                np.stack([f.texture for f in faces]), style))

    @staticmethod
    def features(normed_embedding: np.ndarray, texture: np.ndarray, style: np.ndarray | None = None) -> np.ndarray:
        """Feature rows from normalized embeddings [N, 512], texture statistics [N, T] and, for a
        classifier with an image backbone, the backbone's features [N, S]."""
        parts = [np.atleast_2d(normed_embedding), np.log1p(np.maximum(np.atleast_2d(texture), 0.0))]
        if style is not None:
            parts.append(np.atleast_2d(style))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability that each feature row is a cartoon / illustration rather than a real photo."""
        x = (np.atleast_2d(features) - self.mean) / self.scale
        if self.proj is not None:
            x = x @ self.proj
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if i < len(self.weights) - 1:
                x = np.maximum(x, 0.0)
        return 1.0 / (1.0 + np.exp(-np.clip(x[:, 0], -50, 50)))

    def save(self, path: str | Path) -> Path:
        """Write the classifier as a compressed ``.npz`` (no pickles, safe to load)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32),
            "meta": np.array(
                json.dumps(
                    {
                        "recognizer_sha256": self.recognizer_sha256,
                        "taps": list(self.taps),
                        "threshold": float(self.threshold),
                        "backbone_sha256": self.backbone_sha256,
                        "layers": len(self.weights),
                        "info": self.info,
                    }
                )
            ),
        }
        if self.proj is not None:
            arrays["proj"] = self.proj.astype(np.float32)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"w{i}"] = w.astype(np.float32)
            arrays[f"b{i}"] = b.astype(np.float32)
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def read(cls, path: str | Path = DEFAULT_ARTIFACT) -> "CartoonClassifier":
        """Read a classifier written by :meth:`save`; raises ModelNotFoundError when it is missing."""
        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(
                "cartoon classifier artifact",
                [str(path)],
                "Rebuild it with `python scripts/train_cartoon_classifier.py`, or set "
                "filter.check_cartoon to false.",
            )
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            n = int(meta["layers"])
            return cls(
                recognizer_sha256=meta["recognizer_sha256"],
                taps=tuple(meta["taps"]),
                mean=data["mean"],
                scale=data["scale"],
                proj=data["proj"] if "proj" in data.files else None,
                weights=[data[f"w{i}"] for i in range(n)],
                biases=[data[f"b{i}"] for i in range(n)],
                threshold=float(meta["threshold"]),
                info=meta.get("info", {}),
                backbone_sha256=meta.get("backbone_sha256"),
                model_name=path.name,
            )


def backbone_for(classifier: CartoonClassifier, models: ModelSettings) -> ImageBackbone | None:
    """The image backbone ``classifier`` was trained with (None when it uses none), checked by content
    hash: features of another file would be read as if they were its own."""
    if classifier.backbone_sha256 is None:
        return None
    if file_sha256(ensure_style_backbone()) != classifier.backbone_sha256:
        raise ModelNotFoundError(
            f"the image backbone the cartoon classifier was trained on (sha256 {classifier.backbone_sha256[:12]})",
            [str(STYLE_BACKBONE)],
            "Rebuild both with `python scripts/train_cartoon_classifier.py`, or set filter.check_cartoon to false.",
        )
    return ImageBackbone(STYLE_BACKBONE, models)
