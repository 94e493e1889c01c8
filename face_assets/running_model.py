"""The model version a library runs: which recognizer file, its embedding tag and match threshold,
the models loaded on first use, and the registry calls that choose, switch, list and register versions.

One job: knowing and changing what embeds faces. It holds no index and no catalog of its own (the
library passes its catalog in); the library's lock, shared here, guards the running model as it
guards the index, so a query is embedded and searched by one version even across a hot-swap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import registry
from .config import Settings
from .errors import ModelVersionError, NoFaceDetectedError
from .models import embedding_dim_of, resolve_pack
from .schemas import FilterResult, ImageAnalysis
from .store import Catalog

if TYPE_CHECKING:
    from .filtering import FaceFilter
    from .training import TrainResult

logger = logging.getLogger(__name__)


class RunningModel:
    """The recognizer version of one library: its file, its registry name (``version``), its
    embedding tag (``model_version``) and match threshold; the models loaded on first use."""

    def __init__(self, settings: Settings, lock: threading.RLock):
        self.settings = settings
        self._lock = lock
        self._filter: FaceFilter | None = None
        self._pack = resolve_pack(settings.models)
        self._model_file = self._pack.recognizer
        self.version: str | None = None
        self.match_threshold: float = settings.search.match_threshold

    @property
    def filter(self) -> FaceFilter:
        """Detector, recognizer (the running version) and cartoon classifier, loaded on first use."""
        from .filtering import FaceFilter  # the models' modules, imported with the first model

        with self._lock:
            if self._filter is None:
                face_filter = FaceFilter(self.settings)
                face_filter.analyzer.use_recognizer(self._model_file)
                self._filter = face_filter
            return self._filter

    @property
    def model_version(self) -> str:
        """Embedding tag of the running recognizer file (pack, file, hash)."""
        return dataclasses.replace(self._pack, recognizer=self._model_file).model_version

    @property
    def embedding_dim(self) -> int:
        """Embedding length of the running recognizer, read from its file (no model loaded)."""
        return embedding_dim_of(str(self._model_file))

    def main_face(self, image: Any, face_index: int | None = None) -> tuple[np.ndarray, FilterResult]:
        """Embedding of the main face (or of face ``face_index``) and the filter result naming it in ``face_index``."""
        analysis: ImageAnalysis = self.filter.analyzer.analyze(image)
        result = self.filter.judge(analysis)
        source = image if isinstance(image, (str, os.PathLike)) else None
        if not analysis.faces:
            raise NoFaceDetectedError(source)
        if face_index is not None:
            if not 0 <= face_index < len(analysis.faces):
                raise NoFaceDetectedError(source, f"the image has {len(analysis.faces)} faces, no face {face_index}")
            result = result | {"face_index": face_index}
        return analysis.faces[result["face_index"]].normed_embedding, result

    def select(self, catalog: Catalog) -> None:
        """Choose the recognizer version of config or the registry (at open, before the index); loads no model."""
        registry.ensure_base(catalog, self._pack)
        version, path = registry.active_model(catalog, self.settings, self._pack)
        self._use_file(path)
        self._set_active(catalog, version)
        stale = len(catalog.image_sources(self.model_version))
        if stale:
            logger.warning("%d images were embedded by another model version and are not searchable until "
                           "re-embedded (call reembed())", stale)

    def switch(self, catalog: Catalog, version: str) -> bool:
        """Run the registered ``version`` from now on (loaded models swap at once); False if its file already ran."""
        path = registry.model_file(catalog, self.settings, self._pack, version)
        changed = self._use_file(path)
        self._set_active(catalog, version)
        return changed

    def _use_file(self, path: Path) -> bool:
        """Run the recognizer file ``path`` from now on (loaded models swap at once); False if it already runs."""
        if Path(path).resolve() == self._model_file.resolve():
            return False
        if self._filter is not None:
            self._filter.analyzer.use_recognizer(path)
        self._model_file = Path(path)
        return True

    def _set_active(self, catalog: Catalog, version: str) -> None:
        """Record the running version and its match threshold (read once here, not per search)."""
        self.version = version
        self.match_threshold = registry.match_threshold(registry.version_row(catalog, version), self.settings)

    def list(self, catalog: Catalog) -> list[dict]:
        """The registry's versions, each marked ``active`` and with its ``match_threshold``."""
        return [row | {"active": row["version"] == self.version,
                       "match_threshold": registry.match_threshold(row, self.settings)}
                for row in registry.versions(catalog)]

    def register(self, catalog: Catalog, result: TrainResult) -> None:
        """Name a trained candidate (the known version of the same file, else a new name), copy its
        file into the data folder and register it as ``candidate`` or ``rejected`` by its gate."""
        known = [r["version"] for r in registry.versions(catalog) if r["sha256"] == result.sha256]
        result.version = known[0] if known else registry.new_version_name(result.sha256)
        if not known:
            target = self.settings.layout.model_versions / f"{result.version}.onnx"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.model_path, target)
            registry.add_version(catalog,
                result.version, result.parent, str(target.relative_to(self.settings.layout.root)),
                result.sha256, "candidate" if result.passed_gate else "rejected",
                {"gate": {"passed": result.passed_gate, "reasons": result.gate_reasons, "failed": result.gate_failed}} | result.metrics
                | {"run_id": result.run_id, "data": result.data, "seconds": result.seconds})

    @staticmethod
    def promote(catalog: Catalog, version: str, force: bool) -> None:
        """Mark ``version`` promoted in the registry, refused when the gate rejected it unless ``force``."""
        row = registry.version_row(catalog, version)
        if registry.failed_gate(row) and not force:
            reasons = "; ".join(row["metrics"]["gate"]["reasons"])
            raise ModelVersionError(f"model version '{version}' failed the evaluation gate ({reasons}); "
                                    "use force to promote it anyway")
        if row["status"] != "promoted":
            registry.promote(catalog, version)

    @staticmethod
    def roll_back(catalog: Catalog, version: str | None) -> str:
        """Mark ``version`` (default: the one the promoted version replaced) promoted again; returns it."""
        current = registry.promoted(catalog)
        target = version or (registry.previous(catalog, current) if current else None)
        if target is None:
            raise ModelVersionError(f"nothing to roll back to from '{current}'")
        if registry.failed_gate(registry.version_row(catalog, target)):
            raise ModelVersionError(f"model version '{target}' failed the evaluation gate; promote it with force")
        if target != current:
            registry.promote(catalog, target, action="rollback")
        return target
