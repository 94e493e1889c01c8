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
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from .config import ProcessSettings, Settings

__all__ = ["apply_process_settings", "at_background_priority", "faiss", "lower_session_share",
           "lower_thread_priority", "raise_to_normal_priority", "set_thread_nice", "thread_nice"]

T = TypeVar("T")

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


def thread_nice() -> int | None:
    """The calling thread's CPU priority (nice); None where it cannot be read (not Linux)."""
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # Linux: this thread only
    except (OSError, AttributeError):
        return None


def set_thread_nice(value: int) -> bool:
    """Set the calling thread's CPU priority; False where it is not allowed (raising a priority
    needs root or ``RLIMIT_NICE``) or not possible."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)
    except OSError:
        return False
    return True


def lower_session_share(nice: int) -> bool:
    """Give this process's session the CPU share of ``nice`` against other sessions; True when set.

    Linux shares the CPU between sessions (``kernel.sched_autogroup_enabled``), or between systemd
    units by their ``CPUWeight=``, before it looks at the nice values of threads: threads' nice
    only orders the work of one session. The pipeline's daemon leads a session with its run
    workers; lowering its share lets the service's searches and pages go first when both want the
    whole CPU (``process.pipeline_share_nice``). Only a process that leads its own session changes
    it (it would change the shell's otherwise), and only on Linux.
    """
    if nice <= 0 or not hasattr(os, "getsid") or os.getsid(0) != os.getpid():
        return False
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        return False
    return True


def raise_to_normal_priority() -> int | None:
    """Raise the calling thread to normal CPU priority (nice 0) if it runs lower; returns the nice
    value to go back to, or None when nothing changed.

    For a thread whose work others wait for, started from a thread at a lower priority: a store
    session (every other process waits for the lock's holder; starved by searches, a run holding it
    held it for tens of seconds while curation waited, a priority inversion), or the service's
    reading of a newer index (new faces are not searchable until it is done). Threads started
    meanwhile (DuckDB's) inherit it. Raising a priority needs the right to (root, or the
    ``RLIMIT_NICE`` the units grant with ``LimitNICE=+0``); without it nothing changes.
    """
    nice = thread_nice()
    if nice is None or nice <= 0 or not set_thread_nice(0):
        return None
    return nice


def lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority to ``nice`` (never raise it; 0: no change).

    Linux gives each thread its own priority, and threads started by it (onnxruntime's, OpenMP's
    pools) inherit it. Where it cannot be set (another system), nothing changes.
    """
    current = thread_nice()
    if nice and current is not None and nice > current:
        set_thread_nice(nice)


def at_background_priority(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread of its own at the background CPU priority (``process.background_nice``);
    returns its result or raises its exception.

    For the pipeline's heavy work (embedding a batch, a full re-clustering, fine-tuning): searches
    go first, while the rest of a run (its start-up, the merge, the index) keeps the process's
    priority. A thread's priority is its own on Linux, and the threads it starts (onnxruntime's and
    OpenMP's pools, created on first use) inherit it; a thread of its own needs no right to go
    back up afterwards. Where the priority cannot be set, ``fn`` runs as it would.
    """
    nice = apply_process_settings().background_nice
    outcome: list[Any] = []

    def work() -> None:
        try:
            lower_thread_priority(nice)
            outcome.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            outcome.append((False, exc))

    worker = threading.Thread(target=work, name="background-work", daemon=True)  # never keeps the process up
    worker.start()
    worker.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


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
