"""Process-wide settings, applied once at start-up: the OpenMP threads and wait policy of faiss.

OpenMP reads its wait policy once, when faiss first loads it, so the policy has to be in place
before that. Every entry point (the command line, and the library, which the web app and the
Dagster resource build) calls :func:`apply_process_settings` with its configuration; the modules
that run faiss use :data:`faiss`, a handle that imports the real module on first use, after the
settings were applied (the defaults when nothing applied any, e.g. a script using the index alone).
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from types import ModuleType
from typing import Any

from .config import ProcessSettings, Settings

__all__ = ["apply_process_settings", "faiss"]

_lock = threading.Lock()
_applied: ProcessSettings | None = None


def apply_process_settings(settings: Settings | ProcessSettings | None = None) -> ProcessSettings:
    """Apply the process-wide settings; the first call of a process wins, later calls change nothing.

    Args:
        settings: the configuration (its ``process`` section is read); None applies the defaults.

    Returns:
        The settings in force, those of the first call.
    """
    global _applied
    with _lock:
        if _applied is None:
            cfg = settings.process if isinstance(settings, Settings) else settings or ProcessSettings()
            os.environ.setdefault("OMP_WAIT_POLICY", cfg.omp_wait_policy.upper())  # a user's own wins
            _applied = cfg
            if "faiss" in sys.modules:  # loaded before start-up (a script importing it first): threads still apply
                _set_threads(sys.modules["faiss"], cfg)
        return _applied


def _set_threads(module: ModuleType, cfg: ProcessSettings) -> None:
    if cfg.omp_threads:
        module.omp_set_num_threads(cfg.omp_threads)


class _Faiss:
    """The faiss module, imported on the first attribute read, after :func:`apply_process_settings`."""

    def __getattr__(self, name: str) -> Any:
        cfg = apply_process_settings()  # the settings in force: the entry point's, else the defaults
        loaded = "faiss" in sys.modules
        module = importlib.import_module("faiss")
        if not loaded:
            _set_threads(module, cfg)
        # Copy the module's names onto the handle: later reads are plain attribute hits.
        self.__dict__.update(vars(module))
        return getattr(module, name)


faiss: Any = _Faiss()
