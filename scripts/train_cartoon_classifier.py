"""Rebuild the cartoon / illustration classifier (face_assets/resources/cartoon_classifier.npz).

Method. Every face is described by what ``filter_image`` computes at run time: from the recognizer's
forward pass, the normalized ArcFace embedding (512) and the per-channel mean, standard deviation and fraction
of positive activations of inner layers of the recognizer ("taps"; default: 339, 351, 405, early blocks
at 56x56 to 14x14, and the nine later blocks 401 to 513, 28x28 to 7x7, which carry best to unseen
styles), and the pooled stage statistics of an ImageNet EfficientNet-Lite0 (the "image backbone",
exported to ONNX by this script) on the face's aligned crop and on a twice-wider crop around it,
passed through ``CartoonClassifier.features``. A class-balanced logistic regression (C=0.01) on
standardized features, the backbone's columns at half weight, gives P(not a real photo). The
threshold is calibrated on held-out real faces: the higher of the 99.25% quantile of original views
and the 98.5% quantile of their grayscale copies.

Data (shared datasets, ``FACE_ASSETS_DATASETS`` or ``../shared/datasets``), 51 sources. Real:
real/imfdb, lfw10, deepface, dlib_johns, ageitgey, real/extra/<kind> (largest face per image) and
every face of the photos in detection/groups and detection/dlib_voc (minus a dog photo and a 3D
render); real/extra/aigen (AI-generated) is left out. Non-photo: cartoon/iiit_cfw,
cartoon/dualstylegan/<style> and cartoon/extra/<style>. Augmentations (on the face's surroundings,
see ``face_region``): real photos get grayscale, sepia, blur, low resolution, strong JPEG, an "old
print" mix, a B/W film print (high contrast, grain, scratches), a phone's sharpening (weighted 0.3)
and (small faces) enlargement; non-photos get grayscale, JPEG and enlargement. Filtered copies of the
real photos (cartoon filter, watercolour stylization, pencil sketch, Kuwahara "oil") are added as
non-photos. Detection runs on the original only; every view is embedded at the landmarks found there
(``embed_at``). Only faces of at least ``filter.min_face_size`` px are used.

Held-out protocols (every figure printed comes from data that shaped neither the model nor its
threshold):
  * leave-one-source-out, grouped: the sources (a repository, an older folder, a DualStyleGAN style)
    are dealt into K_FOLDS folds and every fold is held out once. Model m_j is trained without fold j;
    its threshold is calibrated on the real faces of every other fold i, scored by m_ij, trained
    without i and j. Filtered copies and augmentations stay with their source. Tables per real kind,
    real source, style group, folder and non-photo source, and the threshold curve;
  * leave-one-style-out: each style group (the same style of every source together: painting =
    cartoon/extra/painting + DualStyleGAN impasto, render3d = extra/render3d + Pixar, ...) is left out
    of training and calibration; STYLE_FOLDS models without it and without one group of source folds.
"Caught" counts images without a usable face as caught (filter_image rejects them too). Finally one
model is trained on everything and saved with the threshold (the same rule on the out-of-fold
probabilities of all real faces) and an ``info`` dict holding the tables. Features and aligned crops
are cached (``--cache-dir``); deterministic: fixed seeds everywhere.

Usage (from the repo root): ``python scripts/train_cartoon_classifier.py [--cache-dir DIR]``
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
import warnings
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/train_cartoon_classifier.py` from the repo root
    sys.path.insert(0, str(REPO_ROOT))

from face_assets.analysis import FaceAnalyzer  # noqa: E402
from face_assets.config import datasets_root  # noqa: E402
from face_assets.cartoon import DEFAULT_ARTIFACT, CartoonClassifier  # noqa: E402
from face_assets.config import load_settings  # noqa: E402
from face_assets.imaging import load_image  # noqa: E402
from face_assets.models import STYLE_BACKBONE, TAP_STATS, WIDE_SIDE, ImageBackbone, align_wide, resolve_pack  # noqa: E402
from face_assets.schemas import DetectedFace, ImageAnalysis  # noqa: E402
from face_assets.style_backbone import POOLED_STAGES, export_backbone  # noqa: E402

CACHE_DIR = REPO_ROOT / "data" / "cache"  # git-ignored
EMB_DIM = 512  # normalized ArcFace embedding: the first columns of CartoonClassifier.features
# Faces are cached from CACHE_MIN_FACE px (filter_image scores style from 24 px); training and evaluation use
# faces of at least filter.min_face_size (from the settings): smaller ones are low_quality in any case.
CACHE_MIN_FACE = 24
REF_MIN_FACE = 40  # faces that size the augmentations (fixed, so cached views stay valid)
AUG_VERSION = 6  # bump when the augmentations or the cached arrays change (part of the cache key)
REAL_AUGS = ("orig", "gray", "sepia", "blur", "lowres", "jpeg", "old", "film", "up", "sharp")
# Sharpened copies count 0.3 of a face: they teach that a phone's processing is still a photo, which
# lowers the real tail that sets the threshold; at full weight they cost unseen IIIT-CFW 0.5 points.
AUG_WEIGHT = {"sharp": 0.3}
CARTOON_AUGS = ("orig", "gray", "jpeg", "up")
# Drawings made from real photos by image filters: labelled cartoon, they teach the classifier what
# "drawn" looks like on faces whose shape is real, so it cannot rely on cartoon face geometry alone.
SYNTH_AUGS = ("toon", "paint", "sketch", "oil")
UP_BELOW = 80  # "up" (enlarged copy) only for images whose face is smaller than this (px)
REAL_FOLDERS = ("imfdb", "lfw10", "deepface", "dlib_johns", "ageitgey")
PHOTO_FOLDERS = ("groups", "dlib_voc")  # real photos without identity: every usable face, grouped by photo
# dogs.jpg: dog faces, neither people nor drawings; groups/22.jpg: a 3D render (Second Life avatars), not a photo
EXCLUDE = {"detection/dlib_voc/dogs.jpg", "detection/groups/22.jpg"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".pgm", ".ppm"}
# The same person under two spellings, so that real photos and caricatures of one person share a fold
# (person folds of scripts/cartoon_baseline.py).
ALIASES = {"amir": "aamirkhan"}




def person_key(name: str) -> str:
    """One key per person across the real folders and IIIT-CFW (folder names, spelling aliases merged)."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    return "person:" + ALIASES.get(key, key)


# Held-out style groups: a style folder of every source counts as the same style, so that leaving out
# "render3d" removes the DualStyleGAN Pixar faces too. IIIT-CFW mixes caricatures, cartoons and sketches.
STYLE_GROUP = {
    "dsg_anime": "anime", "dsg_caricature": "caricature", "dsg_cartoon": "cartoon",
    "dsg_illustration": "illustration", "dsg_impasto": "painting", "dsg_pixar": "render3d",
    "iiit_cfw": "iiit_cfw",
}


@dataclass(frozen=True)
class Item:
    """One source image of the training data."""

    rel: str  # path relative to the datasets root
    source: str  # where the image comes from: the unit held out by leave-one-source-out
    kind: str  # reporting row: real folder or kind (bw, old, ...), or cartoon folder / style
    style: str  # held-out style group of a non-photo ("" for real photos)
    label: int  # 1 = cartoon / drawn, 0 = real photo
    multi: bool  # group photo: keep every face, not just the largest

    @property
    def augs(self) -> tuple[str, ...]:
        if self.label:
            return CARTOON_AUGS
        return REAL_AUGS if self.multi else REAL_AUGS + SYNTH_AUGS


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT)


# The same repository under two prefixes (its real photos in real/extra, its art in cartoon/extra): one source.
SOURCE_ALIASES = {"sadtalker": "sadtalk", "liveportrait": "livep"}


def _prefix(path: Path) -> str:
    """Source of a file of the extra folders: its file-name prefix."""
    prefix = path.name.split("_", 1)[0].lower()
    return SOURCE_ALIASES.get(prefix, prefix)


