"""Fine-tuning the ArcFace recognizer from user feedback: ONNX -> PyTorch -> train -> ONNX (spec 5.2 to 5.6).

1. **Conversion.** The current recognizer's ONNX graph becomes a torch module (onnx2torch), checked
   against onnxruntime on real aligned faces (max abs difference <= ``training.verify_tolerance``).
   onnx2torch keeps PReLU slopes as buffers; they are promoted to parameters so they can train. The
   final BatchNorm1d stays in eval mode: its running statistics come from millions of faces, a batch
   of feedback pairs would only add noise to them.
2. **Data.** Feedback pairs and triplets (Parquet, the feedback export's contract) reference faces by
   image path and box; each face is re-detected and aligned with the library's own detector and
   ``norm_crop`` (:meth:`FaceAnalyzer.detector`, :meth:`Recognizer.align`). Faces linked by
   same-person pairs form persons (a lone link between two groups, the mark of a wrong vote, does
   not join them); persons, not pairs, are split into train and validation, so the
   validation faces are never seen. Batches hold as many same-person as different-person pairs;
   negatives are drawn with weight ``exp(similarity / T)`` (hard negatives first); crops are
   augmented (flip, colour, blur, scale).
3. **Loss.** A margin pair loss around the match threshold (logistic on ``s * (cos - t -+ m)``), a
   triplet loss, and a term keeping each raw embedding close to the current model's
   (``|e - e0|^2 / |e0|^2``), which holds both direction and norm (the filter reads the norm) and keeps
   the index from drifting without need.
4. **Export.** Back to ONNX (TorchScript exporter, ``dynamo=False``), checked against PyTorch and
   loaded through ``insightface.model_zoo.get_model`` as a recognition model.
5. **Threshold and gate.** The candidate's match threshold is calibrated on a general set of
   identities not used in training (``training.calibration_far``); candidate and current model are
   then compared on held-out feedback pairs and on that set, also at the threshold each runs with
   (:mod:`face_assets.evaluation`).

Runs are reproducible across checkouts: faces are identified by their image's content hash and box
(:func:`stable_ids`), never by a path, so the person split, the sampling and every figure depend
only on the data and ``training.seed``.

Every run lives in its own folder (``<data_dir>/models/runs/<run id>``) named by a hash of its inputs:
the same command after an interruption resumes from the last epoch's checkpoint, and after
completion returns the finished result.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnx
import polars as pl
import torch
import torch.nn.functional as F
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from onnx2torch import convert
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from .analysis import FaceAnalyzer
from .config import Settings, datasets_root
from .detection import box_iou
from .errors import ConfigError, ImageLoadError, TrainingError
from .evaluation import all_pairs, calibrate_threshold, gate, identity_metrics, operating_point, pair_metrics
from .imaging import content_hash, load_image
from .models import Recognizer

logger = logging.getLogger(__name__)

MIN_IOU = 0.3  # a re-detected face must overlap the referenced box this much to stand for it


# -- conversion ------------------------------------------------------------------------------------
def to_torch(onnx_path: Path) -> torch.fx.GraphModule:
    """The recognizer as a trainable torch module: onnx2torch conversion with PReLU slopes as parameters."""
    model = convert(onnx.load(str(onnx_path)))
    promote_prelu_slopes(model)
    return model


def promote_prelu_slopes(model: torch.fx.GraphModule) -> int:
    """Turn the PReLU slope buffers that onnx2torch creates into parameters; returns how many."""
    count = 0
    for node in model.graph.nodes:
        if node.op != "call_module" or "PReLU" not in type(model.get_submodule(node.target)).__name__:
            continue
        for arg in node.args:
            if getattr(arg, "op", None) != "get_attr":
                continue
            owner_name, _, attr = arg.target.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if attr in owner._buffers:
                value = owner._buffers.pop(attr)
                owner.register_parameter(attr, nn.Parameter(value.detach().clone()))
                count += 1
    return count


def blocks(model: torch.fx.GraphModule) -> tuple[list[list[str]], list[str]]:
    """Parameter names per convolution block (a Conv2d and the PReLU after it) in graph order, and of the head.

    The head is the embedding layer (Linear) and the final BatchNorm1d.
    """
    params = dict(model.named_parameters())
    units: list[list[str]] = []
    head: list[str] = []
    for node in model.graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        names = [f"{node.target}.{n}" for n, _ in module.named_parameters()]
        if isinstance(module, (nn.Linear, nn.BatchNorm1d)):
            head += names
        elif isinstance(module, nn.Conv2d):
            units.append(names)
        elif "PReLU" in type(module).__name__ and units:
            units[-1] += [a.target for a in node.args if getattr(a, "op", None) == "get_attr" and a.target in params]
    return units, head


def apply_freeze(model: torch.fx.GraphModule, strategy: str, trainable_blocks: int) -> int:
    """Set ``requires_grad`` by strategy (``none`` / ``head`` / ``last_blocks``); returns trainable parameter count."""
    units, head = blocks(model)
    if strategy == "none":
        train = {n for n, _ in model.named_parameters()}
    elif strategy == "head":
        train = set(head)
    elif strategy == "last_blocks":
        train = set(head) | {n for unit in units[len(units) - trainable_blocks:] if trainable_blocks for n in unit}
    else:
        raise ConfigError(f"unknown freeze strategy '{strategy}' (none, head, last_blocks)")
    total = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
        total += param.numel() if name in train else 0
    return total


def set_train_mode(model: nn.Module) -> None:
    """Training mode except the batch norms, whose running statistics stay those of the original model."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def to_blob(crops: np.ndarray | Sequence[np.ndarray], mean: float, std: float) -> torch.Tensor:
    """BGR uint8/float crops [N, H, W, 3] -> the network input [N, 3, H, W] (RGB, normalized like insightface)."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(crops, np.float32)[..., ::-1]))
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def torch_embed(model: nn.Module, crops: np.ndarray, mean: float, std: float, device: torch.device,
                batch: int = 64) -> np.ndarray:
    """Raw embeddings of clean crops with the torch model in eval mode."""
    was_training = model.training
    model.eval()
    out = [model(to_blob(crops[i : i + batch], mean, std).to(device)).cpu().numpy() for i in range(0, len(crops), batch)]
    if was_training:
        set_train_mode(model)
    return np.concatenate(out) if out else np.zeros((0, 512), np.float32)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference of two arrays of the same shape."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def verify_conversion(model: nn.Module, recognizer: Recognizer, crops: np.ndarray, tolerance: float) -> float:
    """Max abs difference of torch vs onnxruntime embeddings on ``crops``; TrainingError above ``tolerance``."""
    expected, _ = recognizer.predict(list(crops))
    diff = max_abs_diff(torch_embed(model, crops, recognizer.input_mean, recognizer.input_std, torch.device("cpu")),
                        expected)
    if diff > tolerance:
        raise TrainingError(f"converted recognizer differs from onnxruntime by {diff:.2e} > {tolerance:.0e}")
    return diff


# -- export ----------------------------------------------------------------------------------------
def export_onnx(model: nn.Module, like: Path, path: Path) -> Path:
    """Export to ONNX with the input/output names and opset of the original graph, batch size dynamic."""
    original = onnx.load(str(like), load_external_data=False)
    in_name, out_name = original.graph.input[0].name, original.graph.output[0].name
    out_name = "embedding" if out_name.isdigit() else out_name  # TorchScript refuses numeric tensor names
    dims = [d.dim_value for d in original.graph.input[0].type.tensor_type.shape.dim]
    opset = max(op.version for op in original.opset_import if op.domain in ("", "ai.onnx"))
    cpu = copy.deepcopy(model).cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    with warnings.catch_warnings():
        # onnx2torch's PReLU checks slope shapes in Python; the tracer warns though shapes are fixed
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript exporter is chosen on purpose: it round-trips this graph exactly
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(cpu, torch.zeros(1, 3, dims[2] or 112, dims[3] or 112), str(tmp), dynamo=False,
                          input_names=[in_name], output_names=[out_name], opset_version=max(opset, 11),
                          dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}})
    tmp.replace(path)
    return path


def verify_export(model: nn.Module, path: Path, crops: np.ndarray, settings: Settings) -> float:
    """Check an exported file: insightface loads it as ArcFace, onnxruntime matches torch; returns the max diff."""
    loaded = get_model(str(path), providers=["CPUExecutionProvider"])
    if not isinstance(loaded, ArcFaceONNX):
        raise TrainingError(f"insightface does not load {path} as a recognition model (got {type(loaded).__name__})")
    recognizer = Recognizer(path, settings.models)
    # the reference runs on the CPU in float32: on a GPU, TF32 convolutions (cuDNN's default) may exceed the tolerance
    expected = torch_embed(copy.deepcopy(model).cpu(), crops, recognizer.input_mean, recognizer.input_std,
                           torch.device("cpu"))
    diff = max_abs_diff(recognizer.predict(list(crops))[0], expected)
    if diff > settings.training.verify_tolerance:
        raise TrainingError(f"exported ONNX differs from PyTorch by {diff:.2e} > {settings.training.verify_tolerance:.0e}")
    return diff


# -- data ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaceRef:
    """A face as the feedback export names it: image path and box (and its catalog id when known)."""

    path: str
    bbox: tuple[float, float, float, float]
    face_id: int | None = None

    @property
    def key(self) -> str:
        """Identity of the face across files: path and box rounded to whole pixels."""
        return f"{self.path}#{','.join(str(int(round(v))) for v in self.bbox)}"


def stable_ids(refs: Sequence[FaceRef]) -> dict[str, str]:
    """An id per face key that does not depend on where the data lies: image content hash and box.

    A face whose file cannot be read keeps its key (it will be reported as not found anyway).
    """
    digests: dict[str, str] = {}
    out = {}
    for ref in refs:
        if ref.path not in digests:
            try:
                digests[ref.path] = content_hash(Path(ref.path))
            except ImageLoadError:
                digests[ref.path] = ref.path
        out[ref.key] = f"{digests[ref.path]}#{ref.key.rsplit('#', 1)[1]}"
    return out


@dataclass
class FeedbackData:
    """Pairs ``(a, b, label, source)`` and triplets ``(anchor, positive, negative)`` of faces."""

    pairs: list[tuple[FaceRef, FaceRef, int, str]] = field(default_factory=list)
    triplets: list[tuple[FaceRef, FaceRef, FaceRef]] = field(default_factory=list)
    rejected: int = 0  # rows without a usable path, box or label, skipped with a warning


def _face_ref(path: Any, bbox: Any, face_id: Any, what: str) -> FaceRef:
    if path is None or bbox is None or len(bbox) != 4:
        raise TrainingError(f"{what}: needs a path and a bbox of 4 numbers, got {path!r}, {bbox!r}")
    return FaceRef(str(path), tuple(float(v) for v in bbox), None if face_id is None else int(face_id))


def _ref(row: Mapping[str, Any], prefix: str) -> FaceRef:
    return _face_ref(row.get(f"{prefix}_path"), row.get(f"{prefix}_bbox"), row.get(f"{prefix}_face_id"), prefix)


def load_feedback(pairs: Path | None = None, triplets: Path | None = None,
                  persons: Mapping[str, Sequence[FaceRef]] | None = None, max_person_pairs: int = 20) -> FeedbackData:
    """Read the feedback export (``pairs.parquet``, ``triplets.parquet``) and confirmed persons into pairs.

    A person confirmed by users adds same-person pairs between its faces (at most
    ``max_person_pairs`` per person) and, with every other person, one different-person pair.
    """
    data = FeedbackData()
    if pairs is not None:
        frame = pl.read_parquet(pairs)
        missing = {"query_path", "query_bbox", "result_path", "result_bbox", "label"} - set(frame.columns)
        if missing:
            raise TrainingError(f"{pairs} lacks columns {sorted(missing)}")
        for row in frame.iter_rows(named=True):
            try:
                if row["label"] not in (0, 1):
                    raise TrainingError(f"label must be 0 or 1, got {row['label']!r}")
                data.pairs.append((_ref(row, "query"), _ref(row, "result"), int(row["label"]), str(row.get("source") or "")))
            except TrainingError as exc:
                data.rejected += 1
                logger.warning("pair %s skipped: %s", row.get("query_id"), exc)
    if triplets is not None:
        for row in pl.read_parquet(triplets).iter_rows(named=True):
            try:
                data.triplets.append((_ref(row, "anchor"), _ref(row, "positive"), _ref(row, "negative")))
            except TrainingError as exc:
                data.rejected += 1
                logger.warning("triplet skipped: %s", exc)
    if persons:
        names = sorted(persons)
        for i, name in enumerate(names):
            faces = list(persons[name])
            combos = [(a, b) for k, a in enumerate(faces) for b in faces[k + 1:]][:max_person_pairs]
            data.pairs += [(a, b, 1, "confirmed_person") for a, b in combos]
            data.pairs += [(faces[0], persons[other][0], 0, "confirmed_person") for other in names[i + 1:] if persons[other]]
    return data


def load_persons(path: Path) -> dict[str, list[FaceRef]]:
    """Confirmed persons from Parquet (``person_id``, ``path``, ``bbox``, optional ``face_id``)."""
    frame = pl.read_parquet(path)
    missing = {"person_id", "path", "bbox"} - set(frame.columns)
    if missing:
        raise TrainingError(f"{path} lacks columns {sorted(missing)}")
    persons: dict[str, list[FaceRef]] = {}
    for row in frame.iter_rows(named=True):
        ref = _face_ref(row["path"], row["bbox"], row.get("face_id"), f"person {row['person_id']}")
        persons.setdefault(str(row["person_id"]), []).append(ref)
    return persons


def aligned_crops(refs: Sequence[FaceRef], analyzer: FaceAnalyzer) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Aligned crops of the referenced faces: re-detect each image, take the face overlapping the box most.

    Returns ``(crops by face key, reason by face key)`` for the faces that could not be found.
    """
    by_path: dict[str, list[FaceRef]] = {}
    for ref in refs:
        by_path.setdefault(ref.path, []).append(ref)
    crops, failed = {}, {}
    max_pixels = analyzer.settings.images.max_pixels
    for path, wanted in by_path.items():
        try:
            img = load_image(path, max_pixels=max_pixels)
        except ImageLoadError as exc:
            failed.update({r.key: f"unreadable: {exc.reason}" for r in wanted})
            continue
        faces, _ = analyzer.detector.predict([img])[0]
        for ref in wanted:
            if ref.key in crops:
                continue
            best = max(faces, key=lambda f: box_iou(f.bbox, ref.bbox), default=None)
            if best is None or box_iou(best.bbox, ref.bbox) < MIN_IOU:
                failed[ref.key] = "face not found at the given box"
                continue
            crops[ref.key] = analyzer.recognizer.align(img, best.kps)
    return crops, failed


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random variant of an aligned crop: horizontal flip, scale, colour (brightness, contrast, saturation), blur."""
    img = crop[:, ::-1] if rng.random() < 0.5 else crop
    h, w = img.shape[:2]
    scale = rng.uniform(0.9, 1.1)
    matrix = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), 0.0, scale)
    img = cv2.warpAffine(np.ascontiguousarray(img), matrix, (w, h), borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    gray = img.mean(axis=2, keepdims=True)
    img = gray + (img - gray) * rng.uniform(0.7, 1.3)
    img = (img - 127.5) * rng.uniform(0.8, 1.2) + 127.5 + rng.uniform(-20.0, 20.0)
    if rng.random() < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.5, 1.5))
    return np.clip(img, 0.0, 255.0)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes joined by ``edges`` [m, 2]."""
    edges = np.asarray(edges, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def persons_of(n: int, same: np.ndarray) -> np.ndarray:
    """Person label of each of ``n`` faces from same-person links ``[m, 2]``: connected, less their bridges.

    A link whose removal would split its group (a bridge) is not trusted to join persons: one wrong
    "same person" vote between two persons is exactly such a link, and following it would merge both
    persons and turn every pair across them into a wrong same-person pair (see :func:`implied_pairs`).
    Real persons, voted on many times, stay joined by cycles. Bridges are found with Tarjan's
    low-link depth-first search (iterative, so deep chains do not hit the recursion limit).
    """
    edges = sorted({(min(a, b), max(a, b)) for a, b in np.asarray(same, np.int64).reshape(-1, 2).tolist() if a != b})
    adj: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for e, (a, b) in enumerate(edges):
        adj[a].append((b, e))
        adj[b].append((a, e))
    disc, low, bridges, clock = [-1] * n, [0] * n, set(), 0
    for root in range(n):
        if disc[root] >= 0:
            continue
        disc[root] = low[root] = clock
        clock += 1
        stack = [(root, -1, iter(adj[root]))]
        while stack:
            v, via, neighbours = stack[-1]
            for w, e in neighbours:
                if e == via:
                    continue
                if disc[w] < 0:
                    disc[w] = low[w] = clock
                    clock += 1
                    stack.append((w, e, iter(adj[w])))
                    break
                low[v] = min(low[v], disc[w])
            else:
                stack.pop()
                if stack:
                    parent = stack[-1][0]
                    low[parent] = min(low[parent], low[v])
                    if low[v] > disc[parent]:
                        bridges.add(via)
    return components(n, np.array([edge for e, edge in enumerate(edges) if e not in bridges], np.int64))


@dataclass
class PairSet:
    """Pairs and triplets as indices into one array of crops."""

    pairs: np.ndarray  # [n, 3] int64: i, j, label
    triplets: np.ndarray  # [m, 3] int64: anchor, positive, negative
    feedback_pairs: int = 0  # how many of ``pairs`` were given; the rest follow from them (see implied_pairs)
    person: np.ndarray | None = None  # person of every crop index (see persons_of)
    contradicted: int = 0  # different-person votes inside one person, left out as most likely wrong
    unit: np.ndarray | None = None  # split unit of every crop index: faces joined by any same-person link

    def unlinked_pairs(self, limit: int, seed: int) -> np.ndarray:
        """Pairs ``(i, j, 0)`` of this set's faces in different units: no vote says they are the same person.

        Users vote on a few results; most pairs of their faces are never voted on, and those in
        different units are almost all different persons. All such pairs, or ``limit`` drawn at random.
        """
        keys = self.keys()
        n = len(keys)
        if n * (n - 1) // 2 <= limit:
            i, j = np.triu_indices(n, 1)
        else:
            rng = np.random.default_rng(seed)
            i, j = rng.integers(0, n, (2, limit))
        keep = self.unit[keys[i]] != self.unit[keys[j]]
        i, j = keys[i[keep]], keys[j[keep]]
        return np.stack([np.minimum(i, j), np.maximum(i, j), np.zeros_like(i)], axis=1).astype(np.int64)

    def keys(self) -> np.ndarray:
        """Indices of every crop the set uses."""
        return np.unique(np.concatenate([self.pairs[:, :2].ravel(), self.triplets.ravel()]).astype(np.int64))


def split_by_person(data: FeedbackData, index: Mapping[str, int], val_fraction: float,
                    seed: int, stable: Mapping[str, str] | None = None) -> tuple[PairSet, PairSet, int]:
    """Train and validation sets with disjoint persons; returns ``(train, val, pairs dropped)``.

    A pair or triplet whose faces fall on both sides is dropped rather than leak a validation face.
    The units of the split are the faces connected by same-person pairs (and anchor-positive pairs of
    triplets), every link followed: a wrong link only makes a unit coarser, and a chain of votes on
    one person stays on one side. They are ordered by a hash of ``seed`` and the smallest ``stable``
    id of their faces (see :func:`stable_ids`; default the face keys), so the split does not depend
    on where the files lie. The persons that imply pairs are finer (:func:`persons_of`).

    A different-person vote (or triplet negative) between two faces of one such person contradicts
    at least two same-person paths and is most likely the wrong one: it is left out and counted
    (``PairSet.contradicted``). Left in, it would be the "hardest negative" of all, the one the
    sampler draws most.
    """
    links = [(index[a.key], index[b.key]) for a, b, label, _ in data.pairs
             if label == 1 and a.key in index and b.key in index]
    links += [(index[a.key], index[p.key]) for a, p, _ in data.triplets if a.key in index and p.key in index]
    unit = components(len(index), np.array(links, np.int64))
    person = persons_of(len(index), np.array(links, np.int64))
    sizes: dict[int, int] = {}
    name: dict[int, str] = {}
    for key, i in index.items():
        root = int(unit[i])
        sizes[root] = sizes.get(root, 0) + 1
        ident = stable[key] if stable else key
        name[root] = min(name.get(root, ident), ident)
    order = sorted(sizes, key=lambda r: hashlib.sha256(f"{seed}:{name[r]}".encode()).hexdigest())
    # persons join validation until it holds val_fraction of the faces (not of the persons: most
    # feedback persons are single faces, and a validation set of those has no same-person pairs)
    val_roots: set[int] = set()
    in_val = 0
    for root in order[:-1]:
        if in_val >= val_fraction * len(index):
            break
        val_roots.add(root)
        in_val += sizes[root]
    side = {k: int(unit[i]) in val_roots for k, i in index.items()}
    train_pairs, val_pairs, dropped = [], [], 0
    contradicted = {False: 0, True: 0}  # by side: different-person votes inside one person, left out
    for a, b, label, _ in data.pairs:
        if a.key not in index or b.key not in index or a.key == b.key:
            continue
        if side[a.key] != side[b.key]:
            dropped += 1
            continue
        if label == 0 and person[index[a.key]] == person[index[b.key]]:
            contradicted[side[a.key]] += 1
            continue
        (val_pairs if side[a.key] else train_pairs).append((index[a.key], index[b.key], label))
    train_trip, val_trip = [], []
    for a, p, n in data.triplets:
        if not all(r.key in index for r in (a, p, n)):
            continue
        sides = {side[a.key], side[p.key], side[n.key]}
        if len(sides) > 1:
            dropped += 1
            continue
        if person[index[a.key]] == person[index[n.key]]:
            contradicted[side[a.key]] += 1
            continue
        (val_trip if side[a.key] else train_trip).append((index[a.key], index[p.key], index[n.key]))

    def arr(rows: list, width: int = 3) -> np.ndarray:
        return np.array(rows, np.int64).reshape(-1, width)

    train = implied_pairs(arr(train_pairs), person, seed)
    return (PairSet(train, arr(train_trip), len(train_pairs), person, contradicted[False], unit),
            PairSet(arr(val_pairs), arr(val_trip), len(val_pairs), person, contradicted[True], unit), dropped)


def implied_pairs(pairs: np.ndarray, person: np.ndarray, seed: int, limit: int = 50_000) -> np.ndarray:
    """The given pairs plus those they imply: all faces of one person are the same person, and two
    persons with one different-person pair between them differ in every pair of their faces.

    ``person`` gives each crop index its person; at most ``limit`` implied pairs are kept (random).
    A different-person vote inside one person (of :func:`persons_of`) implies nothing
    (:func:`split_by_person` leaves such votes out before).
    """
    members: dict[Any, list[int]] = {}
    for i in np.unique(pairs[:, :2]):
        members.setdefault(person[i], []).append(int(i))
    rows = {(min(a, b), max(a, b), 1) for faces in members.values() for k, a in enumerate(faces) for b in faces[k + 1:]}
    differ = {tuple(sorted((person[i], person[j]))) for i, j, label in pairs if label == 0 and person[i] != person[j]}
    rows |= {(min(a, b), max(a, b), 0) for p, q in differ for a in members[p] for b in members[q]}
    given = {(min(i, j), max(i, j)) for i, j, _ in pairs.tolist()}  # a given vote is never overridden
    extra = np.array(sorted(r for r in rows if r[:2] not in given), np.int64).reshape(-1, 3)
    if len(extra) > limit:
        extra = extra[np.sort(np.random.default_rng(seed).choice(len(extra), limit, replace=False))]
    return np.concatenate([pairs, extra])


# -- training --------------------------------------------------------------------------------------
def pair_loss(cos: torch.Tensor, label: torch.Tensor, threshold: float, margin: float, scale: float) -> torch.Tensor:
    """Logistic loss pushing same-person cosines above ``threshold + margin`` and others below ``threshold - margin``."""
    sign = label * 2.0 - 1.0
    return F.softplus(-sign * scale * (cos - threshold - sign * margin)).mean()


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on cosines: the negative must be ``margin`` less similar to the anchor than the positive."""
    return F.relu((anchor * negative).sum(1) - (anchor * positive).sum(1) + margin).mean()


def keep_close_loss(raw: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Relative squared distance of raw embeddings to the current model's: direction and norm both held."""
    return (((raw - original) ** 2).sum(1) / (original**2).sum(1).clamp_min(1e-6)).mean()


def lr_factor(settings: Settings, epoch: int) -> float:
    """Multiplier of the peak learning rate in ``epoch`` (0-based) for the configured schedule."""
    cfg = settings.training
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        return cfg.lr_gamma ** (epoch // cfg.lr_step_epochs)
    return 1.0


def training_device(settings: Settings) -> torch.device:
    """The torch device of ``training.device``; ConfigError when cuda is asked for and absent."""
    wanted = settings.training.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return torch.device("cuda" if wanted != "cpu" and torch.cuda.is_available() else "cpu")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


EpochCallback = Callable[[int, dict[str, float]], None]
"""Called after each epoch's checkpoint as ``on_epoch_end(epoch, metrics)``; raising stops the run."""


class Trainer:
    """One training run over prepared crops: epochs, checkpoints, curves; resumes from ``run_dir``.

    Args:
        settings: validated settings (``training`` section).
        model: the converted torch recognizer (PReLU slopes as parameters).
        crops: aligned uint8 BGR crops [N, 112, 112, 3].
        original: the current model's raw embeddings of ``crops`` (targets of the keep-close term).
        train, val: pairs and triplets by crop index.
        run_dir: folder of ``checkpoint.pt``, ``best.pt``, ``metrics.csv/json``, ``curves.png``.
        mean, std: input normalization of the recognizer.
        threshold: match threshold of the current version, the centre of the pair loss
            (default ``search.match_threshold``).
    """

    def __init__(self, settings: Settings, model: torch.fx.GraphModule, crops: np.ndarray, original: np.ndarray,
                 train: PairSet, val: PairSet, run_dir: Path, mean: float, std: float, threshold: float | None = None):
        self.settings, self.cfg = settings, settings.training
        self.device = training_device(settings)
        self.model = model.to(self.device)
        self.crops, self.train, self.val = crops, train, val
        self.original = torch.from_numpy(np.asarray(original, np.float32))
        self.run_dir, self.mean, self.std = run_dir, mean, std
        self.threshold = settings.search.match_threshold if threshold is None else threshold
        normed = original / np.linalg.norm(original, axis=1, keepdims=True)
        self.pos = train.pairs[train.pairs[:, 2] == 1]
        self.neg = train.pairs[train.pairs[:, 2] == 0]
        if self.cfg.unvoted_negatives and train.unit is not None and len(train.pairs):
            # without them only the voted-on persons are kept apart: pulling same-person faces
            # together then pulls the voters' faces together too, and false accepts among them rise
            unlinked = train.unlinked_pairs(200_000, self.cfg.seed)
            below = (normed[unlinked[:, 0]] * normed[unlinked[:, 1]]).sum(1) < self.threshold
            known = {(int(a), int(b)) for a, b, _ in train.pairs}
            unlinked = np.array([r for r in unlinked[below].tolist() if (r[0], r[1]) not in known], np.int64).reshape(-1, 3)
            self.neg = np.concatenate([self.neg, unlinked])
        sims = (normed[self.neg[:, 0]] * normed[self.neg[:, 1]]).sum(1)
        weights = np.exp((sims - sims.max()) / self.cfg.hard_negative_temperature) if len(sims) else sims
        self.neg_p = weights / weights.sum() if len(sims) else weights
        params = [p for p in self.model.parameters()]
        if self.cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                             weight_decay=self.cfg.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.rng = np.random.default_rng(self.cfg.seed)
        torch.manual_seed(self.cfg.seed)
        self.history: list[dict[str, float]] = []
        self.best: tuple | None = None
        self.start_epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: configured, or as many pairs as were given (implied pairs only widen the choice)."""
        return self.cfg.steps_per_epoch or max(1, math.ceil(self.train.feedback_pairs / self.cfg.batch_size))

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` when present; returns whether a run was resumed."""
        path = self.run_dir / "checkpoint.pt"
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.history, self.best, self.start_epoch = state["history"], state["best"], state["epoch"] + 1
        logger.info("resumed %s at epoch %d", self.run_dir.name, self.start_epoch + 1)
        return True

    def _batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        half = self.cfg.batch_size // 2
        parts = []
        if len(self.pos):
            parts.append(self.pos[self.rng.integers(0, len(self.pos), half)])
        if len(self.neg):
            parts.append(self.neg[self.rng.choice(len(self.neg), half, p=self.neg_p)])
        pairs = np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)
        trip = self.train.triplets
        trip = trip[self.rng.integers(0, len(trip), self.cfg.triplets_per_batch)] if len(trip) and self.cfg.triplets_per_batch else trip[:0]
        return pairs, trip, np.unique(np.concatenate([pairs[:, :2].ravel(), trip.ravel()]))

    def _step(self) -> tuple[float, float]:
        pairs, trip, idx = self._batch()
        if not len(idx):
            raise TrainingError("no training pairs: every face was unreadable, missing or held out")
        where = {int(k): i for i, k in enumerate(idx)}
        images = [augment(self.crops[k], self.rng) if self.cfg.augment else self.crops[k] for k in idx]
        raw = self.model(to_blob(images, self.mean, self.std).to(self.device))
        emb = F.normalize(raw, dim=1)
        loss = self.cfg.keep_close_weight * keep_close_loss(raw, self.original[idx].to(self.device))
        correct = 0.0
        if len(pairs):
            a = emb[[where[int(i)] for i in pairs[:, 0]]]
            b = emb[[where[int(i)] for i in pairs[:, 1]]]
            cos = (a * b).sum(1)
            label = torch.as_tensor(pairs[:, 2], dtype=torch.float32, device=self.device)
            loss = loss + pair_loss(cos, label, self.threshold, self.cfg.pair_margin, self.cfg.pair_scale)
            correct = float(((cos >= self.threshold).float() == label).float().mean())
        if len(trip) and self.cfg.triplet_weight:
            rows = [[where[int(i)] for i in trip[:, c]] for c in range(3)]
            loss = loss + self.cfg.triplet_weight * triplet_loss(emb[rows[0]], emb[rows[1]], emb[rows[2]],
                                                                 self.cfg.triplet_margin)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), correct

    def validate(self) -> dict[str, float]:
        """Pair metrics and loss of the current weights on the validation persons (empty dict without any)."""
        if not len(self.val.pairs):
            return {}
        keys = self.val.keys()
        raw = torch.from_numpy(torch_embed(self.model, self.crops[keys], self.mean, self.std, self.device))
        where = {int(k): i for i, k in enumerate(keys)}
        emb = F.normalize(raw, dim=1)
        a = emb[[where[int(i)] for i in self.val.pairs[:, 0]]]
        b = emb[[where[int(i)] for i in self.val.pairs[:, 1]]]
        cos = (a * b).sum(1)
        label = torch.as_tensor(self.val.pairs[:, 2], dtype=torch.float32)
        loss = pair_loss(cos, label, self.threshold, self.cfg.pair_margin, self.cfg.pair_scale)
        loss = loss + self.cfg.keep_close_weight * keep_close_loss(raw, self.original[keys])
        metrics = pair_metrics(cos.numpy(), self.val.pairs[:, 2], self.threshold)
        return {"val_loss": float(loss), "val_accuracy": metrics["accuracy"], "val_auc": metrics.get("auc", float("nan"))}

    def fit(self, on_epoch_end: EpochCallback | None = None) -> list[dict[str, float]]:
        """Train the remaining epochs; checkpoint, log and plot after each; keep the best weights in ``best.pt``."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        if self.best is None:
            self._keep_best(-1, self.validate())
        for epoch in range(self.start_epoch, self.cfg.epochs):
            start = time.perf_counter()
            unfreeze = self.cfg.unfreeze_epoch is not None and epoch + 1 >= self.cfg.unfreeze_epoch
            trainable = apply_freeze(self.model, "none" if unfreeze else self.cfg.freeze, self.cfg.trainable_blocks)
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.lr * lr_factor(self.settings, epoch)
            set_train_mode(self.model)
            losses, accs = zip(*(self._step() for _ in range(self.steps_per_epoch)))
            row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], "trainable_params": trainable,
                   "train_loss": float(np.mean(losses)), "train_accuracy": float(np.mean(accs))}
            row |= self.validate()
            row["seconds"] = round(time.perf_counter() - start, 2)
            self.history.append(row)
            self._keep_best(epoch, row)
            _atomic_save({"epoch": epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                          "history": self.history, "best": self.best}, self.run_dir / "checkpoint.pt")
            write_curves(self.history, self.run_dir)
            logger.info("epoch %d: %s", epoch + 1, row)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, row)
        return self.history

    def _keep_best(self, epoch: int, row: Mapping[str, float]) -> None:
        """Remember the epoch with the best validation AUC, then accuracy, then loss (the last epoch without validation)."""
        auc = row.get("val_auc", float("nan"))
        score = (0.0 if math.isnan(auc) else auc, row.get("val_accuracy", 0.0), -row.get("val_loss", 0.0))
        if not len(self.val.pairs) or self.best is None or score > tuple(self.best[1]):
            self.best = (epoch, score)
            _atomic_save(self.model.state_dict(), self.run_dir / "best.pt")

    def best_model(self) -> nn.Module:
        """The weights of the best epoch (epoch 0 = the current model when nothing beat it)."""
        self.model.load_state_dict(torch.load(self.run_dir / "best.pt", map_location=self.device))
        return self.model.eval()


def write_curves(history: Sequence[Mapping[str, float]], run_dir: Path) -> None:
    """Write ``metrics.csv``, ``metrics.json`` and ``curves.png`` (loss and accuracy per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pl.DataFrame(list(history)).write_csv(run_dir / "metrics.csv")
    (run_dir / "metrics.json").write_text(json.dumps(list(history), indent=2))
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if all(key in r for r in history):
            ax1.plot(epochs, [r[key] for r in history], marker="o", label=key)
    for key in ("train_accuracy", "val_accuracy", "val_auc"):
        if all(key in r for r in history):
            ax2.plot(epochs, [r[key] for r in history], marker="o", label=key)
    for ax, title in ((ax1, "loss"), (ax2, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=80)
    plt.close(fig)


# -- evaluation sets -------------------------------------------------------------------------------
def person_name(identity: str) -> str:
    """One spelling of a person's name across folders (``Scarlett_Johansson`` = ``Scarlett Johansson``)."""
    return " ".join(identity.replace("_", " ").lower().split())


def labelled_images(settings: Settings) -> list[tuple[str, Path]]:
    """``(person, path)`` of the general set's candidate images, in path order.

    ``training.general_eval_dirs`` (folders of ``<identity>/<image>``) when set, else every real
    photo of the shared datasets' manifest that names its person (``identity``), the extra folders
    included; names are compared by :func:`person_name`, so one person in two folders is one person.
    """
    if settings.training.general_eval_dirs:
        images = []
        for folder in map(Path, settings.training.general_eval_dirs):
            for ident_dir in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
                images += [(f"{folder.name}/{ident_dir.name}", p) for p in sorted(ident_dir.iterdir()) if p.is_file()]
        return images
    root = datasets_root()
    if not (root / "manifest.csv").is_file():
        return []
    rows = pl.read_csv(root / "manifest.csv", infer_schema_length=0).filter(
        (pl.col("kind") == "real") & pl.col("identity").is_not_null() & pl.col("path").str.starts_with("real/"))
    return [(person_name(ident), root / path) for path, ident in sorted(zip(rows["path"], rows["identity"]))]


def general_set(settings: Settings, analyzer: FaceAnalyzer, exclude: set[str]) -> tuple[np.ndarray, np.ndarray]:
    """Aligned main faces and person labels of the general gate set, minus persons used in training.

    The images are those of :func:`labelled_images`. A person is left out when any of its images
    has a content hash in ``exclude`` (the training images), wherever those files lie. Crops are
    cached under ``<data_dir>/models/cache`` by content, so another checkout finds them too.
    """
    images = [(ident, path, content_hash(path)) for ident, path in labelled_images(settings) if path.is_file()]
    used = {ident for ident, _, digest in images if digest in exclude}
    images = [row for row in images if row[0] not in used]
    if not images:
        return np.zeros((0, 112, 112, 3), np.uint8), np.zeros(0, str)
    digest = hashlib.sha256(json.dumps([[i, d] for i, _, d in images] + [settings.detection.model_dump()],
                                       default=str).encode()).hexdigest()[:16]
    cache = settings.layout.model_cache / f"general-{digest}.npz"
    if cache.is_file():
        stored = np.load(cache)
        return stored["crops"], stored["labels"]
    crops, labels = [], []
    for ident, path, _ in images:
        try:
            img = load_image(path, max_pixels=settings.images.max_pixels)
        except ImageLoadError:
            continue
        faces, _ = analyzer.detector.predict([img])[0]
        if faces:
            crops.append(analyzer.recognizer.align(img, faces[0].kps))
            labels.append(ident)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, crops=np.asarray(crops, np.uint8).reshape(-1, 112, 112, 3), labels=np.asarray(labels))
    return np.asarray(crops, np.uint8).reshape(-1, 112, 112, 3), np.asarray(labels)


def feedback_crops(refs: Sequence[FaceRef], stable: Mapping[str, str], analyzer: FaceAnalyzer,
                   cache_dir: Path) -> tuple[dict[str, np.ndarray], int]:
    """Aligned crops of the feedback faces by face key, and how many were not found; cached by content.

    The cache file is named by the faces' stable ids and the detection settings, so runs that differ
    only in training settings (an ablation) detect each image once.
    """
    digest = hashlib.sha256(json.dumps([sorted(set(stable.values())), analyzer.settings.detection.model_dump()],
                                       default=str).encode()).hexdigest()[:16]
    cache = cache_dir / f"faces-{digest}.npz"
    if cache.is_file():
        stored = np.load(cache)
        by_id = dict(zip((str(i) for i in stored["ids"]), stored["crops"]))
        return {r.key: by_id[stable[r.key]] for r in refs if stable[r.key] in by_id}, int(stored["failed"])
    found, missing = aligned_crops(refs, analyzer)
    for key, reason in missing.items():
        logger.warning("feedback face %s skipped: %s", key, reason)
    cache.parent.mkdir(parents=True, exist_ok=True)
    ids = sorted({stable[k]: k for k in found})
    np.savez(cache, ids=np.asarray(ids), failed=len(missing),
             crops=np.asarray([found[{stable[k]: k for k in found}[i]] for i in ids], np.uint8).reshape(-1, 112, 112, 3))
    return found, len(missing)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embed(recognizer: Recognizer, crops: np.ndarray) -> np.ndarray:
    """Normalized embeddings of aligned crops through onnxruntime, exactly as in production."""
    return normalize(recognizer.predict(list(crops))[0]) if len(crops) else np.zeros((0, 512), np.float32)


def judge(settings: Settings, embeddings: Mapping[str, tuple[np.ndarray, np.ndarray]], keys: np.ndarray, val: PairSet,
          general_labels: np.ndarray, current_threshold: float) -> tuple[dict[str, Any], Any]:
    """Gate metrics and verdict of a candidate against the current model (no I/O).

    Args:
        embeddings: ``{"current": ..., "candidate": ...}``, each ``(held-out feedback faces [len(keys)],
            general set)`` normalized embeddings.
        keys: crop indices of the held-out feedback faces (``val.keys()``).
        val: the validation pairs and the person of every crop index.
        general_labels: person of each general-set image.
        current_threshold: the threshold the current version runs with.

    Returns:
        ``(metrics, GateResult)``; ``metrics["match_threshold"]`` is the candidate's threshold,
        calibrated on the general set at ``training.calibration_far``, or at the current model's
        false accept rate there when that is lower and ``training.calibration_not_above_parent``
        (the current threshold when the set has no impostor pair); ``metrics["calibration_far"]``
        is the rate used.
    """
    cfg = settings.training
    where = {int(k): n for n, k in enumerate(keys)}
    gi, gj, gsame = all_pairs(general_labels)
    # held-out feedback faces: the given validation pairs, those they imply (all faces of one person)
    held = implied_pairs(val.pairs, val.person, cfg.seed) if len(val.pairs) else val.pairs
    if len(val.pairs) and val.unit is not None:  # and every unvoted pair across units: different persons
        known = {(int(a), int(b)) for a, b, _ in held}
        unlinked = [r for r in val.unlinked_pairs(200_000, cfg.seed).tolist() if (r[0], r[1]) not in known]
        held = np.concatenate([held, np.array(unlinked, np.int64).reshape(-1, 3)])
    hi = np.array([where[int(a)] for a in held[:, 0]], np.int64)
    hj = np.array([where[int(b)] for b in held[:, 1]], np.int64)
    sims, metrics = {}, {}
    for name, (fb, gen) in embeddings.items():
        fb_sim = (fb[[where[int(a)] for a in val.pairs[:, 0]]] * fb[[where[int(b)] for b in val.pairs[:, 1]]]).sum(1)
        metrics[name] = {"feedback": pair_metrics(fb_sim, val.pairs[:, 2], current_threshold) if len(val.pairs) else {},
                         "general": identity_metrics(gen, general_labels) if len(general_labels) >= 2 else {}}
        sims[name] = ((fb[hi] * fb[hj]).sum(1), (gen[gi] * gen[gj]).sum(1))
    impostor = {name: s[1][~gsame] for name, s in sims.items()}
    far = cfg.calibration_far
    parent_far = float(np.mean(impostor["current"] >= current_threshold)) if len(impostor["current"]) else far
    if cfg.calibration_not_above_parent:  # never accept more strangers than the version it replaces
        far = min(far, parent_far)
    candidate_threshold = calibrate_threshold(impostor["candidate"], far) if len(impostor["candidate"]) else current_threshold
    if len(val.pairs):  # the candidate's accuracy is that at its own threshold (given pairs come first in ``held``)
        accepted = sims["candidate"][0][: len(val.pairs)] >= candidate_threshold
        metrics["candidate"]["feedback"]["accuracy"] = float(np.mean(accepted == val.pairs[:, 2].astype(bool)))
    operating = {}
    for set_name, (i, j, same, groups, k) in {
            "feedback": (hi, hj, held[:, 2].astype(bool), val.person[keys] if len(keys) else keys, 0),
            "general": (gi, gj, gsame, general_labels, 1)}.items():
        if len(i) and same.any() and (~same).any():
            operating[set_name] = operating_point(
                i, j, same, groups, (sims["current"][k], current_threshold), (sims["candidate"][k], candidate_threshold),
                rounds=cfg.gate_bootstrap_rounds, confidence=cfg.gate_confidence, seed=cfg.seed)
    metrics |= {"match_threshold": candidate_threshold, "parent_threshold": current_threshold,
                "parent_calibrated_threshold": calibrate_threshold(impostor["current"], cfg.calibration_far)
                if len(impostor["current"]) else None,
                "parent_far": parent_far, "calibration_far": far, "operating_point": operating}
    return metrics, gate(metrics["candidate"], metrics["current"], cfg.gate_max_drop, operating)


# -- the whole run ---------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Outcome of :func:`fine_tune`: the exported candidate, its checks, threshold, gate metrics and verdict."""

    run_id: str
    run_dir: str
    model_path: str
    parent: str
    sha256: str
    passed_gate: bool
    gate_reasons: list[str]
    metrics: dict[str, Any]
    history: list[dict[str, float]]
    data: dict[str, int]
    conversion_max_diff: float
    export_max_diff: float
    seconds: float
    device: str
    gate_failed: list[str] = field(default_factory=list)  # names of the failed checks, e.g. operating.feedback.far
    match_threshold: float | None = None  # calibrated on the general set; the version runs with it
    version: str | None = None  # registry name, set when the library registers the candidate

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view."""
        return asdict(self)


def _file_digest(path: Path | None) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path is not None else ""


def run_id_for(settings: Settings, parent_sha: str, pairs: Path | None, triplets: Path | None,
               persons: Mapping[str, Sequence[FaceRef]] | None, threshold: float | None = None) -> str:
    """Id of a run from everything it depends on, so the same command finds its own checkpoint."""
    cfg = settings.training.model_dump(mode="json", exclude={"active_model", "device", "threads"})
    person_keys = {k: [r.key for r in v] for k, v in (persons or {}).items()}
    blob = json.dumps([parent_sha, _file_digest(pairs), _file_digest(triplets), person_keys, cfg,
                       settings.search.match_threshold if threshold is None else threshold], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fine_tune(settings: Settings, analyzer: FaceAnalyzer, parent: str, run_dir: Path, pairs: Path | None = None,
              triplets: Path | None = None, persons: Mapping[str, Sequence[FaceRef]] | None = None,
              on_epoch_end: EpochCallback | None = None, threshold: float | None = None) -> TrainResult:
    """Fine-tune ``analyzer``'s recognizer (registry version ``parent``) on feedback; export, calibrate and gate.

    ``threshold`` is the match threshold ``parent`` runs with (default ``search.match_threshold``).
    Resumes from ``run_dir`` after an interruption; returns the stored result when the run already finished.
    """
    start = time.perf_counter()
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return TrainResult(**json.loads(result_file.read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    threshold = settings.search.match_threshold if threshold is None else threshold
    current = analyzer.recognizer
    data = load_feedback(pairs, triplets, persons)
    refs = {r.key: r for a, b, _, _ in data.pairs for r in (a, b)} | {r.key: r for t in data.triplets for r in t}
    stable = stable_ids(list(refs.values()))
    found, failed = feedback_crops(list(refs.values()), stable, analyzer, settings.layout.model_cache)
    keys = sorted(found, key=lambda k: (stable[k], k))  # crop order follows the data, not the folder it lies in
    crops = np.asarray([found[k] for k in keys], np.uint8).reshape(-1, 112, 112, 3)
    index = {k: i for i, k in enumerate(keys)}
    train, val, dropped = split_by_person(data, index, settings.training.val_fraction, settings.training.seed, stable)
    if not len(train.pairs) and not len(train.triplets):
        raise TrainingError(f"no usable training pairs ({len(data.pairs)} pairs, {failed} faces not found)")
    original, _ = current.predict(list(crops))
    model = to_torch(current.model_path)
    conversion_diff = verify_conversion(model, current, crops[:32], settings.training.verify_tolerance)
    trainer = Trainer(settings, model, crops, original, train, val, run_dir, current.input_mean, current.input_std,
                      threshold)
    trainer.resume()
    history = trainer.fit(on_epoch_end)
    best = trainer.best_model()
    exported = export_onnx(best, current.model_path, run_dir / "model.onnx")
    export_diff = verify_export(best, exported, crops[:32], settings)
    general = general_set(settings, analyzer, {ident.split("#")[0] for ident in stable.values()})
    val_keys = val.keys()
    candidate = Recognizer(exported, settings.models)
    embeddings = {name: (embed(rec, crops[val_keys]), embed(rec, general[0]))
                  for name, rec in (("current", current), ("candidate", candidate))}
    metrics, verdict = judge(settings, embeddings, val_keys, val, general[1], threshold)
    metrics["best_epoch"] = trainer.best[0] + 1
    result = TrainResult(
        run_id=run_dir.name, run_dir=str(run_dir), model_path=str(exported), parent=parent,
        sha256=_file_digest(exported), passed_gate=verdict.passed, gate_reasons=verdict.reasons, metrics=metrics,
        history=history,
        data={"pairs": len(data.pairs), "triplets": len(data.triplets), "rows_rejected": data.rejected, "faces": len(keys), "faces_not_found": failed,
              "train_pairs": train.feedback_pairs, "implied_train_pairs": len(train.pairs) - train.feedback_pairs,
              "val_pairs": len(val.pairs), "train_triplets": len(train.triplets),
              "contradicted_votes": train.contradicted + val.contradicted,
              "dropped_across_split": dropped, "general_images": len(general[1])},
        conversion_max_diff=conversion_diff, export_max_diff=export_diff,
        seconds=round(time.perf_counter() - start, 1), device=str(trainer.device),
        gate_failed=verdict.failed, match_threshold=metrics["match_threshold"],
    )
    result_file.write_text(json.dumps(result.to_dict(), indent=2, default=float))
    return result