def list_items(root: Path) -> list[Item]:
    """Every training image with its label, source, reporting row and style group.

    Sources: each older real folder, ``groups`` and ``dlib_voc``; ``iiit_cfw``; each DualStyleGAN
    style (``dsg_<style>``: every style is a generator tuned on its own artwork collection); and
    the file-name prefix of every file in ``real/extra`` and ``cartoon/extra`` (``x_<prefix>``).
    ``real/extra/aigen`` (AI-generated, neither photo nor drawing) is left out.
    """
    items: list[Item] = []
    for name in REAL_FOLDERS:
        for path in _images(root / "real" / name):
            items.append(Item(path.relative_to(root).as_posix(), name, name, "", 0, False))
    for name in PHOTO_FOLDERS:
        for path in _images(root / "detection" / name):
            items.append(Item(path.relative_to(root).as_posix(), name, name, "", 0, True))
    for kind in sorted(p.name for p in (root / "real" / "extra").iterdir() if p.is_dir() and p.name != "aigen"):
        for path in _images(root / "real" / "extra" / kind):
            items.append(Item(path.relative_to(root).as_posix(), f"x_{_prefix(path)}", kind, "", 0, False))
    for path in _images(root / "cartoon" / "iiit_cfw"):
        items.append(Item(path.relative_to(root).as_posix(), "iiit_cfw", "iiit_cfw", "iiit_cfw", 1, False))
    for style in sorted(p for p in (root / "cartoon" / "dualstylegan").iterdir() if p.is_dir()):
        src = f"dsg_{style.name}"
        for path in _images(style):
            items.append(Item(path.relative_to(root).as_posix(), src, src, STYLE_GROUP[src], 1, False))
    for style in sorted(p for p in (root / "cartoon" / "extra").iterdir() if p.is_dir()):
        for path in _images(style):
            items.append(Item(path.relative_to(root).as_posix(), f"x_{_prefix(path)}", style.name, style.name, 1, False))
    return [it for it in items if it.rel not in EXCLUDE]


# ----------------------------------------------------------------------------------------------
# Augmentations (whole image, before analysis), sized relative to the face found in the original
# ----------------------------------------------------------------------------------------------


def _rng(rel: str, aug: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{rel}|{aug}".encode()))


def _gray(img: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


def _sepia(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Sepia toning in BGR order, blended with the original, and the faded contrast of old prints.
    m = np.array([[0.131, 0.534, 0.272], [0.168, 0.686, 0.349], [0.189, 0.769, 0.393]], np.float32)
    x = img.astype(np.float32)
    sep = x @ m.T
    a = rng.uniform(0.7, 1.0)
    out = a * sep + (1 - a) * x
    fade = rng.uniform(0.75, 0.95)
    out = out * fade + 255 * (1 - fade) * rng.uniform(0.3, 0.7)
    return np.clip(out, 0, 255).astype(np.uint8)


def _blur(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    sigma = max(0.6, face * rng.uniform(0.008, 0.025))
    return cv2.GaussianBlur(img, (0, 0), sigma)


def _lowres(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    f = min(1.0, rng.uniform(28, 56) / max(face, 1.0))
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    interp = cv2.INTER_CUBIC if rng.random() < 0.5 else cv2.INTER_LINEAR
    return cv2.resize(small, (w, h), interpolation=interp)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else img


def _old(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """An old black-and-white or sepia print: toned, faded, grainy, soft, compressed."""
    out = _gray(img) if rng.random() < 0.6 else _sepia(img, rng)
    x = out.astype(np.float32)
    x = x * rng.uniform(0.7, 0.9) + rng.uniform(10, 40)
    grain = rng.normal(0, rng.uniform(3, 9), size=x.shape[:2]).astype(np.float32)[..., None]
    out = np.clip(x + grain, 0, 255).astype(np.uint8)
    out = cv2.GaussianBlur(out, (0, 0), max(0.5, face * rng.uniform(0.004, 0.012)))
    return _jpeg(out, int(rng.integers(30, 60)))


def _film(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """A black-and-white film print, scanned: high contrast, visible grain, vignetting, dust and scratches.

    The counterpart of ``_old`` (faded, low contrast): B/W studio and press photos have deep blacks,
    hard highlights and grain that texture features could take for ink or pencil.
    """
    x = _gray(img) if rng.random() < 0.8 else _sepia(img, rng)
    x = x.astype(np.float32) / 255.0
    gain = rng.uniform(1.2, 2.0)  # S-curve around mid-grey
    x = 1.0 / (1.0 + np.exp(-gain * 4.0 * (x - rng.uniform(0.4, 0.6))))
    x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
    h, w = x.shape[:2]
    grain_px = max(1.0, face * rng.uniform(0.005, 0.02))  # grain a fixed fraction of the face
    grain = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), grain_px * 0.5)
    x = x + (grain / max(float(grain.std()), 1e-6) * rng.uniform(0.02, 0.07))[..., None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    x = x * (1.0 - rng.uniform(0.0, 0.35) * np.clip(r2, 0, 2) / 2)[..., None]
    out = np.clip(x * 255, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 6))):  # dust and scratches
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (p1[0] + int(rng.integers(-w // 4, w // 4 + 1)), p1[1] + int(rng.integers(-h // 3, h // 3 + 1)))
        tone = int(rng.choice([20, 235]))
        cv2.line(out, p1, p2, (tone, tone, tone), 1, cv2.LINE_AA)
    out = cv2.GaussianBlur(out, (0, 0), max(0.4, face * rng.uniform(0.002, 0.008)))
    return _jpeg(out, int(rng.integers(50, 90)))


def _sharp(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """A phone camera's processing: strong sharpening, then mild JPEG.

    Sharpened where the face is at most 160 px (about the scale the recognizer sees), then brought
    back to the original size, so that large photos get the same look as small ones.
    """
    h, w = img.shape[:2]
    f = min(1.0, 160.0 / max(face, 1.0))
    x = cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else img
    soft = cv2.GaussianBlur(x, (0, 0), max(0.8, face * f * 0.01))
    amount = rng.uniform(0.5, 1.2)
    x = cv2.addWeighted(x, 1 + amount, soft, -amount, 0)
    if f < 1:
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    return _jpeg(x, int(rng.integers(70, 92)))


def _up(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """A small image enlarged so that its face becomes 90-160 px (web copies of thumbnails)."""
    f = rng.uniform(90, 160) / max(face, 1.0)
    h, w = img.shape[:2]
    interp = cv2.INTER_CUBIC if rng.random() < 0.5 else cv2.INTER_LINEAR
    return cv2.resize(img, (round(w * f), round(h * f)), interpolation=interp)


def _work(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """The image resized so that its face is 110-200 px: stylization filters work at a fixed face scale."""
    f = rng.uniform(110, 200) / max(face, 1.0)
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC
    return cv2.resize(img, (max(8, round(w * f)), max(8, round(h * f))), interpolation=interp)


def _toon(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """Cartoon filter: repeated bilateral smoothing, posterized colours, dark ink edges."""
    x = _work(img, face, rng)
    for _ in range(int(rng.integers(2, 5))):
        x = cv2.bilateralFilter(x, 9, 40, 7)
    step = 256 // int(rng.integers(4, 9))
    x = ((x // step) * step + step // 2).astype(np.uint8)
    gray = cv2.medianBlur(cv2.cvtColor(x, cv2.COLOR_BGR2GRAY), 5)
    edges = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, int(rng.integers(3, 8)))
    return cv2.bitwise_and(x, x, mask=edges)


def _paint(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """OpenCV's watercolour-like stylization."""
    x = _work(img, face, rng)
    return cv2.stylization(x, sigma_s=float(rng.uniform(30, 80)), sigma_r=float(rng.uniform(0.3, 0.6)))


def _sketch(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """OpenCV's pencil sketch, grayscale or coloured."""
    x = _work(img, face, rng)
    gray, colour = cv2.pencilSketch(
        x, sigma_s=float(rng.uniform(30, 70)), sigma_r=float(rng.uniform(0.05, 0.12)),
        shade_factor=float(rng.uniform(0.02, 0.06)),
    )
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) if rng.random() < 0.6 else colour


def _oil(img: np.ndarray, face: float, rng: np.random.Generator) -> np.ndarray:
    """Kuwahara filter (each pixel takes the mean of its least varied quadrant): flat brush-stroke patches."""
    x = _work(img, face, rng).astype(np.float32)
    r = int(rng.integers(4, 8))
    m = cv2.blur(x, (r + 1, r + 1), borderType=cv2.BORDER_REFLECT)
    var = (cv2.blur(x * x, (r + 1, r + 1), borderType=cv2.BORDER_REFLECT) - m * m).sum(axis=2)
    h, w = var.shape
    M = cv2.copyMakeBorder(m, r, r, r, r, cv2.BORDER_REFLECT)
    V = cv2.copyMakeBorder(var, r, r, r, r, cv2.BORDER_REFLECT)
    o = (r + 1) // 2
    shifts = [(dy, dx) for dy in (-o, o) for dx in (-o, o)]
    means = np.stack([M[r + dy : r + dy + h, r + dx : r + dx + w] for dy, dx in shifts])
    best = np.argmin(np.stack([V[r + dy : r + dy + h, r + dx : r + dx + w] for dy, dx in shifts]), axis=0)
    out = np.take_along_axis(means, best[None, ..., None].repeat(3, axis=-1), axis=0)[0]
    return np.clip(out, 0, 255).astype(np.uint8)


def augment(img: np.ndarray, aug: str, face: float, rel: str, label: int) -> np.ndarray:
    """``img`` (BGR) under augmentation ``aug``; ``face`` is the face side in pixels in the original."""
    rng = _rng(rel, aug)
    if aug == "orig":
        return img
    if aug == "gray":
        return _gray(img)
    if aug == "sepia":
        return _sepia(img, rng)
    if aug == "blur":
        return _blur(img, face, rng)
    if aug == "lowres":
        return _lowres(img, face, rng)
    if aug == "jpeg":  # strong for photos; cartoons get milder compression (web copies of drawings)
        return _jpeg(img, int(rng.integers(8, 21) if label == 0 else rng.integers(15, 41)))
    if aug == "old":
        return _old(img, face, rng)
    if aug == "film":
        return _film(img, face, rng)
    if aug == "up":
        return _up(img, face, rng)
    if aug == "sharp":
        return _sharp(img, face, rng)
    if aug in SYNTH_AUGS:
        return {"toon": _toon, "paint": _paint, "sketch": _sketch, "oil": _oil}[aug](img, face, rng)
    raise ValueError(aug)


def wanted_augs(item: Item, ref: float) -> tuple[str, ...]:
    """Augmentations of an item; ``up`` only for single-face images whose face is under UP_BELOW px."""
    return tuple(a for a in item.augs if a != "up" or (not item.multi and ref < UP_BELOW))


def reference_size(faces, img: np.ndarray) -> float:
    """Face side that sizes the augmentations: median of the usable faces, else the largest, else half the image."""
    sizes = [max(f.face_size) for f in faces if min(f.face_size) >= REF_MIN_FACE] or [max(f.face_size) for f in faces[:1]]
    return float(np.median(sizes)) if sizes else min(img.shape[:2]) / 2


# ----------------------------------------------------------------------------------------------
# Feature extraction through the library's own FaceAnalyzer, cached per (image, augmentation)
# ----------------------------------------------------------------------------------------------


def tap_channels(model_path: Path, taps: tuple[str, ...]) -> dict[str, int]:
    """Channel count of each tapped tensor, from ONNX shape inference."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    dims = {v.name: v.type.tensor_type.shape.dim for v in model.graph.value_info}
    return {t: int(dims[t][1].dim_value) for t in taps}


def _slice_texture(tex: np.ndarray, have: list[str], channels: dict[str, int], want: tuple[str, ...]) -> np.ndarray:
    """Columns of ``want`` taps from a texture matrix laid out as TAP_STATS per tap of ``have``."""
    n = len(TAP_STATS)
    offsets, pos = {}, 0
    for t in have:
        offsets[t] = pos
        pos += n * channels[t]
    cols = [np.arange(offsets[t], offsets[t] + n * channels[t]) for t in want]
    return tex[:, np.concatenate(cols)] if cols else tex[:, :0]


_VIEW_KEYS = ("view_rel", "view_aug", "view_size", "view_ref", "view_padded")
_FACE_KEYS = ("face_view", "emb", "tex", "det", "norm", "size", "kps", "crop", "wide")
CHECKPOINT = 800  # images between two writes of the cache, so an interrupted extraction keeps its work
CROP = 112  # side of the recognizer's aligned crop, cached so that new tap statistics need no new detection


def _empty_cache(tex_dim: int) -> dict:
    return {
        "view_rel": np.zeros(0, "U1"), "view_aug": np.zeros(0, "U1"), "view_size": np.zeros(0, np.int32),
        "view_ref": np.zeros(0, np.float32), "view_padded": np.zeros(0, bool), "face_view": np.zeros(0, np.int32),
        "emb": np.zeros((0, 512), np.float32), "tex": np.zeros((0, tex_dim), np.float32),
        "det": np.zeros(0, np.float32), "norm": np.zeros(0, np.float32), "size": np.zeros(0, np.int32),
        "kps": np.zeros((0, 5, 2), np.float32), "crop": np.zeros((0, CROP, CROP, 3), np.uint8),
        "wide": np.zeros((0, WIDE_SIDE, WIDE_SIDE, 3), np.uint8),
    }


def _cache_key(settings, sha: str) -> str:
    # Settings that change what is detected; ``workers`` only changes how many images run at once.
    detection = settings.detection.model_dump(mode="json", exclude={"workers"})
    blob = json.dumps([sha, AUG_VERSION, CACHE_MIN_FACE, REF_MIN_FACE, UP_BELOW, detection])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def face_region(img: np.ndarray, res: ImageAnalysis, margin: float = 1.5) -> tuple[np.ndarray, ImageAnalysis]:
    """The image cut to its largest face plus ``margin`` face sides around it, and that face in the cut's
    coordinates: the augmentations of a single-face image only need the face's surroundings, and the
    stylization filters cost seconds on a whole 800 px photo."""
    if not res.faces:
        return img, res
    face = res.faces[0]
    x1, y1, x2, y2 = face.bbox[:4]
    m = margin * max(x2 - x1, y2 - y1)
    h, w = img.shape[:2]
    x0, y0 = int(max(0, x1 - m)), int(max(0, y1 - m))
    x3, y3 = int(min(w, x2 + m)), int(min(h, y2 + m))
    shift = np.array([x0, y0], np.float32)
    moved = DetectedFace(bbox=face.bbox - np.tile(shift, 2), kps=face.kps - shift, det_score=face.det_score)
    return img[y0:y3, x0:x3], ImageAnalysis(width=x3 - x0, height=y3 - y0, faces=[moved], padded=res.padded)


def embed_at(analyzer: FaceAnalyzer, views: list[np.ndarray], found: list[tuple[tuple, ImageAnalysis]]) -> list[ImageAnalysis]:
    """Faces of augmented views at the places found in their original: every augmentation keeps the
    geometry up to a uniform resize, so detection runs once per image and only the recognizer runs per
    view (about 2.5x faster). Scores are the original's; embedding and texture are the view's own.
    Views of an original without a face (an enlarged copy of a tiny tile may show one) are detected."""
    results, located = [], []
    lost = [i for i, (_, res) in enumerate(found) if not res.faces]
    detected = dict(zip(lost, analyzer.analyze_loaded([views[i] for i in lost])))
    for i, (view, (shape, res)) in enumerate(zip(views, found)):
        if i in detected:
            results.append(detected[i])
            continue
        sx, sy = view.shape[1] / shape[1], view.shape[0] / shape[0]
        faces = [DetectedFace(bbox=f.bbox * np.array([sx, sy, sx, sy], np.float32), kps=f.kps * np.array([sx, sy], np.float32),
                              det_score=f.det_score) for f in res.faces]
        results.append(ImageAnalysis(width=view.shape[1], height=view.shape[0], faces=faces, padded=res.padded))
        located.append((view, faces))
    analyzer.embed_faces(located)
    return results


def extract(items: list[Item], root: Path, taps: tuple[str, ...], use_cache: bool, cache_dir: Path = CACHE_DIR,
            backbone: Path | None = None, log=print) -> dict:
    """Features of every face of every augmented view of ``items``, computed by ``FaceAnalyzer``.

    Results are cached in ``data/cache/cartoon_features_<key>_<taps>.npz`` per (image path,
    augmentation); a cache holding a superset of ``taps`` serves too (columns sliced), a cache of other
    taps gives its faces and aligned crops (only the tap statistics are recomputed, into a cache of
    their own), and only views missing from the cache are computed. Returns arrays over views
    (``view_item``, ``view_aug`` (name), ``view_size``: min side of the largest face, 0 when none) and
    over faces (>= CACHE_MIN_FACE; the largest only unless the item is a group photo: ``face_view``,
    ``emb`` (normalized), ``tex``, ``det``, ``norm``, ``size``), plus ``sha``. With ``backbone`` (an
    ONNX file of ``export_backbone``), ``style`` holds its features of every face's aligned and wide
    crops, cached apart per backbone file (``cartoon_backbone_<key>_<sha>.npz``).
    """
    settings = load_settings()
    pack = resolve_pack(settings.models)
    sha = pack.recognizer_sha256
    key = _cache_key(settings, sha)
    cache_taps, cache, path, cache_stats = tuple(taps), None, None, ()
    own_path = cache_dir / f"cartoon_features_{key}_{hashlib.sha256(','.join(taps).encode()).hexdigest()[:8]}.npz"
    if use_cache:
        best = None  # a cache holding the taps, else any cache of these faces (it has their crops)
        for cand in sorted(cache_dir.glob(f"cartoon_features_{key}_*.npz")):
            if cand.name.endswith(".partial.npz"):  # left by an interrupted write
                continue
            with np.load(cand, allow_pickle=False) as data:  # reads only the small meta entry
                meta = json.loads(str(data["meta"]))
            if set(taps) <= set(meta["taps"]):
                best = (cand, meta)
                break
            best = best or (cand, meta)
        if best is not None:
            path, meta = best
            with np.load(path, allow_pickle=False) as data:
                cache = {k: data[k] for k in _VIEW_KEYS + _FACE_KEYS}
            cache_taps, cache_stats = tuple(meta["taps"]), tuple(meta.get("tap_stats", ()))
            if not set(taps) <= set(cache_taps):
                # Same faces, other taps: their statistics come from the cached crops, into a cache of their own.
                cache_taps, path, cache_stats = tuple(taps), own_path, ()
    channels = tap_channels(pack.recognizer, cache_taps)
    analyzer = None
    refresh = cache is not None and cache_stats != TAP_STATS
    if cache is None:
        cache = _empty_cache(len(TAP_STATS) * sum(channels.values()))
        path = own_path
    elif refresh:
        # The recognizer's statistics (or the taps) changed, not the faces: rerun it on the cached aligned
        # crops (what FaceAnalyzer feeds it at run time) instead of detecting everything again.
        log(f"features: recomputing tap statistics of {len(cache['crop'])} cached face crops")
        analyzer = FaceAnalyzer(settings, taps=cache_taps, texture_model=sha)
        recognizer = analyzer.texture_recognizer or analyzer.recognizer
        cache["tex"] = np.concatenate(
            [recognizer.predict(list(cache["crop"][i : i + 256]))[1] for i in range(0, len(cache["crop"]), 256)]
        )
    index = {(r, a): i for i, (r, a) in enumerate(zip(cache["view_rel"], cache["view_aug"]))}
    new_views: dict[str, list] = {k: [] for k in _VIEW_KEYS}
    new_faces: dict[str, list] = {k: [] for k in _FACE_KEYS}

    def add_view(it: Item, aug: str, res, ref: float, img: np.ndarray) -> None:
        v = len(cache["view_rel"]) + len(new_views["view_rel"])
        index[(it.rel, aug)] = v
        for k, val in zip(_VIEW_KEYS, (it.rel, aug, min(res.faces[0].face_size) if res.faces else 0, ref, res.padded)):
            new_views[k].append(val)
        for f in res.faces if it.multi else res.faces[:1]:
            if min(f.face_size) < CACHE_MIN_FACE:
                continue
            for k, val in zip(_FACE_KEYS, (v, f.normed_embedding, f.texture, f.det_score, f.embedding_norm,
                                          min(f.face_size), f.kps, analyzer.recognizer.align(img, f.kps),
                                          align_wide(img, f.kps))):
                new_faces[k].append(val)

    def ref_of(it: Item) -> float:
        v = index.get((it.rel, "orig"))
        if v is None:
            return float("nan")
        return float(cache["view_ref"][v] if v < len(cache["view_ref"]) else new_views["view_ref"][v - len(cache["view_ref"])])

    def save() -> None:
        """Move the new views and faces into the cache and write it (also every CHECKPOINT images)."""
        for k in _VIEW_KEYS:
            if cache[k].dtype.kind == "U":  # let numpy widen the strings: never truncate a path
                cache[k] = np.array([*cache[k].tolist(), *new_views[k]], dtype=str)
            else:
                cache[k] = np.concatenate([cache[k], np.array(new_views[k], cache[k].dtype)])
            new_views[k].clear()
        for k in _FACE_KEYS:
            arr = np.array(new_faces[k], cache[k].dtype)
            cache[k] = np.concatenate([cache[k], arr.reshape((-1,) + cache[k].shape[1:])])
            new_faces[k].clear()
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {"taps": list(cache_taps), "tap_stats": list(TAP_STATS), "channels": channels, "recognizer_sha256": sha}
        tmp = path.with_name(path.stem + ".partial.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **cache)
        tmp.replace(path)

    todo = [it for it in items if (it.rel, "orig") not in index or np.isnan(ref_of(it))
            or any((it.rel, a) not in index for a in wanted_augs(it, ref_of(it)))]
    # In a fixed shuffled order, so that a partial cache (checkpoint) already holds every kind of image.
    todo.sort(key=lambda it: zlib.crc32(it.rel.encode()))
    if todo:
        log(f"features: computing {len(todo)} of {len(items)} images with taps {','.join(cache_taps)}")
        analyzer = analyzer or FaceAnalyzer(settings, taps=cache_taps, texture_model=sha)
    t0, batch = time.time(), 16
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        imgs = [load_image(root / it.rel, max_pixels=settings.images.max_pixels) for it in chunk]
        refs = []
        orig = analyzer.analyze_loaded(imgs)
        for it, img, res in zip(chunk, imgs, orig):
            refs.append(reference_size(res.faces, img))
            if (it.rel, "orig") not in index:
                add_view(it, "orig", res, refs[-1], img)
            elif np.isnan(ref_of(it)):
                cache["view_ref"][index[(it.rel, "orig")]] = refs[-1]
        bases = [face_region(img, res) if not it.multi else (img, res) for it, img, res in zip(chunk, imgs, orig)]
        jobs = [(it, img, res, a, ref) for it, (img, res), ref in zip(chunk, bases, refs)
                for a in wanted_augs(it, ref) if a != "orig" and (it.rel, a) not in index]
        views = [augment(img, a, ref, it.rel, it.label) for it, img, _, a, ref in jobs]
        results = embed_at(analyzer, views, [(img.shape, res) for _, img, res, _, _ in jobs])
        for (it, _, _, a, ref), res, view in zip(jobs, results, views):
            add_view(it, a, res, ref, view)
        done = start + len(chunk)
        if done % CHECKPOINT == 0:
            save()
        if done % (batch * 10) == 0 or done == len(todo):
            el = time.time() - t0
            log(f"  features: {done}/{len(todo)} images, {len(cache['face_view']) + len(new_faces['face_view'])} faces, {el:.0f}s "
                f"(~{el / done * (len(todo) - done):.0f}s left)")
    if todo or refresh:
        save()
        log(f"features: {len(todo)} images ({'and tap statistics of every cached crop, ' if refresh else ''}"
            f"{time.time() - t0:.0f}s), cached in {path}")
    else:
        log(f"features: all from cache {path}")

    # The views of ``items``, in order, and their faces.
    sel, v_item, v_aug = [], [], []
    for i, it in enumerate(items):
        for a in wanted_augs(it, ref_of(it)):
            sel.append(index[(it.rel, a)])
            v_item.append(i)
            v_aug.append(a)
    sel = np.array(sel)
    remap = np.full(len(cache["view_rel"]), -1)
    remap[sel] = np.arange(len(sel))
    fmask = remap[cache["face_view"]] >= 0
    out = {
        "view_item": np.array(v_item, np.int32),
        "view_aug": np.array(v_aug),
        "view_size": cache["view_size"][sel],
        "view_padded": cache["view_padded"][sel],
        "face_view": remap[cache["face_view"][fmask]],
        "emb": cache["emb"][fmask],
        "tex": _slice_texture(cache["tex"][fmask], list(cache_taps), channels, tuple(taps)),
        "det": cache["det"][fmask],
        "norm": cache["norm"][fmask],
        "size": cache["size"][fmask],
        "kps": cache["kps"][fmask],
        "crop": cache["crop"][fmask],
        "sha": sha,
    }
    if backbone is not None:
        style, out["backbone_sha"] = backbone_features(cache, key, backbone, settings, cache_dir, log)
        out["style"] = style[fmask]
    return out


def backbone_features(cache: dict, key: str, backbone: Path, settings, cache_dir: Path, log=print) -> tuple[np.ndarray, str]:
    """The backbone's features of every cached face (aligned crop, then wide crop), as ``ImageBackbone``
    computes them at run time; cached per backbone file, so that every fold and variant reuses them."""
    model = ImageBackbone(backbone, settings.models)
    sha = model.sha256
    path = cache_dir / f"cartoon_backbone_{key}_{sha[:12]}.npz"
    n = len(cache["crop"])
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if len(data["style"]) == n:
                log(f"backbone features: from cache {path}")
                return data["style"], sha
    t0, rows = time.time(), []
    for start in range(0, n, 512):
        rows.append(model.face_features(list(cache["crop"][start : start + 512]), list(cache["wide"][start : start + 512])))
        log(f"  backbone features: {start + len(rows[-1])}/{n} faces, {time.time() - t0:.0f}s")
    style = np.concatenate(rows)
    tmp = path.with_name(path.stem + ".partial.npz")
    np.savez(tmp, style=style)
    tmp.replace(path)
    log(f"backbone features: {n} faces ({time.time() - t0:.0f}s, {(time.time() - t0) / max(n, 1) * 1000:.1f} ms per face), cached in {path}")
    return style, sha


# ----------------------------------------------------------------------------------------------
# Models: standardize -> optional PCA -> logistic regression or small MLP, exported as numpy layers
# ----------------------------------------------------------------------------------------------


def _logreg(Z: np.ndarray, y: np.ndarray, w: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """L2-regularized weighted logistic regression, the objective of scikit-learn's (C * sum w_i loss_i +
    |coef|^2 / 2, intercept free), solved by full-batch L-BFGS in torch: about 10x faster than
    scikit-learn's solver here, which matters with the hundred fits of the held-out protocol."""
    import torch

    X = torch.from_numpy(np.ascontiguousarray(Z, np.float32))
    t = torch.from_numpy(y.astype(np.float32))
    sw = torch.from_numpy((w / len(w)).astype(np.float32))
    coef = torch.zeros(X.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    # Gradient tolerance 1e-5, at most 300 iterations: the same procedure for every fit (held-out and
    # shipped), a few seconds each for 22 000 faces.
    opt = torch.optim.LBFGS([coef, bias], lr=1, max_iter=300, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")
    reg = 0.5 / (C * len(w))

    def closure():
        opt.zero_grad()
        loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(X @ coef + bias, t, reduction="none")).sum()
        loss = loss + reg * (coef @ coef)
        loss.backward()
        return loss

    opt.step(closure)
    return coef.detach().numpy().astype(np.float64), float(bias.item())


def fit_classifier(X: np.ndarray, y: np.ndarray, w: np.ndarray, spec: dict, sha: str, taps,
                   backbone_sha: str | None = None, n_style: int = 0) -> CartoonClassifier:
    """Train one model described by ``spec`` and return it as the runtime :class:`CartoonClassifier`.

    ``spec``: ``{"kind": "logreg", "C": ...}`` or ``{"kind": "mlp", "hidden": (..), "alpha": ..}``,
    plus ``"pca": k`` (0 = none) and ``"style_weight"``: the last ``n_style`` columns (the image
    backbone's) multiplied by it after standardization, a stronger L2 prior on them when under 1 (folded
    into the saved ``scale``, so the run time needs nothing more). Sample weights ``w`` carry the class balance.
    """
    from sklearn.decomposition import PCA
    from sklearn.neural_network import MLPClassifier

    full_dim = X.shape[1]
    cols = np.arange(full_dim) if spec.get("use_emb", True) else np.arange(EMB_DIM, full_dim)
    # float32 throughout, statistics accumulated in float64: with the backbone's columns the rows of one
    # fit take 1.3 GB in float32, and the two protocols fit side by side on a shared machine.
    X = np.asarray(X if len(cols) == full_dim else X[:, cols], np.float32)
    mean = X.mean(axis=0, dtype=np.float64)
    Z = X - mean.astype(np.float32)
    sq = sum(np.einsum("ij,ij->j", Z[i : i + 1024], Z[i : i + 1024], dtype=np.float64) for i in range(0, len(Z), 1024))
    scale = np.sqrt(sq / len(Z))
    scale = np.where(scale < 1e-6, 1.0, scale)
    if n_style:
        scale[-n_style:] /= spec.get("style_weight", 1.0)
    Z /= scale.astype(np.float32)
    proj = None
    if spec.get("pca"):
        pca = PCA(n_components=spec["pca"], random_state=SEED, svd_solver="full").fit(Z)
        proj = pca.components_.T / np.sqrt(pca.explained_variance_) if spec.get("whiten") else pca.components_.T
        mean = mean + pca.mean_ * scale  # fold PCA centring into the standardization (it is ~0 anyway)
        Z = (X - mean) / scale @ proj
    w = w * (len(w) / w.sum())
    if spec["kind"] == "logreg":
        coef, intercept = _logreg(Z, y, w, spec["C"])
        weights, biases = [coef[:, None]], [np.array([intercept])]
    else:
        model = MLPClassifier(
            hidden_layer_sizes=tuple(spec["hidden"]),
            alpha=spec["alpha"],
            max_iter=spec.get("epochs", 200),
            batch_size=256,
            learning_rate_init=1e-3,
            early_stopping=False,
            random_state=SEED,
        )
        model.fit(Z, y, sample_weight=w)
        weights, biases = [c.copy() for c in model.coefs_], [b.copy() for b in model.intercepts_]
    if len(cols) < full_dim:  # unused columns: standardized to 0 and given zero weight
        m, sc = np.zeros(full_dim), np.ones(full_dim)
        m[cols], sc[cols] = mean, scale
        mean, scale = m, sc
        first = np.zeros((full_dim, (proj if proj is not None else weights[0]).shape[1]))
        first[cols] = proj if proj is not None else weights[0]
        if proj is not None:
            proj = first
        else:
            weights[0] = first
    return CartoonClassifier(
        recognizer_sha256=sha,
        taps=tuple(taps),
        backbone_sha256=backbone_sha,
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        proj=None if proj is None else proj.astype(np.float32),
        weights=[a.astype(np.float32) for a in weights],
        biases=[a.astype(np.float32) for a in biases],
        threshold=0.5,
    )


# ----------------------------------------------------------------------------------------------
# Data set of faces, splits, evaluation
# ----------------------------------------------------------------------------------------------

SEED = 0
K_FOLDS = 6
STYLE_FOLDS = 3  # groups of source folds in the leave-one-style-out protocol (fits: styles x STYLE_FOLDS)
COLOUR_QUANTILE = 0.9925  # at most 0.75% of held-out real colour faces above the threshold
GRAY_QUANTILE = 0.985  # and at most 1.5% of their grayscale copies
QUANTILES = {"colour": COLOUR_QUANTILE, "gray": GRAY_QUANTILE}  # as set by --quantiles
CURVE_QUANTILES = (0.98, 0.985, 0.99, 0.9925, 0.995, 0.9975, 0.999)  # threshold curve of the report


@dataclass
class Faces:
    """Every face with its features and labels (index-aligned arrays)."""

    X: np.ndarray
    y: np.ndarray
    item: np.ndarray
    aug: np.ndarray  # augmentation name per face
    source: np.ndarray  # held out together; filtered copies keep the source of their photo
    kind: np.ndarray  # reporting row and weighting group (``synth_<filter>`` for filtered copies)
    style: np.ndarray  # held-out style group of a non-photo, "" otherwise
    fold: np.ndarray  # source fold
    sha: str
    backbone_sha: str | None = None  # the image backbone whose features end the rows, if any
    n_style: int = 0  # how many columns at the end are the backbone's


def source_folds(items: list[Item], k: int) -> dict[str, int]:
    """Every source in one of ``k`` folds: largest first, each to the fold holding the fewest images of
    its label, so that every fold holds out real and non-photo sources of similar total size."""
    sizes: dict[tuple[str, int], int] = {}
    for it in items:
        sizes[(it.source, it.label)] = sizes.get((it.source, it.label), 0) + 1
    load = np.zeros((k, 2))
    out: dict[str, int] = {}
    for (src, label), n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        if src not in out:
            out[src] = int(np.argmin(load[:, label] + 1e-3 * np.arange(k)))
        load[out[src], label] += n
    return out


def build_faces(items: list[Item], data: dict, min_face: int, k: int = K_FOLDS, synth: bool = True) -> Faces:
    """Faces of the extracted views with labels, sources, reporting rows and source folds.

    Filtered copies of real photos (SYNTH_AUGS) are non-photos of kind ``synth_<filter>``; they keep
    the source of their photo, so they are held out with it.
    """
    fv = data["face_view"]
    keep = data["size"] >= min_face
    if not synth:
        keep &= ~np.isin(data["view_aug"][fv], SYNTH_AUGS)
    fv = fv[keep]
    item = data["view_item"][fv]
    aug = data["view_aug"][fv]
    is_synth = np.isin(aug, SYNTH_AUGS)
    source = np.array([items[i].source for i in item])
    kind = np.array([items[i].kind for i in item], dtype=object)
    kind[is_synth] = np.char.add("synth_", aug[is_synth].astype(str))
    style = np.array([items[i].style for i in item])
    fold_of = source_folds(items, k)
    fold = np.array([fold_of[s] for s in source])
    X = CartoonClassifier.features(data["emb"][keep], data["tex"][keep], data["style"][keep] if "style" in data else None)
    y = np.array([items[i].label for i in item]) | is_synth
    return Faces(X, y.astype(int), item, aug, source, kind.astype(str), style, fold, data["sha"], data.get("backbone_sha"),
                 data["style"].shape[1] if "style" in data else 0)


def sample_weights(f: Faces, mask: np.ndarray) -> np.ndarray:
    """Class-balanced weights: both classes weigh the same in total; within each class, every kind too
    (so 400 IMFDB crops do not drown 17 ageitgey photos, nor 672 IIIT-CFW drawings the 56 sketches),
    with the square root of its size to keep large kinds somewhat heavier. Augmentations in
    ``AUG_WEIGHT`` then count that fraction of a face."""
    w = np.zeros(len(f.y))
    for label in (0, 1):
        sel = mask & (f.y == label)
        kinds, counts = np.unique(f.kind[sel], return_counts=True)
        per = {s: np.sqrt(c) / c for s, c in zip(kinds, counts)}
        w[sel] = [per[s] for s in f.kind[sel]]
        w[sel] /= w[sel].sum()
    return w[mask] * np.array([AUG_WEIGHT.get(a, 1.0) for a in f.aug[mask]])


def calibrate(real_probs: np.ndarray, real_aug: np.ndarray, quantiles: dict | None = None) -> float:
    """Threshold from held-out real probabilities: the colour quantile of the original views and the
    gray quantile of their grayscale copies, whichever is higher."""
    q = quantiles or QUANTILES
    col = real_probs[real_aug == "orig"]
    gray = real_probs[real_aug == "gray"]
    return float(max(np.quantile(col, q["colour"]), np.quantile(gray, q["gray"])))


def fit_on(f: Faces, mask: np.ndarray, spec: dict, taps) -> CartoonClassifier:
    if spec.get("drop_augs"):  # ablation: train without some augmentations
        mask = mask & ~np.isin(f.aug, spec["drop_augs"])
    return fit_classifier(f.X[mask], f.y[mask], sample_weights(f, mask), spec, f.sha, taps, f.backbone_sha, f.n_style)


@dataclass
class HeldOut:
    """Probabilities of every face from the model trained without its source fold, and how each fold's
    threshold is set without it."""

    prob: np.ndarray  # [faces]: from the model of the face's own fold
    inner: list  # per fold j: (face indices of the real faces outside j, their probabilities from the
    #              model trained without j and their own fold): the threshold of fold j comes from these

    def thresholds(self, f: Faces, quantiles: dict | None = None) -> np.ndarray:
        """Threshold of each fold, calibrated on real faces it never saw, scored by models that never saw them."""
        return np.array([calibrate(p, f.aug[idx], quantiles) for idx, p in self.inner])


def source_protocol(f: Faces, spec: dict, taps, log=print, quick: bool = False) -> HeldOut:
    """Leave-one-source-fold-out: model m_j trained without fold j scores fold j; its threshold is
    calibrated on the real faces of every other fold i, scored by m_ij, trained without i and j.
    K + K(K-1)/2 fits; nothing of fold j touches its model or its threshold.

    ``quick``: K fits only; fold j's threshold comes from the real faces of the other folds scored by
    their own fold models m_i, which never saw those faces but did see fold j's (a comparison of
    features on a loaded machine, not the shipped protocol)."""
    k = int(f.fold.max()) + 1
    prob = np.full(len(f.y), np.nan)
    real = f.y == 0
    pair_prob: dict[tuple[int, int], np.ndarray] = {}
    for j in range(k):
        m = fit_on(f, f.fold != j, spec, taps)
        prob[f.fold == j] = m.predict_proba(f.X[f.fold == j])
        log(f"  [{spec_name(spec)}] source fold {j}: {sorted(set(f.source[f.fold == j]))}")
    if quick:
        return HeldOut(prob, [(idx, prob[idx]) for idx in (np.flatnonzero(real & (f.fold != j)) for j in range(k))])
    for i in range(k):
        for j in range(i + 1, k):
            m = fit_on(f, (f.fold != i) & (f.fold != j), spec, taps)
            for a, b in ((i, j), (j, i)):
                sel = real & (f.fold == a)
                pair_prob[(a, b)] = m.predict_proba(f.X[sel])  # fold a's real faces, by the model without a and b
    inner = []
    for j in range(k):
        others = [i for i in range(k) if i != j]
        idx = np.concatenate([np.flatnonzero(real & (f.fold == i)) for i in others])
        p = np.concatenate([pair_prob[(i, j)] for i in others])
        inner.append((idx, p))
    return HeldOut(prob, inner)


def style_protocol(f: Faces, spec: dict, taps, log=print) -> dict[str, dict]:
    """Leave-one-style-out: for every style group s, STYLE_FOLDS models each trained without s and
    without one group j of source folds; the real faces of group j are scored by the model without j,
    and their out-of-fold probabilities calibrate the threshold of style s. The faces of s are scored
    by every one of the models."""
    k = STYLE_FOLDS
    fold = f.fold * k // (int(f.fold.max()) + 1)  # source folds merged into k groups
    real = f.y == 0
    out = {}
    for style in sorted({s for s in f.style if s}):
        exclude = f.style == style
        oof = np.full(len(f.y), np.nan)
        p_style = []
        for j in range(k):
            m = fit_on(f, (fold != j) & ~exclude, spec, taps)
            sel = real & (fold == j)
            oof[sel] = m.predict_proba(f.X[sel])
            p_style.append(m.predict_proba(f.X[exclude]))
        t = calibrate(oof[real], f.aug[real])
        caught = (np.array(p_style) >= t).mean(axis=0)  # per face, fraction of the k models that catch it
        out[style] = {"threshold": t, "caught": caught, "mask": exclude}
        log(f"  [{spec_name(spec)}] style {style} held out: threshold {t:.4f}, recall on faces "
            f"{float(caught[f.aug[exclude] == 'orig'].mean()):.2%}")
    return out


def spec_name(spec: dict) -> str:
    if spec["kind"] == "logreg":
        s = f"logreg C={spec['C']:g}"
    else:
        s = f"mlp {'x'.join(map(str, spec['hidden']))} a={spec['alpha']:g}"
    s += f" pca{spec['pca']}" if spec.get("pca") else ""
    s += "" if spec.get("use_emb", True) else " texture-only"
    s += f" backbone x{spec['style_weight']:g}" if spec.get("style_weight", 1.0) != 1.0 else ""
    return s + (f" without {'+'.join(spec['drop_augs'])}" if spec.get("drop_augs") else "")


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

# Target share caught per style group (issue 18); IIIT-CFW mixes caricatures, cartoons and sketches.
TARGETS = {"anime": 0.98, "cartoon": 0.98, "illustration": 0.98, "render3d": 0.90, "painting": 0.90,
           "sketch": 0.85, "caricature": 0.85, "iiit_cfw": 0.85}


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


def _images_per(items: list[Item], key) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        if key(it) is not None:
            out[key(it)] = out.get(key(it), 0) + 1
    return out


def caught_rows(f: Faces, items: list[Item], caught: np.ndarray, mask: np.ndarray, key) -> dict[str, dict]:
    """Per row (``key(item)``) of non-photo images: images, images without a usable face (rejected by
    ``filter_image`` anyway), share caught counting those, faces and recall on the faces.
    ``caught`` is indexed like the faces; only the original views of ``mask`` count."""
    n_images = _images_per(items, lambda it: key(it) if it.label else None)
    rows = {}
    orig = mask & (f.aug == "orig") & (f.y == 1) & ~np.char.startswith(f.kind, "synth_")
    row_of_face = np.array([key(items[i]) for i in f.item])
    for row in sorted(n_images):
        sel = orig & (row_of_face == row)
        if not mask[np.isin(f.item, [i for i, it in enumerate(items) if it.label and key(it) == row])].any():
            continue
        n, faces = n_images[row], int(sel.sum())
        got = float(caught[sel].sum())
        rows[row] = {"images": n, "no_face": n - faces, "caught": (n - faces + got) / max(n, 1), "faces": faces,
                     "recall": got / faces if faces else float("nan")}
    return rows


def real_rows(f: Faces, items: list[Item], called: np.ndarray, key) -> dict[str, dict]:
    """Per row of real photos: faces (original views) called cartoon, and their grayscale copies."""
    rows = {}
    real = (f.y == 0)
    row_of_face = np.array([key(items[i]) for i in f.item])
    for row in list(dict.fromkeys(row_of_face[real])) + ["all"]:
        sel = real & ((row_of_face == row) if row != "all" else True)
        o, g = sel & (f.aug == "orig"), sel & (f.aug == "gray")
        rows[row] = {"faces": int(o.sum()), "called": float(called[o].mean()) if o.any() else float("nan"),
                     "gray": float(called[g].mean()) if g.any() else float("nan")}
    return rows


def markdown_caught(rows: dict, head: str, targets: dict | None = None) -> str:
    lines = [f"| {head} | images | no usable face | caught incl. no-face | faces | recall on faces |"
             + (" target |" if targets else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if targets else "")]
    for name, r in rows.items():
        tgt = f" >= {targets[name]:.0%} |" if targets and name in targets else (" - |" if targets else "")
        lines.append(f"| {name} | {r['images']} | {r['no_face']} | {_pct(r['caught'])} | {r['faces']} | "
                     f"{_pct(r['recall'])} |" + tgt)
    return "\n".join(lines)


def markdown_real(rows: dict, head: str) -> str:
    lines = [f"| {head} | faces | called cartoon | grayscale copy |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['faces']} | {_pct(r['called'])} | {_pct(r['gray'])} |")
    return "\n".join(lines)


def style_key(it: Item) -> str:
    return it.style


def real_key(it: Item) -> str:
    return it.kind


def source_key(it: Item) -> str:
    return it.source.removeprefix("x_")


def folder_key(it: Item) -> str:
    return it.kind if it.kind.startswith(("dsg_", "iiit")) else f"extra/{it.kind}"


def report(f: Faces, items: list[Item], held: HeldOut, styles: dict | None, log=print) -> dict:
    """Print every table of the held-out protocols; returns them as plain data for the artifact's info."""
    thr = held.thresholds(f)
    called = held.prob >= thr[f.fold]
    out = {"fold_thresholds": thr.tolist(), "real_kind": real_rows(f, items, called, real_key),
           "real_source": real_rows(f, items, called, source_key),
           "style": caught_rows(f, items, called.astype(float), np.ones(len(f.y), bool), style_key),
           "folder": caught_rows(f, items, called.astype(float), np.ones(len(f.y), bool), folder_key),
           "cartoon_source": caught_rows(f, items, called.astype(float), np.ones(len(f.y), bool), source_key)}
    log("\nLeave-one-source-out (grouped by source into "
        f"{len(thr)} folds; thresholds {', '.join(f'{t:.4f}' for t in thr)}):\n")
    log("Real photos called cartoon, per kind:\n\n" + markdown_real(out["real_kind"], "real kind"))
    log("\nReal photos called cartoon, per source:\n\n" + markdown_real(out["real_source"], "real source"))
    log("\nNon-photos caught, per style group:\n\n" + markdown_caught(out["style"], "style", TARGETS))
    log("\nNon-photos caught, per folder:\n\n" + markdown_caught(out["folder"], "folder"))
    log("\nNon-photos caught, per source:\n\n" + markdown_caught(out["cartoon_source"], "source"))
    real_orig = np.flatnonzero((f.y == 0) & (f.aug == "orig"))
    worst = real_orig[np.argsort(-(held.prob - thr[f.fold])[real_orig])[:12]]
    out["hardest_real"] = [{"file": items[f.item[i]].rel, "p": float(held.prob[i]), "threshold": float(thr[f.fold[i]])}
                           for i in worst]
    log("\nReal faces closest to (or over) their fold's threshold:\n\n" + "\n".join(
        f"  {r['file']}: p {r['p']:.4f}, threshold {r['threshold']:.4f}" for r in out["hardest_real"]))
    curve = []
    for q in CURVE_QUANTILES:
        qs = {"colour": q, "gray": 1 - 2 * (1 - q)}
        t = held.thresholds(f, qs)
        c = held.prob >= t[f.fold]
        rr = real_rows(f, items, c, real_key)
        cr = caught_rows(f, items, c.astype(float), np.ones(len(f.y), bool), style_key)
        curve.append({"quantile": q, "real": rr["all"]["called"], "worst_kind": max(
            (r["called"], k) for k, r in rr.items() if k != "all" and r["faces"] >= 20),
            **{s: r["caught"] for s, r in cr.items()}})
    out["curve"] = curve
    heads = list(out["style"])
    log("\nThreshold curve (leave-one-source-out; per fold, the colour quantile q and the gray quantile "
        "1 - 2(1 - q) of real faces it never saw):\n")
    log("| q | real called cartoon | worst real kind (>= 20 faces) | " + " | ".join(heads) + " |")
    log("|---:|---:|---|" + "---:|" * len(heads))
    for r in curve:
        log(f"| {r['quantile']} | {_pct(r['real'])} | {r['worst_kind'][1]} {_pct(r['worst_kind'][0])} | "
            + " | ".join(_pct(r[h]) for h in heads) + " |")
    if styles:
        rows = {}
        for style, r in styles.items():
            caught = np.zeros(len(f.y))
            caught[r["mask"]] = r["caught"]
            row = caught_rows(f, items, caught, r["mask"], style_key)[style]
            rows[style] = {**row, "threshold": r["threshold"]}
        out["style_out"] = rows
        log("\nLeave-one-style-out (the style group held out of training and calibration, with every "
            "source's faces of it):\n\n" + markdown_caught(rows, "held-out style", TARGETS))
    return out


def counts_markdown(f: Faces) -> str:
    augs = [a for a in REAL_AUGS + SYNTH_AUGS if a in set(f.aug)]
    lines = ["| kind | label | " + " | ".join(augs) + " | total |", "|---|---|" + "---:|" * (len(augs) + 1)]
    for kind in sorted(set(f.kind)):
        m = f.kind == kind
        lab = "non-photo" if f.y[m][0] else "real"
        lines.append(f"| {kind} | {lab} | " + " | ".join(str(int((m & (f.aug == a)).sum())) for a in augs)
                     + f" | {int(m.sum())} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

DEFAULT_TAPS = ("339", "351", "405", "401", "418", "440", "473", "477", "481", "494", "509", "513")
# The backbone's columns at half weight after standardization (a 4x stronger L2 prior on them): chosen
# on the quick comparison (docs/cartoon.md, "What was tried"); by the full protocol full weight called
# more real studio and B/W photos cartoon for the same recall. Without a backbone (--no-backbone) the
# weight has no columns to act on.
DEFAULT_SPEC = {"kind": "logreg", "C": 0.01, "style_weight": 0.5}
# Evaluated with --compare (each with the full protocol).
ALTERNATIVES = [
    {"kind": "mlp", "hidden": [64], "alpha": 0.1, "epochs": 60},
    {"kind": "logreg", "C": 0.1, "pca": 128},
]


def _json_clean(obj):
    """NaN -> None and numpy scalars -> Python, so the info dict is plain JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if obj != obj else round(float(obj), 6)
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    return obj


_JOB: dict = {}  # what the forked style-protocol worker inherits (passing it would pickle every feature)


def _quick_job() -> HeldOut:
    """The quick source protocol of the recognizer's features alone, in a forked worker (``--quick``)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(_JOB["threads"])
    with threadpool_limits(limits=_JOB["threads"]):
        return source_protocol(_JOB["faces"], _JOB["spec"], _JOB["taps"], log=lambda *a: print(*a, flush=True), quick=True)


def _style_job() -> dict:
    """The leave-one-style-out protocol in a forked worker process (see ``main``)."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(_JOB["threads"])
    with threadpool_limits(limits=_JOB["threads"]):
        return style_protocol(_JOB["faces"], _JOB["spec"], _JOB["taps"], log=lambda *a: print(*a, flush=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--taps", default=",".join(DEFAULT_TAPS),
                    help="comma-separated recognizer tensors whose statistics are features (default %(default)s)")
    ap.add_argument("--spec", default=json.dumps(DEFAULT_SPEC),
                    help='model as JSON, e.g. \'{"kind": "logreg", "C": 0.1}\' (default %(default)s)')
    ap.add_argument("--compare", action="store_true", help="also evaluate the alternative models; slow")
    ap.add_argument("--quantiles", default=f"{COLOUR_QUANTILE},{GRAY_QUANTILE}",
                    help="threshold = max(quantile of held-out real colour, quantile of gray) (default %(default)s)")
    ap.add_argument("--no-synth", action="store_true", help="ablation: no filtered copies of real photos")
    ap.add_argument("--no-style-out", action="store_true", help="skip the leave-one-style-out evaluation")
    ap.add_argument("--no-cache", action="store_true", help="recompute the features instead of reading the cache")
    ap.add_argument("--cache-dir", default=str(CACHE_DIR),
                    help="where the features and aligned crops are cached (default %(default)s)")
    ap.add_argument("--features-only", action="store_true", help="compute and cache the features, then stop")
    ap.add_argument("--out", default=str(DEFAULT_ARTIFACT), help="artifact path (default: the packaged one)")
    ap.add_argument("--no-backbone", action="store_true",
                    help="without the image backbone's features (the recognizer's features only)")
    ap.add_argument("--quick", action="store_true",
                    help="compare with and without the image backbone by the quick source protocol (K fits each, "
                         "side by side in two processes); no style protocol, no artifact")
    ap.add_argument("--backbone", default=str(STYLE_BACKBONE),
                    help="ONNX file of the image backbone (default: the packaged one, exported when missing)")
    ap.add_argument("--export-backbone", action="store_true",
                    help=f"export the image backbone to {os.path.relpath(STYLE_BACKBONE, REPO_ROOT)} even if it exists")
    ap.add_argument("--dry-run", action="store_true", help="evaluate only, write no artifact")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads per process for model fitting (the source and the style "
                         "protocols run in two processes side by side)")
    args = ap.parse_args(argv)
    import torch
    from threadpoolctl import threadpool_limits

    from sklearn.exceptions import ConvergenceWarning

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # insightface's use of skimage
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # the MLP's epoch cap is deliberate
    t0 = time.time()
    taps = tuple(t.strip() for t in args.taps.split(",") if t.strip())
    QUANTILES["colour"], QUANTILES["gray"] = (float(q) for q in args.quantiles.split(","))
    spec = json.loads(args.spec)
    root = datasets_root()
    if not (root / "cartoon" / "extra").is_dir():
        sys.exit(f"datasets not found at {root} (set FACE_ASSETS_DATASETS)")
    items = list_items(root)
    n_items = _images_per(items, lambda it: it.source)
    print(f"images: {len(items)} from {len(n_items)} sources ({', '.join(f'{k} {v}' for k, v in sorted(n_items.items()))})")
    backbone = None
    if not args.no_backbone:
        backbone = Path(args.backbone)
        if backbone == STYLE_BACKBONE and (args.export_backbone or not backbone.is_file()):
            export_backbone(backbone)
    data = extract(items, root, taps, use_cache=not args.no_cache, cache_dir=Path(args.cache_dir),
                   backbone=backbone, log=lambda *a: print(*a, flush=True))
    if args.features_only:
        return
    t_feat = time.time() - t0
    min_face = load_settings().filter.min_face_size
    f = build_faces(items, data, min_face, synth=not args.no_synth)
    n_style = data["style"].shape[1] if "style" in data else 0
    # The backbone's weight names only the backbone's columns: without them (--no-backbone, and the
    # quick comparison's base) the model and its recorded spec carry no such parameter.
    plain_spec = {k: v for k, v in spec.items() if k != "style_weight"}
    if not n_style:
        spec = plain_spec
    print(f"\nfaces >= {min_face} px (filter.min_face_size) used (features: 512 embedding + "
          f"{f.X.shape[1] - EMB_DIM - n_style} texture, taps {','.join(taps)} + {n_style} image backbone; "
          f"{K_FOLDS} source folds):\n")
    print(counts_markdown(f))
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if args.quick:
        base = dataclasses.replace(f, X=f.X[:, : f.X.shape[1] - n_style], backbone_sha=None, n_style=0) if n_style else None
        _JOB.update(faces=base, spec=plain_spec, taps=taps, threads=args.threads)
        with threadpool_limits(limits=args.threads), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            pending = pool.submit(_quick_job) if base is not None else None
            held = source_protocol(f, spec, taps, log=log, quick=True)
            log(f"\n== quick protocol, {'with the image backbone' if n_style else 'recognizer features only'} ==")
            report(f, items, held, None, log=log)
            if pending is not None:
                log("\n== quick protocol, recognizer features only ==")
                report(base, items, pending.result(), None, log=log)
        print(f"runtime: {time.time() - t0:.0f}s")
        return
    with threadpool_limits(limits=args.threads):
        results = {}
        for s in [spec] + (ALTERNATIVES if args.compare else []):
            log(f"\n== {spec_name(s)} ==")
            if args.no_style_out:
                held, styles = source_protocol(f, s, taps, log=log), None
            else:
                # The two protocols are independent: a forked worker fits the style models while this
                # process fits the source models (one BLAS thread each uses both cores of a small host).
                _JOB.update(faces=f, spec=s, taps=taps, threads=args.threads)
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                    pending = pool.submit(_style_job)
                    held = source_protocol(f, s, taps, log=log)
                    styles = pending.result()
            results[spec_name(s)] = (held, report(f, items, held, styles, log=log))
        held, tables = results[spec_name(spec)]
        final = fit_on(f, np.ones(len(f.y), bool), spec, taps)
    # The shipped threshold: the same rule on the out-of-fold probabilities of every real face.
    real = f.y == 0
    final.threshold = calibrate(held.prob[real], f.aug[real])
    print(f"\nModel: {spec_name(spec)}; shipped threshold {final.threshold:.4f} ({QUANTILES['colour']:.2%} quantile "
          f"of held-out real colour faces, {QUANTILES['gray']:.2%} of their grayscale copies)")
    final.info = _json_clean({
        "trained_by": "scripts/train_cartoon_classifier.py",
        "model": spec,
        "taps": list(taps),
        "features": f"normalized embedding ({EMB_DIM}) + log1p(mean, std, fraction positive) per channel of each tap"
                    + (f" + image backbone ({n_style}: last block of stages {[s + 1 for s in POOLED_STAGES]} mean and std, head mean; "
                       "aligned crop, then wide crop)" if n_style else ""),
        "threshold_rule": f"max(q{QUANTILES['colour']} of held-out real colour, q{QUANTILES['gray']} of held-out real gray)",
        "training_faces": {"real": int(real.sum()), "non_photo": int((f.y == 1).sum()),
                           "by_kind": {s: int((f.kind == s).sum()) for s in sorted(set(f.kind))}},
        "sources": sorted(n_items),
        "augmentations": {"real": list(REAL_AUGS), "non_photo": list(CARTOON_AUGS), "filtered_copies": list(SYNTH_AUGS)},
        "excluded_images": sorted(EXCLUDE),
        "protocol": f"{K_FOLDS} folds by source; leave-one-style-out",
        "held_out": {k: v for k, v in tables.items() if k in ("real_kind", "style", "style_out", "curve")},
        "min_face_size": min_face,
        "seed": SEED,
    })
    check = final.predict_proba(f.X[:200])
    if not args.dry_run:
        out = final.save(args.out)
        again = CartoonClassifier.read(out)
        assert np.allclose(again.predict_proba(f.X[:200]), check, atol=1e-5)
        print(f"\nartifact: {os.path.relpath(out)} ({out.stat().st_size / 1024:.0f} KiB), threshold {final.threshold:.4f}, "
              f"trained on {int(real.sum())} real + {int((f.y == 1).sum())} non-photo faces")
    print(f"runtime: {time.time() - t0:.0f}s (features {t_feat:.0f}s)")


if __name__ == "__main__":
    main()
